//! What every request goes through, whatever its route: the body read under a size limit and a
//! timeout (refused before reading when `Content-Length` is over the limit), error responses
//! the framework made put in the route's protocol shape, and every response counted by route
//! and status with its duration.

use crate::errors::{kind_of, ApiError, Protocol};
use crate::state::{AppState, BodyLimits};
use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use http_body_util::BodyExt;
use std::sync::Arc;
use std::time::Instant;

pub(crate) async fn edge(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let t = Instant::now();
    // Route templates, not paths: a label per route, whatever ids the paths carry.
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |m| m.as_str())
        .to_string();
    let proto = Protocol::of(req.uri().path());
    let what = format!("{} {}", req.method(), req.uri().path());
    let resp = match buffer(req, &st.body_limits).await {
        Ok(req) => next.run(req).await,
        Err(e) => e.into_response(proto),
    };
    let resp = shape(resp, proto, &what).await;
    st.observe(&route, resp.status(), t.elapsed());
    resp
}

/// The request with its body read into memory, or why it was not.
async fn buffer(req: Request, limits: &BodyLimits) -> Result<Request, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            crate::errors::Kind::InvalidRequest,
            format!(
                "the request body is over this server's limit of {} bytes (--max-body-kb)",
                limits.max_bytes
            ),
        )
        .code("request_too_large")
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_bytes as u64) {
        return Err(too_large());
    }
    let (parts, body) = req.into_parts();
    let read = async {
        let mut body = body;
        let mut buf = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                ApiError::bad_request(format!("the request body could not be read: {e}"))
            })?;
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() > limits.max_bytes {
                    return Err(too_large());
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok(Bytes::from(buf))
    };
    let bytes = tokio::time::timeout(limits.timeout, read)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                crate::errors::Kind::Timeout,
                format!(
                    "the request body did not arrive within {} s (--body-timeout-s)",
                    limits.timeout.as_secs()
                ),
            )
        })??;
    Ok(Request::from_parts(parts, Body::from(bytes)))
}

/// An error response that is not already JSON (the framework's 405, a rejection's plain text)
/// in the protocol's shape, its text kept as the message.
async fn shape(resp: Response, proto: Protocol, what: &str) -> Response {
    let status = resp.status();
    let json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if status.as_u16() < 400 || json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = body
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_string())
        .unwrap_or_default();
    let mut message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    if status == StatusCode::METHOD_NOT_ALLOWED {
        // The route's `Allow` header is added after this layer.
        message = format!("method not allowed: {what} (see Allow)");
    }
    let mut shaped = ApiError::new(status, kind_of(status), message).into_response(proto);
    for (k, v) in parts.headers.iter() {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            shaped.headers_mut().insert(k.clone(), v.clone());
        }
    }
    shaped
}
