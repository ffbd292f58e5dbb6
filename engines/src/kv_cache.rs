//! The self-attention KV cache on the host: one buffer for the whole generation, allocated once,
//! block-major and token-major within a block: (depth, L, 2, 2B, H, hd) (`ort_bind::KvLayout`).
//! Each block's past at any scale is one contiguous prefix of its region and the scale's new K/V
//! one contiguous range of it, so the step binds the past as views and writes the new K/V in
//! place; earlier scales are never re-run.

use crate::ort_bind::KvLayout;

pub struct KvCache {
    pub layout: KvLayout,
    /// Zeroed lazily by the allocator: pages become resident as scales write them.
    pub data: Vec<f32>,
}

impl KvCache {
    /// `shape`: (depth, L, 2, rows, heads, head_dim). An allocation the system refuses is an
    /// error, not an abort, so that a server fails that one generation only.
    pub fn new(shape: [usize; 6]) -> Result<Self, String> {
        let n: usize = shape.iter().product();
        let data = zeroed_f32(n).ok_or_else(|| {
            format!(
                "out of memory: cannot allocate {:.2} GB for the KV cache {shape:?}",
                n as f64 * KvLayout::ELEM_BYTES as f64 / 1e9
            )
        })?;
        Ok(KvCache {
            layout: KvLayout { shape },
            data,
        })
    }

    /// Tokens begin..begin+n of every block, (depth, n, 2, rows, H, hd): a copy for observers.
    pub fn read(&self, begin: usize, n: usize) -> Result<Vec<f32>, String> {
        let l = &self.layout;
        let mut out = Vec::with_capacity(l.depth() * n * l.token_floats());
        for i in 0..l.depth() {
            let r = l.region(i, begin, n)?;
            let f = r.byte_offset / KvLayout::ELEM_BYTES;
            out.extend_from_slice(&self.data[f..f + r.bytes / KvLayout::ELEM_BYTES]);
        }
        Ok(out)
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
        let e = std::hint::black_box(KvCache::new([1 << 20, 1 << 20, 2, 1 << 17, 1, 1]))
            .err()
            .expect("1 EiB allocated");
        assert!(e.starts_with("out of memory"), "{e}");
        assert!(KvCache::new([0, 5, 2, 1, 1, 1]).unwrap().data.is_empty());
    }

    #[test]
    fn reads_gather_each_blocks_range() {
        // 2 blocks, 5 tokens, 2 floats per token and block.
        let mut c = KvCache::new([2, 5, 2, 1, 1, 1]).unwrap();
        for (k, v) in c.data.iter_mut().enumerate() {
            *v = k as f32;
        }
        // Tokens 1..3: floats 2..6 of block 0 and 12..16 of block 1.
        assert_eq!(
            c.read(1, 2).unwrap(),
            vec![2.0, 3.0, 4.0, 5.0, 12.0, 13.0, 14.0, 15.0]
        );
        assert_eq!(c.read(0, 0).unwrap(), Vec::<f32>::new());
        assert!(c.read(4, 2).is_err());
    }
}
