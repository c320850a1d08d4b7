//! Keeps the formation running and changes it live.
//!
//! The supervisor holds the *desired* formation and the *slots* that run it. A slot is one
//! instance position (`web.1`, `worker.2`) with its own task: it starts the instance, waits for
//! it to end, logs why, and starts a replacement. Web instances are handed to their type's
//! [`Pool`]; workers run inside the slot task.
//!
//! `Supervisor::reconcile` compares desired and actual: surplus slots (highest index first) are
//! stopped — a web slot drains: it leaves the rotation, finishes its request in flight, then
//! ends —, missing ones are started as far as the memory budget (`capacity`) and the instance
//! pool allow; the rest stay *pending* and start by themselves when a slot ends and frees room.
//! Formation changes ([`Supervisor::scale`], [`Supervisor::restart`]) are serialized by one
//! async lock, so concurrent commands apply in order.
//!
//! Restart policy: a web instance that crashed *while handling a request* (trap, memory quota,
//! timeout) is replaced at once, every time: the request failed, not the instance's start, and
//! a fresh instance costs microseconds, so backing off would only turn one bad request into an
//! outage of the type. Everything else — a worker whose `run` ended, an instance that failed to
//! instantiate — follows the [`RestartPolicy`] backoff, so a crash loop costs no CPU.
//!
//! A memory change or a restart is a rolling replacement: for each slot a new one with the
//! same index starts, and only once it is up does the old one drain. A new memory limit is
//! first tried on a throwaway instance, so a limit the component cannot start with is refused
//! before anything changes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::{ByteSize, HealthCheck, ProcessName, ProcessSpec, RestartMode};
use crate::formation::{Formation, Scale};
use crate::humanize;
use crate::instance::{self, Exit, Reuse, WebInstance, WebSettings};
use crate::logs::{API, Logs};
use crate::router::{Member as _, Pool};
use crate::runtime::shared::{Denied, SharedCtx};
use crate::runtime::{Compiled, InstanceSetup, Kind, Runtime};
use crate::shared::{Nacked, Store};
use crate::state::StateDir;

/// How crashed instances are restarted: at once the first time, then after `base`, doubling
/// up to `max`; the count resets once an instance has run for `reset_after`.
#[derive(Clone, Copy, Debug)]
pub struct RestartPolicy {
    /// Delay before the second restart in a row.
    pub base: Duration,
    /// Longest delay.
    pub max: Duration,
    /// An instance that ran this long was healthy: its next crash restarts at once again.
    pub reset_after: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            max: Duration::from_secs(300),
            reset_after: Duration::from_secs(60),
        }
    }
}

/// The restart state of one slot.
#[derive(Debug)]
struct Backoff {
    policy: RestartPolicy,
    /// Crashes in a row without a healthy stretch in between.
    failures: u32,
}

impl Backoff {
    fn new(policy: RestartPolicy) -> Self {
        Self {
            policy,
            failures: 0,
        }
    }

    /// The delay before restarting an instance that crashed after running for `ran_for`.
    fn next(&mut self, ran_for: Duration) -> Duration {
        if ran_for >= self.policy.reset_after {
            self.failures = 0;
        }
        let delay = match self.failures {
            0 => Duration::ZERO,
            n => self
                .policy
                .base
                .saturating_mul(1 << (n - 1).min(20))
                .min(self.policy.max),
        };
        self.failures = self.failures.saturating_add(1);
        delay
    }
}

/// A process type as the supervisor runs it.
pub struct ProcessType {
    /// From the app.
    pub spec: ProcessSpec,
    /// Compiled component and its kind.
    pub compiled: Arc<Compiled>,
    /// Colour index in the log.
    pub colour: usize,
    /// Where its web instances go; `None` for background processes. Every version of a type
    /// shares its type's pool, so a deploy moves traffic instance by instance.
    pub pool: Option<Arc<Pool<WebInstance>>>,
    /// The release that brought this version (0 without releases).
    pub release: u32,
    /// The shared store and the buckets and queues the type may use.
    pub shared: SharedCtx,
    /// Whether its web instances serve more than one request.
    pub reuse: Arc<Reuse>,
}

impl ProcessType {
    /// Whether `spec` and `compiled` would run exactly like this version.
    fn same_as(&self, spec: &ProcessSpec, compiled: &Compiled) -> bool {
        self.compiled.digest == compiled.digest
            && self.compiled.is_http() == compiled.is_http()
            && self.spec.same_settings(spec)
    }
}

/// What a slot is doing, for `ps`.
#[derive(Clone, Debug)]
enum SlotState {
    Starting,
    Up,
    Crashed {
        reason: String,
        restart_at: Instant,
    },
    Draining,
    /// Ended and not restarted (its `restart` policy); a restart, scale or deploy starts it.
    Exited {
        reason: String,
    },
    /// A singleton's replacement, waiting for the instance it replaces to end (`ps`: pending).
    Waiting,
}

/// One instance position and its task.
pub struct Slot {
    process: ProcessName,
    /// The version of the type this slot runs; a deploy replaces the slot.
    version: Arc<ProcessType>,
    /// Cancelled once the slot's task has ended and it left the state (singletons wait for
    /// it before their replacement starts).
    ended: CancellationToken,
    /// Health check state for `ps`: `None` without a check.
    health: Mutex<Option<String>>,
    index: u32,
    /// This slot's memory limit; a memory change replaces the slot.
    memory: ByteSize,
    /// Cancelled to stop the slot (drain, then end). A child of the host's shutdown token.
    cancel: CancellationToken,
    /// Set when the slot stops: its web instance must not go back to the pool.
    retired: Arc<AtomicBool>,
    status: Mutex<(SlotState, SystemTime)>,
    /// Linear memory in use by the current instance, kept by its limiter.
    memory_used: Arc<AtomicU64>,
    /// Requests served over all incarnations.
    requests: Arc<AtomicU64>,
    /// Times the instance was replaced after ending.
    restarts: AtomicU32,
    /// Incarnations that ended in failure (crash, failed start, failing health, a worker's
    /// error exit), exited ones included; not recycling or a client going away. A deploy
    /// fails if one of its new instances has any.
    failures: AtomicU32,
    /// The last failure, for the deploy's message.
    last_failure: Mutex<Option<String>>,
}

impl Slot {
    fn name(&self) -> String {
        format!("{}.{}", self.process, self.index)
    }

    fn set(&self, state: SlotState) {
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = (state, SystemTime::now());
    }

    /// Stops the slot: it leaves the pool, finishes what it is doing, and ends.
    fn stop(&self) {
        if !self.cancel.is_cancelled() {
            self.retired.store(true, Ordering::Release);
            self.set(SlotState::Draining);
            self.cancel.cancel();
        }
    }

    fn stopping(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Ended and left so by its restart policy.
    fn exited(&self) -> bool {
        matches!(
            self.status.lock().unwrap_or_else(|e| e.into_inner()).0,
            SlotState::Exited { .. }
        )
    }

    fn set_health(&self, health: String) {
        *self.health.lock().unwrap_or_else(|e| e.into_inner()) = Some(health);
    }
}

/// Desired formation and live slots.
struct State {
    desired: Formation,
    slots: Vec<Arc<Slot>>,
    /// The current version of each type; new slots start with it.
    types: BTreeMap<ProcessName, Arc<ProcessType>>,
}

/// Why a formation change was refused; nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Bad input: names the value at fault.
    #[error("{0}")]
    Invalid(String),
    /// The change could not be applied (e.g. instances with the new limit do not start).
    #[error("{0}")]
    Failed(String),
}

/// How a completed change went, for the command's output.
#[derive(Debug, Serialize)]
pub struct Outcome {
    /// The whole formation after the change.
    pub formation: Vec<TypeReport>,
    /// Notes for the user (pending instances, failures of new instances).
    pub notes: Vec<String>,
}

/// One type in `ps` and in command output.
#[derive(Debug, Serialize)]
pub struct TypeReport {
    /// `web`
    pub name: String,
    /// `http` or `background`.
    pub kind: &'static str,
    /// Desired instances.
    pub desired: u32,
    /// Instances up.
    pub running: u32,
    /// Memory limit per instance, in bytes.
    pub memory: u64,
    /// Component file.
    pub component: String,
    /// SHA-256 of the component.
    pub digest: String,
    /// At most one instance.
    pub singleton: bool,
    /// The release of the type's current version.
    pub release: u32,
}

