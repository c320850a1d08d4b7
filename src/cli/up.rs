//! `wasmform up`: run the app's formation in the foreground until SIGINT or SIGTERM, until
//! `wasmform down` asks, or, with `up -- CMD`, until CMD exits.

use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result};

use super::pidfd::Pidfd;
use crate::app::{
    AppSpec, ByteSize, HttpSettings, parse_capacity, parse_duration, parse_head_bytes,
    parse_http_size,
};
use crate::{Host, HostOptions, RestartPolicy};

/// Start the formation described by a Procfile, serve HTTP, and stream every instance's output.
#[derive(clap::Args, Debug)]
pub struct UpCommand {
    /// The Procfile or `wasmform.toml`; component paths are relative to its directory. A
    /// `wasmform.toml` beside a Procfile (or a Procfile beside it) is read too, and so is `.env`.
    #[arg(short = 'f', long = "procfile", default_value = "Procfile")]
    procfile: PathBuf,
    /// Deploy automatically when the Procfile, the manifest, `.env` or a component changes.
    #[arg(long = "watch")]
    watch: bool,
    /// Releases kept in the state directory (older ones and the components only they used
    /// are pruned).
    #[arg(long = "keep-releases", default_value_t = crate::release::DEFAULT_KEEP)]
    keep_releases: usize,

    /// Instances per process type, foreman style: `web=2,worker=1`, `all=0,web=1`.
    /// Default: one of each type.
    #[arg(short = 'm', long = "formation")]
    formation: Option<String>,

    /// HTTP port on 127.0.0.1; 0 picks a free one.
    #[arg(short = 'p', long = "port", default_value_t = 5000, env = "PORT")]
    port: u16,

    /// Address to bind.
    #[arg(long = "host", default_value = "127.0.0.1")]
    host: String,

    /// Memory limit of each instance (sum of its linear memories): `256MiB`, `1GiB`, or MiB.
    /// Default: the stored formation's limits, else 256MiB.
    #[arg(long = "memory", value_parser = parse_size)]
    memory: Option<ByteSize>,

    /// Largest memory limit `wasmform scale` may set later (sizes the instance pool's memory
    /// slots). Default: 1GiB, or the largest limit in the formation.
    #[arg(long = "max-memory", value_parser = parse_size)]
    max_memory: Option<ByteSize>,

    /// Memory budget of all instances together: a formation above it runs what fits and keeps
    /// the rest pending. Default: the machine's (or cgroup's) memory.
    #[arg(long = "capacity", value_parser = parse_capacity)]
    capacity: Option<ByteSize>,

    /// State directory: the persisted formation and the control socket.
    /// Default: `.wasmform/` next to the Procfile.
    #[arg(long = "state-dir")]
    state_dir: Option<PathBuf>,

    /// Longest time a guest may take to produce response headers before a 504.
    #[arg(long = "request-timeout", default_value = "30s", value_parser = parse_duration)]
    request_timeout: Duration,

    /// How long in-flight requests get to finish at shutdown.
    #[arg(long = "grace", default_value = "30s", value_parser = parse_duration)]
    grace: Duration,

    /// Requests that may wait for a busy type before getting 503.
    #[arg(long = "queue", default_value_t = 1024)]
    queue: usize,

    /// How many free instances of a type take requests round-robin; more wait as spares and
    /// are used only under load, so traffic stays on instances warm in the CPU caches.
    /// 0 rotates over every instance.
    #[arg(long = "rotate", default_value_t = crate::router::HOT)]
    rotate: usize,

    /// Delay before the second restart of a crash-looping instance; it doubles each time, up
    /// to `--restart-max`. The first restart is immediate.
    #[arg(long = "restart-delay", default_value = "1s", value_parser = parse_duration)]
    restart_delay: Duration,

    /// Longest delay between restarts of a crash-looping instance. An instance whose delay
    /// reached it is shown as crash-looping (`backoff_capped` in `ps --json`), which makes
    /// `wasmform wait` fail at once.
    #[arg(long = "restart-max", default_value = "5m", value_parser = parse_duration)]
    restart_max: Duration,

    /// Instances that may exist at once; sizes the instance pool (default: the formation plus
    /// room to scale, at least 1024).
    #[arg(long = "max-instances")]
    max_instances: Option<u32>,

