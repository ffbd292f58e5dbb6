//! What the HTTP handlers and the model worker share.

use crate::admission::MemoryModel;
use crate::api::Progress;
use crate::jobs::{Job, JobTable, Tracked, JOBS_KEPT};
use crate::metrics::{Metrics, SECONDS_BUCKETS};
use axum::http::StatusCode;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The request body's limits.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BodyLimits {
    pub(crate) max_bytes: usize,
    /// From the end of the head to the body's last byte.
    pub(crate) timeout: Duration,
}

pub(crate) struct AppState {
    pub(crate) model_name: String,
    /// "WxH" of the model's images.
    pub(crate) size: String,
    pub(crate) manifest: star_artifact::manifest::Manifest,
    pub(crate) queue: mpsc::SyncSender<Job>,
    pub(crate) queued: AtomicUsize,
    /// Requests in the model run now.
    pub(crate) running: AtomicUsize,
    pub(crate) ready: AtomicBool,
    pub(crate) draining: AtomicBool,
    pub(crate) metrics: Mutex<Metrics>,
    pub(crate) max_images: usize,
    pub(crate) request_timeout: Duration,
    pub(crate) jobs: Mutex<JobTable>,
    /// Set by the worker after calibration, before readiness; None where /proc cannot tell.
    pub(crate) memory: Mutex<Option<MemoryModel>>,
    /// Test aid: STAR_SERVE_SCALE_DELAY_MS=N sleeps N ms after each scale of a request (not the
    /// warm-up), so that tests can act on a request that is reliably running.
    pub(crate) scale_delay: Option<Duration>,
    pub(crate) body_limits: BodyLimits,
    /// True once the drain's deadline has passed: waiting handlers answer 503 at once, the
    /// worker answers what is queued and stops the running batch at its next scale.
    pub(crate) stop: tokio::sync::watch::Sender<bool>,
    /// Each scale's wall time in the last run (previews are placed by it).
    pub(crate) scale_ms: Mutex<Vec<f64>>,
}

impl AppState {
    pub(crate) fn table(&self) -> std::sync::MutexGuard<'_, JobTable> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }
    pub(crate) fn new_tracked(&self) -> Arc<Tracked> {
        let mut t = self.table();
        t.next += 1;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let id = format!("job-{:06}-{nanos:08x}", t.next);
        let sides = &self.manifest.schedule.patch_nums;
        let progress = Progress {
            scales: sides.len() as u32,
            tokens_total: sides.iter().map(|s| (s * s) as u64).sum(),
            ..Progress::default()
        };
        let tr = Arc::new(Tracked::new(id.clone(), t.next, progress));
        t.by_id.insert(id.clone(), tr.clone());
        t.order.push_back(id);
        while t.order.len() > JOBS_KEPT {
            let Some(pos) = t
                .order
                .iter()
                .position(|i| t.by_id.get(i).is_none_or(|j| j.status().terminal()))
            else {
                break;
            };
            if let Some(old) = t.order.remove(pos) {
                t.by_id.remove(&old);
            }
        }
        tr
    }
    pub(crate) fn job(&self, id: &str) -> Option<Arc<Tracked>> {
        self.table().by_id.get(id).cloned()
    }
    /// Jobs queued ahead of `tr`.
    pub(crate) fn position(&self, tr: &Tracked) -> usize {
        self.table()
            .by_id
            .values()
            .filter(|j| j.seq < tr.seq && j.status() == crate::api::JobStatus::Queued)
            .count()
    }
    /// What a request is checked against.
    pub(crate) fn served(&self) -> crate::request::Served<'_> {
        crate::request::Served {
            model_name: &self.model_name,
            size: &self.size,
            vocab: self.manifest.config.vocab,
            max_images: self.max_images,
            memory: self.memory_model(),
        }
    }
    pub(crate) fn memory_model(&self) -> Option<MemoryModel> {
        *self.memory.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn metrics(&self) -> std::sync::MutexGuard<'_, Metrics> {
        self.metrics.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// A response: counted by route and status, timed by route and status class.
    pub(crate) fn observe(&self, route: &str, status: StatusCode, took: Duration) {
        let mut m = self.metrics();
        *m.requests
            .entry((route.to_string(), status.as_u16()))
            .or_default() += 1;
        let class = format!("{}xx", status.as_u16() / 100);
        m.duration
            .entry((route.to_string(), class))
            .or_default()
            .observe(SECONDS_BUCKETS, took.as_secs_f64());
    }
    pub(crate) fn stopping(&self) -> bool {
        *self.stop.borrow()
    }
    pub(crate) fn reject(&self, reason: &str) {
        *self.metrics().rejected.entry(reason.into()).or_default() += 1;
    }
}
