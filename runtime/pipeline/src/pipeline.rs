//! The generation pipeline: tokenizer -> text encoder -> text K/V -> scale loop (KV cache, ramped
//! guidance, filter, token choice or stable-sampler sub-steps) -> VQ transitions -> decoder.
//! `Hooks` let `replay` substitute recorded choices and observe every intermediate tensor.

use crate::observe::{Obs, SubObs};
use crate::rng::{image_seed, uniform, Purpose};
use crate::sampler::{filter_row, guide, top_positions};
use crate::timing::Timings;
use crate::tokenizer::{Encoded, Tokenizer};
use star_artifact::stage::{io, TEXT_LEN};
use star_artifact::ArtifactError;
use star_engines::engine::BackendOptions;
use star_engines::model_dir::ModelDir;
use star_engines::values::Slot;
use star_engines::{EngineError, Stage, Tensor};
use std::path::Path;
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    #[error("{0}")]
    Invalid(String),
    /// `Hooks::cancelled` said so between two scales.
    #[error("cancelled")]
    Cancelled,
    #[error("{path}: {why}")]
    Output { path: String, why: String },
}

pub type Result<T> = std::result::Result<T, RunError>;

impl RunError {
    /// The system refused memory: one of our allocations, or ONNX Runtime's (its allocators
    /// throw, and its C API returns the message: "Failed to allocate memory …" from the arena,
    /// "bad allocation" from the CPU allocator, "out of memory" from CUDA).
    pub fn is_out_of_memory(&self) -> bool {
        let text = match self {
            RunError::Engine(EngineError::OutOfMemory(_)) => return true,
            RunError::Engine(EngineError::Ort { message, .. }) => message,
            RunError::Engine(EngineError::SessionCreate { why, .. }) => why,
            _ => return false,
        };
        let t = text.to_ascii_lowercase();
        [
            "failed to allocate",
            "bad allocation",
            "bad_alloc",
            "out of memory",
        ]
        .iter()
        .any(|k| t.contains(k))
    }
}

#[derive(Clone, Debug)]
pub struct GenParams {
    pub cfg: f64,
    pub top_k: usize,
    pub top_p: f64,
    pub seed: u64,
    pub stable_sampling: bool,
    /// Benchmark variant without the KV cache's benefit: before each scale, re-run every earlier
    /// scale's step to rebuild its K/V (what a cache-less implementation computes). Same images.
    pub recompute_past: bool,
    /// Per-image seeds (a server batch of several requests); empty: image i uses seed + i.
    pub image_seeds: Vec<u64>,
    /// Scales after which the decoder's image of f̂ so far goes to `Hooks::preview` (progressive
    /// previews, `crate::preview`); the last scale never is one.
    pub previews: Vec<usize>,
}

impl GenParams {
    /// The model's sampling defaults (manifest), stable sampling on, the KV cache used.
    pub fn defaults(p: &Pipeline, seed: u64) -> GenParams {
        let d = &p.md.manifest.sampling_defaults;
        GenParams {
            cfg: d.cfg,
            top_k: d.top_k,
            top_p: d.top_p,
            seed,
            stable_sampling: true,
            recompute_past: false,
            image_seeds: vec![],
            previews: vec![],
        }
    }

    /// The seed of image `bi` of a call (the RNG contract).
    pub fn seed_of(&self, bi: usize) -> u64 {
        self.image_seeds
            .get(bi)
            .copied()
            .unwrap_or_else(|| image_seed(self.seed, bi))
    }
}

/// Replay and observation points. Defaults: sample freely, observe nothing.
pub trait Hooks {
    /// Whether `observe` wants tensors at all (building them costs copies on the hot path).
    fn observing(&self) -> bool {
        false
    }
    fn observe(&mut self, _what: Obs, _t: &Tensor) {}
    /// Whether `probe` wants the calibration probes of graphs that have them.
    fn probing(&self) -> bool {
        false
    }
    /// A calibration probe output (`io::PROBE_PREFIX` + tensor name) of the last stage run.
    fn probe(&mut self, _name: &str, _t: &Tensor) {}
    /// Tokens of a plain scale instead of sampling (B, n).
    fn plain_tokens(&mut self, _si: usize) -> Option<Vec<i64>> {
        None
    }
    /// For a sampler sub-step: (mask after the sub-step, final token ids of the scale), both (B, n).
    fn substep(&mut self, _si: usize, _s: usize) -> Option<(Vec<f32>, Vec<i64>)> {
        None
    }
    /// Stage isolation: a recorded tensor to use instead of ours from here on (validate feeds
    /// the recorded text features so that the transformer is compared apart from the text
    /// encoder).
    fn substitute(&mut self, _what: Obs) -> Option<Tensor> {
        None
    }
    /// A scale finished: its wall time, and how much of it went to creating sessions or
    /// waiting for the background thread that creates them.
    fn scale_done(&mut self, _si: usize, _pn: usize, _ms: f64, _session_wait_ms: f64) {}
    /// A preview after scale `si` (`GenParams::previews`): the decoder's image (B, 3, H, W) in
    /// [0, 1] of f̂ so far.
    fn preview(&mut self, _si: usize, _image: &Tensor) {}
    /// Asked before every scale: true stops the generation with `RunError::Cancelled` (a
    /// server's cancelled or timed-out request frees the model between scales).
    fn cancelled(&self) -> bool {
        false
    }
}

/// Hooks that record each scale's wall time (the last generation's): previews are placed by it.
#[derive(Default)]
pub struct ScaleTimes(pub Vec<f64>);

