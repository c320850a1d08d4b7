//! wasmform runs a Procfile of WASI 0.2 components as a *formation*: N isolated,
//! memory-limited instances per process type in one host process. HTTP is round-robined over
//! the instances of the web type; components exporting `wasi:cli/run` run as supervised
//! background workers.
//!
//! # Embedding
//!
//! The CLI is a thin layer over [`Host`]; embedders and tests use the same API:
//!
//! ```no_run
//! use std::path::Path;
//! use wasmform::{AppSpec, Host, HostOptions};
//!
//! # async fn run() -> anyhow::Result<()> {
//! let app = AppSpec::from_procfile(Path::new("guest-examples/Procfile"))?;
//! let options = HostOptions { formation: Some("web=2".into()), ..HostOptions::default() };
//! // Validates the formation and compiles every component before anything listens.
//! let host = tokio::task::spawn_blocking(move || Host::new(app, options)).await??;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let running = host.start(listener).await?;
//! println!("serving on http://{}", running.local_addr());
//! running.shutdown(std::time::Duration::from_secs(30)).await;
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//!
//! Data flows one way:
//!
//! ```text
//! Procfile ─► procfile ─┐
//! wasmform.toml ─► manifest ─┼► app::AppSpec ─► release::ReleaseStore (stage: store + hash)
//! .env ──────────────────┘        ─► Host::new (formation, compile) ─► Host::start
//!                                                    │
//!   CLI scale/ps/logs ─► control ─► supervisor: desired formation, one task per slot,
//!   CLI deploy/rollback ─► deploy ─┘  restart policies, health checks, capacity, singletons,
//!                                     rolling replacement and roll-back of versions
//!                                                    ├── web instances ─► router::Pool ◄── proxy (hyper)
//!                                                    ├── workers (wasi:cli/run, idle-priority runtime)
//!                                                    └── consumers ◄── shared::Store (queues, buckets)
//!   guest stdout/stderr and host events ─► logs ─► stdout, history, followers
//! ```
//!
//! - [`procfile`]: Procfile parsing, errors with line numbers.
//! - [`manifest`]: the `wasmform.toml` schema, errors with line, column and key path.
//! - [`app`]: the resolved app (Procfile + manifest + `.env`) and validated values
//!   ([`ByteSize`], [`ProcessName`]).
//! - [`formation`]: desired counts per type, foreman's `-m` syntax.
//! - [`release`]: numbered immutable releases and their stored components.
//! - [`deploy`]: deploys and rollbacks of a running host: validate and compile, then roll.
//! - [`runtime`]: the only owner of the wasmtime `Engine`, `Linker`, pooling allocator, epoch
//!   ticker and store data (including the outgoing-HTTP allow-list).
//! - [`shared`]: shared state for scaled-out types: key-value buckets and job queues, on an
//!   embedded SQLite store or Redis; `runtime::shared` exposes them to guests.
//! - [`instance`]: one web instance (requests, health checks), worker run or queue consumer.
//! - [`supervisor`]: slots, restarts, health checks, versions of types and their roll-out.
//! - [`router`]: round-robin over free instances with a bounded queue; no wasmtime types.
//! - [`proxy`]: the hyper server, front-door limits and status mapping.
//! - [`logs`]: the foreman-style log stream, its history and followers.
//! - [`control`]: the control API (Unix socket, optional TCP with a token) that the client
//!   commands talk to.
//! - [`state`]: the state directory: the persisted formation and the control socket.
//! - [`metrics`]: Prometheus metrics.
//! - [`cli`]: one file per subcommand.

pub mod app;
pub mod cli;
pub mod control;
pub mod deploy;
pub mod formation;
pub mod instance;
pub mod logs;
pub mod manifest;
pub mod metrics;
pub mod procfile;
pub mod proxy;
pub mod release;
pub mod router;
pub mod runtime;
pub mod shared;
pub mod state;
pub mod supervisor;

/// Outside tools for the unit tests (`redis-server`), shared with the integration tests.
#[cfg(test)]
#[path = "../tests/all/tools.rs"]
mod test_tools;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use crate::app::{AppSpec, ByteSize, ProcessName};
pub use crate::formation::Formation;
pub use crate::supervisor::RestartPolicy;

use crate::logs::Logs;
use crate::proxy::Router;
use crate::release::ReleaseStore;
use crate::runtime::{Compiled, EngineSettings, Runtime};
use crate::state::StateDir;
use crate::supervisor::{Limits, Supervisor, SupervisorConfig};

