//! Changes of the live formation: scale (counts and memory), rolling restarts, and the
//! replacement of one slot by another that both use, under the memory budget.

use std::sync::Arc;

use super::plan::{self, Budget, Replacement};
use super::slot::{ProcessType, Slot};
use super::{ControlError, Outcome, READY_WAIT, State, Supervisor, reserved};
use crate::app::{ByteSize, ProcessName};
use crate::events::Fields;
use crate::instance;
use crate::logs::API;
use crate::runtime::InstanceSetup;
use crate::units::humanize;

impl Supervisor {
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
        if let Some((cluster, _)) = self.cluster.get() {
            // Every node applies the cluster's formation, this one too; a concurrent change
            // through another node is refused here, and nothing changes.
            cluster
                .propose(&next)
                .await
                .map_err(|e| ControlError::Failed(format!("{e}; the formation is unchanged")))?;
        }
        self.apply(next, &named, "Scale").await
    }

    /// Makes `next` the desired formation: stores it, starts and stops instances, rolls those
    /// whose memory changed; `named` types start their exited instances again. The caller
    /// holds `ops` and has validated `next`.
    pub(super) async fn apply(
        self: &Arc<Self>,
        next: crate::formation::Formation,
        named: &[ProcessName],
        what: &str,
    ) -> Result<Outcome, ControlError> {
        if let Some(store) = &self.store {
            store
                .store_formation(&next)
                .map_err(|e| ControlError::Failed(format!("{e:#}; the formation is unchanged")))?;
        }
        self.logs.event(API, format!("{what} to {next}"));
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
        self.events.emit(
            "formation.scaled",
            Fields {
                formation: Some(state.desired.to_json()),
                ..Fields::default()
            },
        );
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
        self.events.emit(
            "formation.restarted",
            Fields {
                instance: target.filter(|t| t.contains('.')).map(str::to_string),
                process: target.filter(|t| !t.contains('.')).map(str::to_string),
                ..Fields::default()
            },
        );
        Ok(Outcome {
            formation: self.type_reports(&self.lock()),
            notes,
        })
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
    pub(super) async fn replace(
        self: &Arc<Self>,
        old: &Arc<Slot>,
        process: &Arc<ProcessType>,
        memory: ByteSize,
    ) -> Result<Option<String>, String> {
        let (new, ready) = {
            let mut state = self.lock();
            let staying: u64 = state
                .slots
                .iter()
                .filter(|s| !s.stopping())
                .map(|s| s.memory.as_u64())
                .sum();
            let budget = Budget {
                capacity: self.limits.capacity,
                staying: ByteSize::bytes(staying),
                reserved: ByteSize::bytes(reserved(&state)),
            };
            let singleton = process.spec.singleton || old.version.spec.singleton;
            // What the new one waits for before it starts.
            let how = plan::replacement(budget, old.memory, memory, singleton);
            let after = match how {
                Replacement::Pending => {
                    old.stop();
                    return Ok(Some(format!(
                        "{} pending: capacity: needs {memory}, {} of {} reserved by the instances staying",
                        old.name(),
                        ByteSize::bytes(staying.saturating_sub(old.memory.as_u64())),
                        self.limits.capacity
                    )));
                }
                // The instances still draining hold their memory until they end, and `old`
                // stops first.
                Replacement::StopFirst => {
                    let mut after = draining(&state);
                    after.push(old.ended.clone());
                    after
                }
                // `old` and the instances of its type already on their way out: a running one
                // of a type that stops being a singleton (its new count started more) never
                // ends.
                Replacement::Singleton => state
                    .slots
                    .iter()
                    .filter(|s| Arc::ptr_eq(s, old) || (s.process == old.process && s.stopping()))
                    .map(|s| s.ended.clone())
                    .collect(),
                Replacement::Surge { after_draining } => {
                    if after_draining {
                        draining(&state)
                    } else {
                        Vec::new()
                    }
                }
            };
            let started = self.spawn_slot(&mut state, process, old.index, memory, after);
            if matches!(how, Replacement::StopFirst | Replacement::Singleton) {
                old.stop();
            }
            started
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

    /// Instantiates `process` once with `memory` and drops it: does the limit suffice?
    pub(super) async fn probe(
        &self,
        process: &ProcessName,
        memory: ByteSize,
    ) -> Result<(), String> {
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
            listen: None,
            stdio: None,
            cluster: None,
        };
        instance::probe(&self.runtime, &process.compiled, setup).await
    }
}

/// The end of every slot still draining: they hold their memory until then.
fn draining(state: &State) -> Vec<tokio_util::sync::CancellationToken> {
    state
        .slots
        .iter()
        .filter(|s| s.stopping())
        .map(|s| s.ended.clone())
        .collect()
}