impl Hooks for ScaleTimes {
    fn scale_done(&mut self, si: usize, _pn: usize, ms: f64, _wait: f64) {
        self.0.resize(self.0.len().max(si + 1), 0.0);
        self.0[si] = ms;
    }
}

fn f32s<'a>(t: &'a Tensor, name: &str) -> Result<&'a [f32]> {
    t.as_f32()
        .ok_or_else(|| RunError::Invalid(format!("stage output '{name}' is not float32")))
}

/// A KV cache of at least this size is given back right after the last step (and allocated anew
/// by the next generation); a smaller one is kept for reuse.
pub const KV_RELEASE_BYTES: usize = 1 << 30;

/// Block i's K (j = 0) or V (j = 1) of a cache region (depth, n, 2, B2, H, hd), as
/// the release's (B2, H, n, hd).
pub fn kv_block(kv: &Tensor, i: usize, j: usize) -> Tensor {
    let s = &kv.shape;
    let (n, rows, h, hd) = (s[1], s[3], s[4], s[5]);
    let d = kv.as_f32().unwrap_or(&[]);
    let mut out = vec![0f32; rows * h * n * hd];
    for t in 0..n {
        for r in 0..rows {
            for hh in 0..h {
                let src = ((((i * n + t) * 2 + j) * rows + r) * h + hh) * hd;
                let dst = ((r * h + hh) * n + t) * hd;
                out[dst..dst + hd].copy_from_slice(&d[src..src + hd]);
            }
        }
    }
    Tensor::f32(vec![rows, h, n, hd], out)
}

/// Observe `make()` as `what`, building it only when the hooks look (copies on the hot path).
fn observe(hooks: &mut dyn Hooks, what: Obs, make: impl FnOnce() -> Tensor) {
    if hooks.observing() {
        hooks.observe(what, &make());
    }
}

fn sub(scale: usize, sub: usize, what: SubObs) -> Obs {
    Obs::Sub { scale, sub, what }
}

pub struct NoHooks;
impl Hooks for NoHooks {}

pub struct Pipeline {
    pub md: ModelDir,
    pub tok: Tokenizer,
    pub timings: Timings,
    /// Wall time of `open`: manifest and graph checks, integrity, tokenizer, backend load.
    pub open_ms: f64,
    /// A KV cache of at least this many bytes is given back right after the last step
    /// (`KV_RELEASE_BYTES` unless changed); with `one_shot`, the same size marks the large
    /// generations whose sampler and decoder sessions are given back during the last step.
    pub kv_release_bytes: usize,
    /// This pipeline generates once (a one-shot `star-run`), so sessions are resident only
    /// while they are needed: the text stages' are given back as soon as the prompts are
    /// encoded, and in a generation whose cache is `kv_release_bytes` or more the sampler's and
    /// the decoder's are given back during the last step (the peak of a large generation) and
    /// created again after it. A later `generate` creates what it needs again.
    pub one_shot: bool,
}

pub struct Generated {
    /// (B, 3, H, W) in [0, 1].
    pub image: Tensor,
    pub truncated: Vec<bool>,
    /// Each prompt's CLIP tokens, BOS and EOS included (a server's usage).
    pub prompt_tokens: Vec<usize>,
}

fn t_f32(shape: Vec<usize>, v: Vec<f32>) -> Tensor {
    Tensor::f32(shape, v)
}

impl Pipeline {
    pub fn open(dir: &Path, opts: BackendOptions) -> Result<Pipeline> {
        let started = Instant::now();
        let md = ModelDir::open(dir, opts)?;
        let tok = Tokenizer::from_dir(&dir.join("tokenizer"))?;
        let t = &md.manifest.config.text;
        for (field, manifest, ours) in [
            ("config.text.bos_id", t.bos_id, crate::tokenizer::BOS),
            ("config.text.eos_id", t.eos_id, crate::tokenizer::EOS),
            ("config.text.pad_id", t.pad_id, tok.pad_id()),
        ] {
            if manifest != ours {
                return Err(ArtifactError::Manifest {
                    path: dir.join(star_artifact::manifest::MANIFEST_FILE),
                    why: format!("{field} = {manifest}, but the tokenizer's is {ours}"),
                }
                .into());
            }
        }
        Ok(Pipeline {
            md,
            tok,
            timings: Timings::default(),
            open_ms: started.elapsed().as_secs_f64() * 1e3,
            kv_release_bytes: KV_RELEASE_BYTES,
            one_shot: false,
        })
    }

    /// Everything about a request that can be refused without running the model: sampling values
    /// against the model, and whether the batch's KV cache fits in memory at all.
    pub fn check_params(&self, images: usize, p: &GenParams) -> Result<()> {
        let cfg = &self.md.manifest.config;
        if !p.cfg.is_finite() || p.cfg < 0.0 {
            return Err(RunError::Invalid(format!(
                "--cfg {} must be a finite number >= 0",
                p.cfg
            )));
        }
        if p.top_k > cfg.vocab {
            return Err(RunError::Invalid(format!(
                "--top-k {} exceeds the model's vocabulary ({})",
                p.top_k, cfg.vocab
            )));
        }
        if !(0.0..=1.0).contains(&p.top_p) {
            return Err(RunError::Invalid(format!(
                "--top-p {} must be in [0, 1]",
                p.top_p
            )));
        }
        if images == 0 {
            return Err(RunError::Invalid("no prompt given".into()));
        }
        let sch = &self.md.manifest.schedule;
        let last = sch.patch_nums.last().map(|p| p * p).unwrap_or(0);
        // KV cache + the largest scale's logits, both guidance rows: what one generation holds.
        let need = 4.0
            * (2 * images) as f64
            * ((cfg.depth * 2 * cfg.heads * sch.total_tokens * cfg.head_dim) as f64
                + (last * cfg.vocab) as f64);
        if let Some(avail) = crate::memory::available() {
            if need > avail as f64 {
                return Err(RunError::Invalid(format!(
                    "{images} images need about {:.1} GB for the KV cache and logits alone, more than the {:.1} GB of memory available: use a smaller --batch or fewer prompts",
                    need / 1e9,
                    avail as f64 / 1e9
                )));
            }
        }
        Ok(())
    }

