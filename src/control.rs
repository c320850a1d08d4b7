//! The local control API: HTTP + JSON on a Unix socket in the app's state directory. The CLI's
//! `scale`, `ps`, `logs` and `restart` are clients of it, and `curl --unix-socket` works too;
//! every route is documented in `docs/control-api.md`.
//!
//! The socket is created mode 0600 inside the 0700 state directory, so only the owner can reach
//! it. A socket file left by a host that died is replaced; one that answers belongs to a live
//! host, and a second `up` refuses to start. Mutations are serialized by the supervisor.

use std::convert::Infallible;
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper::server::conn::http1;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use tokio::net::UnixListener;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::app::ByteSize;
use crate::deploy::Deployer;
use crate::logs::Logs;
use crate::metrics::Metrics;
use crate::proxy::next_connection;
use crate::state::StateDir;
use crate::supervisor::{ControlError, Supervisor};

/// Largest request body the API reads.
const MAX_BODY: usize = 64 * 1024;

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

/// Serves the API until `shutdown` is cancelled.
pub async fn serve(listener: UnixListener, api: Arc<Api>, shutdown: CancellationToken) {
    let listener = &listener;
    let accept = || async move { listener.accept().await.map(|(stream, _)| stream) };
    while let Some(stream) = next_connection(accept, &shutdown).await {
        let api = api.clone();
        // The socket's mode keeps other users out; checking the peer's uid as well covers a
        // socket or directory whose permissions were loosened by hand.
        // SAFETY: geteuid has no preconditions and cannot fail.
        let owner = unsafe { libc::geteuid() };
        let peer = stream.peer_cred().ok().map(|c| c.uid());
        let allowed = peer == Some(owner);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let api = api.clone();
                async move {
                    if !allowed {
                        return Ok::<_, Infallible>(error(
                            StatusCode::FORBIDDEN,
                            &format!(
                                "this host's control API belongs to uid {owner}; you are uid {}",
                                peer.map_or("unknown".to_string(), |u| u.to_string())
                            ),
                        ));
                    }
                    Ok(api.handle(req).await)
                }
            });
            if let Err(e) = http1_builder()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(cause = %e, "control connection ended with an error");
            }
        });
    }
}

type ApiBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

/// The routes, shared by the Unix socket and the optional TCP listener.
pub struct Api {
    supervisor: Arc<Supervisor>,
    logs: Logs,
    metrics: Arc<Metrics>,
    deployer: Arc<Deployer>,
}

impl Api {
    /// The API over a running supervisor.
    pub fn new(
        supervisor: Arc<Supervisor>,
        logs: Logs,
        metrics: Arc<Metrics>,
        deployer: Arc<Deployer>,
    ) -> Arc<Self> {
        Arc::new(Self {
            supervisor,
            logs,
            metrics,
            deployer,
        })
    }
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
    let accept = || async move { listener.accept().await.map(|(stream, _)| stream) };
    while let Some(stream) = next_connection(accept, &shutdown).await {
        let (api, auth) = (api.clone(), auth.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (api, auth) = (api.clone(), auth.clone());
                async move {
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
                        return Ok::<_, Infallible>(response);
                    }
                    let host = req
                        .headers()
                        .get(hyper::header::HOST)
                        .and_then(|v| v.to_str().ok());
                    if host != Some(auth.host.as_str()) {
                        return Ok(error(
                            StatusCode::FORBIDDEN,
                            &format!(
                                "wrong Host header: this control API answers to `{}`",
                                auth.host
                            ),
                        ));
                    }
                    Ok(api.handle(req).await)
                }
            });
            let _ = http1_builder()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Compares two secrets in time independent of where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serves only `GET /metrics` on a loopback TCP listener (`--metrics ADDR`) until `shutdown`.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    supervisor: Arc<Supervisor>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let listener = &listener;
    let accept = || async move { listener.accept().await.map(|(stream, _)| stream) };
    while let Some(stream) = next_connection(accept, &shutdown).await {
        let (supervisor, metrics) = (supervisor.clone(), metrics.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (supervisor, metrics) = (supervisor.clone(), metrics.clone());
                async move {
                    Ok::<_, Infallible>(
                        if req.method() == Method::GET && req.uri().path() == "/metrics" {
                            exposition(&metrics, &supervisor).await
                        } else {
                            error(StatusCode::NOT_FOUND, "only GET /metrics is served here")
                        },
                    )
                }
            });
            let _ = http1_builder()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn exposition(metrics: &Metrics, supervisor: &Supervisor) -> Response<ApiBody> {
    let store = supervisor.store_status().await.map(|s| s.reachable);
    let text = metrics.render(&supervisor.ps(), &supervisor.queues(), store);
    let mut response = Response::new(Full::new(Bytes::from(text)).boxed_unsync());
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
    );
    response
}

