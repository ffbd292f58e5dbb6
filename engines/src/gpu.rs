//! The GPU side of the machine: the NVIDIA driver and devices (CUDA driver API, `libcuda.so.1`
//! loaded at run time), the GPU build of ONNX Runtime and the CUDA libraries beside it, and the
//! engine builders of `star-export build-engine`. Every absence is an error that names what is
//! missing and how to get it; nothing falls back to the CPU.

use crate::engine_plan::{EngineBackend, EngineBuilder, GpuIdentity};
use crate::error::{EngineError, Result};
use std::path::{Path, PathBuf};

fn missing(backend: &str, what: &str, tried: String, how: &str) -> EngineError {
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

/// The GPU build of ONNX Runtime: `ORT_GPU_DYLIB_PATH`, else the `.venv-gpu` that
/// `scripts/setup-ort.sh --gpu` makes (looked for above the working directory and the
/// executable). A library without the CUDA provider beside it is the CPU build.
pub fn find_ort_gpu_library(backend: &str) -> Result<PathBuf> {
    let how = "install it with `bash scripts/setup-ort.sh --gpu` (the onnxruntime-gpu wheel and the CUDA 13 libraries, in ./.venv-gpu) or set ORT_GPU_DYLIB_PATH to its libonnxruntime.so";
    let mut tried = vec![];
    let mut candidates: Vec<PathBuf> = vec![];
    if let Ok(p) = std::env::var("ORT_GPU_DYLIB_PATH") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            return Err(missing(
                backend,
                "the GPU build of ONNX Runtime",
                format!("ORT_GPU_DYLIB_PATH={} does not exist", p.display()),
                how,
            ));
        }
        candidates.push(p);
    } else {
        let mut roots: Vec<PathBuf> = vec![];
        if let Ok(cwd) = std::env::current_dir() {
            roots.extend(cwd.ancestors().map(|a| a.join(".venv-gpu")));
        }
        if let Ok(exe) = std::env::current_exe() {
            roots.extend(exe.ancestors().map(|a| a.join(".venv-gpu")));
        }
        for venv in roots {
            if let Some(l) = crate::backend::ort_library_in_venv(&venv) {
                candidates.push(l);
                break;
            }
        }
        if candidates.is_empty() {
            tried.push("ORT_GPU_DYLIB_PATH is not set and no .venv-gpu with the onnxruntime-gpu wheel was found".to_string());
        }
    }
    for c in candidates {
        let dir = c.parent().unwrap_or(Path::new("."));
        if dir.join("libonnxruntime_providers_cuda.so").is_file() {
            return Ok(c);
        }
        tried.push(format!(
            "{} has no libonnxruntime_providers_cuda.so beside it: it is the CPU build",
            c.display()
        ));
    }
    Err(missing(
        backend,
        "the GPU build of ONNX Runtime",
        tried.join("; "),
        how,
    ))
}

/// What ONNX Runtime's CUDA provider (1.31, CUDA 13) needs from the CUDA libraries, by soname.
/// `Links`: its own ELF dependencies (readelf -d libonnxruntime_providers_cuda.so); without them
/// it cannot load. `Loads`: cuDNN, which it opens by name the first time it runs a convolution
/// (every model has a decoder of convolutions), so it is required as well. `Beside`: libraries
/// that cuDNN itself opens by name at run time; loaded when they are found next to it so that
/// no LD_LIBRARY_PATH is needed, and otherwise left to cuDNN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CudaNeed {
    Links,
    Loads,
    Beside,
}

/// The CUDA libraries to load before the provider, in dependency order. NCCL, NVSHMEM, cuFile,
/// cuFFT and the rest of the `nvidia-*` wheels are not among them: the provider never opens
/// them, and some need the driver or other libraries to load at all.
pub const CUDA_PROVIDER_LIBRARIES: [(&str, CudaNeed); 13] = [
    ("libcudart.so.13", CudaNeed::Links),
    ("libcublasLt.so.13", CudaNeed::Links),
    ("libcublas.so.13", CudaNeed::Links),
    ("libcurand.so.10", CudaNeed::Links),
    ("libnvrtc.so.13", CudaNeed::Beside),
    ("libcudnn_graph.so.9", CudaNeed::Beside),
    ("libcudnn_engines_precompiled.so.9", CudaNeed::Beside),
    ("libcudnn_engines_runtime_compiled.so.9", CudaNeed::Beside),
    ("libcudnn_heuristic.so.9", CudaNeed::Beside),
    ("libcudnn_ops.so.9", CudaNeed::Beside),
    ("libcudnn_cnn.so.9", CudaNeed::Beside),
    ("libcudnn_adv.so.9", CudaNeed::Beside),
    ("libcudnn.so.9", CudaNeed::Loads),
];

