//! [`Host::start`]: bind every listener, start the formation, then serve.
//!
//! Every listener is bound before anything is spawned, so a port in use fails the start with
//! nothing left running; the formation starts (and must come up) before the front doors open.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

use super::running::{BackgroundRuntime, RunningHost};
use super::{DEFAULT_MEMORY, Host};
use crate::app::ProcessName;
use crate::control;
use crate::deploy::Deployer;
use crate::events::{Events, Fields};
use crate::logs::Logs;
use crate::metrics::Metrics;
use crate::proxy::{self, Router};
use crate::shared::Store;
use crate::supervisor::{Supervisor, SupervisorConfig};
use crate::tcp;
use crate::units::humanize;

/// Every listener of a host, bound.
struct Listeners {
    http: TcpListener,
    control: Option<(UnixListener, PathBuf)>,
    control_tcp: Option<control::BoundTcp>,
    metrics: Option<TcpListener>,
    health: Option<TcpListener>,
    /// `[[services]]`, with the type each routes to and whether it balances TCP.
    services: Vec<(TcpListener, ProcessName, bool)>,
}

impl Host {
    /// Starts every instance of the formation, waits until all are up, then serves HTTP on
    /// `listener` (and the control API on the state directory's socket, if there is one). An
    /// instance that cannot even be instantiated fails the start.
    pub async fn start(mut self, listener: TcpListener) -> Result<RunningHost> {
        let started = Instant::now();
        let addr = listener
            .local_addr()
            .context("listener has no local address")?;
        let listeners = self.bind(listener).await?;
        let width = self
            .processes
            .iter()
            .map(|(spec, _)| spec.name.as_str().len() + 5)
            .max()
            .unwrap_or(0);
        let (logs, printer) = Logs::stdout(width);
        let metrics = Arc::new(Metrics::new());
        let events = Events::new();
        for (name, took) in &self.compile_times {
            metrics.compiled(name, took.as_secs_f64());
        }
        for note in &self.notes {
            logs.host(note.clone());
        }
        let shared = self.open_store().await?;
        // Owned by the guard from here on: an early return must not drop a runtime inside
        // this async context.
        let background = BackgroundRuntime::start()?;
        let supervisor = Supervisor::new(SupervisorConfig {
            metrics: metrics.clone(),
            background: background.handle(),
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
            events: events.clone(),
            listening: self.listening.clone(),
        });
        #[cfg(feature = "cluster")]
        let node = match &self.options.cluster {
            Some(options) => {
                let node =
                    crate::cluster::etcd::Node::join(options, &supervisor, (&logs, &events), addr);
                Some(node.await?)
            }
            None => None,
        };
        if let Err(failure) = supervisor.start().await {
            let stopped = supervisor.shutdown(Duration::from_secs(5)).await;
            if stopped && let Some(cluster) = supervisor.cluster() {
                cluster.leave().await;
            }
            bail!("{failure}");
        }
        #[cfg(feature = "cluster")]
        if let Some(node) = node {
            node.spawn();
        }
        self.serve(
            listeners,
            Serving {
                addr,
                started,
                supervisor,
                metrics,
                logs,
                printer,
                background,
                shared,
                events,
            },
        )
    }