    /// Give back these stages' sessions where the engine keeps them in host memory.
    fn release_stages(&mut self, stages: &[Stage]) {
        if let Some(m) = self.md.memory_policy() {
            for s in stages {
                m.release_stage(*s);
            }
        }
    }

    /// Run a stage on the engine's values, timed under its label (`step[03]`, `vq[03]`,
    /// `sample[03]`, `text_encoder`, ...).
    fn run(
        &mut self,
        label: &str,
        stage: Stage,
        scale: Option<usize>,
        b: usize,
        binds: &[(&str, Slot)],
    ) -> Result<()> {
        let t = Instant::now();
        self.md.run(stage, scale, b, binds)?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        // Getting a session (creating it at first use, or waiting for the background thread
        // that creates it) is reported apart from the stage's own time.
        let (wait, created) = match self.md.memory_policy() {
            Some(m) => (m.last_session_wait_ms(), m.take_created()),
            None => (0.0, vec![]),
        };
        if wait > 0.05 {
            self.timings.add("session_wait", wait, false);
        }
        for c in created {
            self.timings
                .add(&format!("session_create[{}]", c.label()), c.ms, false);
        }
        self.timings.add(label, ms - wait, true);
        Ok(())
    }

    /// Read `slot` (`stage`'s output) to the host for the hooks, only when they look.
    fn observe_slot(
        &mut self,
        hooks: &mut dyn Hooks,
        what: Obs,
        stage: Stage,
        slot: Slot,
    ) -> Result<()> {
        if hooks.observing() {
            let t = self.md.get(stage, slot)?;
            hooks.observe(what, &t);
        }
        Ok(())
    }

    /// Hand the calibration probes of the last runs (FP32 calibration graphs only) to the
    /// hooks.
    fn forward_probes(&mut self, hooks: &mut dyn Hooks) {
        let probes = self.md.take_probes();
        if hooks.probing() {
            for (name, t) in probes {
                hooks.probe(&name, &t);
            }
        }
    }

    /// One step of the transformer at scale `si` on the embedded tokens in `x` (B2, n, C); its
    /// K/V go into the cache at the scale's range. Scale 0 has an empty past: backends that take
    /// one run it on `step` too (one graph, one set of packed weights), the others on
    /// `step_first`.
    fn step(&mut self, label: &str, si: usize, b: usize, x: Slot) -> Result<()> {
        let stage = if si == 0 && !self.md.takes_empty_past() {
            Stage::StepFirst
        } else {
            Stage::Step
        };
        let binds = [
            (io::X, x),
            (io::TEXT_KV, Slot::TextKv),
            (io::TEXT_BIAS, Slot::TextBias),
            (io::HIDDEN, Slot::Hidden),
            (io::LOGITS, Slot::Logits),
        ];
        self.run(label, stage, Some(si), b, &binds)
    }

    fn timed<T>(&mut self, label: &str, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let r = f();
        self.timings
            .add(label, t.elapsed().as_secs_f64() * 1e3, false);
        r
    }

    /// Prompts to images: text, every scale, the decoder.
    pub fn generate(
        &mut self,
        prompts: &[String],
        negative: &str,
        p: &GenParams,
        hooks: &mut dyn Hooks,
    ) -> Result<Generated> {
        let t_all = Instant::now();
        let b = prompts.len();
        self.check_generation(b, p)?;
        self.prefetch_sessions(b);
        let t_alloc = Instant::now();
        // Every value at its largest size for this batch: one address per value for the whole
        // generation (and the next ones of this batch), so bindings are made once.
        self.md.reserve(b, USES)?;
        self.timings
            .add("values_alloc", t_alloc.elapsed().as_secs_f64() * 1e3, false);
        let (truncated, prompt_tokens) = self.encode_text(prompts, negative, hooks)?;
        if self.one_shot {
            // d30: 1.6 GB of packed text weights that no later stage reads.
            self.release_stages(&[Stage::TextEncoder, Stage::TextKv]);
        }
        let t_alloc = Instant::now();
        self.md.kv_alloc(2 * b)?;
        self.timings.add(
            "kv_cache_alloc",
            t_alloc.elapsed().as_secs_f64() * 1e3,
            false,
        );
        let (cv, side) = (
            self.md.manifest.config.cvae,
            *self.md.manifest.schedule.patch_nums.last().unwrap_or(&1),
        );
        self.md.zero(Slot::FHat(0), &[b, cv, side, side])?;
        self.put_sampling(p)?;
        let mut st = ScaleState {
            f_hat: 0,
            past_x: vec![],
        };
        for si in 0..self.md.manifest.schedule.patch_nums.len() {
            if hooks.cancelled() {
                return Err(RunError::Cancelled);
            }
            self.scale(si, b, &mut st, p, hooks)?;
            if si + 1 < self.md.manifest.schedule.patch_nums.len() && p.previews.contains(&si) {
                let image = self.preview(b, st.f_hat)?;
                hooks.preview(si, &image);
            }
        }
        let image = self.decode(b, st.f_hat, hooks)?;
        self.timings
            .add("end_to_end", t_all.elapsed().as_secs_f64() * 1e3, false);
        Ok(Generated {
            image,
            truncated,
            prompt_tokens,
        })
    }

