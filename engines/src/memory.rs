//! The memory an engine owns: the host (ort-cpu) or a CUDA device (ort-cuda, tensorrt). The KV
//! cache (`kv_cache.rs`) and the stage values (`values.rs`) are one implementation each over
//! this trait, so that ort-cpu runs the exact bookkeeping (addresses, views, in-place writes)
//! the GPU backends run over device memory.

use crate::error::{EngineError, Result};

/// Where a buffer's bytes live.
pub trait Memory: Sized {
    /// What allocates it: nothing on the host, a CUDA stream on a device.
    type Alloc;
    /// `bytes` zeroed bytes. An allocation the system refuses is an error, not an abort, so
    /// that a server fails that one generation only.
    fn alloc(with: &Self::Alloc, bytes: usize) -> Result<Self>;
    /// The first byte, as the engine binds it (a host or a device address).
    fn base(&mut self, with: &Self::Alloc) -> *mut u8;
    /// Copy `out.len()` bytes from `offset` to the host.
    fn copy_to_host(&self, with: &Self::Alloc, offset: usize, out: &mut [u8]) -> Result<()>;
    /// Copy `data` to `offset`.
    fn copy_from_host(&mut self, with: &Self::Alloc, offset: usize, data: &[u8]) -> Result<()>;
    /// Zero `len` bytes from `offset`.
    fn zero(&mut self, with: &Self::Alloc, offset: usize, len: usize) -> Result<()>;
}

/// Host memory aligned to 256 bytes (what TensorRT asks of every tensor address, and more
/// than any element type or SIMD load needs), zeroed lazily by the allocator: pages become
/// resident as they are written.
pub struct AlignedHostBuffer {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedHostBuffer {}

impl AlignedHostBuffer {
    pub const ALIGN: usize = 256;

    /// `len` zeroed bytes (at least one is allocated, so that the address is always valid);
    /// None when the allocator refuses.
    pub fn try_zeroed(len: usize) -> Option<Self> {
        let layout = Self::layout(len)?;
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        std::ptr::NonNull::new(p).map(|ptr| AlignedHostBuffer { ptr, len })
    }

    /// A few bytes (a shape value): an allocation failure here is the process's end anyway.
    pub fn zeroed(len: usize) -> Self {
        Self::try_zeroed(len).unwrap_or_else(|| {
            std::alloc::handle_alloc_error(
                std::alloc::Layout::from_size_align(len.max(1), Self::ALIGN)
                    .unwrap_or(std::alloc::Layout::new::<u8>()),
            )
        })
    }

    fn layout(len: usize) -> Option<std::alloc::Layout> {
        std::alloc::Layout::from_size_align(len.max(1), Self::ALIGN).ok()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: len initialised (zeroed at allocation) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for AlignedHostBuffer {
    fn drop(&mut self) {
        if let Some(layout) = Self::layout(self.len) {
            // SAFETY: allocated in `try_zeroed` with this layout.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) }
        }
    }
}

/// Host memory as an engine's (ort-cpu).
pub type HostMem = AlignedHostBuffer;

fn range(len: usize, offset: usize, n: usize) -> Result<std::ops::Range<usize>> {
    offset
        .checked_add(n)
        .filter(|&e| e <= len)
        .map(|e| offset..e)
        .ok_or_else(|| {
            EngineError::Unsupported(format!(
                "bytes {offset}..{} are beyond a buffer of {len}",
                offset.saturating_add(n)
            ))
        })
}

impl Memory for HostMem {
    type Alloc = ();

    fn alloc(_: &(), bytes: usize) -> Result<Self> {
        AlignedHostBuffer::try_zeroed(bytes).ok_or_else(|| {
            EngineError::OutOfMemory(format!(
                "out of memory: cannot allocate {:.2} GB",
                bytes as f64 / 1e9
            ))
        })
    }

    fn base(&mut self, _: &()) -> *mut u8 {
        self.as_mut_ptr()
    }

    fn copy_to_host(&self, _: &(), offset: usize, out: &mut [u8]) -> Result<()> {
        let r = range(self.len(), offset, out.len())?;
        out.copy_from_slice(&self.as_slice()[r]);
        Ok(())
    }

    fn copy_from_host(&mut self, _: &(), offset: usize, data: &[u8]) -> Result<()> {
        let r = range(self.len(), offset, data.len())?;
        self.as_mut_slice()[r].copy_from_slice(data);
        Ok(())
    }

    fn zero(&mut self, _: &(), offset: usize, len: usize) -> Result<()> {
        let r = range(self.len(), offset, len)?;
        self.as_mut_slice()[r].fill(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_buffers_are_256_byte_aligned_and_zeroed() {
        let mut kept = vec![];
        for len in [0, 1, 4, 8, 255, 256, 257, 4096] {
            let mut b = AlignedHostBuffer::zeroed(len);
            assert_eq!(b.as_mut_ptr() as usize % 256, 0, "len {len}");
            assert_eq!(b.len(), len);
            assert!(b.as_slice().iter().all(|&x| x == 0));
            b.as_mut_slice().fill(7);
            kept.push(b);
        }
        assert!(kept.iter().all(|b| b.as_slice().iter().all(|&x| x == 7)));
    }

    #[test]
    fn host_copies_stay_inside_the_buffer() {
        let mut m = HostMem::alloc(&(), 16).unwrap();
        m.copy_from_host(&(), 4, &[1, 2, 3]).unwrap();
        let mut out = [0u8; 5];
        m.copy_to_host(&(), 3, &mut out).unwrap();
        assert_eq!(out, [0, 1, 2, 3, 0]);
        m.zero(&(), 5, 1).unwrap();
        m.copy_to_host(&(), 3, &mut out).unwrap();
        assert_eq!(out, [0, 1, 0, 3, 0]);
        assert!(m.copy_from_host(&(), 14, &[0; 3]).is_err());
        assert!(m.copy_to_host(&(), usize::MAX, &mut out).is_err());
        assert!(m.zero(&(), 17, 0).is_err());
    }

    #[test]
    fn a_buffer_the_system_cannot_give_is_an_error_not_an_abort() {
        // 1 EiB: refused by the allocator under any overcommit policy. black_box: an allocation
        // whose result is never used may be elided by the optimiser, as if it had succeeded.
        let r = std::hint::black_box(HostMem::alloc(&(), 1 << 60));
        let e = r.err().expect("1 EiB allocated");
        assert!(e.to_string().starts_with("out of memory"), "{e}");
    }
}