    /// Largest request body accepted (413 above it), e.g. `10MiB`, `64KiB`, `1024B`.
    /// Default: `[http] max_body` in the manifest, else 10MiB.
    #[arg(long = "max-body", value_parser = parse_http_size)]
    max_body: Option<ByteSize>,

    /// Most header fields in a request (431 above it).
    /// Default: `[http] max_headers`, else 100.
    #[arg(long = "max-headers", value_parser = clap::value_parser!(u32).range(1..))]
    max_headers: Option<u32>,

    /// Largest request head, request line and headers together (431 above it), 1KiB to 16MiB.
    /// Default: `[http] max_head_bytes`, else 64KiB.
    #[arg(long = "max-head-bytes", value_parser = parse_head_bytes)]
    max_head_bytes: Option<ByteSize>,

    /// Largest wasi:http fields resource (headers or trailers) a guest may hold, measured as
    /// wasi-http measures it (its in-memory form, above the wire size), as `wasmtime serve -S
    /// max-http-fields-size`. A request over it gets 431. Default: `[http] max_fields_size`,
    /// else 128KiB.
    #[arg(long = "max-http-fields-size", value_parser = parse_http_size)]
    max_http_fields_size: Option<ByteSize>,

    /// How long a client may take to send a request head (the connection is closed after).
    /// Default: `[http] header_timeout`, else 30s.
    #[arg(long = "header-timeout", value_parser = parse_timeout)]
    header_timeout: Option<Duration>,

    /// How long a request body may stall while the guest reads it (408 after).
    /// Default: `[http] body_timeout`, else 30s.
    #[arg(long = "body-timeout", value_parser = parse_timeout)]
    body_timeout: Option<Duration>,

    /// How long a keep-alive connection may stay idle between requests before it is closed.
    /// Default: `[http] keepalive_timeout`, else 75s.
    #[arg(long = "keepalive-timeout", value_parser = parse_timeout)]
    keepalive_timeout: Option<Duration>,

    /// Most open client connections; past it, new ones get 503 (Retry-After: 1) and are closed.
    /// Default: `[http] max_connections`, else 10000.
    #[arg(long = "max-connections", value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: Option<u32>,

    /// Also serve Prometheus metrics at http://ADDR/metrics (loopback only), e.g.
    /// `127.0.0.1:9090`. They are always at `/metrics` on the control socket.
    #[arg(long = "metrics", value_name = "ADDR")]
    metrics: Option<SocketAddr>,

    /// Serve a health check for a load balancer at http://ADDR/health (e.g. `0.0.0.0:5001`):
    /// 200 while this host has a ready web instance, 503 with the reason when it has none, is
    /// stopping, or (in a cluster) cannot renew its lease.
    #[arg(long = "health", value_name = "ADDR")]
    health: Option<SocketAddr>,

