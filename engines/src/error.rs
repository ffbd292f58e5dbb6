use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A model directory, engine directory or record that is not what the contract says.
    #[error(transparent)]
    Artifact(#[from] star_artifact::ArtifactError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
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

pub type Result<T> = std::result::Result<T, EngineError>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> EngineError {
    let path = path.into();
    move |source| EngineError::Io { path, source }
}
