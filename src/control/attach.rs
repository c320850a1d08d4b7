//! `POST /v1/run`: a one-off process, detached (its output in the log) or attached: the
//! connection is upgraded (`Upgrade: wasmform-run`) and carries its standard streams both
//! ways as frames, as `docker attach` does over its socket.
//!
//! A frame is one kind byte, a big-endian `u32` length and that many bytes (at most
//! [`MAX_FRAME`]). The client sends [`STDIN`] data, then [`STDIN_EOF`]; [`CANCEL`] stops the
//! process (Ctrl-C), and so does a client that goes away. The host sends [`STARTED`] (JSON
//! `{"instance": "run.3"}`), [`STDOUT`] and [`STDERR`] data, and last [`EXIT`] (JSON
//! `{"exit_code": 0, "reason": "exited with status 0"}`).

use std::collections::BTreeMap;
use std::sync::Arc;

use http_body_util::{BodyExt as _, Empty};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;
use wasmtime_wasi::cli::{AsyncStdinStream, AsyncStdoutStream};

use super::{Api, ApiBody, error, json, read_json};
use crate::runtime::Attached;
use crate::supervisor::{OneOff, Prepared, Supervisor};

/// The `Upgrade` protocol of an attached run.
pub const PROTOCOL: &str = "wasmform-run";

/// The header that carries an attached run's request (JSON), since its body is the stream.
pub const REQUEST_HEADER: &str = "x-wasmform-run";

/// Client → host: bytes for the process's stdin.
pub const STDIN: u8 = b'0';
/// Client → host: stdin is closed.
pub const STDIN_EOF: u8 = b'E';
/// Client → host: stop the process.
pub const CANCEL: u8 = b'C';
/// Host → client: the process started; JSON `{"instance": "run.3"}`.
pub const STARTED: u8 = b'S';
/// Host → client: bytes of the process's stdout.
pub const STDOUT: u8 = b'1';
/// Host → client: bytes of the process's stderr.
pub const STDERR: u8 = b'2';
/// Host → client: the process ended; JSON `{"exit_code": N, "reason": "…"}`. The last frame.
pub const EXIT: u8 = b'X';

/// Largest frame payload.
pub const MAX_FRAME: usize = 64 * 1024;

/// Bytes of a stream that may wait between the process and its client.
const PIPE: usize = 64 * 1024;

/// `POST /v1/run`, in the header of an attached run or the body of a detached one.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// A process type, or the absolute path of a component file.
    pub target: String,
    #[serde(default)]
    pub args: Option<Vec<String>>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub memory: Option<String>,
    /// Seconds.
    #[serde(default)]
    pub timeout: Option<f64>,
    #[serde(default)]
    pub detach: bool,
}

/// Writes one frame.
pub async fn write_frame(
    out: &mut (impl AsyncWrite + Unpin),
    kind: u8,
    payload: &[u8],
) -> std::io::Result<()> {
    let mut head = [0u8; 5];
    head[0] = kind;
    head[1..].copy_from_slice(&(payload.len() as u32).to_be_bytes());
    out.write_all(&head).await?;
    out.write_all(payload).await?;
    out.flush().await
}

/// Reads one frame; `None` at a clean end of the stream.
pub async fn read_frame(
    input: &mut (impl AsyncRead + Unpin),
) -> std::io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 5];
    match input.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes is over the limit of {MAX_FRAME}"),
        ));
    }
    let mut payload = vec![0; len];
    input.read_exact(&mut payload).await?;
    Ok(Some((head[0], payload)))
}