    /// Also serve the control API on this TCP address (for edge nodes managed remotely).
    /// Requests need `Authorization: Bearer TOKEN` with the token from `--control-token-file`;
    /// an address other than loopback needs `--control-tls-cert` and `--control-tls-key`.
    #[arg(
        long = "control-tcp",
        value_name = "ADDR",
        requires = "control_token_file"
    )]
    control_tcp: Option<SocketAddr>,

    /// File holding the control API's bearer token (mode 0600, at least 16 characters). It is
    /// read again when it changes: a token rotates without a restart.
    #[arg(long = "control-token-file", value_name = "PATH")]
    control_token_file: Option<PathBuf>,

    /// The control API's TLS certificate chain (PEM): `--control-tcp` serves HTTPS.
    #[arg(
        long = "control-tls-cert",
        value_name = "PEM",
        requires_all = ["control_tcp", "control_tls_key"]
    )]
    control_tls_cert: Option<PathBuf>,

    /// The private key of `--control-tls-cert` (PEM).
    #[arg(
        long = "control-tls-key",
        value_name = "PEM",
        requires = "control_tls_cert"
    )]
    control_tls_key: Option<PathBuf>,

    /// The Host header TCP control clients must send (default: the bound `ip:port`).
    #[arg(long = "control-host", value_name = "HOST")]
    control_host: Option<String>,

    /// Do not log a line per request (router errors are still logged).
    #[arg(long = "no-router-log")]
    no_router_log: bool,

    /// Name the failing instance and its failure (a trap, a memory quota) in the router's
    /// error bodies, for local development. By default a client gets only what went wrong in
    /// general, the router's code and a request id, which the log line carries with the rest.
    #[arg(long = "error-detail")]
    error_detail: bool,

    /// Largest component file accepted.
    #[arg(long = "max-component-size", default_value = "512MiB", value_parser = parse_size)]
    max_component_size: ByteSize,

    /// Longest a component may take to compile before `up` gives up on it.
    #[arg(long = "compile-timeout", default_value = "5m", value_parser = parse_duration)]
    compile_timeout: Duration,

    /// Do not cache compiled components on disk.
    #[arg(long = "no-cache")]
    no_cache: bool,

    /// Build first: the manifest's `[build] command`, else `cargo build --release` in the
    /// Procfile's directory (as for the example guests).
    #[arg(long = "build")]
    build: bool,

    /// Start the host in the background (in a session of its own, its output in `host.log` in
    /// the state directory) and return once the formation is ready: every desired instance up
    /// and past its health check. Fails fast, with the failing instance's last lines, if an
    /// instance crashes or the host exits. Prints the URL; stop it with `wasmform down`.
    #[arg(long = "detach", conflicts_with = "command")]
    detach: bool,

    /// With `--detach`: print one JSON object (`url`, `pid`, `control`, `release`,
    /// `formation`, `ready_ms`, `log`) instead of the URL.
    #[arg(long = "json", requires = "detach")]
    json: bool,

    /// With `--detach`: how long to wait for the formation to be ready (exit 124 after).
    #[arg(long = "wait-timeout", default_value = "60s", value_parser = parse_timeout, requires = "detach")]
    wait_timeout: Duration,

    /// With `--detach`: leave the host running when its formation fails to become ready (to
    /// look at it), instead of stopping it.
    #[arg(long = "keep-on-failure", requires = "detach")]
    keep_on_failure: bool,

    /// Drain and exit when process PID ends (e.g. `--exit-with $$` from a CI job's shell), so
    /// a host left in the background cannot outlive the job that started it. Watched through
    /// a pidfd: a pid reused by another process cannot keep the host alive.
    #[arg(long = "exit-with", value_name = "PID")]
    exit_with: Option<libc::pid_t>,

    /// A hard deadline: drain and exit once the formation has been up this long (`up` then
    /// exits 124, as `timeout` does), e.g. `--ttl 30m` for a CI job's formation.
    #[arg(long = "ttl", value_name = "DURATION", value_parser = parse_timeout)]
    ttl: Option<Duration>,

    /// Join a cluster of hosts of the same app on etcd: `etcd://HOST:PORT[,HOST:PORT…]`. The
    /// nodes share one formation (`scale` through any node changes it for all), each runs its
    /// share, and a lost node's instances come back on the others within the lease TTL.
    #[arg(long = "cluster", value_name = "URL")]
    cluster: Option<String>,

    /// With `--cluster`: this node's name, unique in the cluster. Default: the host name.
    #[arg(long = "node", value_name = "NAME", requires = "cluster")]
    node: Option<String>,

    /// With `--cluster`: the app's name in etcd, so several apps share one etcd. Default: the
    /// name of the Procfile's directory.
    #[arg(long = "app", value_name = "NAME", requires = "cluster")]
    app: Option<String>,

    /// With `--cluster`: a label of this node (repeatable), which a type's `placement` in
    /// wasmform.toml selects on: `--label region=eu --label disk=ssd`.
    #[arg(long = "label", value_name = "KEY=VALUE", requires = "cluster")]
    label: Vec<String>,

    /// With `--cluster`: TTL of this node's lease, at least 2 s: a lost node's instances run
    /// elsewhere within about this long.
    #[arg(long = "lease-ttl", default_value = "5s", value_parser = parse_lease_ttl, requires = "cluster")]
    lease_ttl: Duration,

    /// After `--`: a command to run once the formation is up (a test suite, a load test). It
    /// gets `WASMFORM_URL`, `PORT` and `WASMFORM_CONTROL` (the control socket) in its
    /// environment; when it exits the formation drains and `up` exits with its status.
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

pub(super) fn parse_size(s: &str) -> Result<ByteSize, String> {
    s.parse()
}

