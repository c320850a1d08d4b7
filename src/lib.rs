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
//! Procfile ─► procfile ─► app::AppSpec ─► Host::new (formation, compile) ─► Host::start
//!                                                    │
//!   supervisor: one task per slot, restart backoff ──┤── web instances ─► router::Pool ◄── proxy (hyper)
//!                                                    └── workers (wasi:cli/run)
//!   guest stdout/stderr and host events ─► logs ─► stdout
//! ```
//!
//! - [`procfile`]: Procfile parsing, errors with line numbers.
//! - [`app`]: the resolved app and validated values ([`ByteSize`], [`ProcessName`]).
//! - [`formation`]: desired counts per type, foreman's `-m` syntax.
//! - [`runtime`]: the only owner of the wasmtime `Engine`, `Linker`, pooling allocator, epoch
//!   ticker and store data.
//! - [`instance`]: one web instance or worker run.
//! - [`supervisor`]: slots, restarts with backoff.
//! - [`router`]: round-robin over free instances with a bounded queue; no wasmtime types.
//! - [`proxy`]: the hyper server and status mapping.
//! - [`logs`]: the foreman-style log stream.

pub mod app;
pub mod cli;
pub mod formation;
pub mod instance;
pub mod logs;
pub mod procfile;
pub mod proxy;
pub mod router;
pub mod runtime;
pub mod supervisor;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::app::{AppSpec, ByteSize, ProcessName};
pub use crate::formation::Formation;
pub use crate::supervisor::RestartPolicy;

use crate::logs::Logs;
use crate::proxy::Router;
use crate::router::Pool;
use crate::runtime::{Compiled, EngineSettings, Runtime};
use crate::supervisor::{ProcessType, Supervisor};

/// Settings of a host, as `wasmform up` takes them.
#[derive(Clone, Debug)]
pub struct HostOptions {
    /// foreman's `-m`: `web=2,worker=1`, `all=0`. Default: one instance of each type.
    pub formation: Option<String>,
    /// Memory limit of each instance.
    pub memory: ByteSize,
    /// Longest time for a guest to produce response headers (504 after).
    pub request_timeout: Duration,
    /// Requests that may wait for a free instance before 503.
    pub queue_limit: usize,
    /// Restart backoff for crashed instances.
    pub restart: RestartPolicy,
    /// Instances that may exist at once (sizes the pooling allocator). Default: enough for the
    /// formation with room to scale, at least 1024.
    pub max_instances: Option<u32>,
    /// Cache compiled components on disk.
    pub cache: bool,
}

