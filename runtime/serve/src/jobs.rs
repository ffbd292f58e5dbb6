//! What the HTTP side hands the model worker, and the jobs a client follows (`/star/v1/jobs`,
//! `stream: true`): status, progress, cancellation and numbered events that a subscriber
//! joining late (or reconnecting with `Last-Event-ID`) replays from the job's log.

use crate::api::{ImagesResponse, JobStatus, OpenAiErrorDetail, Progress};
use crate::request::GenRequest;
use serde_json::{json, Value};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A finished image: PNG bytes, or RGB8 (H, W, 3) for the Open Inference Protocol.
pub(crate) struct ImageOut {
    pub(crate) bytes: Vec<u8>,
    pub(crate) seed: u64,
}

/// A job's images and the tokens its run drew per image (OpenAI's `usage`).
pub(crate) struct Finished {
    pub(crate) images: Vec<ImageOut>,
    pub(crate) prompt_tokens: u64,
    pub(crate) image_tokens: u64,
}

pub(crate) type JobResult = Result<Finished, JobError>;

#[derive(Debug)]
pub(crate) enum JobError {
    Invalid(String),
    Cancelled,
    Timeout,
    /// The drain's deadline passed before the job finished.
    Draining,
    Failed(String),
    /// The run would not fit in memory, or an allocation was refused.
    OutOfMemory(String),
}

pub(crate) struct Job {
    pub(crate) req: GenRequest,
    pub(crate) reply: tokio::sync::oneshot::Sender<JobResult>,
    pub(crate) enqueued: Instant,
    pub(crate) deadline: Instant,
    /// Async jobs and streamed requests: status, cancellation and events.
    pub(crate) tracked: Option<Arc<Tracked>>,
}

/// An event's kind, its SSE `event:` name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EventKind {
    Status,
    Scale,
    PartialImage,
    Completed,
    Failed,
    Cancelled,
}

impl EventKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            EventKind::Status => "status",
            EventKind::Scale => "scale",
            EventKind::PartialImage => "partial_image",
            EventKind::Completed => "completed",
            EventKind::Failed => "failed",
            EventKind::Cancelled => "cancelled",
        }
    }
    fn of(status: JobStatus) -> EventKind {
        match status {
            JobStatus::Completed => EventKind::Completed,
            JobStatus::Failed => EventKind::Failed,
            JobStatus::Cancelled => EventKind::Cancelled,
            JobStatus::Queued | JobStatus::Running => EventKind::Status,
        }
    }
}

/// One event of a job: `id` counts from 1 per job (the SSE `id:`).
#[derive(Debug)]
pub(crate) struct Event {
    pub(crate) id: u64,
    pub(crate) kind: EventKind,
    /// The JSON data: `event`, the job's `id`, and the kind's fields.
    pub(crate) data: Value,
}

/// How a job ended.
#[derive(Clone)]
pub(crate) enum Outcome {
    Completed(ImagesResponse),
    Error(OpenAiErrorDetail),
}

/// A job the client can poll, cancel or follow (`/star/v1/jobs`, `stream: true`).
pub(crate) struct Tracked {
    pub(crate) id: String,
    pub(crate) seq: u64,
    pub(crate) created: Instant,
    pub(crate) cancel: AtomicBool,
    events: tokio::sync::broadcast::Sender<Arc<Event>>,
    state: Mutex<TrackedState>,
}

pub(crate) struct TrackedState {
    pub(crate) status: JobStatus,
    pub(crate) progress: Progress,
    pub(crate) outcome: Option<Outcome>,
    /// Every event so far, for late subscribers. A finished job keeps its status and scale
    /// events and its terminal one, not its previews (the result holds the image).
    log: Vec<Arc<Event>>,
    /// The last event id given.
    last_id: u64,
}

/// A subscription: the events after the one the subscriber saw, then the live ones.
pub(crate) struct Subscription {
    pub(crate) missed: Vec<Arc<Event>>,
    pub(crate) live: tokio::sync::broadcast::Receiver<Arc<Event>>,
    /// The job had ended when the subscription was made: `missed` ends with its last event.
    pub(crate) ended: bool,
}