/// Default memory limit per instance.
pub const DEFAULT_MEMORY: ByteSize = ByteSize::mib(256);

/// Settings of a host, as `wasmform up` takes them.
#[derive(Clone, Debug)]
pub struct HostOptions {
    /// foreman's `-m`: `web=2,worker=1`, `all=0`. Default: the stored formation, else one
    /// instance of each type.
    pub formation: Option<String>,
    /// Memory limit of each instance of every type. Default: the stored limits, else 256 MiB.
    pub memory: Option<ByteSize>,
    /// Largest memory limit `scale` may set; sizes the engine's memory slots. Default: 1 GiB or
    /// the formation's largest limit.
    pub max_memory: Option<ByteSize>,
    /// Memory budget for all instances. Default: the machine's (or cgroup's) memory.
    pub capacity: Option<ByteSize>,
    /// Longest time for a guest to produce response headers (504 after).
    pub request_timeout: Duration,
    /// Requests that may wait for a free instance before 503.
    pub queue_limit: usize,
    /// How many free instances of a type rotate round-robin (0: all); see [`router`].
    pub rotate: usize,
    /// Limits of the HTTP front door.
    pub http: proxy::HttpLimits,
    /// One `at=info` log line per request, Heroku router style.
    pub log_requests: bool,
    /// Also serve `/metrics` on this loopback TCP address.
    pub metrics: Option<SocketAddr>,
    /// Also serve the control API on TCP, with a bearer token.
    pub control_tcp: Option<control::TcpControl>,
    /// Restart backoff for crashed instances.
    pub restart: RestartPolicy,
    /// Instances that may exist at once (sizes the pooling allocator). Default: enough for the
    /// formation with room to scale, at least 1024.
    pub max_instances: Option<u32>,
    /// Cache compiled components on disk.
    pub cache: bool,
    /// Largest component file accepted.
    pub max_component_size: ByteSize,
    /// Longest a component may take to compile at start.
    pub compile_timeout: Duration,
    /// State directory (persisted formation, releases, control socket). `None`: none of
    /// them (releases are then kept in memory).
    pub state_dir: Option<PathBuf>,
    /// The Procfile or manifest the app was read from: `deploy` reads it again. `None`: the
    /// app was built in code and cannot be redeployed from files.
    pub source: Option<PathBuf>,
    /// Releases kept; older ones and the components only they used are pruned.
    pub keep_releases: usize,
}

impl Default for HostOptions {
    fn default() -> Self {
        Self {
            formation: None,
            memory: None,
            max_memory: None,
            capacity: None,
            request_timeout: Duration::from_secs(30),
            queue_limit: 1024,
            rotate: router::HOT,
            http: proxy::HttpLimits::default(),
            log_requests: true,
            metrics: None,
            control_tcp: None,
            restart: RestartPolicy::default(),
            max_instances: None,
            cache: true,
            max_component_size: ByteSize::mib(512),
            compile_timeout: Duration::from_secs(300),
            state_dir: None,
            source: None,
            keep_releases: release::DEFAULT_KEEP,
        }
    }
}

/// A validated, compiled app, ready to start.
pub struct Host {
    formation: Formation,
    runtime: Arc<Runtime>,
    /// Every process type with its compiled component, in Procfile order.
    processes: Vec<(app::ProcessSpec, Arc<Compiled>)>,
    /// Index into `processes` of the type HTTP is routed to.
    routed: Option<usize>,
    options: HostOptions,
    limits: Limits,
    state: Option<StateDir>,
    /// Notes for the log once it exists (e.g. stored types no longer in the Procfile).
    notes: Vec<String>,
    /// How long compiling took, for the start-up line.
    compile_time: Duration,
    /// Per type, for the metrics.
    compile_times: Vec<(String, Duration)>,
    /// Extra HTTP listeners from the manifest.
    services: Vec<app::Service>,
    /// The app's releases.
    releases: ReleaseStore,
    /// The release being started.
    release: u32,
    /// `[state] url`, if shared state lives in Redis.
    shared_url: Option<String>,
}

