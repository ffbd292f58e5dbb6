//! `ort-cpu`: ONNX Runtime's CPU provider. Sessions are created at first use (or in the
//! background after `prefetch`) over one shared weight pool, and can be given back between
//! uses: the host-memory policy the pipeline reaches through `Engine::memory_policy`.

use super::weights::{external_bytes, OrtSession, Packing, Release, WeightPool};
use super::{ort_environment, ort_err};
use crate::engine::{Backend, BackendOptions, Call, Created, Engine, MemoryPolicy};
use crate::error::{EngineError, Result};
use crate::kv_cache::{KvCache, KvStore};
use crate::memory::HostMem;
use crate::values::{ValueStore, Values};
use star_artifact::dtype::Precision;
use star_artifact::manifest::Manifest;
use star_artifact::stage::Stage;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The small scales of a large `step` (`LARGE_STEP_BYTES`): tokens per image (d30/1024: scales
/// 0-6, 1 to 81 tokens, about 15 s of a one-shot run on 2 cores, the time the packing takes).
pub const EARLY_TOKENS: usize = 100;

/// Scales of a large `step` that run before its background packing starts. Packing on one core
/// while a scale runs on two slowed scale 1 from 0.7 s to 1.0-1.3 s (d30/1024, 2 cores); the
/// first two scales are the ones a user waits on before the progress moves. The price: the
/// packing, started after them, ended 1.5-2.6 s after the first scale that needs it
/// (RESULTS.md).
const EARLY_ALONE: usize = 2;

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
        if opts.gpu.cuda_graphs {
            return Err(EngineError::Unsupported(
                "--cuda-graphs applies to the GPU backends (ort-cuda, tensorrt); ort-cpu has no CUDA graphs".into(),
            ));
        }
        // Fail now, not at the first stage, when the library is missing.
        ort_environment()?;
        refuse_saturating_int8(m)?;
        let mut graphs: Vec<(Stage, PathBuf, std::sync::Arc<[u8]>)> = vec![];
        let mut large_step = false;
        for g in &m.graphs {
            let bytes = crate::engine::verified_graph(verified, g)?;
            if g.stage == Stage::Step {
                large_step =
                    external_bytes(&dir.join(&g.file), &bytes)? > opts.cpu.large_step_bytes;
            }
            graphs.push((g.stage, dir.join(&g.file), bytes));
        }
        Ok(Box::new(OrtCpuEngine {
            shared: std::sync::Arc::new(Shared {
                slots: graphs.iter().map(|(s, _, _)| (*s, Slot::new())).collect(),
                graphs,
                threads: opts.cpu.threads,
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
            kv: KvCache::new(()),
            values: Values::new(()),
            last_wait_ms: 0.0,
            release_activations: opts.cpu.release_activations,
        }))
    }
}

/// An INT8 directory whose weights use 8 bits (made before the 7-bit rule) on a CPU whose INT8
/// products would saturate (`star_artifact::manifest::INT8_WEIGHT_BITS`): refused, since its
/// images would be wrong, with how to get a directory that runs here.
fn refuse_saturating_int8(m: &Manifest) -> Result<()> {
    let bits = m.calibration.as_ref().map_or(0, |c| c.weight_bits);
    if m.precision == Precision::Int8 && int8_saturates(bits, cpu_has_vnni()) {
        return Err(EngineError::Unsupported(format!(
            "ort-cpu: this INT8 model has {bits}-bit weights, and this CPU has no VNNI (AVX512-VNNI or AVX-VNNI): ONNX Runtime's INT8 products would saturate and give wrong images; re-export it with this star-export (7-bit weights)"
        )));
    }
    Ok(())
}

/// Whether ONNX Runtime's x86 INT8 product saturates for weights of `bits` bits: without VNNI
/// it sums pairs of u8·s8 products in 16 bits, which 8-bit weights overflow.
pub fn int8_saturates(bits: u32, vnni: bool) -> bool {
    cfg!(target_arch = "x86_64") && !vnni && bits >= 8
}

fn cpu_has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512vnni") || std::is_x86_feature_detected!("avxvnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
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
fn releases_arena(call: &Call) -> bool {
    use star_artifact::stage::io;
    let states = match call.stage {
        Stage::Step => io::X,
        Stage::Sampler => io::HIDDEN,
        _ => return false,
    };
    call.inputs
        .iter()
        .any(|p| p.name == states && p.bytes() >= RELEASE_ARENA_BYTES)
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
    kv: KvCache<HostMem>,
    values: Values<HostMem>,
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
    fn run(&mut self, call: &Call) -> Result<HashMap<String, star_artifact::tensor::Tensor>> {
        use crate::ort::Place;
        let stage = call.stage;
        let t = std::time::Instant::now();
        // By the schedule alone (`LARGE_STEP_BYTES`): a scale always runs on the same session.
        // Every step the pipeline runs writes the cache; one that did not would run on the
        // pre-packed session.
        let early = stage == Stage::Step
            && self.shared.large_step
            && call.kv.is_some_and(|k| k.write.tokens <= EARLY_TOKENS);
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
        let label = s.label.clone();
        let shrink = if self.release_activations || releases_arena(call) {
            Some(shrink_arena_after().map_err(ort_err(format!("running stage {label}")))?)
        } else {
            None
        };
        let epochs = (self.values.epoch(), self.kv.epoch());
        let cache = self.kv.bound();
        let (values, session) = (&mut self.values, &s.session);
        let (binding, _) = s.bindings.get_or_make(call, epochs, || {
            crate::ort::bind::make_binding(session, call, values, cache, Place::Host)
        })?;
        let out = crate::ort::bind::run_binding(
            &mut s.session,
            binding,
            &label,
            shrink.as_ref(),
            &call.to_host,
        );
        if early {
            self.early_runs += 1;
            if self.early_runs == EARLY_ALONE {
                self.shared.open_gate();
            }
        }
        out
    }

    fn values(&mut self) -> &mut dyn ValueStore {
        &mut self.values
    }

    fn values_ref(&self) -> &dyn ValueStore {
        &self.values
    }

    fn bindings(&self) -> usize {
        let count = |slot: &Slot| {
            slot.get()
                .and_then(|r| r.as_ref().ok())
                .and_then(|m| {
                    m.lock()
                        .ok()
                        .map(|g| g.as_ref().map_or(0, |s| s.bindings.len()))
                })
                .unwrap_or(0)
        };
        self.shared.slots.values().map(count).sum::<usize>() + count(&self.shared.early)
    }

    fn kv(&mut self) -> &mut dyn KvStore {
        &mut self.kv
    }

    fn kv_ref(&self) -> &dyn KvStore {
        &self.kv
    }

    fn device(&self) -> Option<String> {
        None
    }

    fn memory_policy(&mut self) -> Option<&mut dyn MemoryPolicy> {
        Some(self)
    }

    fn takes_empty_past(&self) -> bool {
        // ONNX Runtime handles zero-length dims: scale 0 runs on `step`, whose pre-packed
        // weights then serve every scale (step_first would pack the same weights again).
        true
    }
}

impl MemoryPolicy for OrtCpuEngine {
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

#[cfg(test)]
mod tests {
    use super::int8_saturates;

    #[test]
    fn eight_bit_int8_weights_saturate_without_vnni_on_x86() {
        assert!(!int8_saturates(7, false));
        assert!(!int8_saturates(8, true));
        assert_eq!(int8_saturates(8, false), cfg!(target_arch = "x86_64"));
    }
}
