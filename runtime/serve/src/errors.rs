//! Error responses in each protocol's own shape: OpenAI's (`{"error": {message, type, param,
//! code}}`, `code` a string or null) on the OpenAI routes and STAR's own, the Open Inference
//! Protocol's (`{"error": "..."}`) under `/v2`.

use crate::api::{OpenAiError, OpenAiErrorDetail, V2Error};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// Which protocol a path belongs to, for the shape of its errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Protocol {
    OpenAi,
    KServe,
}

impl Protocol {
    pub(crate) fn of(path: &str) -> Protocol {
        if path == "/v2" || path.starts_with("/v2/") {
            Protocol::KServe
        } else {
            Protocol::OpenAi
        }
    }
}

/// OpenAI's error `type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    InvalidRequest,
    NotFound,
    RateLimit,
    Timeout,
    Server,
    Unavailable,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::InvalidRequest => "invalid_request_error",
            Kind::NotFound => "not_found_error",
            Kind::RateLimit => "rate_limit_error",
            Kind::Timeout => "timeout_error",
            Kind::Server => "server_error",
            Kind::Unavailable => "service_unavailable_error",
        }
    }
}

/// An error response before it takes its protocol's shape.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) kind: Kind,
    pub(crate) message: String,
    pub(crate) param: Option<String>,
    pub(crate) code: Option<&'static str>,
    /// Seconds a client should wait before retrying (429, 503).
    pub(crate) retry_after: Option<u32>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, kind: Kind, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
            param: None,
            code: None,
            retry_after: None,
        }
    }
    /// A request field the server refuses: 422 naming it.
    pub(crate) fn invalid(message: impl Into<String>, param: &str) -> Self {
        let mut e = ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            Kind::InvalidRequest,
            message,
        );
        e.param = Some(param.to_string());
        e.code = Some("invalid_value");
        e
    }
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, Kind::InvalidRequest, message)
    }
    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, Kind::NotFound, message)
    }
    pub(crate) fn unavailable(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, Kind::Unavailable, message).retry_after(1)
    }
    pub(crate) fn server(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, Kind::Server, message)
    }
    pub(crate) fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
    pub(crate) fn retry_after(mut self, s: u32) -> Self {
        self.retry_after = Some(s);
        self
    }
    pub(crate) fn detail(&self) -> OpenAiErrorDetail {
        OpenAiErrorDetail {
            message: self.message.clone(),
            kind: self.kind.as_str().to_string(),
            param: self.param.clone(),
            code: self.code.map(str::to_string),
        }
    }
    pub(crate) fn into_response(self, proto: Protocol) -> Response {
        let mut r = match proto {
            Protocol::OpenAi => (
                self.status,
                axum::Json(OpenAiError {
                    error: self.detail(),
                }),
            )
                .into_response(),
            Protocol::KServe => (
                self.status,
                axum::Json(V2Error {
                    error: self.message,
                }),
            )
                .into_response(),
        };
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
    pub(crate) fn openai(self) -> Response {
        self.into_response(Protocol::OpenAi)
    }
    pub(crate) fn kserve(self) -> Response {
        self.into_response(Protocol::KServe)
    }
}

/// The OpenAI error `type` a status gets when nothing more specific is known (responses the
/// framework made: 405, a body it could not read).
pub(crate) fn kind_of(status: StatusCode) -> Kind {
    match status.as_u16() {
        404 => Kind::NotFound,
        408 | 504 => Kind::Timeout,
        429 => Kind::RateLimit,
        503 => Kind::Unavailable,
        s if s >= 500 => Kind::Server,
        _ => Kind::InvalidRequest,
    }
}