    /// The sample graph's top-k and top-p for a generation: the k to keep (V when off) and the
    /// nucleus threshold 1 − p as the reference rounds it (−1 when off).
    fn put_sampling(&mut self, p: &GenParams) -> Result<()> {
        let v = self.md.manifest.config.vocab;
        let k = if p.top_k > 0 && p.top_k < v {
            p.top_k
        } else {
            v
        };
        let thr = if p.top_p > 0.0 {
            (1.0 - p.top_p) as f32
        } else {
            -1.0
        };
        self.md.put(
            Stage::Sample,
            Slot::TopK,
            &Tensor::i64(vec![1], vec![k as i64]),
        )?;
        self.md
            .put(Stage::Sample, Slot::TopP, &Tensor::f32(vec![1], vec![thr]))?;
        Ok(())
    }

    /// What a generation can be refused for before any stage runs.
    fn check_generation(&self, b: usize, p: &GenParams) -> Result<()> {
        if b == 0 {
            return Err(RunError::Invalid("no prompt given".into()));
        }
        self.check_params(b, p)?;
        if !p.image_seeds.is_empty() && p.image_seeds.len() != b {
            return Err(RunError::Invalid(format!(
                "{} image seeds for {b} images",
                p.image_seeds.len()
            )));
        }
        Ok(())
    }

    /// Where the engine creates sessions at first use, start the transformer's, the VQ's, the
    /// sampler's (and the decoder's) in the background while the text stages run.
    fn prefetch_sessions(&mut self, b: usize) {
        // A one-shot generation whose cache is given back also gives the decoder's session
        // back during its last step and creates it after it: creating it now as well would
        // pack its weights twice, on the cores the first scales run on. (The sampler's is
        // needed before that, from the first sampler scale.)
        let decoder_later = self.one_shot && self.md.kv_bytes_for(2 * b) >= self.kv_release_bytes;
        let ahead: &[Stage] = if decoder_later {
            &[Stage::Step, Stage::Sample, Stage::Vq, Stage::Sampler]
        } else {
            &[
                Stage::Step,
                Stage::Sample,
                Stage::Vq,
                Stage::Sampler,
                Stage::Decoder,
            ]
        };
        if let Some(m) = self.md.memory_policy() {
            m.prefetch(ahead);
        }
    }

    /// Tokenizer, text encoder and text K/V: rows [prompts ; negatives]; the cross-attention
    /// K/V from each image's own conditional row (batch invariance). Everything stays on the
    /// engine; returns which prompts were truncated, and each prompt's token count.
    fn encode_text(
        &mut self,
        prompts: &[String],
        negative: &str,
        hooks: &mut dyn Hooks,
    ) -> Result<(Vec<bool>, Vec<usize>)> {
        let b = prompts.len();
        let t_tok = Instant::now();
        let enc: Vec<Encoded> = prompts
            .iter()
            .map(|s| s.as_str())
            .chain(std::iter::repeat_n(negative, b))
            .map(|s| self.tok.encode(s))
            .collect();
        let ids: Vec<i64> = enc.iter().flat_map(|e| e.ids.clone()).collect();
        let mask: Vec<i64> = enc.iter().flat_map(|e| e.mask.clone()).collect();
        let truncated: Vec<bool> = enc.iter().take(b).map(|e| e.truncated).collect();
        let counts: Vec<usize> = enc
            .iter()
            .take(b)
            .map(|e| e.mask.iter().filter(|m| **m != 0).count())
            .collect();
        self.timings
            .add("tokenizer", t_tok.elapsed().as_secs_f64() * 1e3, false);
        let ids = Tensor::i64(vec![2 * b, TEXT_LEN], ids);
        let mask = Tensor::i64(vec![2 * b, TEXT_LEN], mask);
        observe(hooks, Obs::TextInputIds, || ids.clone());
        observe(hooks, Obs::TextAttentionMask, || mask.clone());
        self.md.put(Stage::TextEncoder, Slot::InputIds, &ids)?;
        self.md
            .put(Stage::TextEncoder, Slot::AttentionMask, &mask)?;
        let te = Stage::TextEncoder;
        let binds = [
            (io::INPUT_IDS, Slot::InputIds),
            (io::ATTENTION_MASK, Slot::AttentionMask),
            (io::HIDDEN, Slot::TextHidden),
            (io::POOLED, Slot::TextPooled),
        ];
        self.run(&te.label(None), te, None, b, &binds)?;
        self.observe_slot(hooks, Obs::TextHidden, te, Slot::TextHidden)?;
        self.observe_slot(hooks, Obs::TextPooled, te, Slot::TextPooled)?;
        // Stage isolation (validate): later stages take the recorded text features.
        for (what, slot) in [
            (Obs::TextHidden, Slot::TextHidden),
            (Obs::TextPooled, Slot::TextPooled),
        ] {
            if let Some(t) = hooks.substitute(what) {
                self.md.put(Stage::TextKv, slot, &t)?;
            }
        }
        // text_kv reads the conditional rows (the first B) of hidden and mask: views.
        let tk = Stage::TextKv;
        let binds = [
            (io::HIDDEN, Slot::TextHidden),
            (io::ATTENTION_MASK, Slot::AttentionMask),
            (io::POOLED, Slot::TextPooled),
            (io::X, Slot::X),
            (io::TEXT_KV, Slot::TextKv),
            (io::TEXT_BIAS, Slot::TextBias),
        ];
        self.run(&tk.label(None), tk, None, b, &binds)?;
        Ok((truncated, counts))
    }

