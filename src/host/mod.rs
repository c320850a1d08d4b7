//! The host: an app validated, compiled and started.
//!
//! [`Host::new`] does everything that can fail before anything runs, as named steps: take the
//! state directory, stage the release, layer the formation, size the engine, compile, check
//! the services and the routed type, record the release. [`Host::start`](start) binds every
//! listener before it spawns anything, starts the formation and serves;
//! [`RunningHost`](running) shuts it all down.

mod activation;
mod alone;
mod running;
mod start;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

pub use self::activation::Activated;
pub(crate) use self::alone::run_alone;
pub use self::running::RunningHost;
use crate::app::{AppSpec, ProcessName, ProcessSpec, Service, TcpSettings};
use crate::control;
use crate::formation::{Formation, Scale};
use crate::release::{Release, ReleaseStore, Staged};
use crate::runtime::{Compiled, EngineSettings, Kind, Runtime, compile_all};
use crate::state::StateDir;
use crate::supervisor::{Limits, RestartPolicy};
use crate::units::ByteSize;

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
    /// How many free instances of a type rotate round-robin (0: all); see [`crate::router`].
    pub rotate: usize,
    /// Limits of the HTTP front door.
    pub http: crate::proxy::HttpLimits,
    /// One `at=info` log line per request, Heroku router style.
    pub log_requests: bool,
    /// Router error bodies name the failing instance and its failure (local development);
    /// by default they carry only the code and a request id.
    pub error_detail: bool,
    /// Also serve `/metrics` on this loopback TCP address.
    pub metrics: Option<SocketAddr>,
    /// Serve `/health` for a load balancer on this TCP address.
    pub health: Option<SocketAddr>,
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
    /// Join a cluster of hosts of the same app on etcd (`--cluster`).
    pub cluster: Option<crate::cluster::ClusterOptions>,
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
            rotate: crate::router::HOT,
            http: crate::proxy::HttpLimits::default(),
            log_requests: true,
            error_detail: false,
            metrics: None,
            health: None,
            control_tcp: None,
            restart: RestartPolicy::default(),
            max_instances: None,
            cache: true,
            max_component_size: ByteSize::mib(512),
            compile_timeout: Duration::from_secs(300),
            state_dir: None,
            source: None,
            keep_releases: crate::release::DEFAULT_KEEP,
            cluster: None,
        }
    }
}

/// A validated, compiled app, ready to start.
pub struct Host {
    formation: Formation,
    runtime: Arc<Runtime>,
    /// Every process type with its compiled component, in Procfile order.
    processes: Vec<(ProcessSpec, Arc<Compiled>)>,
    /// Index into `processes` of the type the main port routes to, and whether it is a
    /// socket-based web server (a command listening on `$PORT`, served as TCP).
    routed: Option<(usize, bool)>,
    /// The types that listen on `$PORT`, with their services' settings.
    listening: BTreeMap<ProcessName, TcpSettings>,
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
    services: Vec<Service>,
    /// The app's releases.
    releases: ReleaseStore,
    /// The release being started.
    release: u32,
    /// `[state] url`, if shared state lives in Redis.
    shared_url: Option<String>,
    /// Sockets passed by systemd, adopted by the services in place of binding.
    activated: Activated,
}

impl Host {
    /// Validates the formation, compiles every component (in parallel) and checks each one's
    /// world. Blocking: call it off the async runtime.
    ///
    /// The formation is, in order: one instance of each type at 256 MiB; the formation stored
    /// in the state directory; the manifest's `count` and `memory` where they changed since the
    /// last release; `options.memory`, then `options.formation`. The result is stored.
    pub fn new(app: AppSpec, options: HostOptions) -> Result<Self> {
        let mut notes = Vec::new();
        let state = take_state_dir(&options)?;
        let mut releases = ReleaseStore::open(
            state.clone(),
            options.keep_releases,
            options.max_component_size,
        )?;
        let previous = releases.current().cloned();
        let staged = stage(&mut releases, app, previous.as_ref(), &mut notes)?;
        check_cluster(&options, &staged.app)?;
        let formation = layer_formation(
            &staged.app,
            state.as_ref(),
            previous.as_ref(),
            &options,
            &mut notes,
        )?;
        let limits = size(&options, &formation, &staged.app)?;
        let runtime = Arc::new(Runtime::new(&EngineSettings {
            max_instances: limits.max_instances,
            max_memory: limits.max_memory,
            cache: options.cache,
            max_component_size: options.max_component_size,
            max_fields_size: options.http.max_fields_size,
        })?);

        let started = Instant::now();
        let work = staged.work();
        let compiled = compile_all(&runtime, &work, options.compile_timeout)?;
        let compile_time = started.elapsed();
        let mut processes = Vec::new();
        let mut compile_times = Vec::new();
        for ((spec, _), (compiled, took)) in work.into_iter().zip(compiled) {
            compile_times.push((spec.name.to_string(), took));
            processes.push((spec, Arc::new(compiled)));
        }
        check_services(&staged.app.services, &processes)?;
        let release = record(&mut releases, &staged, previous.as_ref())?;
        let routed = routed_type(&processes)?;
        let listening = listening(
            &staged.app.services,
            routed.map(|(i, tcp)| (&processes[i].0.name, tcp)),
        );
        if let Some(state) = &state {
            state.store_formation(&formation)?;
        }
        Ok(Self {
            formation,
            runtime,
            processes,
            routed,
            listening,
            limits: Limits {
                drain_timeout: options.request_timeout + Duration::from_secs(1),
                ..limits
            },
            options,
            state,
            notes,
            compile_time,
            compile_times,
            services: staged.app.services.clone(),
            shared_url: staged.app.state_url.clone(),
            releases,
            release,
            activated: Activated::default(),
        })
    }