    /// Binds the control socket, the control API's TCP port, metrics and the services, beside
    /// the main HTTP listener.
    async fn bind(&mut self, http: TcpListener) -> Result<Listeners> {
        let control = match &self.state {
            Some(state) => Some(control::bind(state).await?),
            None => None,
        };
        let control_tcp = match &self.options.control_tcp {
            Some(control) => Some(control::bind_tcp(control).await?),
            None => None,
        };
        let metrics = match self.options.metrics {
            Some(addr) => Some(bind_metrics(addr).await?),
            None => None,
        };
        let health = match self.options.health {
            Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| {
                format!("--health {addr}: cannot listen there: is the port in use?")
            })?),
            None => None,
        };
        let mut services = Vec::new();
        let mut activated = std::mem::take(&mut self.activated);
        for service in &self.services {
            let what = format!("service `{}`", service.process);
            let names = [service.process.as_str()];
            let listener = match activated.take(&what, &names, Some(service.listen))? {
                Some(passed) => passed,
                None => TcpListener::bind(service.listen).await.with_context(|| {
                    format!(
                        "{}: cannot listen on {} for `{}`: is the port in use?",
                        service.origin, service.listen, service.process
                    )
                })?,
            };
            services.push((listener, service.process.clone(), service.tcp.is_some()));
        }
        self.notes.extend(activated.finish()?);
        Ok(Listeners {
            http,
            control,
            control_tcp,
            metrics,
            health,
            services,
        })
    }

    /// The app's shared store: Redis at `[state] url`, else embedded in the state directory
    /// (in memory without one).
    async fn open_store(&self) -> Result<Option<Store>> {
        let dir = self.state.as_ref().map(|s| s.path());
        Ok(Some(Store::open(self.shared_url.as_deref(), dir).await?))
    }

    /// A router for the pool of `process`.
    fn router(&self, s: &Serving, process: &str, pool: Option<ProcessName>) -> Arc<Router> {
        Arc::new(Router {
            pool: pool.map(|name| s.supervisor.pool(&name)),
            process: process.to_string(),
            request_timeout: self.options.request_timeout,
            logs: s.logs.clone(),
            limits: self.options.http,
            log_requests: self.options.log_requests,
            metrics: s.metrics.http(process),
            refusals: Default::default(),
            error_detail: self.options.error_detail,
        })
    }

    /// The TCP front door of `process`, a TCP process (or a socket-based `web`).
    fn tcp_service(&self, s: &Serving, process: &ProcessName) -> Arc<tcp::Service> {
        let backends = s
            .supervisor
            .backends(process)
            .expect("a listening type has backends");
        Arc::new(tcp::Service::new(
            process.as_str(),
            backends,
            s.metrics.tcp(process.as_str()),
            s.logs.clone(),
        ))
    }

    /// The formation is up: opens the front doors (HTTP, services, control API, metrics), in
    /// the order their lines appear in the log.
    fn serve(self, listeners: Listeners, s: Serving) -> Result<RunningHost> {
        let logs = &s.logs;
        let routed = self.routed.map(|(i, _)| self.processes[i].0.name.clone());
        let routed_tcp = self.routed.is_some_and(|(_, tcp)| tcp);
        let routed_name = routed.as_ref().map(ToString::to_string).unwrap_or_default();
        let stop_http = CancellationToken::new();
        let stop_requested = CancellationToken::new();
        let main = if routed_tcp {
            // A socket-based web server: its connections are balanced as a TCP service's.
            let service = self.tcp_service(&s, routed.as_ref().expect("routed"));
            tokio::spawn(tcp::serve(listeners.http, service, stop_http.clone()))
        } else {
            let router = self.router(&s, &routed_name, routed.clone());
            tokio::spawn(proxy::serve(listeners.http, router, stop_http.clone()))
        };
        let mut servers = vec![main];
        // Which types the listeners bound now route to: a deploy must keep them what they are.
        let mut routes = Vec::new();
        if routed.is_some() {
            routes.push((
                "the main HTTP port".to_string(),
                routed_name.clone(),
                routed_tcp,
            ));
        }
        for (listener, process, tcp) in listeners.services {
            let addr = listener.local_addr()?;
            routes.push((format!("the service on {addr}"), process.to_string(), tcp));
            if tcp {
                let service = self.tcp_service(&s, &process);
                servers.push(tokio::spawn(tcp::serve(
                    listener,
                    service,
                    stop_http.clone(),
                )));
                logs.host(format!("service `{process}` serving tcp://{addr}"));
            } else {
                let router = self.router(&s, process.as_str(), Some(process.clone()));
                servers.push(tokio::spawn(proxy::serve(
                    listener,
                    router,
                    stop_http.clone(),
                )));
                logs.host(format!("service `{process}` serving http://{addr}"));
            }
            // As the control API needs `--control-public` for it, a service reachable from
            // other machines is said so, once, where the operator reads.
            if !addr.ip().is_loopback() {
                logs.host(format!(
                    "service `{process}` listens on {addr}, which other machines can reach, not only this one: use 127.0.0.1 in its `listen` unless that is meant"
                ));
            }
        }
        let deployer = Arc::new(Deployer {
            source: self.options.source.clone(),
            runtime: self.runtime.clone(),
            supervisor: s.supervisor.clone(),
            releases: tokio::sync::Mutex::new(self.releases),
            ops: tokio::sync::Mutex::new(()),
            compile_timeout: self.options.compile_timeout,
            logs: logs.clone(),
            routes,
            metrics: s.metrics.clone(),
            files: tokio::sync::Mutex::new(()),
        });
        let (control, mut others) = serve_control(
            &s,
            deployer.clone(),
            stop_requested.clone(),
            listeners.control,
            listeners.control_tcp,
            &stop_http,
        )?;
        logs.host(format!(
            "release v{}: formation {} up in {} (compiled {} components in {})",
            self.release,
            self.formation,
            humanize(s.started.elapsed()),
            self.processes.len(),
            humanize(self.compile_time)
        ));
        if let Some((_, path)) = &control {
            logs.host(format!("control API on {}", path.display()));
        }
        if let Some(listener) = listeners.metrics {
            let addr = listener.local_addr()?;
            others.push(tokio::spawn(control::serve_metrics(
                listener,
                s.supervisor.clone(),
                s.metrics.clone(),
                stop_http.clone(),
            )));
            logs.host(format!("metrics on http://{addr}/metrics"));
        }
        if let Some(listener) = listeners.health {
            let addr = listener.local_addr()?;
            others.push(tokio::spawn(control::serve_health(
                listener,
                s.supervisor.clone(),
                routed.clone(),
                stop_http.clone(),
            )));
            logs.host(format!("health check on http://{addr}/health"));
        }
        if let Some(shared) = &s.shared {
            logs.host(format!("shared state: {}", shared.describe()));
        }
        if self.options.error_detail && !s.addr.ip().is_loopback() {
            logs.host(format!(
                "--error-detail on {}, which other machines can reach: their clients read your instances' failures in error bodies; use it on 127.0.0.1 only",
                s.addr
            ));
        }
        logs.host(format!("listening on http://{}", s.addr));
        s.events.emit(
            "host.listening",
            Fields {
                url: Some(format!("http://{}", s.addr)),
                pid: Some(std::process::id()),
                release: (self.release > 0).then_some(self.release),
                formation: Some(self.formation.to_json()),
                ..Fields::default()
            },
        );
        Ok(RunningHost {
            addr: s.addr,
            deployer,
            servers,
            others,
            supervisor: s.supervisor,
            background: s.background,
            stop_http,
            stop_requested,
            control,
            printer: s.printer,
            logs: s.logs,
            events: s.events,
        })
    }
}

