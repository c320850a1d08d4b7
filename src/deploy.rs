//! Deploys and rollbacks of a running host: `wasmform deploy`, `wasmform rollback vN`,
//! `up --watch`.
//!
//! A deploy reads the whole configuration again, stores and hashes every component and
//! compiles them all — off the async runtime, with the same size cap and compile timeout as
//! `up` — before anything running is touched. Only then does the supervisor roll the changed
//! types ([`Supervisor::deploy`]); if that fails it rolls back by itself. A release is
//! recorded only for a configuration that went live. Deploys are serialized.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::app::{AppSpec, TcpSettings};
use crate::logs::{API, Logs};
use crate::release::{Release, ReleaseStore, Staged};
use crate::runtime::{Compiled, Kind, Runtime};
use crate::supervisor::{Changes, ControlError, NewVersion, Supervisor, describe_changes};

/// Deploys new configurations to a running supervisor.
pub struct Deployer {
    /// The Procfile or manifest `up` was started with; `None` for hosts built from an
    /// [`AppSpec`] in code, which have nothing to re-read.
    pub(crate) source: Option<PathBuf>,
    pub(crate) runtime: Arc<Runtime>,
    pub(crate) supervisor: Arc<Supervisor>,
    /// The releases, locked only briefly so `releases` answers during a deploy.
    pub(crate) releases: tokio::sync::Mutex<ReleaseStore>,
    /// Serializes deploys and rollbacks.
    pub(crate) ops: tokio::sync::Mutex<()>,
    /// Longest a component may take to compile.
    pub(crate) compile_timeout: Duration,
    pub(crate) logs: Logs,
    /// The listeners bound at start, described, the type each routes to, and whether it
    /// balances TCP (to a command listening on `$PORT`) rather than HTTP: they stay until the
    /// next `up`, so a release must keep those types what they are.
    pub(crate) routes: Vec<(String, String, bool)>,
    /// Compile times of releases that went live are recorded here.
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    /// Held by an upload (`deploy --remote`) while it replaces the app's files and deploys.
    pub(crate) files: tokio::sync::Mutex<()>,
}