    /// Serves the `[[services]]` on the sockets systemd passed (socket activation) where one
    /// matches, instead of binding them; the front door's socket is the listener given to
    /// [`start`](Self::start). A passed socket left unmatched fails the start.
    pub fn adopt(&mut self, activated: Activated) {
        self.activated = activated;
    }

    /// The release this host starts (`vN`).
    pub fn release(&self) -> u32 {
        self.release
    }

    /// The formation this host will start.
    pub fn formation(&self) -> &Formation {
        &self.formation
    }
}

/// A cluster needs this build's support for it, and shared state that every node shares.
fn check_cluster(options: &HostOptions, app: &AppSpec) -> Result<()> {
    if options.cluster.is_none() {
        return Ok(());
    }
    if !cfg!(feature = "cluster") {
        bail!(
            "--cluster: this wasmform was built without cluster support; build it with `cargo build --release --features cluster` (needs `protoc`: apt-get install protobuf-compiler libprotobuf-dev)"
        );
    }
    if app.state_url.is_none()
        && let Some(spec) = app
            .processes
            .iter()
            .find(|p| !p.buckets.is_empty() || !p.queues.is_empty())
    {
        bail!(
            "--cluster: `{}` ({}) uses buckets or queues, and the embedded store is one node's alone: set `[state] url = \"redis://HOST:PORT\"` in wasmform.toml so that every node shares them",
            spec.name,
            spec.origin
        );
    }
    Ok(())
}

/// The state directory, created, once no live host owns it: before anything is read or stored.
fn take_state_dir(options: &HostOptions) -> Result<Option<StateDir>> {
    let state = options.state_dir.clone().map(StateDir::new);
    if let Some(state) = &state {
        control::ensure_no_live_host(state)?;
        state.create()?;
    }
    Ok(state)
}

/// Stages `app` as the next release; or, when the app's files are as they were when the
/// current release (a rollback) replaced them, that release again.
fn stage(
    releases: &mut ReleaseStore,
    app: AppSpec,
    previous: Option<&Release>,
    notes: &mut Vec<String>,
) -> Result<Staged> {
    let staged = releases.stage(app, None)?;
    if let Some(previous) = previous
        && previous.config_digest != staged.config_digest
        && previous.source.as_deref() == Some(staged.config_digest.as_str())
    {
        // The rollback keeps running, as it would have without the restart.
        notes.push(format!(
            "v{} keeps running ({}): the app's files are unchanged since; `wasmform deploy` runs them",
            previous.version, previous.description
        ));
        return releases.stage(previous.app.clone(), Some(previous));
    }
    Ok(staged)
}

/// The formation to start: one instance of each type at the default memory; over it the
/// stored formation; the manifest's changes since the last release; `--memory` for every
/// type; then `-m`, whose `web=2:64MiB` wins for the types it sizes. A singleton above 1 is
/// refused.
fn layer_formation(
    app: &AppSpec,
    state: Option<&StateDir>,
    previous: Option<&Release>,
    options: &HostOptions,
    notes: &mut Vec<String>,
) -> Result<Formation> {
    let mut formation = Formation::default_for(app, DEFAULT_MEMORY);
    if let Some(state) = state
        && let Some((stored, dropped)) = state.load_formation(&formation)?
    {
        formation = stored;
        for name in dropped {
            notes.push(format!(
                "stored formation names `{name}`, which the Procfile no longer defines: ignored"
            ));
        }
    }
    if let Some(previous) = previous {
        for spec in &app.processes {
            let scale = match previous.app.process(spec.name.as_str()) {
                None => Scale::of_new(spec, DEFAULT_MEMORY),
                Some(old) => match formation.get(&spec.name) {
                    Some(live) => live.follow_manifest(old, spec, DEFAULT_MEMORY),
                    None => continue,
                },
            };
            formation.insert(spec.name.clone(), scale);
        }
    }
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
    Ok(formation)
}

