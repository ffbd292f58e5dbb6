//! `star-run compare`: what a lower-precision model directory costs in accuracy against a
//! reference (normally its FP32 export), on the same prompts, seeds and RNG contract.
//!
//! Teacher-forced: the candidate is fed the reference's tokens and reveal masks at every scale
//! and sub-step, so its differences do not compound; per scale (and sampler sub-step) the logit
//! cosine and max abs error, and the fraction of chosen positions (every position of a plain
//! scale; the positions a sampler sub-step reveals) where the candidate, with the same uniform,
//! would have drawn the reference's token. Free-running: each model generates on its
//! own and the images are compared (PSNR).

use crate::observe::{Obs, SubObs};
use crate::pipeline::{GenParams, Hooks, NoHooks, Pipeline, Result, RunError};
use star_artifact::dtype::Precision;
use star_engines::Tensor;
use std::collections::{BTreeMap, HashMap};

/// Identical images: MSE 0 would be infinite PSNR; they count as this.
pub const PSNR_IDENTICAL_DB: f64 = 100.0;

/// The reference run: every tensor the comparison needs, by what it is.
#[derive(Default)]
struct Record {
    t: HashMap<Obs, Tensor>,
}

/// Logit statistics use at most this many token positions per scale and sub-step (every k-th
/// token of a larger scale): whole logit tensors of a run would not fit in memory (tiny-1024s
/// holds ~10 GB of them, d30/1024 far more); token agreement counts every position.
pub const LOGIT_POSITIONS: usize = 64;

/// Logits (rows, tokens, V) reduced to at most LOGIT_POSITIONS tokens, the same in both runs.
fn keep(what: Obs, t: &Tensor) -> Tensor {
    if !what.is_logits() || t.shape.len() != 3 || t.shape[1] <= LOGIT_POSITIONS {
        return t.clone();
    }
    let n = t.shape[1];
    let k = n.div_ceil(LOGIT_POSITIONS);
    let idx: Vec<usize> = (0..n).step_by(k).collect();
    t.select(1, &idx)
}

fn wanted(what: Obs) -> bool {
    what.is_logits() || what.is_drawn() || what.is_choice()
}

impl Hooks for Record {
    fn observing(&self) -> bool {
        true
    }
    fn observe(&mut self, what: Obs, t: &Tensor) {
        if wanted(what) {
            self.t.insert(what, keep(what, t));
        }
    }
}

/// The candidate run, forced onto the reference's choices.
struct Forced<'a> {
    reference: &'a Record,
    got: HashMap<Obs, Tensor>,
}

impl Hooks for Forced<'_> {
    fn observing(&self) -> bool {
        true
    }
    fn observe(&mut self, what: Obs, t: &Tensor) {
        if wanted(what) {
            self.got.insert(what, keep(what, t));
        }
    }
    fn plain_tokens(&mut self, si: usize) -> Option<Vec<i64>> {
        self.reference
            .t
            .get(&Obs::Idx(si))?
            .as_i64()
            .map(<[i64]>::to_vec)
    }
    fn substep(&mut self, si: usize, s: usize) -> Option<(Vec<f32>, Vec<i64>)> {
        let m = self.reference.t.get(&mask_after(si, s))?;
        let ids = self.reference.t.get(&Obs::Idx(si))?;
        Some((m.as_f32()?.to_vec(), ids.as_i64()?.to_vec()))
    }
}

/// Accumulated over every prompt and seed for one scale or sub-step ("s03", "s08.u02").
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct StepStats {
    pub key: String,
    /// Cosine of the flattened logits (all rows, at most LOGIT_POSITIONS token positions), the
    /// minimum over the generations (None where
    /// the step has no logits of its own: a stable scale's first sub-steps draw from the main
    /// head's).
    pub min_cosine: Option<f64>,
    pub max_abs_err: Option<f64>,
    /// Positions whose token this step chooses (a sampler sub-step: the ones it reveals), and
    /// how many of them the candidate draws the same; 0 where the step draws nothing (a stable
    /// scale's main head).
    pub agree: u64,
    pub positions: u64,
}

