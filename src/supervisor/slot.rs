//! One slot: an instance position (`web.1`) and the task that keeps an instance in it.
//!
//! The task starts an instance, waits for it to end, logs why, and asks the
//! [restart policy](super::restart) whether and when the next one starts. Web instances live
//! in [`web`](super::web), consumers in [`consume`](super::consume); a worker's `run` is
//! awaited here. A slot's end removes it from the state and reconciles, so pending instances
//! that now fit start.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::restart::{Backoff, End, Next};
use super::{Ready, State, Supervisor};
use crate::app::{ByteSize, ProcessName, ProcessSpec, RestartMode};
use crate::events::{Events, Fields};
use crate::instance::{self, Reuse, WebInstance};
use crate::router::Pool;
use crate::runtime::shared::SharedCtx;
use crate::runtime::{Compiled, InstanceSetup, Kind};
use crate::tcp::Backends;
use crate::units::humanize;

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
    /// A TCP process (a command that listens on `$PORT`): where its instances take
    /// connections. Shared by every version of the type, as `pool` is.
    pub backends: Option<Arc<Backends>>,
}

impl ProcessType {
    /// Whether `spec` and `compiled` would run exactly like this version.
    pub(super) fn same_as(&self, spec: &ProcessSpec, compiled: &Compiled) -> bool {
        self.compiled.digest == compiled.digest
            && self.compiled.is_http() == compiled.is_http()
            && self.spec.same_settings(spec)
    }

    /// `http`, `tcp`, `background` or `consumer`, for `ps`.
    pub(super) fn kind_name(&self) -> &'static str {
        if self.backends.is_some() {
            "tcp"
        } else {
            self.compiled.kind_name()
        }
    }
}

/// What a slot is doing, for `ps`.
#[derive(Clone, Debug)]
pub(super) enum SlotState {
    Starting,
    Up,
    Crashed {
        reason: String,
        restart_at: Instant,
        /// Its restart delay is the policy's longest: it crash-loops.
        capped: bool,
    },
    Draining,
    /// Ended and not restarted (its `restart` policy); a restart, scale or deploy starts it.
    Exited {
        reason: String,
        /// Its exit status, if it exited with one (not for a trap).
        code: Option<i32>,
    },
    /// A singleton's replacement, waiting for the instance it replaces to end (`ps`: pending).
    Waiting,
}

/// One instance position and its task.
pub struct Slot {
    pub(super) process: ProcessName,
    /// The version of the type this slot runs; a deploy replaces the slot.
    pub(super) version: Arc<ProcessType>,
    /// Cancelled once the slot's task has ended and it left the state (singletons wait for
    /// it before their replacement starts).
    pub(super) ended: CancellationToken,
    /// Health check state for `ps`: `None` without a check.
    pub(super) health: Mutex<Option<String>>,
    pub(super) index: u32,
    /// This slot's memory limit; a memory change replaces the slot.
    pub(super) memory: ByteSize,
    /// Cancelled to stop the slot (drain, then end). A child of the host's shutdown token.
    pub(super) cancel: CancellationToken,
    /// Set when the slot stops: its web instance must not go back to the pool.
    pub(super) retired: Arc<AtomicBool>,
    pub(super) status: Mutex<(SlotState, SystemTime)>,
    /// Linear memory in use by the current instance, kept by its limiter.
    pub(super) memory_used: Arc<AtomicU64>,
    /// Requests served over all incarnations (a TCP process: connections handed to it).
    pub(super) requests: Arc<AtomicU64>,
    /// A TCP process's connections open now.
    pub(super) connections: Arc<AtomicU32>,
    /// Times the instance was replaced after ending.
    pub(super) restarts: AtomicU32,
    /// Incarnations that ended in failure (crash, failed start, failing health, a worker's
    /// error exit), exited ones included; not recycling or a client going away. A deploy
    /// fails if one of its new instances has any.
    pub(super) failures: AtomicU32,
    /// The last failure, for the deploy's message.
    pub(super) last_failure: Mutex<Option<String>>,
    /// Where its state changes are told.
    pub(super) events: Events,
}

impl Slot {
    pub(super) fn name(&self) -> String {
        format!("{}.{}", self.process, self.index)
    }

    /// Sets the state shown in `ps` and tells the event stream.
    pub(super) fn set(&self, state: SlotState) {
        let fields = self.fields();
        let (event, fields) = match &state {
            SlotState::Starting => ("instance.starting", fields),
            SlotState::Up => ("instance.up", fields),
            SlotState::Draining => ("instance.draining", fields),
            SlotState::Waiting => (
                "instance.pending",
                fields.because("waiting for the instance it replaces to end"),
            ),
            SlotState::Crashed {
                reason, restart_at, ..
            } => (
                "instance.crashed",
                Fields {
                    restart_in_ms: Some(
                        restart_at
                            .saturating_duration_since(Instant::now())
                            .as_millis() as u64,
                    ),
                    ..fields.because(reason)
                },
            ),
            SlotState::Exited { reason, code } => (
                "instance.exited",
                Fields {
                    exit_code: *code,
                    ..fields.because(reason)
                },
            ),
        };
        // The state first: a client that reads the event then finds it in `ps`.
        self.set_quietly(state);
        self.events.emit(event, fields);
    }