    /// Scale `si`: the step (its K/V into the cache), the scale's tokens (drawn on the engine,
    /// or by the stable sampler's sub-steps), the VQ transition to the next scale's input.
    fn scale(
        &mut self,
        si: usize,
        b: usize,
        st: &mut ScaleState,
        p: &GenParams,
        hooks: &mut dyn Hooks,
    ) -> Result<()> {
        let t_scale = Instant::now();
        let wait0 = self.timings.get("session_wait");
        let sn = self.md.manifest.schedule.patch_nums.len();
        let pn = self.md.manifest.schedule.patch_nums[si];
        let (n, v) = (pn * pn, self.md.manifest.config.vocab);
        self.md.put(
            Stage::Vq,
            Slot::Scale,
            &Tensor::i64(vec![1], vec![si as i64]),
        )?;
        self.step_scale(si, b, st, p, hooks)?;
        let t = p.cfg * si as f64 / (sn - 1).max(1) as f64;
        // The reference sampler's view of this scale, for the hooks only.
        let guided = if hooks.observing() {
            let logits = self.md.get(Stage::Step, Slot::Logits)?;
            let g = guide(f32s(&logits, io::LOGITS)?, b, n, v, t);
            hooks.observe(Obs::LogitsCfg(si), &t_f32(vec![b, n, v], g.clone()));
            Some(g)
        } else {
            None
        };
        let counts = self.md.manifest.schedule.substeps[si].clone();
        let stable =
            !counts.is_empty() && p.stable_sampling && self.md.manifest.config.sampler_blocks > 0;
        let tokens = if stable {
            let scale = SamplerScale {
                si,
                pn,
                b,
                counts: &counts,
                t,
            };
            self.stable_scale(&scale, p, hooks)?
        } else {
            self.plain_tokens(si, b, n, t, guided, p, hooks)?
        };
        self.vq(si, b, tokens, st, hooks)?;
        let waited = self.timings.get("session_wait") - wait0;
        hooks.scale_done(si, pn, t_scale.elapsed().as_secs_f64() * 1e3, waited);
        Ok(())
    }

    /// The step of scale `si` and what goes with it: the sessions and the cache a large
    /// one-shot generation gives back around its last step, the observations.
    fn step_scale(
        &mut self,
        si: usize,
        b: usize,
        st: &mut ScaleState,
        p: &GenParams,
        hooks: &mut dyn Hooks,
    ) -> Result<()> {
        let sch = &self.md.manifest.schedule;
        let (sn, begin, pn) = (
            sch.patch_nums.len(),
            sch.begin_end[si].0,
            sch.patch_nums[si],
        );
        let depth = self.md.manifest.config.depth;
        if p.recompute_past {
            if si > 0 {
                self.recompute_past(&st.past_x, b)?;
            }
            // The benchmark variant without the cache keeps every scale's input on the host.
            st.past_x.push(self.md.get(Stage::Step, Slot::X)?);
        }
        if self.one_shot && si + 1 == sn && self.md.kv_bytes() >= self.kv_release_bytes {
            // The last step is a large generation's peak (cache full, the largest scale's
            // activations): d30/1024 holds 0.9 GB of sampler and decoder weights that it
            // does not read. They are created again after it (measured: 1.1 s waited for the
            // sampler, about 2 s for the decoder, in a generation of 17 minutes).
            self.release_stages(&[Stage::Sampler, Stage::Decoder]);
        }
        self.step(&Stage::Step.label(Some(si)), si, b, Slot::X)?;
        self.forward_probes(hooks);
        if hooks.observing() {
            // (depth, n, 2, B2, H, hd) -> per block and K/V: (B2, H, n, hd), the release's layout.
            let kv = self.md.kv_read(begin, pn * pn)?;
            for block in 0..depth {
                for v in [false, true] {
                    let what = Obs::Kv {
                        scale: si,
                        block,
                        v,
                    };
                    hooks.observe(what, &kv_block(&kv, block, v as usize));
                }
            }
        }
        if si + 1 == sn {
            // No stage after the last step reads the cache: the sampler's sub-steps and the
            // decoder run without it (8.7 GB at d30/1024 in FP32). A small cache is kept: the
            // next generation reuses its pages instead of touching new ones.
            self.md.kv_release_if_over(self.kv_release_bytes);
        }
        let block = depth - 1;
        let what = Obs::BlockOut { scale: si, block };
        self.observe_slot(hooks, what, Stage::Step, Slot::Hidden)?;
        self.observe_slot(hooks, Obs::Logits(si), Stage::Step, Slot::Logits)?;
        Ok(())
    }

