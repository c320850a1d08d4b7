//! The log stream: guest output and host events, one line each, foreman style:
//!
//! ```text
//! 17:02:11 web.1    | hello from web.1, request 1, path /
//! 17:02:11 wasmform | web.1 crashed: memory quota exceeded (256 MiB); restarting now
//! ```
//!
//! Guests write into a [`LogSink`]; complete lines go through one queue, in order, to one
//! printer task that owns stdout. The printer also keeps recent lines for `wasmform logs`
//! ([`HISTORY`] lines, at most [`HISTORY_BYTES`]) and broadcasts every line to followers
//! (`logs -f`); a follower that falls behind skips lines and is told how many.
//!
//! The queue is bounded per source, not as a whole, so one source flooding it (a guest printing
//! faster than the terminal takes it, or a terminal that stopped reading) only loses its own
//! lines:
//!
//! - each instance may have [`INSTANCE_QUEUE`] bytes queued (its stdout and stderr together),
//!   and all instances together [`GUESTS_QUEUE`]; host, router and API lines have a budget of
//!   their own ([`HOST_QUEUE`]) that no guest can use up;
//! - a line over its budget is dropped and counted for its source; the count is reported once
//!   under that source, where the gap is: `web.1 | … 1234 lines dropped (output faster than the
//!   log can take)`.
//!
//! Memory held by the log stream is therefore bounded whatever guests do: at most
//! [`GUESTS_QUEUE`] + [`HOST_QUEUE`] queued, [`HISTORY_BYTES`] of history, and the followers'
//! ring of [`FOLLOW`] lines of at most [`MAX_LINE`] bytes each (mostly the same lines as the
//! history), plus one partial line of at most [`MAX_LINE`] per instance stream: about 13 MiB.
//! Control characters are escaped before they reach a terminal.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::{broadcast, mpsc};

/// The longest line kept; longer lines are cut (with a marker) so one guest cannot make the
/// host hold a large line in memory.
pub const MAX_LINE: usize = 8 * 1024;

/// Bytes of one instance's lines that may wait for the printer before its new ones are dropped.
pub const INSTANCE_QUEUE: usize = 256 * 1024;

/// Bytes of all instances' lines that may wait for the printer: with many instances flooding
/// at once, this bounds the queue, not the instance count.
pub const GUESTS_QUEUE: usize = 4 * 1024 * 1024;

/// Bytes of host, router and API lines that may wait for the printer; guests cannot use it.
pub const HOST_QUEUE: usize = 1024 * 1024;

/// Lines kept for `wasmform logs`.
pub const HISTORY: usize = 10_000;

/// Bytes of lines kept for `wasmform logs`; older lines go first when either bound is reached.
pub const HISTORY_BYTES: usize = 4 * 1024 * 1024;

/// Lines a follower (`logs -f`) may fall behind before it skips some.
pub const FOLLOW: usize = 512;

/// What a line costs a budget besides its text: the queue entry and the allocation.
const LINE_OVERHEAD: usize = 64;

/// Name under which host events are logged.
pub const HOST: &str = "wasmform";

/// Name under which formation changes are logged, as Heroku's `app[api]`.
pub const API: &str = "wasmform[api]";

/// A printed line, as kept in the history and sent to followers.
#[derive(Debug)]
pub struct Record {
    /// `HH:MM:SS`, local time.
    pub time: String,
    /// `web.1`, [`HOST`] or [`API`].
    pub source: Arc<str>,
    /// The text, control characters already escaped.
    pub text: String,
}

impl Record {
    /// `HH:MM:SS web.1 | text`, without padding or colour.
    pub fn plain(&self) -> String {
        format!("{} {} | {}", self.time, self.source, self.text)
    }

    /// Whether the line comes from `filter`: a type (`web`) or an instance (`web.1`).
    pub fn matches(&self, filter: &str) -> bool {
        let source = &*self.source;
        source == filter
            || source
                .strip_prefix(filter)
                .is_some_and(|rest| rest.starts_with('.'))
    }

    /// Bytes of history this record costs.
    fn cost(&self) -> usize {
        self.text.len() + self.source.len() + LINE_OVERHEAD
    }
}

