//! OpenAI's images API as its official SDK speaks it: `POST /v1/images/generations` (with
//! `stream: true`, `image_generation.partial_image` events then one
//! `image_generation.completed`), `GET /v1/models` and `GET /v1/models/{id}`.

use crate::api::{
    CompletedEvent, ImageEvent, ImagesRequest, ImagesResponse, Model, ModelList, OpenAiError,
    PartialImageEvent, SseEvent,
};
use crate::errors::ApiError;
use crate::jobs::{EventKind, Outcome, Tracked};
use crate::state::AppState;
use crate::submit::{admit, enqueue, enqueue_tracked, now_s, parse, wait};
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Generate images.
#[utoipa::path(post, path = "/v1/images/generations", tag = "openai",
    request_body(content = ImagesRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The images; with `stream: true`, Server-Sent Events whose data are `PartialImageEvent`s then one `CompletedEvent` (or an `error`)",
            content((ImagesResponse = "application/json"), (SseEvent = "text/event-stream"))),
        (status = 400, description = "The body is not JSON", body = OpenAiError),
        (status = 408, description = "The body did not arrive in time", body = OpenAiError),
        (status = 413, description = "The body is over the limit", body = OpenAiError),
        (status = 422, description = "A field is refused (`error.param` names it)", body = OpenAiError),
        (status = 429, description = "The queue is full", body = OpenAiError),
        (status = 500, description = "The generation failed", body = OpenAiError),
        (status = 503, description = "Warming up or shutting down", body = OpenAiError),
        (status = 504, description = "Past --request-timeout-s", body = OpenAiError),
    ))]
pub(crate) async fn generations(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    generate(&st, &body).await.unwrap_or_else(ApiError::openai)
}

async fn generate(st: &Arc<AppState>, body: &[u8]) -> Result<Response, ApiError> {
    admit(st)?;
    let (req, stream) = parse(st, body)?;
    if stream {
        let tr = enqueue_tracked(st, req)?;
        return Ok(stream_response(st.clone(), tr));
    }
    // Dropping the receiver (the client went away) tells the worker to skip or stop the job.
    let rx = enqueue(st, req, None)?;
    let finished = wait(st, rx).await?;
    Ok(axum::Json(crate::submit::images_response(st, &finished)).into_response())
}

/// An image event's common fields.
fn image_event(st: &AppState, kind: &str, b64_json: String) -> ImageEvent {
    ImageEvent {
        kind: kind.into(),
        b64_json,
        created_at: now_s(),
        size: st.size.clone(),
        quality: "auto".into(),
        background: "opaque".into(),
        output_format: "png".into(),
    }
}

/// A job's events as OpenAI's: previews, then the completed image or an error. No `id:` lines:
/// OpenAI sends none, and the official SDK reads the keep-alive comments that follow an `id:`
/// as empty events (it fails on them); the jobs API's own events carry ids.
fn openai_event(
    st: &AppState,
    kind: EventKind,
    data: &Value,
    outcome: Option<Outcome>,
) -> Option<Event> {
    let ev = |name: &str, v: Value| Some(Event::default().event(name).data(v.to_string()));
    match (kind, outcome) {
        (EventKind::PartialImage, _) => {
            const KIND: &str = "image_generation.partial_image";
            let b64 = data["b64_json"].as_str().unwrap_or_default().to_string();
            let e = PartialImageEvent {
                image: image_event(st, KIND, b64),
                partial_image_index: data["partial_image_index"].as_u64().unwrap_or(0) as u32,
            };
            ev(KIND, json!(e))
        }
        (EventKind::Completed, Some(Outcome::Completed(r))) => {
            const KIND: &str = "image_generation.completed";
            let b64 = r
                .data
                .first()
                .map(|d| d.b64_json.clone())
                .unwrap_or_default();
            let e = CompletedEvent {
                image: image_event(st, KIND, b64),
                usage: r.usage,
            };
            ev(KIND, json!(e))
        }
        (EventKind::Failed | EventKind::Cancelled, Some(Outcome::Error(e))) => {
            // The SDK raises an APIError for data with an "error" object.
            ev("error", json!({"type": "error", "error": e}))
        }
        _ => None,
    }
}

/// `stream: true`: the job's OpenAI events; a client that goes away cancels the job.
fn stream_response(st: Arc<AppState>, tr: Arc<Tracked>) -> Response {
    struct CancelOnDrop(Arc<Tracked>);
    impl Drop for CancelOnDrop {
        fn drop(&mut self) {
            if !self.0.status().terminal() {
                self.0.cancel.store(true, Ordering::SeqCst);
            }
        }
    }
    let sub = tr.subscribe(0);
    let guard = CancelOnDrop(tr);
    let missed: std::collections::VecDeque<_> = sub.missed.into();
    let stream = futures_util::stream::unfold(
        (missed, sub.live, false, guard, st),
        |(mut missed, mut live, done, guard, st)| async move {
            loop {
                if done {
                    return None;
                }
                let ev = match missed.pop_front() {
                    Some(e) => e,
                    None => match live.recv().await {
                        Ok(e) => e,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                    },
                };
                let end = matches!(
                    ev.kind,
                    EventKind::Completed | EventKind::Failed | EventKind::Cancelled
                );
                let outcome = if end {
                    guard.0.lock().outcome.clone()
                } else {
                    None
                };
                if let Some(out) = openai_event(&st, ev.kind, &ev.data, outcome) {
                    return Some((Ok::<_, Infallible>(out), (missed, live, end, guard, st)));
                }
                if end {
                    return None;
                }
            }
        },
    );
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
        .into_response()
}

fn model_object(st: &AppState) -> Model {
    Model {
        id: st.model_name.clone(),
        object: "model".into(),
        created: 0,
        owned_by: "star-deploy".into(),
    }
}

/// The served model, as a list.
#[utoipa::path(get, path = "/v1/models", tag = "openai",
    responses((status = 200, body = ModelList)))]
pub(crate) async fn models(State(st): State<Arc<AppState>>) -> Response {
    axum::Json(ModelList {
        object: "list".into(),
        data: vec![model_object(&st)],
    })
    .into_response()
}

/// The served model by id.
#[utoipa::path(get, path = "/v1/models/{id}", tag = "openai",
    params(("id" = String, Path, description = "The model id (`GET /v1/models`)")),
    responses((status = 200, body = Model), (status = 404, body = OpenAiError)))]
pub(crate) async fn model(
    State(st): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    if id == st.model_name {
        return axum::Json(model_object(&st)).into_response();
    }
    let mut e = ApiError::not_found(format!(
        "The model '{id}' does not exist: this server serves '{}'",
        st.model_name
    ))
    .code("model_not_found");
    e.param = Some("model".into());
    e.openai()
}
