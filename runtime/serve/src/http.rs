//! The HTTP routes: the OpenAI images API, async jobs with Server-Sent Events, KServe v2 health
//! and metadata, Prometheus metrics.

// Handlers return a finished HTTP response early as their error: moved once per request, its
// size does not matter.
#![allow(clippy::result_large_err)]

use crate::jobs::{
    put_outcome, terminal_event, Job, JobError, JobResult, Tracked, JOBS_KEPT, TERMINAL,
};
use crate::metrics::{BATCH_BUCKETS, SECONDS_BUCKETS};
use crate::request::{parse_request, FieldError, GenRequest};
use crate::state::AppState;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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

pub(crate) async fn generations(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
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
    match parse_request(&st.served(), body) {
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
    put_outcome(&mut v, status, outcome);
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

pub(crate) async fn create_job(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
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

pub(crate) async fn get_job(
    State(st): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    match st.job(&id) {
        Some(tr) => axum::Json(job_view(&st, &tr)).into_response(),
        None => no_job(&id),
    }
}

pub(crate) async fn cancel_job(
    State(st): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
) -> Response {
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

pub(crate) async fn job_events(
    State(st): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    match st.job(&id) {
        Some(tr) => events_response(tr, false),
        None => no_job(&id),
    }
}

pub(crate) async fn models(State(st): State<Arc<AppState>>) -> Response {
    st.count("/v1/models", StatusCode::OK);
    axum::Json(json!({
        "object": "list",
        "data": [{"id": st.model_name, "object": "model", "created": 0, "owned_by": "star-deploy"}],
    }))
    .into_response()
}

pub(crate) async fn live() -> StatusCode {
    StatusCode::OK
}

pub(crate) async fn ready(State(st): State<Arc<AppState>>) -> Response {
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
pub(crate) async fn model_metadata(
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

pub(crate) async fn metrics(State(st): State<Arc<AppState>>) -> Response {
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
        let resident = star_pipeline::memory::resident().map_or(0, |r| r.now);
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
