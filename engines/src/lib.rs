//! star-engines: the execution backends of star-export and star-run behind one interface.
//!
//! `engine.rs` is the interface (`Backend`, `Engine`, the optional `MemoryPolicy`), and
//! `registry.rs` the one list of implementations: ONNX Runtime's (`ort/`: CPU, CUDA, TensorRT
//! through its provider) and native TensorRT (`tensorrt/`, the `tensorrt` feature). The stage
//! values (`values.rs`) and the KV cache (`kv_cache.rs`) are one implementation each over each
//! engine's memory (`memory.rs`).

pub mod build;
pub mod engine;
pub mod engine_dir;
pub mod error;
pub mod gpu;
pub mod kv_cache;
pub mod memory;
pub mod model_dir;
pub mod options;
pub mod ort;
pub mod registry;
#[cfg(feature = "tensorrt")]
pub mod tensorrt;
pub mod values;

pub use error::{EngineError, Result};
pub use star_artifact::{Stage, Tensor};
