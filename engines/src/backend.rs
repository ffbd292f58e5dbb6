//! Execution backends behind two traits: `Backend` (a registered name, its precisions, loading a
//! model directory) and `Engine` (the loaded model: sessions, weights and KV cache owned on its
//! device). `ort-cpu` (ONNX Runtime's CPU provider) is the one this build ships; GPU backends plug
//! in behind the same traits (docs/engine-boundary.md).

use crate::error::{EngineError, Result};
use crate::kv_cache::KvCache;
use crate::manifest::Manifest;
use crate::stage::Stage;
use crate::tensor::Tensor;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

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
            crate::tensor::Data::F32(v) => Input::F32(&t.shape, v),
            crate::tensor::Data::I64(v) => Input::I64(&t.shape, v),
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
pub trait Engine {
    /// Create every stage's session now (so that timings exclude session creation). Engines that
    /// create everything when loaded have nothing to do.
    fn load_all(&mut self) -> Result<()> {
        Ok(())
    }
    /// Start creating the sessions of `stages`, in that order, in the background, so that a
    /// one-shot run does not create them one after another on its critical path. Idempotent.
    fn prefetch(&mut self, _stages: &[Stage]) {}
    /// Run one stage. With `kv_at = Some(w)` the stage's `kv_new_{i}` outputs (`w.tokens` tokens
    /// each) are written into block i's region of the engine's KV cache at token `w.begin` and
    /// not returned.
    fn run(
        &mut self,
        stage: Stage,
        inputs: &[(&str, Arg<'_>)],
        kv_at: Option<KvWrite>,
    ) -> Result<HashMap<String, Tensor>>;
    /// (Re)allocate the KV cache for one generation: (depth, capacity, 2, rows, heads, head_dim),
    /// block-major and token-major within a block (`ort_bind::KvLayout`).
    fn kv_alloc(&mut self, shape: [usize; 6]) -> Result<()>;
    /// Give the cache's memory back; the next `kv_alloc` allocates it anew.
    fn kv_release(&mut self);
    /// The cache's shape, once allocated.
    fn kv_shape(&self) -> Option<[usize; 6]>;
    /// Give back the host memory of `stage`'s session until it is next run, when it is created
    /// again: for a caller that runs it rarely, or not again (a one-shot run's text stages hold
    /// 1.6 GB of packed weights at d30). Engines whose sessions hold no host weights keep them.
    fn release_stage(&mut self, _stage: Stage) {}
    /// Tokens begin..begin+n of every block as a host tensor (depth, n, 2, rows, heads,
    /// head_dim), for observation and checks only.
    fn kv_read(&self, begin: usize, n: usize) -> Result<Tensor>;
    /// (values, bytes) of the weights every session shares on the host (none on GPU backends).
    fn shared_weights(&self) -> (usize, usize) {
        (0, 0)
    }
    /// Sessions created since the last call, with the milliseconds each took (at first use, or
    /// in the background after `prefetch`); none for engines that create everything at load.
    fn take_created(&mut self) -> Vec<Created> {
        vec![]
    }
    /// How long the last `run` waited for its session (creating it, or for the background).
    fn last_session_wait_ms(&self) -> f64 {
        0.0
    }
    /// Whether `step` may be run with an empty past (scale 0); otherwise scale 0 runs on
    /// `step_first`.
    fn takes_empty_past(&self) -> bool;
    /// Runs of a large `step` on its unpacked session so far (`LARGE_STEP_BYTES`; ort-cpu only).
    fn unpacked_step_runs(&self) -> usize {
        0
    }
    /// GPU backends: the device, driver and the device memory in use now (for bench reports).
    fn device(&self) -> Option<String> {
        None
    }
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
/// directory onto it. Registered in `BACKENDS`; looked up with `backend_for_name`.
pub trait Backend: Sync {
    fn name(&self) -> &'static str;
    /// Graph precisions it runs as they are; any other is refused, never converted. Every
    /// backend so far runs all of them.
    fn precisions(&self) -> &'static [&'static str] {
        crate::manifest::PRECISIONS
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

#[derive(Clone, Debug)]
pub struct BackendOptions {
    pub name: String,
    /// Intra-op threads; 0 = ONNX Runtime's default (one per core).
    pub threads: usize,
    /// CUDA device ordinal (GPU backends).
    pub device: usize,
    /// GPU backends: accept graph nodes that ONNX Runtime places on the CPU (an error otherwise).
    pub allow_cpu_fallback: bool,
    /// Print the device and the provider each stage runs on.
    pub verbose: bool,
    /// An engine directory (star-export build-engine) for the engine backends.
    pub engine_dir: Option<PathBuf>,
    /// ort-cpu: every run gives its activation memory back when it ends, not only the large
    /// ones. The server sets it, so that a run's peak depends on its batch, not on what the
    /// runs before it left in the arena (its memory admission relies on that).
    pub release_activations: bool,
    /// ort-cpu: the weight bytes of a `step` graph above which pre-packing it at start would
    /// hold up the first scales (`LARGE_STEP_BYTES`); tests lower it to run the fixtures the way
    /// d30 runs.
    pub large_step_bytes: usize,
}

impl Default for BackendOptions {
    fn default() -> Self {
        BackendOptions {
            name: OrtCpu.name().into(),
            threads: 0,
            device: 0,
            allow_cpu_fallback: false,
            verbose: false,
            engine_dir: None,
            release_activations: false,
            large_step_bytes: LARGE_STEP_BYTES,
        }
    }
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

/// The small scales of a large `step` (`LARGE_STEP_BYTES`): tokens per image (d30/1024: scales
/// 0-6, 1 to 81 tokens, about 15 s of a one-shot run on 2 cores, the time the packing takes).
pub const EARLY_TOKENS: usize = 100;

/// Scales of a large `step` that run before its background packing starts. Packing on one core
/// while a scale runs on two slowed scale 1 from 0.7 s to 1.0-1.3 s (d30/1024, 2 cores); the
/// first two scales are the ones a user waits on before the progress moves. The price: the
/// packing, started after them, ended 1.5-2.6 s after the first scale that needs it
/// (RESULTS.md).
const EARLY_ALONE: usize = 2;

impl BackendOptions {
    pub fn named(name: &str, threads: usize) -> Self {
        BackendOptions {
            name: name.into(),
            threads,
            ..Default::default()
        }
    }
}

/// The backends of this build.
pub static BACKENDS: &[&dyn Backend] = &[
    &OrtCpu,
    &crate::ort_gpu::OrtCuda,
    &crate::ort_gpu::OrtTrt,
    #[cfg(feature = "tensorrt")]
    &crate::tensorrt::TensorRt,
];

pub fn backend_for_name(name: &str) -> Result<&'static dyn Backend> {
    #[cfg(not(feature = "tensorrt"))]
    if name == "tensorrt" {
        return Err(crate::gpu::not_built_with_tensorrt());
    }
    BACKENDS
        .iter()
        .copied()
        .find(|b| b.name() == name)
        .ok_or_else(|| EngineError::UnknownBackend {
            name: name.to_string(),
            available: BACKENDS
                .iter()
                .map(|b| b.name())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// The bytes of graph `g` as the manifest check verified them (sessions are created from these,
/// never from a second read of the file).
pub fn verified_graph(
    verified: &[(Stage, std::sync::Arc<[u8]>)],
    g: &crate::manifest::GraphEntry,
) -> Result<std::sync::Arc<[u8]>> {
    verified
        .iter()
        .find(|(s, _)| *s == g.stage)
        .map(|(_, b)| b.clone())
        .ok_or_else(|| EngineError::Unsupported(format!("graph {} was not verified", g.file)))
}

/// ONNX Runtime's CPU execution provider.
pub struct OrtCpu;

impl Backend for OrtCpu {
    fn name(&self) -> &'static str {
        "ort-cpu"
    }
    fn load(
        &self,
        dir: &Path,
        m: &Manifest,
        opts: &BackendOptions,
        verified: &[(Stage, std::sync::Arc<[u8]>)],
    ) -> Result<Box<dyn Engine>> {
        // Fail now, not at the first stage, when the library is missing.
        ort_environment()?;
        let mut graphs: Vec<(Stage, PathBuf, std::sync::Arc<[u8]>)> = vec![];
        let mut large_step = false;
        for g in &m.graphs {
            let bytes = verified_graph(verified, g)?;
            if g.stage == Stage::Step {
                large_step = external_bytes(&dir.join(&g.file), &bytes)? > opts.large_step_bytes;
            }
            graphs.push((g.stage, dir.join(&g.file), bytes));
        }
        Ok(Box::new(OrtCpuEngine {
            shared: std::sync::Arc::new(Shared {
                slots: graphs.iter().map(|(s, _, _)| (*s, Slot::new())).collect(),
                graphs,
                threads: opts.threads,
                large_step,
                early: Slot::new(),
                step_pages: std::sync::atomic::AtomicBool::new(false),
                gate: (std::sync::Mutex::new(false), std::sync::Condvar::new()),
                pool: std::sync::Mutex::new(WeightPool::default()),
                created: std::sync::Mutex::new(vec![]),
                cancel: std::sync::atomic::AtomicBool::new(false),
            }),
            worker: None,
            prefetched: false,
            prefetching: vec![],
            early_runs: 0,
            kv: None,
            last_wait_ms: 0.0,
            release_activations: opts.release_activations,
        }))
    }
}

/// Hidden states of a run (B2·n·C floats) from which its activations go back to the system
/// after it: d30/1024 from scale 9 (441 tokens, 6.8 MB) on; at d16/256 only with two images or
/// more (2 MB per image at the last scale).
const RELEASE_ARENA_BYTES: usize = 4 << 20;

/// Whether a run gives its activation memory back when it ends. ONNX Runtime's CPU arena keeps
/// every region it ever allocated, and grows by doubling: each later scale of a large model
/// needs larger blocks than the free ones left by the scale before, so the arena held about
/// 4 GB of regions after d30's scale 10 and the generation was killed for memory at scale 13
/// (benches/RESULTS.md). Shrinking after a large run bounds what it keeps to one run's peak;
/// it costs touching that much new memory at the next run, which small runs (every scale of
/// d16/256) are spared.
fn releases_arena(stage: Stage, inputs: &[(&str, Arg<'_>)]) -> bool {
    use crate::stage::io;
    let states = match stage {
        Stage::Step => io::X,
        Stage::Sampler => io::HIDDEN,
        _ => return false,
    };
    inputs.iter().any(|(n, a)| {
        *n == states
            && matches!(a, Arg::Host(i) if i.shape().iter().product::<usize>() * 4 >= RELEASE_ARENA_BYTES)
    })
}

/// Run options that free the CPU arena's unused regions when the run ends.
fn shrink_arena_after() -> std::result::Result<ort::session::RunOptions, ort::Error> {
    let mut o = ort::session::RunOptions::new()?;
    o.set("memory.enable_memory_arena_shrinkage", "cpu:0")?;
    Ok(o)
}

pub struct OrtCpuEngine {
    shared: std::sync::Arc<Shared>,
    /// Creates the transformer, VQ and decoder sessions in the background (`prefetch`).
    worker: Option<std::thread::JoinHandle<()>>,
    /// The worker ran and was joined: `prefetch` does not start another.
    prefetched: bool,
    /// The stages the worker creates.
    prefetching: Vec<Stage>,
    /// Runs of a large step's early session (`EARLY_ALONE`, `unpacked_step_runs`).
    early_runs: usize,
    kv: Option<KvCache>,
    /// Time the last `run` spent getting its session (creating it, or waiting for the worker).
    last_wait_ms: f64,
    /// `BackendOptions::release_activations`.
    release_activations: bool,
}

/// One slot per graph: created by whichever thread asks first (the other waits); `None` once
/// given back with `release_stage`, and created again by the next `run` of the stage.
type Slot = std::sync::OnceLock<std::result::Result<std::sync::Mutex<Option<OrtSession>>, String>>;

struct Shared {
    /// Each stage's graph: path (for messages and to find its external data) and the bytes
    /// that were verified.
    graphs: Vec<(Stage, PathBuf, std::sync::Arc<[u8]>)>,
    threads: usize,
    /// `step`'s weights pass `BackendOptions::large_step_bytes`: its scales of at most
    /// `EARLY_TOKENS` tokens run on `early` while the pre-packed session is created.
    large_step: bool,
    // Field order is drop order: the sessions before the pool whose mapping they read.
    slots: HashMap<Stage, Slot>,
    /// `step` without pre-packing, for the early scales of a large step.
    early: Slot,
    /// A large step's weights may be resident in the mapping: the early session read them, or
    /// its packing left them for the early session. Released at the next pre-packed scale.
    step_pages: std::sync::atomic::AtomicBool,
    /// Whether the background thread may start packing a large step (`EARLY_ALONE`); opened
    /// by the run that ends the first scales, or before anything waits for that thread.
    gate: (std::sync::Mutex<bool>, std::sync::Condvar),
    /// One copy of the weights (a mapping), shared by every session.
    pool: std::sync::Mutex<WeightPool>,
    created: std::sync::Mutex<Vec<Created>>,
    /// Set when the engine is dropped: the background thread stops after its current session.
    cancel: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn session(&self, stage: Stage) -> Result<&std::sync::Mutex<Option<OrtSession>>> {
        let slot = self
            .slots
            .get(&stage)
            .ok_or_else(|| EngineError::Unsupported(format!("this model has no {stage} graph")))?;
        self.session_in(slot, stage, false)
    }

    /// The session of `slot`, created by the first caller; `early`: `step` not pre-packed.
    fn session_in<'s>(
        &self,
        slot: &'s Slot,
        stage: Stage,
        early: bool,
    ) -> Result<&'s std::sync::Mutex<Option<OrtSession>>> {
        let r = slot.get_or_init(|| {
            self.create(stage, early)
                .map(|s| std::sync::Mutex::new(Some(s)))
        });
        r.as_ref().map_err(|why| EngineError::SessionCreate {
            stage: stage.name().into(),
            why: why.clone(),
        })
    }

    /// Create `stage`'s session (first use, the background thread, or again after
    /// `release_stage`), recording how long it took. `early`: without pre-packing.
    fn create(&self, stage: Stage, early: bool) -> std::result::Result<OrtSession, String> {
        let (path, bytes) = self
            .graphs
            .iter()
            .find(|(s, _, _)| *s == stage)
            .map(|(_, p, b)| (p.clone(), b.clone()))
            .ok_or_else(|| format!("this model has no {stage} graph"))?;
        let t = std::time::Instant::now();
        let packing = if early {
            Packing::Off
        } else if matches!(stage, Stage::StepFirst | Stage::Step) {
            Packing::Shared
        } else {
            Packing::Own
        };
        // A large step's pages stay while the early session reads them (released at the first
        // pre-packed scale): dropping them here, when the packing ends in the middle of the
        // early scales, made the next scale fault 6.2 GB back in. Other sessions then release
        // only their own weights' pages; without a large step nothing reads through the
        // mapping for long, and the whole of it goes, as measured for the serve's memory model.
        let release = match (self.large_step, stage) {
            (false, _) => Release::All,
            (true, Stage::Step) => Release::None,
            (true, _) => Release::Own,
        };
        if release == Release::None {
            self.step_pages
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let s = OrtSession::load(
            &path,
            &bytes,
            stage.name(),
            self.threads,
            &self.pool,
            packing,
            release,
        )
        .map_err(|e| e.to_string())?;
        self.created
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Created {
                stage,
                unpacked: early,
                ms: t.elapsed().as_secs_f64() * 1e3,
            });
        Ok(s)
    }

    /// Let the background thread pack a large step.
    fn open_gate(&self) {
        let (m, c) = &self.gate;
        *m.lock().unwrap_or_else(|e| e.into_inner()) = true;
        c.notify_all();
    }

    fn wait_gate(&self) {
        let (m, c) = &self.gate;
        let mut open = m.lock().unwrap_or_else(|e| e.into_inner());
        while !*open {
            open = c.wait(open).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Drop for OrtCpuEngine {
    fn drop(&mut self) {
        // The worker holds the shared state; let it finish the session it is creating, and no
        // more.
        self.shared
            .cancel
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.shared.open_gate();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl Engine for OrtCpuEngine {
    fn load_all(&mut self) -> Result<()> {
        let stages: Vec<Stage> = self
            .shared
            .graphs
            .iter()
            .map(|(s, _, _)| *s)
            .filter(|s| *s != Stage::StepFirst || !self.takes_empty_past())
            .collect();
        for s in stages {
            self.shared.session(s)?;
        }
        if self.shared.large_step {
            self.shared
                .session_in(&self.shared.early, Stage::Step, true)?;
        }
        Ok(())
    }

    fn prefetch(&mut self, stages: &[Stage]) {
        if self.worker.is_some() || self.prefetched {
            return;
        }
        let shared = self.shared.clone();
        // The caller creates the text stages itself as it reaches them; meanwhile this thread
        // creates the rest.
        self.prefetching = stages.to_vec();
        let order = self.prefetching.clone();
        self.worker = std::thread::Builder::new()
            .name("star-sessions".into())
            .spawn(move || {
                for st in order {
                    if st == Stage::Step && shared.large_step {
                        shared.wait_gate();
                    }
                    if shared.cancel.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    if shared.slots.contains_key(&st) {
                        // An error is kept in the slot and reported when the stage is run.
                        let _ = shared.session(st);
                    }
                }
            })
            .ok();
    }

    fn run(
        &mut self,
        stage: Stage,
        inputs: &[(&str, Arg<'_>)],
        kv_at: Option<KvWrite>,
    ) -> Result<HashMap<String, Tensor>> {
        use crate::ort_bind::Place;
        let cache = self
            .kv
            .as_mut()
            .map(|c| (c.data.as_mut_ptr() as *mut u8, c.layout));
        // SAFETY: the engine's own host cache, alive and not reallocated during the run.
        let (values, mut in_place) =
            unsafe { crate::ort_bind::stage_values(stage, inputs, kv_at, cache, Place::Host)? };
        let t = std::time::Instant::now();
        // By the schedule alone (`LARGE_STEP_BYTES`): a scale always runs on the same session.
        // Every step the pipeline runs writes the cache (`kv_at`); one that did not would run on
        // the pre-packed session.
        let early = stage == Stage::Step
            && self.shared.large_step
            && kv_at.is_some_and(|w| w.tokens <= EARLY_TOKENS);
        let session = if early {
            self.shared
                .step_pages
                .store(true, std::sync::atomic::Ordering::Relaxed);
            self.shared.session_in(&self.shared.early, stage, true)?
        } else {
            self.shared.session(stage)?
        };
        let mut guard = session.lock().unwrap_or_else(|e| e.into_inner());
        let s = match guard.take() {
            Some(s) => guard.insert(s),
            // Given back with `release_stage`: created again, from the same verified bytes.
            None => guard.insert(self.shared.create(stage, early).map_err(|why| {
                EngineError::SessionCreate {
                    stage: stage.name().into(),
                    why,
                }
            })?),
        };
        self.last_wait_ms = t.elapsed().as_secs_f64() * 1e3;
        if stage == Stage::Step
            && !early
            && self
                .shared
                .step_pages
                .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            // From the first pre-packed scale on only the packed copy is read: the mapped pages
            // go (they stay in the page cache; the next generation's early scales fault them
            // back in), or both copies would be resident at the last scale's peak.
            self.shared
                .pool
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .release_pages(&s.weights);
        }
        let refs: Vec<(&str, &ort::value::DynValue)> =
            values.iter().map(|(n, v)| (n.as_str(), v)).collect();
        let label = s.label.clone();
        let shrink = if self.release_activations || releases_arena(stage, inputs) {
            Some(shrink_arena_after().map_err(ort_err(format!("running stage {label}")))?)
        } else {
            None
        };
        let out = crate::ort_bind::run_bound(
            &mut s.session,
            &label,
            &refs,
            &mut in_place,
            shrink.as_ref(),
        );
        if early {
            self.early_runs += 1;
            if self.early_runs == EARLY_ALONE {
                self.shared.open_gate();
            }
        }
        out
    }

    fn kv_alloc(&mut self, shape: [usize; 6]) -> Result<()> {
        match &mut self.kv {
            // Same shape: reuse the buffer (no new allocation, pages already touched); the
            // stale contents are never read, every scale writes its tokens before they are used.
            Some(c) if c.layout.shape == shape => {}
            _ => {
                // The old cache goes before the new one is allocated: never two at once.
                self.kv = None;
                self.kv = Some(KvCache::new(shape).map_err(EngineError::OutOfMemory)?);
            }
        }
        Ok(())
    }

    fn kv_release(&mut self) {
        self.kv = None;
    }

    fn kv_shape(&self) -> Option<[usize; 6]> {
        self.kv.as_ref().map(|c| c.layout.shape)
    }

    fn release_stage(&mut self, stage: Stage) {
        // A session the background thread may still be creating is waited for, so that it is
        // given back rather than left resident after this returns.
        if self.prefetching.contains(&stage) {
            self.shared.open_gate();
            if let Some(w) = self.worker.take() {
                let _ = w.join();
                self.prefetched = true;
            }
        }
        if let Some(Ok(m)) = self.shared.slots.get(&stage).and_then(|s| s.get()) {
            *m.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
        if stage == Stage::Step {
            if let Some(Ok(m)) = self.shared.early.get() {
                if let Some(early) = m.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    self.shared
                        .pool
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .release_pages(&early.weights);
                }
            }
        }
    }

    fn kv_read(&self, begin: usize, n: usize) -> Result<Tensor> {
        let c = self
            .kv
            .as_ref()
            .ok_or_else(|| EngineError::Unsupported("KV cache read before kv_alloc".into()))?;
        let data = c.read(begin, n).map_err(EngineError::Unsupported)?;
        let mut shape = c.layout.shape.to_vec();
        shape[1] = n;
        Ok(Tensor::f32(shape, data))
    }

    fn shared_weights(&self) -> (usize, usize) {
        self.shared
            .pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .stats()
    }

    fn last_session_wait_ms(&self) -> f64 {
        self.last_wait_ms
    }

    fn takes_empty_past(&self) -> bool {
        // ONNX Runtime handles zero-length dims: scale 0 runs on `step`, whose pre-packed
        // weights then serve every scale (step_first would pack the same weights again).
        true
    }

    fn unpacked_step_runs(&self) -> usize {
        self.early_runs
    }

    fn take_created(&mut self) -> Vec<Created> {
        std::mem::take(
            &mut *self
                .shared
                .created
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        )
    }
}

/// Weights shared by every session of a model directory, with no copy of their bytes: each
/// external initializer becomes an ONNX Runtime value over a read-only mapping of `weights.bin`,
/// handed to every session that names it (AddInitializer). Sessions pre-pack their MatMul
/// weights into one shared container, so a weight used by `step_first` and `step` is packed
/// once. After each session is created the mapping's pages are released (MADV_DONTNEED): what a
/// session pre-packed is never read again, and what it reads directly (biases, embedding tables)
/// faults back in from the page cache. Resident: the packed weights plus the working set, not a
/// second unpacked copy.
pub struct WeightPool {
    // Field order is drop order: the values before the mappings they point into.
    values: HashMap<String, std::sync::Arc<ort::value::DynValue>>,
    /// Where each value's bytes are: (file, offset, length, dims, dtype); a second graph naming
    /// the same weight must agree.
    origin: HashMap<String, (String, usize, usize, Vec<i64>, i32)>,
    maps: HashMap<String, std::sync::Arc<memmap2::Mmap>>,
    bytes: usize,
    prepacked: ort::session::builder::PrepackedWeights,
}

impl Default for WeightPool {
    fn default() -> Self {
        WeightPool {
            values: HashMap::new(),
            origin: HashMap::new(),
            maps: HashMap::new(),
            bytes: 0,
            prepacked: ort::session::builder::PrepackedWeights::new(),
        }
    }
}

impl WeightPool {
    /// Number of shared values and their total bytes.
    pub fn stats(&self) -> (usize, usize) {
        (self.values.len(), self.bytes)
    }

    /// Drop every mapped page from this process (they stay in the page cache and fault back in
    /// if read again).
    fn release_all(&self) {
        for m in self.maps.values() {
            // SAFETY: a read-only file mapping: dropped pages are re-read from the file.
            let _ = unsafe { m.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
        }
    }

    /// Drop the mapped pages of these weights from this process (they stay in the page cache
    /// and fault back in if read again): called once a session has pre-packed them. Only the
    /// pages wholly inside each weight go, so a session that reads its weights through the
    /// mapping (not pre-packed) keeps its pages resident.
    fn release_pages(&self, names: &[String]) {
        // A granule every page size divides (4 KiB to 64 KiB); large weights are 64 KiB-aligned
        // in the file, and the few smaller ones are not worth a system call.
        const GRANULE: usize = 64 << 10;
        for n in names {
            let Some((file, offset, length, _, _)) = self.origin.get(n) else {
                continue;
            };
            let Some(m) = self.maps.get(file) else {
                continue;
            };
            let begin = offset.next_multiple_of(GRANULE);
            let end = (offset + length) / GRANULE * GRANULE;
            if end > begin {
                // SAFETY: a read-only file mapping: dropped pages are re-read from the file.
                let _ = unsafe {
                    m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, begin, end - begin)
                };
            }
        }
    }

    /// The shared values of every external initializer of `graph` (created on first use).
    fn for_graph(
        &mut self,
        graph: &Path,
        bytes: &[u8],
    ) -> Result<Vec<(String, std::sync::Arc<ort::value::DynValue>)>> {
        let model = crate::onnx::decode_model(bytes).map_err(|e| EngineError::Manifest {
            path: graph.to_path_buf(),
            why: format!("not an ONNX model: {e}"),
        })?;
        let dir = graph.parent().unwrap_or(Path::new("."));
        let mut out = vec![];
        for t in model.graph.map(|g| g.initializer).unwrap_or_default() {
            if t.data_location != 1 {
                continue;
            }
            let get = |k: &str| {
                t.external_data
                    .iter()
                    .find(|e| e.key == k)
                    .map(|e| e.value.clone())
            };
            let bad = |why: &str| EngineError::Manifest {
                path: graph.to_path_buf(),
                why: format!("initializer {}: {why}", t.name),
            };
            let file = get("location").ok_or_else(|| bad("no location"))?;
            let offset: usize = get("offset").and_then(|v| v.parse().ok()).unwrap_or(0);
            let length: usize = get("length")
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| bad("no length"))?;
            let origin = (file.clone(), offset, length, t.dims.clone(), t.data_type);
            if let Some(o) = self.origin.get(&t.name) {
                if *o != origin {
                    return Err(bad(
                        "another graph names a different tensor with this name; re-export the model",
                    ));
                }
            } else {
                if !self.maps.contains_key(&file) {
                    let p = dir.join(&file);
                    let f = std::fs::File::open(&p).map_err(crate::error::io_err(&p))?;
                    // SAFETY: read-only mapping of a file the manifest check just verified.
                    let m = unsafe { memmap2::Mmap::map(&f) }.map_err(crate::error::io_err(&p))?;
                    self.maps.insert(file.clone(), std::sync::Arc::new(m));
                }
                let map = &self.maps[&file];
                let (elem, size) = match t.data_type {
                    crate::onnx::dtype::FLOAT => (
                        ort::sys::ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
                        4,
                    ),
                    crate::onnx::dtype::FLOAT16 => (
                        ort::sys::ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
                        2,
                    ),
                    crate::onnx::dtype::INT8 => (
                        ort::sys::ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8,
                        1,
                    ),
                    other => return Err(bad(&format!("unsupported external data type {other}"))),
                };
                let numel = t
                    .dims
                    .iter()
                    .try_fold(1usize, |a, &d| {
                        usize::try_from(d).ok().and_then(|d| a.checked_mul(d))
                    })
                    .and_then(|n| n.checked_mul(size));
                if offset.checked_add(length).is_none_or(|e| e > map.len()) || numel != Some(length)
                {
                    return Err(bad(&format!(
                        "{length} bytes at offset {offset} do not fit {} ({} bytes) as {:?}",
                        file,
                        map.len(),
                        t.dims
                    )));
                }
                let ptr = map[offset..].as_ptr();
                if !(ptr as usize).is_multiple_of(size) {
                    return Err(bad("misaligned in the weights file; re-export the model"));
                }
                // SAFETY: in bounds and aligned (checked above); the mapping lives in `maps`
                // until after every value (field order) and is never written.
                let value = unsafe {
                    crate::ort_bind::value_over(
                        ptr,
                        length,
                        &t.dims,
                        elem,
                        crate::ort_bind::Place::Host,
                    )
                }
                .map_err(|e| ort_err(format!("weight {}", t.name))(ort::Error::new(e)))?;
                self.bytes += length;
                self.values
                    .insert(t.name.clone(), std::sync::Arc::new(value));
                self.origin.insert(t.name.clone(), origin);
            }
            out.push((t.name.clone(), self.values[&t.name].clone()));
        }
        Ok(out)
    }
}

fn ort_err(context: impl Into<String>) -> impl FnOnce(ort::Error) -> EngineError {
    let context = context.into();
    move |e| EngineError::Ort {
        context,
        message: e.to_string(),
    }
}

/// The one ONNX Runtime environment of this process (ORT allows one; tests share it), with the
/// library it was created from.
static ENV: OnceLock<std::result::Result<(PathBuf, ort::environment::Environment), String>> =
    OnceLock::new();

/// The newest `libonnxruntime.so*` of the onnxruntime wheel in a virtual environment.
pub fn ort_library_in_venv(venv: &Path) -> Option<PathBuf> {
    let rd = std::fs::read_dir(venv.join("lib")).ok()?;
    for py in rd.flatten() {
        let capi = py.path().join("site-packages/onnxruntime/capi");
        let Ok(files) = std::fs::read_dir(&capi) else {
            continue;
        };
        let mut libs: Vec<PathBuf> = files
            .flatten()
            .map(|f| f.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libonnxruntime.so"))
            })
            .collect();
        libs.sort();
        if let Some(l) = libs.pop() {
            return Some(l);
        }
    }
    None
}

/// Where to look for libonnxruntime when ORT_DYLIB_PATH is not set: a `.venv` (the layout
/// .ci/run creates) next to the working directory or next to the executable's workspace.
fn find_ort_library() -> std::result::Result<PathBuf, String> {
    if let Ok(p) = std::env::var("ORT_DYLIB_PATH") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("ORT_DYLIB_PATH={} does not exist", p.display()))
        };
    }
    let mut roots: Vec<PathBuf> = vec![];
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().map(|a| a.join(".venv")));
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().map(|a| a.join(".venv")));
    }
    roots
        .iter()
        .find_map(|v| ort_library_in_venv(v))
        .ok_or_else(|| {
            "ORT_DYLIB_PATH is not set and no .venv with the onnxruntime wheel was found".into()
        })
}

fn environment_from(
    lib: &Path,
) -> std::result::Result<(PathBuf, ort::environment::Environment), String> {
    let builder = ort::init_from(lib).map_err(|e| format!("loading {}: {e}", lib.display()))?;
    builder
        .with_name("star")
        .build()
        .map(|e| (lib.to_path_buf(), e))
        .map_err(|e| format!("creating the environment from {}: {e}", lib.display()))
}

/// The one ONNX Runtime environment of this process (ORT allows one; tests share it).
pub fn ort_environment() -> Result<&'static ort::environment::Environment> {
    let r = ENV.get_or_init(|| environment_from(&find_ort_library()?));
    r.as_ref()
        .map(|(_, e)| e)
        .map_err(|why| EngineError::OrtLibrary { why: why.clone() })
}

/// The environment from the GPU build of ONNX Runtime `lib` (a GPU backend's): an error when
/// this process has already loaded another library.
pub fn ort_environment_at(
    backend: &str,
    lib: &Path,
) -> Result<&'static ort::environment::Environment> {
    let r = ENV.get_or_init(|| environment_from(lib));
    match r {
        Ok((loaded, e)) if loaded == lib => Ok(e),
        Ok((loaded, _)) => Err(EngineError::Unsupported(format!(
            "backend {backend}: this process already loaded ONNX Runtime from {}, not the GPU build {}; run one backend per process",
            loaded.display(),
            lib.display()
        ))),
        Err(why) => Err(EngineError::Missing {
            backend: backend.into(),
            what: "a loadable GPU build of ONNX Runtime".into(),
            tried: why.clone(),
            how: "reinstall it with `bash scripts/setup-ort.sh --gpu`".into(),
        }),
    }
}

pub struct OrtSession {
    label: String,
    session: ort::session::Session,
    /// The pool's weights it was given.
    weights: Vec<String>,
}

/// How a session holds its MatMul weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Packing {
    /// Pre-packed into the pool's container, which `step_first` and `step` share.
    Shared,
    /// Pre-packed into a container of its own, so that it is created in parallel with others
    /// (ONNX Runtime holds a container's lock for a session's whole pre-packing).
    Own,
    /// Not pre-packed: MLAS packs each weight while it multiplies, reading the mapping.
    Off,
}

/// What a session that pre-packed its weights drops from the mapping once it exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    /// Every page of the mapping (it faults back in where read directly).
    All,
    /// The pages of its own weights: another session reads its own through the mapping.
    Own,
    None,
}

