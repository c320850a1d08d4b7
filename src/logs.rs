//! The log stream: guest output and host events, one line each, foreman style:
//!
//! ```text
//! 17:02:11 web.1    | hello from web.1, request 1, path /
//! 17:02:11 wasmform | web.1 crashed: memory quota exceeded (256 MiB); restarting now
//! ```
//!
//! Guests write into a [`LogSink`]; complete lines go through a bounded channel to one printer
//! task that owns stdout. When the channel is full (a guest floods its output faster than the
//! terminal takes it) lines are dropped and counted, never buffered without bound, and the
//! printer reports how many were lost. Control characters are escaped before they reach a
//! terminal.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

/// How many lines may wait for the printer before new ones are dropped.
const CHANNEL_CAPACITY: usize = 16 * 1024;

/// The longest line printed; longer lines are cut (with a marker) so one guest cannot make the
/// host hold an unbounded line in memory.
const MAX_LINE: usize = 16 * 1024;

/// Name under which host events are logged.
pub const HOST: &str = "wasmform";

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
    /// Width to which sources are padded so the `|` columns line up.
    width: usize,
}

impl Logs {
    /// Starts the printer task writing to stdout. `width` is the longest source name expected.
    pub fn stdout(width: usize) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let dropped = Arc::new(AtomicU64::new(0));
        let colour = std::io::stdout().is_terminal();
        let width = width.max(HOST.len());
        let printer = tokio::spawn(print(rx, dropped.clone(), width, colour));
        (Self { tx, dropped, width }, printer)
    }

    /// Logs a host event under the name `wasmform`.
    pub fn host(&self, text: impl Into<String>) {
        self.send(Line {
            source: Arc::from(HOST),
            colour: None,
            text: text.into(),
        });
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

    /// The width sources are padded to.
    pub fn width(&self) -> usize {
        self.width
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

async fn print(mut rx: mpsc::Receiver<Line>, dropped: Arc<AtomicU64>, width: usize, colour: bool) {
    let mut buf = String::new();
    let mut batch = Vec::with_capacity(256);
    while rx.recv_many(&mut batch, 256).await > 0 {
        buf.clear();
        let now = jiff::Zoned::now();
        let time = now.strftime("%H:%M:%S");
        let lost = dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            let line = Line {
                source: Arc::from(HOST),
                colour: None,
                text: format!(
                    "{lost} log lines dropped: output arrived faster than it could be written"
                ),
            };
            format_line(&mut buf, &time, &line, width, colour);
        }
        for line in batch.drain(..) {
            format_line(&mut buf, &time, &line, width, colour);
        }
        let mut out = std::io::stdout().lock();
        // A closed stdout (e.g. `wasmform up | head`) must not take the host down.
        let _ = out.write_all(buf.as_bytes()).and_then(|()| out.flush());
    }
}

fn format_line(
    buf: &mut String,
    time: &impl std::fmt::Display,
    line: &Line,
    width: usize,
    colour: bool,
) {
    let code = match line.colour {
        Some(i) => COLOURS[i % COLOURS.len()],
        None => "1",
    };
    if colour {
        let _ = write!(buf, "\x1b[{code}m{time} {:<width$} |\x1b[0m ", line.source);
    } else {
        let _ = write!(buf, "{time} {:<width$} | ", line.source);
    }
    neutralise(buf, &line.text);
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

    #[test]
    fn control_characters_are_escaped() {
        let mut buf = String::new();
        neutralise(&mut buf, "red \x1b[31m text\r\x07");
        assert_eq!(buf, "red \\u{1b}[31m text\\r\\u{7}");
    }

    #[tokio::test]
    async fn sink_splits_lines_across_writes() {
        let (tx, mut rx) = mpsc::channel(16);
        let logs = Logs {
            tx,
            dropped: Arc::default(),
            width: 8,
        };
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
        let logs = Logs {
            tx,
            dropped: Arc::default(),
            width: 8,
        };
        for _ in 0..5 {
            logs.host("x");
        }
        assert_eq!(logs.dropped.load(Ordering::Relaxed), 4);
    }
}