fn parse_lease_ttl(s: &str) -> Result<Duration, String> {
    let ttl = parse_duration(s)?;
    if ttl < crate::cluster::MIN_LEASE_TTL || ttl.subsec_nanos() != 0 {
        return Err(format!(
            "invalid lease TTL `{s}`: etcd grants whole seconds, at least 2s"
        ));
    }
    Ok(ttl)
}

/// A timeout above zero.
fn parse_timeout(s: &str) -> Result<Duration, String> {
    let value = parse_duration(s)?;
    if value.is_zero() {
        return Err(format!("invalid duration `{s}`: must be above zero"));
    }
    Ok(value)
}

impl UpCommand {
    /// `--cluster`, `--node`, `--app`, `--lease-ttl`.
    fn cluster_options(&self, app: &AppSpec) -> Result<Option<crate::cluster::ClusterOptions>> {
        let Some(url) = &self.cluster else {
            return Ok(None);
        };
        let endpoints = crate::cluster::parse_url(url).map_err(anyhow::Error::msg)?;
        let node = match &self.node {
            Some(node) => node.clone(),
            None => hostname()?,
        };
        crate::cluster::check_name("--node", &node).map_err(anyhow::Error::msg)?;
        let app = match &self.app {
            Some(name) => name.clone(),
            None => app
                .dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        crate::cluster::check_name("--app", &app).map_err(|e| {
            anyhow::anyhow!("{e}; the default is the Procfile's directory name: give `--app NAME`")
        })?;
        let labels = self
            .label
            .iter()
            .map(|l| crate::cluster::parse_label(l))
            .collect::<Result<_, _>>()
            .map_err(anyhow::Error::msg)?;
        Ok(Some(crate::cluster::ClusterOptions {
            endpoints,
            node,
            app,
            lease_ttl: self.lease_ttl,
            labels,
        }))
    }

    /// The front-door limits given as flags; unset ones come from the manifest's `[http]`.
    fn http_flags(&self) -> HttpSettings {
        HttpSettings {
            max_body: self.max_body,
            max_headers: self.max_headers.map(|n| n as usize),
            max_head_bytes: self.max_head_bytes,
            header_timeout: self.header_timeout,
            body_timeout: self.body_timeout,
            keepalive_timeout: self.keepalive_timeout,
            max_connections: self.max_connections.map(|n| n as usize),
            max_fields_size: self.max_http_fields_size,
        }
    }
}

impl UpCommand {
    /// Runs the formation until a signal arrives, `wasmform down` asks, or the command given
    /// after `--` exits; the exit code is that command's status, else success.
    pub fn execute(self) -> Result<ExitCode> {
        // Before anything starts: a process that is already gone would reap the host at once.
        let exit_with = match self.exit_with {
            Some(pid) => Some(Pidfd::open(pid).map_err(|e| {
                anyhow::anyhow!(
                    "--exit-with {pid}: cannot watch process {pid} ({e}): give the pid of a running process, e.g. `--exit-with $$` for the calling shell"
                )
            })?),
            None => None,
        };
        let mut app = AppSpec::load(&self.procfile)?;
        if self.build {
            build(&app)?;
            app = AppSpec::load(&self.procfile)?;
        }
        // A build runs here, before the wait for readiness starts (the host's own build is
        // then a no-op).
        if self.detach && std::env::var_os(super::detach::DETACHED_ENV).is_none() {
            // The foreground half: the host itself is this command again, detached.
            return super::detach::Detach {
                state: super::detach::state_dir(self.state_dir.as_ref(), &app.dir),
                wait_timeout: self.wait_timeout,
                json: self.json,
                keep_on_failure: self.keep_on_failure,
            }
            .run();
        }
        let state = super::detach::state_dir(self.state_dir.as_ref(), &app.dir);
        let control = state.socket();
        let state_dir = state.path().to_path_buf();
        let options = HostOptions {
            formation: self.formation.clone(),
            memory: self.memory,
            max_memory: self.max_memory,
            capacity: self.capacity,
            state_dir: Some(state_dir),
            request_timeout: self.request_timeout,
            queue_limit: self.queue,
            rotate: self.rotate,
            http: crate::proxy::HttpLimits::from_settings(self.http_flags().or(app.http)),
            log_requests: !self.no_router_log,
            error_detail: self.error_detail,
            metrics: self.metrics,
            health: self.health,
            control_tcp: self.control_tcp.map(|addr| crate::control::TcpControl {
                addr,
                token_file: self.control_token_file.clone().unwrap_or_default(),
                host: self.control_host.clone(),
                tls: self
                    .control_tls_cert
                    .clone()
                    .zip(self.control_tls_key.clone()),
            }),
            restart: RestartPolicy {
                base: self.restart_delay,
                max: self.restart_max.max(self.restart_delay),
                ..RestartPolicy::default()
            },
            max_instances: self.max_instances,
            cache: !self.no_cache,
            max_component_size: self.max_component_size,
            compile_timeout: self.compile_timeout,
            source: Some(self.procfile.clone()),
            keep_releases: self.keep_releases,
            cluster: self.cluster_options(&app)?,
        };
        // Validate and compile everything before binding the port (nothing listens on error).
        let notifier = super::systemd::Notifier::from_env();
        notifier.compiling(app.processes.len(), self.compile_timeout);
        let host = Host::new(app, options)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("failed to start the async runtime")?;
        let result = runtime.block_on(self.serve(host, &control, exit_with, notifier));
        // Do not wait for the log printer if stdout stopped reading: it runs on a blocking
        // thread, which a plain drop of the runtime would wait for.
        runtime.shutdown_timeout(Duration::from_secs(1));
        result
    }