/// Bytes of a graph's external initializers (its share of `weights.bin`).
fn external_bytes(graph: &Path, bytes: &[u8]) -> Result<usize> {
    let model = crate::onnx::decode_model(bytes).map_err(|e| EngineError::Manifest {
        path: graph.to_path_buf(),
        why: format!("not an ONNX model: {e}"),
    })?;
    Ok(model
        .graph
        .map(|g| g.initializer)
        .unwrap_or_default()
        .iter()
        .filter(|t| t.data_location == 1)
        .filter_map(|t| t.external_data.iter().find(|e| e.key == "length"))
        .filter_map(|e| e.value.parse::<usize>().ok())
        .sum())
}

impl OrtSession {
    /// Create a session with the pool's shared values as initializers. The pool is locked only
    /// while the values are looked up, not while ONNX Runtime optimizes and pre-packs.
    /// `release`: which mapped pages to drop once the session has pre-packed its weights.
    pub fn load(
        graph: &Path,
        bytes: &[u8],
        label: &str,
        threads: usize,
        pool: &std::sync::Mutex<WeightPool>,
        packing: Packing,
        release: Release,
    ) -> Result<Self> {
        let env = ort_environment()?;
        let ctx = format!("loading {}", graph.display());
        let (inits, prepacked) = {
            let mut p = pool.lock().unwrap_or_else(|e| e.into_inner());
            let c = match packing {
                Packing::Shared => Some(p.prepacked.clone()),
                Packing::Own => Some(ort::session::builder::PrepackedWeights::new()),
                Packing::Off => None,
            };
            (p.for_graph(graph, bytes)?, c)
        };
        let weights: Vec<String> = inits.iter().map(|(n, _)| n.clone()).collect();
        let mut b = ort::session::Session::builder(env).map_err(ort_err(ctx.clone()))?;
        // Weights come from the shared pool; their pre-packed forms go into the pool's shared
        // container, so two graphs naming the same weight pack it once.
        b = match &prepacked {
            Some(c) => b
                .with_prepacked_weights(c)
                .map_err(|e| ort_err(ctx.clone())(e.into()))?,
            None => b
                .with_config_entry("session.disable_prepacking", "1")
                .map_err(|e| ort_err(ctx.clone())(e.into()))?,
        };
        for (name, value) in inits {
            b = b
                .with_initializer(&name, value)
                .map_err(|e| ort_err(ctx.clone())(e.into()))?;
        }
        if threads > 0 {
            b = b
                .with_intra_threads(threads)
                .map_err(|e| ort_err(ctx.clone())(e.into()))?;
        }
        // Idle intra-op threads sleep instead of spinning: with as many threads as cores,
        // spinning took the cores from the runtime's own work and from the thread creating the
        // next sessions (RESULTS.md: d16 warm 4.02 -> 3.48 s, d30 scale 0 18.3 -> 13.2 s).
        b = b
            .with_config_entry("session.intra_op.allow_spinning", "0")
            .map_err(|e| ort_err(ctx.clone())(e.into()))?;
        // From the verified bytes: every external initializer is given above, so ONNX Runtime
        // reads no weight itself; it only checks that the external data paths resolve, from
        // the model directory.
        let dir = graph.parent().unwrap_or(Path::new("."));
        b = b
            .with_config_entry(
                "session.model_external_initializers_file_folder_path",
                dir.to_string_lossy(),
            )
            .map_err(|e| ort_err(ctx.clone())(e.into()))?;
        let session = b.commit_from_memory(bytes).map_err(ort_err(ctx))?;
        // What was pre-packed is never read through the mapping again; an unpacked session
        // reads its weights there at every run, so its pages stay.
        if prepacked.is_some() {
            let p = pool.lock().unwrap_or_else(|e| e.into_inner());
            match release {
                Release::All => p.release_all(),
                Release::Own => p.release_pages(&weights),
                Release::None => {}
            }
        }
        Ok(OrtSession {
            label: label.to_string(),
            session,
            weights,
        })
    }
}

impl OrtSession {
    pub fn name(&self) -> &str {
        &self.label
    }
}
