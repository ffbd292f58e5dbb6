use std::path::PathBuf;

/// Everything that can go wrong turning checkpoints into a model directory. Each variant names the
/// file and, where there is one, the tensor, so a one-line message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a PyTorch zip checkpoint ({why}); truncated download, or a legacy non-zip torch.save file?")]
    NotZip { path: PathBuf, why: String },
    #[error("{path}: refusing to unpickle global '{global}': only tensors, dicts, lists, tuples and primitives are read, nothing is executed")]
    ForeignGlobal { path: PathBuf, global: String },
    #[error("{path}: malformed pickle: {why}")]
    BadPickle { path: PathBuf, why: String },
    #[error("{path}: {why}")]
    BadCheckpoint { path: PathBuf, why: String },
    #[error("{path}: missing tensor '{name}'")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor '{name}' has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("{path}: tensor '{name}' holds a non-finite value ({value} at flat index {index}): a diverged or corrupted checkpoint; export refuses it (pass --allow-nonfinite to export it anyway)")]
    NonFinite {
        path: PathBuf,
        name: String,
        index: usize,
        value: String,
    },
    #[error("inconsistent checkpoints: {0}")]
    Mismatch(String),
    #[error(
        "unsupported resolution {0}: choose 256, 512 or 1024, or give an explicit --patch-nums"
    )]
    Resolution(usize),
    #[error("bad schedule: {0}")]
    Schedule(String),
    #[error("calibration: {0}")]
    Calibration(String),
    #[error("output {path}: {why}")]
    Output { path: PathBuf, why: String },
    #[error(transparent)]
    Engine(#[from] star_engines::EngineError),
    #[error(transparent)]
    Artifact(#[from] star_artifact::ArtifactError),
    #[error("validation failed: {0}")]
    Validation(String),
}

pub type Result<T> = std::result::Result<T, ExportError>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ExportError {
    let path = path.into();
    move |source| ExportError::Io { path, source }
}
