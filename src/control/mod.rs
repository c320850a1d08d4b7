//! The local control API: HTTP + JSON on a Unix socket in the app's state directory. The CLI's
//! `scale`, `ps`, `logs` and `restart` are clients of it, and `curl --unix-socket` works too;
//! every route is documented in `docs/control-api.md`.
//!
//! The socket is created mode 0600 inside the 0700 state directory, so only the owner can reach
//! it. A socket file left by a host that died is replaced; one that answers belongs to a live
//! host, and a second `up` refuses to start. Mutations are serialized by the supervisor.
//!
//! | file | what it holds |
//! |---|---|
//! | `mod.rs` | the routes and their JSON |
//! | `transport.rs` | the listeners (Unix socket, TCP with a token, metrics), one accept loop |
//! | `attach.rs` | `POST /v1/run`: one-off processes, their streams attached over an upgraded connection |
//! | `upload.rs` | `POST /v1/deploy/upload`: the files of `deploy --remote`, staged, verified, installed |
//! | `follow.rs` | `GET /v1/logs` and `GET /v1/events`: the history and, with `follow`, the live stream |

mod attach;
mod follow;
mod transport;
pub mod upload;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

pub use self::attach::{
    CANCEL, EXIT, MAX_FRAME, PROTOCOL, REQUEST_HEADER, STARTED, STDERR, STDIN, STDIN_EOF, STDOUT,
    read_frame, write_frame,
};
pub use self::transport::{
    BoundTcp, TcpControl, bind, bind_tcp, ensure_no_live_host, read_certificates, serve,
    serve_health, serve_metrics, serve_tcp,
};
use crate::app::ByteSize;
use crate::deploy::Deployer;
use crate::events::Events;
use crate::logs::{API, Logs};
use crate::metrics::Metrics;
use crate::supervisor::{ControlError, Supervisor};

/// Largest request body the API reads.
const MAX_BODY: usize = 64 * 1024;

pub(crate) type ApiBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

/// The routes, shared by the Unix socket and the optional TCP listener.
pub struct Api {
    supervisor: Arc<Supervisor>,
    logs: Logs,
    metrics: Arc<Metrics>,
    deployer: Arc<Deployer>,
    /// Cancelled by `POST /v1/shutdown`: the host's owner (`wasmform up`) then shuts down.
    stop: CancellationToken,
    /// `GET /v1/events`.
    events: Events,
    /// The front door's URL, in `ps`.
    url: String,
}

impl Api {
    /// The API over a running supervisor.
    pub fn new(
        supervisor: Arc<Supervisor>,
        logs: Logs,
        metrics: Arc<Metrics>,
        deployer: Arc<Deployer>,
        stop: CancellationToken,
        events: Events,
        url: String,
    ) -> Arc<Self> {
        Arc::new(Self {
            supervisor,
            logs,
            metrics,
            deployer,
            stop,
            events,
            url,
        })
    }
}

/// `POST /v1/scale`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScaleRequest {
    changes: Vec<String>,
    #[serde(default)]
    memory: Option<String>,
}

/// `POST /v1/cluster/node`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeRequest {
    node: String,
    /// `cordon`, `uncordon` or `drain`.
    action: String,
}