/// Recent lines, bounded by count and by bytes.
#[derive(Default)]
struct History {
    records: VecDeque<Arc<Record>>,
    /// Sum of the records' [`Record::cost`].
    bytes: usize,
}

impl History {
    fn push(&mut self, record: Arc<Record>) {
        self.bytes += record.cost();
        self.records.push_back(record);
        while self.records.len() > HISTORY || self.bytes > HISTORY_BYTES {
            let Some(old) = self.records.pop_front() else {
                break;
            };
            self.bytes -= old.cost();
        }
    }
}

/// The history and the followers, shared between the printer and readers.
struct Shared {
    history: Mutex<History>,
    follow: broadcast::Sender<Arc<Record>>,
}

/// Bytes queued against a limit.
struct Quota {
    queued: AtomicUsize,
    limit: usize,
}

impl Quota {
    fn new(limit: usize) -> Self {
        Self {
            queued: AtomicUsize::new(0),
            limit,
        }
    }

    fn take(&self, cost: usize) -> bool {
        let before = self.queued.fetch_add(cost, Ordering::AcqRel);
        if before + cost > self.limit {
            self.queued.fetch_sub(cost, Ordering::AcqRel);
            return false;
        }
        true
    }

    fn give(&self, cost: usize) {
        self.queued.fetch_sub(cost, Ordering::AcqRel);
    }
}

/// One source's share of the queue: an instance (both its streams), or the host.
struct Budget {
    /// What is written in front of the lines: `web.1`, or [`HOST`].
    source: Arc<str>,
    /// Colour index of the process type, `None` for the host.
    colour: Option<usize>,
    own: Quota,
    /// The quota shared by all instances; `None` for the host's budget.
    pool: Option<Arc<Quota>>,
    /// Lines refused since the last report.
    dropped: AtomicU64,
    /// Whether a report of `dropped` is in the queue (one at a time, so reports are bounded
    /// too).
    reporting: AtomicBool,
}

impl Budget {
    fn new(
        source: Arc<str>,
        colour: Option<usize>,
        limit: usize,
        pool: Option<Arc<Quota>>,
    ) -> Self {
        Self {
            source,
            colour,
            own: Quota::new(limit),
            pool,
            dropped: AtomicU64::new(0),
            reporting: AtomicBool::new(false),
        }
    }

    /// Reserves room for a line of `cost` bytes.
    fn take(&self, cost: usize) -> bool {
        if !self.own.take(cost) {
            return false;
        }
        if let Some(pool) = &self.pool
            && !pool.take(cost)
        {
            self.own.give(cost);
            return false;
        }
        true
    }

    /// Gives back a line's room once the printer has it.
    fn give(&self, cost: usize) {
        self.own.give(cost);
        if let Some(pool) = &self.pool {
            pool.give(cost);
        }
    }
}

/// What goes through the queue to the printer.
enum Entry {
    /// A line; its `cost` is reserved in its budget until the printer takes it.
    Line {
        budget: Arc<Budget>,
        /// Overrides the budget's source (host events under [`API`]).
        source: Option<Arc<str>>,
        text: String,
        cost: usize,
    },
    /// Lines of this budget were dropped: the printer reports how many, here.
    Dropped(Arc<Budget>),
    /// The host has stopped: print what came before, then end (handles that outlive the
    /// host, such as instances parked in a pool, must not hold the shutdown up).
    Close,
}

/// Cloneable handle for writing to the log stream.
#[derive(Clone)]
pub struct Logs {
    tx: mpsc::UnboundedSender<Entry>,
    /// Host, router and API lines.
    host: Arc<Budget>,
    /// The quota all instances share.
    guests: Arc<Quota>,
    /// Each instance's budget, by name, so its stdout and stderr sinks share one (and one
    /// report); an entry lives as long as a sink or a queued line of it.
    budgets: Arc<Mutex<HashMap<Arc<str>, Weak<Budget>>>>,
    shared: Arc<Shared>,
}

