//! The TCP front door: a service's listener, whose connections are balanced over the instances
//! of a TCP process (or of a socket-based `web` type), each listening on a loopback port of its
//! own.
//!
//! The host *proxies bytes*: it accepts the client, takes a place on an instance with room
//! ([`Backends`]), opens its own loopback connection to that instance's `$PORT` and copies both
//! ways until either side closes or the connection has been idle for `idle_timeout`. The
//! guest's listener is a real socket of this process (wasmtime-wasi's `wasi:sockets`), so the
//! alternative — handing the accepted socket to the guest — would need a `wasi:sockets`
//! implementation of our own; proxying costs one loopback connect per connection and one copy
//! of every byte through the kernel each way, and keeps every guest behind the host's limits.
//!
//! | file | what it holds |
//! |---|---|
//! | `mod.rs` | the accept loop, one proxied connection, the idle timeout |
//! | `backends.rs` | the instances that take connections: round-robin, limits, the backlog |

mod backends;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use self::backends::{Backend, Backends, Lease, Refused};
use crate::logs::{Logs, Throttle};
use crate::metrics::TcpMetrics;
use crate::net::{connect_as_host, next_connection};

/// How long a connection may wait for an instance with room (every instance full, or none up
/// yet, e.g. while a crashed one restarts) before it is closed.
pub const WAIT: Duration = Duration::from_secs(10);

/// What one TCP listener serves.
pub struct Service {
    /// The process type, for the log.
    process: String,
    backends: Arc<Backends>,
    metrics: TcpMetrics,
    logs: Logs,
    /// Refusals are logged at most once a second.
    refusals: std::sync::Mutex<Throttle>,
}

impl Service {
    pub fn new(process: &str, backends: Arc<Backends>, metrics: TcpMetrics, logs: Logs) -> Self {
        Self {
            process: process.to_string(),
            backends,
            metrics,
            logs,
            refusals: Default::default(),
        }
    }

    fn refused(&self, reason: &'static str, why: &str) {
        self.metrics.refused(reason);
        let admitted = self
            .refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit();
        if let Some(refused) = admitted {
            self.logs.host(format!(
                "at=error protocol=tcp process={} desc=\"connection closed: {why}\" refused={refused}",
                self.process
            ));
        }
    }
}

/// Accepts connections on `listener` until `stop` is cancelled, each proxied to an instance.
/// Connections already open go on: they end with their instances (drained when the formation
/// stops).
pub async fn serve(listener: TcpListener, service: Arc<Service>, stop: CancellationToken) {
    while let Some((client, _)) = next_connection(|| listener.accept(), &stop).await {
        let service = service.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let _ = client.set_nodelay(true);
            let lease = tokio::select! {
                lease = service.backends.take(WAIT) => lease,
                () = stop.cancelled() => return,
            };
            let lease = match lease {
                Ok(lease) => lease,
                Err(why) => {
                    let settings = &service.backends.settings;
                    let text = match why {
                        Refused::Backlog => format!(
                            "every instance has {} connections open (max_connections) and {} more wait (backlog)",
                            settings.max_connections, settings.backlog
                        ),
                        Refused::NoInstance => format!(
                            "no instance had room within {}",
                            crate::units::humanize(WAIT)
                        ),
                    };
                    return service.refused(why.label(), &text);
                }
            };
            proxy(client, lease, &service).await;
        });
    }
}

/// Copies bytes both ways between `client` and the leased instance until both directions are
/// closed, either side fails, or nothing moved for the idle timeout.
async fn proxy(client: tokio::net::TcpStream, lease: Lease, service: &Service) {
    let backend = &lease.backend;
    let mut upstream = match connect_as_host(backend.addr, &backend.peers).await {
        Ok(upstream) => upstream,
        Err(e) => {
            return service.refused(
                "connect",
                &format!("the instance on {} did not take it: {e}", backend.addr),
            );
        }
    };
    let metrics = &service.metrics;
    metrics.connections.inc();
    metrics.open.inc();
    let activity = Arc::new(AtomicU64::new(0));
    let mut client = Tracked {
        inner: client,
        bytes: metrics.bytes_in.clone(),
        activity: activity.clone(),
    };
    let mut upstream_stream = Tracked {
        inner: &mut upstream.stream,
        bytes: metrics.bytes_out.clone(),
        activity: activity.clone(),
    };
    let idle = service.backends.settings.idle_timeout;
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream_stream) => {}
        () = idle_for(&activity, idle) => {}
    }
    metrics.open.dec();
    drop(lease);
}

/// Resolves once `activity` has not moved for `timeout`.
async fn idle_for(activity: &AtomicU64, timeout: Duration) {
    let tick = (timeout / 4).max(Duration::from_millis(10));
    let mut last = activity.load(Ordering::Relaxed);
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(tick).await;
        let now = activity.load(Ordering::Relaxed);
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= timeout {
            return;
        }
    }
}

/// A stream whose reads count bytes and activity.
struct Tracked<S> {
    inner: S,
    bytes: Counter,
    activity: Arc<AtomicU64>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.bytes.inc_by(read as u64);
            self.activity.fetch_add(1, Ordering::Relaxed);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