/// `POST /v1/shutdown`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShutdownRequest {}

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
    /// Answers one request. One arm per route, as `docs/control-api.md` lists them: a table,
    /// kept whole so that it reads as one.
    pub(crate) async fn handle(&self, req: Request<Incoming>) -> Response<ApiBody> {
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        // Only `/v1/logs` takes parameters: anything else given to a route is a mistake
        // (a typo, a wrong route), refused rather than ignored.
        if path != "/v1/logs"
            && path != "/v1/events"
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
                ps["url"] = self.url.clone().into();
                ps["pid"] = std::process::id().into();
                ps["queues"] = serde_json::to_value(self.supervisor.queue_stats().await)
                    .expect("stats serialize");
                ps["store"] = serde_json::to_value(self.supervisor.store_status().await)
                    .expect("status serializes");
                json(StatusCode::OK, &ps)
            }
            (Method::GET, "/v1/cluster/ps") => match self.supervisor.cluster() {
                Some(cluster) => match cluster.ps().await {
                    Ok(report) => json(StatusCode::OK, &report),
                    Err(e) => error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &format!("the cluster's state cannot be read: {e}"),
                    ),
                },
                None => error(
                    StatusCode::BAD_REQUEST,
                    "this host is not in a cluster: start it with `wasmform up --cluster etcd://HOST:PORT --node NAME`",
                ),
            },
            (Method::POST, "/v1/cluster/node") => {
                let request: NodeRequest = match read_json(req).await {
                    Ok(r) => r,
                    Err(response) => return response,
                };
                match self.supervisor.cluster() {
                    Some(cluster) => {
                        match cluster.node_action(&request.node, &request.action).await {
                            Ok(message) => {
                                json(StatusCode::OK, &serde_json::json!({ "message": message }))
                            }
                            Err(e) => error(StatusCode::BAD_REQUEST, &e),
                        }
                    }
                    None => error(
                        StatusCode::BAD_REQUEST,
                        "this host is not in a cluster: start it with `wasmform up --cluster etcd://HOST:PORT --node NAME`",
                    ),
                }
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
                let memory = match parse_memory(request.memory.as_deref()) {
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
            (Method::POST, "/v1/shutdown") => {
                if let Err(response) = read_json::<ShutdownRequest>(req).await {
                    return response;
                }
                if !self.stop.is_cancelled() {
                    self.logs
                        .event(API, "Shutdown requested (`wasmform down`)".to_string());
                    self.stop.cancel();
                }
                json(
                    StatusCode::ACCEPTED,
                    &serde_json::json!({ "stopping": true, "pid": std::process::id() }),
                )
            }
            (Method::POST, "/v1/deploy") => {
                if let Err(response) = read_json::<DeployRequest>(req).await {
                    return response;
                }
                let deployer = self.deployer.clone();
                outcome(detached(async move { deployer.deploy().await }).await)
            }
            (Method::POST, "/v1/deploy/upload") => self.upload(req).await,
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
            (Method::GET, "/v1/events") => self.events(&query),
            (Method::POST, "/v1/run") => self.run(req).await,
            (Method::GET, "/metrics") => {
                transport::exposition(&self.metrics, &self.supervisor).await
            }
            (
                _,
                "/v1/ps" | "/v1/formation" | "/v1/scale" | "/v1/restart" | "/v1/logs"
                | "/v1/deploy" | "/v1/deploy/upload" | "/v1/rollback" | "/v1/releases"
                | "/v1/shutdown" | "/v1/events" | "/v1/run" | "/v1/cluster/ps" | "/v1/cluster/node",
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
}

impl Api {
    /// `POST /v1/deploy/upload`: the files are staged and verified, installed in the app
    /// directory, and deployed; a failed deploy puts the previous files back.
    async fn upload(&self, req: Request<Incoming>) -> Response<ApiBody> {
        let Some(dir) = self.deployer.app_dir() else {
            return error(
                StatusCode::BAD_REQUEST,
                "this host was started from an app built in code, not from a Procfile or manifest: there is nothing to upload to",
            );
        };
        let max = self.deployer.runtime.max_component_size();
        let staged = match upload::receive(req, &dir, max).await {
            Ok(staged) => staged,
            Err(refused) => return refused,
        };
        let deployer = self.deployer.clone();
        outcome(
            detached(async move {
                // One upload at a time owns the app's files, until its deploy is decided.
                let _files = deployer.files.lock().await;
                let installed = tokio::task::spawn_blocking(move || staged.install())
                    .await
                    .map_err(|e| {
                        ControlError::Failed(format!("installing the upload failed: {e}"))
                    })?
                    .map_err(|e| {
                        ControlError::Failed(format!(
                            "cannot install the upload in `{}`: {e}; nothing was changed",
                            dir.display()
                        ))
                    })?;
                let result = deployer.deploy().await;
                if result.is_err() {
                    let _ = tokio::task::spawn_blocking(move || installed.restore()).await;
                }
                result
            })
            .await,
        )
    }
}

/// A request's `memory` field: `512MiB`, `1GiB`, or MiB; the error names the value.
fn parse_memory(text: Option<&str>) -> Result<Option<ByteSize>, String> {
    text.map(str::parse::<ByteSize>).transpose()
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

pub(crate) fn error(status: StatusCode, message: &str) -> Response<ApiBody> {
    json(status, &serde_json::json!({ "error": message }))
}
