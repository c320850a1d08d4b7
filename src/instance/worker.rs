//! A background worker: `wasi:cli/run`, awaited until it returns.

use wasmtime_wasi::I32Exit;
use wasmtime_wasi::p2::bindings::CommandPre;

use super::describe;
use crate::runtime::{InstanceSetup, InstanceState, Runtime};

/// Runs a worker to completion and says how it ended (`exited with status 0`, a trap, the
/// memory quota…). Dropping the future stops the worker at its next epoch tick.
pub async fn run_worker(
    runtime: &Runtime,
    pre: &CommandPre<InstanceState>,
    setup: InstanceSetup<'_>,
    started: impl FnOnce(),
) -> Result<(String, bool), String> {
    let memory = setup.memory;
    let mut store = runtime.new_store(setup);
    let command = pre
        .instantiate_async(&mut store)
        .await
        .map_err(|e| describe(&e, &store, memory))?;
    started();
    Ok(match command.wasi_cli_run().call_run(&mut store).await {
        Ok(Ok(())) => ("exited with status 0".to_string(), true),
        Ok(Err(())) => ("exited with status 1".to_string(), false),
        Err(e) => {
            let success = e.downcast_ref::<I32Exit>().is_some_and(|exit| exit.0 == 0);
            (describe(&e, &store, memory), success)
        }
    })
}

/// How a one-off process (`wasmform run`) ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    /// `run` returned (0 or 1) or the guest exited with a status.
    Exited(i32),
    /// Its memory limit refused it memory and it failed.
    OutOfMemory(String),
    /// It trapped or failed otherwise.
    Trapped(String),
    /// It could not be instantiated.
    FailedToStart(String),
}

/// Runs a one-off process to completion. Dropping the future stops it at its next epoch tick.
pub async fn run_command(
    runtime: &Runtime,
    pre: &CommandPre<InstanceState>,
    setup: InstanceSetup<'_>,
) -> RunEnd {
    let memory = setup.memory;
    let mut store = runtime.new_store(setup);
    let command = match pre.instantiate_async(&mut store).await {
        Ok(command) => command,
        Err(e) => return RunEnd::FailedToStart(describe(&e, &store, memory)),
    };
    match command.wasi_cli_run().call_run(&mut store).await {
        Ok(Ok(())) => RunEnd::Exited(0),
        Ok(Err(())) => RunEnd::Exited(1),
        Err(e) => match e.downcast_ref::<I32Exit>() {
            Some(exit) => RunEnd::Exited(exit.0),
            None if super::out_of_memory(&e, &store) => {
                RunEnd::OutOfMemory(describe(&e, &store, memory))
            }
            None => RunEnd::Trapped(describe(&e, &store, memory)),
        },
    }
}