/// One instance in `ps`.
#[derive(Debug, Serialize)]
pub struct InstanceReport {
    /// `web.1`
    pub id: String,
    /// `web`
    #[serde(rename = "type")]
    pub process: String,
    /// `starting`, `up`, `crashed`, `draining`, `pending`.
    pub state: &'static str,
    /// Unix time of the last state change (absent for pending instances).
    pub since: Option<f64>,
    /// Crash reason or pending reason.
    pub reason: Option<String>,
    /// For crashed instances: milliseconds until the restart.
    pub restart_in_ms: Option<u64>,
    /// Linear memory in use, in bytes.
    pub memory_used: u64,
    /// Memory limit, in bytes.
    pub memory_limit: u64,
    /// Requests served.
    pub requests: u64,
    /// Restarts after crashes.
    pub restarts: u32,
    /// `passing`, `failing (1/3)`, `checking`; absent without a health check.
    pub health: Option<String>,
    /// The release this instance runs (0 without releases).
    pub release: u32,
}

/// The shared store in `ps`.
#[derive(Debug, Serialize)]
pub struct StoreStatus {
    /// `embedded (…/shared.db)` or `redis (url)`.
    pub backend: String,
    /// Whether calls reach it.
    pub reachable: bool,
    /// Unix time of the first failed call, while unreachable.
    pub since: Option<f64>,
    /// What the first failed call said, while unreachable.
    pub error: Option<String>,
}

/// `ps`: every type and every instance, pending ones included.
#[derive(Debug, Serialize)]
pub struct PsReport {
    /// Per type, in name order.
    pub types: Vec<TypeReport>,
    /// Per instance, grouped by type, by index.
    pub instances: Vec<InstanceReport>,
    /// The host's memory budget, in bytes.
    pub capacity: u64,
    /// Memory reserved by existing instances, in bytes.
    pub reserved: u64,
}

/// Host-wide limits the supervisor enforces.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Memory budget: Σ memory limits of existing instances stays within it.
    pub capacity: ByteSize,
    /// Instance pool size.
    pub max_instances: u32,
    /// Largest per-instance memory limit the engine was sized for.
    pub max_memory: ByteSize,
    /// How long a draining web instance may take to finish its request.
    pub drain_timeout: Duration,
}

/// Runs the formation.
pub struct Supervisor {
    runtime: Arc<Runtime>,
    logs: Logs,
    /// Cancelled at shutdown; every slot's token is a child of it.
    cancel: CancellationToken,
    /// Tracks slot tasks so shutdown can wait for them.
    tasks: TaskTracker,
    restart: RestartPolicy,
    /// Given to guests as `PORT`.
    port: u16,
    limits: Limits,
    state: Mutex<State>,
    /// Pools and log colours per type name; they outlive versions of the type.
    registry: Mutex<Registry>,
    /// Requests that may wait per pool.
    queue_limit: usize,
    /// Rotation of each pool (see [`Pool::with_rotation`]).
    rotate: usize,
    /// Memory of a type that appears in a deploy without its own `memory`.
    default_memory: ByteSize,
    /// The app's shared store (buckets, queues).
    shared: Option<Store>,
    /// The host runtime, where web and consumer slots run.
    main: tokio::runtime::Handle,
    /// Serializes formation changes; held across a whole rolling replacement.
    ops: tokio::sync::Mutex<()>,
    /// Where the formation is persisted, if anywhere.
    store: Option<StateDir>,
    /// Runtime for background processes (see [`SupervisorConfig::background`]).
    background: tokio::runtime::Handle,
    /// Restarts and instantiation times are counted here.
    metrics: Arc<crate::metrics::Metrics>,
}

/// What [`Supervisor::new`] needs.
pub struct SupervisorConfig {
    /// Engine and linker.
    pub runtime: Arc<Runtime>,
    /// Log stream.
    pub logs: Logs,
    /// Restart backoff.
    pub restart: RestartPolicy,
    /// Given to guests as `PORT`.
    pub port: u16,
    /// Host-wide limits.
    pub limits: Limits,
    /// Process types with their compiled components, in declaration order.
    pub types: Vec<(ProcessSpec, Arc<Compiled>)>,
    /// The release they belong to.
    pub release: u32,
    /// Requests that may wait per pool.
    pub queue_limit: usize,
    /// Rotation of each pool.
    pub rotate: usize,
    /// Memory of a type added by a deploy without its own `memory`.
    pub default_memory: ByteSize,
    /// The app's shared store.
    pub shared: Option<Store>,
    /// Initial desired formation.
    pub formation: Formation,
    /// Persistence.
    pub store: Option<StateDir>,
    /// Where background processes run: a runtime of low-priority threads, so CPU-bound
    /// workers take what the web instances leave instead of stalling them.
    pub background: tokio::runtime::Handle,
    /// Metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
}

type Ready = oneshot::Receiver<Result<(), String>>;

/// Longest wait for a new instance to be ready (instantiated and, with a health check,
/// passing it) in a scale, restart or deploy.
const READY_WAIT: Duration = Duration::from_secs(300);

/// Longest wait for the shared store to answer a consumer's `reserve`.
const RESERVE_WAIT: Duration = Duration::from_secs(10);

/// How long a deploy watches new background and consumer instances after its roll-out before
/// calling it a success.
const SETTLE: Duration = Duration::from_secs(1);

/// What the log says of a type whose instances break on their second request.
const BROKE_ON_SECOND: &str = "its instances answer their first request and fail their second, so its component cannot serve twice (componentize-js/StarlingMonkey components cannot)";

/// What a consumer says of an answer that came after its message's lease lapsed.
/// (The lease outlasts the handler's timeout, so only a host stalled past it gets here.)
const LAPSED: &str = "this answer changed nothing";

/// Per type name: what outlives a version of the type.
#[derive(Default)]
struct Registry {
    pools: BTreeMap<ProcessName, Arc<Pool<WebInstance>>>,
    colours: BTreeMap<ProcessName, usize>,
}

/// One type's new version in a deploy.
pub struct NewVersion {
    /// The resolved type.
    pub spec: ProcessSpec,
    /// Its compiled component.
    pub compiled: Arc<Compiled>,
}

/// What a deploy changed, per type.
#[derive(Debug, Default, Serialize)]
pub struct Changes {
    /// Types that appeared.
    pub added: Vec<String>,
    /// Types whose component or settings changed (rolled).
    pub changed: Vec<String>,
    /// Types that disappeared (stopped).
    pub removed: Vec<String>,
    /// Types left as they were but for their count (a manifest `count` that changed), with
    /// the new count.
    pub scaled: Vec<(String, u32)>,
}

impl Changes {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.changed.is_empty()
            && self.removed.is_empty()
            && self.scaled.is_empty()
    }
}

impl Supervisor {
    /// A supervisor with nothing started yet; call [`Supervisor::start`].
    pub fn new(config: SupervisorConfig) -> Arc<Self> {
        let this = Self {
            runtime: config.runtime,
            logs: config.logs,
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
            restart: config.restart,
            port: config.port,
            limits: config.limits,
            state: Mutex::new(State {
                desired: config.formation,
                slots: Vec::new(),
                types: BTreeMap::new(),
            }),
            registry: Mutex::default(),
            queue_limit: config.queue_limit,
            rotate: config.rotate,
            default_memory: config.default_memory,
            shared: config.shared,
            main: tokio::runtime::Handle::current(),
            ops: tokio::sync::Mutex::new(()),
            store: config.store,
            background: config.background,
            metrics: config.metrics,
        };
        let types = config
            .types
            .into_iter()
            .map(|(spec, compiled)| {
                let version = this.version(spec, compiled, config.release);
                (version.spec.name.clone(), version)
            })
            .collect();
        this.lock().types = types;
        Arc::new(this)
    }

    /// A version of a type, with its type's pool (created on first use) and log colour.
    fn version(
        &self,
        spec: ProcessSpec,
        compiled: Arc<Compiled>,
        release: u32,
    ) -> Arc<ProcessType> {
        let pool = compiled.is_http().then(|| self.pool(&spec.name));
        let mut registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let next = registry.colours.len();
        let colour = *registry.colours.entry(spec.name.clone()).or_insert(next);
        let shared = SharedCtx {
            store: self.shared.clone(),
            buckets: spec.buckets.iter().cloned().collect(),
            queues: spec.queues.iter().cloned().collect(),
            denied: Some(Arc::new(Denied::new(spec.name.as_str(), self.logs.clone()))),
        };
        let reuse = Arc::new(Reuse::new(spec.max_requests == Some(1)));
        Arc::new(ProcessType {
            spec,
            compiled,
            colour,
            pool,
            release,
            shared,
            reuse,
        })
    }

