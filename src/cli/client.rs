//! The control API client shared by `scale`, `ps`, `logs` and `restart`: finds the running
//! host of an app by its control socket and turns connection failures into advice.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

use crate::state::StateDir;

/// Which app a command talks to.
#[derive(clap::Args, Debug, Clone)]
pub struct AppArgs {
    /// The app's directory (the one holding its Procfile and `.wasmform/`), or its Procfile.
    /// Default: the current directory.
    #[arg(long = "app", value_name = "DIR")]
    app: Option<PathBuf>,
}

/// No host answers on the app's control socket: a client command then exits with
/// [`NO_HOST`](super::NO_HOST), so a script can tell it from a refused command.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NoHost(String);

/// A connection target: the app's control socket.
pub struct Client {
    dir: PathBuf,
    socket: PathBuf,
}

impl Client {
    /// The client for the app named by `args`.
    pub fn new(args: &AppArgs) -> Result<Self> {
        let dir = match &args.app {
            Some(path) if path.is_file() => path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            Some(path) => path.clone(),
            None => std::env::current_dir().context("cannot read the current directory")?,
        };
        let socket = StateDir::for_app(&dir).socket();
        Ok(Self { dir, socket })
    }

    /// The client of the host whose state directory is `state` (`up --state-dir` may put it
    /// anywhere).
    pub fn for_state(state: &StateDir) -> Self {
        Self {
            dir: state.path().parent().unwrap_or(state.path()).to_path_buf(),
            socket: state.socket(),
        }
    }

    /// Whether a host answers on the app's control socket.
    pub fn host_running(&self) -> bool {
        std::os::unix::net::UnixStream::connect(&self.socket).is_ok()
    }

    /// The app's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The app's state directory.
    pub fn state(&self) -> StateDir {
        StateDir::for_app(&self.dir)
    }

    /// A connection to the app's control socket, for a request [`call`](Self::call) cannot
    /// make (an upgraded one).
    pub async fn connect(&self) -> Result<UnixStream> {
        UnixStream::connect(&self.socket)
            .await
            .map_err(|e| self.connect_error(e))
    }

    /// The message of a non-2xx answer: the API's `error`, else the body.
    pub async fn refusal(response: Response<Incoming>) -> String {
        let bytes = match response.into_body().collect().await {
            Ok(body) => body.to_bytes(),
            Err(e) => return format!("the control API's answer was cut off: {e}"),
        };
        serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Sends one request; a non-2xx answer becomes an error carrying the API's message.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<Response<Incoming>> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|e| self.connect_error(e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("control API handshake failed")?;
        tokio::spawn(conn);
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "wasmform")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("valid request");
        let response = sender
            .send_request(request)
            .await
            .context("control API request failed")?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let message = Self::refusal(response).await;
        if status == StatusCode::FORBIDDEN {
            bail!("permission denied by the control API: {message}");
        }
        if status == StatusCode::NOT_FOUND {
            bail!(
                "the running host does not know this command ({message}): is it an older wasmform?"
            );
        }
        bail!("{message}")
    }

    /// Sends a request and parses the JSON answer.
    pub async fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value> {
        let response = self.call(method, path, body).await?;
        let bytes = response.into_body().collect().await?.to_bytes();
        serde_json::from_slice(&bytes).context("the control API answered with invalid JSON")
    }

    fn connect_error(&self, e: std::io::Error) -> anyhow::Error {
        match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                anyhow::Error::new(NoHost(format!(
                    "no wasmform host is running for `{}` (nothing answers on `{}`): start one with `wasmform up` there, or name the app with `--app DIR`",
                    self.dir.display(),
                    self.socket.display()
                )))
            }
            std::io::ErrorKind::PermissionDenied => anyhow::anyhow!(
                "permission denied on the control socket `{}`: it belongs to another user; run this as the user who started `wasmform up`",
                self.socket.display()
            ),
            _ => anyhow::anyhow!(
                "cannot reach the control socket `{}`: {e}",
                self.socket.display()
            ),
        }
    }
}

/// The lines of a streamed answer (`/v1/events`, `/v1/logs?follow`), as they arrive.
pub struct Lines {
    body: Incoming,
    pending: Vec<u8>,
}

impl Lines {
    pub fn new(response: Response<Incoming>) -> Self {
        Self {
            body: response.into_body(),
            pending: Vec::new(),
        }
    }

    /// The next complete line, without its newline; `None` at the end of the stream, an error
    /// if it broke (the host went away mid-stream).
    pub async fn next(&mut self) -> Option<Result<Vec<u8>, hyper::Error>> {
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.pending.drain(..=end).collect();
                line.pop();
                return Some(Ok(line));
            }
            match self.body.frame().await? {
                Ok(frame) => {
                    if let Some(data) = frame.data_ref() {
                        self.pending.extend_from_slice(data);
                    }
                }
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// A current-thread runtime for a CLI client command.
pub fn block_on<F: Future>(future: F) -> Result<F::Output> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    Ok(runtime.block_on(future))
}

/// Formats bytes for tables: `256 MiB`.
pub fn size(bytes: u64) -> String {
    crate::app::ByteSize::bytes(bytes).to_string()
}

/// Prints the `PROCESS COUNT MEM` table and notes of a scale or restart answer.
pub fn print_formation(answer: &serde_json::Value) {
    let rows: Vec<(String, String, String)> = answer["formation"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            (
                t["name"].as_str().unwrap_or("?").to_string(),
                t["desired"].to_string(),
                size(t["memory"].as_u64().unwrap_or(0)),
            )
        })
        .collect();
    let w = rows
        .iter()
        .map(|r| r.0.len())
        .max()
        .unwrap_or(0)
        .max("PROCESS".len());
    println!("{:<w$}  {:>5}  MEM", "PROCESS", "COUNT");
    for (name, count, memory) in rows {
        println!("{name:<w$}  {count:>5}  {memory}");
    }
    for note in answer["notes"].as_array().into_iter().flatten() {
        println!("note: {}", note.as_str().unwrap_or_default());
    }
}
