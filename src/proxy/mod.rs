//! The HTTP front door: accepts connections, hands each request to an instance of the routed
//! type, and maps failures to statuses as RELIABILITY.md says: 503 when no instance is up or
//! the queue is full, 504 when the guest produced no response in time, 502 when it crashed or
//! gave no response.
//!
//! Shutdown protocol: when `shutdown` is cancelled the listener is closed at once, keep-alive
//! connections are told to close after their current response, and in-flight requests get up
//! to finish; the caller bounds that wait by the grace period.
//!
//! | file | what it holds |
//! |---|---|
//! | `mod.rs` | the front door's limits, the accept loop, one hyper connection per client |
//! | `head.rs` | the guard of request heads: header and keep-alive timeouts, framing |
//! | `route.rs` | one request: checks, an instance from the pool, the guest call, the answer |
//! | `error.rs` | the router's own answers, with their Heroku codes and statuses |
//! | `body.rs` | the response body type every answer uses, and the limited request body |
//! | `refuse.rs` | refusals a client can cause at will, answered and logged cheaply |

mod body;
mod error;
mod head;
mod refuse;
mod route;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::Request;
use hyper::body::{Body as _, Incoming};
use hyper::header;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use self::refuse::Refusals;
use self::refuse::{Refusal, log_connection_limit};
use crate::instance::WebInstance;
use crate::logs::Logs;
use crate::net::next_connection;
use crate::router::Pool;

/// Limits of the HTTP front door. Heads over the limits are refused by hyper (431, or 414
/// for a request target over 64 KiB, which needs `max_head_bytes` above 64 KiB to get that
/// far) before any guest runs.
#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    /// How long a client may take to send a request head: from the connection's start for its
    /// first request, from the head's first byte for later ones.
    pub header_read_timeout: Duration,
    /// How long a keep-alive connection may stay idle between a response and the next request.
    pub keepalive_timeout: Duration,
    /// Most header fields in a request.
    pub max_headers: usize,
    /// Largest request head (request line and headers), bytes.
    pub max_head_bytes: usize,
    /// Largest request body, bytes: a larger `Content-Length` gets 413 before the guest runs,
    /// and a chunked body is cut off (an error for the guest) once it goes past it.
    pub max_body: u64,
    /// Most open client connections; past it, new ones are answered 503 and closed.
    pub max_connections: usize,
    /// How long a request body may stall while the guest reads it before the answer is 408.
    pub body_idle_timeout: Duration,
    /// Largest wasi:http fields resource (request or response headers, trailers) a guest may
    /// hold, bytes of its in-memory form (wasmtime serve's `-S max-http-fields-size`).
    pub max_fields_size: usize,
}

/// wasi-http's own default for [`HttpLimits::max_fields_size`].
pub const DEFAULT_FIELDS_SIZE: usize = 128 * 1024;

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(75),
            max_headers: 100,
            max_head_bytes: 64 * 1024,
            max_body: 10 * 1024 * 1024,
            max_connections: 10_000,
            body_idle_timeout: Duration::from_secs(30),
            max_fields_size: DEFAULT_FIELDS_SIZE,
        }
    }
}

impl HttpLimits {
    /// Whether a request within the head limits could still be over `max_fields_size` (not
    /// with the defaults: 100 fields of 64 KiB in all count under 128 KiB), so the router
    /// measures its fields only then.
    pub(super) fn fields_may_overflow(&self) -> bool {
        let per_field = size_of::<header::HeaderName>() + size_of::<header::HeaderValue>();
        self.max_head_bytes + self.max_headers * per_field > self.max_fields_size
    }

