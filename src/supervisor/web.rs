//! One web instance's life in its slot: start, readiness check, traffic from the pool,
//! liveness checks while idle, and the drain when the slot stops.

use std::time::Duration;

use tokio::sync::oneshot;

use super::Supervisor;
use super::health::{Liveness, ready_check};
use super::slot::{Ended, ProcessType, Up};
use crate::instance::{Exit, WebInstance, WebSettings};
use crate::router::Member as _;
use crate::runtime::{InstanceSetup, Kind};

/// What the log says of a type whose instances break on their second request.
const BROKE_ON_SECOND: &str = "its instances answer their first request and fail their second, so its component cannot serve twice (componentize-js/StarlingMonkey components cannot)";

impl Supervisor {
    /// Starts a web instance, checks it (once per slot start, unless it replaces a used-up
    /// one), hands it to the pool and serves until it ends or the slot stops.
    pub(super) async fn run_web(
        &self,
        process: &ProcessType,
        setup: InstanceSetup<'_>,
        up: Up<'_>,
        ready: &mut Option<oneshot::Sender<Result<(), String>>>,
    ) -> Result<Ended, String> {
        let Kind::Http(pre) = &process.compiled.kind else {
            unreachable!("run_web runs HTTP types");
        };
        let slot = up.slot;
        let pool = process.pool.as_ref().expect("HTTP types have a pool");
        let (exit_tx, exit_rx) = oneshot::channel();
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
        if let Some(check) = process.spec.health.as_ref().filter(|_| !up.recycled) {
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
        self.mark_up(&up, ready);
        Ok(self.serve(process, &up, exit_rx).await)
    }

    /// The instance is in the pool: waits for its end, drains it when the slot stops, and
    /// checks it while idle.
    async fn serve(
        &self,
        process: &ProcessType,
        up: &Up<'_>,
        mut exit_rx: oneshot::Receiver<Exit>,
    ) -> Ended {
        let slot = up.slot;
        let pool = process.pool.as_ref().expect("HTTP types have a pool");
        // A single-use type's instances are checked once, when the slot starts (a check would
        // use up the instance it ran on), and never while idle.
        let mut liveness = process
            .spec
            .health
            .as_ref()
            .filter(|_| !process.reuse.single_use())
            .map(Liveness::new);
        loop {
            tokio::select! {
                ended = &mut exit_rx => {
                    // The sender is dropped without a reason only if the instance was dropped
                    // by the pool, which happens only to a retired instance.
                    return match ended {
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
                    // Drain (`Slot::stop` retired the instance): out of the rotation now; a
                    // request in flight finishes, then the pool drops the retired instance and
                    // `exit_rx` resolves.
                    drop(pool.take_idle(|i| i.is_retired()));
                    // As long as the type's own request timeout allows a request.
                    let drain = process
                        .spec
                        .request_timeout
                        .map_or(self.limits.drain_timeout, |t| t + Duration::from_secs(1));
                    let _ = tokio::time::timeout(drain, exit_rx).await;
                    return Ended::Stopped;
                }
                () = Liveness::due(&mut liveness) => {
                    let check = liveness.as_mut().expect("due only with a check");
                    if let Some(reason) = check.run(pool, slot, up.name, &self.logs).await {
                        return Ended::Unhealthy(reason);
                    }
                }
            }
        }
    }
}