impl StepStats {
    pub fn agreement(&self) -> Option<f64> {
        (self.positions > 0).then(|| self.agree as f64 / self.positions as f64)
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ImageResult {
    pub prompt: String,
    pub seed: u64,
    pub psnr_db: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct CompareReport {
    pub reference: String,
    pub candidate: String,
    pub reference_precision: Precision,
    pub candidate_precision: Precision,
    /// Teacher-forced, over every position of every scale and sub-step.
    pub token_agreement: f64,
    pub min_logit_cosine: f64,
    pub max_logit_abs_err: f64,
    /// Mean over the images.
    pub psnr_db: f64,
    pub steps: Vec<StepStats>,
    pub images: Vec<ImageResult>,
    /// (reference, candidate) images, (3, H, W) each, for the grid.
    #[serde(skip)]
    pub pairs: Vec<(Vec<f32>, Vec<f32>)>,
    #[serde(skip)]
    pub size: (usize, usize),
}

fn cosine_and_max(a: &[f32], b: &[f32]) -> (f64, f64) {
    let (mut ab, mut aa, mut bb, mut mx) = (0f64, 0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
        mx = mx.max((x - y).abs());
    }
    let cos = if aa == 0.0 && bb == 0.0 {
        1.0
    } else if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        ab / (aa.sqrt() * bb.sqrt())
    };
    (cos, mx)
}

pub fn psnr(a: &[f32], b: &[f32]) -> f64 {
    let mse: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| ((x as f64) - (y as f64)).powi(2))
        .sum::<f64>()
        / a.len().max(1) as f64;
    if mse == 0.0 {
        PSNR_IDENTICAL_DB
    } else {
        (10.0 * (1.0 / mse).log10()).min(PSNR_IDENTICAL_DB)
    }
}

fn mask_after(scale: usize, sub: usize) -> Obs {
    Obs::Sub {
        scale,
        sub,
        what: SubObs::MaskAfter,
    }
}

/// For a sampler sub-step's draws: the positions that sub-step reveals in the reference (its
/// mask after, minus the mask before): only those tokens are kept, so only they count. None for
/// a plain scale, where every position is kept.
fn chosen_positions(rec: &Record, drawn: Obs, len: usize) -> Option<Vec<bool>> {
    let Obs::Sub { scale, sub: s, .. } = drawn else {
        return None;
    };
    let after = rec.t.get(&mask_after(scale, s))?.as_f32()?;
    let before = match s {
        0 => None,
        _ => rec.t.get(&mask_after(scale, s - 1))?.as_f32(),
    };
    if after.len() != len {
        return None;
    }
    Some(
        (0..len)
            .map(|i| after[i] > 0.5 && before.is_none_or(|b| b[i] < 0.5))
            .collect(),
    )
}

/// The step key of an observation: a scale's logits or draws -> "s03", a sub-step's ->
/// "s08.u02".
fn step_key(what: Obs) -> String {
    match what {
        Obs::Sub { scale, sub, .. } => format!("s{scale:02}.u{sub:02}"),
        other => {
            let name = other.to_string();
            name.split('.').next().unwrap_or(&name).to_string()
        }
    }
}

/// Compare `cand` with `reference` on every prompt x seed (one image per generation).
pub fn compare(
    reference: &mut Pipeline,
    cand: &mut Pipeline,
    prompts: &[String],
    seeds: &[u64],
    keep_images: bool,
    mut progress: impl FnMut(usize, usize, &ImageResult),
) -> Result<CompareReport> {
    let (rm, cm) = (reference.md.manifest.clone(), cand.md.manifest.clone());
    if rm.config != cm.config || rm.schedule != cm.schedule {
        return Err(RunError::Invalid(format!(
            "{} and {} are not the same model (config or schedule differ): compare exports of one checkpoint",
            reference.md.dir.display(),
            cand.md.dir.display()
        )));
    }
    if prompts.is_empty() || seeds.is_empty() {
        return Err(RunError::Invalid(
            "no prompts or no seeds to compare".into(),
        ));
    }
    let mut steps: BTreeMap<String, StepStats> = BTreeMap::new();
    let mut images = vec![];
    let mut pairs = vec![];
    let mut size = (0, 0);
    let total = prompts.len() * seeds.len();
    for prompt in prompts {
        for &seed in seeds {
            // Both models sample with the reference's parameters (same RNG contract).
            let params = GenParams::defaults(reference, seed);
            let one = std::slice::from_ref(prompt);
            let mut rec = Record::default();
            let r_img = reference.generate(one, "", &params, &mut rec)?.image;
            let mut forced = Forced {
                reference: &rec,
                got: HashMap::new(),
            };
            cand.generate(one, "", &params, &mut forced)?;
            // Teacher forcing took: the candidate's choices are the reference's, or the
            // comparison means nothing.
            for (name, r) in &rec.t {
                if name.is_choice() && forced.got.get(name) != Some(r) {
                    return Err(RunError::Invalid(format!(
                        "teacher forcing failed: the candidate's {name} is not the reference's"
                    )));
                }
            }
            for (&name, r) in &rec.t {
                let logits = name.is_logits();
                let drawn = name.is_drawn();
                if !(logits || drawn) {
                    continue;
                }
                let c = forced.got.get(&name).ok_or_else(|| {
                    RunError::Invalid(format!("the candidate produced no {name}"))
                })?;
                if c.shape != r.shape {
                    return Err(RunError::Invalid(format!(
                        "{name}: candidate shape {:?}, reference {:?}",
                        c.shape, r.shape
                    )));
                }
                let key = step_key(name);
                let st = steps.entry(key.clone()).or_insert_with(|| StepStats {
                    key,
                    ..Default::default()
                });
                if logits {
                    let (cos, mx) = cosine_and_max(
                        r.as_f32().unwrap_or_default(),
                        c.as_f32().unwrap_or_default(),
                    );
                    st.min_cosine = Some(st.min_cosine.map_or(cos, |m| m.min(cos)));
                    st.max_abs_err = Some(st.max_abs_err.map_or(mx, |m| m.max(mx)));
                } else {
                    let (a, b) = (
                        r.as_i64().unwrap_or_default(),
                        c.as_i64().unwrap_or_default(),
                    );
                    let chosen = chosen_positions(&rec, name, a.len());
                    for (i, (x, y)) in a.iter().zip(b).enumerate() {
                        if chosen.as_ref().is_none_or(|c| c[i]) {
                            st.agree += (x == y) as u64;
                            st.positions += 1;
                        }
                    }
                }
            }
            let c_img = cand.generate(one, "", &params, &mut NoHooks)?.image;
            size = (r_img.shape[2], r_img.shape[3]);
            let (r, c) = (
                r_img.as_f32().unwrap_or_default().to_vec(),
                c_img.as_f32().unwrap_or_default().to_vec(),
            );
            let res = ImageResult {
                prompt: prompt.clone(),
                seed,
                psnr_db: psnr(&r, &c),
            };
            progress(images.len() + 1, total, &res);
            images.push(res);
            if keep_images {
                pairs.push((r, c));
            }
        }
    }
    let steps: Vec<StepStats> = steps.into_values().collect();
    let (agree, positions) = steps
        .iter()
        .fold((0, 0), |(a, p), s| (a + s.agree, p + s.positions));
    Ok(CompareReport {
        reference: reference.md.dir.display().to_string(),
        candidate: cand.md.dir.display().to_string(),
        reference_precision: rm.precision,
        candidate_precision: cm.precision,
        token_agreement: if positions == 0 {
            1.0
        } else {
            agree as f64 / positions as f64
        },
        min_logit_cosine: steps
            .iter()
            .filter_map(|s| s.min_cosine)
            .fold(1.0, f64::min),
        max_logit_abs_err: steps
            .iter()
            .filter_map(|s| s.max_abs_err)
            .fold(0.0, f64::max),
        psnr_db: images.iter().map(|i| i.psnr_db).sum::<f64>() / images.len() as f64,
        steps,
        images,
        pairs,
        size,
    })
}

impl CompareReport {
    pub fn table(&self) -> String {
        let mut s = format!(
            "{} ({}) against reference {} ({})\n{:<10} {:>12} {:>12} {:>10}\n",
            self.candidate,
            self.candidate_precision,
            self.reference,
            self.reference_precision,
            "step",
            "min cosine",
            "max |err|",
            "agreement"
        );
        for st in &self.steps {
            let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
            s.push_str(&format!(
                "{:<10} {:>12} {:>12} {:>10}\n",
                st.key,
                or_dash(st.min_cosine.map(|c| format!("{c:.6}"))),
                or_dash(st.max_abs_err.map(|m| format!("{m:.4e}"))),
                or_dash(st.agreement().map(|a| format!("{:.2}%", 100.0 * a)))
            ));
        }
        s.push_str(&format!(
            "teacher-forced token agreement {:.2}%, min logit cosine {:.6}, max logit |err| {:.4e}; free-running image PSNR {:.2} dB (mean of {}; identical = {PSNR_IDENTICAL_DB} dB)\n",
            100.0 * self.token_agreement,
            self.min_logit_cosine,
            self.max_logit_abs_err,
            self.psnr_db,
            self.images.len()
        ));
        s
    }

