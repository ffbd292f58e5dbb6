//! `star-run serve`: one model loaded once behind an HTTP endpoint (axum/tokio).
//!
//! The model lives on one worker thread (its sessions and KV cache are not shared between
//! threads); HTTP handlers hand it jobs through a bounded queue, refused at once with 429 when
//! full. A job is checked for cancellation (client gone, deadline passed) before it starts and
//! between scales. Readiness follows warm-up (one generation) and turns 503 on SIGTERM/SIGINT,
//! after which in-flight requests get `--drain-s` to finish and the process exits 0. Requests
//! with the same sampling settings are batched into one model run at scale 0 (batch invariance
//! keeps each request's images byte-identical). Async jobs (`/star/v1/jobs`) and `stream: true`
//! report per-scale Server-Sent Events. Host memory is admitted, not hoped for: warm-up measures
//! what a generation adds per image; batches are cut to what the limit holds, and a request
//! fails alone when the system has not the memory it needs (`MemoryModel`).

// Handlers return a finished HTTP response early as their error: moved once per request, its
// size does not matter.
#![allow(clippy::result_large_err)]

use crate::pipeline::{GenParams, Hooks, Pipeline, RunError};
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use serde_json::{json, Value};
use star_engines::backend::BackendOptions;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub struct ServeOptions {
    pub model: PathBuf,
    pub backend: BackendOptions,
    pub host: String,
    pub port: u16,
    pub max_queue: usize,
    /// Most images per model run (requests batched at scale 0).
    pub max_batch: usize,
    /// How long a request waits for others to batch with.
    pub max_delay: Duration,
    /// Most images per request (`n`).
    pub max_images: usize,
    pub request_timeout: Duration,
    pub drain: Duration,
    /// The most resident memory the process may reach (`--max-memory`); None: 90% of the
    /// machine's or the container's limit.
    pub max_memory: Option<u64>,
}

/// What a request asks the model for, validated.
#[derive(Clone, Debug)]
struct GenRequest {
    prompt: String,
    negative: String,
    n: usize,
    seed: u64,
    cfg: Option<f64>,
    top_k: Option<usize>,
    top_p: Option<f64>,
    stable_sampling: bool,
}

type JobResult = Result<Vec<(Vec<u8>, u64)>, JobError>;

#[derive(Debug)]
enum JobError {
    Invalid(String),
    Cancelled,
    Timeout,
    Failed(String),
    /// The run would not fit in memory, or an allocation was refused.
    OutOfMemory(String),
}

/// Host memory: what a run of b images adds to the process, estimated as b × `per_image`, and
/// the limit it must stay under. `per_image` is measured at warm-up by a calibration
/// generation of `images` images (2, or 1 when the server never runs more) after the 1-image
/// warm-up, and raised whenever a run grows the process by more (`learn`).
///
/// The estimate holds because every run starts without what earlier runs used: the engine gives
/// its activations back when it ends (`BackendOptions::release_activations`), the KV cache is
/// given back after the last step (`Pipeline::kv_release_bytes` 0) and the heap's free pages
/// after each run (`memory::trim_heap`). Without them ONNX Runtime's arena and glibc kept what
/// earlier runs had used, and 7-image batches of the demo peaked at 184 MB after a first one at
/// 146 MB (benches/RESULTS.md). It is an estimate: with the kernel's overcommit an allocation
/// rarely fails, the kill comes when pages are touched, so what protects the process is the
/// estimate's margin (it errs high) and the 5% kept back.
#[derive(Clone, Copy, Debug)]
struct MemoryModel {
    images: usize,
    /// Resident size at rest, before the calibration.
    base: u64,
    /// Peak resident size during the calibration.
    peak: u64,
    /// What a run adds to the resident size per image, at most.
    per_image: u64,
    /// The highest resident size any run reached since warm-up (the calibration's included).
    highest: u64,
    /// The most the process may reach: `--max-memory`, else 90% of the machine's or container's.
    limit: u64,
}

impl MemoryModel {
    /// The limit less 5% for what is not a run's: HTTP buffers, queued requests and results,
    /// the allocator's fragmentation over many runs.
    fn usable(&self) -> u64 {
        self.limit - self.limit / 20
    }

    /// Estimated peak of a run of `images` starting from `resident` bytes.
    fn peak_of(&self, resident: u64, images: usize) -> u64 {
        resident.saturating_add((images as u64).saturating_mul(self.per_image))
    }

    /// Most images one run may hold under the limit from the resident size at rest (0: not
    /// even one): the largest `n` and batch the server accepts.
    fn fit(&self) -> usize {
        let room = self.usable().saturating_sub(self.base);
        (room / self.per_image.max(1)).min(1 << 20) as usize
    }

    /// Whether a run of `images` may start now from `resident` bytes: `soft` is the limit
    /// (a batch gives back requests until it holds), `hard` is what the system (the machine or
    /// the container) has available: a request that alone does not fit in that fails.
    fn admits(
        &self,
        resident: u64,
        images: usize,
        available: Option<u64>,
    ) -> (bool, Result<(), String>) {
        let soft = self.peak_of(resident, images) <= self.usable();
        let more = (images as u64).saturating_mul(self.per_image);
        let hard = match available {
            Some(avail) if more > avail => Err(format!(
                "out of memory: {images} images need about {} MB more, and the system has {} MB available now",
                more >> 20,
                avail >> 20
            )),
            _ => Ok(()),
        };
        (soft, hard)
    }

