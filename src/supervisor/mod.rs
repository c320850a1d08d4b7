//! Keeps the formation running and changes it live.
//!
//! The supervisor holds the *desired* formation and the *slots* that run it. A slot is one
//! instance position (`web.1`, `worker.2`) with its own task: it starts the instance, waits for
//! it to end, logs why, and starts a replacement. Web instances are handed to their type's
//! [`Pool`]; workers run inside the slot task.
//!
//! One place decides what starts and stops: `Supervisor::reconcile`, under the state lock,
//! applies the pure [`plan`](plan::plan) of desired against actual. Surplus slots are stopped
//! — a web slot drains: it leaves the rotation, finishes its request in flight, then ends —,
//! missing ones are started as far as the memory budget (`capacity`) and the instance pool
//! allow; the rest stay *pending* and start by themselves when a slot ends and frees room.
//! Formation changes (scale, restart, deploy) are serialized by one async lock, so concurrent
//! commands apply in order; they change the desired state and the type versions, and call
//! `reconcile`, or replace one slot at a time as [`plan::replacement`] decides.
//!
//! | file | what it holds |
//! |---|---|
//! | `plan.rs` | pure decisions: what starts, stops, waits; how one instance replaces another |
//! | `restart.rs` | the restart policy and its backoff (pure) |
//! | `slot.rs` | one slot's task: start, wait for the end, restart or exit |
//! | `web.rs` | one web instance's life: readiness, traffic, liveness, drain |
//! | `listen.rs` | one TCP process instance's life: its port, readiness, connections, drain |
//! | `health.rs` | health checks of a web instance |
//! | `consume.rs` | a queue consumer's loop |
//! | `scale.rs` | scale, rolling restart, the replacement of one slot, memory probes |
//! | `rollout.rs` | deploys and their roll-back |
//! | `cluster.rs` | a node of a cluster: the slots it holds, the cluster's formation changes |
//! | `oneoff.rs` | one-off processes (`wasmform run`): `run.N` beside the formation |
//! | `report.rs` | `ps`, command outcomes, the shared store's status |

mod cluster;
mod consume;
mod health;
mod listen;
mod oneoff;
mod plan;
mod report;
mod restart;
mod rollout;
mod scale;
mod slot;
mod web;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::{ByteSize, ProcessName, ProcessSpec, TcpSettings};
use crate::events::{Events, Fields};
use crate::formation::Formation;
use crate::instance::{Reuse, WebInstance};
use crate::logs::Logs;
use crate::router::Pool;
use crate::runtime::shared::{Denied, SharedCtx};
use crate::runtime::{Compiled, Kind, Runtime};
use crate::shared::Store;
use crate::state::StateDir;
use crate::tcp::Backends;
use crate::units::humanize;

pub use cluster::ClusterLink;
pub use oneoff::{OneOff, Prepared, RunOutcome, is_file};
pub use report::Outcome;
pub use restart::RestartPolicy;
pub use rollout::{Changes, NewVersion, describe_changes};
use slot::{ProcessType, Slot};

/// Desired formation and live slots.
struct State {
    desired: Formation,
    slots: Vec<Arc<Slot>>,
    /// The current version of each type; new slots start with it.
    types: BTreeMap<ProcessName, Arc<ProcessType>>,
    /// Instances the last plan left pending, so each is told once as an event.
    pending: BTreeSet<(ProcessName, u32)>,
    /// In a cluster: the slots this node holds claims for, per type, with each claim's
    /// fencing token; the plan starts only these. `None`: a single host runs every slot.
    here: Option<BTreeMap<ProcessName, BTreeMap<u32, i64>>>,
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
    /// What happens is told here (`wasmform events`).
    events: Events,
    /// One-off processes started so far (`run.N`).
    runs: std::sync::atomic::AtomicU32,
    /// The types that listen on `$PORT` (TCP services' types, a socket-based `web`), with
    /// their services' settings; those that are commands run as TCP processes.
    listening: BTreeMap<ProcessName, TcpSettings>,
    /// In a cluster: where formation changes go (all nodes apply them), and this node's name.
    cluster: std::sync::OnceLock<(Arc<dyn ClusterLink>, String)>,
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
    /// The event stream.
    pub events: Events,
    /// The types that listen on `$PORT`, with their services' settings.
    pub listening: BTreeMap<ProcessName, TcpSettings>,
}

