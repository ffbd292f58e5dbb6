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
    /// `shape`: (depth, L, 2, rows, heads, head_dim).
    pub fn new(shape: [usize; 6]) -> Self {
        let n = shape.iter().product();
        KvCache {
            layout: KvLayout { shape },
            data: vec![0.0; n],
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_gather_each_blocks_range() {
        // 2 blocks, 5 tokens, 2 floats per token and block.
        let mut c = KvCache::new([2, 5, 2, 1, 1, 1]);
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
