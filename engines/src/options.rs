//! What a caller may ask of a backend, grouped by the backends each part is for. A leaf module:
//! the interface (`engine.rs`) and every backend read it, and it reads none of them.

use std::path::PathBuf;

#[derive(Clone, Debug)]
pub struct BackendOptions {
    /// The backend's registered name (`registry::BACKENDS`).
    pub name: String,
    /// Print the device and the provider each stage runs on.
    pub verbose: bool,
    /// An engine directory (star-export build-engine) for the engine backends (tensorrt,
    /// ort-trt).
    pub engine_dir: Option<PathBuf>,
    pub cpu: CpuOptions,
    pub gpu: GpuOptions,
}

/// ort-cpu's options.
#[derive(Clone, Debug)]
pub struct CpuOptions {
    /// Intra-op threads; 0 = ONNX Runtime's default (one per core).
    pub threads: usize,
    /// Every run gives its activation memory back when it ends, not only the large ones. The
    /// server sets it, so that a run's peak depends on its batch, not on what the runs before
    /// it left in the arena (its memory admission relies on that).
    pub release_activations: bool,
    /// The weight bytes of a `step` graph above which pre-packing it at start would hold up
    /// the first scales (`LARGE_STEP_BYTES`); tests lower it to run the fixtures the way d30
    /// runs.
    pub large_step_bytes: usize,
}

/// The GPU backends' options (ort-cuda, ort-trt, tensorrt).
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// CUDA device ordinal.
    pub device: usize,
    /// ONNX Runtime's GPU backends: accept graph nodes that it places on the CPU (an error
    /// otherwise, naming every such node).
    pub allow_cpu_fallback: bool,
    /// Capture each bound call as a CUDA graph and replay it (ort-cuda: ONNX Runtime's
    /// `enable_cuda_graph`; tensorrt: captured around `enqueueV3` on a scratch cache). Off by
    /// default until the GPU check has compared its images with uncaptured runs.
    pub cuda_graphs: bool,
}

/// A `step` graph with more weight bytes than this (d30: 6.2 GB in FP32, 3.1 GB in FP16; d16:
/// 1.1 GB) is pre-packed in the background while its small scales, those of at most
/// `EARLY_TOKENS` tokens per image, run on a second session that is not pre-packed and reads
/// the weights through the mapping. Pre-packing 6.2 GB before scale 0 held it up by 5-18 s on a
/// 2-core VM (ONNX Runtime packs on one thread into memory never touched before); packing on the
/// fly costs a small scale a few tenths of a second and a large one 6-12% of its MatMul time
/// (benches/RESULTS.md). Which session runs a scale depends on the schedule alone, never on
/// timing, because the two round differently: the same seed gives the same logits in a one-shot
/// run, `bench` and `serve`.
pub const LARGE_STEP_BYTES: usize = 2 << 30;

impl Default for CpuOptions {
    fn default() -> Self {
        CpuOptions {
            threads: 0,
            release_activations: false,
            large_step_bytes: LARGE_STEP_BYTES,
        }
    }
}

impl Default for BackendOptions {
    fn default() -> Self {
        BackendOptions {
            name: "ort-cpu".into(),
            verbose: false,
            engine_dir: None,
            cpu: CpuOptions::default(),
            gpu: GpuOptions::default(),
        }
    }
}

impl BackendOptions {
    /// The named backend with `threads` intra-op threads on the CPU, defaults otherwise.
    pub fn named(name: &str, threads: usize) -> Self {
        BackendOptions {
            name: name.into(),
            cpu: CpuOptions {
                threads,
                ..CpuOptions::default()
            },
            ..Default::default()
        }
    }
}
