//! `wasmform run`: a one-off process, as `heroku run` and `foreman run` have it.

use std::io::{IsTerminal as _, Write as _};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Method, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncReadExt as _;
use tokio_util::sync::CancellationToken;

use super::client::{AppArgs, Client};
use crate::app::{ByteSize, parse_duration};
use crate::control::{self, read_frame, write_frame};
use crate::runtime::Attached;
use crate::supervisor::OneOff;

/// Run a one-off process: a `wasi:cli/run` component, with stdin, stdout and stderr attached.
///
/// TARGET is a process type of the app — its component, environment, buckets and queues, and
/// its Procfile arguments unless ARGS are given — or a component file (`./tool.wasm`, which
/// gets only the `-e` variables and no buckets or queues). With a host running for the app,
/// the process runs in it as `run.N` and shares its release; with none, in a host of its own
/// that reads the app's files as `up` would and records nothing.
///
/// Exit status: the process's own (`exit(3)` exits 3; `run` returning an error exits 1);
/// 124 when `--timeout` stopped it, 130 when it was cancelled (Ctrl-C, or the host stopped),
/// 134 for a trap (a panic, `unreachable`), 137 for its memory limit, 1 when it could not
/// start or was refused (the reason on stderr), 3 for no host with `--detach`.
///
/// Examples:
///
///   wasmform run migrate                         # the `migrate` type, attached
///   wasmform run worker -e LEVEL=debug -- report 2026-11
///   wasmform run ./target/wasm32-wasip2/release/seed.wasm --memory 64MiB --timeout 30s
///   wasmform run cleanup --detach && wasmform logs --ps run -f
#[derive(clap::Args, Debug)]
pub struct RunCommand {
    /// A process type of the app, or a component file (a path ending in `.wasm`).
    #[arg(value_name = "TYPE|FILE.wasm")]
    target: String,

    /// Set a variable in its environment (repeatable), over the type's own.
    #[arg(short = 'e', long = "env", value_name = "K=V", value_parser = parse_env)]
    env: Vec<(String, String)>,

    /// Memory limit: `64MiB`, `1GiB`, or MiB. Default: the type's (256MiB for a file).
    #[arg(long, value_parser = parse_size)]
    memory: Option<ByteSize>,

    /// Stop it after this long (exit status 124).
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,

    /// Start it in the running host with its output in the app log (as `run.N`) and return
    /// at once, printing its name.
    #[arg(long)]
    detach: bool,

    #[command(flatten)]
    app: AppArgs,

    /// Arguments after the program name (default: the type's, from its Procfile line).
    #[arg(last = true, value_name = "ARGS")]
    args: Vec<String>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("invalid `-e {s}`: expected KEY=VALUE")),
    }
}

fn parse_size(s: &str) -> Result<ByteSize, String> {
    s.parse()
}