    /// A run of `images` grew the process from `before` to a peak of `peak`: where that is
    /// more than 5% over the estimate, raise `per_image` to cover it. Returns the old estimate
    /// when raised. Runs smaller than the calibration teach nothing: what a run costs besides
    /// its images (tokenizing, a PNG, a page here and there) weighs more per image in them,
    /// and the estimate would only ratchet up.
    fn learn(&mut self, images: usize, before: u64, peak: u64) -> Option<u64> {
        self.highest = self.highest.max(peak);
        if images < self.images {
            return None;
        }
        let grown = peak.saturating_sub(before);
        let per = grown.div_ceil(images.max(1) as u64);
        if per <= self.per_image + self.per_image / 20 {
            return None;
        }
        let old = self.per_image;
        self.per_image = per;
        Some(old)
    }
}

struct Job {
    req: GenRequest,
    reply: tokio::sync::oneshot::Sender<JobResult>,
    enqueued: Instant,
    deadline: Instant,
    /// Async jobs and streamed requests: status, cancellation and per-scale events.
    tracked: Option<Arc<Tracked>>,
}

/// A job the client can poll, cancel or follow (`/star/v1/jobs`, `stream: true`).
struct Tracked {
    id: String,
    seq: u64,
    cancel: AtomicBool,
    /// Events as JSON objects with an "event" field: status, scale, completed/failed/cancelled.
    events: tokio::sync::broadcast::Sender<Value>,
    state: Mutex<TrackedState>,
}

struct TrackedState {
    status: &'static str,
    /// The OpenAI response body (completed) or an error object (failed, cancelled).
    outcome: Option<Value>,
}

const TERMINAL: &[&str] = &["completed", "failed", "cancelled"];

/// A status event; a finished job's carries its result (completed) or error.
fn terminal_event(id: &str, status: &str, outcome: Option<Value>) -> Value {
    let mut ev = json!({"event": status, "id": id});
    if let Some(o) = outcome {
        ev[if status == "completed" {
            "result"
        } else {
            "error"
        }] = o;
    }
    ev
}

impl Tracked {
    fn lock(&self) -> std::sync::MutexGuard<'_, TrackedState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn status(&self) -> &'static str {
        self.lock().status
    }
    fn emit(&self, v: Value) {
        let _ = self.events.send(v);
    }
    fn set(&self, status: &'static str, outcome: Option<Value>) {
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

/// Prometheus histograms: cumulative buckets, sum, count.
#[derive(Clone, Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

const SECONDS_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0];

impl Histogram {
    fn observe(&mut self, buckets: &[f64], v: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; buckets.len()];
        }
        for (c, b) in self.counts.iter_mut().zip(buckets) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }
    fn render(&self, out: &mut String, name: &str, labels: &str, buckets: &[f64]) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in buckets.iter().enumerate() {
            let c = self.counts.get(i).copied().unwrap_or(0);
            out.push_str(&format!("{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}\n"));
        }
        out.push_str(&format!(
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}\n",
            self.count
        ));
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        out.push_str(&format!("{name}_sum{braces} {}\n", self.sum));
        out.push_str(&format!("{name}_count{braces} {}\n", self.count));
    }
}

#[derive(Default)]
struct Metrics {
    requests: BTreeMap<(String, u16), u64>,
    duration: Histogram,
    queue_wait: Histogram,
    batch: Histogram,
    scale: BTreeMap<usize, Histogram>,
    rejected: BTreeMap<String, u64>,
    cancelled: u64,
}

struct AppState {
    model_name: String,
    /// "WxH" of the model's images.
    size: String,
    manifest: star_engines::manifest::Manifest,
    queue: mpsc::SyncSender<Job>,
    queued: AtomicUsize,
    /// Requests in the model run now.
    running: AtomicUsize,
    ready: AtomicBool,
    draining: AtomicBool,
    metrics: Mutex<Metrics>,
    max_images: usize,
    request_timeout: Duration,
    jobs: Mutex<JobTable>,
    /// Set by the worker after calibration, before readiness; None where /proc cannot tell.
    memory: Mutex<Option<MemoryModel>>,
    /// Test aid: STAR_SERVE_SCALE_DELAY_MS=N sleeps N ms after each scale of a request (not the
    /// warm-up), so that tests can act on a request that is reliably running.
    scale_delay: Option<Duration>,
}

/// The async jobs (the newest `JOBS_KEPT` finished ones are kept for polling).
#[derive(Default)]
struct JobTable {
    next: u64,
    by_id: std::collections::HashMap<String, Arc<Tracked>>,
    order: std::collections::VecDeque<String>,
}

const JOBS_KEPT: usize = 1000;

impl AppState {
    fn table(&self) -> std::sync::MutexGuard<'_, JobTable> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn new_tracked(&self) -> Arc<Tracked> {
        let mut t = self.table();
        t.next += 1;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let id = format!("job-{:06}-{nanos:08x}", t.next);
        let (events, _) = tokio::sync::broadcast::channel(256);
        let tr = Arc::new(Tracked {
            id: id.clone(),
            seq: t.next,
            cancel: AtomicBool::new(false),
            events,
            state: Mutex::new(TrackedState {
                status: "queued",
                outcome: None,
            }),
        });
        t.by_id.insert(id.clone(), tr.clone());
        t.order.push_back(id);
        while t.order.len() > JOBS_KEPT {
            let Some(pos) = t.order.iter().position(|i| {
                t.by_id
                    .get(i)
                    .is_none_or(|j| TERMINAL.contains(&j.status()))
            }) else {
                break;
            };
            if let Some(old) = t.order.remove(pos) {
                t.by_id.remove(&old);
            }
        }
        tr
    }
    fn job(&self, id: &str) -> Option<Arc<Tracked>> {
        self.table().by_id.get(id).cloned()
    }
    /// Jobs queued ahead of `tr`.
    fn position(&self, tr: &Tracked) -> usize {
        self.table()
            .by_id
            .values()
            .filter(|j| j.seq < tr.seq && j.status() == "queued")
            .count()
    }
    fn memory_model(&self) -> Option<MemoryModel> {
        *self.memory.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn metrics(&self) -> std::sync::MutexGuard<'_, Metrics> {
        self.metrics.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn count(&self, route: &str, status: StatusCode) {
        *self
            .metrics()
            .requests
            .entry((route.to_string(), status.as_u16()))
            .or_default() += 1;
    }
    fn reject(&self, reason: &str) {
        *self.metrics().rejected.entry(reason.into()).or_default() += 1;
    }
}

