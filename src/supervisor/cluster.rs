//! The supervisor as one node of a cluster: it runs the slots this node holds claims for, and
//! formation changes go to the cluster's shared formation, which every node applies.
//!
//! The supervisor knows nothing of etcd: the cluster agent (`crate::cluster`) tells it which
//! slots are held here ([`Supervisor::hold`]) and the cluster's formation
//! ([`Supervisor::adopt`]), and gives it a [`ClusterLink`] where `scale` proposes changes.
//! The pure [`plan`](super::plan::plan) then starts only the held slots.

#[cfg(feature = "cluster")]
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use super::Supervisor;
use super::slot::SlotState;
use crate::app::ProcessName;
use crate::formation::Formation;

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a node of a cluster asks of the cluster: formation changes go to the cluster's one
/// formation, `ps --cluster` reads every node's instances, and a node that stops leaves.
pub trait ClusterLink: Send + Sync {
    /// Replaces the formation this node last applied with `next` for the whole cluster;
    /// refused (with why) if another node changed it in the meantime.
    fn propose<'a>(&'a self, next: &'a Formation) -> BoxFuture<'a, Result<(), String>>;
    /// Every node and instance of the cluster, as `ps --cluster --json` prints them.
    fn ps(&self) -> BoxFuture<'_, Result<serde_json::Value, String>>;
    /// `cordon`, `uncordon` or `drain` node `node` of the cluster; what was done.
    fn node_action<'a>(
        &'a self,
        node: &'a str,
        action: &'a str,
    ) -> BoxFuture<'a, Result<String, String>>;
    /// Why this node should get no traffic now (it cannot renew its lease), if so.
    fn health(&self) -> Result<(), String>;
    /// Gives up this node's claims at once (its instances have stopped), so that the other
    /// nodes take its slots without waiting for its lease to expire.
    fn leave(&self) -> BoxFuture<'_, ()>;
}

impl Supervisor {
    /// The cluster this node is in, if any.
    pub fn cluster(&self) -> Option<&Arc<dyn ClusterLink>> {
        self.cluster.get().map(|(link, _)| link)
    }

    /// This node's name in its cluster, if it is in one.
    pub fn node(&self) -> Option<&str> {
        self.cluster.get().map(|(_, node)| node.as_str())
    }

    /// What a load balancer's health check answers (`--health`): the ready instances of the
    /// front door's type `routed`, or why this host should get no traffic — it is stopping,
    /// has no ready instance of the type, or (in a cluster) cannot renew its lease.
    pub fn health(&self, routed: Option<&ProcessName>) -> Result<String, String> {
        if self.cancel.is_cancelled() {
            return Err("the host is stopping".to_string());
        }
        if let Some(cluster) = self.cluster() {
            cluster.health()?;
        }
        let Some(routed) = routed else {
            return Ok("no HTTP type is routed here".to_string());
        };
        let state = self.lock();
        let ready = state
            .slots
            .iter()
            .filter(|s| s.process == *routed && !s.stopping())
            .filter(|s| {
                let status = s.status.lock().unwrap_or_else(|e| e.into_inner());
                matches!(status.0, SlotState::Up)
            })
            .count();
        if ready == 0 {
            return Err(format!("no `{routed}` instance is ready here"));
        }
        Ok(format!("{ready} `{routed}` instances ready"))
    }

    /// The fencing token of the claim slot `process.index` runs under, if it is one of a
    /// cluster's.
    pub(super) fn fence(&self, process: &ProcessName, index: u32) -> Option<i64> {
        let state = self.lock();
        state.here.as_ref()?.get(process)?.get(&index).copied()
    }
}

/// One local slot as the cluster sees it.
#[cfg(feature = "cluster")]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalSlot {
    pub process: ProcessName,
    pub index: u32,
    /// As `ps` names it: `starting`, `up`, `crashed`, `draining`…
    pub state: &'static str,
}

#[cfg(feature = "cluster")]
impl Supervisor {
    /// Makes this supervisor a node of a cluster, before [`start`](Self::start): it runs the
    /// cluster's `formation`, but only the slots that [`hold`](Self::hold) gives it, and its
    /// `scale` goes to `shared`.
    pub fn join_cluster(&self, shared: Arc<dyn ClusterLink>, node: String, formation: Formation) {
        let mut state = self.lock();
        state.desired = formation;
        state.here = Some(BTreeMap::new());
        drop(state);
        if self.cluster.set((shared, node)).is_err() {
            panic!("a supervisor joins one cluster");
        }
    }

    /// The slots this node holds claims for, with each claim's fencing token; starts the new
    /// ones and stops those no longer held (unless the formation has not started yet).
    pub fn hold(self: &Arc<Self>, here: BTreeMap<ProcessName, BTreeMap<u32, i64>>, started: bool) {
        let mut state = self.lock();
        if state.here.as_ref() == Some(&here) {
            return;
        }
        state.here = Some(here);
        if started && !self.cancel.is_cancelled() {
            drop(self.reconcile(&mut state));
        }
    }

    /// Every slot that exists here, stopping ones included: a claim is given up only once its
    /// slot has ended.
    pub fn local_slots(&self) -> Vec<LocalSlot> {
        let state = self.lock();
        state
            .slots
            .iter()
            .map(|slot| {
                let status = slot.status.lock().unwrap_or_else(|e| e.into_inner());
                LocalSlot {
                    process: slot.process.clone(),
                    index: slot.index,
                    state: if slot.stopping() {
                        "draining"
                    } else {
                        status.0.name()
                    },
                }
            })
            .collect()
    }

    /// Each type's `placement`: the labels a node must have to run it.
    pub fn placement(&self) -> BTreeMap<ProcessName, BTreeMap<String, String>> {
        let state = self.lock();
        state
            .types
            .values()
            .map(|t| (t.spec.name.clone(), t.spec.placement.clone()))
            .collect()
    }

    /// The types that run at most one instance.
    pub fn singletons(&self) -> BTreeSet<ProcessName> {
        let state = self.lock();
        state
            .types
            .values()
            .filter(|t| t.spec.singleton)
            .map(|t| t.spec.name.clone())
            .collect()
    }

    /// Applies the cluster's formation, changed by some node's `scale`: `next_of` gets this
    /// node's desired formation and gives the cluster's over it (types this node's release
    /// lacks left out), or `None` if there is nothing newer. It runs under the formation lock,
    /// which a `scale` here holds while it proposes; while a change runs here (a roll may take
    /// minutes) nothing is applied and `false` says to try again later.
    pub async fn adopt(
        self: &Arc<Self>,
        next_of: impl FnOnce(&Formation) -> Option<Formation>,
    ) -> bool {
        let Ok(_op) = self.ops.try_lock() else {
            return false;
        };
        let current = self.desired();
        let Some(next) = next_of(&current) else {
            return true;
        };
        if next == current {
            return true;
        }
        let named: Vec<ProcessName> = next
            .iter()
            .filter(|(name, scale)| current.get(name) != Some(*scale))
            .map(|(name, _)| name.clone())
            .collect();
        if let Err(e) = self.apply(next, &named, "The cluster scaled").await {
            self.logs
                .host(format!("cannot apply the cluster's formation: {e}"));
        }
        true
    }
}

#[cfg(feature = "cluster")]
impl SlotState {
    /// As `ps` names the state.
    fn name(&self) -> &'static str {
        match self {
            SlotState::Waiting | SlotState::Starting => "starting",
            SlotState::Up => "up",
            SlotState::Crashed { .. } => "crashed",
            SlotState::Draining => "draining",
            SlotState::Exited { .. } => "exited",
        }
    }
}
