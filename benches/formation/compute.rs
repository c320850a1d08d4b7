//! A CPU-bound guest: `test-worker compute` (a sieve over 16 Mi numbers, only guest loads and
//! stores) run to its end by `wasmform run` and by `wasmtime run`, with and without a timeout
//! (epoch interruption, which wasmform always has on).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::which;

/// Sieve rounds: about a second of guest time here, so start-up is a small part of each run.
const ROUNDS: &str = "6";

/// Rounds of the interleaved runs: this VM's speed drifts by tens of percent within seconds,
/// so every runner runs once per round, and each one's mean is reported.
const ROUNDS_OF_RUNS: usize = 12;

/// The row the others are compared with: wasmtime with epoch interruption, as wasmform runs.
const TIMEOUT_ROW: &str = "wasmtime run -W timeout=60s";

/// Wall-clock time of `command`, which must succeed.
fn time(command: &mut Command) -> Duration {
    let started = Instant::now();
    let output = command
        .stdin(Stdio::null())
        .output()
        .expect("failed to start");
    assert!(output.status.success(), "{output:?}");
    started.elapsed()
}

pub fn rows(guests: &Path) {
    println!(
        "## CPU-bound guest: test-worker compute {ROUNDS} (sieve of 16 Mi numbers), run to its end, mean of {ROUNDS_OF_RUNS} interleaved runs"
    );
    println!(
        "{:<52} {:>10} {:>12}",
        "runner", "wall", "vs wasmtime run -W timeout"
    );
    let component = guests.join("test-worker.wasm");
    let dir = tempfile::tempdir().unwrap();
    let mut runners: Vec<(String, Command)> = Vec::new();
    if let Some(wasmtime) = which("wasmtime") {
        for (name, extra) in [
            ("wasmtime run", &[][..]),
            (TIMEOUT_ROW, &["-W", "timeout=60s"][..]),
        ] {
            let mut command = Command::new(&wasmtime);
            command
                .arg("run")
                .args(extra)
                .arg(&component)
                .args(["compute", ROUNDS]);
            runners.push((name.to_string(), command));
        }
    }
    let mut ours = Command::new(env!("CARGO_BIN_EXE_wasmform"));
    ours.current_dir(dir.path())
        .arg("run")
        .arg(&component)
        .args(["--memory", "64MiB", "--", "compute", ROUNDS]);
    runners.push(("wasmform run (a host of its own)".into(), ours));
    // Once each first, so that every compile cache is warm.
    for (_, command) in &mut runners {
        time(command);
    }
    let mut times = vec![Vec::new(); runners.len()];
    for _ in 0..ROUNDS_OF_RUNS {
        for (i, (_, command)) in runners.iter_mut().enumerate() {
            times[i].push(time(command));
        }
    }
    let means: Vec<Duration> = times
        .into_iter()
        .map(|t| t.iter().sum::<Duration>() / t.len() as u32)
        .collect();
    let base = runners
        .iter()
        .position(|(name, _)| name == TIMEOUT_ROW)
        .map(|i| means[i]);
    for ((name, _), time) in runners.iter().zip(&means) {
        let ratio = base.map_or("-".into(), |b| {
            format!("{:.2}×", b.as_secs_f64() / time.as_secs_f64())
        });
        println!(
            "{name:<52} {:>10} {ratio:>12}",
            format!("{:.0} ms", time.as_secs_f64() * 1e3)
        );
    }
    match base {
        Some(base) => {
            let ours = means.last().expect("wasmform's row");
            let slower = ours.as_secs_f64() / base.as_secs_f64() - 1.0;
            println!(
                "{:<52} {:>10}  target ≤ 10 %  {}",
                "wasmform run slower than wasmtime run -W timeout",
                format!("{:.0} %", slower * 100.0),
                if slower <= 0.10 { "met" } else { "NOT met" }
            );
        }
        None => println!("wasmtime run rows skipped: no `wasmtime` binary on PATH"),
    }
}