/// An error in OpenAI's shape.
fn error(status: StatusCode, kind: &str, message: String, param: Option<&str>) -> Response {
    let body = json!({
        "error": {"message": message, "type": kind, "param": param, "code": status.as_u16()}
    });
    (status, axum::Json(body)).into_response()
}

fn invalid(message: String, param: &str) -> Response {
    error(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_request_error",
        message,
        Some(param),
    )
}

/// A refused field: (message, param).
struct FieldError(String, String);

fn fe(message: String, param: &str) -> FieldError {
    FieldError(message, param.to_string())
}

/// An optional field: absent or null is None; a value `get` cannot read is refused.
fn optional<T>(
    obj: &serde_json::Map<String, Value>,
    k: &str,
    get: impl Fn(&Value) -> Option<T>,
    what: &str,
) -> Result<Option<T>, FieldError> {
    match obj.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => get(v)
            .map(Some)
            .ok_or_else(|| fe(format!("{k} must be {what}"), k)),
    }
}

/// The OpenAI images request plus STAR's fields, checked field by field (422 naming the field).
fn parse_request(state: &AppState, body: &[u8]) -> Result<(GenRequest, bool), FieldError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| fe(format!("the body is not JSON: {e}"), "body"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| fe("the body must be a JSON object".into(), "body"))?;
    const KNOWN: &[&str] = &[
        "prompt",
        "n",
        "size",
        "response_format",
        "output_format",
        "model",
        "user",
        "seed",
        "negative_prompt",
        "cfg_scale",
        "top_k",
        "top_p",
        "stable_sampling",
        "stream",
    ];
    if let Some(k) = obj.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(fe(format!("unknown field '{k}'"), k));
    }
    let prompt = match obj.get("prompt") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(Value::String(_)) => return Err(fe("prompt is empty".into(), "prompt")),
        Some(_) => return Err(fe("prompt must be a string".into(), "prompt")),
        None => return Err(fe("prompt is required".into(), "prompt")),
    };
    let uint = |k: &str| optional(obj, k, Value::as_u64, "a non-negative integer");
    let n = uint("n")?.unwrap_or(1) as usize;
    if n == 0 || n > state.max_images {
        return Err(fe(
            format!("n must be between 1 and {}", state.max_images),
            "n",
        ));
    }
    if let Some(m) = state.memory_model() {
        // At least one image: the warm-up showed that one fits, and what the system has left is
        // checked before every run anyway.
        if n > m.fit().max(1) {
            return Err(fe(
                format!(
                    "n={n} needs about {} MB of memory, over the {} MB this server gives runs (95% of its limit): at most {} images per request here",
                    m.peak_of(m.base, n) >> 20,
                    m.usable() >> 20,
                    m.fit().max(1)
                ),
                "n",
            ));
        }
    }
    if let Some(s) = obj.get("size") {
        if s.as_str() != Some(state.size.as_str()) {
            return Err(fe(
                format!("size {s} is not supported: this model makes {}", state.size),
                "size",
            ));
        }
    }
    match obj.get("response_format").map(|v| v.as_str()) {
        None | Some(Some("b64_json")) => {}
        Some(Some("url")) => {
            return Err(fe(
                "response_format 'url' is not supported (no image storage): use b64_json".into(),
                "response_format",
            ))
        }
        Some(_) => {
            return Err(fe(
                "response_format must be 'b64_json'".into(),
                "response_format",
            ))
        }
    }
    match obj.get("output_format").map(|v| v.as_str()) {
        None | Some(Some("png")) => {}
        Some(_) => return Err(fe("output_format must be 'png'".into(), "output_format")),
    }
    if let Some(m) = obj.get("model") {
        if m.as_str() != Some(state.model_name.as_str()) {
            return Err(fe(
                format!(
                    "model {m} is not served here: this server serves '{}'",
                    state.model_name
                ),
                "model",
            ));
        }
    }
    let seed = uint("seed")?.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    });
    let negative = match obj.get("negative_prompt") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return Err(fe(
                "negative_prompt must be a string".into(),
                "negative_prompt",
            ))
        }
    };
    let num = |k: &str| optional(obj, k, Value::as_f64, "a number");
    let cfg = num("cfg_scale")?;
    if let Some(c) = cfg {
        crate::args::cfg(&c.to_string()).map_err(|e| fe(e, "cfg_scale"))?;
    }
    let top_p = num("top_p")?;
    if let Some(t) = top_p {
        crate::args::top_p(&t.to_string()).map_err(|e| fe(e, "top_p"))?;
    }
    let top_k = uint("top_k")?.map(|k| k as usize);
    if let Some(k) = top_k {
        if k > state.manifest.config.vocab {
            return Err(fe(
                format!(
                    "top_k {k} exceeds the model's vocabulary ({})",
                    state.manifest.config.vocab
                ),
                "top_k",
            ));
        }
    }
    let stream = optional(obj, "stream", Value::as_bool, "a boolean")?.unwrap_or(false);
    let stable_sampling = match obj.get("stable_sampling") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(fe(
                "stable_sampling must be a boolean".into(),
                "stable_sampling",
            ))
        }
    };
    Ok((
        GenRequest {
            prompt,
            negative,
            n,
            seed,
            cfg,
            top_k,
            top_p,
            stable_sampling,
        },
        stream,
    ))
}

