//! The router's own answers, Heroku-style: each [`RouterError`] owns its code (`H12`), its
//! description, its status and the text the client reads. The status policy is
//! `../shared/RELIABILITY.md`'s: 503 with `Retry-After` when no instance can take the request,
//! 504 when the guest is too slow, 502 when it fails, 4xx for what the client sent.

use std::time::Duration;

use hyper::{Response, StatusCode, header};
use wasmtime_wasi_http::p2::bindings::http::types::ErrorCode;

use crate::instance::{ResponseBody, text_body};
use crate::units::humanize;

/// Why the router answered instead of a guest.
#[derive(Debug)]
pub(super) enum RouterError {
    /// H25: the body is larger than `--max-body` (declared, or as it arrived).
    BodyTooLarge { limit: u64 },
    /// H28: the body stalled while the guest read it.
    BodyIdle { after: Duration },
    /// H10: the app has no HTTP process type.
    NoHttpType,
    /// H10: no instance of the routed type is up.
    NoneUp { process: String },
    /// H11: every instance is busy and the queue is full (or the wait timed out).
    Busy { process: String },
    /// H12: no response headers within the request timeout.
    Timeout { after: Duration },
    /// R14: the instance went over its memory limit.
    MemoryQuota { reason: String },
    /// H13: the instance trapped or exited.
    Crashed { reason: String },
    /// H13: the handler returned without a response.
    NoResponse,
    /// H17: the guest answered with an error code.
    Invalid { code: ErrorCode },
    /// H99: the reply channel closed: a bug of the host.
    Lost,
}

impl RouterError {
    /// Heroku's code.
    pub(super) fn code(&self) -> &'static str {
        match self {
            RouterError::BodyTooLarge { .. } => "H25",
            RouterError::BodyIdle { .. } => "H28",
            RouterError::NoHttpType | RouterError::NoneUp { .. } => "H10",
            RouterError::Busy { .. } => "H11",
            RouterError::Timeout { .. } => "H12",
            RouterError::MemoryQuota { .. } => "R14",
            RouterError::Crashed { .. } | RouterError::NoResponse => "H13",
            RouterError::Invalid { .. } => "H17",
            RouterError::Lost => "H99",
        }
    }

    /// The `desc=` of the log line.
    pub(super) fn description(&self) -> &'static str {
        match self {
            RouterError::BodyTooLarge { .. } => "Request body too large",
            RouterError::BodyIdle { .. } => "Request body idle",
            RouterError::NoHttpType => "No HTTP process type",
            RouterError::NoneUp { .. } => "No instance up",
            RouterError::Busy { .. } => "Backlog too deep",
            RouterError::Timeout { .. } => "Request timeout",
            RouterError::MemoryQuota { .. } => "Memory quota exceeded",
            RouterError::Crashed { .. } => "Instance crashed",
            RouterError::NoResponse => "No response",
            RouterError::Invalid { .. } => "Invalid response",
            RouterError::Lost => "Host error",
        }
    }

    pub(super) fn status(&self) -> StatusCode {
        match self {
            RouterError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            RouterError::BodyIdle { .. } => StatusCode::REQUEST_TIMEOUT,
            RouterError::NoHttpType | RouterError::NoneUp { .. } | RouterError::Busy { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            RouterError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            RouterError::MemoryQuota { .. }
            | RouterError::Crashed { .. }
            | RouterError::NoResponse
            | RouterError::Invalid { .. } => StatusCode::BAD_GATEWAY,
            RouterError::Lost => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Whether a client can cause it at will, cheaply: its log lines are rate-limited.
    pub(super) fn refusal(&self) -> Option<usize> {
        match self {
            RouterError::NoHttpType | RouterError::NoneUp { .. } => Some(0),
            RouterError::Busy { .. } => Some(1),
            _ => None,
        }
    }

    /// The response the client gets; `instance` names the instance that failed. (A body
    /// fault also closes the connection: see `Router::body_fault`.)
    pub(super) fn response(&self, instance: &str) -> Response<ResponseBody> {
        let text = match self {
            RouterError::BodyTooLarge { limit } => format!("request body over {limit} bytes\n"),
            RouterError::BodyIdle { after } => {
                format!("request body stalled for {}\n", humanize(*after))
            }
            RouterError::NoHttpType => "no HTTP process type in this app\n".to_string(),
            RouterError::NoneUp { process } => format!("no `{process}` instance is up\n"),
            RouterError::Busy { process } => format!("all `{process}` instances are busy\n"),
            RouterError::Timeout { after } => {
                format!("{instance} gave no response within {}\n", humanize(*after))
            }
            RouterError::MemoryQuota { reason } | RouterError::Crashed { reason } => {
                format!("{instance} crashed: {reason}\n")
            }
            RouterError::NoResponse => format!("{instance} returned without a response\n"),
            RouterError::Invalid { code } => {
                format!("{instance} answered with an error: {code:?}\n")
            }
            RouterError::Lost => "wasmform lost track of this request (a bug)\n".to_string(),
        };
        let mut response = plain(self.status(), text);
        let headers = response.headers_mut();
        if self.status() == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        response
    }
}

/// A plain-text response.
pub(super) fn plain(status: StatusCode, text: String) -> Response<ResponseBody> {
    let mut response = Response::new(text_body(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
