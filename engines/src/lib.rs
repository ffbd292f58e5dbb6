//! star-engines: the artifact contract (manifest, ONNX protobuf model, tensor records) and
//! execution backends shared by star-export and star-run.

pub mod backend;
pub mod check;
pub mod error;
pub mod golden;
pub mod kv_cache;
pub mod manifest;
pub mod model_dir;
pub mod onnx;
pub mod safetensors;
pub mod schedule;
pub mod stage;
pub mod stamp;
pub mod tensor;

pub use error::{EngineError, Result};
pub use stage::Stage;
pub use tensor::{Data, Tensor};
