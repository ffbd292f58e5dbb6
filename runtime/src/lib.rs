//! star-runtime: executes STAR model directories made by star-export.

pub mod args;
pub mod bench;
pub mod compare;
pub mod image;
pub mod memory;
pub mod pipeline;
pub mod replay;
pub mod rng;
pub mod sampler;
pub mod serve;
pub mod timing;
pub mod tokenizer;

/// The demo model directory the repository carries (used when no --model is given).
pub const EMBEDDED_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../assets/demo-model");
