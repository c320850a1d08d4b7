//! A command: `wasi:cli/run`, awaited until it returns (a background worker, or a one-off
//! process of `wasmform run`).

use wasmtime_wasi::I32Exit;
use wasmtime_wasi::p2::bindings::CommandPre;

use super::describe;
use crate::runtime::{InstanceSetup, InstanceState, Runtime};

/// How a command (a worker, or a one-off process of `wasmform run`) ended.
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

impl RunEnd {
    /// Its exit status, if it exited with one.
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            RunEnd::Exited(code) => Some(*code),
            _ => None,
        }
    }

    /// As the log says it: `exited with status 3`, `wasm trap: …`.
    pub fn reason(&self) -> String {
        match self {
            RunEnd::Exited(code) => format!("exited with status {code}"),
            RunEnd::FailedToStart(why) => format!("failed to start: {why}"),
            RunEnd::Trapped(why) | RunEnd::OutOfMemory(why) => why.clone(),
        }
    }
}

/// Runs `wasi:cli/run` to completion; `started` is called once it is instantiated. Dropping
/// the future stops it at its next epoch tick.
pub async fn run_command(
    runtime: &Runtime,
    pre: &CommandPre<InstanceState>,
    setup: InstanceSetup<'_>,
    started: impl FnOnce(),
) -> RunEnd {
    let memory = setup.memory;
    let mut store = runtime.new_store(setup);
    let command = match pre.instantiate_async(&mut store).await {
        Ok(command) => command,
        Err(e) => return RunEnd::FailedToStart(describe(&e, &store, memory)),
    };
    started();
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
