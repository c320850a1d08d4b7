//! The control API's listeners: the Unix socket (callers checked by their uid), TCP with a
//! bearer token and a fixed `Host`, and the metrics listener. One accept loop serves them all;
//! what differs is the [`Gate`] a request passes and the [`Routes`] it reaches.

use std::convert::Infallible;
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use super::{Api, ApiBody, error};
use crate::metrics::Metrics;
use crate::net::next_connection;
use crate::state::StateDir;
use crate::supervisor::Supervisor;

/// How long a client of the control API or the metrics listener may take to send its request
/// headers (also how long an idle keep-alive connection stays open), so a client that
/// trickles bytes cannot hold a connection. Its clients are local tools and scrapers, which
/// send a request at once.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The HTTP/1 settings of every control and metrics connection: hyper's timer installed (its
/// header read timeout does nothing without one).
fn http1_builder() -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_headers(100);
    builder
}

/// Fails if a host answers on the app's control socket.
pub fn ensure_no_live_host(state: &StateDir) -> Result<()> {
    let path = state.socket();
    if std::os::unix::net::UnixStream::connect(&path).is_ok() {
        bail!(
            "another wasmform host is already running for this app (its control socket `{}` answers): stop it first, or change it with `wasmform scale`",
            path.display()
        );
    }
    Ok(())
}

/// Binds the control socket, replacing a stale one.
pub async fn bind(state: &StateDir) -> Result<(UnixListener, PathBuf)> {
    let path = state.socket();
    match std::fs::symlink_metadata(&path) {
        Ok(meta) if meta.file_type().is_symlink() => bail!(
            "refusing to use the control socket `{}`: it is a symbolic link",
            path.display()
        ),
        Ok(meta) if !meta.file_type().is_socket() => bail!(
            "`{}` exists and is not a socket: move it away",
            path.display()
        ),
        Ok(_) => {
            ensure_no_live_host(state)?;
            // Left behind by a host that did not shut down cleanly.
            std::fs::remove_file(&path).with_context(|| {
                format!("failed to remove the stale socket `{}`", path.display())
            })?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("failed to inspect `{}`", path.display())),
    }
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("failed to create the control socket `{}`", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("failed to make `{}` private (0600)", path.display()))?;
    Ok((listener, path))
}

/// Settings of the optional TCP control listener (`--control-tcp`).
#[derive(Clone, Debug)]
pub struct TcpControl {
    /// Where to listen; anything but loopback needs `public`.
    pub addr: std::net::SocketAddr,
    /// File holding the bearer token; must not be readable by group or others.
    pub token_file: PathBuf,
    /// Allow a non-loopback address.
    pub public: bool,
    /// The Host header clients must send; default: the bound `ip:port`.
    pub host: Option<String>,
}

/// What every TCP control request must present.
struct TcpAuth {
    token: String,
    host: String,
}

