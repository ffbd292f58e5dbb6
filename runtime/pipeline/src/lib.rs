//! star-pipeline: generation over an engine. The CLIP tokenizer, the counter-based RNG, the
//! sampling filter and the stable sampler, and the one scale loop (`pipeline.rs`) whose hooks
//! replay, validate, compare and calibration observe through; bench; PNG output; the command
//! line helpers star-run and star-export share.

pub mod args;
pub mod bench;
pub mod compare;
pub mod image;
pub mod memory;
pub mod observe;
pub mod pipeline;
pub mod preview;
pub mod replay;
pub mod rng;
pub mod sampler;
pub mod timing;
pub mod tokenizer;

/// The demo model directory the repository carries (used when no --model is given).
pub const EMBEDDED_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../assets/demo-model");
