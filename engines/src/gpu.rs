//! The GPU side of the machine: the NVIDIA driver and devices (CUDA driver API, `libcuda.so.1`
//! loaded at run time), the GPU build of ONNX Runtime and the CUDA libraries beside it, and the
//! engine builders of `star-export build-engine`. Every absence is an error that names what is
//! missing and how to get it; nothing falls back to the CPU.

use crate::engine_plan::{EngineBackend, EngineBuilder, GpuIdentity};
use crate::error::{EngineError, Result};
use std::collections::HashMap;
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

/// The CUDA, cuBLAS, cuDNN, cuFFT, cuRAND and NVRTC libraries of the `nvidia-*` wheels next to
/// the onnxruntime-gpu wheel, loaded into the process so that the CUDA provider finds them by
/// name (a Python process does the same when it imports onnxruntime). A library whose
/// dependencies are not loaded yet is retried after the others.
pub fn preload_cuda_libraries(ort_lib: &Path) -> std::result::Result<Vec<PathBuf>, String> {
    // .../site-packages/onnxruntime/capi/libonnxruntime.so.X -> .../site-packages/nvidia
    let Some(nvidia) = ort_lib.ancestors().nth(3).map(|sp| sp.join("nvidia")) else {
        return Ok(vec![]);
    };
    let mut todo: Vec<PathBuf> = vec![];
    if let Ok(rd) = std::fs::read_dir(&nvidia) {
        for pkg in rd.flatten() {
            let lib = pkg.path().join("lib");
            if let Ok(files) = std::fs::read_dir(&lib) {
                todo.extend(files.flatten().map(|f| f.path()).filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("lib") && n.contains(".so"))
                }));
            }
        }
    }
    todo.sort();
    let mut loaded: Vec<PathBuf> = vec![];
    let mut errors: HashMap<PathBuf, String> = HashMap::new();
    loop {
        let before = todo.len();
        todo.retain(|p| match ort::util::preload_dylib(p) {
            Ok(()) => {
                loaded.push(p.clone());
                false
            }
            Err(e) => {
                errors.insert(p.clone(), error_chain(&e));
                true
            }
        });
        if todo.is_empty() || todo.len() == before {
            break;
        }
    }
    // What the CUDA provider links: without these it cannot load. The rest (cuDNN's engine
    // libraries, NVRTC's builtins) are loaded by their users when needed, and some need the
    // driver itself.
    for need in CUDA_PROVIDER_LINKS {
        let have = |p: &PathBuf| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(need))
        };
        // Not in the wheels: the library path may have it (LD_LIBRARY_PATH, a CUDA install).
        if !loaded.iter().any(have) && ort::util::preload_dylib(need).is_err() {
            let why = todo
                .iter()
                .find(|p| have(p))
                .and_then(|p| errors.get(p).map(|e| format!("{}: {e}", p.display())))
                .unwrap_or_else(|| {
                    format!(
                        "{need}: not under {} nor on the library path",
                        nvidia.display()
                    )
                });
            return Err(why);
        }
    }
    Ok(loaded)
}

/// The libraries ONNX Runtime's CUDA provider (1.31, CUDA 13) links.
const CUDA_PROVIDER_LINKS: [&str; 6] = [
    "libcudart.so.13",
    "libcublasLt.so.13",
    "libcublas.so.13",
    "libcurand.so.10",
    "libcufft.so.12",
    "libcudnn.so.9",
];

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