    /// Draw a token for every position on the engine from `logits` (the step's or the
    /// sampler's, (2B, n, V)) with guidance `t` and the RNG contract's uniforms of sub-step `s`:
    /// the ids and their probabilities go to `Slot::Idx` and `Slot::Prob`.
    #[allow(clippy::too_many_arguments)]
    fn sample(
        &mut self,
        si: usize,
        s: Option<usize>,
        b: usize,
        n: usize,
        logits: Slot,
        t: f64,
        p: &GenParams,
    ) -> Result<()> {
        let sub = s.unwrap_or(0);
        let u: Vec<f32> = (0..b)
            .flat_map(|bi| {
                let seed = p.seed_of(bi);
                (0..n).map(move |pos| uniform(seed, si, sub, pos, Purpose::Token) as f32)
            })
            .collect();
        self.md
            .put(Stage::Sample, Slot::Uniforms, &Tensor::f32(vec![b, n], u))?;
        // The mix the reference computes: both factors rounded to f32 first.
        let g = Tensor::f32(vec![2], vec![(1.0 + t) as f32, t as f32]);
        self.md.put(Stage::Sample, Slot::Guidance, &g)?;
        let label = match s {
            Some(s) => format!("{}.u{s:02}", Stage::Sample.label(Some(si))),
            None => Stage::Sample.label(Some(si)),
        };
        let binds = [
            (io::LOGITS, logits),
            (io::GUIDANCE, Slot::Guidance),
            (io::TOP_K, Slot::TopK),
            (io::TOP_P, Slot::TopP),
            (io::UNIFORMS, Slot::Uniforms),
            (io::IDX, Slot::Idx),
            (io::PROB, Slot::Prob),
        ];
        self.run(&label, Stage::Sample, Some(si), b, &binds)
    }

    /// A plain scale's tokens: drawn on the engine (or the recorded choice). Returns the value
    /// that holds them.
    #[allow(clippy::too_many_arguments)]
    fn plain_tokens(
        &mut self,
        si: usize,
        b: usize,
        n: usize,
        t: f64,
        guided: Option<Vec<f32>>,
        p: &GenParams,
        hooks: &mut dyn Hooks,
    ) -> Result<Slot> {
        self.sample(si, None, b, n, Slot::Logits, t, p)?;
        // What this model draws here with the run's uniforms, before any substitution:
        // `compare` counts agreement on it.
        self.observe_slot(hooks, Obs::Drawn(si), Stage::Sample, Slot::Idx)?;
        if let Some(mut g) = guided {
            let v = self.md.manifest.config.vocab;
            for r in 0..b * n {
                filter_row(&mut g[r * v..(r + 1) * v], p.top_k, p.top_p);
            }
            hooks.observe(Obs::LogitsFiltered(si), &t_f32(vec![b, n, v], g));
        }
        match hooks.plain_tokens(si) {
            Some(ids) => {
                self.md
                    .put(Stage::Vq, Slot::Tokens, &Tensor::i64(vec![b, n], ids))?;
                Ok(Slot::Tokens)
            }
            None => Ok(Slot::Idx),
        }
    }

    /// The VQ transition of scale `si`: the scale's tokens (in `tokens`) into f_hat (from one
    /// of its two values into the other), and the next scale's embedded input into `Slot::X`.
    fn vq(
        &mut self,
        si: usize,
        b: usize,
        tokens: Slot,
        st: &mut ScaleState,
        hooks: &mut dyn Hooks,
    ) -> Result<()> {
        self.observe_slot(hooks, Obs::Idx(si), Stage::Vq, tokens)?;
        let (from, to) = (Slot::FHat(st.f_hat), Slot::FHat(1 - st.f_hat));
        let binds = [
            (io::IDX, tokens),
            (io::F_HAT, from),
            (io::SCALE, Slot::Scale),
            (io::F_HAT_OUT, to),
            (io::NEXT_IN, Slot::NextIn),
            (io::X, Slot::X),
        ];
        self.run(&Stage::Vq.label(Some(si)), Stage::Vq, Some(si), b, &binds)?;
        st.f_hat = 1 - st.f_hat;
        self.observe_slot(hooks, Obs::FHat(si), Stage::Vq, to)?;
        // After the last scale `next_in` is the full map, which nothing reads.
        if si + 1 < self.md.manifest.schedule.patch_nums.len() {
            self.observe_slot(hooks, Obs::NextIn(si), Stage::Vq, Slot::NextIn)?;
        }
        Ok(())
    }

    /// f_hat to the image (B, 3, H, W) in [0, 1]: the one tensor a generation must read.
    fn decode(&mut self, b: usize, f_hat: u8, hooks: &mut dyn Hooks) -> Result<Tensor> {
        let binds = [
            (io::F_HAT, Slot::FHat(f_hat)),
            (io::IMAGE_RAW, Slot::ImageRaw),
            (io::IMAGE, Slot::Image),
        ];
        self.run(&Stage::Decoder.label(None), Stage::Decoder, None, b, &binds)?;
        let image = self.md.get(Stage::Decoder, Slot::Image)?;
        self.observe_slot(hooks, Obs::ImageRaw, Stage::Decoder, Slot::ImageRaw)?;
        observe(hooks, Obs::Image, || image.clone());
        Ok(image)
    }

    /// The decoder's image of f̂ so far, timed apart from the final decode ("preview").
    fn preview(&mut self, b: usize, f_hat: u8) -> Result<Tensor> {
        let binds = [
            (io::F_HAT, Slot::FHat(f_hat)),
            (io::IMAGE_RAW, Slot::ImageRaw),
            (io::IMAGE, Slot::Image),
        ];
        self.run("preview", Stage::Decoder, None, b, &binds)?;
        Ok(self.md.get(Stage::Decoder, Slot::Image)?)
    }

    /// Rebuild the cache of the earlier scales by running their steps again (`past_x` holds
    /// each earlier scale's embedded tokens, uploaded again into a value of their own).
    fn recompute_past(&mut self, past_x: &[Tensor], b: usize) -> Result<()> {
        let slot = Slot::Port(Stage::Step, 0);
        for (j, x) in past_x.iter().enumerate() {
            self.md.put(Stage::Step, slot, x)?;
            self.step("recompute_past", j, b, slot)?;
        }
        Ok(())
    }

