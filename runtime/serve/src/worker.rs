//! The model's worker thread: warm-up, memory calibration, then batches of jobs: formed
//! (`batching`), admitted by memory (`admission`), run (`run`), learnt from, answered.

use crate::admission::{calibrate, MemoryModel};
use crate::batching::{images_of, Batchable, Batcher, Recv};
use crate::jobs::{Job, JobError, JobResult};
use crate::metrics::SECONDS_BUCKETS;
use crate::run::{abandoned, run_isolated};
use crate::state::AppState;
use star_pipeline::memory;
use star_pipeline::pipeline::{GenParams, Pipeline};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

impl Batchable for Job {
    fn images(&self) -> usize {
        self.req.n
    }
    fn joins(&self, first: &Self) -> bool {
        self.req.batches_with(&first.req)
    }
    fn enqueued(&self) -> Instant {
        self.enqueued
    }
}

/// The model's worker: takes jobs until every sender is gone; a job waits up to `max_delay`
/// for compatible ones to share its run, up to `max_batch` images.
pub(crate) fn worker(
    mut p: Pipeline,
    state: Arc<AppState>,
    jobs: mpsc::Receiver<Job>,
    max_batch: usize,
    max_delay: Duration,
    max_memory: Option<u64>,
) {
    // Every run allocates its KV cache and gives it back after its last step: a run's peak is
    // then the same whatever ran before it (MemoryModel), and an idle server holds no cache.
    p.kv_release_bytes = 0;
    warm_up(&mut p, &state);
    let most = state.max_images.max(max_batch);
    if let Some(m) = measure_memory(&mut p, most.min(2), max_memory) {
        *state.memory.lock().unwrap_or_else(|e| e.into_inner()) = Some(m);
    }
    state.ready.store(true, Ordering::SeqCst);
    eprintln!("ready");
    let mut batcher = Batcher::new();
    loop {
        // Batches never exceed what memory admits (which runs may lower, see `learn`).
        let limit = state
            .memory_model()
            .map_or(max_batch, |m| max_batch.min(m.fit()).max(1));
        let Some(batch) = batcher.next(limit, max_delay, |wait| receive(&jobs, &state, wait))
        else {
            return;
        };
        if state.stopping() {
            for j in batch {
                let _ = j.reply.send(Err(JobError::Draining));
            }
            continue;
        }
        let Some(batch) = admit(&state, &mut batcher, batch) else {
            continue;
        };
        let results = run_and_learn(&mut p, &state, &batch);
        reply(&state, batch, results);
    }
}

/// One generation before readiness: sessions created, pages touched, each scale timed (where
/// previews go until a request's run times them again). A model that cannot generate never
/// becomes ready: the process exits with the error.
fn warm_up(p: &mut Pipeline, state: &AppState) {
    let gp = GenParams::defaults(p, 0);
    let mut times = star_pipeline::pipeline::ScaleTimes::default();
    if let Err(e) = p.generate(&["warm-up".to_string()], "", &gp, &mut times) {
        eprintln!("error: warm-up generation failed: {e}");
        std::process::exit(2);
    }
    *state.scale_ms.lock().unwrap_or_else(|e| e.into_inner()) = times.0;
}

/// The memory model from a calibration generation (see `MemoryModel`); None where the system
/// does not report the process's memory. A limit that cannot hold one image ends the process.
fn measure_memory(p: &mut Pipeline, images: usize, max_memory: Option<u64>) -> Option<MemoryModel> {
    match calibrate(p, images, max_memory) {
        Ok(Some(m)) => {
            eprintln!(
                "memory: {} MB at rest, {} MB at the calibration's peak ({} images): {:.1} MB per image; limit {} MB: at most {} images per run",
                m.base >> 20,
                m.peak >> 20,
                m.images,
                m.per_image as f64 / 1048576.0,
                m.limit >> 20,
                m.fit()
            );
            if m.fit() == 0 {
                eprintln!(
                    "error: one image needs about {} MB, over the memory limit of {} MB{}",
                    m.peak_of(m.base, 1) >> 20,
                    m.limit >> 20,
                    if max_memory.is_some() {
                        ": raise --max-memory"
                    } else {
                        ": give the machine or container more memory"
                    }
                );
                std::process::exit(2);
            }
            Some(m)
        }
        Ok(None) => {
            eprintln!(
                "memory: this system does not report the process's memory or its peak (/proc/self/status, /proc/self/clear_refs); runs are not admitted by memory"
            );
            None
        }
        Err(e) => {
            eprintln!("error: calibration generation failed: {e}");
            std::process::exit(2);
        }
    }
}