impl Host {
    /// Validates the formation, compiles every component (in parallel) and checks each one's
    /// world. Blocking: call it off the async runtime.
    ///
    /// The formation is, in order: one instance of each type at 256 MiB; the formation stored
    /// in the state directory; `options.formation` and `options.memory`. The result is stored.
    pub fn new(app: AppSpec, options: HostOptions) -> Result<Self> {
        let mut notes = Vec::new();
        let state = options.state_dir.clone().map(StateDir::new);
        if let Some(state) = &state {
            // Before anything is read or stored: a live host owns this state.
            control::ensure_no_live_host(state)?;
            state.create()?;
        }
        let mut releases = ReleaseStore::open(
            state.clone(),
            options.keep_releases,
            options.max_component_size,
        )?;
        let previous = releases.current().cloned();
        let mut staged = releases.stage(app, None)?;
        if let Some(previous) = &previous
            && previous.config_digest != staged.config_digest
            && previous.source.as_deref() == Some(staged.config_digest.as_str())
        {
            // The files are as they were when the current release (a rollback) replaced
            // them: it keeps running, as it would have without the restart.
            notes.push(format!(
                "v{} keeps running ({}): the app's files are unchanged since; `wasmform deploy` runs them",
                previous.version, previous.description
            ));
            staged = releases.stage(previous.app.clone(), Some(previous))?;
        }
        let app = &staged.app;
        let mut formation = Formation::default_for(app, DEFAULT_MEMORY);
        if let Some(state) = &state
            && let Some((stored, dropped)) = state.load_formation(&formation)?
        {
            formation = stored;
            for name in dropped {
                notes.push(format!(
                    "stored formation names `{name}`, which the Procfile no longer defines: ignored"
                ));
            }
        }
        // As in a deploy: a manifest `count` or `memory` that changed since the last release
        // applies; otherwise the stored formation (the last `scale`) stays.
        if let Some(previous) = &previous {
            for spec in &app.processes {
                let Some(old) = previous.app.process(spec.name.as_str()) else {
                    formation.insert(
                        spec.name.clone(),
                        formation::Scale {
                            count: spec.count.unwrap_or(1),
                            memory: spec.memory.unwrap_or(DEFAULT_MEMORY),
                        },
                    );
                    continue;
                };
                let Some(mut scale) = formation.get(&spec.name) else {
                    continue;
                };
                if spec.count != old.count {
                    scale.count = spec.count.unwrap_or(1);
                }
                if spec.memory != old.memory {
                    scale.memory = spec.memory.unwrap_or(DEFAULT_MEMORY);
                }
                formation.insert(spec.name.clone(), scale);
            }
        }
        // `--memory` for every type, then `-m`, whose `web=2:64MiB` wins for the types it sizes.
        if let Some(memory) = options.memory {
            formation.set_memory(memory);
        }
        if let Some(spec) = &options.formation {
            formation
                .apply_spec(spec)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        for spec in app.processes.iter().filter(|p| p.singleton) {
            if formation.get(&spec.name).is_some_and(|s| s.count > 1) {
                bail!(
                    "`{}` is a singleton ({}): it runs at most 1 instance, so its scheduled work is never done twice; use `{}=1`",
                    spec.name,
                    spec.origin,
                    spec.name
                );
            }
        }
        let largest = formation
            .iter()
            .map(|(_, s)| s.memory)
            .max()
            .unwrap_or(DEFAULT_MEMORY);
        let max_memory = options
            .max_memory
            .unwrap_or(ByteSize::mib(1024))
            .max(largest);
        let max_instances = match options.max_instances {
            Some(n) => n,
            None => u32::try_from(formation.total() + 64)
                .unwrap_or(u32::MAX)
                .max(1024),
        };
        if formation.total() > u64::from(max_instances) {
            bail!(
                "the formation ({formation}) has {} instances, more than --max-instances {max_instances}",
                formation.total()
            );
        }
        let capacity = options
            .capacity
            .or(app.capacity)
            .unwrap_or_else(system_memory);
        let runtime = Arc::new(Runtime::new(&EngineSettings {
            max_instances,
            max_memory,
            cache: options.cache,
            max_component_size: options.max_component_size,
        })?);

        let started = Instant::now();
        let work: Vec<_> = staged
            .app
            .processes
            .iter()
            .cloned()
            .zip(staged.files.iter().cloned())
            .collect();
        let compiled = compile_all(&runtime, &work, options.compile_timeout)?;
        let compile_time = started.elapsed();
        let mut processes = Vec::new();
        let mut compile_times = Vec::new();
        for ((spec, _), (compiled, took)) in work.into_iter().zip(compiled) {
            compile_times.push((spec.name.to_string(), took));
            processes.push((spec, Arc::new(compiled)));
        }
        for service in &staged.app.services {
            let (spec, compiled) = processes
                .iter()
                .find(|(p, _)| p.name == service.process)
                .expect("services name known types");
            if !compiled.is_http() {
                bail!(
                    "{}: services.processes: `{}` is a background process ({}), not an HTTP one: a service routes HTTP to a component exporting `wasi:http/incoming-handler`",
                    service.origin,
                    spec.name,
                    spec.component.display()
                );
            }
        }
        let release = match &previous {
            Some(previous) if previous.config_digest == staged.config_digest => previous.version,
            Some(previous) => {
                releases
                    .record(
                        &staged,
                        format!(
                            "Deploy by `up`: the app changed since v{}",
                            previous.version
                        ),
                        true,
                    )?
                    .version
            }
            None => {
                releases
                    .record(&staged, "Initial release".to_string(), true)?
                    .version
            }
        };
        let services = staged.app.services.clone();
        let shared_url = staged.app.state_url.clone();

        let http: Vec<usize> = (0..processes.len())
            .filter(|&i| processes[i].1.is_http())
            .collect();
        let routed = match http
            .iter()
            .find(|&&i| processes[i].0.name.as_str() == "web")
        {
            Some(&web) => Some(web),
            None if http.len() <= 1 => http.first().copied(),
            None => {
                let names: Vec<&str> = http.iter().map(|&i| processes[i].0.name.as_str()).collect();
                bail!(
                    "several HTTP process types ({}) and none is named `web`: name the one that should receive traffic `web`",
                    names.join(", ")
                );
            }
        };
        if let Some(state) = &state {
            state.store_formation(&formation)?;
        }
        Ok(Self {
            formation,
            runtime,
            processes,
            routed,
            limits: Limits {
                capacity,
                max_instances,
                max_memory,
                drain_timeout: options.request_timeout + Duration::from_secs(1),
            },
            options,
            state,
            notes,
            compile_time,
            compile_times,
            services,
            releases,
            release,
            shared_url,
        })
    }

    /// The release this host starts (`vN`).
    pub fn release(&self) -> u32 {
        self.release
    }

    /// The formation this host will start.
    pub fn formation(&self) -> &Formation {
        &self.formation
    }

    /// Starts every instance of the formation, waits until all are up, then serves HTTP on
    /// `listener` (and the control API on the state directory's socket, if there is one). An
    /// instance that cannot even be instantiated fails the start.
    pub async fn start(self, listener: TcpListener) -> Result<RunningHost> {
        let started = Instant::now();
        let addr = listener
            .local_addr()
            .context("listener has no local address")?;
        let control_listener = match &self.state {
            Some(state) => Some(control::bind(state).await?),
            None => None,
        };
        let width = self
            .processes
            .iter()
            .map(|(spec, _)| spec.name.as_str().len() + 5)
            .max()
            .unwrap_or(0);
        let (logs, printer) = Logs::stdout(width);
        let metrics = Arc::new(metrics::Metrics::new());
        for (name, took) in &self.compile_times {
            metrics.compiled(name, took.as_secs_f64());
        }
        let control_tcp = match &self.options.control_tcp {
            Some(control) => Some(control::bind_tcp(control).await?),
            None => None,
        };
        let metrics_listener = match self.options.metrics {
            Some(addr) => {
                if !addr.ip().is_loopback() {
                    bail!(
                        "--metrics {addr}: metrics are served on loopback addresses only (e.g. 127.0.0.1:9090)"
                    );
                }
                Some(TcpListener::bind(addr).await.with_context(|| {
                    format!("cannot serve metrics on {addr}: is the port in use?")
                })?)
            }
            None => None,
        };
        for note in &self.notes {
            logs.host(note.clone());
        }

        let mut service_listeners = Vec::new();
        for service in &self.services {
            let listener = TcpListener::bind(service.listen).await.with_context(|| {
                format!(
                    "{}: cannot listen on {} for `{}`: is the port in use?",
                    service.origin, service.listen, service.process
                )
            })?;
            service_listeners.push((listener, service.process.clone()));
        }
        // Owned by the guard from here on: an early return must not drop a runtime inside
        // this async context.
        let shared = match &self.shared_url {
            Some(url) => Some(shared::Store::open(Some(url), None).await?),
            None => {
                let dir = self.state.as_ref().map(|s| s.path().to_path_buf());
                Some(shared::Store::open(None, dir.as_deref()).await?)
            }
        };
        let background = BackgroundRuntime(Some(background_runtime()?));
        let background_handle = background
            .0
            .as_ref()
            .expect("just created")
            .handle()
            .clone();
        let supervisor = Supervisor::new(SupervisorConfig {
            metrics: metrics.clone(),
            background: background_handle,
            runtime: self.runtime.clone(),
            logs: logs.clone(),
            restart: self.options.restart,
            port: addr.port(),
            limits: self.limits,
            types: self.processes.clone(),
            release: self.release,
            queue_limit: self.options.queue_limit,
            rotate: self.options.rotate,
            default_memory: self.options.memory.unwrap_or(DEFAULT_MEMORY),
            shared: shared.clone(),
            formation: self.formation.clone(),
            store: self.state.clone(),
        });
        if let Err(failure) = supervisor.start().await {
            supervisor.shutdown(Duration::from_secs(5)).await;
            bail!("{failure}");
        }

        let routed_name = self
            .routed
            .map(|i| self.processes[i].0.name.to_string())
            .unwrap_or_default();
        let routed_pool = self
            .routed
            .map(|i| supervisor.pool(&self.processes[i].0.name));
        let router = Arc::new(Router {
            pool: routed_pool,
            process: routed_name.clone(),
            request_timeout: self.options.request_timeout,
            logs: logs.clone(),
            limits: self.options.http,
            log_requests: self.options.log_requests,
            metrics: metrics.http(&routed_name),
            refusals: Default::default(),
        });
        let stop_http = CancellationToken::new();
        let server = tokio::spawn(proxy::serve(listener, router, stop_http.clone()));
        let mut services = Vec::new();
        // Which types the listeners bound now route to: a deploy must keep them HTTP types.
        let mut routes = Vec::new();
        if self.routed.is_some() {
            routes.push(("the main HTTP port".to_string(), routed_name.clone()));
        }
        for (listener, process) in service_listeners {
            let addr = listener.local_addr()?;
            routes.push((format!("the service on {addr}"), process.to_string()));
            let router = Arc::new(Router {
                pool: Some(supervisor.pool(&process)),
                process: process.to_string(),
                request_timeout: self.options.request_timeout,
                logs: logs.clone(),
                limits: self.options.http,
                log_requests: self.options.log_requests,
                metrics: metrics.http(process.as_str()),
                refusals: Default::default(),
            });
            services.push(tokio::spawn(proxy::serve(
                listener,
                router,
                stop_http.clone(),
            )));
            logs.host(format!("service `{process}` serving http://{addr}"));
            // As the control API needs `--control-public` for it, a service reachable from
            // other machines is said so, once, where the operator reads.
            if !addr.ip().is_loopback() {
                logs.host(format!(
                    "service `{process}` listens on {addr}, which other machines can reach, not only this one: use 127.0.0.1 in its `listen` unless that is meant"
                ));
            }
        }
        let deployer = Arc::new(deploy::Deployer {
            source: self.options.source.clone(),
            runtime: self.runtime.clone(),
            supervisor: supervisor.clone(),
            releases: tokio::sync::Mutex::new(self.releases),
            ops: tokio::sync::Mutex::new(()),
            compile_timeout: self.options.compile_timeout,
            logs: logs.clone(),
            routes,
            metrics: metrics.clone(),
        });
        let api = control::Api::new(
            supervisor.clone(),
            logs.clone(),
            metrics.clone(),
            deployer.clone(),
        );
        let control = control_listener.map(|(listener, path)| {
            let task = tokio::spawn(control::serve(listener, api.clone(), stop_http.clone()));
            (task, path)
        });
        if let Some((listener, token, host)) = control_tcp {
            let addr = listener.local_addr()?;
            tokio::spawn(control::serve_tcp(
                listener,
                api.clone(),
                token,
                host,
                stop_http.clone(),
            ));
            logs.host(format!(
                "control API on http://{addr} (bearer token required)"
            ));
        }
        logs.host(format!(
            "release v{}: formation {} up in {} (compiled {} components in {})",
            self.release,
            self.formation,
            humanize(started.elapsed()),
            self.processes.len(),
            humanize(self.compile_time)
        ));
        if let Some((_, path)) = &control {
            logs.host(format!("control API on {}", path.display()));
        }
        if let Some(listener) = metrics_listener {
            let addr = listener.local_addr()?;
            tokio::spawn(control::serve_metrics(
                listener,
                supervisor.clone(),
                metrics.clone(),
                stop_http.clone(),
            ));
            logs.host(format!("metrics on http://{addr}/metrics"));
        }
        if let Some(shared) = &shared {
            logs.host(format!("shared state: {}", shared.describe()));
        }
        logs.host(format!("listening on http://{addr}"));
        Ok(RunningHost {
            addr,
            deployer,
            services,
            supervisor,
            background,
            stop_http,
            server,
            control,
            printer,
            logs,
        })
    }
}

/// Compiles every `(type, file)` in parallel, one thread each, and checks each component's
/// world. A compile that outlives `timeout` is refused (its thread is abandoned: wasmtime
/// cannot cancel a compile). Blocking: call it off the async runtime.
pub(crate) fn compile_all(
    runtime: &Arc<Runtime>,
    work: &[(app::ProcessSpec, PathBuf)],
    timeout: Duration,
) -> Result<Vec<(Compiled, Duration)>> {
    let deadline = Instant::now() + timeout;
    let pending: Vec<_> = work
        .iter()
        .map(|(spec, file)| {
            let (tx, rx) = std::sync::mpsc::channel();
            let (runtime, spec, file) = (runtime.clone(), spec.clone(), file.clone());
            std::thread::spawn(move || {
                let started = Instant::now();
                let _ = tx.send(
                    runtime
                        .compile(&spec, &file)
                        .map(|c| (c, started.elapsed())),
                );
            });
            rx
        })
        .collect();
    let mut compiled = Vec::new();
    for ((spec, _), rx) in work.iter().zip(pending) {
        let left = deadline.saturating_duration_since(Instant::now());
        compiled.push(match rx.recv_timeout(left) {
            Ok(Ok((c, took))) => {
                if let Some(error) = misplaced_setting(spec, &c) {
                    bail!(error);
                }
                (c, took)
            }
            Ok(Err(e)) => return Err(e),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => bail!(
                "process type `{}` ({}): component `{}` took longer than {} to compile: \
                 raise `--compile-timeout` if it is meant to be this big",
                spec.name,
                spec.origin,
                spec.component.display(),
                humanize(timeout)
            ),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                bail!("the compile thread for `{}` panicked", spec.name)
            }
        });
    }
    Ok(compiled)
}