impl Logs {
    /// Starts the printer task writing to stdout. `width` is the longest source name expected.
    pub fn stdout(width: usize) -> (Self, tokio::task::JoinHandle<()>) {
        let (logs, rx) = Self::new();
        let colour = std::io::stdout().is_terminal();
        let width = width.max(API.len());
        // On a blocking thread: a terminal or pipe that stops reading blocks the printer, never
        // a runtime worker; the budgets then fill and new lines are dropped and counted.
        let printer = {
            let shared = logs.shared.clone();
            tokio::task::spawn_blocking(move || print(rx, width, colour, shared))
        };
        (logs, printer)
    }

    /// A log stream that prints and keeps nothing: a one-off's own host, whose process's
    /// output is attached instead.
    pub fn silent() -> Self {
        Self::new().0
    }

    fn new() -> (Self, mpsc::UnboundedReceiver<Entry>) {
        // Unbounded as a channel, bounded by the budgets: nothing is queued without room.
        let (tx, rx) = mpsc::unbounded_channel();
        let logs = Self {
            tx,
            host: Arc::new(Budget::new(Arc::from(HOST), None, HOST_QUEUE, None)),
            guests: Arc::new(Quota::new(GUESTS_QUEUE)),
            budgets: Arc::default(),
            shared: Arc::new(Shared {
                history: Mutex::default(),
                follow: broadcast::channel(FOLLOW).0,
            }),
        };
        (logs, rx)
    }

    /// Ends the printer once every line sent before this one is printed.
    pub fn close(&self) {
        let _ = self.tx.send(Entry::Close);
    }

    /// Logs a host event under the name `wasmform`.
    pub fn host(&self, text: impl Into<String>) {
        self.send(&self.host, None, text.into());
    }

    /// Logs an event under `source` (e.g. [`API`]).
    pub fn event(&self, source: &str, text: impl Into<String>) {
        let source = (source != HOST).then(|| Arc::from(source));
        self.send(&self.host, source, text.into());
    }

    /// The last `n` lines, oldest first, from `filter` (a type or instance) if given.
    pub fn recent(&self, n: usize, filter: Option<&str>) -> Vec<Arc<Record>> {
        let history = self
            .shared
            .history
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut lines: Vec<Arc<Record>> = history
            .records
            .iter()
            .rev()
            .filter(|r| filter.is_none_or(|f| r.matches(f)))
            .take(n)
            .cloned()
            .collect();
        lines.reverse();
        lines
    }

    /// Every line printed from now on.
    pub fn follow(&self) -> broadcast::Receiver<Arc<Record>> {
        self.shared.follow.subscribe()
    }