impl Default for HostOptions {
    fn default() -> Self {
        Self {
            formation: None,
            memory: ByteSize::mib(256),
            request_timeout: Duration::from_secs(30),
            queue_limit: 1024,
            restart: RestartPolicy::default(),
            max_instances: None,
            cache: true,
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
    /// How long compiling took, for the start-up line.
    compile_time: Duration,
}

impl Host {
    /// Validates the formation, compiles every component (in parallel) and checks each one's
    /// world. Blocking: call it off the async runtime.
    pub fn new(app: AppSpec, options: HostOptions) -> Result<Self> {
        let mut formation = Formation::default_for(&app, options.memory);
        if let Some(spec) = &options.formation {
            formation
                .apply_spec(spec)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
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
        let runtime = Runtime::new(&EngineSettings {
            max_instances,
            max_memory: options.memory,
            cache: options.cache,
        })?;

        let started = Instant::now();
        let compiled: Vec<Result<Compiled>> = std::thread::scope(|scope| {
            let handles: Vec<_> = app
                .processes
                .iter()
                .map(|spec| scope.spawn(|| runtime.compile(spec)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("compile thread panicked"))
                .collect()
        });
        let compile_time = started.elapsed();
        let mut processes = Vec::new();
        for (spec, compiled) in app.processes.into_iter().zip(compiled) {
            processes.push((spec, Arc::new(compiled?)));
        }

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
        Ok(Self {
            formation,
            runtime: Arc::new(runtime),
            processes,
            routed,
            options,
            compile_time,
        })
    }

    /// The formation this host will start.
    pub fn formation(&self) -> &Formation {
        &self.formation
    }

    /// Starts every instance of the formation, waits until all are up, then serves HTTP on
    /// `listener`. An instance that cannot even be instantiated fails the start.
    pub async fn start(self, listener: TcpListener) -> Result<RunningHost> {
        let started = Instant::now();
        let addr = listener
            .local_addr()
            .context("listener has no local address")?;
        let width = self
            .formation
            .iter()
            .map(|(name, scale)| name.as_str().len() + 1 + scale.count.max(1).to_string().len())
            .max()
            .unwrap_or(0);
        let (logs, printer) = Logs::stdout(width);
        let supervisor = Arc::new(Supervisor {
            runtime: self.runtime.clone(),
            logs: logs.clone(),
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
            restart: self.options.restart,
            port: addr.port(),
        });

        let mut pending = Vec::new();
        let mut routed_pool = None;
        for (index, (spec, compiled)) in self.processes.iter().enumerate() {
            let scale = self
                .formation
                .get(&spec.name)
                .expect("every type has a scale");
            let pool = compiled
                .is_http()
                .then(|| Arc::new(Pool::new(self.options.queue_limit)));
            if Some(index) == self.routed {
                routed_pool = pool.clone();
            }
            let process = Arc::new(ProcessType {
                spec: spec.clone(),
                compiled: compiled.clone(),
                colour: index,
                memory: scale.memory,
                pool,
            });
            for n in 1..=scale.count {
                let (tx, rx) = oneshot::channel();
                supervisor.spawn_slot(&process, n, tx);
                pending.push((format!("{}.{n}", spec.name), spec.clone(), rx));
            }
        }
        for (name, spec, rx) in pending {
            let failure = match rx.await {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e,
                Err(_) => "its task ended unexpectedly".to_string(),
            };
            supervisor.cancel.cancel();
            supervisor.tasks.close();
            supervisor.tasks.wait().await;
            bail!(
                "process type `{}` ({}): instance {name} failed to start: {failure}",
                spec.name,
                spec.component.display()
            );
        }

        let router = Arc::new(Router {
            pool: routed_pool,
            process: self
                .routed
                .map(|i| self.processes[i].0.name.to_string())
                .unwrap_or_default(),
            request_timeout: self.options.request_timeout,
            logs: logs.clone(),
        });
        let stop_http = CancellationToken::new();
        let server = tokio::spawn(proxy::serve(listener, router, stop_http.clone()));
        logs.host(format!(
            "formation {} up in {} (compiled {} components in {})",
            self.formation,
            humanize(started.elapsed()),
            self.processes.len(),
            humanize(self.compile_time)
        ));
        logs.host(format!("listening on http://{addr}"));
        Ok(RunningHost {
            addr,
            supervisor,
            stop_http,
            server,
            printer,
            logs,
        })
    }
}

/// A started host. Dropping it without [`RunningHost::shutdown`] leaves tasks running until
/// the runtime ends.
pub struct RunningHost {
    addr: SocketAddr,
    supervisor: Arc<Supervisor>,
    /// Cancelled to stop accepting connections.
    stop_http: CancellationToken,
    server: tokio::task::JoinHandle<()>,
    printer: tokio::task::JoinHandle<()>,
    logs: Logs,
}

impl RunningHost {
    /// The address HTTP is served on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
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
        self.supervisor.cancel.cancel();
        self.supervisor.tasks.close();
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, self.supervisor.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("some instances did not stop within the grace period");
        }
        self.logs.host("stopped");
        let Self {
            supervisor,
            logs,
            printer,
            ..
        } = self;
        drop((supervisor, logs));
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