/// A setting of `spec` that its compiled component's kind does not take, as the error to
/// report at the key that set it.
fn misplaced_setting(spec: &app::ProcessSpec, compiled: &runtime::Compiled) -> Option<String> {
    let file = spec.component.display();
    let consumer = matches!(compiled.kind, runtime::Kind::Consumer(_));
    let background = matches!(compiled.kind, runtime::Kind::Command(_));
    let kind = compiled.kind_name();
    if !compiled.is_http()
        && let Some((key, _)) = [
            ("health", spec.health.is_some()),
            ("max_requests", spec.max_requests.is_some()),
        ]
        .into_iter()
        .find(|(_, set)| *set)
    {
        return Some(format!(
            "{}: `{file}` is a {} process (it exports {}): `health` and `max_requests` apply to HTTP process types only; remove them",
            spec.origin_of(key),
            if consumer {
                "queue consumer"
            } else {
                "background"
            },
            if consumer {
                "`wasmform:host/consumer`"
            } else {
                "`wasi:cli/run`"
            },
        ));
    }
    if background && spec.set_at.contains_key("request_timeout") {
        return Some(format!(
            "{}: `{file}` is a background process (it exports `wasi:cli/run`), which serves no requests: `request_timeout` applies to HTTP types and queue consumers; remove it",
            spec.origin_of("request_timeout")
        ));
    }
    if consumer && spec.consume.is_none() {
        return Some(format!(
            "process type `{}` ({}): `{file}` is a queue consumer (it exports `wasmform:host/consumer`) but names no queue: add `consume = \"jobs\"` to `[processes.{}]` in wasmform.toml",
            spec.name, spec.origin, spec.name
        ));
    }
    if !consumer && spec.consume.is_some() {
        return Some(format!(
            "{}: `consume` needs a queue consumer, but `{file}` is a {kind} process (a consumer exports `wasmform:host/consumer`)",
            spec.origin_of("consume")
        ));
    }
    if !consumer && spec.set_at.contains_key("max_attempts") {
        return Some(format!(
            "{}: `{file}` is a {kind} process: `max_attempts` applies to queue consumers only (deliveries of a message); remove it",
            spec.origin_of("max_attempts")
        ));
    }
    None
}

