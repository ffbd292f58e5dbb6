//! From a checked request to its result, whatever the protocol: admission (draining, warming
//! up), the queue (429 when full), waiting (answered 503 at once when the drain's deadline
//! passes), a job's failure as an `ApiError`, and tracked jobs' outcomes.

use crate::api::{ImageData, ImagesResponse, InputTokensDetails, JobStatus, Usage};
use crate::errors::{ApiError, Kind};
use crate::jobs::{Finished, Job, JobError, JobResult, Outcome, Tracked};
use crate::request::{parse_fields, parse_request, FieldError, GenRequest};
use crate::state::AppState;
use axum::http::StatusCode;
use base64::Engine as _;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

pub(crate) type Reply = tokio::sync::oneshot::Receiver<JobResult>;

pub(crate) fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Draining or warming up: 503 before anything else.
pub(crate) fn admit(st: &AppState) -> Result<(), ApiError> {
    if st.draining.load(Ordering::SeqCst) {
        st.reject("draining");
        return Err(ApiError::unavailable("the server is shutting down"));
    }
    if !st.ready.load(Ordering::SeqCst) {
        st.reject("warming_up");
        return Err(ApiError::unavailable(
            "the model is warming up; retry shortly",
        ));
    }
    Ok(())
}

/// The OpenAI request (and STAR's fields) checked: (request, stream).
pub(crate) fn parse(st: &AppState, body: &[u8]) -> Result<(GenRequest, bool), ApiError> {
    parse_request(&st.served(), body).map_err(|e| refused(st, e))
}

/// Fields already read (KServe's inputs and parameters) checked the same way.
pub(crate) fn parse_object(
    st: &AppState,
    fields: &serde_json::Map<String, serde_json::Value>,
) -> Result<(GenRequest, bool), ApiError> {
    parse_fields(&st.served(), fields).map_err(|e| refused(st, e))
}

/// A refused request, counted, as its error.
fn refused(st: &AppState, FieldError(message, param): FieldError) -> ApiError {
    st.reject("invalid");
    if param == "body" {
        ApiError::bad_request(message).code("invalid_json")
    } else if message.starts_with("unknown field") {
        ApiError::invalid(message, &param).code("unknown_parameter")
    } else {
        ApiError::invalid(message, &param)
    }
}

/// Queue a job: its result arrives on the receiver; a full queue is 429 at once.
pub(crate) fn enqueue(
    st: &AppState,
    req: GenRequest,
    tracked: Option<Arc<Tracked>>,
) -> Result<Reply, ApiError> {
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
                    ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        Kind::RateLimit,
                        "the queue is full; retry later",
                    )
                    .code("rate_limit_exceeded")
                    .retry_after(1)
                }
                mpsc::TrySendError::Disconnected(_) => {
                    ApiError::server("the model worker has stopped")
                }
            })
        }
    }
}

/// Queue a job the client can follow (poll, events, cancel); refused work leaves no job behind.
pub(crate) fn enqueue_tracked(
    st: &Arc<AppState>,
    req: GenRequest,
) -> Result<Arc<Tracked>, ApiError> {
    let tr = st.new_tracked();
    match enqueue(st, req, Some(tr.clone())) {
        Ok(rx) => {
            follow(st.clone(), tr.clone(), rx);
            Ok(tr)
        }
        Err(e) => {
            st.table().by_id.remove(&tr.id);
            Err(e)
        }
    }
}

/// The job's result, or 503 at once when the drain's deadline passes first.
pub(crate) async fn wait(st: &AppState, rx: Reply) -> Result<Finished, ApiError> {
    let mut stop = st.stop.subscribe();
    tokio::select! {
        r = rx => match r {
            Ok(Ok(f)) => Ok(f),
            Ok(Err(e)) => Err(failure(st, Some(e))),
            Err(_) => Err(failure(st, None)),
        },
        _ = stop.wait_for(|s| *s) => Err(failure(st, Some(JobError::Draining))),
    }
}

/// A job's failure as the error its client gets.
pub(crate) fn failure(st: &AppState, e: Option<JobError>) -> ApiError {
    match e {
        Some(JobError::Invalid(m)) => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, Kind::InvalidRequest, m)
                .code("invalid_value")
        }
        Some(JobError::Timeout) => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            Kind::Timeout,
            format!(
                "the request did not finish within --request-timeout-s ({} s)",
                st.request_timeout.as_secs()
            ),
        )
        .code("timeout"),
        Some(JobError::Cancelled) => {
            ApiError::server("the request was cancelled").code("cancelled")
        }
        Some(JobError::Draining) => ApiError::unavailable(
            "the server is shutting down: the request was stopped before it finished",
        ),
        Some(JobError::OutOfMemory(m)) => ApiError::server(m).code("out_of_memory"),
        Some(JobError::Failed(m)) => ApiError::server(m),
        None => ApiError::server("the model worker stopped during the request"),
    }
}

/// The OpenAI response body of finished PNG images.
pub(crate) fn images_response(st: &AppState, f: &Finished) -> ImagesResponse {
    let data = f
        .images
        .iter()
        .map(|i| ImageData {
            b64_json: base64::engine::general_purpose::STANDARD.encode(&i.bytes),
            seed: i.seed,
        })
        .collect();
    let n = f.images.len() as u64;
    let (input, output) = (f.prompt_tokens, n * f.image_tokens);
    ImagesResponse {
        created: now_s(),
        data,
        size: st.size.clone(),
        output_format: "png".into(),
        background: "opaque".into(),
        usage: Usage {
            input_tokens: input,
            input_tokens_details: InputTokensDetails {
                text_tokens: input,
                image_tokens: 0,
            },
            output_tokens: output,
            total_tokens: input + output,
        },
    }
}

/// Record a tracked job's outcome when it arrives (or the drain's deadline, first).
fn follow(st: Arc<AppState>, tr: Arc<Tracked>, rx: Reply) {
    tokio::spawn(async move {
        match wait(&st, rx).await {
            Ok(f) => tr.set(
                JobStatus::Completed,
                Some(Outcome::Completed(images_response(&st, &f))),
            ),
            Err(e) if e.code == Some("cancelled") => {
                tr.set(JobStatus::Cancelled, Some(Outcome::Error(e.detail())))
            }
            Err(e) => tr.set(JobStatus::Failed, Some(Outcome::Error(e.detail()))),
        }
    });
}