impl RunCommand {
    pub fn execute(self) -> Result<ExitCode> {
        let client = Client::new(&self.app)?;
        let target = if crate::supervisor::is_file(&self.target) {
            // The host's working directory is not this one.
            let path = std::path::absolute(&self.target)
                .with_context(|| format!("cannot resolve `{}`", self.target))?;
            path.display().to_string()
        } else {
            self.target.clone()
        };
        let request = serde_json::json!({
            "target": target,
            "args": (!self.args.is_empty()).then_some(&self.args),
            "env": self.env.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
            "memory": self.memory.map(|m| m.to_string()),
            "timeout": self.timeout.map(|t| t.as_secs_f64()),
            "detach": self.detach,
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("failed to start the async runtime")?;
        let code = runtime.block_on(async {
            if self.detach {
                let answer = client.json(Method::POST, "/v1/run", Some(request)).await?;
                let name = answer["instance"].as_str().unwrap_or("?");
                println!("{name}");
                eprintln!("{name} started: its output is in `wasmform logs --ps {name}`");
                return anyhow::Ok(0);
            }
            if client.host_running() {
                attached(&client, &request).await
            } else {
                self.alone(&client, target).await
            }
        });
        // Reading stdin blocks a thread that only new input would free: do not wait for it.
        runtime.shutdown_background();
        Ok(ExitCode::from((code? & 0xff) as u8))
    }

    /// No host runs: a host of its own, in this process.
    async fn alone(&self, client: &Client, target: String) -> Result<i32> {
        let procfile = ["Procfile", "wasmform.toml"]
            .into_iter()
            .map(|name| client.dir().join(name))
            .find(|p| p.exists());
        let app = match procfile {
            Some(path) => Some(crate::app::AppSpec::load(&path)?),
            None if crate::supervisor::is_file(&target) => None,
            None => bail!(
                "no Procfile or wasmform.toml in `{}` to find process type `{target}` in: run it where the app is, name the app with `--app DIR`, or give a component file",
                client.dir().display()
            ),
        };
        let state = client.state();
        let run = OneOff {
            target,
            args: (!self.args.is_empty()).then(|| self.args.clone()),
            env: self.env.iter().cloned().collect(),
            memory: self.memory,
            timeout: self.timeout,
        };
        let stdio = Attached {
            stdin: wasmtime_wasi::cli::AsyncStdinStream::new(tokio::io::stdin()),
            stdout: wasmtime_wasi::cli::AsyncStdoutStream::new(64 * 1024, tokio::io::stdout()),
            stderr: wasmtime_wasi::cli::AsyncStdoutStream::new(64 * 1024, tokio::io::stderr()),
        };
        let cancel = CancellationToken::new();
        let signal = interrupted()?;
        tokio::spawn({
            let cancel = cancel.clone();
            async move {
                signal.await;
                cancel.cancel();
            }
        });
        let state = state.path().exists().then_some(state);
        let outcome = crate::host::run_alone(app, state, run, stdio, cancel).await?;
        let code = outcome.exit_code();
        if !matches!(
            outcome,
            crate::supervisor::RunOutcome::Ended(crate::instance::RunEnd::Exited(_))
        ) {
            eprintln!("wasmform: {}", outcome.reason());
        }
        Ok(code)
    }
}

/// Resolves at SIGINT or SIGTERM. The handlers are installed by this call, not when the future
/// is first polled: a Ctrl-C right after the process started must not kill `run` outright.
fn interrupted() -> Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

/// Runs the one-off in the host, its streams over an upgraded control connection.
async fn attached(client: &Client, request: &serde_json::Value) -> Result<i32> {
    let signal = interrupted()?;
    let stream = client.connect().await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("control API handshake failed")?;
    tokio::spawn(conn.with_upgrades());
    let header = hyper::header::HeaderValue::from_bytes(request.to_string().as_bytes())
        .context("the request cannot be sent as a header (a control character in a value?)")?;
    let request = client
        .request(Method::POST, "/v1/run")?
        .header(hyper::header::CONNECTION, "upgrade")
        .header(hyper::header::UPGRADE, control::PROTOCOL)
        .header(control::REQUEST_HEADER, header)
        .body(Empty::<Bytes>::new())
        .expect("valid request");
    let response = sender
        .send_request(request)
        .await
        .context("control API request failed")?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        let status = response.status();
        let message = Client::refusal(response).await;
        if status == StatusCode::NOT_FOUND {
            bail!("the running host does not know `run` ({message}): is it an older wasmform?");
        }
        bail!("{message}");
    }
    let upgraded = hyper::upgrade::on(response)
        .await
        .context("the host did not attach the process")?;
    let (mut input, output) = tokio::io::split(TokioIo::new(upgraded));
    let output = Arc::new(tokio::sync::Mutex::new(output));
    // This terminal's stdin to the process, then its end.
    tokio::spawn({
        let output = output.clone();
        async move {
            let mut stdin = tokio::io::stdin();
            let mut buffer = vec![0; control::MAX_FRAME];
            loop {
                let (kind, n) = match stdin.read(&mut buffer).await {
                    Ok(0) | Err(_) => (control::STDIN_EOF, 0),
                    Ok(n) => (control::STDIN, n),
                };
                let mut output = output.lock().await;
                if write_frame(&mut *output, kind, &buffer[..n]).await.is_err()
                    || kind == control::STDIN_EOF
                {
                    return;
                }
            }
        }
    });
    // Ctrl-C or SIGTERM cancels it; the host then answers with its exit.
    tokio::spawn({
        let output = output.clone();
        async move {
            signal.await;
            let _ = write_frame(&mut *output.lock().await, control::CANCEL, &[]).await;
        }
    });
    let mut name = String::from("the process");
    loop {
        let frame = read_frame(&mut input).await;
        let (kind, payload) = match frame {
            Ok(Some(frame)) => frame,
            Ok(None) | Err(_) => bail!("the host went away while {name} was running"),
        };
        match kind {
            control::STARTED => {
                let started: serde_json::Value =
                    serde_json::from_slice(&payload).unwrap_or_default();
                name = started["instance"].as_str().unwrap_or("?").to_string();
                if std::io::stderr().is_terminal() {
                    eprintln!("Running on {name}… (Ctrl-C stops it)");
                }
            }
            control::STDOUT => {
                let mut out = std::io::stdout().lock();
                out.write_all(&payload)?;
                out.flush()?;
            }
            control::STDERR => {
                let mut err = std::io::stderr().lock();
                err.write_all(&payload)?;
                err.flush()?;
            }
            control::EXIT => {
                let exit: serde_json::Value = serde_json::from_slice(&payload)
                    .context("the host sent an invalid exit frame")?;
                let code = exit["exit_code"].as_i64().unwrap_or(1) as i32;
                let reason = exit["reason"].as_str().unwrap_or("");
                if !reason.starts_with("exited with status") {
                    eprintln!("wasmform: {name} {reason}");
                }
                return Ok(code);
            }
            _ => {}
        }
    }
}