    /// The limits `settings` set, the defaults for the rest.
    pub fn from_settings(settings: crate::app::HttpSettings) -> Self {
        let default = Self::default();
        Self {
            header_read_timeout: settings
                .header_timeout
                .unwrap_or(default.header_read_timeout),
            keepalive_timeout: settings
                .keepalive_timeout
                .unwrap_or(default.keepalive_timeout),
            max_headers: settings.max_headers.unwrap_or(default.max_headers),
            max_head_bytes: settings
                .max_head_bytes
                .map_or(default.max_head_bytes, |s| s.as_usize()),
            max_body: settings.max_body.map_or(default.max_body, |s| s.as_u64()),
            max_connections: settings.max_connections.unwrap_or(default.max_connections),
            body_idle_timeout: settings.body_timeout.unwrap_or(default.body_idle_timeout),
            max_fields_size: settings
                .max_fields_size
                .map_or(default.max_fields_size, |s| s.as_usize()),
        }
    }
}

/// Routes requests to one process type's instances.
pub struct Router {
    /// The routed type's instances; `None` when the app has no HTTP process type.
    pub pool: Option<Arc<Pool<WebInstance>>>,
    /// The routed type's name, for messages.
    pub process: String,
    /// Longest time for a guest to produce response headers.
    pub request_timeout: Duration,
    /// Where router errors are logged.
    pub logs: Logs,
    /// Front-door limits.
    pub limits: HttpLimits,
    /// Log one `at=info` line per request (router errors are always logged).
    pub log_requests: bool,
    /// Requests are counted and timed here.
    pub metrics: crate::metrics::HttpMetrics,
    /// Error bodies name the instance and its failure (`up --error-detail`); by default they
    /// say only what a client may know, the code and the request id.
    pub error_detail: bool,
    /// Rate-limits the lines of refusals a client can cause at will (H10, H11).
    pub refusals: Refusals,
}

/// Serves HTTP on `listener` until `shutdown` is cancelled, then waits for in-flight requests.
pub async fn serve(listener: TcpListener, router: Arc<Router>, shutdown: CancellationToken) {
    let graceful = GracefulShutdown::new();
    let limits = router.limits;
    let mut builder = http1::Builder::new();
    // hyper's header timeout would also close idle keep-alive connections at the same
    // timeout; the head guard keeps both clocks instead (see `head`).
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_headers(limits.max_headers)
        .max_header_size(limits.max_head_bytes)
        // The read buffer must hold a whole head (hyper's minimum is 8 KiB); the head guard
        // never hands hyper more than one head at a time.
        .max_buf_size(limits.max_head_bytes.max(8192));
    let timeouts = head::Timeouts {
        header: limits.header_read_timeout,
        keepalive: limits.keepalive_timeout,
    };
    let connections = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let refusal = Refusal::new(limits.max_connections);
    let mut refused = crate::logs::Throttle::default();
    loop {
        let listener = &listener;
        let accept = || async move { listener.accept().await.map(|(stream, _)| stream) };
        let Some(stream) = next_connection(accept, &shutdown).await else {
            break;
        };
        // A permit per connection, held until it closes. Past the cap a connection is answered
        // 503 at once and closed, instead of waiting unanswered in the kernel's backlog.
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            refusal.refuse(stream);
            log_connection_limit(&mut refused, &router.logs, limits.max_connections);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let framing = Arc::new(head::Framing::default());
        let stream = head::HeadGuard::new(stream, framing.clone(), timeouts);
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            // hyper's framing of the body tells the guard where the next head starts; after a
            // chunked body it cannot know, so that connection ends with this response.
            let body = req.body().size_hint().exact();
            framing.set(body);
            let router = router.clone();
            // Tells the guard when the response ended, even if this future is dropped: the
            // keep-alive clock starts then.
            let responded = body::Responded(framing.clone());
            async move {
                let mut response = router.handle(req).await;
                if body.is_none() {
                    response.headers_mut().insert(
                        header::CONNECTION,
                        header::HeaderValue::from_static("close"),
                    );
                }
                response.body_mut().reports_to(responded);
                Ok::<_, Infallible>(response)
            }
        });
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(cause = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