    /// Stable-sampler sub-steps of one scale (STAR-SPEC §5): each reveals `counts[s]` more
    /// positions, drawing on the engine from the main head's logits with the scale's ramped
    /// guidance (`main_head_substep`) or from the sampler's with the full guidance. The draws
    /// (ids and probabilities) come to the host, where the reveal chooses positions; the
    /// revealed tokens and the mask go back to the sampler. Returns the value holding the
    /// scale's tokens.
    fn stable_scale(
        &mut self,
        sc: &SamplerScale<'_>,
        p: &GenParams,
        hooks: &mut dyn Hooks,
    ) -> Result<Slot> {
        let (b, n) = (sc.b, sc.pn * sc.pn);
        let mut reveal = Reveal {
            tokens: vec![0i64; b * n],
            mask: vec![0f32; b * n],
        };
        for (s, &k) in sc.counts.iter().enumerate() {
            let main = main_head_substep(s, sc.pn);
            if main {
                self.sample(sc.si, Some(s), b, n, Slot::Logits, sc.t, p)?;
            } else {
                self.sampler_logits(sc, s, &reveal, p, hooks)?;
                self.sample(sc.si, Some(s), b, n, Slot::SamplerLogits, p.cfg, p)?;
            }
            let drawn = self.md.get(Stage::Sample, Slot::Idx)?;
            let conf = self.md.get(Stage::Sample, Slot::Prob)?;
            observe(hooks, sub(sc.si, s, SubObs::Drawn), || drawn.clone());
            let (drawn, conf) = (
                drawn.as_i64().unwrap_or(&[]).to_vec(),
                conf.as_f32().unwrap_or(&[]).to_vec(),
            );
            if drawn.len() != b * n || conf.len() != b * n {
                return Err(RunError::Invalid(format!(
                    "scale {}: the sample stage gave {} ids for {} positions",
                    sc.si,
                    drawn.len(),
                    b * n
                )));
            }
            if let Some((mask_after, final_ids)) = hooks.substep(sc.si, s) {
                reveal.replace(mask_after, &final_ids);
            } else {
                self.timed("sampling", || {
                    for bi in 0..b {
                        reveal.reveal_image(sc, s, k, bi, main, &drawn, &conf, p.seed_of(bi));
                    }
                });
            }
            observe(hooks, sub(sc.si, s, SubObs::MaskAfter), || {
                t_f32(vec![b, n], reveal.mask.clone())
            });
        }
        self.md.put(
            Stage::Vq,
            Slot::Tokens,
            &Tensor::i64(vec![b, n], reveal.tokens),
        )?;
        Ok(Slot::Tokens)
    }

    /// The sampler's logits at sub-step `s`, from the tokens revealed so far, into
    /// `Slot::SamplerLogits`; the reference's guided and filtered view of them for the hooks.
    fn sampler_logits(
        &mut self,
        sc: &SamplerScale<'_>,
        s: usize,
        reveal: &Reveal,
        p: &GenParams,
        hooks: &mut dyn Hooks,
    ) -> Result<()> {
        let (si, b, n, v) = (sc.si, sc.b, sc.pn * sc.pn, self.md.manifest.config.vocab);
        let st = Stage::Sampler;
        self.md.put(
            st,
            Slot::Tokens,
            &Tensor::i64(vec![b, n], reveal.tokens.clone()),
        )?;
        self.md.put(
            st,
            Slot::RevealMask,
            &t_f32(vec![b, n], reveal.mask.clone()),
        )?;
        let binds = [
            (io::HIDDEN, Slot::Hidden),
            (io::POOLED, Slot::TextPooled),
            (io::IDX, Slot::Tokens),
            (io::MASK, Slot::RevealMask),
            (io::SCALE, Slot::Scale),
            (io::LOGITS, Slot::SamplerLogits),
        ];
        let label = format!("{}.u{s:02}", st.label(Some(si)));
        self.run(&label, st, Some(si), b, &binds)?;
        self.forward_probes(hooks);
        if hooks.observing() {
            let sl = self.md.get(st, Slot::SamplerLogits)?;
            hooks.observe(sub(si, s, SubObs::SamplerLogits), &sl);
            let mut g = guide(f32s(&sl, io::LOGITS)?, b, n, v, p.cfg);
            hooks.observe(
                sub(si, s, SubObs::LogitsCfg),
                &t_f32(vec![b, n, v], g.clone()),
            );
            for r in 0..b * n {
                filter_row(&mut g[r * v..(r + 1) * v], p.top_k, p.top_p);
            }
            hooks.observe(sub(si, s, SubObs::LogitsFiltered), &t_f32(vec![b, n, v], g));
        }
        Ok(())
    }
}