/// `POST /v1/scale`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScaleRequest {
    changes: Vec<String>,
    #[serde(default)]
    memory: Option<String>,
}

/// `POST /v1/deploy`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployRequest {}

/// `POST /v1/rollback`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackRequest {
    /// `3` or `"v3"`.
    version: serde_json::Value,
}

/// `POST /v1/restart`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RestartRequest {
    #[serde(default)]
    target: Option<String>,
}

impl Api {
    async fn handle(&self, req: Request<Incoming>) -> Response<ApiBody> {
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        // Only `/v1/logs` takes parameters: anything else given to a route is a mistake
        // (a typo, a wrong route), refused rather than ignored.
        if path != "/v1/logs"
            && let Some(pair) = query.split('&').find(|p| !p.is_empty())
        {
            let key = pair.split_once('=').map_or(pair, |(key, _)| key);
            return error(
                StatusCode::BAD_REQUEST,
                &format!("unknown parameter `{key}`: `{path}` takes none"),
            );
        }
        match (req.method().clone(), path.as_str()) {
            (Method::GET, "/v1/ps") => {
                let mut ps = serde_json::to_value(self.supervisor.ps()).expect("ps serializes");
                ps["queues"] = serde_json::to_value(self.supervisor.queue_stats().await)
                    .expect("stats serialize");
                ps["store"] = serde_json::to_value(self.supervisor.store_status().await)
                    .expect("status serializes");
                json(StatusCode::OK, &ps)
            }
            (Method::GET, "/v1/formation") => json(
                StatusCode::OK,
                &serde_json::json!({ "formation": self.supervisor.ps().types }),
            ),
            (Method::POST, "/v1/scale") => {
                let request: ScaleRequest = match read_json(req).await {
                    Ok(r) => r,
                    Err(response) => return response,
                };
                let memory = match request
                    .memory
                    .as_deref()
                    .map(str::parse::<ByteSize>)
                    .transpose()
                {
                    Ok(m) => m,
                    Err(e) => return error(StatusCode::BAD_REQUEST, &e),
                };
                let supervisor = self.supervisor.clone();
                outcome(
                    detached(async move { supervisor.scale(&request.changes, memory).await }).await,
                )
            }
            (Method::POST, "/v1/restart") => {
                let request: RestartRequest = match read_json(req).await {
                    Ok(r) => r,
                    Err(response) => return response,
                };
                let supervisor = self.supervisor.clone();
                outcome(
                    detached(async move { supervisor.restart(request.target.as_deref()).await })
                        .await,
                )
            }
            (Method::POST, "/v1/deploy") => {
                if let Err(response) = read_json::<DeployRequest>(req).await {
                    return response;
                }
                let deployer = self.deployer.clone();
                outcome(detached(async move { deployer.deploy().await }).await)
            }
            (Method::POST, "/v1/rollback") => {
                let request: RollbackRequest = match read_json(req).await {
                    Ok(r) => r,
                    Err(response) => return response,
                };
                let version = match &request.version {
                    serde_json::Value::Number(n) => n.as_u64(),
                    serde_json::Value::String(s) => s.trim_start_matches('v').parse().ok(),
                    _ => None,
                };
                match version.and_then(|v| u32::try_from(v).ok()) {
                    Some(version) => {
                        let deployer = self.deployer.clone();
                        outcome(detached(async move { deployer.rollback(version).await }).await)
                    }
                    None => error(
                        StatusCode::BAD_REQUEST,
                        &format!(
                            "invalid release `{}`: expected a release such as `v3` (see `wasmform releases`)",
                            request.version
                        ),
                    ),
                }
            }
            (Method::GET, "/v1/releases") => json(
                StatusCode::OK,
                &serde_json::json!({ "releases": self.deployer.releases().await }),
            ),
            (Method::GET, "/v1/logs") => self.logs(&query),
            (Method::GET, "/metrics") => exposition(&self.metrics, &self.supervisor).await,
            (
                _,
                "/v1/ps" | "/v1/formation" | "/v1/scale" | "/v1/restart" | "/v1/logs"
                | "/v1/deploy" | "/v1/rollback" | "/v1/releases",
            ) => error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this route",
            ),
            _ => error(
                StatusCode::NOT_FOUND,
                &format!("no such route `{path}`: see docs/control-api.md"),
            ),
        }
    }

    /// `GET /v1/logs?lines=N&ps=web&follow=true`: plain text, one line each.
    fn logs(&self, query: &str) -> Response<ApiBody> {
        let mut lines = 100usize;
        let mut filter = None;
        let mut follow = false;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "lines" => match value.parse() {
                    Ok(n) => lines = n,
                    Err(_) => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            &format!("invalid `lines={value}`: expected a whole number"),
                        );
                    }
                },
                "ps" => filter = Some(value.to_string()),
                "follow" => {
                    follow = match value {
                        "" | "1" | "true" => true,
                        "0" | "false" => false,
                        _ => {
                            return error(
                                StatusCode::BAD_REQUEST,
                                &format!("invalid `follow={value}`: expected `true` or `false`"),
                            );
                        }
                    }
                }
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        &format!("unknown parameter `{key}`"),
                    );
                }
            }
        }
        if let Some(filter) = &filter {
            let types: Vec<String> = self
                .supervisor
                .ps()
                .types
                .into_iter()
                .map(|t| t.name)
                .collect();
            let (kind, index) = filter.split_once('.').unwrap_or((filter, ""));
            let known = [crate::logs::HOST, crate::logs::API].contains(&filter.as_str())
                || (types.iter().any(|t| t == kind)
                    && (index.is_empty() || index.bytes().all(|b| b.is_ascii_digit())));
            if !known {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!(
                        "unknown process type or instance `{filter}`: known types are {} (an instance is `TYPE.N`; `{}` is the host)",
                        types.join(", "),
                        crate::logs::HOST
                    ),
                );
            }
        }
        // Subscribe before reading the history so no line falls between the two.
        let live = follow.then(|| self.logs.follow());
        let mut text = String::new();
        for record in self.logs.recent(lines, filter.as_deref()) {
            text.push_str(&record.plain());
            text.push('\n');
        }
        let body = match live {
            None => Full::new(Bytes::from(text)).boxed_unsync(),
            Some(live) => {
                let (tx, rx) = mpsc::channel(256);
                tokio::spawn(forward(text, live, filter, tx));
                ChannelBody(rx).boxed_unsync()
            }
        };
        let mut response = Response::new(body);
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    }
}

