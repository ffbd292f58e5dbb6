//! ONNX Runtime: the one environment of the process, where its library is found (the CPU build
//! in ./.venv or ORT_DYLIB_PATH, the GPU build in ./.venv-gpu or ORT_GPU_DYLIB_PATH), and the
//! backends built on it: `ort-cpu` (cpu.rs), `ort-cuda` (cuda.rs) and `ort-trt` (trt_ep.rs),
//! which share the I/O binding code (bind.rs); ort-cpu's weight pool is weights.rs.

pub mod bind;
pub mod cpu;
pub mod cuda;
pub mod trt_ep;
pub mod weights;

use crate::error::{EngineError, Result};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Where a buffer lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    Host,
    Cuda(i32),
}

impl Place {
    pub fn memory_info(self) -> std::result::Result<ort::memory::MemoryInfo<'static>, String> {
        use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
        let (dev, id) = match self {
            Place::Host => (AllocationDevice::CPU, 0),
            Place::Cuda(d) => (AllocationDevice::CUDA, d),
        };
        MemoryInfo::new(dev, id, AllocatorType::Device, MemoryType::Default)
            .map_err(|e| e.to_string())
    }
}

pub(crate) fn ort_err(context: impl Into<String>) -> impl FnOnce(ort::Error) -> EngineError {
    let context = context.into();
    move |e| EngineError::Ort {
        context,
        message: e.to_string(),
    }
}

/// The one ONNX Runtime environment of this process (ORT allows one; tests share it), with the
/// library it was created from.
static ENV: OnceLock<std::result::Result<(PathBuf, ort::environment::Environment), String>> =
    OnceLock::new();

/// The newest `libonnxruntime.so*` of the onnxruntime wheel in a virtual environment.
pub fn ort_library_in_venv(venv: &Path) -> Option<PathBuf> {
    let rd = std::fs::read_dir(venv.join("lib")).ok()?;
    for py in rd.flatten() {
        let capi = py.path().join("site-packages/onnxruntime/capi");
        let Ok(files) = std::fs::read_dir(&capi) else {
            continue;
        };
        let mut libs: Vec<PathBuf> = files
            .flatten()
            .map(|f| f.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libonnxruntime.so"))
            })
            .collect();
        libs.sort();
        if let Some(l) = libs.pop() {
            return Some(l);
        }
    }
    None
}

/// Where a library is asked for: the path an environment variable names (an error when it
/// names nothing), else the newest libonnxruntime of the first virtual environment `venv`
/// found above the working directory or the executable (the layout scripts/setup-ort.sh makes).
fn library_from(var: &str, venv: &str) -> std::result::Result<Option<PathBuf>, String> {
    if let Ok(p) = std::env::var(var) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(Some(p))
        } else {
            Err(format!("{var}={} does not exist", p.display()))
        };
    }
    let mut roots: Vec<PathBuf> = vec![];
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().map(|a| a.join(venv)));
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().map(|a| a.join(venv)));
    }
    Ok(roots.iter().find_map(|v| ort_library_in_venv(v)))
}

/// The CPU build of ONNX Runtime: ORT_DYLIB_PATH, else a `.venv` (what .ci/run creates).
fn find_ort_library() -> std::result::Result<PathBuf, String> {
    library_from("ORT_DYLIB_PATH", ".venv")?.ok_or_else(|| {
        "ORT_DYLIB_PATH is not set and no .venv with the onnxruntime wheel was found".into()
    })
}

fn environment_from(
    lib: &Path,
) -> std::result::Result<(PathBuf, ort::environment::Environment), String> {
    let builder = ort::init_from(lib).map_err(|e| format!("loading {}: {e}", lib.display()))?;
    builder
        .with_name("star")
        .build()
        .map(|e| (lib.to_path_buf(), e))
        .map_err(|e| format!("creating the environment from {}: {e}", lib.display()))
}

/// The one ONNX Runtime environment of this process (ORT allows one; tests share it).
pub fn ort_environment() -> Result<&'static ort::environment::Environment> {
    let r = ENV.get_or_init(|| environment_from(&find_ort_library()?));
    r.as_ref()
        .map(|(_, e)| e)
        .map_err(|why| EngineError::OrtLibrary { why: why.clone() })
}

/// The environment from the GPU build of ONNX Runtime `lib` (a GPU backend's): an error when
/// this process has already loaded another library.
pub fn ort_environment_at(
    backend: &str,
    lib: &Path,
) -> Result<&'static ort::environment::Environment> {
    let r = ENV.get_or_init(|| environment_from(lib));
    match r {
        Ok((loaded, e)) if loaded == lib => Ok(e),
        Ok((loaded, _)) => Err(EngineError::Unsupported(format!(
            "backend {backend}: this process already loaded ONNX Runtime from {}, not the GPU build {}; run one backend per process",
            loaded.display(),
            lib.display()
        ))),
        Err(why) => Err(EngineError::Missing {
            backend: backend.into(),
            what: "a loadable GPU build of ONNX Runtime".into(),
            tried: why.clone(),
            how: "reinstall it with `bash scripts/setup-ort.sh --gpu`".into(),
        }),
    }
}

/// The GPU build of ONNX Runtime: `ORT_GPU_DYLIB_PATH`, else the `.venv-gpu` that
/// `scripts/setup-ort.sh --gpu` makes (looked for above the working directory and the
/// executable). A library without the CUDA provider beside it is the CPU build.
pub fn find_ort_gpu_library(backend: &str) -> Result<PathBuf> {
    let how = "install it with `bash scripts/setup-ort.sh --gpu` (the onnxruntime-gpu wheel and the CUDA 13 libraries, in ./.venv-gpu) or set ORT_GPU_DYLIB_PATH to its libonnxruntime.so";
    let mut tried = vec![];
    let candidates: Vec<PathBuf> = match library_from("ORT_GPU_DYLIB_PATH", ".venv-gpu") {
        Err(why) => {
            return Err(crate::gpu::missing(
                backend,
                "the GPU build of ONNX Runtime",
                why,
                how,
            ))
        }
        Ok(found) => found.into_iter().collect(),
    };
    if candidates.is_empty() {
        tried.push("ORT_GPU_DYLIB_PATH is not set and no .venv-gpu with the onnxruntime-gpu wheel was found".to_string());
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
    Err(crate::gpu::missing(
        backend,
        "the GPU build of ONNX Runtime",
        tried.join("; "),
        how,
    ))
}

/// The version of the ONNX Runtime library at `lib`, as it reports it.
pub fn ort_library_version(lib: &Path) -> std::result::Result<String, String> {
    // SAFETY: ONNX Runtime's API base is a static table; GetVersionString returns a static
    // string. Loading the library again only adds a reference.
    unsafe {
        let l = libloading::Library::new(lib).map_err(|e| e.to_string())?;
        let base: libloading::Symbol<unsafe extern "C" fn() -> *const ort::sys::OrtApiBase> =
            l.get(b"OrtGetApiBase\0").map_err(|e| e.to_string())?;
        let b = base();
        if b.is_null() {
            return Err("OrtGetApiBase returned null".into());
        }
        let v = ((*b).GetVersionString)();
        let s = std::ffi::CStr::from_ptr(v).to_string_lossy().into_owned();
        std::mem::forget(l);
        Ok(s)
    }
}
