//! The HTTP front door: accepts connections, hands each request to an instance of the routed
//! type, and maps failures to statuses as RELIABILITY.md says: 503 when no instance is up or
//! the queue is full, 504 when the guest produced no response in time, 502 when it crashed or
//! gave no response.
//!
//! Shutdown protocol: when `shutdown` is cancelled the listener is closed at once, keep-alive
//! connections are told to close after their current response, and in-flight requests get up
//! to finish; the caller bounds that wait by the grace period.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::BodyExt as _;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming};
use hyper::header;
use hyper::server::conn::http1;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::humanize;
use crate::instance::{Failure, Reply, ResponseBody, WebInstance, text_body};
use crate::logs::Logs;
use crate::router::{Busy, Pool};

mod head;

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
}

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
        }
    }
}

impl HttpLimits {
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
    /// Rate-limits the lines of refusals a client can cause at will (H10, H11).
    pub refusals: Refusals,
}

/// Requests refused without reaching a guest (H10: none up, H11: the queue is full) are
/// logged at most once a second per code, the line saying how many there were since the last
/// one (`refused=N`, when more than one), so a client cannot flood the log.
#[derive(Default)]
pub struct Refusals(std::sync::Mutex<[RefusalLog; 2]>);

impl Refusals {
    /// Counts a refusal with `code`; `Some(n)`: log its line now, for `n` refusals.
    fn admit(&self, code: &str) -> Option<u64> {
        let index = match code {
            "H10" => 0,
            "H11" => 1,
            _ => return Some(1),
        };
        let mut logs = self.0.lock().unwrap_or_else(|e| e.into_inner());
        logs[index].admit()
    }
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
    let mut refused = RefusalLog::default();
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
            refused.count(&router.logs, limits.max_connections);
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
            let responded = Responded(framing.clone());
            async move {
                let mut response = router.handle(req).await;
                if body.is_none() {
                    response.headers_mut().insert(
                        header::CONNECTION,
                        header::HeaderValue::from_static("close"),
                    );
                }
                let response = response.map(|body| Responding {
                    body,
                    _responded: responded,
                });
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

/// Reports the end of a response to the connection's head guard when dropped.
struct Responded(Arc<head::Framing>);

impl Drop for Responded {
    fn drop(&mut self) {
        self.0.responded();
    }
}

/// A response body that reports its end when hyper drops it (written, or cut short).
struct Responding {
    body: ResponseBody,
    _responded: Responded,
}

impl Body for Responding {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// The answer to connections past `--max-connections`, and the bound on how many of those are
/// closed gracefully at a time.
struct Refusal {
    response: Arc<[u8]>,
    lingering: Arc<tokio::sync::Semaphore>,
}

/// Refused connections closed gracefully at a time; past it they are closed at once.
const MAX_LINGERING: usize = 256;

/// How long a refused connection may take to receive its 503.
const LINGER: Duration = Duration::from_secs(2);

impl Refusal {
    fn new(max_connections: usize) -> Self {
        let text = format!(
            "all {max_connections} connections of this host are in use (--max-connections); try again shortly\n"
        );
        let response = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{text}",
            text.len()
        );
        Self {
            response: Arc::from(response.into_bytes()),
            lingering: Arc::new(tokio::sync::Semaphore::new(MAX_LINGERING)),
        }
    }

    /// Answers 503 and closes. The close lingers (reading what the client sent, for at most
    /// [`LINGER`]): closing a socket with unread input resets the connection, and the client
    /// may then lose the 503 before reading it.
    fn refuse(&self, mut stream: tokio::net::TcpStream) {
        let Ok(permit) = self.lingering.clone().try_acquire_owned() else {
            let _ = stream.try_write(&self.response);
            return;
        };
        let response = self.response.clone();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let _ = tokio::time::timeout(LINGER, async {
                stream.write_all(&response).await?;
                stream.shutdown().await?;
                let mut sink = [0u8; 4096];
                while stream.read(&mut sink).await? > 0 {}
                Ok::<_, std::io::Error>(())
            })
            .await;
            drop(permit);
        });
    }
}