impl Api {
    /// `POST /v1/run`.
    pub(super) async fn run(&self, mut req: Request<Incoming>) -> Response<ApiBody> {
        let attached = req
            .headers()
            .get(hyper::header::UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(PROTOCOL.as_bytes()));
        // Taken first: reading a detached run's body consumes the request.
        let upgrade = attached.then(|| hyper::upgrade::on(&mut req));
        let request: RunRequest = if attached {
            let Some(header) = req.headers().get(REQUEST_HEADER) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("an attached run needs its request as JSON in `{REQUEST_HEADER}`"),
                );
            };
            match serde_json::from_slice(header.as_bytes()) {
                Ok(r) => r,
                Err(e) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        &format!("invalid JSON in `{REQUEST_HEADER}`: {e}"),
                    );
                }
            }
        } else {
            match read_json(req).await {
                Ok(r) => r,
                Err(response) => return response,
            }
        };
        if !attached && !request.detach {
            return error(
                StatusCode::BAD_REQUEST,
                &format!(
                    "an attached run upgrades its connection (`Upgrade: {PROTOCOL}`, as `wasmform run` does); send `\"detach\": true` to run it with its output in the log"
                ),
            );
        }
        let memory = match super::parse_memory(request.memory.as_deref()) {
            Ok(m) => m,
            Err(e) => return error(StatusCode::BAD_REQUEST, &e),
        };
        let timeout = match request.timeout.map(std::time::Duration::try_from_secs_f64) {
            Some(Err(_)) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid timeout: expected seconds ≥ 0",
                );
            }
            Some(Ok(t)) => Some(t),
            None => None,
        };
        let one_off = OneOff {
            target: request.target,
            args: request.args,
            env: request.env,
            memory,
            timeout,
        };
        let prepared = match self.supervisor.prepare_run(one_off).await {
            Ok(p) => p,
            Err(e) => return super::outcome(Err::<(), _>(e)),
        };
        let name = prepared.name.clone();
        let supervisor = self.supervisor.clone();
        let Some(upgrade) = upgrade else {
            tokio::spawn(async move {
                supervisor
                    .run_one_off(prepared, None, CancellationToken::new())
                    .await
            });
            return json(
                StatusCode::ACCEPTED,
                &serde_json::json!({ "instance": name }),
            );
        };
        tokio::spawn(async move {
            match upgrade.await {
                Ok(upgraded) => attach(supervisor, prepared, TokioIo::new(upgraded)).await,
                Err(e) => {
                    tracing::debug!(cause = %e, "a one-off's client went away before it was attached")
                }
            }
        });
        let mut response = Response::new(Empty::new().boxed_unsync());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(
            hyper::header::UPGRADE,
            hyper::header::HeaderValue::from_static(PROTOCOL),
        );
        headers.insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("upgrade"),
        );
        response
    }
}

/// Runs an attached one-off: its streams over `io`, until it ends; the exit frame last.
async fn attach(
    supervisor: Arc<Supervisor>,
    prepared: Prepared,
    io: impl AsyncRead + AsyncWrite + Send + 'static,
) {
    let (stdin_guest, mut stdin_host) = tokio::io::duplex(PIPE);
    let (stdout_guest, stdout_host) = tokio::io::duplex(PIPE);
    let (stderr_guest, stderr_host) = tokio::io::duplex(PIPE);
    let stdio = Attached {
        stdin: AsyncStdinStream::new(stdin_guest),
        stdout: AsyncStdoutStream::new(PIPE, stdout_guest),
        stderr: AsyncStdoutStream::new(PIPE, stderr_guest),
    };
    let (mut input, output) = tokio::io::split(io);
    let output = Arc::new(tokio::sync::Mutex::new(output));
    let started = serde_json::json!({ "instance": prepared.name }).to_string();
    if write_frame(&mut *output.lock().await, STARTED, started.as_bytes())
        .await
        .is_err()
    {
        return;
    }
    let cancel = CancellationToken::new();
    // The client's frames: stdin, its end, a cancel; a client that goes away cancels too.
    let reader = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let mut stdin_open = true;
            loop {
                match read_frame(&mut input).await {
                    Ok(Some((STDIN, data))) if stdin_open => {
                        if stdin_host.write_all(&data).await.is_err() {
                            stdin_open = false;
                        }
                    }
                    Ok(Some((STDIN_EOF, _))) => {
                        let _ = stdin_host.shutdown().await;
                        stdin_open = false;
                    }
                    Ok(Some((CANCEL, _))) | Ok(None) | Err(_) => {
                        cancel.cancel();
                        return;
                    }
                    Ok(Some(_)) => {}
                }
            }
        })
    };
    let pumps = [
        tokio::spawn(pump(stdout_host, STDOUT, output.clone())),
        tokio::spawn(pump(stderr_host, STDERR, output.clone())),
    ];
    let outcome = supervisor.run_one_off(prepared, Some(stdio), cancel).await;
    // The store is gone, so the streams end once what the process wrote has been sent.
    for pump in pumps {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), pump).await;
    }
    reader.abort();
    let exit = serde_json::json!({ "exit_code": outcome.exit_code(), "reason": outcome.reason() });
    let mut output = output.lock().await;
    let _ = write_frame(&mut *output, EXIT, exit.to_string().as_bytes()).await;
    let _ = output.shutdown().await;
}

/// Sends what the process writes on one stream as frames of `kind`, until the stream ends.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    kind: u8,
    to: Arc<tokio::sync::Mutex<impl AsyncWrite + Unpin>>,
) {
    let mut buffer = vec![0; MAX_FRAME];
    loop {
        match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if write_frame(&mut *to.lock().await, kind, &buffer[..n])
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}