/// Folders that may hold the CUDA libraries: the `nvidia/*/lib` folders of the site-packages the
/// onnxruntime-gpu wheel is installed in (when `ort_lib` is inside one; CUDA 13 wheels put most
/// libraries in `nvidia/cu13/lib`, cuDNN in `nvidia/cudnn/lib`), then the LD_LIBRARY_PATH
/// entries (what scripts/gpu-check.sh builds from PyTorch's wheels on a GPU machine).
pub fn cuda_library_dirs(ort_lib: &Path, ld_library_path: Option<&str>) -> Vec<PathBuf> {
    let mut dirs = vec![];
    // .../site-packages/onnxruntime/capi/libonnxruntime.so.X -> .../site-packages/nvidia
    if let Some(nvidia) = ort_lib.ancestors().nth(3).map(|sp| sp.join("nvidia")) {
        if let Ok(rd) = std::fs::read_dir(&nvidia) {
            let mut found: Vec<PathBuf> = rd
                .flatten()
                .map(|pkg| pkg.path().join("lib"))
                .filter(|l| l.is_dir())
                .collect();
            found.sort();
            dirs.extend(found);
        }
    }
    for d in ld_library_path.unwrap_or_default().split(':') {
        let d = PathBuf::from(d);
        if !d.as_os_str().is_empty() && !dirs.contains(&d) {
            dirs.push(d);
        }
    }
    dirs
}

/// Where each needed library will be loaded from: a file of exactly that name in the first of
/// `dirs` that has one, else the bare soname (the dynamic loader's own search: ld.so.cache).
pub fn plan_cuda_preload(dirs: &[PathBuf]) -> Vec<(PathBuf, CudaNeed)> {
    CUDA_PROVIDER_LIBRARIES
        .iter()
        .map(|(name, need)| {
            let at = dirs.iter().map(|d| d.join(name)).find(|p| p.is_file());
            (at.unwrap_or_else(|| PathBuf::from(name)), *need)
        })
        .collect()
}