/// Logs refused connections at most once a second, with how many there were since the last
/// line, so a flood of connections cannot flood the log.
#[derive(Default)]
struct RefusalLog {
    since: u64,
    last: Option<Instant>,
}

impl RefusalLog {
    /// Counts one refusal; `Some(n)`: write a line now, for the `n` since the last one.
    fn admit(&mut self) -> Option<u64> {
        self.since += 1;
        if self
            .last
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.since))
    }

    fn count(&mut self, logs: &Logs, max_connections: usize) {
        if let Some(refused) = self.admit() {
            logs.host(format!(
                "at=error code=H11 desc=\"Connection limit reached\" connections={max_connections} refused={refused} status=503"
            ));
        }
    }
}

/// The next accepted connection, or `None` once `shutdown` is cancelled. A failed accept (out
/// of file descriptors, say) is logged and retried after a short pause instead of spinning.
pub(crate) async fn next_connection<S, F>(
    accept: impl Fn() -> F,
    shutdown: &CancellationToken,
) -> Option<S>
where
    F: Future<Output = std::io::Result<S>>,
{
    loop {
        tokio::select! {
            accepted = accept() => match accepted {
                Ok(stream) => return Some(stream),
                Err(e) => {
                    tracing::warn!(cause = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = shutdown.cancelled() => return None,
        }
    }
}

impl Router {
    async fn handle(&self, req: Request<Incoming>) -> Response<ResponseBody> {
        let started = Instant::now();
        let response = self.route(req, started).await;
        self.metrics
            .request(response.status().as_u16(), started.elapsed().as_secs_f64());
        response
    }

    async fn route(&self, req: Request<Incoming>, started: Instant) -> Response<ResponseBody> {
        let method = req.method().clone();
        // A cheap clone (hyper's `Uri` shares the head's bytes): the path is only formatted
        // when a line is written.
        let uri = req.uri().clone();
        let path = uri.path();
        let error = |code: &str, desc: &str, instance: &str, status: StatusCode| {
            let Some(refused) = self.refusals.admit(code) else {
                return;
            };
            let refused = if refused > 1 {
                format!(" refused={refused}")
            } else {
                String::new()
            };
            self.logs.host(format!(
                "at=error code={code} desc=\"{desc}\" method={method} path=\"{path}\" instance={instance} service={}ms status={}{refused}",
                started.elapsed().as_millis(),
                status.as_u16()
            ));
        };
        if !plain_transfer_encoding(req.headers()) {
            // hyper refuses a `Transfer-Encoding` whose last coding is not `chunked`; anything
            // but exactly one `chunked` is refused here too, since no other coding is decoded.
            let mut response = plain(
                StatusCode::BAD_REQUEST,
                "unsupported Transfer-Encoding: only a single `chunked` is accepted\n".to_string(),
            );
            response.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            return response;
        }
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > self.limits.max_body) {
            error(
                "H25",
                "Request body too large",
                "-",
                StatusCode::PAYLOAD_TOO_LARGE,
            );
            return plain(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body over {} bytes\n", self.limits.max_body),
            );
        }
        let Some(pool) = &self.pool else {
            error(
                "H10",
                "No HTTP process type",
                "-",
                StatusCode::SERVICE_UNAVAILABLE,
            );
            return unavailable("no HTTP process type in this app\n");
        };
        let waiting = Instant::now();
        let instance = match tokio::time::timeout(self.request_timeout, pool.acquire()).await {
            Ok(Ok(instance)) => instance,
            Ok(Err(Busy::NoneUp)) => {
                error(
                    "H10",
                    "No instance up",
                    "-",
                    StatusCode::SERVICE_UNAVAILABLE,
                );
                return unavailable(&format!("no `{}` instance is up\n", self.process));
            }
            Ok(Err(Busy::QueueFull)) | Err(_) => {
                error(
                    "H11",
                    "Backlog too deep",
                    "-",
                    StatusCode::SERVICE_UNAVAILABLE,
                );
                return unavailable(&format!("all `{}` instances are busy\n", self.process));
            }
        };
        let connect = waiting.elapsed();
        let name = instance.name.clone();
        // A body that passes the limit as it arrives (chunked) is cut off, and one that stops
        // arriving while the guest waits for it times out: the guest sees a read error, and
        // if it has not answered yet the router answers for it (413, 408; see below).
        let (fault_tx, mut fault_rx) = oneshot::channel();
        let req = req.map(|body| RequestBody {
            body,
            limit: self.limits.max_body,
            received: 0,
            timeout: self.limits.body_idle_timeout,
            sleep: None,
            fault: Some(fault_tx),
        });
        let (tx, mut rx) = oneshot::channel();
        let pool = pool.clone();
        let timeout = self.request_timeout;
        // Resolves to whether the call ended soundly (the instance went back to the pool).
        let mut call = Box::pin(async move {
            match instance.handle(req, tx, timeout).await {
                Ok(Some(instance)) => {
                    pool.release(instance);
                    true
                }
                // Recycled after its `max_requests`: this call was fine.
                Ok(None) => true,
                Err(()) => false,
            }
        });
        // The guest runs inline, in this connection's task: most handlers set the response and
        // finish in one go, and a task per request would cost a cross-thread wake-up. If the
        // response headers come while the guest is still writing the body, the rest of the
        // call moves to a task of its own so the body can stream. If the client goes away
        // mid-call, the instance is dropped mid-call and its slot replaces it.
        // Logs H27 if this future is dropped before the guest answered: the client went away.
        let mut interrupted = ClientGone {
            logs: &self.logs,
            method: &method,
            path,
            instance: &name,
            armed: true,
        };
        // The call is polled first: a guest that answers and returns in one go then sends its
        // reply (and drops its request body) before either channel holds this task's waker, so
        // it never wakes its own task. A task that wakes itself is rescheduled as a yield, which
        // also unparks another worker: a syscall and a thread hop per request.
        let (reply, outcome) = tokio::select! {
            biased;
            sound = &mut call => match fault_rx.try_recv() {
                Ok(fault) => {
                    interrupted.armed = false;
                    return self.body_fault(fault, &error, &name);
                }
                Err(_) => (rx.await, Outcome::Known(sound)),
            },
            reply = &mut rx => match fault_rx.try_recv() {
                // The guest answered after its body failed: the router's answer says why.
                Ok(fault) => {
                    interrupted.armed = false;
                    tokio::spawn(call);
                    return self.body_fault(fault, &error, &name);
                }
                Err(_) => {
                    let (done_tx, done_rx) = oneshot::channel();
                    tokio::spawn(async move {
                        let _ = done_tx.send(call.await);
                    });
                    (reply, Outcome::Later(done_rx))
                }
            },
            Ok(fault) = &mut fault_rx => {
                // Answer for the guest, which now sees a read error, and let it finish on its
                // own.
                interrupted.armed = false;
                tokio::spawn(call);
                return self.body_fault(fault, &error, &name);
            }
        };
        interrupted.armed = false;
        drop(interrupted);
        let (status, text) = match reply {
            Ok(Reply::Response(response)) => {
                let sent = response.status().as_u16();
                let response = match outcome {
                    Outcome::Known(true) => response,
                    outcome => response.map(|body| {
                        Guarded {
                            body,
                            outcome,
                            logs: self.logs.clone(),
                            line: format!(
                                "at=error code=H18 desc=\"Response aborted\" method={method} path=\"{path}\" instance={name} status={sent}"
                            ),
                        }
                        .boxed_unsync()
                    }),
                };
                if !self.log_requests {
                    return response;
                }
                let status = response.status().as_u16();
                return response.map(|body| {
                    Logged {
                        body,
                        bytes: 0,
                        line: InfoLine {
                            logs: self.logs.clone(),
                            method,
                            uri: uri.clone(),
                            instance: name,
                            started,
                            connect,
                            status,
                        },
                    }
                    .boxed_unsync()
                });
            }
            Ok(Reply::Failed(Failure::Timeout(after))) => {
                error("H12", "Request timeout", &name, StatusCode::GATEWAY_TIMEOUT);
                (
                    StatusCode::GATEWAY_TIMEOUT,
                    format!("{name} gave no response within {}\n", humanize(after)),
                )
            }
            Ok(Reply::Failed(Failure::Crashed(reason))) => {
                if reason.starts_with("memory quota exceeded") {
                    error(
                        "R14",
                        "Memory quota exceeded",
                        &name,
                        StatusCode::BAD_GATEWAY,
                    );
                } else {
                    error("H13", "Instance crashed", &name, StatusCode::BAD_GATEWAY);
                }
                (
                    StatusCode::BAD_GATEWAY,
                    format!("{name} crashed: {reason}\n"),
                )
            }
            Ok(Reply::Failed(Failure::NoResponse)) => {
                error("H13", "No response", &name, StatusCode::BAD_GATEWAY);
                (
                    StatusCode::BAD_GATEWAY,
                    format!("{name} returned without a response\n"),
                )
            }
            Ok(Reply::Failed(Failure::Guest(code))) => {
                error("H17", "Invalid response", &name, StatusCode::BAD_GATEWAY);
                (
                    StatusCode::BAD_GATEWAY,
                    format!("{name} answered with an error: {code:?}\n"),
                )
            }
            Err(_) => {
                error(
                    "H99",
                    "Host error",
                    &name,
                    StatusCode::INTERNAL_SERVER_ERROR,
                );
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "wasmform lost track of this request (a bug)\n".to_string(),
                )
            }
        };
        plain(status, text)
    }
}

impl Router {
    /// The router's answer when the request body failed before the guest answered.
    fn body_fault(
        &self,
        fault: BodyFault,
        error: &impl Fn(&str, &str, &str, StatusCode),
        instance: &str,
    ) -> Response<ResponseBody> {
        let (status, text) = match fault {
            BodyFault::Idle => {
                error(
                    "H28",
                    "Request body idle",
                    instance,
                    StatusCode::REQUEST_TIMEOUT,
                );
                (
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "request body stalled for {}\n",
                        humanize(self.limits.body_idle_timeout)
                    ),
                )
            }
            BodyFault::TooLarge => {
                error(
                    "H25",
                    "Request body too large",
                    instance,
                    StatusCode::PAYLOAD_TOO_LARGE,
                );
                (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body over {} bytes\n", self.limits.max_body),
                )
            }
        };
        let mut response = plain(status, text);
        // The rest of the body is not read: the connection cannot carry another request.
        response.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
        response
    }
}

