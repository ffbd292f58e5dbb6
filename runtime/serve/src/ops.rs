//! Operations: liveness and readiness, Prometheus metrics, the OpenAPI document, and the
//! answer to a path no route serves.

use crate::api::Readiness;
use crate::errors::{ApiError, Protocol};
use crate::metrics::{BATCH_BUCKETS, SECONDS_BUCKETS};
use crate::state::AppState;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Liveness: the process answers.
#[utoipa::path(get, path = "/health", tag = "operations", responses((status = 200, description = "Alive")))]
pub(crate) async fn live() -> StatusCode {
    StatusCode::OK
}

/// Liveness (Open Inference Protocol).
#[utoipa::path(get, path = "/v2/health/live", tag = "kserve-v2", responses((status = 200, description = "Alive")))]
pub(crate) async fn v2_live() -> StatusCode {
    StatusCode::OK
}

fn readiness(st: &AppState) -> Response {
    let ready = st.ready.load(Ordering::SeqCst) && !st.draining.load(Ordering::SeqCst);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(Readiness { ready })).into_response()
}

/// Readiness: 200 once warmed up, 503 while warming up or draining.
#[utoipa::path(get, path = "/ready", tag = "operations",
    responses((status = 200, body = Readiness), (status = 503, body = Readiness)))]
pub(crate) async fn ready(State(st): State<Arc<AppState>>) -> Response {
    readiness(&st)
}

/// Readiness (Open Inference Protocol).
#[utoipa::path(get, path = "/v2/health/ready", tag = "kserve-v2",
    responses((status = 200, body = Readiness), (status = 503, body = Readiness)))]
pub(crate) async fn v2_ready(State(st): State<Arc<AppState>>) -> Response {
    readiness(&st)
}

/// A path no route serves: 404 in the protocol's shape, naming the method and path.
pub(crate) async fn fallback(method: Method, uri: Uri) -> Response {
    let proto = Protocol::of(uri.path());
    ApiError::not_found(format!("Invalid URL ({method} {})", uri.path())).into_response(proto)
}

/// Prometheus metrics (text format 0.0.4).
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain; version=0.0.4; charset=utf-8", body = String)))]
pub(crate) async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let m = st.metrics();
    let mut s = String::new();
    s.push_str("# HELP star_requests_total Requests by route and HTTP status.\n# TYPE star_requests_total counter\n");
    for ((route, status), n) in &m.requests {
        s.push_str(&format!(
            "star_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}\n"
        ));
    }
    s.push_str("# HELP star_request_duration_seconds Time to the response head by route and status class (a stream's events come after).\n# TYPE star_request_duration_seconds histogram\n");
    for ((route, class), h) in &m.duration {
        h.render(
            &mut s,
            "star_request_duration_seconds",
            &format!("route=\"{route}\",status_class=\"{class}\""),
            SECONDS_BUCKETS,
        );
    }
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