/// Which engine value each port of each stage binds: what `ModelDir::reserve` sizes before a
/// generation (every value at its largest shape over the scales), and what `run` binds. f_hat
/// alternates between two values; the sample stage reads the step's logits or the sampler's;
/// the VQ takes the drawn ids or the host's (stable sampler, replay).
const USES: &[(Stage, &str, Slot)] = &[
    (Stage::TextEncoder, io::INPUT_IDS, Slot::InputIds),
    (Stage::TextEncoder, io::ATTENTION_MASK, Slot::AttentionMask),
    (Stage::TextEncoder, io::HIDDEN, Slot::TextHidden),
    (Stage::TextEncoder, io::POOLED, Slot::TextPooled),
    (Stage::TextKv, io::X, Slot::X),
    (Stage::TextKv, io::TEXT_KV, Slot::TextKv),
    (Stage::TextKv, io::TEXT_BIAS, Slot::TextBias),
    (Stage::StepFirst, io::HIDDEN, Slot::Hidden),
    (Stage::StepFirst, io::LOGITS, Slot::Logits),
    (Stage::Step, io::X, Slot::X),
    // `recompute_past`'s inputs.
    (Stage::Step, io::X, Slot::Port(Stage::Step, 0)),
    (Stage::Step, io::HIDDEN, Slot::Hidden),
    (Stage::Step, io::LOGITS, Slot::Logits),
    (Stage::Sample, io::GUIDANCE, Slot::Guidance),
    (Stage::Sample, io::TOP_K, Slot::TopK),
    (Stage::Sample, io::TOP_P, Slot::TopP),
    (Stage::Sample, io::UNIFORMS, Slot::Uniforms),
    (Stage::Sample, io::IDX, Slot::Idx),
    (Stage::Sample, io::PROB, Slot::Prob),
    (Stage::Sampler, io::IDX, Slot::Tokens),
    (Stage::Sampler, io::MASK, Slot::RevealMask),
    (Stage::Sampler, io::LOGITS, Slot::SamplerLogits),
    (Stage::Vq, io::IDX, Slot::Tokens),
    (Stage::Vq, io::SCALE, Slot::Scale),
    (Stage::Vq, io::F_HAT, Slot::FHat(0)),
    (Stage::Vq, io::F_HAT, Slot::FHat(1)),
    (Stage::Vq, io::NEXT_IN, Slot::NextIn),
    (Stage::Vq, io::X, Slot::X),
    (Stage::Decoder, io::IMAGE_RAW, Slot::ImageRaw),
    (Stage::Decoder, io::IMAGE, Slot::Image),
];

/// What passes from scale to scale on the host: which of the two f_hat values holds the map;
/// for `recompute_past`, every earlier scale's input.
struct ScaleState {
    f_hat: u8,
    past_x: Vec<Tensor>,
}

/// One stable-sampler scale: its index and side, the images, the reveal counts per sub-step,
/// and the scale's ramped guidance (the main head's).
struct SamplerScale<'a> {
    si: usize,
    pn: usize,
    b: usize,
    counts: &'a [usize],
    t: f64,
}

/// Whether sub-step `s` of a scale of side `pn` draws from the main head (with the scale's
/// ramped guidance) rather than the sampler (with the full guidance): the first five
/// sub-steps of the scales below 64 (STAR-SPEC §5, branch A).
fn main_head_substep(s: usize, pn: usize) -> bool {
    s < 5 && pn != 64
}

/// The tokens and reveal mask of a stable-sampler scale, (B, n) each.
struct Reveal {
    tokens: Vec<i64>,
    mask: Vec<f32>,
}

impl Reveal {
    /// A recorded sub-step (replay): its mask, and its tokens where newly revealed.
    fn replace(&mut self, mask_after: Vec<f32>, final_ids: &[i64]) {
        for i in 0..self.tokens.len() {
            if mask_after[i] > 0.5 && self.mask[i] < 0.5 {
                self.tokens[i] = final_ids[i];
            }
        }
        self.mask = mask_after;
    }

    /// Reveal `k` more positions of image `bi` at sub-step `s`; only newly revealed positions
    /// take the newly drawn token. Main-head sub-steps: the k most confident positions (all of
    /// them), then k random unrevealed ones. Sampler sub-steps: the k unrevealed positions with
    /// the highest key, a uniform while s < 5, the confidence after.
    #[allow(clippy::too_many_arguments)]
    fn reveal_image(
        &mut self,
        sc: &SamplerScale<'_>,
        s: usize,
        k: usize,
        bi: usize,
        main: bool,
        drawn: &[i64],
        conf: &[f32],
        seed: u64,
    ) {
        let n = sc.pn * sc.pn;
        let row = bi * n..(bi + 1) * n;
        let mut m = self.mask[row.clone()].to_vec();
        let rand: Vec<f32> = (0..n)
            .map(|t| uniform(seed, sc.si, s, t, Purpose::Reveal) as f32)
            .collect();
        if main {
            for t in top_positions(&conf[row.clone()], k) {
                m[t] = 1.0;
            }
            let keys: Vec<f32> = (0..n).map(|t| rand[t] * (1.0 - m[t])).collect();
            for t in top_positions(&keys, k) {
                m[t] = 1.0;
            }
        } else {
            let base: &[f32] = if s < 5 { &rand } else { &conf[row.clone()] };
            let keys: Vec<f32> = (0..n).map(|t| base[t] * (1.0 - m[t])).collect();
            for t in top_positions(&keys, k) {
                m[t] = 1.0;
            }
        }
        for t in 0..n {
            if m[t] > 0.5 && self.mask[bi * n + t] < 0.5 {
                self.tokens[bi * n + t] = drawn[bi * n + t];
            }
        }
        self.mask[row].copy_from_slice(&m);
    }
}

#[cfg(test)]
mod tests {
    use super::RunError;
    use star_engines::EngineError;

    #[test]
    fn allocation_failures_are_recognised_as_out_of_memory() {
        let ort = |m: &str| {
            RunError::Engine(EngineError::Ort {
                context: "running stage step".into(),
                message: m.into(),
            })
        };
        for m in [
            "Failed to allocate memory for requested buffer of size 1073741824",
            "bad allocation",
            "std::bad_alloc",
            "CUDA failure 2: out of memory",
        ] {
            assert!(ort(m).is_out_of_memory(), "{m}");
        }
        assert!(RunError::Engine(EngineError::OutOfMemory("x".into())).is_out_of_memory());
        assert!(!ort("Invalid input name: x").is_out_of_memory());
        assert!(!RunError::Invalid("--cfg".into()).is_out_of_memory());
    }
}
