//! Guest access to the shared store ([`crate::shared`]): `wasi:keyvalue@0.2.0-draft` (store,
//! atomics, batch), `wasmform:host/cas` and `wasmform:host/queue`. A type opens only the
//! buckets and enqueues only to the queues its manifest entry lists; anything else is
//! `access-denied`. Store failures reach the guest as `other(text)`, never as a trap.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

use crate::logs::Logs;
use crate::shared::Store;

mod generated {
    wasmtime::component::bindgen!({
        path: "wit",
        world: "wasmform:host/shared-state",
        imports: { default: async | trappable },
        with: {
            "wasi:keyvalue/store.bucket": super::Bucket,
        },
        require_store_data_send: true,
    });
}

use generated::wasi::keyvalue::{atomics, batch, store};
use generated::wasmform::host::{cas, queue};

/// An open bucket.
pub struct Bucket {
    name: String,
}

/// What one process type may use of the shared store.
#[derive(Clone, Default)]
pub struct SharedCtx {
    /// The app's store; `None` in hosts built without one (every open then fails).
    pub store: Option<Store>,
    /// Buckets the type lists.
    pub buckets: Arc<[String]>,
    /// Queues the type may enqueue to.
    pub queues: Arc<[String]>,
    /// Says in the log what to add when the type is denied one (`None`: nothing logged).
    pub denied: Option<Arc<Denied>>,
}

/// Logs the first denial of each bucket or queue that a type's manifest entry does not list,
/// with the line to add: least privilege (as Spin's `key_value_stores`), but not in silence.
pub struct Denied {
    process: String,
    logs: Logs,
    /// (`buckets`, `queues` or a socket use, name or address) already logged.
    seen: Mutex<BTreeSet<(&'static str, String)>>,
}

/// Distinct denials logged per type version; a guest trying names in a loop stays quiet after.
const DENIALS_LOGGED: usize = 32;

impl Denied {
    pub fn new(process: &str, logs: Logs) -> Self {
        Self {
            process: process.to_string(),
            logs,
            seen: Mutex::default(),
        }
    }

    /// The type's name.
    pub fn process(&self) -> &str {
        &self.process
    }

    /// Whether the denial of `name` under `key` is news; at most [`DENIALS_LOGGED`] are.
    fn first(&self, key: &'static str, name: String) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.len() < DENIALS_LOGGED && seen.insert((key, name))
    }

    /// Logs `line` the first time a socket use (`what`: `tcp 10.0.0.5:5432`) is denied.
    pub fn report_once(&self, what: String, line: String) {
        if self.first("sockets", what) {
            self.logs.host(line);
        }
    }

    /// Reports that `name` was denied; `key` is the manifest key (`buckets`, `queues`) and
    /// `listed` what it lists now.
    fn report(&self, key: &'static str, name: &str, listed: &[String]) {
        if !self.first(key, name.to_string()) {
            return;
        }
        let what = if key == "buckets" { "bucket" } else { "queue" };
        let list = listed
            .iter()
            .map(String::as_str)
            .chain([name])
            .map(|n| format!("{n:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let process = &self.process;
        self.logs.host(format!(
            "process type `{process}` was denied {what} `{name}`, which its entry in wasmform.toml does not list: add `{key} = [{list}]` under [processes.{process}]"
        ));
    }
}

impl SharedCtx {
    fn deny(&self, key: &'static str, name: &str) {
        if let Some(denied) = &self.denied {
            let listed = if key == "buckets" {
                &self.buckets
            } else {
                &self.queues
            };
            denied.report(key, name, listed);
        }
    }
}

/// The borrowed state the host functions work on.
pub struct SharedView<'a> {
    pub(crate) ctx: &'a SharedCtx,
    pub(crate) table: &'a mut ResourceTable,
}

type Kv<T> = wasmtime::Result<Result<T, store::Error>>;

impl SharedView<'_> {
    fn bucket(&self, bucket: &Resource<Bucket>) -> Result<(Store, String), store::Error> {
        let name = self
            .table
            .get(bucket)
            .map_err(|e| store::Error::Other(e.to_string()))?
            .name
            .clone();
        let store = self.ctx.store.clone().ok_or(store::Error::NoSuchStore)?;
        Ok((store, name))
    }
}

/// Runs `f` on the bucket's store, mapping store failures to `other`.
macro_rules! on_bucket {
    ($self:ident, $bucket:expr, |$store:ident, $name:ident| $body:expr) => {{
        let ($store, $name) = match $self.bucket(&$bucket) {
            Ok(found) => found,
            Err(e) => return Ok(Err(e)),
        };
        Ok($body.await.map_err(store::Error::Other))
    }};
}

impl store::Host for SharedView<'_> {
    async fn open(&mut self, identifier: String) -> Kv<Resource<Bucket>> {
        if !self.ctx.buckets.contains(&identifier) {
            self.ctx.deny("buckets", &identifier);
            return Ok(Err(store::Error::AccessDenied));
        }
        if self.ctx.store.is_none() {
            return Ok(Err(store::Error::NoSuchStore));
        }
        Ok(Ok(self.table.push(Bucket { name: identifier })?))
    }
}

