//! The one list of this build's backends and engine builders: adding a backend is a folder, a
//! line here, and a test file that instantiates the golden suite for it.

use crate::build::EngineBuilder;
use crate::engine::Backend;
use crate::error::{EngineError, Result};
use star_artifact::engine_manifest::EngineBackend;
use std::path::Path;

/// The backends this build knows, runnable or not (`Backend::available`).
pub static BACKENDS: &[&dyn Backend] = &[
    &crate::ort::cpu::OrtCpu,
    &crate::ort::cuda::OrtCuda,
    &crate::ort::trt_ep::OrtTrt,
    #[cfg(feature = "tensorrt")]
    &crate::tensorrt::TensorRt,
    #[cfg(not(feature = "tensorrt"))]
    &NotBuilt("tensorrt"),
];

/// A backend of another build: named, so that asking for it says how to get it.
#[cfg(not(feature = "tensorrt"))]
struct NotBuilt(&'static str);

#[cfg(not(feature = "tensorrt"))]
impl Backend for NotBuilt {
    fn name(&self) -> &'static str {
        self.0
    }
    fn available(&self) -> Result<()> {
        Err(not_built_with_tensorrt())
    }
    fn load(
        &self,
        _: &Path,
        _: &star_artifact::manifest::Manifest,
        _: &crate::options::BackendOptions,
        _: &[(star_artifact::Stage, std::sync::Arc<[u8]>)],
    ) -> Result<Box<dyn crate::engine::Engine>> {
        Err(not_built_with_tensorrt())
    }
}

/// The backend registered as `name`, if this build can run it.
pub fn backend_for_name(name: &str) -> Result<&'static dyn Backend> {
    let b = BACKENDS
        .iter()
        .copied()
        .find(|b| b.name() == name)
        .ok_or_else(|| EngineError::UnknownBackend {
            name: name.to_string(),
            available: BACKENDS
                .iter()
                .filter(|b| b.available().is_ok())
                .map(|b| b.name())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    b.available()?;
    Ok(b)
}

/// The builder of `backend` on CUDA device `device`, once its library and the GPU are known to
/// be there.
pub fn engine_builder(
    backend: EngineBackend,
    tensorrt_lib: Option<&Path>,
    device: usize,
) -> Result<Box<dyn EngineBuilder>> {
    match backend {
        #[cfg(feature = "tensorrt")]
        EngineBackend::TensorRt => Ok(Box::new(crate::tensorrt::TrtBuilder::new(
            tensorrt_lib,
            device,
        )?)),
        #[cfg(not(feature = "tensorrt"))]
        EngineBackend::TensorRt => {
            let _ = (tensorrt_lib, device);
            Err(not_built_with_tensorrt())
        }
        EngineBackend::OrtTrt => Ok(Box::new(crate::ort::trt_ep::OrtTrtBuilder::new(device)?)),
    }
}

pub fn not_built_with_tensorrt() -> EngineError {
    EngineError::Unsupported(
        "backend tensorrt: this build has no TensorRT support; rebuild with `cargo build --release -p star-export -p star-runtime --features tensorrt` (needs libclang-dev; TensorRT itself is loaded at run time)".into(),
    )
}
