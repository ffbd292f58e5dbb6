//! One model run for a batch of jobs, and its isolation: a batch that fails as a whole is run
//! again request by request.

use crate::jobs::{Job, JobError, JobResult};
use crate::metrics::{BATCH_BUCKETS, SECONDS_BUCKETS};
use crate::state::AppState;
use serde_json::json;
use star_pipeline::pipeline::{GenParams, Hooks, Pipeline, RunError};
use std::sync::atomic::Ordering;
use std::time::Instant;

/// A batch's hooks: cancellation (every request in it gone or past its deadline) and
/// per-scale metrics.
pub(crate) struct BatchHooks<'a> {
    pub(crate) jobs: &'a [Job],
    pub(crate) state: &'a AppState,
}

pub(crate) fn abandoned(j: &Job) -> bool {
    j.reply.is_closed()
        || Instant::now() > j.deadline
        || j.tracked
            .as_ref()
            .is_some_and(|t| t.cancel.load(Ordering::SeqCst))
}

impl Hooks for BatchHooks<'_> {
    fn cancelled(&self) -> bool {
        self.jobs.iter().all(abandoned)
    }
    fn scale_done(&mut self, si: usize, pn: usize, ms: f64, _wait: f64) {
        self.state
            .metrics()
            .scale
            .entry(si)
            .or_default()
            .observe(SECONDS_BUCKETS, ms / 1e3);
        for t in self.jobs.iter().filter_map(|j| j.tracked.as_ref()) {
            t.emit(json!({"event": "scale", "id": t.id, "scale": si, "side": pn, "tokens": pn * pn, "ms": ms}));
        }
        if let Some(d) = self.state.scale_delay {
            std::thread::sleep(d);
        }
    }
}

/// One model run for every job of a batch; images are split back per job. Batch invariance makes
/// each request's images byte-identical to a run of it alone.
pub(crate) fn run_batch(p: &mut Pipeline, state: &AppState, jobs: &[Job]) -> Vec<JobResult> {
    let r = &jobs[0].req;
    let d = GenParams::defaults(p, r.seed);
    let mut prompts = vec![];
    let mut seeds = vec![];
    for j in jobs {
        for i in 0..j.req.n {
            prompts.push(j.req.prompt.clone());
            seeds.push(star_pipeline::rng::image_seed(j.req.seed, i));
        }
    }
    let gp = GenParams {
        cfg: r.cfg.unwrap_or(d.cfg),
        top_k: r.top_k.unwrap_or(d.top_k),
        top_p: r.top_p.unwrap_or(d.top_p),
        stable_sampling: r.stable_sampling,
        image_seeds: seeds.clone(),
        ..d
    };
    if let Err(e) = p.check_params(prompts.len(), &gp) {
        let m = e.to_string();
        return jobs
            .iter()
            .map(|_| Err(JobError::Invalid(m.clone())))
            .collect();
    }
    state
        .metrics()
        .batch
        .observe(BATCH_BUCKETS, prompts.len() as f64);
    let mut hooks = BatchHooks { jobs, state };
    let g = match p.generate(&prompts, &r.negative, &gp, &mut hooks) {
        Ok(g) => g,
        Err(RunError::Cancelled) => {
            return jobs
                .iter()
                .map(|j| {
                    Err(if Instant::now() > j.deadline {
                        JobError::Timeout
                    } else {
                        JobError::Cancelled
                    })
                })
                .collect()
        }
        Err(e) => {
            let m = e.to_string();
            let oom = e.is_out_of_memory();
            return jobs
                .iter()
                .map(|_| {
                    Err(if oom {
                        JobError::OutOfMemory(m.clone())
                    } else {
                        JobError::Failed(m.clone())
                    })
                })
                .collect();
        }
    };
    let (h, w) = (g.image.shape[2], g.image.shape[3]);
    let data = g.image.as_f32().unwrap_or_default();
    let mut k = 0;
    jobs.iter()
        .map(|j| {
            (0..j.req.n)
                .map(|_| {
                    let (i, seed) = (k, seeds[k]);
                    k += 1;
                    let rgb = star_pipeline::image::to_rgb8(data, i, h, w);
                    let meta = star_pipeline::image::generation_meta(
                        &prompts[i],
                        &r.negative,
                        seed,
                        &gp,
                        p,
                    );
                    star_pipeline::image::png_bytes(&rgb, w, h, &meta)
                        .map(|png| (png, seed))
                        .map_err(JobError::Failed)
                })
                .collect()
        })
        .collect()
}

/// Run a batch; if it fails as a whole (not cancelled), run each request alone, so that one
/// request's failure (a panic included) fails that request only.
pub(crate) fn run_isolated(p: &mut Pipeline, state: &AppState, jobs: &[Job]) -> Vec<JobResult> {
    let once = |p: &mut Pipeline, js: &[Job]| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_batch(p, state, js)))
            .unwrap_or_else(|_| {
                js.iter()
                    .map(|_| Err(JobError::Failed("internal error during generation".into())))
                    .collect()
            })
    };
    let results = once(p, jobs);
    if jobs.len() > 1
        && results
            .iter()
            .all(|r| matches!(r, Err(JobError::Failed(_) | JobError::OutOfMemory(_))))
    {
        return jobs
            .iter()
            .map(|j| {
                once(p, std::slice::from_ref(j))
                    .pop()
                    .unwrap_or_else(|| Err(JobError::Failed("no result".into())))
            })
            .collect();
    }
    results
}
