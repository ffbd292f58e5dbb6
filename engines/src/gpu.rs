//! The GPU side of the machine: the NVIDIA driver and devices (CUDA driver API, `libcuda.so.1`
//! loaded at run time), TensorRT's library version and the host buffers it reads. Every absence
//! is an error that names what is missing and how to get it; nothing falls back to the CPU.

use crate::error::{EngineError, Result};
use crate::memory::Memory;
use star_artifact::engine_manifest::GpuIdentity;
use std::path::Path;

pub(crate) fn missing(backend: &str, what: &str, tried: String, how: &str) -> EngineError {
    EngineError::Missing {
        backend: backend.into(),
        what: what.into(),
        tried,
        how: how.into(),
    }
}

/// The CUDA driver, initialised once. cudarc panics when libcuda lacks a symbol its bindings
/// name; that is caught and reported as an old driver.
fn driver() -> std::result::Result<(), String> {
    static INIT: std::sync::OnceLock<std::result::Result<(), String>> = std::sync::OnceLock::new();
    INIT.get_or_init(|| {
        let present = std::panic::catch_unwind(|| {
            // SAFETY: only dlopens libcuda and resolves its symbols.
            unsafe { cudarc::driver::sys::is_culib_present() }
        });
        match present {
            Ok(true) => {}
            Ok(false) => {
                return Err("libcuda.so.1 not found: no NVIDIA driver on this machine".into())
            }
            Err(_) => {
                return Err(
                    "libcuda.so.1 lacks CUDA 12.4 driver functions: the NVIDIA driver is too old (R550 or newer is needed)".into(),
                )
            }
        }
        cudarc::driver::result::init().map_err(|e| format!("the CUDA driver did not initialise: {e}"))
    })
    .clone()
}

/// The CUDA driver's version, "major.minor" (13.0 for an R580 driver).
pub fn driver_version() -> Result<String> {
    driver().map_err(|why| no_gpu("", why))?;
    let mut v = 0i32;
    // SAFETY: the driver is loaded (checked above); the call writes one int.
    let r = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    if r != cudarc::driver::sys::cudaError_enum::CUDA_SUCCESS {
        return Err(no_gpu("", format!("cuDriverGetVersion failed: {r:?}")));
    }
    Ok(format!("{}.{}", v / 1000, (v % 1000) / 10))
}

fn no_gpu(backend: &str, why: String) -> EngineError {
    EngineError::NoGpu {
        backend: if backend.is_empty() {
            String::new()
        } else {
            format!("backend {backend}: ")
        },
        why,
    }
}

/// The identity of CUDA device `ordinal` (what an engine directory records and is checked
/// against).
pub fn gpu_identity(backend: &str, ordinal: usize) -> Result<GpuIdentity> {
    use cudarc::driver::{result, sys::CUdevice_attribute as A};
    driver().map_err(|why| no_gpu(backend, why))?;
    let count = result::device::get_count().map_err(|e| no_gpu(backend, e.to_string()))?;
    if count <= 0 {
        return Err(no_gpu(backend, "the driver reports no CUDA device".into()));
    }
    if ordinal >= count as usize {
        return Err(no_gpu(
            backend,
            format!(
                "--device {ordinal}, but this machine has {count} CUDA device(s) (0 to {})",
                count - 1
            ),
        ));
    }
    let dev = result::device::get(ordinal as i32).map_err(|e| no_gpu(backend, e.to_string()))?;
    let name = result::device::get_name(dev).map_err(|e| no_gpu(backend, e.to_string()))?;
    // SAFETY: a valid device handle from the driver.
    let (major, minor, mem) = unsafe {
        (
            result::device::get_attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
            result::device::get_attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
            result::device::total_mem(dev),
        )
    };
    let e = |x: cudarc::driver::DriverError| no_gpu(backend, x.to_string());
    Ok(GpuIdentity {
        name,
        compute_capability: format!("{}.{}", major.map_err(e)?, minor.map_err(e)?),
        memory_bytes: mem.map_err(e)? as u64,
    })
}

/// "NAME (compute capability X.Y, driver D), M MiB of T MiB in use": what a GPU bench names.
/// Device memory is read from the driver after the timed runs; ONNX Runtime's arena and the
/// engines' allocations keep their peak, so this is the peak of the process on the device.
pub fn device_report(ordinal: usize) -> String {
    let id = match gpu_identity("", ordinal) {
        Ok(id) => id,
        Err(e) => return format!("device {ordinal}: {e}"),
    };
    let driver = driver_version().unwrap_or_else(|_| "?".into());
    let used = cudarc::driver::CudaContext::new(ordinal)
        .ok()
        .and_then(|_ctx| cudarc::driver::result::mem_get_info().ok())
        .map(|(free, total)| {
            format!(
                ", {} MiB of {} MiB in use",
                (total - free) >> 20,
                total >> 20
            )
        })
        .unwrap_or_default();
    format!(
        "{} (compute capability {}, driver {}){used}",
        id.name, id.compute_capability, driver
    )
}

/// An error with its sources (libloading's own message is only "dlopen failed").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut c = e.source();
    while let Some(x) = c {
        s.push_str(": ");
        s.push_str(&x.to_string());
        c = x.source();
    }
    s
}