    async fn serve(
        &self,
        host: Host,
        control: &Path,
        exit_with: Option<Pidfd>,
        notifier: super::systemd::Notifier,
    ) -> Result<ExitCode> {
        let addr = format!("{}:{}", self.host, self.port);
        // systemd socket activation: the front door's socket is named `web` or `http`, or
        // bound to `-h`/`-p`'s address.
        let mut activated = crate::host::Activated::from_env()?;
        let passed = activated.take("the front door", &["web", "http"], addr.parse().ok())?;
        let listener = match passed {
            Some(listener) => listener,
            None => tokio::net::TcpListener::bind(&addr).await.with_context(|| {
                format!("cannot listen on {addr}: is another server using the port? pick another with `-p PORT` (or `-p 0` for any free port)")
            })?,
        };
        let mut host = host;
        host.adopt(activated);
        // What `--watch` compares against is read before `listening` is logged, so every
        // change made after it deploys.
        let watched = if self.watch {
            let source = self.procfile.clone();
            Some(tokio::task::spawn_blocking(move || snapshot(&source)).await?)
        } else {
            None
        };
        let running = host.start(listener).await?;
        notifier.spawn(running.ps_source());
        if let Some(first) = watched {
            let deployer = running.deployer();
            let source = self.procfile.clone();
            tokio::spawn(async move { watch(source, first, deployer).await });
        }
        let mut signal = Signals::new()?;
        let mut command = match self.command.split_first() {
            Some((program, args)) => {
                match Foreground::spawn(program, args, running.local_addr(), control) {
                    Ok(command) => Some(command),
                    Err(e) => {
                        running.log(format!("{e:#}: shutting down"));
                        running.shutdown(self.grace).await;
                        return Err(e);
                    }
                }
            }
            None => None,
        };
        let (why, code) = tokio::select! {
            name = signal.next() => (format!("{name} received"), signal_exit(name, &command)),
            () = running.stop_requested() => (
                "shutdown requested (`wasmform down`)".to_string(),
                ExitCode::SUCCESS,
            ),
            ended = Foreground::wait(&mut command) => ended,
            pid = reaped(exit_with) => (
                format!("process {pid} ended (--exit-with)"),
                ExitCode::SUCCESS,
            ),
            () = expired(self.ttl) => (
                format!(
                    "--ttl {} reached",
                    crate::units::humanize(self.ttl.unwrap_or_default())
                ),
                ExitCode::from(124),
            ),
        };
        notifier.stopping(&why);
        running.log(format!(
            "{why}: shutting down (grace {}; send SIGINT or SIGTERM again to exit at once)",
            crate::units::humanize(self.grace)
        ));
        tokio::spawn(async move {
            let name = signal.next().await;
            eprintln!("wasmform: second {name}: exiting now");
            std::process::exit(130);
        });
        if let Some(command) = command {
            // Nothing outlives `up`: a command still running (wasmform was signalled, or
            // `down` asked) is stopped first.
            command.stop().await;
        }
        running.shutdown(self.grace).await;
        Ok(code)
    }
}

/// Resolves with the pid once the `--exit-with` process has ended; never without one.
async fn reaped(process: Option<Pidfd>) -> libc::pid_t {
    match process {
        Some(process) => {
            let pid = process.pid();
            process.exited().await;
            pid
        }
        None => std::future::pending().await,
    }
}

/// Resolves once `--ttl` has passed since the host started; never without one.
async fn expired(ttl: Option<Duration>) {
    match ttl {
        Some(ttl) => tokio::time::sleep(ttl).await,
        None => std::future::pending().await,
    }
}

/// The exit status of `up` stopped by signal `name`: success for a graceful stop, as foreman
/// and Heroku treat SIGTERM; with a command after `--`, which did not finish, the status a
/// shell reports for a command killed by that signal (128 + signal).
fn signal_exit(name: &str, command: &Option<Foreground>) -> ExitCode {
    match command {
        None => ExitCode::SUCCESS,
        Some(_) => ExitCode::from(if name == "SIGINT" { 130 } else { 143 }),
    }
}

/// The command after `--`, running beside the formation.
struct Foreground {
    program: String,
    pid: u32,
    waiter: tokio::task::JoinHandle<std::io::Result<std::process::ExitStatus>>,
}

impl Foreground {
    /// Starts `program` with the host's address and control socket in its environment.
    fn spawn(program: &str, args: &[String], addr: SocketAddr, control: &Path) -> Result<Self> {
        let mut child = std::process::Command::new(program)
            .args(args)
            .env("WASMFORM_URL", format!("http://{addr}"))
            .env("PORT", addr.port().to_string())
            .env("WASMFORM_CONTROL", control)
            // The sockets systemd passed are the host's, not the command's.
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .spawn()
            .with_context(|| {
                format!(
                    "cannot run `{program}` (the command after `--`): is it installed and on PATH?"
                )
            })?;
        let pid = child.id();
        let waiter = tokio::task::spawn_blocking(move || child.wait());
        Ok(Self {
            program: program.to_string(),
            pid,
            waiter,
        })
    }

