//! The KV cache, one implementation for every engine: one buffer for a whole generation,
//! allocated once, laid out as `star_artifact::kv::KvLayout` says (block-major, token-major
//! within a block), over memory that is the engine's: the host (`HostKv`, ort-cpu) or a CUDA
//! device (`gpu::CudaKv`, ort-cuda and tensorrt). Each block's past at any scale is a prefix of
//! its region and the scale's new K/V one range of it, so a step binds the past as views and
//! writes the new K/V in place; earlier scales are never re-run.

use crate::error::{EngineError, Result};
use star_artifact::kv::KvLayout;
use star_artifact::tensor::Tensor;

/// What the pipeline does with an engine's cache (`Engine::kv`).
pub trait KvStore {
    /// (Re)allocate the cache for one generation: (depth, capacity, 2, rows, heads, head_dim).
    /// The same shape again reuses the buffer; another shape gives the old one back first, so
    /// that two are never held at once.
    fn alloc(&mut self, shape: [usize; 6]) -> Result<()>;
    /// Give the cache's memory back; the next `alloc` allocates it anew.
    fn release(&mut self);
    /// The cache's shape, once allocated.
    fn shape(&self) -> Option<[usize; 6]>;
    /// Tokens begin..begin+n of every block as a host tensor (depth, n, 2, rows, heads,
    /// head_dim), for observation and checks only.
    fn read(&self, begin: usize, n: usize) -> Result<Tensor>;
}

/// Where a cache's bytes live.
pub trait KvMemory: Sized {
    /// What allocates it: nothing on the host, a CUDA stream on a device.
    type Alloc;
    /// `bytes` zeroed bytes. An allocation the system refuses is an error, not an abort, so
    /// that a server fails that one generation only.
    fn alloc(with: &Self::Alloc, bytes: usize) -> Result<Self>;
    /// The first byte, as the engine binds it (a host or a device address).
    fn base(&mut self, with: &Self::Alloc) -> *mut u8;
    /// Copy `out.len()` bytes from `offset` to the host.
    fn copy_to_host(&self, with: &Self::Alloc, offset: usize, out: &mut [u8]) -> Result<()>;
}

pub struct KvCache<M: KvMemory> {
    with: M::Alloc,
    buf: Option<(M, KvLayout)>,
}

impl<M: KvMemory> KvCache<M> {
    pub fn new(with: M::Alloc) -> Self {
        KvCache { with, buf: None }
    }

    /// The buffer's first byte and layout, for binding views of it; None before `alloc`.
    pub fn bound(&mut self) -> Option<(*mut u8, KvLayout)> {
        let with = &self.with;
        self.buf.as_mut().map(|(m, l)| (m.base(with), *l))
    }

    pub fn layout(&self) -> Option<KvLayout> {
        self.buf.as_ref().map(|(_, l)| *l)
    }
}

impl<M: KvMemory> KvStore for KvCache<M> {
    fn alloc(&mut self, shape: [usize; 6]) -> Result<()> {
        if matches!(&self.buf, Some((_, l)) if l.shape == shape) {
            // Same shape: the stale contents are never read, every scale writes its tokens
            // before they are used.
            return Ok(());
        }
        self.buf = None;
        let layout = KvLayout::checked(shape).map_err(EngineError::Unsupported)?;
        let m = M::alloc(&self.with, layout.bytes())?;
        self.buf = Some((m, layout));
        Ok(())
    }

    fn release(&mut self) {
        self.buf = None;
    }

    fn shape(&self) -> Option<[usize; 6]> {
        self.layout().map(|l| l.shape)
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
        let floats = bytes
            .chunks_exact(KvLayout::ELEM_BYTES)
            .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok(Tensor::f32(shape, floats))
    }
}

/// A host cache: zeroed lazily by the allocator, so pages become resident as scales write them.
pub struct HostKv(Vec<f32>);

impl KvMemory for HostKv {
    type Alloc = ();

    fn alloc(_: &(), bytes: usize) -> Result<Self> {
        let n = bytes / KvLayout::ELEM_BYTES;
        zeroed_f32(n).map(HostKv).ok_or_else(|| {
            EngineError::OutOfMemory(format!(
                "out of memory: cannot allocate {:.2} GB for the KV cache",
                bytes as f64 / 1e9
            ))
        })
    }

    fn base(&mut self, _: &()) -> *mut u8 {
        self.0.as_mut_ptr() as *mut u8
    }

    fn copy_to_host(&self, _: &(), offset: usize, out: &mut [u8]) -> Result<()> {
        // SAFETY: viewing initialised f32s as bytes.
        let all = unsafe {
            std::slice::from_raw_parts(
                self.0.as_ptr() as *const u8,
                std::mem::size_of_val(&self.0[..]),
            )
        };
        let src = offset
            .checked_add(out.len())
            .and_then(|e| all.get(offset..e))
            .ok_or_else(|| EngineError::Unsupported("KV cache read beyond its end".into()))?;
        out.copy_from_slice(src);
        Ok(())
    }
}

/// `vec![0.0; n]` that returns None when the allocator refuses instead of aborting the process.
/// The block comes from `alloc_zeroed` (calloc), so its pages stay untouched until written.
fn zeroed_f32(n: usize) -> Option<Vec<f32>> {
    if n == 0 {
        return Some(Vec::new());
    }
    let layout = std::alloc::Layout::array::<f32>(n).ok()?;
    // SAFETY: the layout's size is non-zero; a non-null block is n zeroed f32 (0.0 is all-zero
    // bits) from the global allocator with f32's layout, which is how a Vec<f32> of capacity n
    // is allocated and how it will be freed.
    unsafe {
        let p = std::alloc::alloc_zeroed(layout).cast::<f32>();
        if p.is_null() {
            return None;
        }
        Some(Vec::from_raw_parts(p, n, n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cache_the_system_cannot_give_is_an_error_not_an_abort() {
        // 2^58 floats: 1 EiB, refused by the allocator under any overcommit policy. black_box:
        // an allocation whose result is never used may be elided by the optimiser, as if it
        // had succeeded.
        let mut c = KvCache::<HostKv>::new(());
        let e = std::hint::black_box(c.alloc([1 << 20, 1 << 20, 2, 1 << 17, 1, 1]))
            .expect_err("1 EiB allocated");
        assert!(e.to_string().starts_with("out of memory"), "{e}");
        assert!(c.shape().is_none());
        c.alloc([0, 5, 2, 1, 1, 1]).unwrap();
        assert_eq!(c.shape(), Some([0, 5, 2, 1, 1, 1]));
    }

    #[test]
    fn reads_gather_each_blocks_range() {
        // 2 blocks, 5 tokens, 2 floats per token and block.
        let mut c = KvCache::<HostKv>::new(());
        c.alloc([2, 5, 2, 1, 1, 1]).unwrap();
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
        c.alloc([2, 5, 2, 1, 1, 1]).unwrap();
        assert_eq!(
            c.read(1, 1).unwrap().as_f32().unwrap(),
            &[2.0, 3.0, 12.0, 13.0]
        );
        c.alloc([1, 5, 2, 1, 1, 1]).unwrap();
        assert_eq!(c.read(1, 1).unwrap().as_f32().unwrap(), &[0.0, 0.0]);
        c.release();
        assert!(c.shape().is_none() && c.read(0, 1).is_err());
    }
}
