use std::path::PathBuf;

/// What can be wrong with an artifact: a model directory, an engine directory, a golden record.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a safetensors file: {why}")]
    BadSafetensors { path: PathBuf, why: String },
    #[error("{path}: no tensor '{name}'")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor '{name}' holds a non-finite value ({value} at flat index {index}); a recorded input must be finite: the record is damaged")]
    NonFinite {
        path: PathBuf,
        name: String,
        index: usize,
        value: String,
    },
    #[error("{path}: manifest: {why}")]
    Manifest { path: PathBuf, why: String },
    #[error("{path}: manifest schema version {found}, this build reads version {expected}; re-export the model with this version of star-export")]
    SchemaVersion {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("{path}: sha256 {found} does not match the manifest's {expected}: the file was modified or truncated; re-export the model")]
    HashMismatch {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("{}: built for {} {}, this machine has {}{}; rebuild it here with: {}", .0.dir.display(), .0.what, .0.built, .0.here, .0.also, .0.rebuild)]
    EngineMismatch(Box<Mismatch>),
    /// Options that no engine could be built with.
    #[error("{0}")]
    BadOptions(String),
}

/// An engine directory that does not belong to this machine or model: what differs, and the
/// command that rebuilds it.
#[derive(Debug)]
pub struct Mismatch {
    pub dir: PathBuf,
    pub what: String,
    pub built: String,
    pub here: String,
    pub also: String,
    pub rebuild: String,
}

pub type Result<T> = std::result::Result<T, ArtifactError>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ArtifactError {
    let path = path.into();
    move |source| ArtifactError::Io { path, source }
}