    /// Waits for the command to exit: why the host stops, and `up`'s exit code (the command's
    /// status; 128 + the signal that killed it). Never resolves without a command.
    async fn wait(command: &mut Option<Self>) -> (String, ExitCode) {
        let Some(foreground) = command else {
            return std::future::pending().await;
        };
        let status = (&mut foreground.waiter).await;
        let program = foreground.program.clone();
        *command = None;
        match status {
            Ok(Ok(status)) => {
                let code = status
                    .code()
                    .or_else(|| status.signal().map(|s| 128 + s))
                    .unwrap_or(1);
                (
                    format!("`{program}` exited with status {code}"),
                    ExitCode::from(u8::try_from(code).unwrap_or(1)),
                )
            }
            _ => (format!("lost track of `{program}`"), ExitCode::FAILURE),
        }
    }

    /// Stops the command: SIGTERM, then SIGKILL if it is still running after 5 s.
    async fn stop(mut self) {
        let pid = libc::pid_t::try_from(self.pid).unwrap_or(0);
        // SAFETY: kill has no memory preconditions; the pid is our own child's, not yet
        // waited for (`waiter` holds it), so it cannot have been reused.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        if tokio::time::timeout(Duration::from_secs(5), &mut self.waiter)
            .await
            .is_err()
        {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = self.waiter.await;
        }
    }
}

/// SIGINT and SIGTERM, whichever comes first.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            int: signal(SignalKind::interrupt()).context("failed to install the SIGINT handler")?,
            term: signal(SignalKind::terminate())
                .context("failed to install the SIGTERM handler")?,
        })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}