/// Streams the history, then every new matching line, until the client goes away.
async fn forward(
    history: String,
    mut live: broadcast::Receiver<Arc<crate::logs::Record>>,
    filter: Option<String>,
    tx: mpsc::Sender<Bytes>,
) {
    if tx.send(Bytes::from(history)).await.is_err() {
        return;
    }
    loop {
        let line = match live.recv().await {
            Ok(record) if filter.as_deref().is_none_or(|f| record.matches(f)) => {
                format!("{}\n", record.plain())
            }
            Ok(_) => continue,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                format!("wasmform: {n} lines skipped: this follower fell behind\n")
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if tx.send(Bytes::from(line)).await.is_err() {
            return;
        }
    }
}

/// A response body fed by a channel.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

async fn read_json<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
) -> Result<T, Response<ApiBody>> {
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                &format!("cannot read the request body: {e}"),
            )
        })?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            &format!("invalid JSON request: {e}"),
        )
    })
}

/// Runs a formation change in a task of its own: a client that hangs up must not cancel it
/// half-way (a roll-out stopped between two instances would never finish or roll back).
async fn detached<T: Send + 'static>(
    change: impl Future<Output = Result<T, ControlError>> + Send + 'static,
) -> Result<T, ControlError> {
    tokio::spawn(change)
        .await
        .unwrap_or_else(|e| Err(ControlError::Failed(format!("the change failed: {e}"))))
}

fn outcome(result: Result<impl serde::Serialize, ControlError>) -> Response<ApiBody> {
    match result {
        Ok(outcome) => json(StatusCode::OK, &outcome),
        Err(e @ ControlError::Invalid(_)) => error(StatusCode::BAD_REQUEST, &e.to_string()),
        Err(e @ ControlError::Failed(_)) => error(StatusCode::CONFLICT, &e.to_string()),
    }
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<ApiBody> {
    let mut body = serde_json::to_vec_pretty(value).expect("reports serialize");
    body.push(b'\n');
    let mut response = Response::new(Full::new(Bytes::from(body)).boxed_unsync());
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn error(status: StatusCode, message: &str) -> Response<ApiBody> {
    json(status, &serde_json::json!({ "error": message }))
}