    /// The pool of HTTP type `name`, created empty if the type has none yet: the router of a
    /// type that a later deploy adds answers 503 until then.
    pub fn pool(&self, name: &ProcessName) -> Arc<Pool<WebInstance>> {
        let mut registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        registry
            .pools
            .entry(name.clone())
            .or_insert_with(|| Arc::new(Pool::with_rotation(self.queue_limit, self.rotate)))
            .clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the desired formation and waits until every started instance is up. An instance
    /// that cannot even be instantiated fails the start.
    pub async fn start(self: &Arc<Self>) -> Result<(), String> {
        let started = {
            let mut state = self.lock();
            self.reconcile(&mut state)
        };
        for (name, ready) in started {
            let failure = match ready.await {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e,
                Err(_) => "its task ended unexpectedly".to_string(),
            };
            return Err(format!("instance {name} failed to start: {failure}"));
        }
        for note in self.pending_notes(&self.lock()) {
            self.logs.host(note);
        }
        Ok(())
    }

    /// Stops every slot and waits up to `timeout` for them to end.
    pub async fn shutdown(&self, timeout: Duration) -> bool {
        {
            // Under the state lock, so no reconcile can start a slot in between: every slot
            // stops the way a scale-down stops it (out of the pool first), then the host token
            // keeps slots that end from reconciling.
            let state = self.lock();
            for slot in &state.slots {
                slot.stop();
            }
            self.cancel.cancel();
        }
        self.tasks.close();
        tokio::time::timeout(timeout, self.tasks.wait())
            .await
            .is_ok()
    }

    /// The desired formation.
    pub fn desired(&self) -> Formation {
        self.lock().desired.clone()
    }

    /// Brings slots in line with the desired formation; returns the started slots' readiness.
    fn reconcile(self: &Arc<Self>, state: &mut State) -> Vec<(String, Ready)> {
        let desired: Vec<(ProcessName, Scale)> =
            state.desired.iter().map(|(n, s)| (n.clone(), s)).collect();
        // Surplus first, so the room they free counts for the rest (once they have ended).
        for slot in &state.slots {
            if !slot.stopping() && state.desired.get(&slot.process).is_none() {
                slot.stop();
            }
        }
        for (name, scale) in &desired {
            for slot in &state.slots {
                if slot.process == *name && !slot.stopping() && slot.index > scale.count {
                    slot.stop();
                }
            }
        }
        let mut started = Vec::new();
        for (name, scale) in &desired {
            let Some(process) = state.types.get(name).cloned() else {
                continue;
            };
            for index in missing(state, name, scale.count) {
                if self.room(state, scale.memory).is_err() {
                    break;
                }
                // A singleton waits until its previous instance has ended.
                if process.spec.singleton && state.slots.iter().any(|s| s.process == *name) {
                    break;
                }
                let (slot, ready) =
                    self.spawn_slot(state, &process, index, scale.memory, Vec::new());
                started.push((slot.name(), ready));
            }
        }
        started
    }

    /// Whether one more instance of `memory` fits; the error says why not.
    fn room(&self, state: &State, memory: ByteSize) -> Result<(), String> {
        if state.slots.len() >= self.limits.max_instances as usize {
            return Err(format!(
                "the instance pool is full ({} instances; restart `wasmform up` with a larger `--max-instances`)",
                self.limits.max_instances
            ));
        }
        let reserved = reserved(state);
        if reserved + memory.as_u64() > self.limits.capacity.as_u64() {
            return Err(format!(
                "capacity: needs {memory}, {} of {} in use",
                ByteSize::bytes(reserved),
                self.limits.capacity
            ));
        }
        Ok(())
    }

    fn pending_notes(&self, state: &State) -> Vec<String> {
        self.pending(state)
            .into_iter()
            .map(|(name, reason)| format!("{name} pending: {reason}"))
            .collect()
    }

    /// Instances desired but not started, with the reason. An instance that will fit once the
    /// stopping ones have ended (a roll in progress) is said to wait for them, not to lack
    /// room: the room is counted for the pending instances in order, as they will start.
    fn pending(&self, state: &State) -> Vec<(String, String)> {
        let mut staying: u64 = state
            .slots
            .iter()
            .filter(|s| !s.stopping())
            .map(|s| s.memory.as_u64())
            .sum();
        let mut pending = Vec::new();
        for (name, scale) in state.desired.iter() {
            for index in missing(state, name, scale.count) {
                let reason = match self.room(state, scale.memory) {
                    Err(e)
                        if !e.starts_with("capacity:")
                            || staying + scale.memory.as_u64() > self.limits.capacity.as_u64() =>
                    {
                        e
                    }
                    _ => {
                        staying += scale.memory.as_u64();
                        "waiting for a stopping instance to end".to_string()
                    }
                };
                pending.push((format!("{name}.{index}"), reason));
            }
        }
        pending
    }

    fn spawn_slot(
        self: &Arc<Self>,
        state: &mut State,
        process: &Arc<ProcessType>,
        index: u32,
        memory: ByteSize,
        after: Vec<CancellationToken>,
    ) -> (Arc<Slot>, Ready) {
        let waiting = !after.is_empty();
        let slot = Arc::new(Slot {
            process: process.spec.name.clone(),
            version: process.clone(),
            ended: CancellationToken::new(),
            health: Mutex::new(process.spec.health.as_ref().map(|_| "checking".to_string())),
            index,
            memory,
            cancel: self.cancel.child_token(),
            retired: Arc::default(),
            status: Mutex::new((
                if waiting {
                    SlotState::Waiting
                } else {
                    SlotState::Starting
                },
                SystemTime::now(),
            )),
            memory_used: Arc::default(),
            requests: Arc::default(),
            restarts: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            last_failure: Mutex::new(None),
        });
        state.slots.push(slot.clone());
        let slot_for_caller = slot.clone();
        let (tx, rx) = oneshot::channel();
        let this = self.clone();
        let foreground = !matches!(process.compiled.kind, Kind::Command(_));
        let process = process.clone();
        let task = self.tasks.track_future(async move {
            // A singleton's replacement holds its place but starts only once the instance it
            // replaces has ended.
            let mut go = true;
            for after in after {
                tokio::select! {
                    () = after.cancelled() => {}
                    () = slot.cancel.cancelled() => {
                        go = false;
                        break;
                    }
                }
            }
            if go {
                this.run_slot(&process, &slot, tx).await;
            }
            this.slot_ended(&slot);
        });
        if foreground {
            // On the host runtime even when a background slot's end started this one.
            self.main.spawn(task);
        } else {
            self.background.spawn(task);
        }
        (slot_for_caller, rx)
    }

    /// Removes an ended slot and starts pending instances that now fit.
    fn slot_ended(self: &Arc<Self>, slot: &Arc<Slot>) {
        let mut state = self.lock();
        state.slots.retain(|s| !Arc::ptr_eq(s, slot));
        slot.ended.cancel();
        if !self.cancel.is_cancelled() {
            drop(self.reconcile(&mut state));
        }
    }

    async fn run_slot(
        &self,
        process: &ProcessType,
        slot: &Slot,
        ready: oneshot::Sender<Result<(), String>>,
    ) {
        let name = slot.name();
        let mut ready = Some(ready);
        let mut backoff = Backoff::new(self.restart);
        // Whether this slot counts in its pool as up or starting. Requests may wait for the
        // slot's instance while it does; it stays reserved across an immediate restart so a
        // crash of the only instance makes requests wait for the replacement, not fail.
        let mut reserved = false;
        // Whether the last incarnation was used up (not a crash): its replacement starts
        // without a log line or readiness check of its own.
        let mut recycled = false;
        // Whether a command (scale, restart, deploy) was told that this slot's first start
        // failed: it decides whether the slot goes on (a deploy rolls back and stops it), so the
        // restart waits at least the backoff base and is logged only when it happens.
        let mut awaited = false;
        loop {
            if slot.stopping() {
                break;
            }
            slot.set(SlotState::Starting);
            let started = Instant::now();
            if let Some(pool) = process.pool.as_ref().filter(|_| !reserved) {
                pool.reserve();
                reserved = true;
            }
            // (reason, restart with backoff?, a failure?)
            let (reason, backoff_applies, failed) = match self
                .run_once(process, slot, &name, &mut ready, recycled)
                .await
            {
                Ok(Ended::Stopped) => break,
                Ok(Ended::Recycled(reason)) => {
                    if let Some(reason) = reason {
                        self.logs.host(format!("{name} {reason}"));
                    }
                    recycled = true;
                    continue;
                }
                Ok(Ended::Request(reason)) => (reason, false, true),
                // As a crash loop would: a sick instance must not restart in a hot loop.
                Ok(Ended::Unhealthy(reason)) => (reason, true, true),
                // Not the instance's fault: replaced at once, not a failure.
                Ok(Ended::Cancelled(reason)) => (reason, false, false),
                Ok(Ended::Process { reason, success }) => (reason, true, !success),
                Err(boot) => {
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(Err(boot.clone()));
                        awaited = true;
                    }
                    (format!("failed to start: {boot}"), true, true)
                }
            };
            recycled = false;
            if slot.stopping() {
                break;
            }
            if failed {
                slot.failures.fetch_add(1, Ordering::Relaxed);
                *slot.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.clone());
            }
            let restart = match process.spec.restart {
                RestartMode::Always => true,
                RestartMode::OnFailure => failed,
                RestartMode::Never => false,
            };
            if !restart {
                if let Some(pool) = process.pool.as_ref().filter(|_| reserved) {
                    pool.gone();
                    reserved = false;
                }
                self.logs.host(format!(
                    "{name} {reason}; not restarted (restart = \"{}\")",
                    match process.spec.restart {
                        RestartMode::OnFailure => "on-failure",
                        _ => "never",
                    }
                ));
                slot.set(SlotState::Exited { reason });
                // The slot keeps its place (so the formation does not start another) until a
                // restart, scale or deploy stops it.
                slot.cancel.cancelled().await;
                break;
            }
            slot.restarts.fetch_add(1, Ordering::Relaxed);
            let delay = if backoff_applies {
                backoff.next(started.elapsed())
            } else {
                Duration::ZERO
            };
            // A command awaiting this start was told it failed and decides first: the restart
            // waits at least the backoff base and is logged when it happens.
            let awaited = std::mem::take(&mut awaited);
            let delay = if awaited {
                delay.max(self.restart.base)
            } else {
                delay
            };
            if let Some(pool) = process
                .pool
                .as_ref()
                .filter(|_| reserved && !delay.is_zero())
            {
                pool.gone();
                reserved = false;
            }
            if awaited {
                self.logs.host(format!("{name} {reason}"));
            } else if delay.is_zero() {
                self.logs.host(format!("{name} {reason}; restarting now"));
            } else {
                self.logs.host(format!(
                    "{name} {reason}; restarting in {}",
                    humanize(delay)
                ));
            }
            self.metrics.restart(process.spec.name.as_str(), &reason);
            slot.set(SlotState::Crashed {
                reason,
                restart_at: Instant::now() + delay,
            });
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = slot.cancel.cancelled() => break,
            }
            if awaited {
                self.logs
                    .host(format!("{name} restarting after failing to start"));
            }
        }
        if let Some(pool) = process.pool.as_ref().filter(|_| reserved) {
            pool.gone();
        }
    }

    /// Runs one incarnation of an instance until it ends or the slot stops; `Err` says it
    /// could not start (or, with a health check, never passed it). `recycled`: it replaces an
    /// instance that was used up, which was logged as up and checked already.
    async fn run_once(
        &self,
        process: &ProcessType,
        slot: &Slot,
        name: &str,
        ready: &mut Option<oneshot::Sender<Result<(), String>>>,
        recycled: bool,
    ) -> Result<Ended, String> {
        let setup = InstanceSetup {
            instance: name,
            process: process.spec.name.as_str(),
            program: &process.compiled.program,
            args: &process.spec.args,
            port: self.port,
            memory: slot.memory,
            memory_used: slot.memory_used.clone(),
            stdout: self.logs.sink(name, process.colour),
            stderr: self.logs.sink(name, process.colour),
            env: &process.spec.env,
            allowed_outbound_hosts: &process.spec.allowed_outbound_hosts,
            shared: &process.shared,
        };
        let sinks = (setup.stdout.clone(), setup.stderr.clone());
        let starting = Instant::now();
        let mark_up = |ready: &mut Option<oneshot::Sender<Result<(), String>>>| {
            self.metrics.instantiated(starting.elapsed().as_secs_f64());
            slot.set(SlotState::Up);
            match ready.take() {
                Some(ready) => {
                    let _ = ready.send(Ok(()));
                }
                None if recycled => {}
                None => self.logs.host(format!("{name} up")),
            }
        };
        let ended = match &process.compiled.kind {
            Kind::Http(pre) => {
                let pool = process.pool.as_ref().expect("HTTP types have a pool");
                let (exit_tx, mut exit_rx) = oneshot::channel();
                let start = WebInstance::start(
                    &self.runtime,
                    pre,
                    setup,
                    exit_tx,
                    slot.retired.clone(),
                    slot.requests.clone(),
                    WebSettings {
                        request_timeout: process.spec.request_timeout,
                        max_requests: process.spec.max_requests,
                        singleton: process.spec.singleton,
                        reuse: process.reuse.clone(),
                    },
                );
                let mut instance = tokio::select! {
                    instance = start => instance.map_err(|e| format!("{e:#}"))?,
                    () = slot.cancel.cancelled() => return Ok(Ended::Stopped),
                };
                let single_use = process.reuse.single_use();
                // A single-use type's instances are checked once, when the slot starts (a
                // check would use up the instance it ran on), and never while idle.
                let health = process.spec.health.as_ref().filter(|_| !single_use);
                if let Some(check) = process.spec.health.as_ref().filter(|_| !recycled) {
                    // Readiness: no traffic until the check passes, within the grace period.
                    instance = tokio::select! {
                        passed = ready_check(instance, check, slot) => passed?,
                        () = slot.cancel.cancelled() => return Ok(Ended::Stopped),
                    };
                    if single_use {
                        // The check used this instance up: a fresh one takes the traffic.
                        return Ok(Ended::Recycled(None));
                    }
                }
                pool.release(instance);
                mark_up(ready);
                let mut ticks = health.map(|check| {
                    let mut ticks = tokio::time::interval_at(
                        tokio::time::Instant::now() + check.interval,
                        check.interval,
                    );
                    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    ticks
                });
                let mut failures = 0;
                loop {
                    tokio::select! {
                        ended = &mut exit_rx => {
                            // The sender is dropped without a reason only if the instance was
                            // dropped by the pool, which happens only to a retired instance.
                            break match ended {
                                Ok(Exit::Crashed { reason, answered }) => {
                                    if answered == 1 && process.reuse.broke_on_second() {
                                        self.logs.host(format!(
                                            "process type `{type_}`: {BROKE_ON_SECOND}; `{type_}` gets a fresh instance for every request from now on: set `max_requests = 1` under [processes.{type_}] in wasmform.toml to start it that way",
                                            type_ = process.spec.name
                                        ));
                                    }
                                    Ended::Request(reason)
                                }
                                Ok(Exit::Cancelled(reason)) => Ended::Cancelled(reason),
                                Ok(Exit::Recycled(reason)) => Ended::Recycled(reason),
                                Err(_) => Ended::Stopped,
                            };
                        }
                        () = slot.cancel.cancelled() => {
                            // Drain (`Slot::stop` retired the instance): out of the rotation
                            // now; a request in flight finishes, then the pool drops the
                            // retired instance and `exit_rx` resolves.
                            drop(pool.take_idle(|i| i.is_retired()));
                            // As long as the type's own request timeout allows a request.
                            let drain = process
                                .spec
                                .request_timeout
                                .map_or(self.limits.drain_timeout, |t| t + Duration::from_secs(1));
                            let _ = tokio::time::timeout(drain, exit_rx).await;
                            break Ended::Stopped;
                        }
                        _ = tick(&mut ticks) => {
                            let check = health.expect("ticks only with a check");
                            // Liveness: checked while idle; a busy instance is skipped this
                            // time (a stuck one meets the request timeout instead).
                            let Some(instance) = pool.take_idle(|i| i.belongs_to(&slot.retired)).pop() else {
                                continue;
                            };
                            let (instance, verdict) = instance.check(&check.path, check.timeout).await;
                            match verdict {
                                Ok(()) => {
                                    failures = 0;
                                    slot.set_health("passing".into());
                                }
                                Err(why) => {
                                    failures += 1;
                                    slot.set_health(format!("failing ({failures}/{})", check.threshold));
                                    if failures >= check.threshold {
                                        drop(instance);
                                        break Ended::Unhealthy(format!(
                                            "failed {failures} health checks in a row ({why}); taken out of rotation"
                                        ));
                                    }
                                    self.logs.host(format!("{name} health check failed ({failures}/{}): {why}", check.threshold));
                                }
                            }
                            // `None`: the check crashed it, and `exit_rx` says so next.
                            if let Some(instance) = instance {
                                pool.release(instance);
                            }
                        }
                    }
                }
            }
            Kind::Consumer(pre) => {
                let start = instance::Consumer::start(&self.runtime, pre, setup);
                let mut consumer = tokio::select! {
                    consumer = start => consumer.map_err(|e| format!("{e:#}"))?,
                    () = slot.cancel.cancelled() => return Ok(Ended::Stopped),
                };
                mark_up(ready);
                self.consume(process, slot, name, &mut consumer).await
            }
            Kind::Command(pre) => {
                let run = instance::run_worker(&self.runtime, pre, setup, || mark_up(ready));
                tokio::select! {
                    ended = run => {
                        let (reason, success) = ended?;
                        Ended::Process { reason, success }
                    }
                    () = slot.cancel.cancelled() => Ended::Stopped,
                }
            }
        };
        sinks.0.flush();
        sinks.1.flush();
        Ok(ended)
    }

    /// A consumer instance's loop: take the next due message of the type's queue, deliver
    /// it, acknowledge or redeliver it. Ends when the instance crashes (its message is
    /// redelivered) or the slot stops. A stop drains like HTTP: no new message is taken, the
    /// one in hand finishes (within the type's timeout) and is acknowledged or redelivered as
    /// usual; only a handler that runs out of time is put back without counting the delivery.
    async fn consume(
        &self,
        process: &ProcessType,
        slot: &Slot,
        name: &str,
        consumer: &mut instance::Consumer,
    ) -> Ended {
        let (Some(store), Some(queue)) = (&process.shared.store, &process.spec.consume) else {
            slot.cancel.cancelled().await;
            return Ended::Stopped;
        };
        let timeout = process
            .spec
            .request_timeout
            .unwrap_or(self.limits.drain_timeout);
        let max = process.spec.max_attempts;
        loop {
            // Not raced with a stop: a reservation made on the server must not be dropped
            // half-way. The lease outlasts the handler's timeout: only a dead host lets it lapse.
            // Bounded all the same, so a store that stopped answering (a half-open Redis
            // connection) cannot hold up a scale-down or shutdown; a reservation made without
            // its answer lapses and the message comes back.
            let job = match tokio::time::timeout(
                RESERVE_WAIT,
                store.reserve(queue, timeout + Duration::from_secs(1), max),
            )
            .await
            {
                Ok(job) => job,
                Err(_) => Err(format!(
                    "no answer from the shared store within {}",
                    humanize(RESERVE_WAIT)
                )),
            };
            if slot.stopping() {
                if let Ok(Some(job)) = &job
                    && let Err(e) = store.release(job).await
                {
                    self.logs
                        .host(format!("{name} could not put message {} back: {e}", job.id));
                }
                return Ended::Stopped;
            }
            let job = match job {
                Ok(Some(job)) => job,
                Ok(None) => {
                    tokio::select! {
                        () = store.wait(Duration::from_millis(250)) => {}
                        () = slot.cancel.cancelled() => return Ended::Stopped,
                    }
                    continue;
                }
                Err(e) => {
                    self.logs
                        .host(format!("{name} cannot read queue `{queue}`: {e}"));
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        () = slot.cancel.cancelled() => return Ended::Stopped,
                    }
                    continue;
                }
            };
            slot.requests.fetch_add(1, Ordering::Relaxed);
            // A stop does not interrupt the handler: its side effects (a mail sent) must not
            // be redone. It finishes within the type's timeout, as a draining HTTP request
            // does, and is answered as usual; the slot ends after that answer.
            let started = Instant::now();
            let delivery = consumer.deliver(queue, job.body.clone(), timeout).await;
            let (reason, crashed) = match delivery {
                instance::Delivery::Done => {
                    match store.ack(&job).await {
                        Ok(true) => {}
                        Ok(false) => self.logs.host(format!(
                            "{name} message {} of `{queue}` was handled, but its lease had lapsed and it was delivered again: {LAPSED}",
                            job.id
                        )),
                        Err(e) => self.logs.host(format!(
                            "{name} could not acknowledge message {}: {e}",
                            job.id
                        )),
                    }
                    if slot.stopping() {
                        return Ended::Stopped;
                    }
                    continue;
                }
                instance::Delivery::Crashed(_)
                    if slot.stopping() && started.elapsed() >= timeout =>
                {
                    // Stopped, and the handler did not finish in time: not the message's
                    // fault, so it goes back without counting the delivery.
                    if let Err(e) = store.release(&job).await {
                        self.logs
                            .host(format!("{name} could not put message {} back: {e}", job.id));
                    }
                    return Ended::Stopped;
                }
                instance::Delivery::Failed(text) => (text, None),
                instance::Delivery::Crashed(reason) => (reason.clone(), Some(reason)),
            };
            let outcome = match store.nack(&job, &reason, max).await {
                Ok(Nacked::Retry) => format!("will retry (attempt {}/{max})", job.attempts),
                Ok(Nacked::DeadLettered) => {
                    format!("dead-lettered after {} attempts", job.attempts)
                }
                Ok(Nacked::Lapsed) => format!("its lease had lapsed: {LAPSED}"),
                Err(e) => format!("could not be put back: {e}"),
            };
            self.logs.host(format!(
                "{name} message {} of `{queue}` failed: {reason}; {outcome}",
                job.id
            ));
            self.metrics.queue_failure(process.spec.name.as_str());
            if let Some(reason) = crashed {
                return Ended::Request(reason);
            }
            if slot.stopping() {
                return Ended::Stopped;
            }
        }
    }

    /// Applies Heroku-style changes (`web=3`, `worker+1`, `web=2:512MiB`) and `--memory`.
    /// Invalid input changes nothing. Returns once new instances are up (or failed) and any
    /// rolling memory replacement is done.
    pub async fn scale(
        self: &Arc<Self>,
        changes: &[String],
        memory: Option<ByteSize>,
    ) -> Result<Outcome, ControlError> {
        let _op = self.ops.lock().await;
        let current = self.desired();
        let (next, named) = current
            .with_named_changes(changes, memory, self.limits.max_memory)
            .map_err(ControlError::Invalid)?;
        self.check_singletons(&next)?;
        // Try every new memory limit on a throwaway instance before changing anything.
        for (name, scale) in next.iter() {
            let old = current.get(name).expect("same types");
            if scale.memory != old.memory {
                self.probe(name, scale.memory).await.map_err(|e| {
                    ControlError::Failed(format!(
                        "`{name}` cannot run with {}: {e}; the formation is unchanged",
                        scale.memory
                    ))
                })?;
            }
        }
        if let Some(store) = &self.store {
            store
                .store_formation(&next)
                .map_err(|e| ControlError::Failed(format!("{e:#}; the formation is unchanged")))?;
        }
        self.logs.event(API, format!("Scale to {next}"));
        let started = {
            let mut state = self.lock();
            state.desired = next.clone();
            // A scale that names a type starts its exited instances again (their `restart`
            // policy left them ended), as a restart or deploy does.
            for slot in &state.slots {
                if named.contains(&slot.process) && slot.exited() {
                    slot.stop();
                }
            }
            self.reconcile(&mut state)
        };
        let mut notes = self.await_started(started).await;
        // Rolling replacement of instances whose memory limit changed.
        for (name, scale) in next.iter() {
            // Highest index first: what does not fit under the budget is the surplus, and
            // stopping it first makes room for the lower ones.
            let stale: Vec<Arc<Slot>> =
                self.active_slots(|s| s.process == *name && s.memory != scale.memory);
            for slot in stale.iter().rev() {
                let process = slot.version.clone();
                match self.replace(slot, &process, scale.memory).await {
                    Ok(None) => {}
                    Ok(Some(note)) | Err(note) => notes.push(note),
                }
            }
        }
        let state = self.lock();
        notes.extend(self.pending_notes(&state));
        Ok(Outcome {
            formation: self.type_reports(&state),
            notes,
        })
    }

    /// Rolling restart of a type, an instance (`web.1`) or everything (`None`).
    pub async fn restart(self: &Arc<Self>, target: Option<&str>) -> Result<Outcome, ControlError> {
        let _op = self.ops.lock().await;
        let slots = self.active_slots(|s| match target {
            None => true,
            Some(t) => s.process.as_str() == t || s.name() == t,
        });
        if slots.is_empty() {
            let (exited, running): (Vec<Arc<Slot>>, Vec<Arc<Slot>>) = self
                .active_slots(|_| true)
                .into_iter()
                .partition(|s| s.exited());
            let names = |slots: &[Arc<Slot>]| {
                if slots.is_empty() {
                    "none".to_string()
                } else {
                    slots
                        .iter()
                        .map(|s| s.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            };
            let exited = if exited.is_empty() {
                String::new()
            } else {
                format!("; exited: {}", names(&exited))
            };
            return Err(ControlError::Invalid(format!(
                "nothing to restart: no running instance matches `{}` (running: {}{exited})",
                target.unwrap_or("*"),
                names(&running)
            )));
        }
        self.logs.event(
            API,
            format!("Restart {}", target.unwrap_or("all instances")),
        );
        let mut notes = Vec::new();
        for slot in slots {
            let current = self.lock().types.get(&slot.process).cloned();
            let process = current.unwrap_or_else(|| slot.version.clone());
            match self.replace(&slot, &process, slot.memory).await {
                Ok(None) => {}
                Ok(Some(note)) | Err(note) => notes.push(note),
            }
        }
        Ok(Outcome {
            formation: self.type_reports(&self.lock()),
            notes,
        })
    }

    fn active_slots(&self, pred: impl Fn(&Slot) -> bool) -> Vec<Arc<Slot>> {
        let mut slots: Vec<Arc<Slot>> = self
            .lock()
            .slots
            .iter()
            .filter(|s| !s.stopping() && pred(s))
            .cloned()
            .collect();
        slots.sort_by(|a, b| (&a.process, a.index).cmp(&(&b.process, b.index)));
        slots
    }

    /// Starts a new slot running `process` beside `old` with `memory`; once it is up, `old`
    /// drains. If the new one fails to start, it is stopped and `old` keeps running. A
    /// singleton is replaced the other way round: `old` stops first and must have ended before
    /// the new one starts, so two never run at once.
    ///
    /// The memory budget holds here, for every path that replaces instances (scale, restart,
    /// deploy): the new one surges beside `old` only if the budget has room for both; if it
    /// fits only in `old`'s room, `old` stops first, as a singleton's does; if it does not fit
    /// even then, `old` stops and its index is pending (`Ok(Some(note))`) until room frees.
    /// Room is counted once the instances already stopping have ended: the new one waits for
    /// them.
    async fn replace(
        self: &Arc<Self>,
        old: &Arc<Slot>,
        process: &Arc<ProcessType>,
        memory: ByteSize,
    ) -> Result<Option<String>, String> {
        let (new, ready) = {
            let mut state = self.lock();
            let capacity = self.limits.capacity.as_u64();
            let staying: u64 = state
                .slots
                .iter()
                .filter(|s| !s.stopping())
                .map(|s| s.memory.as_u64())
                .sum();
            let surge = staying + memory.as_u64() <= capacity;
            let instead = staying.saturating_sub(old.memory.as_u64()) + memory.as_u64() <= capacity;
            if !surge && !instead {
                old.stop();
                return Ok(Some(format!(
                    "{} pending: capacity: needs {memory}, {} of {} reserved by the instances staying",
                    old.name(),
                    ByteSize::bytes(staying.saturating_sub(old.memory.as_u64())),
                    self.limits.capacity
                )));
            }
            // The instances still draining hold their memory until they end.
            let draining = |state: &State| -> Vec<CancellationToken> {
                state
                    .slots
                    .iter()
                    .filter(|s| s.stopping())
                    .map(|s| s.ended.clone())
                    .collect()
            };
            if !surge {
                let mut after = draining(&state);
                after.push(old.ended.clone());
                let waiting = self.spawn_slot(&mut state, process, old.index, memory, after);
                old.stop();
                waiting
            } else if process.spec.singleton || old.version.spec.singleton {
                // The old one stops first; the new one waits for it (and any other instance
                // of the type still draining) to have ended, holding the index so that nothing
                // else starts one meanwhile.
                // Only `old` and instances already on their way out: a running one of a
                // type that stops being a singleton (its new count started more) never ends.
                let after: Vec<CancellationToken> = state
                    .slots
                    .iter()
                    .filter(|s| Arc::ptr_eq(s, old) || (s.process == old.process && s.stopping()))
                    .map(|s| s.ended.clone())
                    .collect();
                let waiting = self.spawn_slot(&mut state, process, old.index, memory, after);
                old.stop();
                waiting
            } else {
                let after = if reserved(&state) + memory.as_u64() <= capacity {
                    Vec::new()
                } else {
                    draining(&state)
                };
                self.spawn_slot(&mut state, process, old.index, memory, after)
            }
        };
        let name = new.name();
        match tokio::time::timeout(READY_WAIT, ready).await {
            Ok(Ok(Ok(()))) => {
                old.stop();
                Ok(None)
            }
            Ok(Ok(Err(e))) => {
                new.stop();
                Err(format!("{name} failed to start: {e}"))
            }
            Ok(Err(_)) => {
                new.stop();
                Err(format!("{name} could not be replaced: its task ended"))
            }
            Err(_) => {
                new.stop();
                Err(format!(
                    "{name} was not ready within {}",
                    humanize(READY_WAIT)
                ))
            }
        }
    }

    /// Deploys new versions of the app's types (all compiled and checked by the caller):
    /// types missing from `types` are stopped, new ones start (their manifest `count`, else
    /// 1), changed ones roll instance by instance — start the new one, wait until it is ready
    /// (health check included), then drain an old one. Unchanged types are left alone.
    ///
    /// On any failure (an instance that does not start or pass its check, a new instance that
    /// crashed during the roll-out) every type is rolled back to the version it had and the
    /// formation restored: the previous release keeps serving.
    pub async fn deploy(
        self: &Arc<Self>,
        types: Vec<NewVersion>,
        release: u32,
        what: &str,
    ) -> Result<Changes, ControlError> {
        let _op = self.ops.lock().await;
        let (old_types, old_desired) = {
            let state = self.lock();
            (state.types.clone(), state.desired.clone())
        };
        let mut changes = Changes::default();
        let mut next_types = BTreeMap::new();
        let mut next_desired = old_desired.clone();
        for NewVersion { spec, compiled } in types {
            let name = spec.name.clone();
            let memory = spec.memory.unwrap_or(self.default_memory);
            if memory > self.limits.max_memory {
                return Err(ControlError::Invalid(format!(
                    "{}: memory {memory} is above this host's maximum of {}: restart `wasmform up` with a larger `--max-memory`",
                    spec.origin_of("memory"),
                    self.limits.max_memory
                )));
            }
            let limit = |count: u32| if spec.singleton { count.min(1) } else { count };
            match old_types.get(&name) {
                Some(old) => {
                    let before = old_desired.get(&name).expect("current types are desired");
                    let mut scale = before;
                    // The manifest's count and memory apply when they changed between
                    // releases; otherwise the live formation (`scale`) stays.
                    if spec.count != old.spec.count {
                        scale.count = spec.count.unwrap_or(1);
                    }
                    if spec.memory != old.spec.memory {
                        scale.memory = memory;
                    }
                    scale.count = limit(scale.count);
                    next_desired.insert(name.clone(), scale);
                    // A new memory limit rolls the type as a new version does.
                    if !old.same_as(&spec, &compiled) || scale.memory != before.memory {
                        changes.changed.push(name.to_string());
                    } else if scale.count != before.count {
                        changes.scaled.push((name.to_string(), scale.count));
                    }
                    next_types.insert(name, self.version(spec, compiled, release));
                }
                None => {
                    changes.added.push(name.to_string());
                    let scale = Scale {
                        count: limit(spec.count.unwrap_or(1)),
                        memory,
                    };
                    next_desired.insert(name.clone(), scale);
                    next_types.insert(name, self.version(spec, compiled, release));
                }
            }
        }
        for name in old_types.keys() {
            if !next_types.contains_key(name) {
                changes.removed.push(name.to_string());
                next_desired.remove(name);
            }
        }
        let summary = describe_changes(&changes);
        self.logs
            .event(API, format!("{what}: v{release} rolling out, {summary}"));
        let started = {
            let mut state = self.lock();
            // Removed types keep serving until the rest of the release is live: a release that
            // fails and is rolled back must not have stopped them.
            let mut types = next_types.clone();
            let mut desired = next_desired.clone();
            for (name, process) in old_types
                .iter()
                .filter(|(n, _)| !next_types.contains_key(*n))
            {
                types.insert(name.clone(), process.clone());
                if let Some(scale) = old_desired.get(name) {
                    desired.insert(name.clone(), scale);
                }
            }
            state.types = types;
            state.desired = desired;
            let mut started = self.reconcile(&mut state);
            // Added types that do not fit beside the removed ones (capacity, instance
            // limit): the removed ones make room now instead, so the release is checked
            // with every instance it adds.
            let short = changes.added.iter().any(|name| {
                let wanted = next_desired
                    .iter()
                    .find(|(n, _)| n.as_str() == name)
                    .map_or(0, |(_, s)| s.count);
                let have = state
                    .slots
                    .iter()
                    .filter(|s| s.process.as_str() == name && !s.stopping())
                    .count();
                u32::try_from(have).unwrap_or(u32::MAX) < wanted
            });
            if short && !changes.removed.is_empty() {
                state.types = next_types.clone();
                state.desired = next_desired.clone();
                started.extend(self.reconcile(&mut state));
            }
            started
        };
        let mut failure = self.await_started(started).await.into_iter().next();
        // Roll the slots still running an older version of a changed type.
        if failure.is_none() {
            for name in &changes.changed {
                let process = next_types[name.as_str()].clone();
                let stale = self.active_slots(|s| {
                    s.process == process.spec.name && !Arc::ptr_eq(&s.version, &process)
                });
                for slot in stale {
                    let memory = next_desired
                        .get(&slot.process)
                        .map_or(slot.memory, |s| s.memory);
                    match self.replace(&slot, &process, memory).await {
                        Ok(None) => {}
                        Ok(Some(note)) => self.logs.host(note),
                        Err(e) => {
                            failure = Some(e);
                            break;
                        }
                    }
                    failure = self.crashed_during(release);
                    if failure.is_some() {
                        break;
                    }
                }
                if failure.is_some() {
                    break;
                }
            }
        }
        // A new instance that crashed while the rest rolled out fails the deploy too. Web
        // instances proved themselves by starting (and passing their check); background
        // processes and consumers report ready once instantiated, so give them a moment.
        if failure.is_none() {
            let settle = changes
                .changed
                .iter()
                .chain(&changes.added)
                .any(|name| !next_types[name.as_str()].compiled.is_http());
            if settle {
                tokio::time::sleep(SETTLE).await;
            }
            failure = self.crashed_during(release);
        }
        if let Some(failure) = failure {
            self.roll_back(old_types, old_desired).await;
            return Err(ControlError::Failed(format!(
                "release v{release} failed and was rolled back: {failure}"
            )));
        }
        if !changes.removed.is_empty() {
            // Now the removed types drain and stop.
            let mut state = self.lock();
            state.types = next_types;
            state.desired = next_desired.clone();
            let started = self.reconcile(&mut state);
            debug_assert!(started.is_empty(), "only removals are left");
        }
        if let Some(store) = &self.store
            && let Err(e) = store.store_formation(&next_desired)
        {
            tracing::warn!("failed to store the formation: {e:#}");
        }
        Ok(changes)
    }

    /// Why an instance of `release` ended since it started, if one did.
    fn crashed_during(&self, release: u32) -> Option<String> {
        self.active_slots(|s| s.version.release == release)
            .iter()
            .find(|s| s.failures.load(Ordering::Relaxed) > 0)
            .map(|s| {
                let reason = s
                    .last_failure
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                format!(
                    "{} failed during the roll-out: {}",
                    s.name(),
                    reason.unwrap_or_default()
                )
            })
    }

    /// Puts `types` and `desired` back after a failed deploy: slots of types that were added
    /// stop, removed types start again, and slots running a new version are replaced by the
    /// old one (known to work).
    async fn roll_back(
        self: &Arc<Self>,
        types: BTreeMap<ProcessName, Arc<ProcessType>>,
        desired: Formation,
    ) {
        let started = {
            let mut state = self.lock();
            state.types = types.clone();
            state.desired = desired.clone();
            self.reconcile(&mut state)
        };
        for note in self.await_started(started).await {
            self.logs.host(format!("rollback: {note}"));
        }
        for (name, process) in &types {
            let stale =
                self.active_slots(|s| s.process == *name && !Arc::ptr_eq(&s.version, process));
            for slot in stale {
                let memory = desired.get(name).map_or(slot.memory, |s| s.memory);
                match self.replace(&slot, process, memory).await {
                    Ok(None) => {}
                    Ok(Some(note)) | Err(note) => self.logs.host(format!("rollback: {note}")),
                }
            }
        }
    }

    /// The current version of each type, for releases and deploys.
    pub fn versions(&self) -> Vec<(ProcessSpec, Arc<Compiled>)> {
        self.lock()
            .types
            .values()
            .map(|t| (t.spec.clone(), t.compiled.clone()))
            .collect()
    }

    /// Refuses a formation that runs a singleton more than once.
    fn check_singletons(&self, next: &Formation) -> Result<(), ControlError> {
        let state = self.lock();
        for (name, scale) in next.iter() {
            if scale.count > 1
                && let Some(process) = state.types.get(name).filter(|p| p.spec.singleton)
            {
                return Err(ControlError::Invalid(format!(
                    "`{name}` is a singleton ({}): it runs at most 1 instance, so its scheduled work is never done twice; scale it to 0 or 1",
                    process.spec.origin
                )));
            }
        }
        Ok(())
    }

    /// Waits (bounded) for freshly started slots; returns notes for those that failed.
    async fn await_started(&self, started: Vec<(String, Ready)>) -> Vec<String> {
        let mut notes = Vec::new();
        for (name, ready) in started {
            match tokio::time::timeout(READY_WAIT, ready).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => notes.push(format!("{name} failed to start: {e}")),
                Ok(Err(_)) => notes.push(format!("{name} stopped before it was ready")),
                Err(_) => notes.push(format!(
                    "{name} was not ready within {}",
                    humanize(READY_WAIT)
                )),
            }
        }
        notes
    }

    /// Instantiates `process` once with `memory` and drops it: does the limit suffice?
    async fn probe(&self, process: &ProcessName, memory: ByteSize) -> Result<(), String> {
        let process = self.lock().types.get(process).cloned().expect("known type");
        let name = format!("{}.probe", process.spec.name);
        let sink = self.logs.sink(&name, process.colour);
        let setup = InstanceSetup {
            instance: &name,
            process: process.spec.name.as_str(),
            program: &process.compiled.program,
            args: &process.spec.args,
            port: self.port,
            memory,
            memory_used: Arc::default(),
            stdout: sink.clone(),
            stderr: sink,
            env: &process.spec.env,
            allowed_outbound_hosts: &process.spec.allowed_outbound_hosts,
            shared: &process.shared,
        };
        instance::probe(&self.runtime, &process.compiled, setup).await
    }

    /// Depth of every queue a current type consumes.
    /// The shared store's state for `ps` and metrics: `None` without a store; else its
    /// backend and, when it cannot be reached, since when and why.
    pub async fn store_status(&self) -> Option<StoreStatus> {
        let store = self.shared.as_ref()?;
        let down = store.unreachable().await;
        Some(StoreStatus {
            backend: store.describe(),
            reachable: down.is_none(),
            since: down.as_ref().map(|(t, _)| {
                t.duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64())
            }),
            error: down.map(|(_, e)| e),
        })
    }

    pub async fn queue_stats(&self) -> Vec<crate::shared::QueueStats> {
        let consumers: Vec<(Store, String)> = self
            .lock()
            .types
            .values()
            .filter_map(|t| Some((t.shared.store.clone()?, t.spec.consume.clone()?)))
            .collect();
        let mut stats = Vec::new();
        for (store, queue) in consumers {
            if stats
                .iter()
                .any(|s: &crate::shared::QueueStats| s.queue == queue)
            {
                continue;
            }
            match store.stats(&queue).await {
                Ok(s) => stats.push(s),
                Err(e) => tracing::warn!("queue `{queue}`: {e}"),
            }
        }
        stats
    }

    /// Requests waiting for an instance, per HTTP type.
    pub fn queues(&self) -> Vec<(String, usize)> {
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        registry
            .pools
            .iter()
            .map(|(name, pool)| (name.to_string(), pool.waiting()))
            .collect()
    }

    /// `ps`.
    pub fn ps(&self) -> PsReport {
        let state = self.lock();
        let mut instances: Vec<InstanceReport> = state
            .slots
            .iter()
            .map(|slot| {
                let (status, since) = slot
                    .status
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                let (state, reason, restart_in_ms) = match status {
                    SlotState::Starting => ("starting", None, None),
                    SlotState::Up => ("up", None, None),
                    SlotState::Draining => ("draining", None, None),
                    SlotState::Exited { reason } => ("exited", Some(reason), None),
                    SlotState::Waiting => (
                        "pending",
                        Some("waiting for the instance it replaces to stop (singleton)".into()),
                        None,
                    ),
                    SlotState::Crashed { reason, restart_at } => (
                        "crashed",
                        Some(reason),
                        Some(
                            restart_at
                                .saturating_duration_since(Instant::now())
                                .as_millis() as u64,
                        ),
                    ),
                };
                InstanceReport {
                    id: slot.name(),
                    process: slot.process.to_string(),
                    state,
                    since: since
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .ok()
                        .map(|d| d.as_secs_f64()),
                    reason,
                    restart_in_ms,
                    memory_used: slot.memory_used.load(Ordering::Relaxed),
                    memory_limit: slot.memory.as_u64(),
                    requests: slot.requests.load(Ordering::Relaxed),
                    restarts: slot.restarts.load(Ordering::Relaxed),
                    health: slot
                        .health
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clone(),
                    release: slot.version.release,
                }
            })
            .collect();
        for (id, reason) in self.pending(&state) {
            let process = id
                .rsplit_once('.')
                .map(|(p, _)| p.to_string())
                .unwrap_or_default();
            let release = state.types.get(process.as_str()).map_or(0, |t| t.release);
            let memory = state
                .desired
                .iter()
                .find(|(n, _)| n.as_str() == process)
                .map(|(_, s)| s.memory.as_u64())
                .unwrap_or(0);
            instances.push(InstanceReport {
                id,
                process,
                state: "pending",
                since: None,
                reason: Some(reason),
                restart_in_ms: None,
                memory_used: 0,
                memory_limit: memory,
                requests: 0,
                restarts: 0,
                health: None,
                release,
            });
        }
        instances.sort_by_key(|i| {
            let (process, index) = i.id.rsplit_once('.').unwrap_or((&i.id, "0"));
            (
                process.to_string(),
                index.parse::<u32>().unwrap_or(0),
                i.state == "draining",
            )
        });
        PsReport {
            types: self.type_reports(&state),
            instances,
            capacity: self.limits.capacity.as_u64(),
            reserved: reserved(&state),
        }
    }

    fn type_reports(&self, state: &State) -> Vec<TypeReport> {
        state
            .desired
            .iter()
            .map(|(name, scale)| {
                let process = &state.types[name];
                let running = state
                    .slots
                    .iter()
                    .filter(|s| s.process == *name && !s.stopping())
                    .filter(|s| {
                        matches!(
                            s.status.lock().unwrap_or_else(|e| e.into_inner()).0,
                            SlotState::Up
                        )
                    })
                    .map(|s| s.index)
                    .collect::<BTreeSet<u32>>()
                    .len() as u32;
                TypeReport {
                    name: name.to_string(),
                    kind: process.compiled.kind_name(),
                    desired: scale.count,
                    running,
                    memory: scale.memory.as_u64(),
                    component: process.spec.component.display().to_string(),
                    digest: process.compiled.digest.clone(),
                    singleton: process.spec.singleton,
                    release: process.release,
                }
            })
            .collect()
    }
}