/// A runtime for background processes whose threads run at a lower priority (nice 10): the
/// kernel then gives web instances the CPU they ask for, and CPU-bound workers the rest.
fn background_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .thread_name("wasmform-bg")
        .on_thread_start(|| {
            // SCHED_IDLE: these threads run only when no normal thread wants the CPU. On
            // Linux, pid 0 means the calling thread. Failing to lower the priority only costs
            // fairness, so it is not an error.
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: `param` is a valid sched_param for the duration of the call.
            let _ = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
        })
        .enable_all()
        .build()
        .context("failed to start the background runtime")
}

/// The machine's memory, or its cgroup's limit if lower: the default capacity.
fn system_memory() -> ByteSize {
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kib| kib.parse::<u64>().ok())
            .map(|kib| kib * 1024)
    });
    let bytes = match (cgroup, total) {
        (Some(c), Some(t)) => c.min(t),
        (c, t) => c.or(t).unwrap_or(4 << 30),
    };
    ByteSize::bytes(bytes)
}

/// A started host. Dropping it without [`RunningHost::shutdown`] leaves tasks running until
/// the runtime ends.
pub struct RunningHost {
    addr: SocketAddr,
    /// Deploys and rollbacks.
    deployer: Arc<deploy::Deployer>,
    /// The `[[services]]` servers.
    services: Vec<tokio::task::JoinHandle<()>>,
    supervisor: Arc<Supervisor>,
    /// Cancelled to stop accepting connections (HTTP and control).
    stop_http: CancellationToken,
    server: tokio::task::JoinHandle<()>,
    /// The control API task and its socket path, removed at shutdown.
    control: Option<(tokio::task::JoinHandle<()>, PathBuf)>,
    printer: tokio::task::JoinHandle<()>,
    logs: Logs,
    /// The background processes' runtime; shut down after the supervisor.
    background: BackgroundRuntime,
}

