//! Deploys: a new release's versions of the types roll out instance by instance, and any
//! failure rolls every type back to the version it had.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Serialize;

use super::slot::ProcessType;
use super::{ControlError, Supervisor};
use crate::app::{ProcessName, ProcessSpec};
use crate::events::Fields;
use crate::formation::{Formation, Scale};
use crate::logs::API;
use crate::runtime::Compiled;

/// The types and formation of a running release.
type Versions = (BTreeMap<ProcessName, Arc<ProcessType>>, Formation);

/// How long a deploy watches new background and consumer instances after its roll-out before
/// calling it a success.
const SETTLE: Duration = Duration::from_secs(1);

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
        if let Some(node) = self.node() {
            return Err(ControlError::Invalid(format!(
                "node `{node}` is in a cluster, and a {what} across the cluster's nodes is not built yet: nothing changed. Stop the nodes one at a time and start each on the new release (its instances come back on the other nodes meanwhile)"
            )));
        }
        let _op = self.ops.lock().await;
        let old = {
            let state = self.lock();
            (state.types.clone(), state.desired.clone())
        };
        let (changes, next) = self.next_versions(types, release, &old)?;
        let summary = describe_changes(&changes);
        self.logs
            .event(API, format!("{what}: v{release} rolling out, {summary}"));
        let started = self.start_release(&changes, &old, &next);
        let mut failure = self.await_started(started).await.into_iter().next();
        if failure.is_none() {
            failure = self.roll_changed(&changes, &next, release).await;
        }
        let (old_types, old_desired) = old;
        let (next_types, next_desired) = next;
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
            self.events.emit(
                "release.failed",
                Fields {
                    release: Some(release),
                    reason: Some(failure.clone()),
                    ..Fields::default()
                },
            );
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
        self.events.emit(
            if what.starts_with("Rollback") {
                "release.rolled_back"
            } else {
                "release.deployed"
            },
            Fields {
                release: Some(release),
                formation: Some(next_desired.to_json()),
                ..Fields::default()
            },
        );
        Ok(changes)
    }

    /// The versions and formation of the release `types` make: the layering of a release's
    /// manifest over the live formation, and what changed per type.
    fn next_versions(
        &self,
        types: Vec<NewVersion>,
        release: u32,
        (old_types, old_desired): &Versions,
    ) -> Result<(Changes, Versions), ControlError> {
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
                    let mut scale = before.follow_manifest(&old.spec, &spec, self.default_memory);
                    scale.count = limit(scale.count);
                    next_desired.insert(name.clone(), scale);
                    // A new memory limit rolls the type as a new version does.
                    if !old.same_as(&spec, &compiled) || scale.memory != before.memory {
                        changes.changed.push(name.to_string());
                    } else if scale.count != before.count {
                        changes.scaled.push((name.to_string(), scale.count));
                    }
                }
                None => {
                    changes.added.push(name.to_string());
                    let mut scale = Scale::of_new(&spec, self.default_memory);
                    scale.count = limit(scale.count);
                    next_desired.insert(name.clone(), scale);
                }
            }
            next_types.insert(name, self.version(spec, compiled, release));
        }
        for name in old_types.keys() {
            if !next_types.contains_key(name) {
                changes.removed.push(name.to_string());
                next_desired.remove(name);
            }
        }
        Ok((changes, (next_types, next_desired)))
    }

    /// Makes the new versions current and starts what the release adds; returns the started
    /// slots' readiness. Removed types keep serving until the rest of the release is live.
    fn start_release(
        self: &Arc<Self>,
        changes: &Changes,
        (old_types, old_desired): &Versions,
        (next_types, next_desired): &Versions,
    ) -> Vec<(String, super::Ready)> {
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
    }

    /// Rolls the slots still running an older version of a changed type, one at a time;
    /// `Some` says why the release failed.
    async fn roll_changed(
        self: &Arc<Self>,
        changes: &Changes,
        (next_types, next_desired): &Versions,
        release: u32,
    ) -> Option<String> {
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
                    Err(e) => return Some(e),
                }
                if let Some(failure) = self.crashed_during(release) {
                    return Some(failure);
                }
            }
        }
        None
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