impl store::HostBucket for SharedView<'_> {
    async fn get(&mut self, bucket: Resource<Bucket>, key: String) -> Kv<Option<Vec<u8>>> {
        on_bucket!(self, bucket, |store, name| store.get(&name, &key))
    }

    async fn set(&mut self, bucket: Resource<Bucket>, key: String, value: Vec<u8>) -> Kv<()> {
        on_bucket!(self, bucket, |store, name| store.set(&name, &key, value))
    }

    async fn delete(&mut self, bucket: Resource<Bucket>, key: String) -> Kv<()> {
        on_bucket!(self, bucket, |store, name| store.delete(&name, &key))
    }

    async fn exists(&mut self, bucket: Resource<Bucket>, key: String) -> Kv<bool> {
        on_bucket!(self, bucket, |store, name| store.exists(&name, &key))
    }

    async fn list_keys(
        &mut self,
        bucket: Resource<Bucket>,
        cursor: Option<u64>,
    ) -> Kv<store::KeyResponse> {
        let (store, name) = match self.bucket(&bucket) {
            Ok(found) => found,
            Err(e) => return Ok(Err(e)),
        };
        Ok(store
            .list_keys(&name, cursor)
            .await
            .map(|(keys, cursor)| store::KeyResponse { keys, cursor })
            .map_err(store::Error::Other))
    }

    async fn drop(&mut self, bucket: Resource<Bucket>) -> wasmtime::Result<()> {
        self.table.delete(bucket)?;
        Ok(())
    }
}

impl atomics::Host for SharedView<'_> {
    async fn increment(&mut self, bucket: Resource<Bucket>, key: String, delta: u64) -> Kv<u64> {
        on_bucket!(self, bucket, |store, name| store
            .increment(&name, &key, delta))
    }
}

impl batch::Host for SharedView<'_> {
    async fn get_many(
        &mut self,
        bucket: Resource<Bucket>,
        keys: Vec<String>,
    ) -> Kv<Vec<Option<(String, Vec<u8>)>>> {
        on_bucket!(self, bucket, |store, name| store.get_many(&name, keys))
    }

    async fn set_many(
        &mut self,
        bucket: Resource<Bucket>,
        key_values: Vec<(String, Vec<u8>)>,
    ) -> Kv<()> {
        on_bucket!(self, bucket, |store, name| store
            .set_many(&name, key_values))
    }

    async fn delete_many(&mut self, bucket: Resource<Bucket>, keys: Vec<String>) -> Kv<()> {
        on_bucket!(self, bucket, |store, name| store.delete_many(&name, keys))
    }
}

impl cas::Host for SharedView<'_> {
    async fn compare_and_swap(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        expected: Option<Vec<u8>>,
        new: Vec<u8>,
    ) -> Kv<bool> {
        on_bucket!(self, bucket, |store, name| store
            .compare_and_swap(&name, &key, expected, new))
    }
}

impl queue::Host for SharedView<'_> {
    async fn enqueue(
        &mut self,
        name: String,
        body: Vec<u8>,
    ) -> wasmtime::Result<Result<(), queue::Error>> {
        self.enqueue_many(name, vec![body]).await
    }

    async fn enqueue_many(
        &mut self,
        name: String,
        bodies: Vec<Vec<u8>>,
    ) -> wasmtime::Result<Result<(), queue::Error>> {
        if !self.ctx.queues.contains(&name) {
            self.ctx.deny("queues", &name);
            return Ok(Err(queue::Error::AccessDenied));
        }
        let Some(store) = self.ctx.store.clone() else {
            return Ok(Err(queue::Error::Other(
                "this host has no shared store".into(),
            )));
        };
        Ok(store
            .enqueue(&name, bodies)
            .await
            .map_err(queue::Error::Other))
    }
}

struct HasShared;

impl HasData for HasShared {
    type Data<'a> = SharedView<'a>;
}

/// Adds the shared-state interfaces to the linker.
pub fn add_to_linker(linker: &mut Linker<super::InstanceState>) -> anyhow::Result<()> {
    fn view(state: &mut super::InstanceState) -> SharedView<'_> {
        state.shared_view()
    }
    store::add_to_linker::<_, HasShared>(linker, view)?;
    atomics::add_to_linker::<_, HasShared>(linker, view)?;
    batch::add_to_linker::<_, HasShared>(linker, view)?;
    cas::add_to_linker::<_, HasShared>(linker, view)?;
    queue::add_to_linker::<_, HasShared>(linker, view)?;
    Ok(())
}
