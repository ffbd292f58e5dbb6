//! STAR's async jobs: create, poll (with progress), cancel, and follow as Server-Sent Events
//! with ids (`Last-Event-ID` resumes; a late subscriber first gets what it missed).

use crate::api::{ImagesRequest, JobStatus, JobView, OpenAiError, SseEvent};
use crate::errors::ApiError;
use crate::jobs::{EventKind, Outcome, Tracked, JOBS_KEPT};
use crate::state::AppState;
use crate::submit::{admit, enqueue_tracked, parse};
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

fn view(st: &AppState, tr: &Tracked) -> JobView {
    let progress = tr.elapsed_progress();
    let (status, outcome) = {
        let s = tr.lock();
        (s.status, s.outcome.clone())
    };
    let (result, error) = match outcome {
        Some(Outcome::Completed(r)) => (Some(r), None),
        Some(Outcome::Error(e)) => (None, Some(e)),
        None => (None, None),
    };
    JobView {
        id: tr.id.clone(),
        status,
        poll_url: format!("/star/v1/jobs/{}", tr.id),
        events_url: format!("/star/v1/jobs/{}/events", tr.id),
        progress,
        queue_position: (status == JobStatus::Queued).then(|| st.position(tr) as u64),
        result,
        error,
    }
}

fn no_job(id: &str) -> Response {
    let mut e = ApiError::not_found(format!(
        "no job '{id}' (finished jobs are kept for the newest {JOBS_KEPT})"
    ));
    e.param = Some("id".into());
    e.openai()
}

/// Queue a generation as a job (the images request's fields; `stream` is ignored).
#[utoipa::path(post, path = "/star/v1/jobs", tag = "jobs",
    request_body(content = ImagesRequest, content_type = "application/json"),
    responses((status = 202, body = JobView), (status = 400, body = OpenAiError), (status = 413, body = OpenAiError),
        (status = 422, body = OpenAiError), (status = 429, body = OpenAiError), (status = 503, body = OpenAiError)))]
pub(crate) async fn create_job(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    let created = async {
        admit(&st)?;
        let (req, _) = parse(&st, &body)?;
        enqueue_tracked(&st, req)
    };
    match created.await {
        Ok(tr) => (StatusCode::ACCEPTED, axum::Json(view(&st, &tr))).into_response(),
        Err(e) => e.openai(),
    }
}

/// A job's status, progress and (when finished) result or error.
#[utoipa::path(get, path = "/star/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path)),
    responses((status = 200, body = JobView), (status = 404, body = OpenAiError)))]
pub(crate) async fn get_job(
    State(st): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    match st.job(&id) {
        Some(tr) => axum::Json(view(&st, &tr)).into_response(),
        None => no_job(&id),
    }
}

/// Cancel a job: a queued one now, a running one at its next scale.
#[utoipa::path(post, path = "/star/v1/jobs/{id}/cancel", tag = "jobs",
    params(("id" = String, Path)),
    responses((status = 200, body = JobView), (status = 404, body = OpenAiError)))]
pub(crate) async fn cancel_job(
    State(st): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    let Some(tr) = st.job(&id) else {
        return no_job(&id);
    };
    tr.cancel.store(true, Ordering::SeqCst);
    if tr.status() == JobStatus::Queued {
        let e = ApiError::server("the job was cancelled").code("cancelled");
        tr.set(JobStatus::Cancelled, Some(Outcome::Error(e.detail())));
    }
    axum::Json(view(&st, &tr)).into_response()
}

/// A job's events: `status`, `scale` (with progress), `partial_image`, then `completed`,
/// `failed` or `cancelled`. Each has an `id:`; `Last-Event-ID` replays from there.
#[utoipa::path(get, path = "/star/v1/jobs/{id}/events", tag = "jobs",
    params(("id" = String, Path), ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event")),
    responses((status = 200, description = "Server-Sent Events", content((SseEvent = "text/event-stream"))),
        (status = 404, body = OpenAiError)))]
pub(crate) async fn job_events(
    State(st): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    let Some(tr) = st.job(&id) else {
        return no_job(&id);
    };
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let sub = tr.subscribe(last);
    let missed: std::collections::VecDeque<_> = sub.missed.into();
    let ended = sub.ended;
    let stream = futures_util::stream::unfold(
        (missed, sub.live, ended, false),
        |(mut missed, mut live, ended, done)| async move {
            if done {
                return None;
            }
            let ev = match missed.pop_front() {
                Some(e) => e,
                // Everything of an ended job was in the log.
                None if ended => return None,
                None => loop {
                    match live.recv().await {
                        Ok(e) => break e,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                    }
                },
            };
            let end = matches!(
                ev.kind,
                EventKind::Completed | EventKind::Failed | EventKind::Cancelled
            );
            let out = Event::default()
                .id(ev.id.to_string())
                .event(ev.kind.name())
                .data(ev.data.to_string());
            Some((Ok::<_, Infallible>(out), (missed, live, ended, end)))
        },
    );
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
        .into_response()
}
