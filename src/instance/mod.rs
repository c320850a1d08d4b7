//! One running instance in its own `Store`: a web instance serving requests one at a time
//! (`web.rs`), a worker running `wasi:cli/run` (`worker.rs`), or a queue consumer
//! (`consumer.rs`). A trapped instance is dropped, never entered again.

mod consumer;
mod web;
mod worker;

use wasmtime::Store;
use wasmtime_wasi::I32Exit;

pub use self::consumer::{Consumer, Delivery};
pub use self::web::{
    Exit, Failure, Reply, ResponseBody, Reuse, WebInstance, WebSettings, text_body,
};
pub use self::worker::{RunEnd, run_command};
use crate::app::ByteSize;
use crate::runtime::{Compiled, InstanceSetup, InstanceState, Kind, Runtime};

/// Instantiates `compiled` once and drops it: checks that the component starts with the
/// limits in `setup` (e.g. a new memory limit) without running any of its exports.
pub async fn probe(
    runtime: &Runtime,
    compiled: &Compiled,
    setup: InstanceSetup<'_>,
) -> Result<(), String> {
    let memory = setup.memory;
    let mut store = runtime.new_store(setup);
    let result = match &compiled.kind {
        Kind::Http(pre) => pre.instantiate_async(&mut store).await.map(drop),
        Kind::Command(pre) => pre.instantiate_async(&mut store).await.map(drop),
        Kind::Consumer(consumer) => consumer.pre.instantiate_async(&mut store).await.map(drop),
    };
    result.map_err(|e| describe(&e, &store, memory))
}

/// Whether a guest failure is its memory limit: the limiter refused it memory, and it did not
/// exit on its own. [`describe`] words the failure by the same test.
pub(crate) fn out_of_memory(err: &wasmtime::Error, store: &Store<InstanceState>) -> bool {
    err.downcast_ref::<I32Exit>().is_none() && store.data().limiter.denied().is_some()
}

/// Turns a guest failure into the reason users read in the log.
pub(crate) fn describe(
    err: &wasmtime::Error,
    store: &Store<InstanceState>,
    memory: ByteSize,
) -> String {
    if let Some(exit) = err.downcast_ref::<I32Exit>() {
        return format!("exited with status {}", exit.0);
    }
    if out_of_memory(err, store) {
        return format!("memory quota exceeded ({memory})");
    }
    if let Some(trap) = err.downcast_ref::<wasmtime::Trap>() {
        return trap.to_string();
    }
    cause_chain(err)
}

/// Every message of `err`'s chain, outermost first, joined by `: ` (`error while executing:
/// total size of fields exceeds limit`), without the wasm backtrace a context lists after its
/// first line.
fn cause_chain(err: &wasmtime::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        let text = cause.to_string();
        let first = text.lines().next().unwrap_or("").trim_end();
        let first = first
            .strip_suffix(" at wasm backtrace:")
            .or_else(|| first.strip_suffix(':'))
            .unwrap_or(first)
            .trim();
        if !first.is_empty() && parts.last().is_none_or(|last| last != first) {
            parts.push(first.to_string());
        }
    }
    if parts.is_empty() {
        return "unknown error".to_string();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use wasmtime::error::Context as _;

    use super::cause_chain;

    #[test]
    fn a_reason_keeps_the_cause_chain_without_the_backtrace() {
        let err = Err::<(), _>(wasmtime::format_err!("total size of fields exceeds limit"))
            .context("error while executing at wasm backtrace:\n    0:  0x1234 - handler")
            .unwrap_err();
        assert_eq!(
            cause_chain(&err),
            "error while executing: total size of fields exceeds limit"
        );
    }
}
