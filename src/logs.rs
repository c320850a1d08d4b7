//! The log stream: guest output and host events, one line each, foreman style:
//!
//! ```text
//! 17:02:11 web.1    | hello from web.1, request 1, path /
//! 17:02:11 wasmform | web.1 crashed: memory quota exceeded (256 MiB); restarting now
//! ```
//!
//! Guests write into a [`LogSink`]; complete lines go through a bounded channel to one printer
//! task that owns stdout. The printer also keeps the last [`HISTORY`] lines for `wasmform logs`
//! and broadcasts every line to followers (`logs -f`); a follower that falls behind skips
//! lines and is told how many. When the channel is full (a guest floods its output faster than the
//! terminal takes it) lines are dropped and counted, never buffered without bound, and the
//! printer reports how many were lost. Control characters are escaped before they reach a
//! terminal.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use std::collections::VecDeque;

use tokio::sync::{broadcast, mpsc};

/// How many lines may wait for the printer before new ones are dropped.
const CHANNEL_CAPACITY: usize = 16 * 1024;

/// The longest line printed; longer lines are cut (with a marker) so one guest cannot make the
/// host hold an unbounded line in memory.
const MAX_LINE: usize = 16 * 1024;

/// Name under which host events are logged.
pub const HOST: &str = "wasmform";

/// Name under which formation changes are logged, as Heroku's `app[api]`.
pub const API: &str = "wasmform[api]";

/// Lines kept for `wasmform logs`.
pub const HISTORY: usize = 10_000;

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
}

/// The history and the followers, shared between the printer and readers.
struct Shared {
    history: Mutex<VecDeque<Arc<Record>>>,
    follow: broadcast::Sender<Arc<Record>>,
}

/// One line on its way to the printer.
struct Line {
    /// `web.1`, or [`HOST`].
    source: Arc<str>,
    /// Colour index of the process type, `None` for host events.
    colour: Option<usize>,
    text: String,
}

/// Cloneable handle for writing to the log stream.
#[derive(Clone)]
pub struct Logs {
    tx: mpsc::Sender<Line>,
    /// Lines dropped because the printer fell behind, reported and reset by the printer.
    dropped: Arc<AtomicU64>,
    shared: Arc<Shared>,
}