/// The host's limits (the drain timeout aside): the engine's largest memory slot and instance
/// pool, sized for the formation with room to scale, and the memory budget.
fn size(options: &HostOptions, formation: &Formation, app: &AppSpec) -> Result<Limits> {
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
        .unwrap_or_else(running::system_memory);
    Ok(Limits {
        capacity,
        max_instances,
        max_memory,
        drain_timeout: Duration::ZERO,
    })
}

/// Refuses a service whose type is not what it routes: HTTP to an HTTP component, TCP to a
/// command (`wasi:cli/run`) that listens on `$PORT`.
fn check_services(services: &[Service], processes: &[(ProcessSpec, Arc<Compiled>)]) -> Result<()> {
    for service in services {
        let (spec, compiled) = processes
            .iter()
            .find(|(p, _)| p.name == service.process)
            .expect("services name known types");
        let command = matches!(compiled.kind, Kind::Command(_));
        match service.tcp {
            None if compiled.is_http() => {}
            Some(_) if command => {}
            None => bail!(
                "{}: services.processes: `{}` is a {} process ({}), not an HTTP one: a service routes HTTP to a component exporting `wasi:http/incoming-handler`{}",
                service.origin,
                spec.name,
                compiled.kind_name(),
                spec.component.display(),
                if command {
                    "; if it listens on $PORT, add `protocol = \"tcp\"` to the service to balance connections over it"
                } else {
                    ""
                }
            ),
            Some(_) => bail!(
                "{}: services.processes: `{}` is {} process ({}), not a TCP one: a TCP service balances connections over a command (`wasi:cli/run`) that listens on $PORT{}",
                service.origin,
                spec.name,
                if compiled.is_http() {
                    "an HTTP"
                } else {
                    "a queue consumer"
                },
                spec.component.display(),
                if compiled.is_http() {
                    "; an HTTP component is served by a service without `protocol = \"tcp\"`"
                } else {
                    ""
                }
            ),
        }
    }
    Ok(())
}

/// The types that listen on `$PORT`: every TCP service's type (the first service naming a type
/// sets its settings) and a socket-based `web` (with the defaults).
fn listening(
    services: &[Service],
    routed: Option<(&ProcessName, bool)>,
) -> BTreeMap<ProcessName, TcpSettings> {
    let mut listening = BTreeMap::new();
    for service in services {
        if let Some(settings) = service.tcp {
            listening.entry(service.process.clone()).or_insert(settings);
        }
    }
    if let Some((name, true)) = routed {
        listening
            .entry(name.clone())
            .or_insert_with(TcpSettings::default);
    }
    listening
}

/// The type the main port routes to: `web` if it is an HTTP component, or a command (a
/// socket-based web server: `true`, served as TCP); else the only HTTP type.
fn routed_type(processes: &[(ProcessSpec, Arc<Compiled>)]) -> Result<Option<(usize, bool)>> {
    if let Some(web) = processes.iter().position(|(p, _)| p.name.as_str() == "web")
        && matches!(processes[web].1.kind, Kind::Command(_))
    {
        return Ok(Some((web, true)));
    }
    let http: Vec<usize> = (0..processes.len())
        .filter(|&i| processes[i].1.is_http())
        .collect();
    match http
        .iter()
        .find(|&&i| processes[i].0.name.as_str() == "web")
    {
        Some(&web) => Ok(Some((web, false))),
        None if http.len() <= 1 => Ok(http.first().map(|&i| (i, false))),
        None => {
            let names: Vec<&str> = http.iter().map(|&i| processes[i].0.name.as_str()).collect();
            bail!(
                "several HTTP process types ({}) and none is named `web`: name the one that should receive traffic `web`",
                names.join(", ")
            );
        }
    }
}

/// Records the staged app as a release if it differs from the current one; its number.
fn record(releases: &mut ReleaseStore, staged: &Staged, previous: Option<&Release>) -> Result<u32> {
    Ok(match previous {
        Some(previous) if previous.config_digest == staged.config_digest => previous.version,
        Some(previous) => {
            releases
                .record(
                    staged,
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
                .record(staged, "Initial release".to_string(), true)?
                .version
        }
    })
}