async fn generations(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    const ROUTE: &str = "/v1/images/generations";
    let t = Instant::now();
    let resp = generate_response(&st, &body).await;
    st.count(ROUTE, resp.status());
    st.metrics()
        .duration
        .observe(SECONDS_BUCKETS, t.elapsed().as_secs_f64());
    resp
}

/// Draining or warming up: 503 before anything else.
fn admit(st: &AppState) -> Result<(), Response> {
    if st.draining.load(Ordering::SeqCst) {
        st.reject("draining");
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the server is shutting down".into(),
            None,
        ));
    }
    if !st.ready.load(Ordering::SeqCst) {
        st.reject("warming_up");
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the model is warming up; retry shortly".into(),
            None,
        ));
    }
    Ok(())
}

fn parse(st: &AppState, body: &[u8]) -> Result<(GenRequest, bool), Response> {
    match parse_request(st, body) {
        Ok(r) => Ok(r),
        Err(FieldError(message, param)) => {
            st.reject("invalid");
            Err(invalid(message, &param))
        }
    }
}

/// Queue a job the client can follow (poll, events, cancel); refused work leaves no job behind.
fn enqueue_tracked(st: &Arc<AppState>, req: GenRequest) -> Result<Arc<Tracked>, Response> {
    let tr = st.new_tracked();
    match enqueue(st, req, Some(tr.clone())) {
        Ok(rx) => {
            follow(st.clone(), tr.clone(), rx);
            Ok(tr)
        }
        Err(r) => {
            st.table().by_id.remove(&tr.id);
            Err(r)
        }
    }
}

/// Queue a job: its result arrives on the receiver; a full queue is 429 at once.
fn enqueue(
    st: &AppState,
    req: GenRequest,
    tracked: Option<Arc<Tracked>>,
) -> Result<tokio::sync::oneshot::Receiver<JobResult>, Response> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let now = Instant::now();
    let job = Job {
        req,
        reply: tx,
        enqueued: now,
        deadline: now + st.request_timeout,
        tracked,
    };
    st.queued.fetch_add(1, Ordering::SeqCst);
    match st.queue.try_send(job) {
        Ok(()) => Ok(rx),
        Err(e) => {
            st.queued.fetch_sub(1, Ordering::SeqCst);
            Err(match e {
                mpsc::TrySendError::Full(_) => {
                    st.reject("queue_full");
                    let mut r = error(
                        StatusCode::TOO_MANY_REQUESTS,
                        "rate_limit_error",
                        "the queue is full; retry later".into(),
                        None,
                    );
                    r.headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                    r
                }
                mpsc::TrySendError::Disconnected(_) => error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "the model worker has stopped".into(),
                    None,
                ),
            })
        }
    }
}

/// The OpenAI response body of finished images.
fn images_body(st: &AppState, images: &[(Vec<u8>, u64)]) -> Value {
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let data: Vec<Value> = images
        .iter()
        .map(|(png, seed)| {
            json!({"b64_json": base64::engine::general_purpose::STANDARD.encode(png), "seed": seed})
        })
        .collect();
    json!({"created": created, "data": data, "size": st.size, "output_format": "png"})
}

/// A job's failure as (HTTP status, OpenAI error type, message).
fn failure(st: &AppState, e: Option<JobError>) -> (StatusCode, &'static str, String) {
    match e {
        Some(JobError::Invalid(m)) => {
            (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request_error", m)
        }
        Some(JobError::Timeout) => (
            StatusCode::GATEWAY_TIMEOUT,
            "timeout_error",
            format!(
                "the request did not finish within --request-timeout-s ({} s)",
                st.request_timeout.as_secs()
            ),
        ),
        Some(JobError::Cancelled) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "cancelled",
            "the request was cancelled".into(),
        ),
        Some(JobError::Failed(m) | JobError::OutOfMemory(m)) => {
            (StatusCode::INTERNAL_SERVER_ERROR, "server_error", m)
        }
        None => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "the model worker stopped during the request".into(),
        ),
    }
}

