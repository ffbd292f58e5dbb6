//! The self-attention KV cache: one buffer (depth, 2, 2B, H, L, hd) allocated once per generation.
//! Each scale's graph reads the prefix of earlier scales; the runtime writes the scale's new K/V
//! at its token offset. Earlier scales are never re-run.

pub struct KvCache {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl KvCache {
    pub fn new(depth: usize, rows: usize, heads: usize, capacity: usize, head_dim: usize) -> Self {
        let shape = vec![depth, 2, rows, heads, capacity, head_dim];
        let n = shape.iter().product();
        KvCache {
            shape,
            data: vec![0.0; n],
        }
    }

    /// Write this scale's K/V, shaped (depth, 2, rows, H, n, hd), at token offset `begin`.
    pub fn write(&mut self, kv: &[f32], n: usize, begin: usize) {
        let (l, hd) = (self.shape[4], self.shape[5]);
        let rows: usize = self.shape[..4].iter().product();
        assert!(begin + n <= l, "KV cache overflow: {begin}+{n} > {l}");
        for r in 0..rows {
            let s = r * n * hd;
            let d = (r * l + begin) * hd;
            self.data[d..d + n * hd].copy_from_slice(&kv[s..s + n * hd]);
        }
    }
}