/// Indices in `1..=count` that no running (not stopping) slot of `name` holds.
fn missing(state: &State, name: &ProcessName, count: u32) -> Vec<u32> {
    let active: BTreeSet<u32> = state
        .slots
        .iter()
        .filter(|s| s.process == *name && !s.stopping())
        .map(|s| s.index)
        .collect();
    (1..=count).filter(|i| !active.contains(i)).collect()
}

/// Σ memory limits of existing slots (draining ones still hold theirs).
fn reserved(state: &State) -> u64 {
    state.slots.iter().map(|s| s.memory.as_u64()).sum()
}

/// `web (changed), admin (added)`, or `no changes`.
pub fn describe_changes(changes: &Changes) -> String {
    let mut parts = Vec::new();
    for (names, what) in [
        (&changes.changed, "changed"),
        (&changes.added, "added"),
        (&changes.removed, "removed"),
    ] {
        if !names.is_empty() {
            parts.push(format!("{} {what}", names.join(", ")));
        }
    }
    for (name, count) in &changes.scaled {
        parts.push(format!("{name} scaled to {count}"));
    }
    if parts.is_empty() {
        "no process type changed".to_string()
    } else {
        parts.join("; ")
    }
}

/// How an incarnation ended, which decides the restart delay.
enum Ended {
    /// A web instance failed while handling a request: replaced at once.
    Request(String),
    /// A web instance failed its liveness check `threshold` times: restarted with the crash
    /// backoff.
    Unhealthy(String),
    /// A web instance was used up (`Some`: its `max_requests`, logged; `None`: a single-use
    /// instance): replaced at once, not a crash.
    Recycled(Option<String>),
    /// A web instance was dropped mid-call because its client went away: replaced at once,
    /// not counted as a failure of the instance.
    Cancelled(String),
    /// A worker's `run` ended: restarted with backoff (if its policy restarts it).
    Process { reason: String, success: bool },
    /// The slot was stopped.
    Stopped,
}

