//! `wasmform events`: what happens to the running app, as it happens.

use std::io::Write as _;

use anyhow::Result;
use hyper::Method;

use super::client::{AppArgs, Client, Lines, block_on};

/// Stream what happens: instances starting, up, crashed, exited, draining, stopped, pending;
/// health checks passing or failing; scales, restarts, releases; the host listening and
/// stopping.
///
/// With `--json`, one JSON object per line (JSON Lines), each with `v` (the schema version,
/// 1), `seq`, `time` and `event`: the schema is in docs/events.md and only grows. Without
/// it, one readable line per event. The stream ends when the host stops (exit status 0).
///
/// Examples:
///
///   wasmform events --json                   # from now on
///   wasmform events --json --since 0         # every kept event first (the last 10,000)
///   wasmform events --since 41 --no-follow   # what happened after event 41, then exit
#[derive(clap::Args, Debug)]
pub struct EventsCommand {
    /// One JSON object per line (the documented schema) instead of readable lines.
    #[arg(long)]
    json: bool,

    /// Start after the event with this `seq` (0: every event the host kept); default: only
    /// events from now on.
    #[arg(long, value_name = "SEQ")]
    since: Option<u64>,

    /// Print the kept events (after `--since`, default all) and exit instead of following.
    #[arg(long)]
    no_follow: bool,

    #[command(flatten)]
    app: AppArgs,
}

impl EventsCommand {
    /// Streams the events to stdout.
    pub fn execute(self) -> Result<()> {
        let client = Client::new(&self.app)?;
        let mut path = format!("/v1/events?follow={}", !self.no_follow);
        if let Some(since) = self.since {
            path.push_str(&format!("&since={since}"));
        }
        block_on(async move {
            let mut lines = Lines::new(client.call(Method::GET, &path, None).await?);
            let mut out = std::io::stdout();
            while let Some(line) = lines.next().await {
                let line = match line {
                    Ok(line) => line,
                    // The host went away mid-stream: the end of what there is to follow.
                    Err(_) if !self.no_follow => break,
                    Err(e) => return Err(e.into()),
                };
                if self.json {
                    out.write_all(&line)?;
                    out.write_all(b"\n")?;
                } else if let Ok(event) = serde_json::from_slice(&line) {
                    writeln!(out, "{}", readable(&event))?;
                }
                out.flush()?;
            }
            if !self.no_follow {
                eprintln!("wasmform: the host stopped; no more events to follow");
            }
            anyhow::Ok(())
        })?
    }
}

/// `07:40:01 #12 instance.crashed web.1 v2: memory quota exceeded (restart in 1s)`.
fn readable(event: &serde_json::Value) -> String {
    let time = event["time"].as_str().unwrap_or("");
    // RFC 3339: the clock time sits between `T` and the fraction.
    let clock = time
        .split_once('T')
        .map_or(time, |(_, t)| t.split(['.', 'Z']).next().unwrap_or(t));
    let mut line = format!(
        "{clock} #{} {}",
        event["seq"],
        event["event"].as_str().unwrap_or("?")
    );
    if let Some(id) = event["instance"].as_str() {
        line.push_str(&format!(" {id}"));
    } else if let Some(process) = event["type"].as_str() {
        line.push_str(&format!(" {process}"));
    }
    if let Some(release) = event["release"].as_u64() {
        line.push_str(&format!(" v{release}"));
    }
    if let Some(url) = event["url"].as_str() {
        line.push_str(&format!(" {url}"));
    }
    if let Some(formation) = event["formation"].as_object() {
        let counts: Vec<String> = formation
            .iter()
            .map(|(name, scale)| format!("{name}={}", scale["count"]))
            .collect();
        line.push_str(&format!(" {}", counts.join(",")));
    }
    if let Some(reason) = event["reason"].as_str() {
        line.push_str(&format!(": {reason}"));
    }
    if let Some(ms) = event["restart_in_ms"].as_u64() {
        line.push_str(&format!(" (restart in {ms} ms)"));
    }
    if let Some(skipped) = event["skipped"].as_u64() {
        line.push_str(&format!(" {skipped} events"));
    }
    line
}
