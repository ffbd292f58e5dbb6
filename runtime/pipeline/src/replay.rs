//! Replaying golden generation records through the one scale loop (`Pipeline::generate`): the
//! recorded token choices and reveal masks are taken instead of sampling, and every recorded
//! tensor is compared on the way. `star-run replay` runs it end to end; `star-export validate`
//! runs the same loop with stage isolation (the transformer fed the recorded text features), so
//! there is one place that assembles stage inputs.

use crate::observe::{Obs, SubObs};
use crate::pipeline::{GenParams, Hooks, Pipeline, Result, RunError};
use star_artifact::golden::{compare, tolerance, Record, Report};
use star_engines::Tensor;
use std::path::Path;

struct RecordHooks<'a> {
    rec: &'a Record,
    rep: Report,
    err: Option<String>,
    isolate: bool,
    /// The tolerance of the model's precision (everything downstream of the transformer carries
    /// its error).
    tol: f64,
    /// The text encoder's own (it runs first, on the record's ids: FP32 in every directory).
    tol_text: f64,
}

impl Hooks for RecordHooks<'_> {
    fn observing(&self) -> bool {
        true
    }
    fn observe(&mut self, what: Obs, t: &Tensor) {
        let name = what.to_string();
        let name = name.as_str();
        if !self.rec.has(name) {
            return;
        }
        let stage = name.split('.').next().unwrap_or(name).to_string();
        match (self.rec.align(name, t), self.rec.get(name)) {
            (Ok(ours), Ok(gold)) => {
                let tol = if what.is_text() {
                    self.tol_text
                } else {
                    self.tol
                };
                self.rep.push(compare(&stage, name, &ours, &gold, tol))
            }
            (Err(e), _) | (_, Err(e)) => {
                self.err.get_or_insert(e.to_string());
            }
        }
    }
    fn plain_tokens(&mut self, si: usize) -> Option<Vec<i64>> {
        let t = self.recorded(&Obs::Idx(si).to_string())?;
        t.as_i64().map(|v| v.to_vec())
    }
    fn substep(&mut self, si: usize, s: usize) -> Option<(Vec<f32>, Vec<i64>)> {
        let mask = Obs::Sub {
            scale: si,
            sub: s,
            what: SubObs::MaskAfter,
        };
        let m = self.recorded(&mask.to_string())?;
        let ids = self.recorded(&Obs::Idx(si).to_string())?;
        Some((m.as_f32()?.to_vec(), ids.as_i64()?.to_vec()))
    }
    fn substitute(&mut self, what: Obs) -> Option<Tensor> {
        if !self.isolate {
            return None;
        }
        let name = what.to_string();
        let name = name.as_str();
        // Only a tensor the record stores whole can stand in for ours (probed ones keep a few
        // tokens); text features always are.
        if self.rec.meta(name).get("probed").is_some() {
            return None;
        }
        self.recorded(name)
    }
}

impl RecordHooks<'_> {
    /// A recorded tensor to use: None when the record does not hold it; a record that holds it
    /// but cannot be read (or holds non-finite values) is an error, never a silent fallback.
    fn recorded(&mut self, name: &str) -> Option<Tensor> {
        if !self.rec.has(name) {
            return None;
        }
        match self.rec.input(name) {
            Ok(t) => Some(t),
            Err(e) => {
                self.err.get_or_insert(e.to_string());
                None
            }
        }
    }
}

/// The prompts of a generation record's call.
pub fn record_prompts(rec: &Record) -> Vec<String> {
    rec.info()["call"]["prompts"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Run one generation record through the scale loop with its recorded choices; `isolate`
/// substitutes the recorded text features (stage isolation). Later scales take our own
/// next-scale tokens, embedded by the vq graph; the record's `next_in` is still compared.
pub fn replay_record(p: &mut Pipeline, rec: &Record, isolate: bool) -> Result<Report> {
    let call = rec.info()["call"].clone();
    let prompts = record_prompts(rec);
    let distinct = prompts
        .iter()
        .collect::<std::collections::HashSet<_>>()
        .len();
    if distinct > 1 {
        // The release broadcasts row 0's cross-attention to every row; we follow batch
        // invariance instead, so such a record is not reproducible by design.
        return Err(RunError::Invalid(format!(
            "{}: record of {distinct} different prompts (the release's row-0 broadcast); replay its rows one prompt at a time",
            rec.stem.display()
        )));
    }
    let params = GenParams {
        cfg: call["cfg"].as_f64().unwrap_or(4.0),
        top_k: call["top_k"].as_u64().unwrap_or(0) as usize,
        top_p: call["top_p"].as_f64().unwrap_or(0.0),
        seed: call["g_seed"].as_u64().unwrap_or(0),
        stable_sampling: call["w_mask"].as_bool().unwrap_or(true),
        recompute_past: false,
        image_seeds: vec![],
        previews: vec![],
    };
    let precision = p.md.manifest.precision;
    let tol = tolerance(precision);
    let tol_text = tolerance(
        p.md.manifest
            .graph(star_engines::Stage::TextEncoder)
            .map(|g| g.precision)
            .unwrap_or(precision),
    );
    let mut hooks = RecordHooks {
        rec,
        rep: Report::default(),
        err: None,
        isolate,
        tol,
        tol_text,
    };
    p.generate(&prompts, "", &params, &mut hooks)?;
    if let Some(e) = hooks.err {
        return Err(RunError::Invalid(e));
    }
    Ok(hooks.rep)
}

pub fn replay(p: &mut Pipeline, golden: &Path) -> Result<Report> {
    let gens = star_artifact::golden::generation_records(golden)?;
    if gens.is_empty() {
        return Err(RunError::Invalid(format!(
            "{}: no gen_*.safetensors generation record",
            golden.display()
        )));
    }
    let mut all = Report::default();
    for g in gens {
        let rec = Record::open(&g)?;
        all.checks.extend(replay_record(p, &rec, false)?.checks);
    }
    Ok(all)
}
