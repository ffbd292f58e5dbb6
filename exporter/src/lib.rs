//! star-export: STAR checkpoints (PyTorch zip-pickle or safetensors) to ONNX model directories.

pub mod build_engine;
pub mod calibrate;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod export;
pub mod graph;
pub mod inspect;
pub mod pickle;
pub mod pth_writer;
pub mod schedule;
pub mod validate;

pub use error::{ExportError, Result};
