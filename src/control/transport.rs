//! The control API's listeners: the Unix socket (callers checked by their uid), TCP with a
//! bearer token and a fixed `Host`, and the metrics listener. One accept loop serves them all;
//! what differs is the [`Gate`] a request passes and the [`Routes`] it reaches.

use std::convert::Infallible;
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
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
use crate::app::ProcessName;
use crate::logs::Logs;
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
    /// Where to listen; anything but loopback needs `tls`.
    pub addr: std::net::SocketAddr,
    /// File holding the bearer token; must not be readable by group or others. Read again
    /// when it changes, so a token rotates without a restart.
    pub token_file: PathBuf,
    /// The Host header clients must send; default: the bound `ip:port`.
    pub host: Option<String>,
    /// `--control-tls-cert` and `--control-tls-key` (PEM): serve HTTPS.
    pub tls: Option<(PathBuf, PathBuf)>,
}

/// The TCP control listener, bound, with what its requests must present.
pub struct BoundTcp {
    listener: tokio::net::TcpListener,
    auth: Arc<TcpAuth>,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl BoundTcp {
    /// The URL clients use (`--remote`).
    pub fn url(&self) -> Result<String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        Ok(format!("{scheme}://{}", self.listener.local_addr()?))
    }
}

/// What every TCP control request must present.
struct TcpAuth {
    token: TokenFile,
    host: String,
    /// Refusals are logged at most once a second.
    refusals: std::sync::Mutex<crate::logs::Throttle>,
}

/// The bearer token, re-read when its file changes.
struct TokenFile {
    path: PathBuf,
    current: std::sync::Mutex<(Option<FileStamp>, String)>,
}

/// What tells that a token file changed: a rename over it, or a write in place.
type FileStamp = (u64, std::time::SystemTime, u64);

impl TokenFile {
    /// Reads the token, refusing a file other users can read or a short token.
    fn open(path: &Path) -> Result<Self> {
        let (stamp, token) = read_token(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            current: std::sync::Mutex::new((Some(stamp), token)),
        })
    }

    /// The token now: the file's, if it changed and is still a valid token file; else the
    /// last good one (a half-done rotation must not lock the operator out).
    fn current(&self) -> String {
        use std::os::unix::fs::MetadataExt as _;
        let mut current = self.current.lock().expect("token lock");
        let stamp = std::fs::metadata(&self.path)
            .ok()
            .and_then(|m| Some((m.ino(), m.modified().ok()?, m.len())));
        if stamp.is_some() && stamp != current.0 {
            match read_token(&self.path) {
                Ok((stamp, token)) => *current = (Some(stamp), token),
                Err(e) => {
                    tracing::warn!("control API: {e:#}; the previous token stays valid");
                    current.0 = stamp;
                }
            }
        }
        current.1.clone()
    }
}

fn read_token(path: &Path) -> Result<(FileStamp, String)> {
    use std::os::unix::fs::MetadataExt as _;
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
    let stamp = (meta.ino(), meta.modified()?, meta.len());
    Ok((stamp, token))
}

/// The certificates of the PEM file `file`, given with `flag`: at least one.
pub fn read_certificates(
    flag: &str,
    file: &Path,
) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    let certs = CertificateDer::pem_file_iter(file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            anyhow::anyhow!(
                "{flag} `{}`: not a PEM certificate file: {e}",
                file.display()
            )
        })?;
    if certs.is_empty() {
        bail!(
            "{flag} `{}`: holds no certificate (expected `-----BEGIN CERTIFICATE-----`)",
            file.display()
        );
    }
    Ok(certs)
}

/// The TLS settings of the control listener, from PEM files.
fn tls_acceptor(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor> {
    use rustls_pki_types::PrivateKeyDer;
    use rustls_pki_types::pem::PemObject as _;
    let certs = read_certificates("--control-tls-cert", cert)?;
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        anyhow::anyhow!(
            "--control-tls-key `{}`: not a PEM private key file: {e}",
            key.display()
        )
    })?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS setup failed")?
    .with_no_client_auth()
    .with_single_cert(certs, private)
    .with_context(|| {
        format!(
            "--control-tls-key `{}` does not go with --control-tls-cert `{}`",
            key.display(),
            cert.display()
        )
    })?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Checks the TCP control settings, reads the token and the certificate, and binds the
