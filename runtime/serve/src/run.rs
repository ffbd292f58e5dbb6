//! One model run for a batch of jobs, and its isolation: a batch that fails as a whole is run
//! again request by request.

use crate::jobs::{Finished, ImageOut, Job, JobError, JobResult};
use crate::metrics::{BATCH_BUCKETS, SECONDS_BUCKETS};
use crate::request::Output;
use crate::state::AppState;
use base64::Engine as _;
use star_engines::Tensor;
use star_pipeline::pipeline::{GenParams, Hooks, Pipeline, RunError};
use std::sync::atomic::Ordering;
use std::time::Instant;

/// A batch's hooks: cancellation (every request in it gone or past its deadline) and
/// per-scale metrics.
pub(crate) struct BatchHooks<'a> {
    pub(crate) jobs: &'a [Job],
    pub(crate) state: &'a AppState,
    /// Previews sent so far (each job's `partial_image_index`).
    pub(crate) previews: u32,
    /// This run's scale times, for the next run's preview placement.
    pub(crate) scale_ms: Vec<f64>,
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
        self.state.stopping() || self.jobs.iter().all(abandoned)
    }
    fn scale_done(&mut self, si: usize, pn: usize, ms: f64, _wait: f64) {
        self.state
            .metrics()
            .scale
            .entry(si)
            .or_default()
            .observe(SECONDS_BUCKETS, ms / 1e3);
        self.scale_ms.push(ms);
        for t in self.jobs.iter().filter_map(|j| j.tracked.as_ref()) {
            t.scale_done(si, pn, ms);
        }
        if let Some(d) = self.state.scale_delay {
            std::thread::sleep(d);
        }
    }
    fn preview(&mut self, si: usize, image: &Tensor) {
        let (Some(data), &[_, _, h, w]) = (image.as_f32(), image.shape.as_slice()) else {
            return;
        };
        let mut first = 0;
        for j in self.jobs {
            if let Some(t) = j.tracked.as_ref() {
                for i in 0..j.req.n {
                    let rgb = star_pipeline::image::to_rgb8(data, first + i, h, w);
                    if let Ok(png) = star_pipeline::image::png_bytes(&rgb, w, h, &[]) {
                        let b64 = base64::engine::general_purpose::STANDARD.encode(png);
                        t.partial_image(self.previews, i, si, b64);
                    }
                }
            }
            first += j.req.n;
        }
        self.previews += 1;
    }
}

/// Why a run that stopped early stopped, for one of its jobs.
fn stopped(state: &AppState, j: &Job) -> JobError {
    if state.stopping() {
        JobError::Draining
    } else if Instant::now() > j.deadline {
        JobError::Timeout
    } else {
        JobError::Cancelled
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
    let previews = if r.partial_images > 0 {
        let ms = state.scale_ms.lock().unwrap_or_else(|e| e.into_inner());
        star_pipeline::preview::preview_scales(&ms, r.partial_images as usize)
    } else {
        vec![]
    };
    let gp = GenParams {
        cfg: r.cfg.unwrap_or(d.cfg),
        top_k: r.top_k.unwrap_or(d.top_k),
        top_p: r.top_p.unwrap_or(d.top_p),
        stable_sampling: r.stable_sampling,
        image_seeds: seeds.clone(),
        previews,
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
    let mut hooks = BatchHooks {
        jobs,
        state,
        previews: 0,
        scale_ms: vec![],
    };
    let generated = p.generate(&prompts, &r.negative, &gp, &mut hooks);
    if hooks.scale_ms.len() == p.md.manifest.schedule.patch_nums.len() {
        *state.scale_ms.lock().unwrap_or_else(|e| e.into_inner()) = hooks.scale_ms;
    }
    let g = match generated {
        Ok(g) => g,
        Err(RunError::Cancelled) => return jobs.iter().map(|j| Err(stopped(state, j))).collect(),
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
    let image_tokens: u64 =
        p.md.manifest
            .schedule
            .patch_nums
            .iter()
            .map(|s| (s * s) as u64)
            .sum();
    let mut k = 0;
    jobs.iter()
        .map(|j| {
            // Each image of a job has the job's prompt: its count is its first image's.
            let prompt_tokens = g.prompt_tokens.get(k).copied().unwrap_or(0) as u64;
            let images = (0..j.req.n)
                .map(|_| {
                    let (i, seed) = (k, seeds[k]);
                    k += 1;
                    let rgb = star_pipeline::image::to_rgb8(data, i, h, w);
                    let bytes = match j.req.output {
                        Output::Rgb => rgb,
                        Output::Png => {
                            let meta = star_pipeline::image::generation_meta(
                                &prompts[i],
                                &r.negative,
                                seed,
                                &gp,
                                p,
                            );
                            star_pipeline::image::png_bytes(&rgb, w, h, &meta)
                                .map_err(JobError::Failed)?
                        }
                    };
                    Ok(ImageOut { bytes, seed })
                })
                .collect::<Result<Vec<_>, JobError>>()?;
            Ok(Finished {
                images,
                prompt_tokens,
                image_tokens,
            })
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