    /// A sink for one instance's stdout or stderr. The sinks of one instance name share its
    /// budget.
    pub fn sink(&self, source: &str, colour: usize) -> LogSink {
        let mut budgets = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
        let budget = match budgets.get(source).and_then(Weak::upgrade) {
            Some(budget) => budget,
            None => {
                budgets.retain(|_, b| b.strong_count() > 0);
                let budget = Arc::new(Budget::new(
                    Arc::from(source),
                    Some(colour),
                    INSTANCE_QUEUE,
                    Some(self.guests.clone()),
                ));
                budgets.insert(budget.source.clone(), Arc::downgrade(&budget));
                budget
            }
        };
        LogSink {
            logs: self.clone(),
            budget,
            partial: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Queues `text` against `budget`, or drops and counts it (and queues a report of the
    /// drops if none is queued).
    fn send(&self, budget: &Arc<Budget>, source: Option<Arc<str>>, text: String) {
        let cost = text.len() + LINE_OVERHEAD;
        if budget.take(cost) {
            let line = Entry::Line {
                budget: budget.clone(),
                source,
                text,
                cost,
            };
            if let Err(mpsc::error::SendError(Entry::Line { budget, cost, .. })) =
                self.tx.send(line)
            {
                // The printer is gone (shutting down): nothing is queued.
                budget.give(cost);
            }
            return;
        }
        budget.dropped.fetch_add(1, Ordering::AcqRel);
        if !budget.reporting.swap(true, Ordering::AcqRel) {
            let _ = self.tx.send(Entry::Dropped(budget.clone()));
        }
    }
}

/// Collects one instance's output into lines. Cloned into every stream the guest opens, so a
/// line split across writes is still one line.
#[derive(Clone)]
pub struct LogSink {
    logs: Logs,
    /// The instance's budget (and name and colour), shared with its other stream.
    budget: Arc<Budget>,
    /// Bytes after the last newline, waiting for the rest of their line.
    partial: Arc<Mutex<Vec<u8>>>,
}

impl LogSink {
    /// Takes guest bytes; emits every completed line.
    pub fn write(&self, mut bytes: &[u8]) {
        let mut partial = self.partial.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(pos) = bytes.iter().position(|b| *b == b'\n') {
            // A line is cut at MAX_LINE even when it ends in this write.
            let room = MAX_LINE.saturating_sub(partial.len());
            partial.extend_from_slice(&bytes[..pos.min(room)]);
            if pos > room {
                partial.extend_from_slice(" [line truncated]".as_bytes());
            }
            self.emit(&partial);
            partial.clear();
            bytes = &bytes[pos + 1..];
        }
        let room = MAX_LINE.saturating_sub(partial.len());
        partial.extend_from_slice(&bytes[..bytes.len().min(room)]);
        if partial.len() >= MAX_LINE {
            partial.extend_from_slice(" [line truncated]".as_bytes());
            self.emit(&partial);
            partial.clear();
        }
    }

    /// Emits a trailing partial line, e.g. when the instance stops.
    pub fn flush(&self) {
        let mut partial = self.partial.lock().unwrap_or_else(|e| e.into_inner());
        if !partial.is_empty() {
            self.emit(&partial);
            partial.clear();
        }
    }

    fn emit(&self, bytes: &[u8]) {
        let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
        let text = String::from_utf8_lossy(bytes).into_owned();
        self.logs.send(&self.budget, None, text);
    }
}

/// ANSI colours cycled over process types, as foreman does.
const COLOURS: [&str; 6] = ["36", "33", "32", "35", "34", "31"];

/// Takes one entry off the queue, giving back its room: the source, colour and text to print,
/// or `None` for a drop report with nothing left to report.
fn receive(entry: Entry) -> Option<(Arc<str>, Option<usize>, String)> {
    match entry {
        Entry::Line {
            budget,
            source,
            text,
            cost,
        } => {
            budget.give(cost);
            let source = source.unwrap_or_else(|| budget.source.clone());
            Some((source, budget.colour, text))
        }
        Entry::Dropped(budget) => {
            // Cleared first: a drop counted after the swap below queues a report of its own.
            budget.reporting.store(false, Ordering::Release);
            let lost = budget.dropped.swap(0, Ordering::AcqRel);
            (lost > 0).then(|| {
                let text = format!("… {lost} lines dropped (output faster than the log can take)");
                (budget.source.clone(), budget.colour, text)
            })
        }
        Entry::Close => None,
    }
}

/// How long the printer lets lines gather after the first one wakes it.
const LINGER: std::time::Duration = std::time::Duration::from_millis(2);

/// Most lines printed with one `write`.
const BATCH: usize = 1024;

fn print(mut rx: mpsc::UnboundedReceiver<Entry>, width: usize, colour: bool, shared: Arc<Shared>) {
    let mut buf = String::new();
    let mut batch = Vec::with_capacity(BATCH);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        // Under load lines come in a stream (the router writes one per request): waiting a
        // moment lets it gather, so one `write` and one wake-up of this thread serve many
        // lines instead of each line its own. A lone line is printed [`LINGER`] late.
        std::thread::sleep(LINGER);
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(entry) => batch.push(entry),
                Err(_) => break,
            }
        }
        let closing = batch.iter().position(|e| matches!(e, Entry::Close));
        if let Some(end) = closing {
            batch.truncate(end);
        }
        buf.clear();
        let time = jiff::Zoned::now().strftime("%H:%M:%S").to_string();
        let mut history = shared.history.lock().unwrap_or_else(|e| e.into_inner());
        for (source, code, line) in batch.drain(..).filter_map(receive) {
            let mut text = String::with_capacity(line.len());
            neutralise(&mut text, &line);
            let record = Arc::new(Record {
                time: time.clone(),
                source,
                text,
            });
            format_line(&mut buf, &record, code, width, colour);
            history.push(record.clone());
            // No followers is the common case, not an error.
            let _ = shared.follow.send(record);
        }
        drop(history);
        let mut out = std::io::stdout().lock();
        // A closed stdout (e.g. `wasmform up | head`) must not take the host down.
        let _ = out.write_all(buf.as_bytes()).and_then(|()| out.flush());
        if closing.is_some() {
            return;
        }
    }
}

