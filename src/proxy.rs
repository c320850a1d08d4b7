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

use hyper::body::Incoming;
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

/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

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
}

/// Serves HTTP on `listener` until `shutdown` is cancelled, then waits for in-flight requests.
pub async fn serve(listener: TcpListener, router: Arc<Router>, shutdown: CancellationToken) {
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(cause = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let service = hyper::service::service_fn(move |req| {
            let router = router.clone();
            async move { Ok::<_, Infallible>(router.handle(req).await) }
        });
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(cause = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

impl Router {
    async fn handle(&self, req: Request<Incoming>) -> Response<ResponseBody> {
        let started = Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let error = |code: &str, desc: &str, instance: &str, status: StatusCode| {
            self.logs.host(format!(
                "at=error code={code} desc=\"{desc}\" method={method} path=\"{path}\" instance={instance} service={}ms status={}",
                started.elapsed().as_millis(),
                status.as_u16()
            ));
        };
        let Some(pool) = &self.pool else {
            error(
                "H10",
                "No HTTP process type",
                "-",
                StatusCode::SERVICE_UNAVAILABLE,
            );
            return unavailable("no HTTP process type in this app\n");
        };
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
        let name = instance.name.clone();
        let (tx, mut rx) = oneshot::channel();
        let pool = pool.clone();
        let timeout = self.request_timeout;
        let mut call = Box::pin(async move {
            if let Some(instance) = instance.handle(req, tx, timeout).await {
                pool.release(instance);
            }
        });
        // The guest runs inline, in this connection's task: most handlers set the response and
        // finish in one go, and a task per request would cost a cross-thread wake-up. If the
        // response headers come while the guest is still writing the body, the rest of the
        // call moves to a task of its own so the body can stream. If the client goes away
        // mid-call, the instance is dropped mid-call and its slot replaces it.
        let reply = tokio::select! {
            biased;
            reply = &mut rx => {
                tokio::spawn(call);
                reply
            }
            () = &mut call => rx.await,
        };
        let (status, text) = match reply {
            Ok(Reply::Response(response)) => return response,
            Ok(Reply::Failed(Failure::Timeout(after))) => {
                error("H12", "Request timeout", &name, StatusCode::GATEWAY_TIMEOUT);
                (
                    StatusCode::GATEWAY_TIMEOUT,
                    format!("{name} gave no response within {}\n", humanize(after)),
                )
            }
            Ok(Reply::Failed(Failure::Crashed(reason))) => {
                error("H13", "Instance crashed", &name, StatusCode::BAD_GATEWAY);
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
