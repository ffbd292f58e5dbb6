//! What the HTTP side hands the model worker, and the jobs a client follows (`/star/v1/jobs`,
//! `stream: true`): status, cancellation and per-scale events.

use crate::request::GenRequest;
use serde_json::{json, Value};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub(crate) type JobResult = Result<Vec<(Vec<u8>, u64)>, JobError>;

#[derive(Debug)]
pub(crate) enum JobError {
    Invalid(String),
    Cancelled,
    Timeout,
    Failed(String),
    /// The run would not fit in memory, or an allocation was refused.
    OutOfMemory(String),
}

pub(crate) struct Job {
    pub(crate) req: GenRequest,
    pub(crate) reply: tokio::sync::oneshot::Sender<JobResult>,
    pub(crate) enqueued: Instant,
    pub(crate) deadline: Instant,
    /// Async jobs and streamed requests: status, cancellation and per-scale events.
    pub(crate) tracked: Option<Arc<Tracked>>,
}

/// A job the client can poll, cancel or follow (`/star/v1/jobs`, `stream: true`).
pub(crate) struct Tracked {
    pub(crate) id: String,
    pub(crate) seq: u64,
    pub(crate) cancel: AtomicBool,
    /// Events as JSON objects with an "event" field: status, scale, completed/failed/cancelled.
    pub(crate) events: tokio::sync::broadcast::Sender<Value>,
    pub(crate) state: Mutex<TrackedState>,
}

pub(crate) struct TrackedState {
    pub(crate) status: &'static str,
    /// The OpenAI response body (completed) or an error object (failed, cancelled).
    pub(crate) outcome: Option<Value>,
}

pub(crate) const TERMINAL: &[&str] = &["completed", "failed", "cancelled"];

/// A status event; a finished job's carries its result (completed) or error.
pub(crate) fn terminal_event(id: &str, status: &str, outcome: Option<Value>) -> Value {
    let mut ev = json!({"event": status, "id": id});
    put_outcome(&mut ev, status, outcome);
    ev
}

/// A finished job's outcome in a JSON object: `result` when completed, `error` otherwise.
pub(crate) fn put_outcome(v: &mut Value, status: &str, outcome: Option<Value>) {
    if let Some(o) = outcome {
        v[if status == "completed" {
            "result"
        } else {
            "error"
        }] = o;
    }
}

impl Tracked {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, TrackedState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
    pub(crate) fn status(&self) -> &'static str {
        self.lock().status
    }
    pub(crate) fn emit(&self, v: Value) {
        let _ = self.events.send(v);
    }
    pub(crate) fn set(&self, status: &'static str, outcome: Option<Value>) {
        {
            let mut st = self.lock();
            if TERMINAL.contains(&st.status) {
                return;
            }
            st.status = status;
            st.outcome = outcome.clone();
        }
        self.emit(terminal_event(&self.id, status, outcome));
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