/// A server's task.
type Task = tokio::task::JoinHandle<()>;

/// The control API's task on the Unix socket, and the socket's path.
type UnixControl = (Task, PathBuf);

/// What a started formation hands to [`Host::serve`].
struct Serving {
    addr: SocketAddr,
    /// When the start began.
    started: Instant,
    supervisor: Arc<Supervisor>,
    metrics: Arc<Metrics>,
    logs: Logs,
    printer: tokio::task::JoinHandle<()>,
    background: BackgroundRuntime,
    shared: Option<Store>,
    events: Events,
}

/// The control API on the Unix socket and, with `--control-tcp`, on TCP; the TCP server
/// is the first of the returned tasks.
fn serve_control(
    s: &Serving,
    deployer: Arc<Deployer>,
    stop_requested: CancellationToken,
    unix: Option<(UnixListener, PathBuf)>,
    tcp: Option<control::BoundTcp>,
    stop_http: &CancellationToken,
) -> Result<(Option<UnixControl>, Vec<Task>)> {
    let logs = &s.logs;
    let api = control::Api::new(
        s.supervisor.clone(),
        logs.clone(),
        s.metrics.clone(),
        deployer,
        stop_requested,
        s.events.clone(),
        format!("http://{}", s.addr),
    );
    let control = unix.map(|(listener, path)| {
        let task = tokio::spawn(control::serve(listener, api.clone(), stop_http.clone()));
        (task, path)
    });
    let mut others = Vec::new();
    if let Some(bound) = tcp {
        let url = bound.url()?;
        others.push(tokio::spawn(control::serve_tcp(
            bound,
            api.clone(),
            stop_http.clone(),
        )));
        logs.host(format!("control API on {url} (bearer token required)"));
    }
    Ok((control, others))
}

/// The metrics listener, on a loopback address only.
async fn bind_metrics(addr: SocketAddr) -> Result<TcpListener> {
    if !addr.ip().is_loopback() {
        bail!(
            "--metrics {addr}: metrics are served on loopback addresses only (e.g. 127.0.0.1:9090)"
        );
    }
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot serve metrics on {addr}: is the port in use?"))
}