/// A response body that counts its bytes and writes the request's `at=info` router line when
/// it is dropped: at its end, or when it is cut short (a client gone, an aborted stream).
struct Logged {
    body: ResponseBody,
    /// Data bytes passed on so far.
    bytes: u64,
    line: InfoLine,
}

/// What the `at=info` line says besides the byte count.
struct InfoLine {
    logs: Logs,
    method: hyper::Method,
    uri: hyper::Uri,
    instance: Arc<str>,
    /// When the request arrived; `service` runs from here to the end of the body.
    started: Instant,
    /// Time spent waiting for a free instance.
    connect: Duration,
    status: u16,
}

impl Body for Logged {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.bytes += data.len() as u64;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let InfoLine {
            logs,
            method,
            uri,
            instance,
            started,
            connect,
            status,
        } = &self.line;
        let path = uri.path();
        logs.host(format!(
            "at=info method={method} path=\"{path}\" instance={instance} connect={}ms service={}ms status={status} bytes={}",
            connect.as_millis(),
            started.elapsed().as_millis(),
            self.bytes
        ));
    }
}

/// Why a request body failed while the guest read it.
#[derive(Debug)]
enum BodyFault {
    /// No data for the body idle timeout.
    Idle,
    /// More than `--max-body` bytes.
    TooLarge,
}

