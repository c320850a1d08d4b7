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
