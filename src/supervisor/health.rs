//! Health checks of a web instance: readiness before it takes traffic, liveness while idle.

use std::time::Duration;

use super::slot::Slot;
use crate::app::HealthCheck;
use crate::instance::WebInstance;
use crate::logs::Logs;
use crate::router::Pool;
use crate::units::humanize;

/// Checks a new instance until it passes, every `interval` up to `grace`; `Err` if it never
/// did (the instance counts as failed to start).
pub(super) async fn ready_check(
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

/// The liveness checks of one web instance: every `interval`, while it is idle.
pub(super) struct Liveness<'a> {
    check: &'a HealthCheck,
    ticks: tokio::time::Interval,
    /// Failed checks in a row.
    failures: u32,
}

impl<'a> Liveness<'a> {
    pub(super) fn new(check: &'a HealthCheck) -> Self {
        let mut ticks =
            tokio::time::interval_at(tokio::time::Instant::now() + check.interval, check.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            check,
            ticks,
            failures: 0,
        }
    }

    /// The next check is due; never without a check.
    pub(super) async fn due(liveness: &mut Option<Self>) {
        match liveness {
            Some(l) => {
                l.ticks.tick().await;
            }
            None => std::future::pending().await,
        }
    }

    /// Checks the slot's instance if it is idle (a busy one is skipped this time: a stuck one
    /// meets the request timeout instead). `Some(reason)`: it failed `threshold` checks in a
    /// row and is out of the rotation.
    pub(super) async fn run(
        &mut self,
        pool: &Pool<WebInstance>,
        slot: &Slot,
        name: &str,
        logs: &Logs,
    ) -> Option<String> {
        let check = self.check;
        let instance = pool.take_idle(|i| i.belongs_to(&slot.retired)).pop()?;
        let (instance, verdict) = instance.check(&check.path, check.timeout).await;
        match verdict {
            Ok(()) => {
                self.failures = 0;
                slot.set_health("passing".into());
            }
            Err(why) => {
                self.failures += 1;
                let failures = self.failures;
                slot.set_health(format!("failing ({failures}/{})", check.threshold));
                if failures >= check.threshold {
                    drop(instance);
                    return Some(format!(
                        "failed {failures} health checks in a row ({why}); taken out of rotation"
                    ));
                }
                logs.host(format!(
                    "{name} health check failed ({failures}/{}): {why}",
                    check.threshold
                ));
            }
        }
        // `None`: the check crashed it, and the instance's exit says so next.
        if let Some(instance) = instance {
            pool.release(instance);
        }
        None
    }
}