/// A request body that fails once more than `limit` bytes arrive, or if no data arrives for
/// `timeout` while it is being read, and says which on `fault`. The idle clock runs only
/// while the guest waits for data, so time spent queued or computing never counts.
struct RequestBody {
    body: Incoming,
    limit: u64,
    /// Data bytes received so far.
    received: u64,
    timeout: Duration,
    /// Armed when a read finds no data; disarmed when data comes.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    fault: Option<oneshot::Sender<BodyFault>>,
}

impl RequestBody {
    fn fail(&mut self, fault: BodyFault) -> wasmtime_wasi_http::Error {
        let error = match fault {
            BodyFault::Idle => wasmtime_wasi_http::Error::ConnectionReadTimeout,
            BodyFault::TooLarge => wasmtime_wasi_http::Error::HttpRequestBodySize(Some(self.limit)),
        };
        if let Some(tx) = self.fault.take() {
            let _ = tx.send(fault);
        }
        error
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Pending => {}
            Poll::Ready(Some(Ok(frame))) => {
                this.sleep = None;
                if let Some(data) = frame.data_ref() {
                    this.received += data.len() as u64;
                    if this.received > this.limit {
                        return Poll::Ready(Some(Err(this.fail(BodyFault::TooLarge))));
                    }
                }
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(Some(Err(e))) => {
                this.sleep = None;
                return Poll::Ready(Some(Err(wasmtime_wasi_http::Error::Hyper(e))));
            }
            Poll::Ready(None) => {
                this.sleep = None;
                return Poll::Ready(None);
            }
        }
        let timeout = this.timeout;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        Poll::Ready(Some(Err(this.fail(BodyFault::Idle))))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// How the guest call behind a response ended: known already, or reported when it ends.
enum Outcome {
    Known(bool),
    Later(oneshot::Receiver<bool>),
}

/// A guest's response body that fails instead of ending if the guest call did not end soundly:
/// a guest that traps while streaming would otherwise look like a complete response (wasi-http
/// ends the body when the store goes away). The error makes hyper abort the connection.
struct Guarded {
    body: ResponseBody,
    outcome: Outcome,
    /// Logged when the body is aborted.
    logs: Logs,
    line: String,
}

/// Logs H27 when dropped while armed: the request's future went away before the guest
/// answered. The line is only formatted then, not on every request.
struct ClientGone<'a> {
    logs: &'a Logs,
    method: &'a hyper::Method,
    path: &'a str,
    instance: &'a str,
    armed: bool,
}

impl Drop for ClientGone<'_> {
    fn drop(&mut self) {
        if self.armed {
            let Self {
                method,
                path,
                instance,
                ..
            } = self;
            self.logs.host(format!(
                "at=error code=H27 desc=\"Client request interrupted\" method={method} path=\"{path}\" instance={instance} status=499"
            ));
        }
    }
}

