//! The event stream: what happens to the formation, one JSON object per event, for
//! `wasmform events` and `GET /v1/events`.
//!
//! Every event has the same envelope — `v` (the schema version, [`VERSION`]), `seq` (1, 2, 3…
//! in the order things happened, never reused while the host runs), `time` (RFC 3339, UTC) and
//! `event` (`instance.up`, `formation.scaled`…) — and the fields of its kind; a field that does
//! not apply is left out, never `null`. The schema is documented in `docs/events.md` and only
//! grows: new kinds and new fields may appear, none changes meaning or shape without a new `v`.
//!
//! The host keeps the last [`HISTORY`] events, so a client can start from a sequence number it
//! saw (`?since=SEQ`) without missing what happened in between; a follower that falls behind
//! by more than [`FOLLOW`] events is told how many it skipped (`events.skipped`).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::broadcast;

/// The schema version in every event's `v`.
pub const VERSION: u32 = 1;

/// Events kept for `?since=SEQ`.
pub const HISTORY: usize = 10_000;

/// Events a follower may fall behind before it skips some.
pub const FOLLOW: usize = 4096;

/// One event, serialized once when it happens.
#[derive(Debug)]
pub struct Event {
    /// Its sequence number.
    pub seq: u64,
    /// Its JSON object, one line, without the newline.
    pub json: String,
}

/// The fields an event may carry besides its envelope; `None` fields are left out.
#[derive(Debug, Default, Serialize)]
pub struct Fields {
    /// `web.1`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// `web`
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub process: Option<String>,
    /// The release an instance runs, or the release deployed or rolled back to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub release: Option<u32>,
    /// Why: a crash, an exit, a pending instance's wait, a failing check.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A worker's exit status (`instance.exited`), when it exited with one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// A crashed instance's delay until its restart.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart_in_ms: Option<u64>,
    /// The formation after a change: type → `{count, memory}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub formation: Option<serde_json::Value>,
    /// A listening host's front door.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The host's process id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Events a follower missed (`events.skipped`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<u64>,
    /// `cluster.*`: this host's node name in its cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

impl Fields {
    /// The fields of an event about one instance.
    pub fn instance(id: &str, process: &str, release: u32) -> Self {
        Self {
            instance: Some(id.to_string()),
            process: Some(process.to_string()),
            release: (release > 0).then_some(release),
            ..Self::default()
        }
    }

    /// With a reason.
    pub fn because(mut self, reason: &str) -> Self {
        self.reason = Some(reason.to_string());
        self
    }
}

#[derive(Serialize)]
struct Envelope<'a> {
    v: u32,
    seq: u64,
    time: String,
    event: &'a str,
    #[serde(flatten)]
    fields: &'a Fields,
}

struct Ring {
    next: u64,
    kept: VecDeque<Arc<Event>>,
}

/// The host's event stream; clones share it.
#[derive(Clone)]
pub struct Events {
    ring: Arc<Mutex<Ring>>,
    live: broadcast::Sender<Arc<Event>>,
}

impl Default for Events {
    fn default() -> Self {
        Self::new()
    }
}

impl Events {
    /// An empty stream; the first event is `seq` 1.
    pub fn new() -> Self {
        Self {
            ring: Arc::new(Mutex::new(Ring {
                next: 1,
                kept: VecDeque::new(),
            })),
            live: broadcast::channel(FOLLOW).0,
        }
    }

    /// Records an event and sends it to followers.
    pub fn emit(&self, event: &str, fields: Fields) {
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let seq = ring.next;
        ring.next += 1;
        let json = line(seq, event, &fields);
        let event = Arc::new(Event { seq, json });
        if ring.kept.len() == HISTORY {
            ring.kept.pop_front();
        }
        ring.kept.push_back(event.clone());
        // Under the lock, so followers see events in `seq` order and a subscriber that read
        // the history under it misses none and sees none twice.
        let _ = self.live.send(event);
    }

    /// The kept events after `since` (none for `None`: only what comes next), and a receiver
    /// of every later one.
    pub fn subscribe(
        &self,
        since: Option<u64>,
    ) -> (Vec<Arc<Event>>, broadcast::Receiver<Arc<Event>>) {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let history = match since {
            None => Vec::new(),
            Some(since) => ring
                .kept
                .iter()
                .filter(|e| e.seq > since)
                .cloned()
                .collect(),
        };
        (history, self.live.subscribe())
    }

    /// The `events.skipped` line a follower gets after missing `count` events.
    pub fn skipped(&self, count: u64) -> String {
        let fields = Fields {
            skipped: Some(count),
            ..Fields::default()
        };
        line(0, "events.skipped", &fields)
    }
}

/// One event's JSON line, stamped now.
fn line(seq: u64, event: &str, fields: &Fields) -> String {
    serde_json::to_string(&Envelope {
        v: VERSION,
        seq,
        time: jiff::Timestamp::now().to_string(),
        event,
        fields,
    })
    .expect("events serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_numbered_and_replayed_from_a_sequence_number() {
        let events = Events::new();
        events.emit("host.ready", Fields::default());
        events.emit(
            "instance.up",
            Fields::instance("web.1", "web", 2).because("x"),
        );
        let (history, _) = events.subscribe(Some(1));
        assert_eq!(history.len(), 1);
        let line: serde_json::Value = serde_json::from_str(&history[0].json).unwrap();
        assert_eq!(line["v"], VERSION);
        assert_eq!(line["seq"], 2);
        assert_eq!(line["event"], "instance.up");
        assert_eq!(line["instance"], "web.1");
        assert_eq!(line["type"], "web");
        assert_eq!(line["release"], 2);
        assert!(line.get("exit_code").is_none(), "absent, not null");
        assert!(line["time"].as_str().unwrap().ends_with('Z'));
        assert!(events.subscribe(None).0.is_empty());
        assert_eq!(events.subscribe(Some(0)).0.len(), 2);
    }
}
