//! The generation pipeline: tokenizer -> text encoder -> text K/V -> scale loop (KV cache, ramped
//! guidance, filter, token choice or stable-sampler sub-steps) -> VQ transitions -> decoder.
//! `Hooks` let `replay` substitute recorded choices and observe every intermediate tensor.

use crate::observe::{Obs, SubObs};
use crate::rng::{image_seed, uniform, Purpose};
use crate::sampler::{filter_row, guide, pick, softmax, top_positions};
use crate::timing::Timings;
use crate::tokenizer::{Encoded, Tokenizer};
use star_artifact::stage::{io, TEXT_LEN};
use star_artifact::ArtifactError;
use star_engines::engine::{Arg, BackendOptions};
use star_engines::model_dir::ModelDir;
use star_engines::{EngineError, Stage, Tensor};
use std::collections::HashMap;
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
    /// Asked before every scale: true stops the generation with `RunError::Cancelled` (a
    /// server's cancelled or timed-out request frees the model between scales).
    fn cancelled(&self) -> bool {
        false
    }
}

/// An output the graph declares (ModelDir checked it is there); an error, not a panic, if not.
fn take(out: &mut HashMap<String, Tensor>, name: &str) -> Result<Tensor> {
    out.remove(name)
        .ok_or_else(|| RunError::Invalid(format!("stage output '{name}' missing")))
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

/// Hand a stage's calibration probes (FP32 calibration graphs only) to the hooks.
fn forward_probes(out: &HashMap<String, Tensor>, hooks: &mut dyn Hooks) {
    if hooks.probing() {
        for (name, t) in out {
            if name.starts_with(io::PROBE_PREFIX) {
                hooks.probe(name, t);
            }
        }
    }
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

    /// Run a stage, timed under its label (`step[03]`, `vq[03]`, `text_encoder`, ...).
    fn run(
        &mut self,
        label: &str,
        stage: Stage,
        scale: Option<usize>,
        inputs: &[(&str, Arg<'_>)],
        kv_at: Option<usize>,
    ) -> Result<HashMap<String, Tensor>> {
        let t = Instant::now();
        let out = self.md.run_kv(stage, scale, inputs, kv_at)?;
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
        Ok(out)
    }

    /// One step of the transformer at scale `si` on its embedded tokens x (B2, n, C); its K/V go
    /// into the cache at the scale's begin. Scale 0 has an empty past: backends that take one run
    /// it on `step` too (one graph, one set of packed weights), the others on `step_first`.
    fn step(
        &mut self,
        label: &str,
        si: usize,
        x: &Tensor,
        text: &TextState,
    ) -> Result<HashMap<String, Tensor>> {
        let begin = self.md.manifest.schedule.begin_end[si].0;
        let cross = [
            (io::TEXT_KV, Arg::from(&text.kv)),
            (io::TEXT_BIAS, Arg::from(&text.bias)),
        ];
        let (stage, past) = if si == 0 && !self.md.takes_empty_past() {
            (Stage::StepFirst, None)
        } else {
            (Stage::Step, Some((io::PAST, Arg::KvPast(begin))))
        };
        let inputs: Vec<(&str, Arg<'_>)> = std::iter::once((io::X, x.into()))
            .chain(past)
            .chain(cross)
            .collect();
        self.run(label, stage, Some(si), &inputs, Some(begin))
    }

    fn timed<T>(&mut self, label: &str, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let r = f();
        self.timings
            .add(label, t.elapsed().as_secs_f64() * 1e3, false);
        r
    }

    /// Filter each (n, V) row of guided logits and choose a token per position.
    #[allow(clippy::too_many_arguments)]
    fn filter_and_draw(
        guided: &mut [f32],
        b: usize,
        n: usize,
        v: usize,
        p: &GenParams,
        si: usize,
        sub: usize,
    ) -> (Vec<i64>, Vec<f32>) {
        let mut idx = vec![0i64; b * n];
        let mut conf = vec![0f32; b * n];
        for bi in 0..b {
            let seed = p.seed_of(bi);
            for t in 0..n {
                let row = &mut guided[(bi * n + t) * v..(bi * n + t + 1) * v];
                filter_row(row, p.top_k, p.top_p);
                let probs = softmax(row);
                let (id, pr) = pick(&probs, uniform(seed, si, sub, t, Purpose::Token));
                idx[bi * n + t] = id as i64;
                conf[bi * n + t] = pr;
            }
        }
        (idx, conf)
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
        let (text, truncated) = self.encode_text(prompts, negative, hooks)?;
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
        let (cv, pside) = (
            self.md.manifest.config.cvae,
            *self.md.manifest.schedule.patch_nums.last().unwrap_or(&1),
        );
        let mut st = ScaleState {
            x: Some(text.x0.clone()),
            f_hat: Tensor::zeros(vec![b, cv, pside, pside]),
            past_inputs: vec![],
        };
        for si in 0..self.md.manifest.schedule.patch_nums.len() {
            if hooks.cancelled() {
                return Err(RunError::Cancelled);
            }
            self.scale(si, b, &text, &mut st, p, hooks)?;
        }
        let image = self.decode(&st.f_hat, hooks)?;
        self.timings
            .add("end_to_end", t_all.elapsed().as_secs_f64() * 1e3, false);
        Ok(Generated { image, truncated })
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
            &[Stage::Step, Stage::Vq, Stage::Sampler]
        } else {
            &[Stage::Step, Stage::Vq, Stage::Sampler, Stage::Decoder]
        };
        if let Some(m) = self.md.memory_policy() {
            m.prefetch(ahead);
        }
    }

    /// Tokenizer, text encoder and text K/V: rows [prompts ; negatives]; the cross-attention
    /// K/V from each image's own conditional row (batch invariance). Also says which prompts
    /// were truncated.
    fn encode_text(
        &mut self,
        prompts: &[String],
        negative: &str,
        hooks: &mut dyn Hooks,
    ) -> Result<(TextState, Vec<bool>)> {
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
        self.timings
            .add("tokenizer", t_tok.elapsed().as_secs_f64() * 1e3, false);
        let ids = Tensor::i64(vec![2 * b, TEXT_LEN], ids);
        let mask = Tensor::i64(vec![2 * b, TEXT_LEN], mask);
        observe(hooks, Obs::TextInputIds, || ids.clone());
        observe(hooks, Obs::TextAttentionMask, || mask.clone());
        let mut te = self.run(
            &Stage::TextEncoder.label(None),
            Stage::TextEncoder,
            None,
            &[
                (io::INPUT_IDS, (&ids).into()),
                (io::ATTENTION_MASK, (&mask).into()),
            ],
            None,
        )?;
        let mut hidden = take(&mut te, io::HIDDEN)?;
        let mut pooled = take(&mut te, io::POOLED)?;
        observe(hooks, Obs::TextHidden, || hidden.clone());
        observe(hooks, Obs::TextPooled, || pooled.clone());
        // Stage isolation (validate): later stages take the recorded text features.
        if let Some(t) = hooks.substitute(Obs::TextHidden) {
            hidden = t;
        }
        if let Some(t) = hooks.substitute(Obs::TextPooled) {
            pooled = t;
        }
        let mut tkv = self.run(
            &Stage::TextKv.label(None),
            Stage::TextKv,
            None,
            &[
                (io::HIDDEN, (&hidden.slice(0, 0, b)).into()),
                (io::ATTENTION_MASK, (&mask.slice(0, 0, b)).into()),
                (io::POOLED, (&pooled).into()),
            ],
            None,
        )?;
        let text = TextState {
            kv: take(&mut tkv, io::TEXT_KV)?,
            bias: take(&mut tkv, io::TEXT_BIAS)?,
            x0: take(&mut tkv, io::X)?,
            pooled,
        };
        Ok((text, truncated))
    }

    /// Scale `si`: the step (its K/V into the cache), guidance, the scale's tokens (drawn, or
    /// by the stable sampler's sub-steps), the VQ transition to the next scale's input.
    #[allow(clippy::too_many_arguments)]
    fn scale(
        &mut self,
        si: usize,
        b: usize,
        text: &TextState,
        st: &mut ScaleState,
        p: &GenParams,
        hooks: &mut dyn Hooks,
    ) -> Result<()> {
        let t_scale = Instant::now();
        let wait0 = self.timings.get("session_wait");
        let sn = self.md.manifest.schedule.patch_nums.len();
        let pn = self.md.manifest.schedule.patch_nums[si];
        let (n, v) = (pn * pn, self.md.manifest.config.vocab);
        let (hidden, logits) = self.step_scale(si, text, st, p, hooks)?;
        let t = p.cfg * si as f64 / (sn - 1).max(1) as f64;
        let logits = f32s(&logits, io::LOGITS)?;
        let guided = self.timed("sampling", || guide(logits, b, n, v, t));
        observe(hooks, Obs::LogitsCfg(si), || {
            t_f32(vec![b, n, v], guided.clone())
        });
        let counts = self.md.manifest.schedule.substeps[si].clone();
        let stable =
            !counts.is_empty() && p.stable_sampling && self.md.manifest.config.sampler_blocks > 0;
        let idx = if stable {
            let scale = SamplerScale {
                si,
                pn,
                b,
                counts: &counts,
            };
            self.stable_scale(&scale, &guided, &hidden, &text.pooled, p, hooks)?
        } else {
            self.plain_tokens(si, b, n, &guided, p, hooks)
        };
        st.x = self.vq(si, b, n, idx, &mut st.f_hat, hooks)?;
        let waited = self.timings.get("session_wait") - wait0;
        hooks.scale_done(si, pn, t_scale.elapsed().as_secs_f64() * 1e3, waited);
        Ok(())
    }

    /// The step of scale `si` and what goes with it: the sessions and the cache a large
    /// one-shot generation gives back around its last step, the observations. Returns the
    /// step's (hidden, logits).
    fn step_scale(
        &mut self,
        si: usize,
        text: &TextState,
        st: &mut ScaleState,
        p: &GenParams,
        hooks: &mut dyn Hooks,
    ) -> Result<(Tensor, Tensor)> {
        let sch = &self.md.manifest.schedule;
        let (sn, begin, pn) = (
            sch.patch_nums.len(),
            sch.begin_end[si].0,
            sch.patch_nums[si],
        );
        let depth = self.md.manifest.config.depth;
        if p.recompute_past && si > 0 {
            self.recompute_past(&st.past_inputs, text)?;
        }
        let xs = st.x.take().ok_or_else(|| {
            RunError::Invalid(format!("scale {si}: no input from scale {}", si.max(1) - 1))
        })?;
        if self.one_shot && si + 1 == sn && self.md.kv_bytes() >= self.kv_release_bytes {
            // The last step is a large generation's peak (cache full, the largest scale's
            // activations): d30/1024 holds 0.9 GB of sampler and decoder weights that it
            // does not read. They are created again after it (measured: 1.1 s waited for the
            // sampler, about 2 s for the decoder, in a generation of 17 minutes).
            self.release_stages(&[Stage::Sampler, Stage::Decoder]);
        }
        let mut out = self.step(&Stage::Step.label(Some(si)), si, &xs, text)?;
        forward_probes(&out, hooks);
        if p.recompute_past {
            st.past_inputs.push(xs);
        }
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
            // decoder run without it (8.7 GB at d30/1024). A small cache is kept: the next
            // generation reuses its pages instead of touching new ones.
            self.md.kv_release_if_over(self.kv_release_bytes);
        }
        let hidden = take(&mut out, io::HIDDEN)?;
        let logits = take(&mut out, io::LOGITS)?;
        let block = depth - 1;
        observe(hooks, Obs::BlockOut { scale: si, block }, || hidden.clone());
        observe(hooks, Obs::Logits(si), || logits.clone());
        Ok((hidden, logits))
    }

    /// A plain scale's tokens: filter and draw every position (or the recorded choice).
    fn plain_tokens(
        &mut self,
        si: usize,
        b: usize,
        n: usize,
        guided: &[f32],
        p: &GenParams,
        hooks: &mut dyn Hooks,
    ) -> Vec<i64> {
        let v = self.md.manifest.config.vocab;
        let mut g = guided.to_vec();
        let (drawn, _) = self.timed("sampling", || {
            Self::filter_and_draw(&mut g, b, n, v, p, si, 0)
        });
        // What this model draws here with the run's uniforms, before any substitution:
        // `compare` counts agreement on it.
        observe(hooks, Obs::Drawn(si), || {
            Tensor::i64(vec![b, n], drawn.clone())
        });
        observe(hooks, Obs::LogitsFiltered(si), || t_f32(vec![b, n, v], g));
        hooks.plain_tokens(si).unwrap_or(drawn)
    }

    /// The VQ transition of scale `si`: its tokens into f_hat, and the next scale's embedded
    /// input (none after the last scale, whose `next_in` is the full map).
    fn vq(
        &mut self,
        si: usize,
        b: usize,
        n: usize,
        idx: Vec<i64>,
        f_hat: &mut Tensor,
        hooks: &mut dyn Hooks,
    ) -> Result<Option<Tensor>> {
        let idx_t = Tensor::i64(vec![b, n], idx);
        observe(hooks, Obs::Idx(si), || idx_t.clone());
        let scale_t = Tensor::i64(vec![1], vec![si as i64]);
        let mut vo = self.run(
            &Stage::Vq.label(Some(si)),
            Stage::Vq,
            Some(si),
            &[
                (io::IDX, (&idx_t).into()),
                (io::F_HAT, (&*f_hat).into()),
                (io::SCALE, (&scale_t).into()),
            ],
            None,
        )?;
        *f_hat = take(&mut vo, io::F_HAT_OUT)?;
        observe(hooks, Obs::FHat(si), || f_hat.clone());
        if si + 1 == self.md.manifest.schedule.patch_nums.len() {
            return Ok(None);
        }
        if hooks.observing() {
            hooks.observe(Obs::NextIn(si), &take(&mut vo, io::NEXT_IN)?);
        }
        Ok(Some(take(&mut vo, io::X)?))
    }

    /// f_hat to the image (B, 3, H, W) in [0, 1].
    fn decode(&mut self, f_hat: &Tensor, hooks: &mut dyn Hooks) -> Result<Tensor> {
        let mut dec = self.run(
            &Stage::Decoder.label(None),
            Stage::Decoder,
            None,
            &[(io::F_HAT, f_hat.into())],
            None,
        )?;
        let image = take(&mut dec, io::IMAGE)?;
        if hooks.observing() {
            hooks.observe(Obs::ImageRaw, &take(&mut dec, io::IMAGE_RAW)?);
            hooks.observe(Obs::Image, &image);
        }
        Ok(image)
    }

    /// Rebuild the cache of the earlier scales by running their steps again (`past_inputs`
    /// holds each earlier scale's embedded tokens).
    fn recompute_past(&mut self, past_inputs: &[Tensor], text: &TextState) -> Result<()> {
        for (j, x) in past_inputs.iter().enumerate() {
            self.step("recompute_past", j, x, text)?;
        }
        Ok(())
    }

    /// Stable-sampler sub-steps of one scale (STAR-SPEC §5): each reveals `counts[s]` more
    /// positions, drawing from the main head's guided logits (`main_head_substep`) or the
    /// sampler's.
    fn stable_scale(
        &mut self,
        sc: &SamplerScale<'_>,
        guided_main: &[f32],
        hidden: &Tensor,
        pooled: &Tensor,
        p: &GenParams,
        hooks: &mut dyn Hooks,
    ) -> Result<Vec<i64>> {
        let (b, n) = (sc.b, sc.pn * sc.pn);
        let mut reveal = Reveal {
            tokens: vec![0i64; b * n],
            mask: vec![0f32; b * n],
        };
        // The main head's logits are the same every sub-step: filtered and softmaxed once.
        let mut main_probs: Option<Vec<f32>> = None;
        for (s, &k) in sc.counts.iter().enumerate() {
            let main = main_head_substep(s, sc.pn);
            let probs = if main {
                if main_probs.is_none() {
                    main_probs = Some(self.main_head_probs(guided_main, b * n, p));
                }
                None
            } else {
                Some(self.sampler_probs(sc, s, &reveal, hidden, pooled, p, hooks)?)
            };
            let probs = probs.as_deref().or(main_probs.as_deref()).unwrap_or(&[]);
            let (drawn, conf) = self.timed("sampling", || draw_positions(probs, sc, s, p));
            observe(hooks, sub(sc.si, s, SubObs::Drawn), || {
                Tensor::i64(vec![b, n], drawn.clone())
            });
            if let Some((mask_after, final_ids)) = hooks.substep(sc.si, s) {
                reveal.replace(mask_after, &final_ids);
            } else {
                for bi in 0..b {
                    reveal.reveal_image(sc, s, k, bi, main, &drawn, &conf, p.seed_of(bi));
                }
            }
            observe(hooks, sub(sc.si, s, SubObs::MaskAfter), || {
                t_f32(vec![b, n], reveal.mask.clone())
            });
        }
        Ok(reveal.tokens)
    }

    /// The main head's guided logits, filtered, as probabilities (rows × V).
    fn main_head_probs(&mut self, guided: &[f32], rows: usize, p: &GenParams) -> Vec<f32> {
        let v = self.md.manifest.config.vocab;
        let mut g = guided.to_vec();
        self.timed("sampling", || {
            for r in 0..rows {
                filter_row(&mut g[r * v..(r + 1) * v], p.top_k, p.top_p);
            }
        });
        self.timed("sampling", || g.chunks(v).flat_map(softmax).collect())
    }

    /// The sampler's logits at sub-step `s` (from the tokens revealed so far), guided with the
    /// full cfg and filtered, as probabilities (rows × V).
    #[allow(clippy::too_many_arguments)]
    fn sampler_probs(
        &mut self,
        sc: &SamplerScale<'_>,
        s: usize,
        reveal: &Reveal,
        hidden: &Tensor,
        pooled: &Tensor,
        p: &GenParams,
        hooks: &mut dyn Hooks,
    ) -> Result<Vec<f32>> {
        let (si, b, n, v) = (sc.si, sc.b, sc.pn * sc.pn, self.md.manifest.config.vocab);
        let idx_t = Tensor::i64(vec![b, n], reveal.tokens.clone());
        let mask_t = t_f32(vec![b, n], reveal.mask.clone());
        let scale_t = Tensor::i64(vec![1], vec![si as i64]);
        let mut so = self.run(
            &format!("{}.u{s:02}", Stage::Sampler.label(Some(si))),
            Stage::Sampler,
            Some(si),
            &[
                (io::HIDDEN, hidden.into()),
                (io::POOLED, pooled.into()),
                (io::IDX, (&idx_t).into()),
                (io::MASK, (&mask_t).into()),
                (io::SCALE, (&scale_t).into()),
            ],
            None,
        )?;
        forward_probes(&so, hooks);
        let sl = take(&mut so, io::LOGITS)?;
        observe(hooks, sub(si, s, SubObs::SamplerLogits), || sl.clone());
        let logits = f32s(&sl, io::LOGITS)?.to_vec();
        let mut g = self.timed("sampling", || guide(&logits, b, n, v, p.cfg));
        observe(hooks, sub(si, s, SubObs::LogitsCfg), || {
            t_f32(vec![b, n, v], g.clone())
        });
        self.timed("sampling", || {
            for r in 0..b * n {
                filter_row(&mut g[r * v..(r + 1) * v], p.top_k, p.top_p);
            }
        });
        observe(hooks, sub(si, s, SubObs::LogitsFiltered), || {
            t_f32(vec![b, n, v], g.clone())
        });
        Ok(self.timed("sampling", || g.chunks(v).flat_map(softmax).collect()))
    }
}

/// What the text stages give every scale: the cross-attention K/V and mask bias, scale 0's
/// embedded start token, and the pooled text (the sampler's prefix).
struct TextState {
    kv: Tensor,
    bias: Tensor,
    x0: Tensor,
    pooled: Tensor,
}

/// What passes from scale to scale: the next scale's embedded tokens and f_hat; for
/// `recompute_past`, every earlier scale's input.
struct ScaleState {
    x: Option<Tensor>,
    f_hat: Tensor,
    past_inputs: Vec<Tensor>,
}

/// One stable-sampler scale: its index and side, the images, the reveal counts per sub-step.
struct SamplerScale<'a> {
    si: usize,
    pn: usize,
    b: usize,
    counts: &'a [usize],
}

/// Whether sub-step `s` of a scale of side `pn` draws from the main head (with the scale's
/// ramped guidance) rather than the sampler (with the full guidance): the first five
/// sub-steps of the scales below 64 (STAR-SPEC §5, branch A).
fn main_head_substep(s: usize, pn: usize) -> bool {
    s < 5 && pn != 64
}

/// A token and its probability for every position of every image (B·n), with the RNG
/// contract's uniform of (image seed, scale, sub-step, position).
fn draw_positions(
    probs: &[f32],
    sc: &SamplerScale<'_>,
    s: usize,
    p: &GenParams,
) -> (Vec<i64>, Vec<f32>) {
    let n = sc.pn * sc.pn;
    let v = probs.len() / (sc.b * n).max(1);
    let mut drawn = vec![0i64; sc.b * n];
    let mut conf = vec![0f32; sc.b * n];
    for bi in 0..sc.b {
        let seed = p.seed_of(bi);
        for t in 0..n {
            let row = (bi * n + t) * v..(bi * n + t + 1) * v;
            let (id, pr) = pick(&probs[row], uniform(seed, sc.si, s, t, Purpose::Token));
            drawn[bi * n + t] = id as i64;
            conf[bi * n + t] = pr;
        }
    }
    (drawn, conf)
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
