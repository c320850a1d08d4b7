//! The restart policy: whether an ended instance comes back, and after how long.
//!
//! A web instance that crashed *while handling a request* (trap, memory quota, timeout) is
//! replaced at once, every time: the request failed, not the instance's start, and a fresh
//! instance costs microseconds, so backing off would only turn one bad request into an outage
//! of the type. Everything else — a worker whose `run` ended, an instance that failed to
//! instantiate or its health checks — follows the [`RestartPolicy`] backoff, so a crash loop
//! costs no CPU. The type's `restart` mode (`always`, `on-failure`, `never`) decides whether it
//! comes back at all. Pure: the slot task asks [`Backoff::decide`] and sleeps.

use std::time::Duration;

use crate::app::RestartMode;

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

/// How an incarnation ended, as the restart policy sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct End {
    /// A failure of the instance (a crash, a failed start or health check, a worker's error
    /// exit), as opposed to a success or a cause outside it (a client that went away).
    pub failed: bool,
    /// Whether a restart backs off: everything but a request that failed or was cancelled.
    pub backs_off: bool,
}

/// What happens after an incarnation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Next {
    /// Not restarted: the slot keeps its place, exited, until a restart, scale or deploy.
    Exit,
    /// Restarted after `delay`.
    Restart { delay: Duration },
}

/// The restart state of one slot.
#[derive(Debug)]
pub(super) struct Backoff {
    policy: RestartPolicy,
    /// Crashes in a row without a healthy stretch in between.
    failures: u32,
}

impl Backoff {
    pub(super) fn new(policy: RestartPolicy) -> Self {
        Self {
            policy,
            failures: 0,
        }
    }

    /// Decides on an incarnation that ended as `end` after running for `ran_for`, under the
    /// type's `mode`. `awaited`: a command (scale, restart, deploy) was told this start failed
    /// and decides first (a deploy rolls back and stops the slot), so the restart waits at least
    /// the policy's base.
    pub(super) fn decide(
        &mut self,
        mode: RestartMode,
        end: End,
        ran_for: Duration,
        awaited: bool,
    ) -> Next {
        let restart = match mode {
            RestartMode::Always => true,
            RestartMode::OnFailure => end.failed,
            RestartMode::Never => false,
        };
        if !restart {
            return Next::Exit;
        }
        let delay = if end.backs_off {
            self.next(ran_for)
        } else {
            Duration::ZERO
        };
        Next::Restart {
            delay: if awaited {
                delay.max(self.policy.base)
            } else {
                delay
            },
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const POLICY: RestartPolicy = RestartPolicy {
        base: Duration::from_secs(1),
        max: Duration::from_secs(5),
        reset_after: Duration::from_secs(60),
    };

    #[test]
    fn backoff_is_immediate_then_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::new(POLICY);
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

    fn mode() -> impl Strategy<Value = RestartMode> {
        prop_oneof![
            Just(RestartMode::Always),
            Just(RestartMode::OnFailure),
            Just(RestartMode::Never)
        ]
    }

    fn end() -> impl Strategy<Value = End> {
        (any::<bool>(), any::<bool>()).prop_map(|(failed, backs_off)| End { failed, backs_off })
    }

    proptest! {
        #[test]
        fn the_mode_decides_whether_an_instance_comes_back(
            mode in mode(), ends in prop::collection::vec((end(), 0..120u64, any::<bool>()), 1..20),
        ) {
            let mut b = Backoff::new(POLICY);
            for (end, ran_for, awaited) in ends {
                let next = b.decide(mode, end, Duration::from_secs(ran_for), awaited);
                let restarts = match mode {
                    RestartMode::Always => true,
                    RestartMode::OnFailure => end.failed,
                    RestartMode::Never => false,
                };
                prop_assert_eq!(next != Next::Exit, restarts);
            }
        }

        #[test]
        fn delays_stay_within_the_policy(
            ends in prop::collection::vec((end(), 0..120u64, any::<bool>()), 1..30),
        ) {
            let mut b = Backoff::new(POLICY);
            for (end, ran_for, awaited) in ends {
                let Next::Restart { delay } = b.decide(RestartMode::Always, end, Duration::from_secs(ran_for), awaited) else {
                    unreachable!("always restarts");
                };
                prop_assert!(delay <= POLICY.max);
                // A failed request is replaced at once, unless a command awaits the start.
                if !end.backs_off {
                    prop_assert_eq!(delay, if awaited { POLICY.base } else { Duration::ZERO });
                }
                if awaited {
                    prop_assert!(delay >= POLICY.base);
                }
            }
        }

        #[test]
        fn a_crash_loop_backs_off_more_each_time_until_the_cap(n in 1..30usize) {
            let mut b = Backoff::new(POLICY);
            let crash = End { failed: true, backs_off: true };
            let mut last = Duration::ZERO;
            for i in 0..n {
                let Next::Restart { delay } = b.decide(RestartMode::OnFailure, crash, Duration::from_millis(5), false) else {
                    unreachable!("a failure restarts on-failure");
                };
                prop_assert!(delay >= last, "{delay:?} after {last:?}");
                prop_assert!(i < 1 || delay > last || delay == POLICY.max);
                last = delay;
            }
            // A healthy stretch forgives the past.
            prop_assert_eq!(
                b.decide(RestartMode::OnFailure, crash, POLICY.reset_after, false),
                Next::Restart { delay: Duration::ZERO }
            );
        }
    }
}