async fn generate_response(st: &Arc<AppState>, body: &[u8]) -> Response {
    if let Err(r) = admit(st) {
        return r;
    }
    let (req, stream) = match parse(st, body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    if stream {
        return match enqueue_tracked(st, req) {
            Ok(tr) => events_response(tr, true),
            Err(r) => r,
        };
    }
    // Dropping `rx` (the client went away) tells the worker to skip or stop the job.
    let rx = match enqueue(st, req, None) {
        Ok(rx) => rx,
        Err(r) => return r,
    };
    match rx.await {
        Ok(Ok(images)) => axum::Json(images_body(st, &images)).into_response(),
        Ok(Err(e)) => {
            let (code, kind, m) = failure(st, Some(e));
            error(code, kind, m, None)
        }
        Err(_) => {
            let (code, kind, m) = failure(st, None);
            error(code, kind, m, None)
        }
    }
}

/// Record a tracked job's outcome when it arrives.
fn follow(st: Arc<AppState>, tr: Arc<Tracked>, rx: tokio::sync::oneshot::Receiver<JobResult>) {
    tokio::spawn(async move {
        match rx.await {
            Ok(Ok(images)) => tr.set("completed", Some(images_body(&st, &images))),
            Ok(Err(JobError::Cancelled)) => tr.set(
                "cancelled",
                Some(json!({"message": "the job was cancelled"})),
            ),
            other => {
                let (code, kind, m) = failure(&st, other.ok().and_then(|r| r.err()));
                tr.set(
                    "failed",
                    Some(json!({"message": m, "type": kind, "code": code.as_u16()})),
                );
            }
        }
    });
}

/// A job's events as Server-Sent Events, ending after its terminal event; `cancel_on_drop`: a
/// client that goes away cancels the job (the streamed OpenAI route).
fn events_response(tr: Arc<Tracked>, cancel_on_drop: bool) -> Response {
    use axum::response::sse::{Event, KeepAlive, Sse};
    struct Guard(Arc<Tracked>, bool);
    impl Drop for Guard {
        fn drop(&mut self) {
            if self.1 && !TERMINAL.contains(&self.0.status()) {
                self.0.cancel.store(true, Ordering::SeqCst);
            }
        }
    }
    let rx = tr.events.subscribe();
    // Subscribed first, then the snapshot: nothing between them is lost.
    let (status, outcome) = {
        let s = tr.lock();
        (s.status, s.outcome.clone())
    };
    let first = json!({"event": "status", "id": tr.id, "status": status});
    let done = TERMINAL.contains(&status);
    let last = done.then(|| terminal_event(&tr.id, status, outcome));
    let guard = Guard(tr, cancel_on_drop);
    let to_event = |v: &Value| -> Result<Event, std::convert::Infallible> {
        let kind = v["event"].as_str().unwrap_or("message").to_string();
        Ok(Event::default().event(kind).data(v.to_string()))
    };
    let stream = futures_util::stream::unfold(
        (Some(first), last, rx, done, guard),
        move |(first, last, mut rx, done, guard)| async move {
            if let Some(f) = first {
                return Some((to_event(&f), (None, last, rx, done, guard)));
            }
            if done {
                let l = last?;
                return Some((to_event(&l), (None, None, rx, true, guard)));
            }
            loop {
                match rx.recv().await {
                    Ok(v) => {
                        let end = v["event"].as_str().is_some_and(|e| TERMINAL.contains(&e));
                        return Some((to_event(&v), (None, None::<Value>, rx, end, guard)));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        },
    );
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
        .into_response()
}

fn job_view(st: &AppState, tr: &Tracked) -> Value {
    let s = tr.lock();
    let mut v = json!({"id": tr.id, "status": s.status, "poll_url": format!("/star/v1/jobs/{}", tr.id), "events_url": format!("/star/v1/jobs/{}/events", tr.id)});
    let (status, outcome) = (s.status, s.outcome.clone());
    drop(s);
    if status == "queued" {
        v["queue_position"] = json!(st.position(tr));
    }
    if let Some(o) = outcome {
        v[if status == "completed" {
            "result"
        } else {
            "error"
        }] = o;
    }
    v
}

fn no_job(id: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found_error",
        format!("no job '{id}' (finished jobs are kept for the newest {JOBS_KEPT})"),
        Some("id"),
    )
}

async fn create_job(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    const ROUTE: &str = "/star/v1/jobs";
    let resp = async {
        admit(&st)?;
        let (req, _) = parse(&st, &body)?;
        let tr = enqueue_tracked(&st, req)?;
        Ok((StatusCode::ACCEPTED, axum::Json(job_view(&st, &tr))).into_response())
    }
    .await
    .unwrap_or_else(|r: Response| r);
    st.count(ROUTE, resp.status());
    resp
}

async fn get_job(State(st): State<Arc<AppState>>, UrlPath(id): UrlPath<String>) -> Response {
    match st.job(&id) {
        Some(tr) => axum::Json(job_view(&st, &tr)).into_response(),
        None => no_job(&id),
    }
}

async fn cancel_job(State(st): State<Arc<AppState>>, UrlPath(id): UrlPath<String>) -> Response {
    match st.job(&id) {
        Some(tr) => {
            tr.cancel.store(true, Ordering::SeqCst);
            // A queued job is cancelled now (the worker skips it); a running one between scales.
            if tr.status() == "queued" {
                tr.set(
                    "cancelled",
                    Some(json!({"message": "the job was cancelled"})),
                );
            }
            axum::Json(job_view(&st, &tr)).into_response()
        }
        None => no_job(&id),
    }
}

async fn job_events(State(st): State<Arc<AppState>>, UrlPath(id): UrlPath<String>) -> Response {
    match st.job(&id) {
        Some(tr) => events_response(tr, false),
        None => no_job(&id),
    }
}

async fn models(State(st): State<Arc<AppState>>) -> Response {
    st.count("/v1/models", StatusCode::OK);
    axum::Json(json!({
        "object": "list",
        "data": [{"id": st.model_name, "object": "model", "created": 0, "owned_by": "star-deploy"}],
    }))
    .into_response()
}

async fn live() -> StatusCode {
    StatusCode::OK
}

async fn ready(State(st): State<Arc<AppState>>) -> Response {
    if st.ready.load(Ordering::SeqCst) && !st.draining.load(Ordering::SeqCst) {
        (StatusCode::OK, axum::Json(json!({"ready": true}))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"ready": false})),
        )
            .into_response()
    }
}