    /// One row per prompt and seed: reference | candidate | |difference| x `gain`, as RGB8.
    pub fn grid(&self, gain: f32) -> (Vec<u8>, usize, usize) {
        let (h, w) = self.size;
        let gap = 2;
        let gw = 3 * w + 2 * gap;
        let gh = self.pairs.len() * (h + gap);
        let mut rgb = vec![255u8; gw * gh * 3];
        let plane = h * w;
        for (row, (r, c)) in self.pairs.iter().enumerate() {
            for y in 0..h {
                for x in 0..w {
                    for ch in 0..3 {
                        let i = ch * plane + y * w + x;
                        let vals = [r[i], c[i], ((r[i] - c[i]).abs() * gain).min(1.0)];
                        for (col, v) in vals.iter().enumerate() {
                            let gx = col * (w + gap) + x;
                            let gy = row * (h + gap) + y;
                            rgb[(gy * gw + gx) * 3 + ch] =
                                (v * 255.0 + 0.5).floor().clamp(0.0, 255.0) as u8;
                        }
                    }
                }
            }
        }
        (rgb, gw, gh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_psnr_and_keys() {
        let (c, m) = cosine_and_max(&[1.0, 0.0], &[1.0, 0.0]);
        assert_eq!((c, m), (1.0, 0.0));
        let (c, m) = cosine_and_max(&[1.0, 0.0], &[0.0, 2.0]);
        assert_eq!((c, m), (0.0, 2.0));
        assert_eq!(psnr(&[0.5; 4], &[0.5; 4]), PSNR_IDENTICAL_DB);
        // MSE 0.01 -> 20 dB.
        assert!((psnr(&[0.0; 4], &[0.1; 4]) - 20.0).abs() < 1e-5);
        let sub = |what| Obs::Sub {
            scale: 8,
            sub: 2,
            what,
        };
        assert_eq!(step_key(Obs::Logits(3)), "s03");
        assert_eq!(step_key(sub(SubObs::SamplerLogits)), "s08.u02");
        assert_eq!(step_key(sub(SubObs::Drawn)), "s08.u02");
    }
}