impl Logs {
    /// Starts the printer task writing to stdout. `width` is the longest source name expected.
    pub fn stdout(width: usize) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let dropped = Arc::new(AtomicU64::new(0));
        let colour = std::io::stdout().is_terminal();
        let width = width.max(API.len());
        let shared = Arc::new(Shared {
            history: Mutex::new(VecDeque::with_capacity(1024)),
            follow: broadcast::channel(4096).0,
        });
        // On a blocking thread: a terminal or pipe that stops reading blocks the printer, never
        // a runtime worker; the channel then fills and new lines are dropped and counted.
        let printer = {
            let (dropped, shared) = (dropped.clone(), shared.clone());
            tokio::task::spawn_blocking(move || print(rx, dropped, width, colour, shared))
        };
        (
            Self {
                tx,
                dropped,
                shared,
            },
            printer,
        )
    }

    /// Logs a host event under the name `wasmform`.
    pub fn host(&self, text: impl Into<String>) {
        self.event(HOST, text);
    }

    /// Logs an event under `source` (e.g. [`API`]).
    pub fn event(&self, source: &str, text: impl Into<String>) {
        self.send(Line {
            source: Arc::from(source),
            colour: None,
            text: text.into(),
        });
    }

    /// The last `n` lines, oldest first, from `filter` (a type or instance) if given.
    pub fn recent(&self, n: usize, filter: Option<&str>) -> Vec<Arc<Record>> {
        let history = self
            .shared
            .history
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut lines: Vec<Arc<Record>> = history
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

    /// A sink for one instance's stdout or stderr.
    pub fn sink(&self, source: &str, colour: usize) -> LogSink {
        LogSink {
            logs: self.clone(),
            source: Arc::from(source),
            colour,
            partial: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn send(&self, line: Line) {
        if self.tx.try_send(line).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Collects one instance's output into lines. Cloned into every stream the guest opens, so a
/// line split across writes is still one line.
#[derive(Clone)]
pub struct LogSink {
    logs: Logs,
    source: Arc<str>,
    colour: usize,
    /// Bytes after the last newline, waiting for the rest of their line.
    partial: Arc<Mutex<Vec<u8>>>,
}

impl LogSink {
    /// Takes guest bytes; emits every completed line.
    pub fn write(&self, mut bytes: &[u8]) {
        let mut partial = self.partial.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(pos) = bytes.iter().position(|b| *b == b'\n') {
            partial.extend_from_slice(&bytes[..pos]);
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
        self.logs.send(Line {
            source: self.source.clone(),
            colour: Some(self.colour),
            text: String::from_utf8_lossy(bytes).into_owned(),
        });
    }
}

/// ANSI colours cycled over process types, as foreman does.
const COLOURS: [&str; 6] = ["36", "33", "32", "35", "34", "31"];

fn print(
    mut rx: mpsc::Receiver<Line>,
    dropped: Arc<AtomicU64>,
    width: usize,
    colour: bool,
    shared: Arc<Shared>,
) {
    let mut buf = String::new();
    let mut batch = Vec::with_capacity(256);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < 256 {
            match rx.try_recv() {
                Ok(line) => batch.push(line),
                Err(_) => break,
            }
        }
        buf.clear();
        let time = jiff::Zoned::now().strftime("%H:%M:%S").to_string();
        let lost = dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            batch.insert(
                0,
                Line {
                    source: Arc::from(HOST),
                    colour: None,
                    text: format!(
                        "{lost} log lines dropped: output arrived faster than it could be written"
                    ),
                },
            );
        }
        let mut history = shared.history.lock().unwrap_or_else(|e| e.into_inner());
        for line in batch.drain(..) {
            let mut text = String::with_capacity(line.text.len());
            neutralise(&mut text, &line.text);
            let record = Arc::new(Record {
                time: time.clone(),
                source: line.source,
                text,
            });
            format_line(&mut buf, &record, line.colour, width, colour);
            if history.len() == HISTORY {
                history.pop_front();
            }
            history.push_back(record.clone());
            // No followers is the common case, not an error.
            let _ = shared.follow.send(record);
        }
        drop(history);
        let mut out = std::io::stdout().lock();
        // A closed stdout (e.g. `wasmform up | head`) must not take the host down.
        let _ = out.write_all(buf.as_bytes()).and_then(|()| out.flush());
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

#[cfg(test)]
mod tests {
    use super::*;

    fn test_logs(tx: mpsc::Sender<Line>) -> Logs {
        Logs {
            tx,
            dropped: Arc::default(),
            shared: Arc::new(Shared {
                history: Mutex::default(),
                follow: broadcast::channel(1).0,
            }),
        }
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

    #[tokio::test]
    async fn sink_splits_lines_across_writes() {
        let (tx, mut rx) = mpsc::channel(16);
        let logs = test_logs(tx);
        let sink = logs.sink("web.1", 0);
        sink.write(b"hel");
        sink.write(b"lo\nwor");
        sink.write(b"ld\r\ntail");
        sink.flush();
        let mut got = Vec::new();
        while let Ok(line) = rx.try_recv() {
            got.push(line.text);
        }
        assert_eq!(got, ["hello", "world", "tail"]);
    }

    #[tokio::test]
    async fn full_channel_drops_and_counts() {
        let (tx, _rx) = mpsc::channel(1);
        let logs = test_logs(tx);
        for _ in 0..5 {
            logs.host("x");
        }
        assert_eq!(logs.dropped.load(Ordering::Relaxed), 4);
    }
}