/// KServe v2 model metadata.
async fn model_metadata(
    State(st): State<Arc<AppState>>,
    UrlPath(name): UrlPath<String>,
) -> Response {
    if name != st.model_name {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"error": format!("model '{name}' is not served here (serving '{}')", st.model_name)})),
        )
            .into_response();
    }
    let m = &st.manifest;
    axum::Json(json!({
        "name": st.model_name,
        "versions": [m.model_hash],
        "platform": "star-deploy",
        "inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "image", "datatype": "BYTES", "shape": [-1], "parameters": {"content_type": "image/png", "size": st.size}}],
        "parameters": {"precision": m.precision, "schedule": m.schedule.patch_nums, "depth": m.config.depth},
    }))
    .into_response()
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let m = st.metrics();
    let mut s = String::new();
    s.push_str("# HELP star_requests_total Requests by route and HTTP status.\n# TYPE star_requests_total counter\n");
    for ((route, status), n) in &m.requests {
        s.push_str(&format!(
            "star_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}\n"
        ));
    }
    s.push_str("# HELP star_request_duration_seconds Image request latency.\n# TYPE star_request_duration_seconds histogram\n");
    m.duration
        .render(&mut s, "star_request_duration_seconds", "", SECONDS_BUCKETS);
    s.push_str(
        "# HELP star_queue_size Requests waiting for the model.\n# TYPE star_queue_size gauge\n",
    );
    s.push_str(&format!(
        "star_queue_size {}\n",
        st.queued.load(Ordering::SeqCst)
    ));
    s.push_str("# HELP star_queue_wait_seconds Time from enqueue to start.\n# TYPE star_queue_wait_seconds histogram\n");
    m.queue_wait
        .render(&mut s, "star_queue_wait_seconds", "", SECONDS_BUCKETS);
    s.push_str("# HELP star_batch_size Images per model run.\n# TYPE star_batch_size histogram\n");
    m.batch.render(&mut s, "star_batch_size", "", BATCH_BUCKETS);
    s.push_str("# HELP star_scale_step_duration_seconds Wall time of each scale.\n# TYPE star_scale_step_duration_seconds histogram\n");
    for (si, h) in &m.scale {
        h.render(
            &mut s,
            "star_scale_step_duration_seconds",
            &format!("scale=\"{si}\""),
            SECONDS_BUCKETS,
        );
    }
    s.push_str("# HELP star_requests_rejected_total Requests refused before running.\n# TYPE star_requests_rejected_total counter\n");
    for (reason, n) in &m.rejected {
        s.push_str(&format!(
            "star_requests_rejected_total{{reason=\"{reason}\"}} {n}\n"
        ));
    }
    s.push_str("# HELP star_requests_cancelled_total Requests stopped by their client or deadline.\n# TYPE star_requests_cancelled_total counter\n");
    s.push_str(&format!("star_requests_cancelled_total {}\n", m.cancelled));
    if let Some(mm) = st.memory_model() {
        let resident = crate::memory::resident().map_or(0, |r| r.now);
        for (name, help, v) in [
            (
                "star_memory_limit_bytes",
                "The most resident memory the server admits runs up to.",
                mm.limit,
            ),
            (
                "star_memory_resident_bytes",
                "The process's resident memory now.",
                resident,
            ),
            (
                "star_memory_base_bytes",
                "Resident memory at rest after the warm-up calibration.",
                mm.base,
            ),
            (
                "star_memory_calibration_peak_bytes",
                "Peak resident memory of the warm-up calibration run.",
                mm.peak,
            ),
            (
                "star_memory_peak_bytes",
                "Highest resident memory of any run since warm-up.",
                mm.highest,
            ),
            (
                "star_memory_calibration_images",
                "Images in the warm-up calibration run.",
                mm.images as u64,
            ),
            (
                "star_memory_image_bytes",
                "Estimated growth of a run per image (calibration, raised by runs that grew more).",
                mm.per_image,
            ),
            (
                "star_memory_images_fit",
                "Most images one run may hold under the limit.",
                mm.fit() as u64,
            ),
        ] {
            s.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}\n"
            ));
        }
    }
    s.push_str("# HELP star_model_ready Whether the model serves requests.\n# TYPE star_model_ready gauge\n");
    let ready = st.ready.load(Ordering::SeqCst) && !st.draining.load(Ordering::SeqCst);
    s.push_str(&format!("star_model_ready {}\n", ready as u8));
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    (StatusCode::OK, headers, s).into_response()
}

/// A batch's hooks: cancellation (every request in it gone or past its deadline) and
/// per-scale metrics.
struct BatchHooks<'a> {
    jobs: &'a [Job],
    state: &'a AppState,
}

fn abandoned(j: &Job) -> bool {
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

/// Requests that can share one model run: the same sampling settings and negative prompt (the
/// prompts and seeds are per image).
fn compatible(a: &GenRequest, b: &GenRequest) -> bool {
    a.negative == b.negative
        && a.cfg == b.cfg
        && a.top_k == b.top_k
        && a.top_p == b.top_p
        && a.stable_sampling == b.stable_sampling
}

/// One model run for every job of a batch; images are split back per job. Batch invariance makes
/// each request's images byte-identical to a run of it alone.
fn run_batch(p: &mut Pipeline, state: &AppState, jobs: &[Job]) -> Vec<JobResult> {
    let r = &jobs[0].req;
    let d = GenParams::defaults(p, r.seed);
    let mut prompts = vec![];
    let mut seeds = vec![];
    for j in jobs {
        for i in 0..j.req.n {
            prompts.push(j.req.prompt.clone());
            seeds.push(crate::rng::image_seed(j.req.seed, i));
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
                    let rgb = crate::image::to_rgb8(data, i, h, w);
                    let meta =
                        crate::image::generation_meta(&prompts[i], &r.negative, seed, &gp, p);
                    crate::image::png_bytes(&rgb, w, h, &meta)
                        .map(|png| (png, seed))
                        .map_err(JobError::Failed)
                })
                .collect()
        })
        .collect()
}

