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
    /// H25: the header fields are larger than `--max-http-fields-size`, as wasi:http counts
    /// them: the guest could not copy them.
    FieldsTooLarge { limit: usize },
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
            RouterError::BodyTooLarge { .. } | RouterError::FieldsTooLarge { .. } => "H25",
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
            RouterError::FieldsTooLarge { .. } => "Request header fields too large",
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
            RouterError::FieldsTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
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

    /// The response the client gets: what went wrong in words safe for anyone, the router's
    /// code and the request id an operator finds in the log line. With `detail` (`up
    /// --error-detail`, for local development) it also names the instance and its failure
    /// (a trap, a reason), which a client of a public listener must not see. (A body fault also
    /// closes the connection: see `Router::body_fault`.)
    pub(super) fn response(
        &self,
        instance: &str,
        request_id: &str,
        detail: bool,
    ) -> Response<ResponseBody> {
        let text = match self {
            RouterError::BodyTooLarge { limit } => format!("request body over {limit} bytes"),
            RouterError::FieldsTooLarge { limit } => {
                format!("request header fields over {limit} bytes (as wasi:http counts them)")
            }
            RouterError::BodyIdle { after } => {
                format!("request body stalled for {}", humanize(*after))
            }
            RouterError::NoHttpType => "no HTTP process type in this app".to_string(),
            RouterError::NoneUp { process } => format!("no `{process}` instance is up"),
            RouterError::Busy { process } => format!("all `{process}` instances are busy"),
            RouterError::Timeout { after } if detail => {
                format!("{instance} gave no response within {}", humanize(*after))
            }
            RouterError::Timeout { after } => {
                format!("the app gave no response within {}", humanize(*after))
            }
            RouterError::MemoryQuota { reason } | RouterError::Crashed { reason } if detail => {
                format!("{instance} crashed: {reason}")
            }
            RouterError::MemoryQuota { .. } | RouterError::Crashed { .. } => {
                "application error: the app failed while answering this request".to_string()
            }
            RouterError::NoResponse if detail => {
                format!("{instance} returned without a response")
            }
            RouterError::NoResponse => {
                "application error: the app returned without a response".to_string()
            }
            RouterError::Invalid { code } if detail => {
                format!("{instance} answered with an error: {code:?}")
            }
            RouterError::Invalid { .. } => {
                "application error: the app answered with an error".to_string()
            }
            RouterError::Lost => "wasmform lost track of this request (a bug)".to_string(),
        };
        let text = format!("{text} ({}, request id {request_id})\n", self.code());
        let mut response = plain(self.status(), text);
        let headers = response.headers_mut();
        if self.status() == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        if let Ok(id) = header::HeaderValue::from_str(request_id) {
            headers.insert(REQUEST_ID, id);
        }
        response
    }
}

/// The header a client may send its own request id in, and the router answers with.
pub(super) const REQUEST_ID: header::HeaderName = header::HeaderName::from_static("x-request-id");

/// The request id of a router line: the client's `X-Request-Id` if it is 1 to 200 of
/// `[A-Za-z0-9._:-]` (as Heroku accepts them), else a new one, 16 hex digits unique within
/// this host.
pub(super) fn request_id(given: Option<&header::HeaderValue>) -> String {
    if let Some(value) = given {
        let bytes = value.as_bytes();
        let valid = (1..=200).contains(&bytes.len())
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(b));
        if valid {
            return String::from_utf8_lossy(bytes).into_owned();
        }
    }
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEED: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        now ^ (u64::from(std::process::id()) << 32)
    });
    // splitmix64: distinct counters give distinct, well-spread ids.
    let mut z = seed.wrapping_add(
        NEXT.fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15),
    );
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    format!("{:016x}", z ^ (z >> 31))
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