impl Body for Guarded {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(None) => {}
            other => return other,
        }
        let sound = match &mut this.outcome {
            Outcome::Known(sound) => *sound,
            Outcome::Later(rx) => match Pin::new(rx).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(sound) => sound.unwrap_or(false),
            },
        };
        this.outcome = Outcome::Known(true);
        if sound {
            Poll::Ready(None)
        } else {
            this.logs.host(std::mem::take(&mut this.line));
            Poll::Ready(Some(Err(wasmtime_wasi_http::Error::HttpResponseIncomplete)))
        }
    }
}

/// Whether the request has no `Transfer-Encoding`, or exactly one field saying `chunked`.
fn plain_transfer_encoding(headers: &header::HeaderMap) -> bool {
    let mut values = headers.get_all(header::TRANSFER_ENCODING).iter();
    match (values.next(), values.next()) {
        (None, _) => true,
        (Some(value), None) => value
            .as_bytes()
            .trim_ascii()
            .eq_ignore_ascii_case(b"chunked"),
        _ => false,
    }
}

fn plain(status: StatusCode, text: String) -> Response<ResponseBody> {
    let mut response = Response::new(text_body(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn unavailable(text: &str) -> Response<ResponseBody> {
    let mut response = plain(StatusCode::SERVICE_UNAVAILABLE, text.to_string());
    response.headers_mut().insert(
        hyper::header::RETRY_AFTER,
        hyper::header::HeaderValue::from_static("1"),
    );
    response
}
