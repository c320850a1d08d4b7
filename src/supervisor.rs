//! Keeps the formation running: one task per instance slot (`web.1`, `worker.2`…) starts its
//! instance, waits for it to end, logs why, and starts a replacement. Web instances are handed
//! to their type's [`Pool`]; workers run in the slot task.
//!
//! Restart policy: a web instance that crashed *while handling a request* (trap, memory quota,
//! timeout) is replaced at once, every time: the request failed, not the instance's start, and
//! a fresh instance costs microseconds, so backing off would only turn one bad request into an
//! outage of the type. Everything else — a worker whose `run` ended, an instance that failed to
//! instantiate — follows the [`RestartPolicy`] backoff, so a crash loop costs no CPU.
//!
//! Every slot stops when the host's shutdown token is cancelled: an idle web instance is
//! dropped, a worker's `run` future is dropped at its next epoch tick.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::{ByteSize, ProcessSpec};
use crate::humanize;
use crate::instance::{self, WebInstance};
use crate::logs::Logs;
use crate::router::Pool;
use crate::runtime::{Compiled, InstanceSetup, Kind, Runtime};

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

/// How an incarnation ended, which decides the restart delay.
enum Ended {
    /// A web instance failed while handling a request: replaced at once.
    Request(String),
    /// A worker's `run` ended: restarted with backoff.
    Process(String),
}

/// A process type as the supervisor runs it.
pub struct ProcessType {
    /// From the app.
    pub spec: ProcessSpec,
    /// Compiled component and its kind.
    pub compiled: Arc<Compiled>,
    /// Colour index in the log.
    pub colour: usize,
    /// Memory limit per instance.
    pub memory: ByteSize,
    /// Where its web instances go; `None` for background processes.
    pub pool: Option<Arc<Pool<WebInstance>>>,
}

/// What every slot task shares.
pub struct Supervisor {
    /// The engine and linker.
    pub runtime: Arc<Runtime>,
    /// The log stream for guest output and host events.
    pub logs: Logs,
    /// Cancelled at shutdown; every slot stops.
    pub cancel: CancellationToken,
    /// Tracks slot tasks so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// Restart backoff.
    pub restart: RestartPolicy,
    /// Given to guests as `PORT`.
    pub port: u16,
}

impl Supervisor {
    /// Starts instance `index` (1-based) of `process`. `ready` learns whether the first
    /// instantiation succeeded: a failure there is a start-up error, not a crash to retry.
    pub fn spawn_slot(
        self: &Arc<Self>,
        process: &Arc<ProcessType>,
        index: u32,
        ready: oneshot::Sender<Result<(), String>>,
    ) {
        let this = self.clone();
        let process = process.clone();
        self.tasks.spawn(async move {
            let name = format!("{}.{index}", process.spec.name);
            this.run_slot(&process, &name, ready).await;
        });
    }

    async fn run_slot(
        &self,
        process: &ProcessType,
        name: &str,
        ready: oneshot::Sender<Result<(), String>>,
    ) {
        let mut ready = Some(ready);
        let mut backoff = Backoff::new(self.restart);
        // Whether this slot counts in its pool as up or starting. Requests may wait for the
        // slot's instance while it does; it stays reserved across an immediate restart so a
        // crash of the only instance makes requests wait for the replacement, not fail.
        let mut reserved = false;
        loop {
            let started = Instant::now();
            if let Some(pool) = process.pool.as_ref().filter(|_| !reserved) {
                pool.reserve();
                reserved = true;
            }
            let ended = tokio::select! {
                ended = self.run_once(process, name, &mut ready) => ended,
                () = self.cancel.cancelled() => return,
            };
            let (reason, backoff_applies) = match ended {
                Ok(Ended::Request(reason)) => (reason, false),
                Ok(Ended::Process(reason)) => (reason, true),
                Err(boot) => {
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(Err(boot));
                        return;
                    }
                    (format!("failed to start: {boot}"), true)
                }
            };
            let delay = if backoff_applies {
                backoff.next(started.elapsed())
            } else {
                Duration::ZERO
            };
            if let Some(pool) = process
                .pool
                .as_ref()
                .filter(|_| reserved && !delay.is_zero())
            {
                pool.gone();
                reserved = false;
            }
            let when = if delay.is_zero() {
                "restarting now".to_string()
            } else {
                format!("restarting in {}", humanize(delay))
            };
            self.logs.host(format!("{name} {reason}; {when}"));
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.cancel.cancelled() => return,
            }
        }
    }

    /// Runs one incarnation of an instance until it ends; `Ok` says why it ended, `Err` that it
    /// could not start.
    async fn run_once(
        &self,
        process: &ProcessType,
        name: &str,
        ready: &mut Option<oneshot::Sender<Result<(), String>>>,
    ) -> Result<Ended, String> {
        let setup = InstanceSetup {
            instance: name,
            process: process.spec.name.as_str(),
            program: &process.compiled.program,
            args: &process.spec.args,
            port: self.port,
            memory: process.memory,
            stdout: self.logs.sink(name, process.colour),
            stderr: self.logs.sink(name, process.colour),
        };
        let flush = (setup.stdout.clone(), setup.stderr.clone());
        let mark_up = |ready: &mut Option<oneshot::Sender<Result<(), String>>>| match ready.take() {
            Some(ready) => {
                let _ = ready.send(Ok(()));
            }
            None => self.logs.host(format!("{name} up")),
        };
        let ended = match &process.compiled.kind {
            Kind::Http(pre) => {
                let pool = process.pool.as_ref().expect("HTTP types have a pool");
                let (exit_tx, exit_rx) = oneshot::channel();
                let instance = WebInstance::start(&self.runtime, pre, setup, exit_tx)
                    .await
                    .map_err(|e| format!("{e:#}"))?;
                pool.release(instance);
                mark_up(ready);
                let ended = exit_rx.await;
                // The sender is dropped without a reason only when the pool dropped the instance
                // (shutdown); the slot is being cancelled then and this value is never read.
                Ended::Request(ended.unwrap_or_else(|_| "stopped".to_string()))
            }
            Kind::Command(pre) => Ended::Process(
                instance::run_worker(&self.runtime, pre, setup, || mark_up(ready)).await?,
            ),
        };
        flush.0.flush();
        flush.1.flush();
        Ok(ended)
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
