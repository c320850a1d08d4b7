//! Compiling an app's components: all at once, in parallel, within a deadline, and each
//! checked against the settings its type was given.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use super::{Compiled, Kind, Runtime};
use crate::app::ProcessSpec;
use crate::units::humanize;

/// Compiles every `(type, file)` in parallel, one thread each, and checks each component's
/// world. A compile that outlives `timeout` is refused (its thread is abandoned: wasmtime
/// cannot cancel a compile). Blocking: call it off the async runtime.
pub fn compile_all(
    runtime: &Arc<Runtime>,
    work: &[(ProcessSpec, PathBuf)],
    timeout: Duration,
) -> Result<Vec<(Compiled, Duration)>> {
    let deadline = Instant::now() + timeout;
    let pending: Vec<_> = work
        .iter()
        .map(|(spec, file)| {
            let (tx, rx) = std::sync::mpsc::channel();
            let (runtime, spec, file) = (runtime.clone(), spec.clone(), file.clone());
            std::thread::spawn(move || {
                let started = Instant::now();
                let _ = tx.send(
                    runtime
                        .compile(&spec, &file)
                        .map(|c| (c, started.elapsed())),
                );
            });
            rx
        })
        .collect();
    let mut compiled = Vec::new();
    for ((spec, _), rx) in work.iter().zip(pending) {
        let left = deadline.saturating_duration_since(Instant::now());
        compiled.push(match rx.recv_timeout(left) {
            Ok(Ok((c, took))) => {
                if let Some(error) = misplaced_setting(spec, &c) {
                    bail!(error);
                }
                (c, took)
            }
            Ok(Err(e)) => return Err(e),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => bail!(
                "process type `{}` ({}): component `{}` took longer than {} to compile: \
                 raise `--compile-timeout` if it is meant to be this big",
                spec.name,
                spec.origin,
                spec.component.display(),
                humanize(timeout)
            ),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                bail!("the compile thread for `{}` panicked", spec.name)
            }
        });
    }
    Ok(compiled)
}

/// A setting of `spec` that its compiled component's kind does not take, as the error to
/// report at the key that set it.
fn misplaced_setting(spec: &ProcessSpec, compiled: &Compiled) -> Option<String> {
    let file = spec.component.display();
    let consumer = matches!(compiled.kind, Kind::Consumer(_));
    let background = matches!(compiled.kind, Kind::Command(_));
    let kind = compiled.kind_name();
    if !compiled.is_http()
        && let Some((key, _)) = [
            ("health", spec.health.is_some()),
            ("max_requests", spec.max_requests.is_some()),
        ]
        .into_iter()
        .find(|(_, set)| *set)
    {
        return Some(format!(
            "{}: `{file}` is a {} process (it exports {}): `health` and `max_requests` apply to HTTP process types only; remove them",
            spec.origin_of(key),
            if consumer {
                "queue consumer"
            } else {
                "background"
            },
            if consumer {
                "`wasmform:host/consumer`"
            } else {
                "`wasi:cli/run`"
            },
        ));
    }
    if background && spec.set_at.contains_key("request_timeout") {
        return Some(format!(
            "{}: `{file}` is a background process (it exports `wasi:cli/run`), which serves no requests: `request_timeout` applies to HTTP types and queue consumers; remove it",
            spec.origin_of("request_timeout")
        ));
    }
    if consumer && spec.consume.is_none() {
        return Some(format!(
            "process type `{}` ({}): `{file}` is a queue consumer (it exports `wasmform:host/consumer`) but names no queue: add `consume = \"jobs\"` to `[processes.{}]` in wasmform.toml",
            spec.name, spec.origin, spec.name
        ));
    }
    if !consumer && spec.consume.is_some() {
        return Some(format!(
            "{}: `consume` needs a queue consumer, but `{file}` is a {kind} process (a consumer exports `wasmform:host/consumer`)",
            spec.origin_of("consume")
        ));
    }
    if !consumer && spec.set_at.contains_key("max_attempts") {
        return Some(format!(
            "{}: `{file}` is a {kind} process: `max_attempts` applies to queue consumers only (deliveries of a message); remove it",
            spec.origin_of("max_attempts")
        ));
    }
    None
}