/// The next job from the queue, counted out of it; one its client left, or whose deadline
/// passed while it waited, is answered now and skipped.
fn receive(jobs: &mpsc::Receiver<Job>, state: &AppState, wait: Option<Duration>) -> Recv<Job> {
    let j = match wait {
        None => jobs.recv().map_err(|_| Recv::Closed),
        Some(d) => jobs.recv_timeout(d).map_err(|e| match e {
            mpsc::RecvTimeoutError::Timeout => Recv::Timeout,
            mpsc::RecvTimeoutError::Disconnected => Recv::Closed,
        }),
    };
    let j = match j {
        Ok(j) => j,
        Err(r) => return r,
    };
    state.queued.fetch_sub(1, Ordering::SeqCst);
    state
        .metrics()
        .queue_wait
        .observe(SECONDS_BUCKETS, j.enqueued.elapsed().as_secs_f64());
    if state.stopping() {
        // The drain's deadline passed: what is still queued is answered, not run.
        let _ = j.reply.send(Err(JobError::Draining));
        return Recv::Skipped;
    }
    if !abandoned(&j) {
        return Recv::Job(j);
    }
    state.metrics().cancelled += 1;
    let timed_out = Instant::now() > j.deadline;
    let _ = j.reply.send(Err(if timed_out {
        JobError::Timeout
    } else {
        JobError::Cancelled
    }));
    Recv::Skipped
}

/// From the resident size now: the batch gives back its last requests until it fits the
/// limit; a request that alone does not fit in what the system has left fails (None).
fn admit(state: &AppState, batcher: &mut Batcher<Job>, mut batch: Vec<Job>) -> Option<Vec<Job>> {
    let Some(m) = state.memory_model() else {
        return Some(batch);
    };
    let resident = memory::resident().map_or(m.base, |r| r.now);
    let available = memory::available();
    batcher.trim(&mut batch, |images| m.fits_now(resident, images, available));
    if let (_, Err(why)) = m.admits(resident, images_of(&batch), available) {
        eprintln!("request failed: {why}");
        for j in batch {
            let _ = j.reply.send(Err(JobError::OutOfMemory(why.clone())));
        }
        return None;
    }
    Some(batch)
}

/// Run a batch; where memory is admitted, learn from its peak (see `MemoryModel::learn`).
fn run_and_learn(p: &mut Pipeline, state: &AppState, batch: &[Job]) -> Vec<JobResult> {
    for t in batch.iter().filter_map(|j| j.tracked.as_ref()) {
        t.set(crate::api::JobStatus::Running, None);
    }
    state.running.store(batch.len(), Ordering::SeqCst);
    // The peak is restarted from the resident size now: a run that does not grow the process
    // past it (the allocator keeps what earlier runs freed) teaches nothing.
    let before = if state.memory_model().is_some() && memory::reset_peak() {
        memory::resident()
    } else {
        None
    };
    let results = run_isolated(p, state, batch);
    let after = memory::resident();
    memory::trim_heap();
    if let (Some(b), Some(r)) = (before, after) {
        let images = images_of(batch);
        let mut mm = state.memory.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = mm.as_mut() {
            if let Some(old) = m.learn(images, b.now, r.peak) {
                eprintln!(
                    "memory: a run of {images} images grew the process by {} MB, more than {images} x {:.1} MB: {:.1} MB per image from now on, at most {} images per run",
                    (r.peak - b.now) >> 20,
                    old as f64 / 1048576.0,
                    m.per_image as f64 / 1048576.0,
                    m.fit()
                );
            }
        }
    }
    results
}

/// Each job's result to its waiting handler.
fn reply(state: &AppState, batch: Vec<Job>, results: Vec<JobResult>) {
    for (j, r) in batch.into_iter().zip(results) {
        if matches!(r, Err(JobError::Cancelled | JobError::Timeout)) {
            state.metrics().cancelled += 1;
        }
        let _ = j.reply.send(r);
    }
    state.running.store(0, Ordering::SeqCst);
}
