//! star-engines: the artifact contract (manifest, ONNX protobuf model, tensor records) and
//! execution backends shared by star-export and star-run.

pub mod backend;
pub mod check;
pub mod engine_plan;
pub mod error;
pub mod golden;
pub mod gpu;
pub mod kv_cache;
pub mod manifest;
pub mod model_dir;
pub mod onnx;
pub mod ort_bind;
pub mod ort_gpu;
pub mod safetensors;
pub mod schedule;
pub mod stage;
pub mod stamp;
pub mod tensor;
#[cfg(feature = "tensorrt")]
pub mod tensorrt;

pub use error::{EngineError, Result};
pub use stage::Stage;
pub use tensor::{Data, Tensor};