/// Loads the CUDA libraries the CUDA provider needs (by name, from the wheel's folders or the
/// library path), so that the provider finds them as a Python process that imports onnxruntime
/// would. Returns what was loaded; an error names the first required library that did not load.
pub fn preload_cuda_libraries(ort_lib: &Path) -> std::result::Result<Vec<PathBuf>, String> {
    let ld = std::env::var("LD_LIBRARY_PATH").ok();
    let dirs = cuda_library_dirs(ort_lib, ld.as_deref());
    let mut loaded = vec![];
    for (path, need) in plan_cuda_preload(&dirs) {
        match ort::util::preload_dylib(&path) {
            Ok(()) => loaded.push(path),
            Err(_) if need == CudaNeed::Beside => {}
            Err(e) => {
                let searched: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
                return Err(format!(
                    "{}: {} (searched {} and the system library path)",
                    path.display(),
                    error_chain(&e),
                    if searched.is_empty() {
                        "no folder".to_string()
                    } else {
                        searched.join(", ")
                    }
                ));
            }
        }
    }
    Ok(loaded)
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

/// The builder of `backend` on CUDA device `device`, once its library and the GPU are known to
/// be there.
pub fn engine_builder(
    backend: EngineBackend,
    tensorrt_lib: Option<&Path>,
    device: usize,
) -> Result<Box<dyn EngineBuilder>> {
    match backend {
        EngineBackend::TensorRt => {
            #[cfg(feature = "tensorrt")]
            {
                Ok(Box::new(crate::tensorrt::TrtBuilder::new(
                    tensorrt_lib,
                    device,
                )?))
            }
            #[cfg(not(feature = "tensorrt"))]
            {
                let _ = (tensorrt_lib, device);
                Err(not_built_with_tensorrt())
            }
        }
        EngineBackend::OrtTrt => Ok(Box::new(crate::ort_gpu::OrtTrtBuilder::new(device)?)),
    }
}

pub fn not_built_with_tensorrt() -> EngineError {
    EngineError::Unsupported(
        "backend tensorrt: this build has no TensorRT support; rebuild with `cargo build --release -p star-export -p star-runtime --features tensorrt` (needs libclang-dev; TensorRT itself is loaded at run time)".into(),
    )
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

/// Host memory TensorRT reads at enqueue (the values of shape tensors such as `scale`), 256-byte
/// aligned as NvInferRuntime.h requires of every tensor address; a `Vec<u8>` is only 1-aligned.
pub struct AlignedHostBuffer {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedHostBuffer {}

impl AlignedHostBuffer {
    pub const ALIGN: usize = 256;

    /// `len` zeroed bytes (at least one is allocated, so that the address is always valid).
    pub fn zeroed(len: usize) -> Self {
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(p).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedHostBuffer { ptr, len }
    }

    fn layout(len: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(len.max(1), Self::ALIGN)
            .expect("a shape-tensor buffer of a few bytes")
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: len initialised bytes owned by self.
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
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
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

    #[test]
    fn shape_buffers_are_256_byte_aligned() {
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

    /// The wheel layout of CUDA 13 (most libraries in nvidia/cu13/lib, cuDNN in
    /// nvidia/cudnn/lib) beside libraries the provider never opens.
    #[test]
    fn only_the_libraries_the_provider_needs_are_loaded() {
        let t = tempfile::tempdir().unwrap();
        let sp = t.path().join("lib/python3.12/site-packages");
        let capi = sp.join("onnxruntime/capi");
        std::fs::create_dir_all(&capi).unwrap();
        let files = [
            ("cu13", "libcudart.so.13"),
            ("cu13", "libcublasLt.so.13"),
            ("cu13", "libcublas.so.13"),
            ("cu13", "libcurand.so.10"),
            ("cu13", "libcufft.so.12"),
            ("cu13", "libnvrtc.so.13"),
            ("cudnn", "libcudnn.so.9"),
            ("cudnn", "libcudnn_graph.so.9"),
            ("nccl", "libnccl.so.2"),
            ("nvshmem", "libnvshmem_host.so.3"),
            ("cufile", "libcufile.so.0"),
        ];
        for (pkg, f) in files {
            let d = sp.join("nvidia").join(pkg).join("lib");
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(f), b"").unwrap();
        }
        let ort = capi.join("libonnxruntime.so.1.31.1");
        let extra = t.path().join("extra");
        std::fs::create_dir_all(&extra).unwrap();
        let dirs = cuda_library_dirs(&ort, Some(&format!("{}::", extra.display())));
        assert_eq!(dirs.last(), Some(&extra));
        let plan = plan_cuda_preload(&dirs);
        let names: Vec<String> = plan
            .iter()
            .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for never in ["libnccl", "libnvshmem", "libcufile", "libcufft"] {
            assert!(
                !names.iter().any(|n| n.starts_with(never)),
                "{never} in {names:?}"
            );
        }
        // Found ones by their path in the wheel, the rest by soname (the loader's search).
        let at = |n: &str| plan.iter().find(|(p, _)| p.ends_with(n)).unwrap().0.clone();
        assert_eq!(
            at("libcublas.so.13"),
            sp.join("nvidia/cu13/lib/libcublas.so.13")
        );
        assert_eq!(
            at("libcudnn.so.9"),
            sp.join("nvidia/cudnn/lib/libcudnn.so.9")
        );
        assert_eq!(at("libcudnn_ops.so.9"), PathBuf::from("libcudnn_ops.so.9"));
        // The provider's own links come first, cuDNN (which needs its parts) last.
        assert_eq!(plan[0].0, sp.join("nvidia/cu13/lib/libcudart.so.13"));
        assert_eq!(plan.last().unwrap().1, CudaNeed::Loads);
        let required: Vec<&str> = CUDA_PROVIDER_LIBRARIES
            .iter()
            .filter(|(_, n)| *n != CudaNeed::Beside)
            .map(|(l, _)| *l)
            .collect();
        assert_eq!(
            required,
            [
                "libcudart.so.13",
                "libcublasLt.so.13",
                "libcublas.so.13",
                "libcurand.so.10",
                "libcudnn.so.9"
            ]
        );
    }
}
