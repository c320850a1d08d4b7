//! A queue consumer's loop: take the next due message of the type's queue, deliver it to the
//! instance, acknowledge it or put it back (retried, or dead-lettered after `max_attempts`).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::Supervisor;
use super::slot::{Ended, ProcessType, Slot};
use crate::instance::{self, Delivery};
use crate::shared::{Job, Nacked, Store};
use crate::units::humanize;

/// Longest wait for the shared store to answer a consumer's `reserve`.
const RESERVE_WAIT: Duration = Duration::from_secs(10);

/// What a consumer says of an answer that came after its message's lease lapsed.
/// (The lease outlasts the handler's timeout, so only a host stalled past it gets here.)
const LAPSED: &str = "this answer changed nothing";

/// One consumer instance at work: what its steps share.
struct Consuming<'a> {
    process: &'a ProcessType,
    slot: &'a Slot,
    name: &'a str,
    store: &'a Store,
    queue: &'a str,
    /// The handler's time for one message (the type's `request_timeout`).
    timeout: Duration,
    max_attempts: u32,
}

impl Supervisor {
    /// A consumer instance's loop. Ends when the instance crashes (its message is
    /// redelivered) or the slot stops. A stop drains like HTTP: no new message is taken, the
    /// one in hand finishes (within the type's timeout) and is acknowledged or redelivered as
    /// usual; only a handler that runs out of time is put back without counting the delivery.
    pub(super) async fn consume(
        &self,
        process: &ProcessType,
        slot: &Slot,
        name: &str,
        consumer: &mut instance::Consumer,
    ) -> Ended {
        let (Some(store), Some(queue)) = (&process.shared.store, &process.spec.consume) else {
            slot.cancel.cancelled().await;
            return Ended::Stopped;
        };
        let c = Consuming {
            process,
            slot,
            name,
            store,
            queue,
            timeout: process
                .spec
                .request_timeout
                .unwrap_or(self.limits.drain_timeout),
            max_attempts: process.spec.max_attempts,
        };
        loop {
            let job = match self.next_job(&c).await {
                Ok(job) => job,
                Err(ended) => return ended,
            };
            let Some(job) = job else { continue };
            slot.requests.fetch_add(1, Ordering::Relaxed);
            // A stop does not interrupt the handler: its side effects (a mail sent) must not
            // be redone. It finishes within the type's timeout, as a draining HTTP request
            // does, and is answered as usual; the slot ends after that answer.
            let started = Instant::now();
            let delivery = consumer.deliver(queue, job.body.clone(), c.timeout).await;
            if let Some(ended) = self.answer(&c, &job, delivery, started).await {
                return ended;
            }
        }
    }

    /// Reserves the next due message; `Ok(None)` after a wait with nothing due (or a store
    /// that failed, logged), `Err` once the slot stops.
    async fn next_job(&self, c: &Consuming<'_>) -> Result<Option<Job>, Ended> {
        // Not raced with a stop: a reservation made on the server must not be dropped
        // half-way. The lease outlasts the handler's timeout: only a dead host lets it lapse.
        // Bounded all the same, so a store that stopped answering (a half-open Redis
        // connection) cannot hold up a scale-down or shutdown; a reservation made without its
        // answer lapses and the message comes back.
        let lease = c.timeout + Duration::from_secs(1);
        let job = match tokio::time::timeout(
            RESERVE_WAIT,
            c.store.reserve(c.queue, lease, c.max_attempts),
        )
        .await
        {
            Ok(job) => job,
            Err(_) => Err(format!(
                "no answer from the shared store within {}",
                humanize(RESERVE_WAIT)
            )),
        };
        if c.slot.stopping() {
            if let Ok(Some(job)) = &job {
                self.put_back(c, job).await;
            }
            return Err(Ended::Stopped);
        }
        match job {
            Ok(Some(job)) => return Ok(Some(job)),
            Ok(None) => tokio::select! {
                () = c.store.wait(Duration::from_millis(250)) => {}
                () = c.slot.cancel.cancelled() => return Err(Ended::Stopped),
            },
            Err(e) => {
                self.logs
                    .host(format!("{} cannot read queue `{}`: {e}", c.name, c.queue));
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = c.slot.cancel.cancelled() => return Err(Ended::Stopped),
                }
            }
        }
        Ok(None)
    }

    /// Answers the store for a delivered message; `Some` ends the incarnation (a crash, or a
    /// stop once the message is answered).
    async fn answer(
        &self,
        c: &Consuming<'_>,
        job: &Job,
        delivery: Delivery,
        started: Instant,
    ) -> Option<Ended> {
        let (name, queue) = (c.name, c.queue);
        let (reason, crashed) = match delivery {
            Delivery::Done => {
                match c.store.ack(job).await {
                    Ok(true) => {}
                    Ok(false) => self.logs.host(format!(
                        "{name} message {} of `{queue}` was handled, but its lease had lapsed and it was delivered again: {LAPSED}",
                        job.id
                    )),
                    Err(e) => self.logs.host(format!(
                        "{name} could not acknowledge message {}: {e}",
                        job.id
                    )),
                }
                return c.slot.stopping().then_some(Ended::Stopped);
            }
            Delivery::Crashed(_) if c.slot.stopping() && started.elapsed() >= c.timeout => {
                // Stopped, and the handler did not finish in time: not the message's fault,
                // so it goes back without counting the delivery.
                self.put_back(c, job).await;
                return Some(Ended::Stopped);
            }
            Delivery::Failed(text) => (text, None),
            Delivery::Crashed(reason) => (reason.clone(), Some(reason)),
        };
        let max = c.max_attempts;
        let outcome = match c.store.nack(job, &reason, max).await {
            Ok(Nacked::Retry) => format!("will retry (attempt {}/{max})", job.attempts),
            Ok(Nacked::DeadLettered) => format!("dead-lettered after {} attempts", job.attempts),
            Ok(Nacked::Lapsed) => format!("its lease had lapsed: {LAPSED}"),
            Err(e) => format!("could not be put back: {e}"),
        };
        self.logs.host(format!(
            "{name} message {} of `{queue}` failed: {reason}; {outcome}",
            job.id
        ));
        self.metrics.queue_failure(c.process.spec.name.as_str());
        match crashed {
            Some(reason) => Some(Ended::Request(reason)),
            None => c.slot.stopping().then_some(Ended::Stopped),
        }
    }

    /// Puts a reserved message back without counting its delivery.
    async fn put_back(&self, c: &Consuming<'_>, job: &Job) {
        if let Err(e) = c.store.release(job).await {
            self.logs.host(format!(
                "{} could not put message {} back: {e}",
                c.name, job.id
            ));
        }
    }
}
