//! The interface every backend implements: `Backend` (a registered name, the precisions it runs,
//! loading a model directory) and `Engine` (the loaded model: sessions, weights and KV cache
//! owned on its device). Implementations live in their own folders (`ort/`, `tensorrt/`) and are
//! listed once, in `registry.rs`.

use crate::error::{EngineError, Result};
use crate::kv_cache::KvStore;
pub use crate::options::BackendOptions;
use crate::values::{Slot, ValueStore};
use star_artifact::dtype::{Dtype, Precision};
use star_artifact::manifest::Manifest;
use star_artifact::stage::Stage;
use star_artifact::tensor::Tensor;
use std::collections::HashMap;
use std::path::Path;

/// Where a step's `kv_new_{i}` outputs go in the KV cache: `tokens` tokens from token `begin`
/// of each block's region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KvWrite {
    pub begin: usize,
    pub tokens: usize,
}

/// How a run uses the KV cache: every block's `past_{i}` bound as the view of its first `past`
/// tokens (None: the graph has no past), and its `kv_new_{i}` written in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KvUse {
    pub past: Option<usize>,
    pub write: KvWrite,
}

/// One port of a run: the graph's name for it, the engine value bound to it, and the shape
/// bound (a view of the value's first elements where the value is larger).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PortBind {
    pub name: String,
    pub slot: Slot,
    pub shape: Vec<usize>,
    pub dtype: Dtype,
}

impl PortBind {
    pub fn bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bytes()
    }
}

/// One run of a stage, resolved against the manifest (`ModelDir::run`): every input and
/// output port with its value and shape. A call is also the key engines cache their bindings
/// under: the same call again binds nothing anew.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Call {
    pub stage: Stage,
    pub scale: Option<usize>,
    pub inputs: Vec<PortBind>,
    pub outputs: Vec<PortBind>,
    pub kv: Option<KvUse>,
    /// Outputs of a shape only the run knows (calibration probes) that the engine allocates on
    /// the host and returns. Only star-export's temporary calibration graphs have any.
    pub to_host: Vec<String>,
}

/// Bindings made once per call and reused while the values and the cache they point into
/// stay where they are (their epochs): ONNX Runtime's I/O bindings, TensorRT's addresses.
pub struct BindCache<B> {
    epochs: (u64, u64),
    map: HashMap<Call, B>,
}

impl<B> Default for BindCache<B> {
    fn default() -> Self {
        BindCache {
            epochs: (0, 0),
            map: HashMap::new(),
        }
    }
}

impl<B> BindCache<B> {
    /// The binding of `call`, made by `make` unless one was made since the values' and the
    /// cache's last (re)allocation (`epochs`). Returns it and whether it was made now.
    pub fn get_or_make(
        &mut self,
        call: &Call,
        epochs: (u64, u64),
        make: impl FnOnce() -> Result<B>,
    ) -> Result<(&mut B, bool)> {
        if epochs != self.epochs {
            self.map.clear();
            self.epochs = epochs;
        }
        let made = !self.map.contains_key(call);
        if made {
            let b = make()?;
            self.map.insert(call.clone(), b);
        }
        let b = self
            .map
            .get_mut(call)
            .ok_or_else(|| EngineError::Unsupported("binding cache lost an entry".into()))?;
        Ok((b, made))
    }

    /// Bindings made so far (for the bookkeeping tests and --verbose).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn clear(&mut self) {
        self.map.clear();
    }
}

/// The executing half of a backend for one model directory: it owns the sessions, the weights,
/// the stage values and the KV cache on its device. The pipeline refers to values by slot and
/// to the cache by position; nothing crosses to the host unless the pipeline reads a value.
/// What every backend implements: running a stage, its values and KV cache, and what it
/// supports.
pub trait Engine {
    /// Run one stage: every input read from its value, every output written into its value
    /// (reserved by the caller), the K/V written into the cache where `call.kv` says. Returns
    /// the `call.to_host` outputs.
    fn run(&mut self, call: &Call) -> Result<HashMap<String, Tensor>>;
    /// The engine's values (`values::Values` over the engine's memory).
    fn values(&mut self) -> &mut dyn ValueStore;
    fn values_ref(&self) -> &dyn ValueStore;
    /// Bindings the engine has made so far (one per distinct call since the last
    /// reallocation).
    fn bindings(&self) -> usize;
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
