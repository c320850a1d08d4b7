//! `wasmform up` under systemd (`Type=notify`): `READY=1` once the formation is ready (the
//! condition `up --detach` waits for), `STATUS=` with the formation, `STOPPING=1` when it shuts
//! down, `EXTEND_TIMEOUT_USEC` while it compiles, and watchdog pings (`WATCHDOG=1` every half
//! of `WATCHDOG_USEC`) sent by a task of the host's async runtime, so a wedged runtime misses
//! them and systemd restarts it. Without `NOTIFY_SOCKET` every call does nothing.

use std::time::Duration;

use sd_notify::NotifyState;

use super::detach::{Verdict, judge};

/// How often readiness is checked until it is reached.
const POLL: Duration = Duration::from_millis(25);

/// The service manager's notification socket, if there is one.
#[derive(Clone, Copy, Debug)]
pub struct Notifier {
    enabled: bool,
}

impl Notifier {
    /// From `NOTIFY_SOCKET`.
    pub fn from_env() -> Self {
        Self {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some(),
        }
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if self.enabled
            && let Err(e) = sd_notify::notify(states)
        {
            tracing::warn!(cause = %e, "cannot notify the service manager (NOTIFY_SOCKET)");
        }
    }

    /// Compiling may take longer than systemd's start timeout: extends it by `timeout`, the
    /// compile timeout, once.
    pub fn compiling(&self, components: usize, timeout: Duration) {
        let usec = u32::try_from(timeout.as_micros()).unwrap_or(u32::MAX);
        self.send(&[
            NotifyState::Status(&format!("compiling {components} components")),
            NotifyState::ExtendTimeoutUsec(usec),
        ]);
    }

    /// Shutting down, and why.
    pub fn stopping(&self, why: &str) {
        self.send(&[
            NotifyState::Stopping,
            NotifyState::Status(&format!("stopping: {why}")),
        ]);
    }

    /// Spawns, on the current (the host's) runtime, the task that says `READY=1` once `ps`
    /// (a function returning the `/v1/ps` answer) is ready, and the watchdog pings if systemd
    /// asked for them.
    pub fn spawn(&self, ps: impl Fn() -> serde_json::Value + Send + 'static) {
        if !self.enabled {
            return;
        }
        let this = *self;
        tokio::spawn(async move {
            let mut steady_since: Option<std::time::Instant> = None;
            let mut told = String::new();
            loop {
                let report = ps();
                let status = match judge(&report) {
                    Verdict::Ready { settle } => {
                        let since = *steady_since.get_or_insert_with(std::time::Instant::now);
                        if !settle || since.elapsed() >= super::detach::SETTLE {
                            let formation = formation(&report);
                            this.send(&[
                                NotifyState::Ready,
                                NotifyState::Status(&format!("formation {formation} ready")),
                            ]);
                            return;
                        }
                        "starting".to_string()
                    }
                    Verdict::NotYet => {
                        steady_since = None;
                        "starting".to_string()
                    }
                    Verdict::Failed(id, why) => {
                        steady_since = None;
                        format!("not ready: {id} {why}")
                    }
                };
                if status != told {
                    this.send(&[NotifyState::Status(&status)]);
                    told = status;
                }
                tokio::time::sleep(POLL).await;
            }
        });
        if let Some(timeout) = sd_notify::watchdog_enabled() {
            let this = *self;
            tokio::spawn(async move {
                let mut every = tokio::time::interval(timeout / 2);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    every.tick().await;
                    this.send(&[NotifyState::Watchdog]);
                }
            });
        }
    }
}

/// `web=2,worker=1` from a `ps` answer.
fn formation(ps: &serde_json::Value) -> String {
    let empty = Vec::new();
    ps["types"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|t| {
            format!(
                "{}={}",
                t["name"].as_str().unwrap_or("?"),
                t["desired"].as_u64().unwrap_or(0)
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}
