//! `star-export build-engine`'s interface to an engine builder.

use crate::error::Result;
use star_artifact::engine_manifest::{BuildOptions, PlannedEngine, Target};
use std::path::Path;

/// Builds the engines of a plan on one GPU with one library (TensorRT natively, or through ONNX
/// Runtime's TensorRT provider). Created only once the library and the GPU are known to be
/// there, so a missing one is an error before any work.
pub trait EngineBuilder {
    /// The GPU and library versions the engines are built for.
    fn target(&self) -> &Target;
    /// Build one engine from `graph` (in the model directory) into `out`.
    fn build(
        &mut self,
        e: &PlannedEngine,
        graph: &Path,
        out: &Path,
        opts: &BuildOptions,
    ) -> Result<()>;
}
