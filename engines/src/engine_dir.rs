//! Opening an engine directory (star-export build-engine's output): its manifest is checked
//! against the model directory and this machine before anything is loaded.

use crate::engine::BackendOptions;
use crate::error::{EngineError, Result};
use star_artifact::engine_manifest::Target;
use star_artifact::manifest::Manifest;
use std::path::{Path, PathBuf};

/// An engine directory's manifest, checked against the model directory being opened and against
/// this machine (GPU, compute capability, library versions) before anything is loaded.
pub fn checked_engine_dir(
    backend: star_artifact::engine_manifest::EngineBackend,
    opts: &BackendOptions,
    m: &Manifest,
    model_dir: &Path,
    here: impl FnOnce() -> Result<Target>,
) -> Result<(PathBuf, star_artifact::engine_manifest::EngineManifest)> {
    use star_artifact::engine_manifest::EngineManifest;
    let dir = opts.engine_dir.clone().ok_or_else(|| {
        EngineError::Unsupported(format!(
            "backend {0} runs engine directories: build one with `star-export build-engine --model {1} --backend {0} --out ENGINE_DIR`, then run `star-run --engine ENGINE_DIR`",
            backend.name(),
            model_dir.display()
        ))
    })?;
    let em = EngineManifest::load(&dir)?;
    if em.plan.backend != backend {
        return Err(EngineError::Unsupported(format!(
            "{} holds {} engines, not {}",
            dir.display(),
            em.plan.backend.name(),
            backend.name()
        )));
    }
    em.check_model(&dir, m, model_dir)?;
    em.check_target(&dir, model_dir, &here()?)?;
    em.verify_files(&dir)?;
    Ok((dir, em))
}
