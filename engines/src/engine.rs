//! The interface every backend implements: `Backend` (a registered name, the precisions it runs,
//! loading a model directory) and `Engine` (the loaded model: sessions, weights and KV cache
//! owned on its device). Implementations live in their own folders (`ort/`, `tensorrt/`) and are
//! listed once, in `registry.rs`.

use crate::error::{EngineError, Result};
use crate::kv_cache::KvStore;
pub use crate::options::BackendOptions;
use star_artifact::dtype::Precision;
use star_artifact::manifest::Manifest;
use star_artifact::stage::Stage;
use star_artifact::tensor::Tensor;
use std::collections::HashMap;
use std::path::Path;

/// An input handed to a stage without copying it.
pub enum Input<'a> {
    F32(&'a [usize], &'a [f32]),
    I64(&'a [usize], &'a [i64]),
    /// A float view whose shape is computed (e.g. a prefix of the KV cache).
    F32Owned(Vec<usize>, &'a [f32]),
}

impl<'a> Input<'a> {
    pub fn shape(&self) -> &[usize] {
        match self {
            Input::F32(s, _) | Input::I64(s, _) => s,
            Input::F32Owned(s, _) => s,
        }
    }
}

impl<'a> From<&'a Tensor> for Input<'a> {
    fn from(t: &'a Tensor) -> Self {
        match &t.data {
            star_artifact::tensor::Data::F32(v) => Input::F32(&t.shape, v),
            star_artifact::tensor::Data::I64(v) => Input::I64(&t.shape, v),
        }
    }
}

/// A stage input: a host tensor, or the first `len` tokens of the engine's own KV cache: every
/// block's `past_{i}`, a view of the prefix of that block's region of the buffer the engine owns
/// (no copy on the CPU backend, a device pointer on GPU backends).
pub enum Arg<'a> {
    Host(Input<'a>),
    KvPast(usize),
}

impl<'a> From<Input<'a>> for Arg<'a> {
    fn from(i: Input<'a>) -> Self {
        Arg::Host(i)
    }
}

impl<'a> From<&'a Tensor> for Arg<'a> {
    fn from(t: &'a Tensor) -> Self {
        Arg::Host(t.into())
    }
}

/// Where a step's `kv_new_{i}` outputs go in the KV cache: `tokens` tokens from token `begin`
/// of each block's region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvWrite {
    pub begin: usize,
    pub tokens: usize,
}

/// The executing half of a backend for one model directory: it owns the sessions, the weights
/// and the KV cache on its device. The pipeline refers to the cache by position only (`KvPast`,
/// `kv_at`); tensors cross to the host only where the pipeline needs them (logits, the image).
/// What every backend implements: running a stage, its KV cache, and what it supports.
pub trait Engine {
    /// Run one stage. With `kv_at = Some(w)` the stage's `kv_new_{i}` outputs (`w.tokens` tokens
    /// each) are written into block i's region of the engine's KV cache at token `w.begin` and
    /// not returned.
    fn run(
        &mut self,
        stage: Stage,
        inputs: &[(&str, Arg<'_>)],
        kv_at: Option<KvWrite>,
    ) -> Result<HashMap<String, Tensor>>;
    /// The engine's KV cache (`kv_cache::KvCache` over the engine's memory).
    fn kv(&mut self) -> &mut dyn KvStore;
    /// The same, to look at.
    fn kv_ref(&self) -> &dyn KvStore;
    /// Whether `step` may be run with an empty past (scale 0); otherwise scale 0 runs on
    /// `step_first`.
    fn takes_empty_past(&self) -> bool;
    /// GPU backends: the device, driver and the device memory in use now (for bench reports);
    /// None on the CPU.
    fn device(&self) -> Option<String>;
    /// The engine's host-memory policy, where it has one (ort-cpu: sessions created lazily and
    /// given back); engines that create everything on the device at load have none.
    fn memory_policy(&mut self) -> Option<&mut dyn MemoryPolicy> {
        None
    }
}

/// How an engine that keeps its sessions in host memory creates and gives them back (ort-cpu).
/// The pipeline asks for it (`Engine::memory_policy`) where it matters: one-shot runs, bench
/// timings, the server's memory admission.
pub trait MemoryPolicy {
    /// Create every stage's session now (so that timings exclude session creation).
    fn load_all(&mut self) -> Result<()>;
    /// Start creating the sessions of `stages`, in that order, in the background, so that a
    /// one-shot run does not create them one after another on its critical path. Idempotent.
    fn prefetch(&mut self, stages: &[Stage]);
    /// Give back the host memory of `stage`'s session until it is next run, when it is created
    /// again: for a caller that runs it rarely, or not again (a one-shot run's text stages hold
    /// 1.6 GB of packed weights at d30).
    fn release_stage(&mut self, stage: Stage);
    /// Sessions created since the last call, with the milliseconds each took (at first use, or
    /// in the background after `prefetch`).
    fn take_created(&mut self) -> Vec<Created>;
    /// How long the last `run` waited for its session (creating it, or for the background).
    fn last_session_wait_ms(&self) -> f64;
    /// Runs of a large `step` on its unpacked session so far (`LARGE_STEP_BYTES`).
    fn unpacked_step_runs(&self) -> usize;
    /// (values, bytes) of the weights every session shares on the host.
    fn shared_weights(&self) -> (usize, usize);
}

/// A session an engine created (`Engine::take_created`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Created {
    pub stage: Stage,
    /// A large `step`'s session for its early scales, not pre-packed (`LARGE_STEP_BYTES`).
    pub unpacked: bool,
    /// How long creating it took.
    pub ms: f64,
}

impl Created {
    /// Its row in the timings: the stage, `step.unpacked` for the early scales' session.
    pub fn label(&self) -> String {
        if self.unpacked {
            format!("{}.unpacked", self.stage)
        } else {
            self.stage.to_string()
        }
    }
}

/// An execution backend: a name, the graph precisions it executes, and how to load a model
/// directory onto it. Listed once, in `registry::BACKENDS`.
pub trait Backend: Sync {
    fn name(&self) -> &'static str;
    /// Whether this build can run it (native TensorRT needs the `tensorrt` feature); the error
    /// says how to get it.
    fn available(&self) -> Result<()> {
        Ok(())
    }
    /// Graph precisions it runs as they are; any other is refused, never converted. Every
    /// backend so far runs all of them.
    fn precisions(&self) -> &'static [Precision] {
        &Precision::ALL
    }
    /// `graphs`: each stage's graph bytes as verified (never re-read from disk).
    fn load(
        &self,
        dir: &Path,
        m: &Manifest,
        opts: &BackendOptions,
        graphs: &[(Stage, std::sync::Arc<[u8]>)],
    ) -> Result<Box<dyn Engine>>;
}

/// The bytes of graph `g` as the manifest check verified them (sessions are created from these,
/// never from a second read of the file).
pub fn verified_graph(
    verified: &[(Stage, std::sync::Arc<[u8]>)],
    g: &star_artifact::manifest::GraphEntry,
) -> Result<std::sync::Arc<[u8]>> {
    verified
        .iter()
        .find(|(s, _)| *s == g.stage)
        .map(|(_, b)| b.clone())
        .ok_or_else(|| EngineError::Unsupported(format!("graph {} was not verified", g.file)))
}