/// listener.
pub async fn bind_tcp(control: &TcpControl) -> Result<BoundTcp> {
    if !control.addr.ip().is_loopback() && control.tls.is_none() {
        bail!(
            "--control-tcp {}: not a loopback address, and the bearer token must not cross the network in clear text: give the host a certificate with `--control-tls-cert FILE --control-tls-key FILE`",
            control.addr
        );
    }
    let token = TokenFile::open(&control.token_file)?;
    let tls = match &control.tls {
        Some((cert, key)) => Some(tls_acceptor(cert, key)?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(control.addr)
        .await
        .with_context(|| format!("cannot listen on {} for the control API", control.addr))?;
    let host = match &control.host {
        Some(host) => host.clone(),
        None => listener.local_addr()?.to_string(),
    };
    Ok(BoundTcp {
        listener,
        auth: Arc::new(TcpAuth {
            token,
            host,
            refusals: Default::default(),
        }),
        tls,
    })
}

/// Who may call, checked on every request of a connection.
enum Gate {
    /// The Unix socket: the caller's uid must be the host's. The socket's mode keeps other
    /// users out; checking the peer's uid as well covers a socket or directory whose
    /// permissions were loosened by hand.
    PeerUid { owner: u32, peer: Option<u32> },
    /// TCP: `Authorization: Bearer TOKEN` (401 otherwise) and the configured `Host` (403
    /// otherwise, against DNS rebinding); refusals are logged with the peer, never the token.
    Bearer {
        auth: Arc<TcpAuth>,
        peer: Option<std::net::SocketAddr>,
        logs: Logs,
    },
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
            Gate::Bearer { auth, peer, logs } => {
                let refused = |why: &str| {
                    let admitted = auth.refusals.lock().expect("throttle lock").admit();
                    if let Some(count) = admitted {
                        let peer = peer.map_or("?".to_string(), |p| p.to_string());
                        let more = if count > 1 {
                            format!(" ({} more since the last line)", count - 1)
                        } else {
                            String::new()
                        };
                        logs.event(
                            crate::logs::API,
                            format!(
                                "refused {} {} from {peer}: {why}{more}",
                                req.method(),
                                req.uri().path()
                            ),
                        );
                    }
                };
                let presented = req
                    .headers()
                    .get(hyper::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "));
                let token = auth.token.current();
                if !constant_time_eq(presented.unwrap_or("").as_bytes(), token.as_bytes()) {
                    refused(if presented.is_some() {
                        "wrong bearer token (401)"
                    } else {
                        "no bearer token (401)"
                    });
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
                    refused("foreign Host header (403)");
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
    /// Only `GET /health`, for the HTTP front door's type (if any).
    Health(Arc<Supervisor>, Option<ProcessName>),
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
            Routes::Health(supervisor, routed) => {
                if req.method() != Method::GET || req.uri().path() != "/health" {
                    return error(StatusCode::NOT_FOUND, "only GET /health is served here");
                }
                let (status, text) = match supervisor.health(routed.as_ref()) {
                    Ok(ready) => (StatusCode::OK, format!("ok: {ready}\n")),
                    Err(why) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("unavailable: {why}\n"),
                    ),
                };
                let mut response = Response::new(Full::new(Bytes::from(text)).boxed_unsync());
                *response.status_mut() = status;
                response
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
        let gate = gate(&stream);
        tokio::spawn(serve_connection(stream, gate, routes.clone()));
    }
}

/// Serves one control connection: every request passes `gate` first.
async fn serve_connection<S>(stream: S, gate: Gate, routes: Routes)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let gate = Arc::new(gate);
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

/// Serves the API on TCP (HTTPS with a certificate): every request needs `Authorization:
/// Bearer TOKEN` (401 otherwise) and the configured `Host` (403 otherwise, against DNS
/// rebinding). No CORS headers are ever sent, so browsers cannot call it cross-origin.
pub async fn serve_tcp(bound: BoundTcp, api: Arc<Api>, shutdown: CancellationToken) {
    let BoundTcp {
        listener,
        auth,
        tls,
    } = bound;
    let listener = &listener;
    let routes = Routes::Api(api.clone());
    while let Some((stream, peer)) = next_connection(|| listener.accept(), &shutdown).await {
        let gate = Gate::Bearer {
            auth: auth.clone(),
            peer: Some(peer),
            logs: api.logs.clone(),
        };
        let routes = routes.clone();
        let Some(tls) = tls.clone() else {
            tokio::spawn(serve_connection(stream, gate, routes));
            continue;
        };
        let logs = api.logs.clone();
        tokio::spawn(async move {
            // The handshake is bounded like the request headers that follow it.
            match tokio::time::timeout(HEADER_READ_TIMEOUT, tls.accept(stream)).await {
                Ok(Ok(stream)) => serve_connection(stream, gate, routes).await,
                Ok(Err(e)) => logs.event(
                    crate::logs::API,
                    format!("TLS handshake with {peer} failed: {e}"),
                ),
                Err(_) => logs.event(
                    crate::logs::API,
                    format!(
                        "TLS handshake with {peer} did not finish within {}",
                        crate::units::humanize(HEADER_READ_TIMEOUT)
                    ),
                ),
            }
        });
    }
}

/// Serves only `GET /metrics` on a loopback TCP listener (`--metrics ADDR`) until `shutdown`.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    supervisor: Arc<Supervisor>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    serve_open(listener, Routes::Metrics(supervisor, metrics), shutdown).await;
}

/// Serves only `GET /health` on a TCP listener (`--health ADDR`) until `shutdown`: what a
/// load balancer in front of several nodes checks.
pub async fn serve_health(
    listener: tokio::net::TcpListener,
    supervisor: Arc<Supervisor>,
    routed: Option<ProcessName>,
    shutdown: CancellationToken,
) {
    serve_open(listener, Routes::Health(supervisor, routed), shutdown).await;
}

/// Serves `routes`, which need no token, on a TCP listener until `shutdown`.
async fn serve_open(
    listener: tokio::net::TcpListener,
    routes: Routes,
    shutdown: CancellationToken,
) {
    let listener = &listener;
    serve_connections(
        || async move { listener.accept().await.map(|(stream, _)| stream) },
        &shutdown,
        |_: &tokio::net::TcpStream| Gate::Open,
        routes,
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