/// The next liveness tick, or never without a health check.
async fn tick(ticks: &mut Option<tokio::time::Interval>) {
    match ticks {
        Some(ticks) => {
            ticks.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Checks a new instance until it passes, every `interval` up to `grace`; `Err` if it never
/// did (the instance counts as failed to start).
async fn ready_check(
    mut instance: WebInstance,
    check: &HealthCheck,
    slot: &Slot,
) -> Result<WebInstance, String> {
    let deadline = tokio::time::Instant::now() + check.grace;
    // Probe quickly at first: a healthy instance is ready in microseconds.
    let mut pause = Duration::from_millis(50);
    loop {
        let (back, verdict) = instance.check(&check.path, check.timeout).await;
        let Some(back) = back else {
            return Err(verdict
                .err()
                .unwrap_or_else(|| "crashed during its health check".into()));
        };
        instance = back;
        match verdict {
            Ok(()) => {
                slot.set_health("passing".into());
                return Ok(instance);
            }
            Err(why) if tokio::time::Instant::now() + pause >= deadline => {
                slot.set_health("failing".into());
                return Err(format!(
                    "did not pass its health check within {} (grace): {why}",
                    humanize(check.grace)
                ));
            }
            Err(_) => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(check.interval);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_immediate_then_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::new(RestartPolicy {
            base: Duration::from_secs(1),
            max: Duration::from_secs(5),
            reset_after: Duration::from_secs(60),
        });
        let quick = Duration::from_millis(10);
        let delays: Vec<u64> = (0..6).map(|_| b.next(quick).as_secs()).collect();
        assert_eq!(delays, [0, 1, 2, 4, 5, 5]);
        assert_eq!(
            b.next(Duration::from_secs(61)),
            Duration::ZERO,
            "healthy run resets"
        );
        assert_eq!(b.next(quick), Duration::from_secs(1));
    }
}
