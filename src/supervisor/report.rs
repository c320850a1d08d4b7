//! What the supervisor tells: `ps`, the outcome of a command, the shared store's status.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use serde::Serialize;

use super::slot::{Slot, SlotState};
use super::{State, Supervisor, reserved};
use crate::shared::{QueueStats, Store};

impl PsReport {
    /// What the metrics' gauges show of it.
    pub fn gauges(&self) -> crate::metrics::Gauges<'_> {
        crate::metrics::Gauges {
            types: self
                .types
                .iter()
                .map(|t| (t.name.as_str(), t.desired, t.running))
                .collect(),
            instances: self
                .instances
                .iter()
                .map(|i| {
                    let memory = (i.state != InstanceState::Pending).then_some(i.memory_used);
                    (i.process.as_str(), i.id.as_str(), i.state.as_str(), memory)
                })
                .collect(),
            capacity: self.capacity,
            reserved: self.reserved,
        }
    }
}

/// What an instance is doing, in `ps` and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    /// Instantiating, or passing its first health check.
    Starting,
    /// Serving (web) or running (worker, consumer).
    Up,
    /// Ended and waiting for its restart.
    Crashed,
    /// Leaving: finishes what it is doing, then ends.
    Draining,
    /// Ended and not restarted (its `restart` policy).
    Exited,
    /// Desired but not started (room, a singleton's predecessor).
    Pending,
}

impl InstanceState {
    /// As in `ps` and the JSON API.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Starting => "starting",
            InstanceState::Up => "up",
            InstanceState::Crashed => "crashed",
            InstanceState::Draining => "draining",
            InstanceState::Exited => "exited",
            InstanceState::Pending => "pending",
        }
    }
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
    /// Desired instances here: in a cluster, this node's share (the slots it holds).
    pub desired: u32,
    /// In a cluster: the cluster's desired count of the type, over all nodes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<u32>,
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
    /// Its index within its type (`1` of `web.1`).
    #[serde(skip)]
    pub index: u32,
    /// `starting`, `up`, `crashed`, `draining`, `exited`, `pending`.
    pub state: InstanceState,
    /// Unix time of the last state change (absent for pending instances).
    pub since: Option<f64>,
    /// Crash reason or pending reason.
    pub reason: Option<String>,
    /// For crashed instances: milliseconds until the restart.
    pub restart_in_ms: Option<u64>,
    /// For crashed instances: the restart delay has reached the policy's longest
    /// (`--restart-max`): it crash-loops.
    pub backoff_capped: bool,
    /// For exited workers: their exit status, when they exited with one.
    pub exit_code: Option<i32>,
    /// Linear memory in use, in bytes.
    pub memory_used: u64,
    /// Memory limit, in bytes.
    pub memory_limit: u64,
    /// Requests served; for a TCP process, connections handed to it.
    pub requests: u64,
    /// A TCP process's connections open now (`None` for other types).
    pub connections: Option<u32>,
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

impl Supervisor {
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

    /// Depth of every queue a current type consumes.
    pub async fn queue_stats(&self) -> Vec<QueueStats> {
        let consumers: Vec<(Store, String)> = self
            .lock()
            .types
            .values()
            .filter_map(|t| Some((t.shared.store.clone()?, t.spec.consume.clone()?)))
            .collect();
        let mut stats = Vec::new();
        for (store, queue) in consumers {
            if stats.iter().any(|s: &QueueStats| s.queue == queue) {
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
        let mut instances: Vec<InstanceReport> =
            state.slots.iter().map(|slot| slot.report()).collect();
        for (process, index, reason) in self.plan(&state).pending {
            let release = state.types.get(&process).map_or(0, |t| t.release);
            let memory = state.desired.get(&process).map_or(0, |s| s.memory.as_u64());
            instances.push(InstanceReport {
                id: format!("{process}.{index}"),
                process: process.to_string(),
                index,
                state: InstanceState::Pending,
                since: None,
                reason: Some(reason.to_string()),
                restart_in_ms: None,
                backoff_capped: false,
                exit_code: None,
                memory_used: 0,
                memory_limit: memory,
                requests: 0,
                connections: None,
                restarts: 0,
                health: None,
                release,
            });
        }
        instances.sort_by(|a, b| {
            let key = |i: &InstanceReport| {
                (
                    i.process.clone(),
                    i.index,
                    i.state == InstanceState::Draining,
                )
            };
            key(a).cmp(&key(b))
        });
        PsReport {
            types: self.type_reports(&state),
            instances,
            capacity: self.limits.capacity.as_u64(),
            reserved: reserved(&state),
        }
    }

    pub(super) fn type_reports(&self, state: &State) -> Vec<TypeReport> {
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
                let held = state.here.as_ref().map(|here| {
                    here.get(name).map_or(0, |h| {
                        h.keys().filter(|i| **i <= scale.count).count() as u32
                    })
                });
                TypeReport {
                    name: name.to_string(),
                    kind: process.kind_name(),
                    desired: held.unwrap_or(scale.count),
                    cluster: held.map(|_| scale.count),
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

impl Slot {
    /// This slot in `ps`.
    fn report(&self) -> InstanceReport {
        let slot = self;
        let (status, since) = slot
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let (exit_code, backoff_capped) = match &status {
            SlotState::Exited { code, .. } => (*code, false),
            SlotState::Crashed { capped, .. } => (None, *capped),
            _ => (None, false),
        };
        let (state, reason, restart_in_ms) = match status {
            SlotState::Starting => (InstanceState::Starting, None, None),
            SlotState::Up => (InstanceState::Up, None, None),
            SlotState::Draining => (InstanceState::Draining, None, None),
            SlotState::Exited { reason, .. } => (InstanceState::Exited, Some(reason), None),
            SlotState::Waiting => (
                InstanceState::Pending,
                Some("waiting for the instance it replaces to stop (singleton)".into()),
                None,
            ),
            SlotState::Crashed {
                reason, restart_at, ..
            } => (
                InstanceState::Crashed,
                Some(reason),
                Some(
                    restart_at
                        .saturating_duration_since(Instant::now())
                        .as_millis() as u64,
                ),
            ),
        };
        InstanceReport {
            backoff_capped,
            exit_code,
            id: slot.name(),
            process: slot.process.to_string(),
            index: slot.index,
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
            connections: slot
                .version
                .backends
                .is_some()
                .then(|| slot.connections.load(Ordering::Relaxed)),
            restarts: slot.restarts.load(Ordering::Relaxed),
            health: slot
                .health
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            release: slot.version.release,
        }
    }
}
