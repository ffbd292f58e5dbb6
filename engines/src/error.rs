use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
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
    #[error("ONNX Runtime library not found ({why}). Install it with `python3 -m pip install onnxruntime==1.31.*` and set ORT_DYLIB_PATH to .../site-packages/onnxruntime/capi/libonnxruntime.so.<version>")]
    OrtLibrary { why: String },
    #[error("ONNX Runtime: {context}: {message}")]
    Ort { context: String, message: String },
    #[error("backend '{name}' is not available in this build (available: {available})")]
    UnknownBackend { name: String, available: String },
    #[error("{0}")]
    Unsupported(String),
    /// The system refused an allocation: the run fails, the process lives on.
    #[error("{0}")]
    OutOfMemory(String),
    #[error("{}: built for {} {}, this machine has {}{}; rebuild it here with: {}", .0.dir.display(), .0.what, .0.built, .0.here, .0.also, .0.rebuild)]
    EngineMismatch(Box<Mismatch>),
    #[error("{backend}no usable NVIDIA GPU: {why}")]
    NoGpu { backend: String, why: String },
    /// A component a backend needs is absent: which, what was tried, and how to get it.
    #[error("backend {backend}: {what} not found ({tried}); {how}")]
    Missing {
        backend: String,
        what: String,
        tried: String,
        how: String,
    },
    #[error("creating the {stage} session: {why}")]
    SessionCreate { stage: String, why: String },
    #[error("stage '{stage}': input '{input}' {why}")]
    BadInput {
        stage: String,
        input: String,
        why: String,
    },
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

pub type Result<T> = std::result::Result<T, EngineError>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> EngineError {
    let path = path.into();
    move |source| EngineError::Io { path, source }
}
