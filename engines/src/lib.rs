//! star-engines: the execution backends of star-export and star-run behind one interface.
//!
//! `engine.rs` is the interface (`Backend`, `Engine`, the optional `MemoryPolicy`), and
//! `registry.rs` the one list of implementations: ONNX Runtime's (`ort/`: CPU, CUDA, TensorRT
//! through its provider) and native TensorRT (`tensorrt/`, the `tensorrt` feature). The KV
//! cache's bookkeeping is one implementation (`kv_cache.rs`) over each engine's memory.

pub mod build;
pub mod engine;
pub mod engine_dir;
pub mod error;
pub mod gpu;
pub mod kv_cache;
pub mod model_dir;
pub mod options;
pub mod ort;
pub mod registry;
#[cfg(feature = "tensorrt")]
pub mod tensorrt;

pub use error::{EngineError, Result};
pub use star_artifact::{Stage, Tensor};
