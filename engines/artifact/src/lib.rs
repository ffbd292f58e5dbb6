//! star-artifact: what a STAR model directory and an engine directory are. The manifest schema
//! and its checks, the stage I/O contract, the schedule, integrity (hashes and stamps), the ONNX
//! protobuf structs, golden records and the KV-cache layout: everything star-export writes and
//! every backend reads, with no ONNX Runtime, CUDA or TensorRT dependency.
//!
//! Module order, each using only those above it: `error`, `stage`, `dtype`, `onnx`, `tensor`,
//! `hash`, `safetensors`, `golden`, `kv`, `manifest`, `schedule`, `check`, `stamp`, `integrity`,
//! `engine_manifest`.

pub mod check;
pub mod dtype;
pub mod engine_manifest;
pub mod error;
pub mod golden;
pub mod hash;
pub mod integrity;
pub mod kv;
pub mod manifest;
pub mod onnx;
pub mod safetensors;
pub mod schedule;
pub mod stage;
pub mod stamp;
pub mod tensor;

pub use dtype::{Dtype, Precision};
pub use error::{ArtifactError, Result};
pub use stage::Stage;
pub use tensor::{Data, Tensor};