/// The version of the TensorRT library `name` (getInferLibVersion), "major.minor.patch".
pub fn tensorrt_library_version(name: &Path) -> std::result::Result<String, String> {
    // SAFETY: getInferLibVersion takes nothing and returns an int.
    unsafe {
        let l = libloading::Library::new(name).map_err(|e| e.to_string())?;
        let f: libloading::Symbol<unsafe extern "C" fn() -> i32> =
            l.get(b"getInferLibVersion\0").map_err(|e| e.to_string())?;
        let v = f();
        std::mem::forget(l);
        // TensorRT 10+: major * 10000 + minor * 100 + patch.
        Ok(format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100))
    }
}

/// The TensorRT releases the `tensorrt` backend runs: trtx 0.9.1 is generated from TensorRT
/// 11.4's headers and calls the library through that release's vtables, so an earlier 11.x
/// (missing entries) or another major version (another ABI) is refused before it is loaded.
pub const TENSORRT_MIN: (u32, u32) = (11, 4);

/// Whether a TensorRT library that reports `version` ("major.minor.patch", from
/// getInferLibVersion) can be used; the error says what is needed.
pub fn check_tensorrt_version(version: &str) -> std::result::Result<(), String> {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
    let (major, minor) = match (parts.next().flatten(), parts.next().flatten()) {
        (Some(a), Some(b)) => (a, b),
        _ => return Err(format!("unreadable TensorRT version '{version}'")),
    };
    let (need_major, need_minor) = TENSORRT_MIN;
    if major == need_major && minor >= need_minor {
        Ok(())
    } else {
        Err(format!(
            "TensorRT {version}; this backend needs TensorRT {need_major}.{need_minor} or a later {need_major}.x (its bindings are built from the {need_major}.{need_minor} headers)"
        ))
    }
}

pub use crate::memory::AlignedHostBuffer;

/// Device memory a CUDA call refused.
pub fn device_memory(e: cudarc::driver::DriverError, bytes: usize) -> EngineError {
    EngineError::OutOfMemory(format!(
        "out of device memory: {:.2} GB: {e}",
        bytes as f64 / 1e9
    ))
}

/// CUDA device memory: the KV cache and the stage values of ort-cuda (bound as ONNX Runtime
/// values over device addresses) and tensorrt (bound as tensor addresses).
pub struct CudaMem(cudarc::driver::CudaSlice<u8>);

impl CudaMem {
    fn fail(what: &str) -> impl Fn(cudarc::driver::DriverError) -> EngineError + '_ {
        move |e| EngineError::Unsupported(format!("{what} device memory: {e}"))
    }

    fn check(&self, offset: usize, n: usize) -> Result<std::ops::Range<usize>> {
        offset
            .checked_add(n)
            .filter(|&e| e <= self.0.len())
            .map(|e| offset..e)
            .ok_or_else(|| {
                EngineError::Unsupported(format!(
                    "bytes {offset}.. ({n}) are beyond a device buffer of {}",
                    self.0.len()
                ))
            })
    }
}

impl Memory for CudaMem {
    type Alloc = std::sync::Arc<cudarc::driver::CudaStream>;

    fn alloc(s: &Self::Alloc, bytes: usize) -> Result<Self> {
        let b = s
            .alloc_zeros::<u8>(bytes.max(1))
            .map_err(|e| device_memory(e, bytes))?;
        // Zeroed on this stream; the engine's own stream (ONNX Runtime's) comes after.
        s.synchronize().map_err(|e| device_memory(e, bytes))?;
        Ok(CudaMem(b))
    }

    fn base(&mut self, s: &Self::Alloc) -> *mut u8 {
        use cudarc::driver::DevicePtrMut;
        let (p, _g) = self.0.device_ptr_mut(s);
        p as *mut u8
    }

    fn copy_to_host(&self, s: &Self::Alloc, offset: usize, out: &mut [u8]) -> Result<()> {
        let r = self.check(offset, out.len())?;
        // Whatever stream wrote it (ONNX Runtime's, TensorRT's) is done before it is read.
        s.context().synchronize().map_err(Self::fail("reading"))?;
        s.memcpy_dtoh(&self.0.slice(r), out)
            .map_err(Self::fail("reading"))?;
        s.synchronize().map_err(Self::fail("reading"))
    }

    fn copy_from_host(&mut self, s: &Self::Alloc, offset: usize, data: &[u8]) -> Result<()> {
        let r = self.check(offset, data.len())?;
        // Runs already queued on any stream may still read the old bytes.
        s.context().synchronize().map_err(Self::fail("writing"))?;
        s.memcpy_htod(data, &mut self.0.slice_mut(r))
            .map_err(Self::fail("writing"))?;
        // Done before a run on another stream (ONNX Runtime's) reads them.
        s.synchronize().map_err(Self::fail("writing"))
    }

    fn zero(&mut self, s: &Self::Alloc, offset: usize, len: usize) -> Result<()> {
        let r = self.check(offset, len)?;
        s.context().synchronize().map_err(Self::fail("zeroing"))?;
        s.memset_zeros(&mut self.0.slice_mut(r))
            .map_err(Self::fail("zeroing"))?;
        s.synchronize().map_err(Self::fail("zeroing"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensorrt_version_gate() {
        for ok in ["11.4.0", "11.4.12", "11.10.1"] {
            assert!(check_tensorrt_version(ok).is_ok(), "{ok} refused");
        }
        for bad in ["11.3.9", "11.0.0", "10.13.2", "12.0.0", "", "x.y", "11"] {
            let e = check_tensorrt_version(bad).unwrap_err();
            assert!(e.contains("TensorRT"), "{bad}: {e}");
        }
    }
}
