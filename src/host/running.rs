//! A started host: what it runs, and its shutdown in order (front doors, then instances, then
//! the log).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::deploy::Deployer;
use crate::events::{Events, Fields};
use crate::formation::Formation;
use crate::logs::Logs;
use crate::supervisor::Supervisor;
use crate::units::ByteSize;

/// A started host. Dropping it without [`RunningHost::shutdown`] leaves tasks running until
/// the runtime ends.
pub struct RunningHost {
    pub(super) addr: SocketAddr,
    /// Deploys and rollbacks.
    pub(super) deployer: Arc<Deployer>,
    /// The HTTP servers (main port first, then `[[services]]`): once `stop_http` is
    /// cancelled they finish their requests in flight, within the grace period.
    pub(super) servers: Vec<JoinHandle<()>>,
    /// The other servers (the control API over TCP, metrics): aborted at shutdown, as log
    /// followers would otherwise hold it up.
    pub(super) others: Vec<JoinHandle<()>>,
    pub(super) supervisor: Arc<Supervisor>,
    /// Cancelled to stop accepting connections (HTTP and control).
    pub(super) stop_http: CancellationToken,
    /// Cancelled when the control API is asked to shut the host down (`wasmform down`).
    pub(super) stop_requested: CancellationToken,
    /// The control API task on the Unix socket and the socket's path, removed at shutdown.
    pub(super) control: Option<(JoinHandle<()>, PathBuf)>,
    pub(super) printer: JoinHandle<()>,
    pub(super) logs: Logs,
    /// The event stream.
    pub(super) events: Events,
    /// The background processes' runtime; shut down after the supervisor.
    pub(super) background: BackgroundRuntime,
}

impl RunningHost {
    /// The address HTTP is served on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Deploys and rollbacks of this host.
    pub fn deployer(&self) -> Arc<Deployer> {
        self.deployer.clone()
    }

    /// Resolves once the control API was asked to shut this host down (`wasmform down`);
    /// the owner then calls [`RunningHost::shutdown`].
    pub async fn stop_requested(&self) {
        self.stop_requested.cancelled().await;
    }

    /// Applies Heroku-style changes (`web=3`, `worker+1`, `web=2:512MiB`) live, as
    /// `wasmform scale` does; returns the desired formation once new instances are up.
    /// Invalid changes are refused and change nothing.
    pub async fn scale(&self, changes: &[&str]) -> Result<Formation> {
        let changes: Vec<String> = changes.iter().map(|c| c.to_string()).collect();
        self.supervisor
            .scale(&changes, None)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(self.supervisor.desired())
    }

    /// Instances up, per process type.
    pub fn running(&self) -> std::collections::BTreeMap<String, u32> {
        self.supervisor
            .ps()
            .types
            .into_iter()
            .map(|t| (t.name, t.running))
            .collect()
    }

    /// A function returning `ps` as the control API answers it (`GET /v1/ps`), for tasks
    /// that outlive this borrow (systemd's readiness).
    pub(crate) fn ps_source(&self) -> impl Fn() -> serde_json::Value + Send + 'static {
        let supervisor = self.supervisor.clone();
        move || serde_json::to_value(supervisor.ps()).unwrap_or_default()
    }

    /// Logs a host event.
    pub fn log(&self, text: impl Into<String>) {
        self.logs.host(text);
    }

    /// Graceful shutdown: stop accepting connections, let in-flight requests finish within
    /// `grace`, then stop every instance (workers included) and flush the log.
    pub async fn shutdown(self, grace: Duration) {
        let deadline = Instant::now() + grace;
        self.events.emit("host.stopping", Fields::default());
        self.stop_http.cancel();
        for (i, mut server) in self.servers.into_iter().enumerate() {
            let left = deadline.saturating_duration_since(Instant::now());
            if tokio::time::timeout(left, &mut server).await.is_err() {
                if i == 0 {
                    tracing::warn!("grace period over; dropping the remaining connections");
                }
                server.abort();
            }
        }
        for task in &self.others {
            task.abort();
        }
        if let Some((task, path)) = self.control {
            task.abort();
            let _ = std::fs::remove_file(path);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let stopped = self.supervisor.shutdown(left).await;
        if !stopped {
            tracing::warn!("some instances did not stop within the grace period");
        }
        // Only once every local instance has ended: a singleton must not run on two nodes.
        // Else the lease expires by itself once this process has exited.
        if stopped && let Some(cluster) = self.supervisor.cluster() {
            cluster.leave().await;
        }
        self.logs.host("stopped");
        self.logs.close();
        let Self {
            supervisor,
            logs,
            printer,
            background,
            ..
        } = self;
        drop((supervisor, logs, background));
        // The printer ends at the close, once every line before it is out; bounded in case
        // stdout blocks.
        let _ = tokio::time::timeout(Duration::from_millis(500), printer).await;
    }
}

/// Owns the background runtime and shuts it down without blocking when dropped: a runtime may
/// not be dropped the ordinary (blocking) way inside another one.
pub(super) struct BackgroundRuntime(Option<tokio::runtime::Runtime>);

impl BackgroundRuntime {
    /// A runtime for background processes whose threads run at the lowest priority: the kernel
    /// then gives web instances the CPU they ask for, and CPU-bound workers the rest.
    pub(super) fn start() -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .thread_name("wasmform-bg")
            .on_thread_start(|| {
                // SCHED_IDLE: these threads run only when no normal thread wants the CPU. On
                // Linux, pid 0 means the calling thread. Failing to lower the priority only
                // costs fairness, so it is not an error.
                let param = libc::sched_param { sched_priority: 0 };
                // SAFETY: `param` is a valid sched_param for the duration of the call.
                let _ = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
            })
            .enable_all()
            .build()
            .context("failed to start the background runtime")?;
        Ok(Self(Some(runtime)))
    }

    pub(super) fn handle(&self) -> tokio::runtime::Handle {
        self.0
            .as_ref()
            .expect("running until dropped")
            .handle()
            .clone()
    }
}

impl Drop for BackgroundRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// The machine's memory, or its cgroup's limit if lower: the default capacity.
pub(super) fn system_memory() -> ByteSize {
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