/// Run a batch; if it fails as a whole (not cancelled), run each request alone, so that one
/// request's failure (a panic included) fails that request only.
fn run_isolated(p: &mut Pipeline, state: &AppState, jobs: &[Job]) -> Vec<JobResult> {
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

/// The model's worker: takes jobs until every sender is gone; a job waits up to `max_delay`
/// for compatible ones to share its run, up to `max_batch` images.
fn worker(
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
    let gp = GenParams::defaults(&p, 0);
    if let Err(e) = p.generate(
        &["warm-up".to_string()],
        "",
        &gp,
        &mut crate::pipeline::NoHooks,
    ) {
        eprintln!("error: warm-up generation failed: {e}");
        std::process::exit(2);
    }
    let most = state.max_images.max(max_batch);
    match calibrate(&mut p, most.min(2), max_memory) {
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
            *state.memory.lock().unwrap_or_else(|e| e.into_inner()) = Some(m);
        }
        Ok(None) => eprintln!(
            "memory: this system does not report the process's memory or its peak (/proc/self/status, /proc/self/clear_refs); runs are not admitted by memory"
        ),
        Err(e) => {
            eprintln!("error: calibration generation failed: {e}");
            std::process::exit(2);
        }
    }
    state.ready.store(true, Ordering::SeqCst);
    eprintln!("ready");
    let mut held: std::collections::VecDeque<Job> = Default::default();
    let take = |j: Job, state: &AppState| -> Option<Job> {
        state.queued.fetch_sub(1, Ordering::SeqCst);
        state
            .metrics()
            .queue_wait
            .observe(SECONDS_BUCKETS, j.enqueued.elapsed().as_secs_f64());
        if abandoned(&j) {
            state.metrics().cancelled += 1;
            let timed_out = Instant::now() > j.deadline;
            let _ = j.reply.send(Err(if timed_out {
                JobError::Timeout
            } else {
                JobError::Cancelled
            }));
            None
        } else {
            Some(j)
        }
    };
    loop {
        let first = match held.pop_front() {
            Some(j) => j,
            None => match jobs.recv() {
                Ok(j) => match take(j, &state) {
                    Some(j) => j,
                    None => continue,
                },
                Err(_) => return,
            },
        };
        // Batches never exceed what memory admits (which runs may lower, see `learn`).
        let max_batch = state
            .memory_model()
            .map_or(max_batch, |m| max_batch.min(m.fit()).max(1));
        let mut batch = vec![first];
        let mut images = batch[0].req.n;
        // Compatible requests already held back, then whatever arrives within max_delay.
        let mut i = 0;
        while i < held.len() && images < max_batch {
            if compatible(&held[i].req, &batch[0].req) && images + held[i].req.n <= max_batch {
                images += held[i].req.n;
                batch.extend(held.remove(i));
            } else {
                i += 1;
            }
        }
        let until = Instant::now() + max_delay;
        while images < max_batch {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match jobs.recv_timeout(left) {
                Ok(j) => {
                    let Some(j) = take(j, &state) else { continue };
                    if compatible(&j.req, &batch[0].req) && images + j.req.n <= max_batch {
                        images += j.req.n;
                        batch.push(j);
                    } else {
                        held.push_back(j);
                    }
                }
                Err(_) => break,
            }
        }
        // From the resident size now: the batch gives back its last requests until it fits
        // the limit; a request that alone does not fit in what the system has left fails.
        let model = state.memory_model();
        if let Some(m) = model {
            let resident = crate::memory::resident().map_or(m.base, |r| r.now);
            let available = crate::memory::available();
            while batch.len() > 1 {
                let (soft, hard) = m.admits(resident, images, available);
                if soft && hard.is_ok() {
                    break;
                }
                if let Some(j) = batch.pop() {
                    images -= j.req.n;
                    // Back in arrival order, not ahead of older held requests.
                    let at = held.partition_point(|h| h.enqueued <= j.enqueued);
                    held.insert(at, j);
                }
            }
            if let (_, Err(why)) = m.admits(resident, images, available) {
                eprintln!("request failed: {why}");
                for j in batch {
                    let _ = j.reply.send(Err(JobError::OutOfMemory(why.clone())));
                }
                continue;
            }
        }
        for t in batch.iter().filter_map(|j| j.tracked.as_ref()) {
            t.set("running", None);
        }
        state.running.store(batch.len(), Ordering::SeqCst);
        // The peak is restarted from the resident size now: a run that does not grow the
        // process past it (the allocator keeps what earlier runs freed) teaches nothing.
        let before = if model.is_some() && crate::memory::reset_peak() {
            crate::memory::resident()
        } else {
            None
        };
        let results = run_isolated(&mut p, &state, &batch);
        let after = crate::memory::resident();
        crate::memory::trim_heap();
        if let (Some(b), Some(r)) = (before, after) {
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
        for (j, r) in batch.into_iter().zip(results) {
            if matches!(r, Err(JobError::Cancelled | JobError::Timeout)) {
                state.metrics().cancelled += 1;
            }
            let _ = j.reply.send(r);
        }
        state.running.store(0, Ordering::SeqCst);
    }
}

/// Measure what a generation of `images` images adds to the resident memory (see `MemoryModel`).
/// None where /proc does not say.
fn calibrate(
    p: &mut Pipeline,
    images: usize,
    max_memory: Option<u64>,
) -> Result<Option<MemoryModel>, RunError> {
    let Some(limit) = max_memory.or_else(|| crate::memory::limit().map(|l| l / 10 * 9)) else {
        return Ok(None);
    };
    crate::memory::trim_heap();
    let Some(before) = crate::memory::resident() else {
        return Ok(None);
    };
    // Without a reset the peak would be the warm-up's, session creation included.
    if !crate::memory::reset_peak() {
        return Ok(None);
    }
    let prompts = vec!["calibration".to_string(); images];
    let gp = GenParams::defaults(p, 0);
    p.generate(&prompts, "", &gp, &mut crate::pipeline::NoHooks)?;
    let Some(after) = crate::memory::resident() else {
        return Ok(None);
    };
    crate::memory::trim_heap();
    let rest = crate::memory::resident().map_or(after.now, |r| r.now);
    let peak = after.peak.max(before.now);
    Ok(Some(MemoryModel {
        images,
        base: rest.max(before.now),
        peak,
        per_image: ((peak - before.now) / images as u64).max(1),
        highest: peak,
        limit,
    }))
}

/// Open the model (errors here are the caller's, before anything listens), bind, serve until
/// SIGTERM/SIGINT, drain.
pub fn serve(o: ServeOptions) -> anyhow::Result<()> {
    // The model lives on its own thread from the start (its engine is not Send): it opens the
    // directory, reports the manifest (or the error, before anything listens), receives the
    // shared state, warms up and takes jobs.
    let (opened_tx, opened_rx) =
        mpsc::channel::<Result<star_engines::manifest::Manifest, String>>();
    let (state_tx, state_rx) = mpsc::channel::<(Arc<AppState>, mpsc::Receiver<Job>)>();
    let (model, mut backend) = (o.model.clone(), o.backend.clone());
    // Memory admission needs a run's peak to depend on its batch only (see MemoryModel).
    backend.release_activations = true;
    let (max_batch, max_delay, max_memory) = (o.max_batch, o.max_delay, o.max_memory);
    std::thread::Builder::new()
        .name("star-model".into())
        .spawn(move || {
            let p = match Pipeline::open(&model, backend) {
                Ok(p) => p,
                Err(e) => {
                    let _ = opened_tx.send(Err(e.to_string()));
                    return;
                }
            };
            let _ = opened_tx.send(Ok(p.md.manifest.clone()));
            if let Ok((state, jobs)) = state_rx.recv() {
                worker(p, state, jobs, max_batch, max_delay, max_memory);
            }
        })?;
    let manifest = opened_rx
        .recv()
        .map_err(|_| anyhow::anyhow!("the model thread stopped while opening the model"))?
        .map_err(anyhow::Error::msg)?;
    let size = format!("{0}x{0}", manifest.schedule.image_size);
    let model_name = format!("star-{}", manifest.model_hash);
    let (tx, rx) = mpsc::sync_channel::<Job>(o.max_queue);
    let state = Arc::new(AppState {
        model_name,
        size,
        manifest,
        queue: tx,
        queued: AtomicUsize::new(0),
        running: AtomicUsize::new(0),
        ready: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        metrics: Mutex::new(Metrics::default()),
        max_images: o.max_images,
        request_timeout: o.request_timeout,
        jobs: Mutex::new(JobTable::default()),
        memory: Mutex::new(None),
        scale_delay: std::env::var("STAR_SERVE_SCALE_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((o.host.as_str(), o.port))
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}:{}: {e}", o.host, o.port))?;
        let addr = listener.local_addr()?;
        // Warm-up starts once the port is bound (health answers meanwhile, readiness 503).
        state_tx
            .send((state.clone(), rx))
            .map_err(|_| anyhow::anyhow!("the model thread stopped before serving"))?;
        println!(
            "listening on http://{addr} (model {}, warming up)",
            state.model_name
        );
        let app = Router::new()
            .route("/v1/images/generations", post(generations))
            .route("/v1/models", get(models))
            .route("/health", get(live))
            .route("/ready", get(ready))
            .route("/v2/health/live", get(live))
            .route("/v2/health/ready", get(ready))
            .route("/v2/models/{name}", get(model_metadata))
            .route("/metrics", get(metrics))
            .route("/star/v1/jobs", post(create_job))
            .route("/star/v1/jobs/{id}", get(get_job))
            .route("/star/v1/jobs/{id}/cancel", post(cancel_job))
            .route("/star/v1/jobs/{id}/events", get(job_events))
            .with_state(state.clone());
        let st = state.clone();
        let drain = o.drain;
        // On SIGTERM/SIGINT: readiness 503 and new work refused while the server still
        // answers; the queued and running work gets up to --drain-s; then the listener closes
        // (open connections finish writing their responses).
        let shutdown = async move {
            shutdown_signal().await;
            st.draining.store(true, Ordering::SeqCst);
            eprintln!(
                "draining: readiness 503, finishing in-flight requests (at most {} s)",
                drain.as_secs()
            );
            let t = Instant::now();
            while st.queued.load(Ordering::SeqCst) + st.running.load(Ordering::SeqCst) > 0 {
                if t.elapsed() >= drain {
                    eprintln!("drain: in-flight requests did not finish within --drain-s; exiting");
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Responses of finished work still being written.
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let server = axum::serve(listener, app).with_graceful_shutdown(shutdown);
        server.await?;
        eprintln!("stopped");
        anyhow::Ok(())
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}

#[cfg(test)]
mod tests {
    use super::MemoryModel;

    #[test]
    fn memory_model_admits_under_the_limit_and_learns() {
        let m = MemoryModel {
            images: 2,
            base: 100,
            peak: 120,
            per_image: 10,
            highest: 120,
            limit: 200,
        };
        assert_eq!(m.usable(), 190);
        assert_eq!(m.peak_of(100, 8), 180);
        assert_eq!(m.fit(), 9);
        assert_eq!(MemoryModel { limit: 105, ..m }.fit(), 0);
        assert_eq!(MemoryModel { limit: 116, ..m }.fit(), 1);
        // Over the limit from a higher resident size: the batch must shrink; the system still
        // has room, so one request alone would run.
        let (soft, hard) = m.admits(150, 5, Some(1000));
        assert!(!soft && hard.is_ok());
        assert!(m.admits(100, 9, None).0);
        // What the system has left is the hard line.
        assert!(m.admits(100, 2, Some(15)).1.is_err());
        assert!(m.admits(100, 1, Some(15)).1.is_ok());
        // A run that grew more than 5% over the estimate raises it; one within that, or smaller
        // than the calibration, changes nothing (but its peak is kept).
        let mut l = m;
        assert_eq!(l.learn(8, 100, 170), None);
        assert_eq!(l.learn(8, 100, 180), None);
        assert_eq!(l.learn(8, 100, 196), Some(10));
        assert_eq!((l.per_image, l.fit()), (12, 7));
        assert_eq!(l.learn(1, 100, 160), None);
        assert_eq!((l.per_image, l.highest), (12, 196));
    }
}