fn format_line(buf: &mut String, record: &Record, code: Option<usize>, width: usize, colour: bool) {
    let time = &record.time;
    let source = &record.source;
    if colour {
        let code = code.map_or("1", |i| COLOURS[i % COLOURS.len()]);
        let _ = write!(buf, "\x1b[{code}m{time} {source:<width$} |\x1b[0m ");
    } else {
        let _ = write!(buf, "{time} {source:<width$} | ");
    }
    buf.push_str(&record.text);
    buf.push('\n');
}

/// Appends `text` with control characters (escape sequences, carriage returns, backspaces…)
/// made visible, so guest output cannot rewrite the operator's terminal.
fn neutralise(buf: &mut String, text: &str) {
    for c in text.chars() {
        if c.is_control() && c != '\t' {
            let _ = write!(buf, "{}", c.escape_default());
        } else {
            buf.push(c);
        }
    }
}

/// Lets a repeated line through at most once a second, saying how many there were since the
/// last one: a client that causes refusals at will cannot flood the log.
#[derive(Debug, Default)]
pub struct Throttle {
    since: u64,
    last: Option<std::time::Instant>,
}

impl Throttle {
    /// Counts one occurrence; `Some(n)`: write the line now, for the `n` since the last one.
    pub fn admit(&mut self) -> Option<u64> {
        self.since += 1;
        if self
            .last
            .is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(1))
        {
            return None;
        }
        self.last = Some(std::time::Instant::now());
        Some(std::mem::take(&mut self.since))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Everything queued so far, as the printer would print it: `source | text`.
    fn drain(rx: &mut mpsc::UnboundedReceiver<Entry>) -> Vec<String> {
        let mut got = Vec::new();
        while let Ok(entry) = rx.try_recv() {
            if let Some((source, _, text)) = receive(entry) {
                got.push(format!("{source} | {text}"));
            }
        }
        got
    }

    #[test]
    fn record_filters() {
        let record = Record {
            time: "12:00:00".into(),
            source: Arc::from("web.12"),
            text: "hi".into(),
        };
        assert!(record.matches("web"));
        assert!(record.matches("web.12"));
        assert!(!record.matches("web.1"));
        assert!(!record.matches("we"));
        assert_eq!(record.plain(), "12:00:00 web.12 | hi");
    }

    #[test]
    fn control_characters_are_escaped() {
        let mut buf = String::new();
        neutralise(&mut buf, "red \x1b[31m text\r\x07");
        assert_eq!(buf, "red \\u{1b}[31m text\\r\\u{7}");
    }

    #[test]
    fn sink_splits_lines_across_writes() {
        let (logs, mut rx) = Logs::new();
        let sink = logs.sink("web.1", 0);
        sink.write(b"hel");
        sink.write(b"lo\nwor");
        sink.write(b"ld\r\ntail");
        sink.flush();
        assert_eq!(
            drain(&mut rx),
            ["web.1 | hello", "web.1 | world", "web.1 | tail"]
        );
    }

    #[test]
    fn a_flooding_instance_loses_only_its_own_lines_and_says_how_many() {
        let (logs, mut rx) = Logs::new();
        let flood = logs.sink("web.1", 0);
        let quiet = logs.sink("web.2", 0);
        let line = "x".repeat(1000);
        let fits = INSTANCE_QUEUE / (line.len() + LINE_OVERHEAD);
        for _ in 0..fits + 500 {
            flood.write(format!("{line}\n").as_bytes());
        }
        quiet.write(b"still here\n");
        logs.host("host event");
        logs.event(API, "api event");
        let got = drain(&mut rx);
        assert_eq!(got.len(), fits + 4, "{:?}", &got[fits..]);
        assert!(got[..fits].iter().all(|l| l.starts_with("web.1 | xxx")));
        assert_eq!(
            got[fits..],
            [
                "web.1 | … 500 lines dropped (output faster than the log can take)",
                "web.2 | still here",
                "wasmform | host event",
                "wasmform[api] | api event",
            ]
        );
        // Room again once the printer took the lines; a new flood gets a report of its own.
        flood.write(b"back\n");
        assert_eq!(drain(&mut rx), ["web.1 | back"]);
        for _ in 0..fits + 3 {
            flood.write(format!("{line}\n").as_bytes());
        }
        assert_eq!(
            drain(&mut rx).last().unwrap(),
            "web.1 | … 3 lines dropped (output faster than the log can take)"
        );
    }

