//! `star-run replay`: run the whole pipeline on a fixture variant folder, taking the recorded
//! token choices and reveal masks instead of sampling, and compare every recorded tensor on the way.

use crate::pipeline::{GenParams, Hooks, Pipeline, Result, RunError};
use star_engines::golden::{compare, Record, Report, FP32_TOL};
use star_engines::Tensor;
use std::path::Path;

struct ReplayHooks<'a> {
    rec: &'a Record,
    rep: Report,
    err: Option<String>,
}

impl Hooks for ReplayHooks<'_> {
    fn observing(&self) -> bool {
        true
    }
    fn observe(&mut self, name: &str, t: &Tensor) {
        if !self.rec.has(name) {
            return;
        }
        let stage = name.split('.').next().unwrap_or(name).to_string();
        match (self.rec.align(name, t), self.rec.get(name)) {
            (Ok(ours), Ok(gold)) => self.rep.push(compare(&stage, name, &ours, &gold, FP32_TOL)),
            (Err(e), _) | (_, Err(e)) => self.err = Some(e.to_string()),
        }
    }
    fn plain_tokens(&mut self, si: usize) -> Option<Vec<i64>> {
        let t = self.recorded(&format!("s{si:02}.idx"))?;
        t.as_i64().map(|v| v.to_vec())
    }
    fn substep(&mut self, si: usize, s: usize) -> Option<(Vec<f32>, Vec<i64>)> {
        let m = self.recorded(&format!("s{si:02}.u{s:02}.mask_after"))?;
        let ids = self.recorded(&format!("s{si:02}.idx"))?;
        Some((m.as_f32()?.to_vec(), ids.as_i64()?.to_vec()))
    }
}

impl ReplayHooks<'_> {
    /// A recorded choice to substitute: None when the record does not hold it; a record that
    /// holds it but cannot be read (or holds non-finite values) is an error, never a silent
    /// fallback to sampling.
    fn recorded(&mut self, name: &str) -> Option<star_engines::Tensor> {
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

pub fn replay(p: &mut Pipeline, golden: &Path) -> Result<Report> {
    let gens = star_engines::golden::generation_records(golden)?;
    if gens.is_empty() {
        return Err(RunError::Invalid(format!(
            "{}: no gen_*.safetensors generation record",
            golden.display()
        )));
    }
    let mut all = Report::default();
    for g in gens {
        let rec = Record::open(&g)?;
        let call = rec.info()["call"].clone();
        let prompts: Vec<String> = call["prompts"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let distinct = prompts
            .iter()
            .collect::<std::collections::HashSet<_>>()
            .len();
        if distinct > 1 {
            // The release broadcasts row 0's cross-attention to every row; we follow batch
            // invariance instead, so such a record is not reproducible by design.
            return Err(RunError::Invalid(format!(
                "{}: record of {distinct} different prompts (the release's row-0 broadcast); replay its rows one prompt at a time",
                g.display()
            )));
        }
        let params = GenParams {
            cfg: call["cfg"].as_f64().unwrap_or(4.0),
            top_k: call["top_k"].as_u64().unwrap_or(0) as usize,
            top_p: call["top_p"].as_f64().unwrap_or(0.0),
            seed: call["g_seed"].as_u64().unwrap_or(0),
            stable_sampling: call["w_mask"].as_bool().unwrap_or(true),
            recompute_past: false,
        };
        let mut hooks = ReplayHooks {
            rec: &rec,
            rep: Report::default(),
            err: None,
        };
        p.generate(&prompts, "", &params, &mut hooks)?;
        if let Some(e) = hooks.err {
            return Err(RunError::Invalid(e));
        }
        all.checks.extend(hooks.rep.checks);
    }
    Ok(all)
}