type Ready = oneshot::Receiver<Result<(), String>>;

/// Longest wait for a new instance to be ready (instantiated and, with a health check,
/// passing it) in a scale, restart or deploy.
const READY_WAIT: Duration = Duration::from_secs(300);

/// Per type name: what outlives a version of the type.
#[derive(Default)]
struct Registry {
    pools: BTreeMap<ProcessName, Arc<Pool<WebInstance>>>,
    backends: BTreeMap<ProcessName, Arc<Backends>>,
    colours: BTreeMap<ProcessName, usize>,
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
                pending: BTreeSet::new(),
                here: None,
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
            events: config.events,
            runs: Default::default(),
            listening: config.listening,
            cluster: std::sync::OnceLock::new(),
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
        let backends = matches!(compiled.kind, Kind::Command(_))
            .then(|| self.backends(&spec.name))
            .flatten();
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
            backends,
        })
    }

    /// Where the instances of TCP process `name` take connections; `None` if no service
    /// routes to it.
    pub fn backends(&self, name: &ProcessName) -> Option<Arc<Backends>> {
        let settings = *self.listening.get(name)?;
        let mut registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        Some(
            registry
                .backends
                .entry(name.clone())
                .or_insert_with(|| Backends::new(settings))
                .clone(),
        )
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

    /// Brings slots in line with the desired formation, as [`plan::plan`] decides; returns
    /// the started slots' readiness. The only caller that starts or stops slots for the
    /// formation (replacements start their own, one by one).
    fn reconcile(self: &Arc<Self>, state: &mut State) -> Vec<(String, Ready)> {
        let plan = self.plan(state);
        for &i in &plan.stop {
            state.slots[i].stop();
        }
        let mut started = Vec::new();
        for (name, index) in plan.start {
            let process = state.types[&name].clone();
            let memory = state
                .desired
                .get(&name)
                .expect("planned from desired")
                .memory;
            let (slot, ready) = self.spawn_slot(state, &process, index, memory, Vec::new());
            started.push((slot.name(), ready));
        }
        let pending: BTreeSet<(ProcessName, u32)> = plan
            .pending
            .iter()
            .map(|(name, index, why)| {
                let id = (name.clone(), *index);
                if !state.pending.contains(&id) {
                    let release = state.types.get(name).map_or(0, |t| t.release);
                    let fields =
                        Fields::instance(&format!("{name}.{index}"), name.as_str(), release);
                    self.events
                        .emit("instance.pending", fields.because(&why.to_string()));
                }
                id
            })
            .collect();
        state.pending = pending;
        started
    }

    /// What [`reconcile`](Self::reconcile) would do now; its `pending` is what waits.
    fn plan(&self, state: &State) -> plan::Plan {
        let here: BTreeMap<&ProcessName, BTreeSet<u32>> = state
            .here
            .iter()
            .flatten()
            .map(|(name, claims)| (name, claims.keys().copied().collect()))
            .collect();
        let nothing = BTreeSet::new();
        let wanted: Vec<plan::Wanted<'_>> = state
            .desired
            .iter()
            .map(|(name, scale)| {
                let process = state.types.get(name);
                plan::Wanted {
                    process: name,
                    scale,
                    singleton: process.is_some_and(|p| p.spec.singleton),
                    startable: process.is_some(),
                    here: state
                        .here
                        .as_ref()
                        .map(|_| here.get(name).unwrap_or(&nothing)),
                }
            })
            .collect();
        let held: Vec<plan::Held<'_>> = state
            .slots
            .iter()
            .map(|s| plan::Held {
                process: &s.process,
                index: s.index,
                memory: s.memory,
                stopping: s.stopping(),
            })
            .collect();
        let room = plan::Room {
            capacity: self.limits.capacity,
            max_instances: self.limits.max_instances,
        };
        plan::plan(&wanted, &held, room)
    }

    fn pending_notes(&self, state: &State) -> Vec<String> {
        self.plan(state)
            .pending
            .into_iter()
            .map(|(name, index, why)| format!("{name}.{index} pending: {why}"))
            .collect()
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
}

/// Σ memory limits of existing slots (draining ones still hold theirs).
fn reserved(state: &State) -> u64 {
    state.slots.iter().map(|s| s.memory.as_u64()).sum()
}