/// What a deploy or rollback did.
#[derive(Debug, Serialize)]
pub struct DeployOutcome {
    /// The release now running.
    pub release: u32,
    /// Whether a new release was made (`false`: the configuration equals the running one).
    pub created: bool,
    /// The release's description.
    pub description: String,
    /// Per type.
    pub changes: Changes,
    /// Settings the release changed that take effect only at the next `up`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl Deployer {
    /// The directory of the app's files (the Procfile's), where uploads go.
    pub fn app_dir(&self) -> Option<PathBuf> {
        let source = self.source.as_ref()?;
        let dir = source.parent().unwrap_or(std::path::Path::new("."));
        Some(if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir.to_path_buf()
        })
    }

    /// Reads the app's files again and deploys them.
    pub async fn deploy(&self) -> Result<DeployOutcome, ControlError> {
        let Some(source) = self.source.clone() else {
            return Err(ControlError::Invalid(
                "this host was started from an app built in code, not from a Procfile or manifest: there is nothing to re-read".into(),
            ));
        };
        let loaded = tokio::task::spawn_blocking(move || AppSpec::load(&source))
            .await
            .map_err(|e| ControlError::Failed(format!("reading the app failed: {e}")))?;
        match loaded {
            Ok(app) => self.roll(app, None, "Deploy".to_string()).await,
            Err(e) => {
                let keeps = keeps(self.releases.lock().await.current());
                let e = ControlError::Invalid(format!("{e:#}; {keeps}"));
                self.logs.event(API, format!("Deploy failed: {e}"));
                Err(e)
            }
        }
    }

    /// Brings back exactly what release `version` ran, as a new release.
    pub async fn rollback(&self, version: u32) -> Result<DeployOutcome, ControlError> {
        let release = {
            let releases = self.releases.lock().await;
            match releases.get(version) {
                Some(release) => release.clone(),
                None => {
                    let kept: Vec<String> = releases
                        .list()
                        .iter()
                        .map(|r| format!("v{}", r.version))
                        .collect();
                    return Err(ControlError::Invalid(format!(
                        "no release v{version}: kept releases are {}",
                        if kept.is_empty() {
                            "none".into()
                        } else {
                            kept.join(", ")
                        }
                    )));
                }
            }
        };
        let app = release.app.clone();
        self.roll(app, Some(release), format!("Rollback to v{version}"))
            .await
    }

    /// Every kept release, newest first.
    pub async fn releases(&self) -> Vec<Release> {
        let mut list = self.releases.lock().await.list().to_vec();
        list.reverse();
        list
    }

    async fn roll(
        &self,
        app: AppSpec,
        from: Option<Release>,
        what: String,
    ) -> Result<DeployOutcome, ControlError> {
        let _op = self.ops.lock().await;
        let result = self.try_roll(app, from, &what).await;
        if let Err(e) = &result {
            self.logs.event(API, format!("{what} failed: {e}"));
            // Components staged for the rejected release are not kept.
            self.releases.lock().await.prune_unused();
        }
        result
    }

    async fn try_roll(
        &self,
        app: AppSpec,
        from: Option<Release>,
        what: &str,
    ) -> Result<DeployOutcome, ControlError> {
        // Deploys are serialized (`ops`), so what is read here stays true until `record`.
        let (keeps, current, stager, version) = {
            let releases = self.releases.lock().await;
            (
                keeps(releases.current()),
                releases.current().cloned(),
                releases.stager(),
                releases.next_version(),
            )
        };
        let from_files = from.is_none();
        let staged = tokio::task::spawn_blocking(move || stager.stage(app, from.as_ref()))
            .await
            .map_err(|e| ControlError::Failed(format!("staging failed: {e}")))?
            .map_err(|e| ControlError::Invalid(format!("{e:#}; {keeps}")))?;
        if let Some(current) = &current
            && current.config_digest == staged.config_digest
        {
            let version = current.version;
            return Ok(DeployOutcome {
                release: version,
                created: false,
                description: format!("nothing changed: v{version} is running this configuration"),
                changes: Changes::default(),
                notes: Vec::new(),
            });
        }
        let compiled = self.compile(&staged, &keeps).await?;
        self.check_routes(&staged, &compiled, &keeps)?;
        let compile_times: Vec<(String, Duration)> = staged
            .app
            .processes
            .iter()
            .zip(&compiled)
            .map(|(spec, (_, took))| (spec.name.to_string(), *took))
            .collect();
        let versions = staged
            .app
            .processes
            .iter()
            .cloned()
            .zip(compiled)
            .map(|(spec, (compiled, _))| NewVersion {
                spec,
                compiled: Arc::new(compiled),
            })
            .collect();
        let notes = match &current {
            Some(current) => unapplied(&current.app, &staged.app),
            None => Vec::new(),
        };
        let changes = self.supervisor.deploy(versions, version, what).await?;
        for (name, took) in &compile_times {
            self.metrics.compiled(name, took.as_secs_f64());
        }
        // What changed for the next `up` only is part of what the release is.
        let deferred = notes
            .iter()
            .filter_map(|n| n.split_once(" changed: ").map(|(what, _)| what))
            .map(|what| format!("; {what} changed (at the next `up`)"))
            .collect::<String>();
        let description = format!("{what}: {}{deferred}", describe_changes(&changes));
        if let Err(e) = self
            .releases
            .lock()
            .await
            .record(&staged, description.clone(), from_files)
        {
            self.logs.host(format!(
                "release v{version} is running but could not be stored: {e:#}"
            ));
        }
        self.logs
            .event(API, format!("Release v{version} is live ({description})"));
        for note in &notes {
            self.logs.event(API, format!("Release v{version}: {note}"));
        }
        Ok(DeployOutcome {
            release: version,
            created: true,
            description,
            changes,
            notes,
        })
    }

    /// Compiles every component of `staged` off the async runtime.
    async fn compile(
        &self,
        staged: &Staged,
        keeps: &str,
    ) -> Result<Vec<(Compiled, Duration)>, ControlError> {
        let work = staged.work();
        let (runtime, timeout) = (self.runtime.clone(), self.compile_timeout);
        tokio::task::spawn_blocking(move || crate::runtime::compile_all(&runtime, &work, timeout))
            .await
            .map_err(|e| ControlError::Failed(format!("compiling failed: {e}")))?
            .map_err(|e| ControlError::Invalid(format!("{e:#}; {keeps}")))
    }

    /// Refuses a release that would leave a bound listener (the main port, a service) routing
    /// HTTP to a type that is gone or no longer HTTP.
    fn check_routes(
        &self,
        staged: &Staged,
        compiled: &[(Compiled, Duration)],
        keeps: &str,
    ) -> Result<(), ControlError> {
        let kind = |process: &str| {
            let at = staged
                .app
                .processes
                .iter()
                .position(|p| p.name.as_str() == process);
            at.map(|i| &compiled[i].0)
        };
        // What a listener needs its type to be: an HTTP component, or a command (TCP).
        let fits = |compiled: &Compiled, tcp: bool| {
            if tcp {
                matches!(compiled.kind, Kind::Command(_))
            } else {
                compiled.is_http()
            }
        };
        let needs = |tcp: bool| {
            if tcp {
                ("TCP", "a command that listens on $PORT")
            } else {
                ("HTTP", "an HTTP process type")
            }
        };
        for (listener, process, tcp) in &self.routes {
            match kind(process) {
                Some(compiled) if fits(compiled, *tcp) => {}
                found => {
                    let what = found.map_or("removed".to_string(), |c| {
                        format!("made a {} process", c.kind_name())
                    });
                    let (protocol, keep) = needs(*tcp);
                    return Err(ControlError::Invalid(format!(
                        "{listener} routes {protocol} to `{process}`, which this release {what}: the listener stays until the next `wasmform up`, so keep `{process}` {keep}; {keeps}"
                    )));
                }
            }
        }
        for service in &staged.app.services {
            let tcp = service.tcp.is_some();
            if let Some(compiled) = kind(service.process.as_str())
                && !fits(compiled, tcp)
            {
                return Err(ControlError::Invalid(format!(
                    "{}: services.processes: `{}` would become a {} process, but a service routes {} to it; {keeps}",
                    service.origin,
                    service.process,
                    compiled.kind_name(),
                    needs(tcp).0
                )));
            }
        }
        Ok(())
    }
}

/// `v3 keeps running`, for messages about a rejected release.
fn keeps(current: Option<&Release>) -> String {
    match current {
        Some(release) => format!("v{} keeps running", release.version),
        None => "the running formation is unchanged".to_string(),
    }
}

/// App-wide settings that `up` applies once (listeners, the memory budget, the shared store)
/// and that changed from `running` to `next`: the release records them, the next `up` applies
/// them.
fn unapplied(running: &AppSpec, next: &AppSpec) -> Vec<String> {
    let listeners = |app: &AppSpec| -> Vec<(std::net::SocketAddr, String, Option<TcpSettings>)> {
        app.services
            .iter()
            .map(|s| (s.listen, s.process.to_string(), s.tcp))
            .collect()
    };
    let mut changed = Vec::new();
    if listeners(running) != listeners(next) {
        changed.push("[[services]]");
    }
    if running.http != next.http {
        changed.push("[http]");
    }
    if running.capacity != next.capacity {
        changed.push("capacity");
    }
    if running.state_url != next.state_url {
        changed.push("[state] url");
    }
    if changed.is_empty() {
        return Vec::new();
    }
    vec![format!(
        "{} changed: recorded, but applied only when `wasmform up` starts again",
        changed.join(", ")
    )]
}
