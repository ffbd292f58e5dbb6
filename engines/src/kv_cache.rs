//! The KV cache, one implementation for every engine: one buffer for a whole generation,
//! allocated once, laid out as `star_artifact::kv::KvLayout` says (block-major, token-major
//! within a block), over memory that is the engine's: the host (`memory::HostMem`, ort-cpu) or a CUDA
//! device (`gpu::CudaMem`, ort-cuda and tensorrt). Each block's past at any scale is a prefix of
//! its region and the scale's new K/V one range of it, so a step binds the past as views and
//! writes the new K/V in place; earlier scales are never re-run.

use crate::error::{EngineError, Result};
use crate::memory::Memory;
use star_artifact::dtype::Dtype;
use star_artifact::kv::KvLayout;
use star_artifact::tensor::Tensor;

/// What the pipeline does with an engine's cache (`Engine::kv`).
pub trait KvStore {
    /// (Re)allocate the cache for one generation: (depth, capacity, 2, rows, heads, head_dim)
    /// elements of `dtype` (the manifest's `kv_cache_dtype`). The same layout again reuses the
    /// buffer; another gives the old one back first, so that two are never held at once.
    fn alloc(&mut self, shape: [usize; 6], dtype: Dtype) -> Result<()>;
    /// Give the cache's memory back; the next `alloc` allocates it anew.
    fn release(&mut self);
    /// The cache's layout, once allocated.
    fn layout(&self) -> Option<KvLayout>;
    /// The cache's shape, once allocated.
    fn shape(&self) -> Option<[usize; 6]> {
        self.layout().map(|l| l.shape)
    }
    /// Bumped by every allocation: bindings made over an older buffer are stale.
    fn epoch(&self) -> u64;
    /// Tokens begin..begin+n of every block as a float32 host tensor (depth, n, 2, rows, heads,
    /// head_dim), for observation and checks only.
    fn read(&self, begin: usize, n: usize) -> Result<Tensor>;
}

pub struct KvCache<M: Memory> {
    with: M::Alloc,
    buf: Option<(M, KvLayout)>,
    epoch: u64,
}

impl<M: Memory> KvCache<M> {
    pub fn new(with: M::Alloc) -> Self {
        KvCache {
            with,
            buf: None,
            epoch: 0,
        }
    }

    /// The buffer's first byte and layout, for binding views of it; None before `alloc`.
    pub fn bound(&mut self) -> Option<(*mut u8, KvLayout)> {
        let with = &self.with;
        self.buf.as_mut().map(|(m, l)| (m.base(with), *l))
    }

    /// What allocates it (the stream, on a device).
    pub fn with(&self) -> &M::Alloc {
        &self.with
    }
}

impl<M: Memory> KvStore for KvCache<M> {
    fn alloc(&mut self, shape: [usize; 6], dtype: Dtype) -> Result<()> {
        if matches!(&self.buf, Some((_, l)) if l.shape == shape && l.dtype == dtype) {
            // Same shape: the stale contents are never read, every scale writes its tokens
            // before they are used.
            return Ok(());
        }
        self.buf = None;
        self.epoch += 1;
        let layout = KvLayout::checked(shape, dtype).map_err(EngineError::Unsupported)?;
        let m = M::alloc(&self.with, layout.bytes()).map_err(|e| match e {
            EngineError::OutOfMemory(m) => {
                EngineError::OutOfMemory(format!("{m} for the KV cache"))
            }
            e => e,
        })?;
        self.buf = Some((m, layout));
        Ok(())
    }

    fn release(&mut self) {
        self.buf = None;
        self.epoch += 1;
    }

    fn layout(&self) -> Option<KvLayout> {
        self.buf.as_ref().map(|(_, l)| *l)
    }

    fn epoch(&self) -> u64 {
        self.epoch
    }

    fn read(&self, begin: usize, n: usize) -> Result<Tensor> {
        let (m, l) = self.buf.as_ref().ok_or_else(|| {
            EngineError::Unsupported("KV cache read before its allocation".into())
        })?;
        let mut bytes = vec![];
        for i in 0..l.depth() {
            let r = l.region(i, begin, n).map_err(EngineError::Unsupported)?;
            let at = bytes.len();
            bytes.resize(at + r.bytes, 0u8);
            m.copy_to_host(&self.with, r.byte_offset, &mut bytes[at..])?;
        }
        let mut shape = l.shape.to_vec();
        shape[1] = n;
        let floats = match l.dtype {
            Dtype::Float32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::Float16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_ne_bytes([b[0], b[1]]).to_f32())
                .collect(),
            d => {
                return Err(EngineError::Unsupported(format!(
                    "a KV cache of {d} cannot be read"
                )))
            }
        };
        Ok(Tensor::f32(shape, floats))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::HostMem;

    #[test]
    fn a_cache_the_system_cannot_give_is_an_error_not_an_abort() {
        // 2^58 floats: 1 EiB, refused by the allocator under any overcommit policy. black_box:
        // an allocation whose result is never used may be elided by the optimiser, as if it
        // had succeeded.
        let mut c = KvCache::<HostMem>::new(());
        let e = std::hint::black_box(c.alloc([1 << 20, 1 << 20, 2, 1 << 17, 1, 1], Dtype::Float32))
            .expect_err("1 EiB allocated");
        assert!(e.to_string().starts_with("out of memory"), "{e}");
        assert!(c.shape().is_none());
        c.alloc([0, 5, 2, 1, 1, 1], Dtype::Float32).unwrap();
        assert_eq!(c.shape(), Some([0, 5, 2, 1, 1, 1]));
    }

    #[test]
    fn reads_gather_each_blocks_range() {
        // 2 blocks, 5 tokens, 2 floats per token and block.
        let mut c = KvCache::<HostMem>::new(());
        c.alloc([2, 5, 2, 1, 1, 1], Dtype::Float32).unwrap();
        let (base, l) = c.bound().unwrap();
        // SAFETY: the cache's own 20 floats.
        let data = unsafe { std::slice::from_raw_parts_mut(base as *mut f32, 20) };
        for (k, v) in data.iter_mut().enumerate() {
            *v = k as f32;
        }
        assert_eq!(l.bytes(), 80);
        // Tokens 1..3: floats 2..6 of block 0 and 12..16 of block 1.
        let t = c.read(1, 2).unwrap();
        assert_eq!(t.shape, vec![2, 2, 2, 1, 1, 1]);
        assert_eq!(
            t.as_f32().unwrap(),
            &[2.0, 3.0, 4.0, 5.0, 12.0, 13.0, 14.0, 15.0]
        );
        assert!(c.read(0, 0).unwrap().as_f32().unwrap().is_empty());
        assert!(c.read(4, 2).is_err());
        // The same shape keeps the buffer (and its contents); another gives it back first.
        c.alloc([2, 5, 2, 1, 1, 1], Dtype::Float32).unwrap();
        assert_eq!(
            c.read(1, 1).unwrap().as_f32().unwrap(),
            &[2.0, 3.0, 12.0, 13.0]
        );
        c.alloc([1, 5, 2, 1, 1, 1], Dtype::Float32).unwrap();
        assert_eq!(c.read(1, 1).unwrap().as_f32().unwrap(), &[0.0, 0.0]);
        c.release();
        assert!(c.shape().is_none() && c.read(0, 1).is_err());
    }
}
