//! The KV cache's layout, the same for every backend: one buffer, block-major, token-major within
//! a block, so that a scale's past is a prefix of each block's region (bound as `past_{i}`) and
//! its new K/V one contiguous range of it (bound as `kv_new_{i}`, written in place).

use crate::dtype::Dtype;

/// The layout of the KV cache, (depth, capacity, 2, rows, heads, head_dim): block-major,
/// token-major within a block. Block i's tokens begin..begin+n are one contiguous byte range,
/// so the past of a scale is a prefix of each block's region and its new K/V one range of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    pub shape: [usize; 6],
    /// The element type (`manifest::kv_cache_dtype`: float16 at FP16 and INT8).
    pub dtype: Dtype,
}

/// One region of the cache: where it starts, how long it is, and its shape as a tensor
/// (n, 2, rows, heads, head_dim).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvRegion {
    pub byte_offset: usize,
    pub bytes: usize,
    pub shape: [usize; 5],
}

impl KvLayout {
    pub fn elem_bytes(&self) -> usize {
        self.dtype.bytes()
    }

    pub fn depth(&self) -> usize {
        self.shape[0]
    }

    pub fn capacity(&self) -> usize {
        self.shape[1]
    }

    /// Floats per token of one block (K and V, all rows and heads).
    pub fn token_elems(&self) -> usize {
        self.shape[2..].iter().product()
    }

    pub fn bytes(&self) -> usize {
        self.depth() * self.capacity() * self.token_elems() * self.elem_bytes()
    }

    /// The layout of `shape`, refused when its size does not fit the address space (a shape
    /// from a damaged manifest would otherwise wrap and defeat the region checks).
    pub fn checked(shape: [usize; 6], dtype: Dtype) -> std::result::Result<Self, String> {
        shape
            .iter()
            .try_fold(dtype.bytes(), |a, &d| a.checked_mul(d))
            .map(|_| KvLayout { shape, dtype })
            .ok_or_else(|| format!("a KV cache of shape {shape:?} is too large to allocate"))
    }

    /// Tokens `begin..begin + n` of block `block`: the past of a scale is `region(i, 0, begin)`,
    /// its new K/V `region(i, begin, tokens)`.
    pub fn region(
        &self,
        block: usize,
        begin: usize,
        n: usize,
    ) -> std::result::Result<KvRegion, String> {
        if block >= self.depth() {
            return Err(format!(
                "KV cache block {block} is beyond its {} blocks",
                self.depth()
            ));
        }
        let end = begin
            .checked_add(n)
            .filter(|&e| e <= self.capacity())
            .ok_or_else(|| {
                format!(
                    "KV cache region of tokens {begin}..{} is beyond its {} tokens",
                    begin.saturating_add(n),
                    self.capacity()
                )
            })?;
        let tb = self.token_elems() * self.elem_bytes();
        let [_, _, two, rows, heads, hd] = self.shape;
        Ok(KvRegion {
            byte_offset: (block * self.capacity() + begin) * tb,
            bytes: (end - begin) * tb,
            shape: [end - begin, two, rows, heads, hd],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_are_token_ranges_of_each_block() {
        let l = KvLayout {
            shape: [3, 10, 2, 2, 3, 4],
            dtype: Dtype::Float32,
        };
        let tf = 2 * 2 * 3 * 4;
        assert_eq!(l.token_elems(), tf);
        assert_eq!(l.bytes(), 3 * 10 * tf * 4);
        let past = l.region(0, 0, 5).unwrap();
        assert_eq!(past.byte_offset, 0);
        assert_eq!(past.bytes, 5 * tf * 4);
        assert_eq!(past.shape, [5, 2, 2, 3, 4]);
        let new = l.region(0, 5, 4).unwrap();
        assert_eq!(new.byte_offset, past.bytes);
        assert_eq!(new.shape[0], 4);
        // Block 2 starts after two whole blocks; its past is a prefix of its own region.
        let b2 = l.region(2, 0, 5).unwrap();
        assert_eq!(b2.byte_offset, 2 * 10 * tf * 4);
        assert_eq!(
            l.region(2, 5, 4).unwrap().byte_offset,
            b2.byte_offset + b2.bytes
        );
        // The past of scale 0 is empty; a region may end exactly at the capacity, and the last
        // block's ends at the buffer's end.
        assert_eq!(l.region(1, 0, 0).unwrap().bytes, 0);
        let last = l.region(2, 6, 4).unwrap();
        assert_eq!(last.byte_offset + last.bytes, l.bytes());
        assert!(l.region(0, 7, 4).is_err());
        assert!(l.region(0, usize::MAX, 2).is_err());
        assert!(l.region(3, 0, 1).is_err());
        // A shape whose size wraps is refused before anything is allocated.
        assert!(KvLayout::checked([3, 10, 2, 2, 3, 4], Dtype::Float32).is_ok());
        assert!(KvLayout::checked([1 << 40, 1 << 30, 2, 2, 3, 4], Dtype::Float16).is_err());
        // Half the bytes in float16, the same regions in elements.
        let h = KvLayout {
            dtype: Dtype::Float16,
            ..l
        };
        assert_eq!(h.bytes() * 2, l.bytes());
        assert_eq!(
            h.region(2, 5, 4).unwrap().byte_offset * 2,
            l.region(2, 5, 4).unwrap().byte_offset
        );
        assert_eq!(
            h.region(2, 5, 4).unwrap().shape,
            l.region(2, 5, 4).unwrap().shape
        );
    }
}