    /// Sets the state without an event: a single-use instance's replacement after each request
    /// is not news.
    pub(super) fn set_quietly(&self, state: SlotState) {
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = (state, SystemTime::now());
    }

    /// The fields of this slot's events.
    pub(super) fn fields(&self) -> Fields {
        Fields::instance(&self.name(), self.process.as_str(), self.version.release)
    }

    /// Stops the slot: it leaves the pool, finishes what it is doing, and ends.
    pub(super) fn stop(&self) {
        if !self.cancel.is_cancelled() {
            self.retired.store(true, Ordering::Release);
            self.set(SlotState::Draining);
            self.cancel.cancel();
        }
    }

    pub(super) fn stopping(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Ended and left so by its restart policy.
    pub(super) fn exited(&self) -> bool {
        matches!(
            self.status.lock().unwrap_or_else(|e| e.into_inner()).0,
            SlotState::Exited { .. }
        )
    }

    /// Counts a failed incarnation and keeps its reason, for a deploy's verdict.
    fn record_failure(&self, reason: &str) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.to_string());
    }

    /// Sets the health shown in `ps` (`passing`, `failing (1/3)`, `checking`); a change between
    /// passing and failing is an event.
    pub(super) fn set_health(&self, health: String) {
        let verdict = |h: &str| {
            if h.starts_with("passing") {
                Some("health.passing")
            } else if h.starts_with("failing") {
                Some("health.failing")
            } else {
                None
            }
        };
        let event = {
            let mut current = self.health.lock().unwrap_or_else(|e| e.into_inner());
            let before = current.as_deref().and_then(verdict);
            let after = verdict(&health);
            let changed = after
                .filter(|a| before != Some(*a))
                .map(|a| (a, health.clone()));
            *current = Some(health);
            changed
        };
        if let Some((event, health)) = event {
            self.events.emit(event, self.fields().because(&health));
        }
    }
}