/// Owns the background runtime and shuts it down without blocking when dropped: a runtime may
/// not be dropped the ordinary (blocking) way inside another one.
struct BackgroundRuntime(Option<tokio::runtime::Runtime>);

impl Drop for BackgroundRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

impl RunningHost {
    /// The address HTTP is served on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Deploys and rollbacks of this host.
    pub fn deployer(&self) -> Arc<deploy::Deployer> {
        self.deployer.clone()
    }

    /// Logs a host event.
    pub fn log(&self, text: impl Into<String>) {
        self.logs.host(text);
    }

    /// Graceful shutdown: stop accepting connections, let in-flight requests finish within
    /// `grace`, then stop every instance (workers included) and flush the log.
    pub async fn shutdown(self, grace: Duration) {
        let deadline = Instant::now() + grace;
        self.stop_http.cancel();
        let mut server = self.server;
        if tokio::time::timeout(grace, &mut server).await.is_err() {
            tracing::warn!("grace period over; dropping the remaining connections");
            server.abort();
        }
        for mut service in self.services {
            let left = deadline.saturating_duration_since(Instant::now());
            if tokio::time::timeout(left, &mut service).await.is_err() {
                service.abort();
            }
        }
        if let Some((task, path)) = self.control {
            task.abort();
            let _ = std::fs::remove_file(path);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if !self.supervisor.shutdown(left).await {
            tracing::warn!("some instances did not stop within the grace period");
        }
        self.logs.host("stopped");
        let Self {
            supervisor,
            logs,
            printer,
            background,
            ..
        } = self;
        drop((supervisor, logs, background));
        // Instances still parked in pools hold log sinks; give the printer a moment to drain.
        let _ = tokio::time::timeout(Duration::from_millis(500), printer).await;
    }
}

/// Formats a duration for people: `850 µs`, `12.3 ms`, `2 s`, `1.5 min`.
pub fn humanize(d: Duration) -> String {
    let micros = d.as_micros();
    if micros < 1_000 {
        format!("{micros} µs")
    } else if micros < 1_000_000 {
        format!("{:.1} ms", micros as f64 / 1000.0)
    } else if d.as_secs() < 120 {
        let s = d.as_secs_f64();
        if s.fract() == 0.0 {
            format!("{s} s")
        } else {
            format!("{s:.1} s")
        }
    } else {
        format!("{:.1} min", d.as_secs_f64() / 60.0)
    }
}
