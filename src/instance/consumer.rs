//! A queue consumer: `wasmform:host/consumer`'s `handle`, one message at a time.

use std::time::Duration;

use wasmtime::Store;

use super::describe;
use crate::app::ByteSize;
use crate::runtime::{InstanceSetup, InstanceState, Runtime};

/// `wasmform:host/consumer.handle`: `(queue, body) -> result<_, string>`.
type HandleFn = wasmtime::component::TypedFunc<(String, Vec<u8>), (Result<(), String>,)>;

/// A live queue consumer instance: handles one message at a time.
pub struct Consumer {
    store: Store<InstanceState>,
    handle: HandleFn,
    memory: ByteSize,
}

/// How one delivery went.
pub enum Delivery {
    /// `handle` returned `ok`: acknowledge.
    Done,
    /// `handle` returned `err(text)`: redeliver; the instance is fine.
    Failed(String),
    /// It trapped, ran out of memory or time: redeliver; the instance is gone.
    Crashed(String),
}

impl Consumer {
    /// Instantiates a consumer.
    pub async fn start(
        runtime: &Runtime,
        pre: &crate::runtime::ConsumerPre,
        setup: InstanceSetup<'_>,
    ) -> anyhow::Result<Self> {
        let memory = setup.memory;
        let mut store = runtime.new_store(setup);
        let instance = match pre.pre.instantiate_async(&mut store).await {
            Ok(instance) => instance,
            Err(e) => return Err(anyhow::anyhow!(describe(&e, &store, memory))),
        };
        let handle = instance
            .get_typed_func(&mut store, pre.handle)
            .map_err(|e| {
                anyhow::anyhow!(
                    "`wasmform:host/consumer.handle` has the wrong signature: {e}; build the component against wit/world.wit"
                )
            })?;
        Ok(Self {
            store,
            handle,
            memory,
        })
    }

    /// Delivers one message; at most `timeout` long.
    pub async fn deliver(&mut self, queue: &str, body: Vec<u8>, timeout: Duration) -> Delivery {
        // As for requests: yield only if the call runs into the next tick.
        self.store.set_epoch_deadline(1);
        let call = self
            .handle
            .call_async(&mut self.store, (queue.to_string(), body));
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok((Ok(()),))) => Delivery::Done,
            Ok(Ok((Err(text),))) => Delivery::Failed(text),
            Ok(Err(e)) => Delivery::Crashed(describe(&e, &self.store, self.memory)),
            Err(_) => Delivery::Crashed(format!(
                "handling a message took longer than {}",
                crate::units::humanize(timeout)
            )),
        }
    }
}