    #[test]
    fn an_instances_streams_share_one_budget() {
        let (logs, mut rx) = Logs::new();
        let (stdout, stderr) = (logs.sink("web.1", 0), logs.sink("web.1", 0));
        let line = "y".repeat(1000);
        let fits = INSTANCE_QUEUE / (line.len() + LINE_OVERHEAD);
        for _ in 0..fits {
            stdout.write(format!("{line}\n").as_bytes());
        }
        stderr.write(format!("{line}\n").as_bytes());
        assert_eq!(
            drain(&mut rx).last().unwrap(),
            "web.1 | … 1 lines dropped (output faster than the log can take)"
        );
    }

    #[test]
    fn many_flooding_instances_are_bounded_together() {
        let (logs, mut rx) = Logs::new();
        let line = format!("{}\n", "z".repeat(MAX_LINE - 1));
        for i in 0..2 * GUESTS_QUEUE / INSTANCE_QUEUE {
            let sink = logs.sink(&format!("web.{i}"), 0);
            for _ in 0..2 * INSTANCE_QUEUE / line.len() {
                sink.write(line.as_bytes());
            }
        }
        assert!(logs.guests.queued.load(Ordering::Acquire) <= GUESTS_QUEUE);
        logs.host("host event");
        let got = drain(&mut rx);
        assert_eq!(got.last().unwrap(), "wasmform | host event");
        assert_eq!(logs.guests.queued.load(Ordering::Acquire), 0);
    }

    #[test]
    fn a_host_flood_is_bounded_and_reported_under_the_host() {
        let (logs, mut rx) = Logs::new();
        let sink = logs.sink("web.1", 0);
        let fits = HOST_QUEUE / ("h".len() + LINE_OVERHEAD);
        for _ in 0..fits + 2 {
            logs.host("h");
        }
        sink.write(b"guest\n");
        let got = drain(&mut rx);
        assert_eq!(
            got[fits..],
            [
                "wasmform | … 2 lines dropped (output faster than the log can take)",
                "web.1 | guest",
            ]
        );
    }

    #[test]
    fn long_lines_are_cut_and_history_is_bounded_in_bytes() {
        let (logs, mut rx) = Logs::new();
        let sink = logs.sink("web.1", 0);
        sink.write(&vec![b'a'; 3 * MAX_LINE]);
        let got = drain(&mut rx);
        assert_eq!(got.len(), 1);
        assert!(got[0].ends_with("a [line truncated]"));
        assert!(got[0].len() < MAX_LINE + 64);
        // Also when the long line ends in the same write.
        let mut long = vec![b'b'; 3 * MAX_LINE];
        long.extend_from_slice(b"\nshort\n");
        sink.write(&long);
        let got = drain(&mut rx);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].ends_with("b [line truncated]"));
        assert!(got[0].len() < MAX_LINE + 64);
        assert_eq!(got[1], "web.1 | short");

        let mut history = History::default();
        for _ in 0..2 * HISTORY_BYTES / MAX_LINE {
            history.push(Arc::new(Record {
                time: "12:00:00".into(),
                source: Arc::from("web.1"),
                text: "b".repeat(MAX_LINE),
            }));
        }
        assert!(history.bytes <= HISTORY_BYTES);
        assert_eq!(
            history.bytes,
            history.records.iter().map(|r| r.cost()).sum::<usize>()
        );
        for _ in 0..2 * HISTORY {
            history.push(Arc::new(Record {
                time: "12:00:00".into(),
                source: Arc::from("web.1"),
                text: "c".into(),
            }));
        }
        assert_eq!(history.records.len(), HISTORY);
    }
}