/// `--watch`: polls the app's files and deploys when they changed and then stayed the same
/// for one more poll (a build writing a component in several steps deploys once, complete).
/// Each poll reads the files' stamps on a blocking thread; only stamps that moved have the
/// contents read, and only different contents deploy: a file touched but unchanged (a `touch`,
/// a rebuild to the same bytes) does not, so it cannot undo a rollback.
async fn watch(
    source: PathBuf,
    first: Snapshot,
    deployer: std::sync::Arc<crate::deploy::Deployer>,
) {
    const POLL: Duration = Duration::from_millis(250);
    let scan = |source: &PathBuf, last: Vec<PathBuf>| {
        let source = source.clone();
        async move {
            tokio::task::spawn_blocking(move || watched_files(&source, last))
                .await
                .unwrap_or_default()
        }
    };
    let (mut watched, mut deployed, mut contents) = first;
    let mut seen = deployed.clone();
    loop {
        tokio::time::sleep(POLL).await;
        // The file list itself may change (a new type in the Procfile).
        let (now_files, now) = scan(&source, watched.clone()).await;
        if now_files != watched {
            watched = now_files;
            deployed = Vec::new();
        }
        let settled = now == seen;
        seen = now.clone();
        if now == deployed || !settled {
            continue;
        }
        deployed = now;
        let files = watched.clone();
        let now_contents = tokio::task::spawn_blocking(move || digests(&files))
            .await
            .unwrap_or_default();
        if now_contents == contents {
            continue;
        }
        contents = now_contents;
        // The outcome (or the reason it failed) is in the log.
        let _ = deployer.deploy().await;
    }
}

/// When and how big a watched file was last (`None`: missing).
type Stamp = Option<(std::time::SystemTime, u64)>;

/// The watched files, their stamps and their contents' digests, read together.
type Snapshot = (Vec<PathBuf>, Vec<Stamp>, Vec<Option<Vec<u8>>>);

/// The first [`Snapshot`]: stamps read again after the contents, until they agree, so a file
/// changed meanwhile is not taken as seen. Blocking.
fn snapshot(source: &Path) -> Snapshot {
    let (mut files, mut stamps) = watched_files(source, Vec::new());
    loop {
        let contents = digests(&files);
        let (again, after) = watched_files(source, files.clone());
        if (&again, &after) == (&files, &stamps) {
            return (files, stamps, contents);
        }
        (files, stamps) = (again, after);
    }
}

/// SHA-256 of each file's contents (`None`: unreadable). Blocking.
fn digests(files: &[PathBuf]) -> Vec<Option<Vec<u8>>> {
    use sha2::Digest as _;
    files
        .iter()
        .map(|f| {
            std::fs::read(f)
                .ok()
                .map(|bytes| sha2::Sha256::digest(bytes).to_vec())
        })
        .collect()
}

/// The files `--watch` follows (the configuration files and every component; `last` while
/// the configuration does not load) and their stamps. Blocking.
fn watched_files(source: &Path, last: Vec<PathBuf>) -> (Vec<PathBuf>, Vec<Stamp>) {
    let files = match AppSpec::load(source) {
        Ok(app) => app
            .sources
            .iter()
            .cloned()
            .chain(app.processes.iter().map(|p| p.component.clone()))
            .collect(),
        Err(_) => last,
    };
    let stamps = files
        .iter()
        .map(|f| {
            std::fs::metadata(f)
                .ok()
                .map(|m| (m.modified().unwrap_or(std::time::UNIX_EPOCH), m.len()))
        })
        .collect();
    (files, stamps)
}

/// `--build`: runs the manifest's `[build] command` with `sh -c`, or `cargo build --release`,
/// in the app's directory.
fn build(app: &AppSpec) -> Result<()> {
    let dir = &app.dir;
    let (mut command, shown) = match &app.build {
        Some(line) => {
            let mut command = std::process::Command::new("sh");
            command.args(["-c", line]);
            (command, line.clone())
        }
        None => {
            let mut command = std::process::Command::new(
                std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()),
            );
            command.args(["build", "--release"]);
            (command, "cargo build --release".to_string())
        }
    };
    eprintln!("wasmform: building in {}: {shown}", dir.display());
    let status = command
        .current_dir(dir)
        .status()
        .with_context(|| format!("failed to run `{shown}` in `{}`", dir.display()))?;
    anyhow::ensure!(
        status.success(),
        "`{shown}` in `{}` failed ({status}); if the wasm32-wasip2 target is missing, run `rustup target add wasm32-wasip2`",
        dir.display()
    );
    Ok(())
}

/// This machine's host name, the default `--node`.
fn hostname() -> Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("--cluster: cannot read the host name for the node's name: give `--node NAME`")?;
    Ok(name.trim().to_string())
}
