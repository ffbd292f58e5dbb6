//! The self-attention KV cache: one buffer for the whole generation, allocated once, token-major:
//! (L, depth, 2, 2B, H, hd). Each scale's new K/V (all blocks) is one contiguous region at token
//! offset `begin`, and the past of any scale is one contiguous prefix, so a backend binds the past
//! as a view and writes the new K/V in place; earlier scales are never re-run.

pub struct KvCache {
    /// (L, depth, 2, rows, heads, head_dim)
    pub shape: [usize; 6],
    pub data: Vec<f32>,
}

impl KvCache {
    pub fn new(depth: usize, rows: usize, heads: usize, capacity: usize, head_dim: usize) -> Self {
        let shape = [capacity, depth, 2, rows, heads, head_dim];
        let n = shape.iter().product();
        KvCache {
            shape,
            data: vec![0.0; n],
        }
    }

    /// Floats per token (all blocks, K and V, all rows and heads).
    pub fn token_stride(&self) -> usize {
        self.shape[1..].iter().product()
    }

    pub fn capacity(&self) -> usize {
        self.shape[0]
    }

    /// The first `len` tokens: shape and data, without copying.
    pub fn past(&self, len: usize) -> ([usize; 6], &[f32]) {
        let len = len.min(self.capacity());
        let mut shape = self.shape;
        shape[0] = len;
        (shape, &self.data[..len * self.token_stride()])
    }

    /// Write one scale's K/V, shaped (n, depth, 2, rows, H, hd), at token offset `begin`.
    pub fn write(&mut self, kv: &[f32], begin: usize) -> Result<(), String> {
        let ts = self.token_stride();
        if !kv.len().is_multiple_of(ts) {
            return Err(format!(
                "K/V of {} floats is not a whole number of tokens of {ts}",
                kv.len()
            ));
        }
        let n = kv.len() / ts;
        if begin + n > self.capacity() {
            return Err(format!(
                "KV cache overflow: tokens {begin}..{} of {}",
                begin + n,
                self.capacity()
            ));
        }
        self.data[begin * ts..(begin + n) * ts].copy_from_slice(kv);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_are_contiguous_regions_and_pasts_are_prefixes() {
        let mut c = KvCache::new(2, 2, 1, 5, 1);
        let ts = c.token_stride();
        assert_eq!(ts, 2 * 2 * 2);
        c.write(&vec![1.0; ts], 0).unwrap();
        c.write(&vec![2.0; 2 * ts], 1).unwrap();
        let (shape, past) = c.past(3);
        assert_eq!(shape, [3, 2, 2, 2, 1, 1]);
        assert_eq!(&past[..ts], &vec![1.0; ts][..]);
        assert_eq!(&past[ts..], &vec![2.0; 2 * ts][..]);
        assert!(c.write(&vec![0.0; 3 * ts], 3).is_err());
        assert!(c.write(&[0.0; 3], 0).is_err());
    }
}
