//! Errors: the server's own ([`ServeError`]) and the HTTP error object every failed request
//! gets, in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// What can go wrong starting or running the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The decoding engine failed.
    #[error(transparent)]
    Engine(#[from] mirror_scheduler::Error),
    /// A setting of the server or backend is invalid.
    #[error("invalid server configuration: {0}")]
    Config(String),
    /// Binding, accepting or a thread failed.
    #[error("server I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A server thread panicked.
    #[error("the {0} thread panicked")]
    ThreadPanicked(&'static str),
    /// The Prometheus recorder of `/metrics` could not be built.
    #[error("building the metrics recorder failed")]
    Metrics(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// An HTTP error response with an OpenAI-shaped body.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// OpenAI's `type`: `invalid_request_error`, `not_found_error`, `rate_limit_error`, ...
    pub kind: &'static str,
    /// A stable machine-readable code (`context_length_exceeded`, `model_not_found`, ...).
    pub code: Option<&'static str>,
    /// The request field at fault, when there is one.
    pub param: Option<String>,
    /// What went wrong, for a human.
    pub message: String,
    /// Seconds to wait before retrying (sent as `Retry-After` with 429 and 503).
    pub retry_after_s: Option<u64>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorObject<'a>,
}

#[derive(Serialize)]
struct ErrorObject<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            code: None,
            param: None,
            message: message.into(),
            retry_after_s: None,
        }
    }

    /// 400: the request is malformed or out of range.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 naming the field at fault.
    pub fn invalid_param(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::invalid(message).with_param(param)
    }

    /// 404 for an unknown route or model.
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found_error", message).with_code(code)
    }

    /// 405 for a known route with the wrong HTTP method.
    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "this route does not accept that HTTP method",
        )
        .with_code("method_not_allowed")
    }

    /// 413 for a body over the limit.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the request body is larger than the server's limit of {limit} bytes"),
        )
        .with_code("request_too_large")
    }

    /// 429 when the queue is full.
    pub fn queue_full(capacity: usize, retry_after_s: u64) -> Self {
        let mut error = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!(
                "the request queue is full ({capacity} waiting); retry after {retry_after_s} s"
            ),
        )
        .with_code("queue_full");
        error.retry_after_s = Some(retry_after_s);
        error
    }

    /// 503 when the batch is full and so are the places waiting for admission into it (the
    /// running sequences or the KV pool hold everything).
    pub fn batch_full(capacity: usize, retry_after_s: u64) -> Self {
        let mut error = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            format!(
                "the batch is full and {capacity} requests already wait for admission; retry after {retry_after_s} s"
            ),
        )
        .with_code("engine_overloaded");
        error.retry_after_s = Some(retry_after_s);
        error
    }

    /// 503 while the server shuts down.
    pub fn shutting_down() -> Self {
        let mut error = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the server is shutting down",
        )
        .with_code("shutting_down");
        error.retry_after_s = Some(1);
        error
    }

    /// 504 when a request's deadline passes before it completes.
    /// `generated`: tokens generated by then, when the generation had started.
    pub fn deadline(timeout_s: f64, generated: Option<usize>) -> Self {
        let progress = match generated {
            Some(n) => format!("after {n} generated tokens"),
            None => "before the generation finished".to_string(),
        };
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout_error",
            format!("the request's deadline of {timeout_s} s passed {progress}"),
        )
        .with_code("deadline_exceeded")
    }

    /// 500 when the engine fails.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
            .with_code("engine_error")
    }

    /// Sets the machine-readable code.
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// Sets the field at fault.
    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    /// The JSON body, `{"error": {...}}`.
    pub fn body_json(&self) -> String {
        let body = ErrorBody {
            error: ErrorObject {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        };
        // Serializing plain strings cannot fail; fall back to a fixed body all the same.
        serde_json::to_string(&body).unwrap_or_else(|_| {
            r#"{"error":{"message":"error","type":"server_error","param":null,"code":null}}"#
                .to_string()
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            self.body_json(),
        )
            .into_response();
        if let Some(seconds) = self.retry_after_s {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}