impl Supervisor {
    pub(super) fn spawn_slot(
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
            connections: Arc::default(),
            restarts: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            last_failure: Mutex::new(None),
            events: self.events.clone(),
        });
        if waiting {
            slot.events.emit(
                "instance.pending",
                slot.fields()
                    .because("waiting for the instance it replaces to end"),
            );
        }
        state.slots.push(slot.clone());
        let slot_for_caller = slot.clone();
        let (tx, rx) = oneshot::channel();
        let this = self.clone();
        // TCP processes serve clients: never on the idle-priority runtime.
        let foreground =
            !matches!(process.compiled.kind, Kind::Command(_)) || process.backends.is_some();
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
        self.events.emit("instance.stopped", slot.fields());
        if !self.cancel.is_cancelled() {
            drop(self.reconcile(&mut state));
        }
    }

    /// The slot's task: one incarnation after the other until the slot stops or its restart
    /// policy leaves it exited. `ready` is told how the first start went. One loop, since its
    /// state (`reserved`, `recycled`, `awaited`, the backoff) lives across incarnations; what
    /// each end means is decided by [`Backoff::decide`].
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
        // The last incarnation's exit status, for an exited slot's `ps` and event.
        let mut code = None;
        loop {
            if slot.stopping() {
                break;
            }
            if recycled {
                slot.set_quietly(SlotState::Starting);
            } else {
                slot.set(SlotState::Starting);
            }
            let started = Instant::now();
            if let Some(pool) = process.pool.as_ref().filter(|_| !reserved) {
                pool.reserve();
                reserved = true;
            }
            let (reason, end) = match self
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
                Ok(ended) => {
                    code = match &ended {
                        Ended::Process { code, .. } => *code,
                        _ => None,
                    };
                    ended.classify()
                }
                Err(boot) => {
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(Err(boot.clone()));
                        awaited = true;
                    }
                    let end = End {
                        failed: true,
                        backs_off: true,
                    };
                    (format!("failed to start: {boot}"), end)
                }
            };
            recycled = false;
            if slot.stopping() {
                break;
            }
            if end.failed {
                slot.record_failure(&reason);
            }
            let awaited = std::mem::take(&mut awaited);
            let mode = process.spec.restart;
            let Next::Restart { delay } = backoff.decide(mode, end, started.elapsed(), awaited)
            else {
                if let Some(pool) = process.pool.as_ref().filter(|_| reserved) {
                    pool.gone();
                }
                self.exit(slot, &name, mode, reason, code).await;
                return;
            };
            slot.restarts.fetch_add(1, Ordering::Relaxed);
            if let Some(pool) = process
                .pool
                .as_ref()
                .filter(|_| reserved && !delay.is_zero())
            {
                pool.gone();
                reserved = false;
            }
            // The state first: whoever reads the log line then finds it in `ps`.
            slot.set(SlotState::Crashed {
                reason: reason.clone(),
                restart_at: Instant::now() + delay,
                capped: delay >= self.restart.max,
            });
            self.log_restart(process, &name, &reason, delay, awaited);
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

    /// Logs an ended incarnation that restarts after `delay`, and counts the restart. A
    /// command awaiting this start (`awaited`) was told it failed and decides first: the
    /// restart is logged when it happens.
    fn log_restart(
        &self,
        process: &ProcessType,
        name: &str,
        reason: &str,
        delay: Duration,
        awaited: bool,
    ) {
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
        self.metrics.restart(process.spec.name.as_str(), reason);
    }

    /// Leaves the slot exited, as its restart policy says: it keeps its place (so the formation
    /// does not start another) until a restart, scale or deploy stops it.
    async fn exit(
        &self,
        slot: &Slot,
        name: &str,
        mode: RestartMode,
        reason: String,
        code: Option<i32>,
    ) {
        let line = format!(
            "{name} {reason}; not restarted (restart = \"{}\")",
            match mode {
                RestartMode::OnFailure => "on-failure",
                _ => "never",
            }
        );
        // The state first: whoever reads the log line then finds it in `ps`.
        slot.set(SlotState::Exited { reason, code });
        self.logs.host(line);
        slot.cancel.cancelled().await;
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
        let fence = self.fence(&slot.process, slot.index);
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
            listen: None,
            stdio: None,
            cluster: self.node().zip(fence),
        };
        let sinks = (setup.stdout.clone(), setup.stderr.clone());
        let up = Up {
            slot,
            name,
            since: Instant::now(),
            recycled,
        };
        let ended = match &process.compiled.kind {
            Kind::Http(_) => self.run_web(process, setup, up, ready).await?,
            Kind::Consumer(pre) => {
                let start = instance::Consumer::start(&self.runtime, pre, setup);
                let mut consumer = tokio::select! {
                    consumer = start => consumer.map_err(|e| format!("{e:#}"))?,
                    () = slot.cancel.cancelled() => return Ok(Ended::Stopped),
                };
                self.mark_up(&up, ready);
                self.consume(process, slot, name, &mut consumer).await
            }
            Kind::Command(_) if process.backends.is_some() => {
                self.run_listener(process, setup, up, ready).await?
            }
            Kind::Command(pre) => {
                let run =
                    instance::run_command(&self.runtime, pre, setup, || self.mark_up(&up, ready));
                tokio::select! {
                    end = run => match end {
                        instance::RunEnd::FailedToStart(why) => return Err(why),
                        end => Ended::Process { reason: end.reason(), code: end.exit_code() },
                    },
                    () = slot.cancel.cancelled() => Ended::Stopped,
                }
            }
        };
        sinks.0.flush();
        sinks.1.flush();
        Ok(ended)
    }

    /// An incarnation is up: counted, shown in `ps`, and told to the command awaiting it (or
    /// logged, unless it replaces a used-up instance quietly).
    pub(super) fn mark_up(
        &self,
        up: &Up<'_>,
        ready: &mut Option<oneshot::Sender<Result<(), String>>>,
    ) {
        self.metrics.instantiated(up.since.elapsed().as_secs_f64());
        if up.recycled {
            up.slot.set_quietly(SlotState::Up);
        } else {
            up.slot.set(SlotState::Up);
        }
        match ready.take() {
            Some(ready) => {
                let _ = ready.send(Ok(()));
            }
            None if up.recycled => {}
            None => self.logs.host(format!("{} up", up.name)),
        }
    }
}

/// An incarnation starting: what [`Supervisor::mark_up`] needs once it is up.
pub(super) struct Up<'a> {
    pub slot: &'a Slot,
    pub name: &'a str,
    /// When its instantiation began.
    pub since: Instant,
    /// It replaces a used-up instance: no log line.
    pub recycled: bool,
}

/// How an incarnation ended, which decides the restart delay.
pub(super) enum Ended {
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
    /// A worker's `run` ended (with its exit status, if it exited with one): restarted with
    /// backoff (if its policy restarts it).
    Process { reason: String, code: Option<i32> },
    /// The slot was stopped.
    Stopped,
}

impl Ended {
    /// The log's reason and what the restart policy sees, for the ends that are not a stop
    /// or a recycle.
    fn classify(self) -> (String, End) {
        let end = |failed, backs_off| End { failed, backs_off };
        match self {
            Ended::Request(reason) => (reason, end(true, false)),
            // As a crash loop would: a sick instance must not restart in a hot loop.
            Ended::Unhealthy(reason) => (reason, end(true, true)),
            // Not the instance's fault: replaced at once, not a failure.
            Ended::Cancelled(reason) => (reason, end(false, false)),
            Ended::Process { reason, code } => (reason, end(code != Some(0), true)),
            Ended::Recycled(_) | Ended::Stopped => unreachable!("handled by the slot's loop"),
        }
    }
}