/// Checks the TCP control settings, reads the token and binds the listener.
pub async fn bind_tcp(control: &TcpControl) -> Result<(tokio::net::TcpListener, String, String)> {
    if !control.addr.ip().is_loopback() && !control.public {
        bail!(
            "--control-tcp {}: not a loopback address; the control API can steer this host, so exposing it needs `--control-public` (and a firewall)",
            control.addr
        );
    }
    let path = &control.token_file;
    let meta = std::fs::metadata(path)
        .with_context(|| format!("cannot read the control token file `{}`", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        bail!(
            "the control token file `{}` is readable by other users (mode {:o}): `chmod 600` it",
            path.display(),
            meta.permissions().mode() & 0o777
        );
    }
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the control token file `{}`", path.display()))?
        .trim()
        .to_string();
    if token.len() < 16 {
        bail!(
            "the control token in `{}` is too short: use at least 16 characters (e.g. `openssl rand -hex 32`)",
            path.display()
        );
    }
    let listener = tokio::net::TcpListener::bind(control.addr)
        .await
        .with_context(|| format!("cannot listen on {} for the control API", control.addr))?;
    let host = match &control.host {
        Some(host) => host.clone(),
        None => listener.local_addr()?.to_string(),
    };
    Ok((listener, token, host))
}

/// Who may call, checked on every request of a connection.
enum Gate {
    /// The Unix socket: the caller's uid must be the host's. The socket's mode keeps other
    /// users out; checking the peer's uid as well covers a socket or directory whose
    /// permissions were loosened by hand.
    PeerUid { owner: u32, peer: Option<u32> },
    /// TCP: `Authorization: Bearer TOKEN` (401 otherwise) and the configured `Host` (403
    /// otherwise, against DNS rebinding).
    Bearer(Arc<TcpAuth>),
    /// The metrics listener, on loopback only: anyone on the machine may scrape.
    Open,
}

impl Gate {
    /// The answer to a request that may not pass; `None` lets it through.
    fn refuse(&self, req: &Request<Incoming>) -> Option<Response<ApiBody>> {
        match self {
            Gate::Open => None,
            Gate::PeerUid { owner, peer } if *peer == Some(*owner) => None,
            Gate::PeerUid { owner, peer } => Some(error(
                StatusCode::FORBIDDEN,
                &format!(
                    "this host's control API belongs to uid {owner}; you are uid {}",
                    peer.map_or("unknown".to_string(), |u| u.to_string())
                ),
            )),
            Gate::Bearer(auth) => {
                let presented = req
                    .headers()
                    .get(hyper::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .unwrap_or("");
                if !constant_time_eq(presented.as_bytes(), auth.token.as_bytes()) {
                    let mut response = error(
                        StatusCode::UNAUTHORIZED,
                        "missing or wrong bearer token: send `Authorization: Bearer TOKEN`",
                    );
                    response.headers_mut().insert(
                        hyper::header::WWW_AUTHENTICATE,
                        hyper::header::HeaderValue::from_static("Bearer"),
                    );
                    return Some(response);
                }
                let host = req
                    .headers()
                    .get(hyper::header::HOST)
                    .and_then(|v| v.to_str().ok());
                if host != Some(auth.host.as_str()) {
                    return Some(error(
                        StatusCode::FORBIDDEN,
                        &format!(
                            "wrong Host header: this control API answers to `{}`",
                            auth.host
                        ),
                    ));
                }
                None
            }
        }
    }
}

/// What a listener serves.
#[derive(Clone)]
enum Routes {
    /// The control API.
    Api(Arc<Api>),
    /// Only `GET /metrics`.
    Metrics(Arc<Supervisor>, Arc<Metrics>),
}

impl Routes {
    async fn handle(&self, req: Request<Incoming>) -> Response<ApiBody> {
        match self {
            Routes::Api(api) => api.handle(req).await,
            Routes::Metrics(supervisor, metrics) => {
                if req.method() == Method::GET && req.uri().path() == "/metrics" {
                    exposition(metrics, supervisor).await
                } else {
                    error(StatusCode::NOT_FOUND, "only GET /metrics is served here")
                }
            }
        }
    }
}

/// The accept loop of every control listener: each connection gets its [`Gate`] (from the
/// stream, e.g. the peer's uid) and is served `routes` until `shutdown` is cancelled.
async fn serve_connections<S, F>(
    accept: impl Fn() -> F,
    shutdown: &CancellationToken,
    gate: impl Fn(&S) -> Gate,
    routes: Routes,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Future<Output = std::io::Result<S>>,
{
    while let Some(stream) = next_connection(&accept, shutdown).await {
        let gate = Arc::new(gate(&stream));
        let routes = routes.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (gate, routes) = (gate.clone(), routes.clone());
                async move {
                    Ok::<_, Infallible>(match gate.refuse(&req) {
                        None => routes.handle(req).await,
                        Some(refused) => refused,
                    })
                }
            });
            if let Err(e) = http1_builder()
                .serve_connection(TokioIo::new(stream), service)
                // `POST /v1/run` attaches a one-off's streams on the upgraded connection.
                .with_upgrades()
                .await
            {
                tracing::debug!(cause = %e, "control connection ended with an error");
            }
        });
    }
}

/// Serves the API until `shutdown` is cancelled.
pub async fn serve(listener: UnixListener, api: Arc<Api>, shutdown: CancellationToken) {
    let listener = &listener;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let owner = unsafe { libc::geteuid() };
    serve_connections(
        || async move { listener.accept().await.map(|(stream, _)| stream) },
        &shutdown,
        |stream: &tokio::net::UnixStream| Gate::PeerUid {
            owner,
            peer: stream.peer_cred().ok().map(|c| c.uid()),
        },
        Routes::Api(api),
    )
    .await;
}

/// Serves the API on TCP: every request needs `Authorization: Bearer TOKEN` (401 otherwise)
/// and the configured `Host` (403 otherwise, against DNS rebinding). No CORS headers are ever
/// sent, so browsers cannot call it cross-origin.
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
    api: Arc<Api>,
    token: String,
    host: String,
    shutdown: CancellationToken,
) {
    let auth = Arc::new(TcpAuth { token, host });
    let listener = &listener;
    serve_connections(
        || async move { listener.accept().await.map(|(stream, _)| stream) },
        &shutdown,
        |_: &tokio::net::TcpStream| Gate::Bearer(auth.clone()),
        Routes::Api(api),
    )
    .await;
}

/// Serves only `GET /metrics` on a loopback TCP listener (`--metrics ADDR`) until `shutdown`.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    supervisor: Arc<Supervisor>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let listener = &listener;
    serve_connections(
        || async move { listener.accept().await.map(|(stream, _)| stream) },
        &shutdown,
        |_: &tokio::net::TcpStream| Gate::Open,
        Routes::Metrics(supervisor, metrics),
    )
    .await;
}

/// Compares two secrets in time independent of where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `GET /metrics`: the exposition text.
pub(super) async fn exposition(metrics: &Metrics, supervisor: &Supervisor) -> Response<ApiBody> {
    let store = supervisor.store_status().await.map(|s| s.reachable);
    let ps = supervisor.ps();
    let text = metrics.render(&ps.gauges(), &supervisor.queues(), store);
    let mut response = Response::new(Full::new(Bytes::from(text)).boxed_unsync());
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
    );
    response
}