impl Tracked {
    pub(crate) fn new(id: String, seq: u64, progress: Progress) -> Tracked {
        let (events, _) = tokio::sync::broadcast::channel(256);
        Tracked {
            id,
            seq,
            created: Instant::now(),
            cancel: AtomicBool::new(false),
            events,
            state: Mutex::new(TrackedState {
                status: JobStatus::Queued,
                progress,
                outcome: None,
                log: vec![],
                last_id: 0,
            }),
        }
    }
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, TrackedState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
    pub(crate) fn status(&self) -> JobStatus {
        self.lock().status
    }
    /// Log and broadcast an event (under the lock, so that a subscriber's replay and its live
    /// events neither overlap nor leave a gap).
    fn push(&self, st: &mut TrackedState, kind: EventKind, mut data: Value) {
        data["event"] = json!(kind.name());
        data["id"] = json!(self.id);
        st.last_id += 1;
        let ev = Arc::new(Event {
            id: st.last_id,
            kind,
            data,
        });
        st.log.push(ev.clone());
        let _ = self.events.send(ev);
    }
    /// A scale finished: progress and a `scale` event.
    pub(crate) fn scale_done(&self, si: usize, side: usize, ms: f64) {
        let mut st = self.lock();
        if st.status.terminal() {
            return;
        }
        st.progress.scale = si as u32 + 1;
        st.progress.tokens_done += (side * side) as u64;
        st.progress.elapsed_s = self.created.elapsed().as_secs_f64();
        let data = json!({"scale": si, "side": side, "tokens": side * side, "ms": ms, "progress": st.progress});
        self.push(&mut st, EventKind::Scale, data);
    }
    /// A progressive preview of the job's image `image` (PNG, base64).
    pub(crate) fn partial_image(&self, index: u32, image: usize, scale: usize, b64: String) {
        let mut st = self.lock();
        if st.status.terminal() {
            return;
        }
        let data =
            json!({"partial_image_index": index, "image": image, "scale": scale, "b64_json": b64});
        self.push(&mut st, EventKind::PartialImage, data);
    }
    /// A new status; a terminal one carries the outcome and is final (later ones are ignored).
    pub(crate) fn set(&self, status: JobStatus, outcome: Option<Outcome>) {
        let mut st = self.lock();
        if st.status.terminal() {
            return;
        }
        st.status = status;
        st.progress.elapsed_s = self.created.elapsed().as_secs_f64();
        let mut data = json!({"status": status.as_str(), "progress": st.progress});
        put_outcome(&mut data, outcome.as_ref());
        st.outcome = outcome;
        if status.terminal() {
            st.log.retain(|e| e.kind != EventKind::PartialImage);
        }
        self.push(&mut st, EventKind::of(status), data);
    }
    /// Events after `last_seen` (an SSE `Last-Event-ID`; 0: all), then the live ones.
    pub(crate) fn subscribe(&self, last_seen: u64) -> Subscription {
        let st = self.lock();
        Subscription {
            missed: st
                .log
                .iter()
                .filter(|e| e.id > last_seen)
                .cloned()
                .collect(),
            live: self.events.subscribe(),
            ended: st.status.terminal(),
        }
    }
    pub(crate) fn elapsed_progress(&self) -> Progress {
        let mut st = self.lock();
        if !st.status.terminal() {
            st.progress.elapsed_s = self.created.elapsed().as_secs_f64();
        }
        st.progress
    }
}

/// A finished job's outcome in a JSON object: `result` when completed, `error` otherwise.
pub(crate) fn put_outcome(v: &mut Value, outcome: Option<&Outcome>) {
    match outcome {
        Some(Outcome::Completed(r)) => v["result"] = json!(r),
        Some(Outcome::Error(e)) => v["error"] = json!(e),
        None => {}
    }
}

/// The async jobs (the newest `JOBS_KEPT` finished ones are kept for polling).
#[derive(Default)]
pub(crate) struct JobTable {
    pub(crate) next: u64,
    pub(crate) by_id: std::collections::HashMap<String, Arc<Tracked>>,
    pub(crate) order: std::collections::VecDeque<String>,
}

pub(crate) const JOBS_KEPT: usize = 1000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn late_subscribers_replay_what_they_missed_with_ids() {
        let t = Tracked::new("job-1".into(), 1, Progress::default());
        t.set(JobStatus::Running, None);
        t.scale_done(0, 1, 1.0);
        let early = t.subscribe(0);
        assert_eq!(
            early.missed.iter().map(|e| e.id).collect::<Vec<_>>(),
            vec![1, 2]
        );
        t.partial_image(0, 0, 0, "AAAA".into());
        t.scale_done(1, 2, 1.0);
        // Reconnecting after event 2: events 3 and 4 only.
        let again = t.subscribe(2);
        assert_eq!(
            again.missed.iter().map(|e| e.id).collect::<Vec<_>>(),
            vec![3, 4]
        );
        assert_eq!(again.missed[0].kind, EventKind::PartialImage);
        assert_eq!(t.lock().progress.tokens_done, 5);
        t.set(JobStatus::Cancelled, None);
        t.set(JobStatus::Completed, None);
        let late = t.subscribe(0);
        assert!(late.ended);
        let kinds: Vec<_> = late.missed.iter().map(|e| e.kind).collect();
        // Previews are dropped once the job ends; ids stay as they were sent.
        assert_eq!(
            kinds,
            vec![
                EventKind::Status,
                EventKind::Scale,
                EventKind::Scale,
                EventKind::Cancelled
            ]
        );
        assert_eq!(late.missed.last().unwrap().id, 5);
        assert_eq!(t.status(), JobStatus::Cancelled);
    }
}
