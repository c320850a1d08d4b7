//! One running instance: a web instance serving requests one at a time, or a worker running
//! `wasi:cli/run`. Each owns its `Store`; a trapped instance is dropped, never entered again.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use tokio::sync::oneshot;
use wasmtime::Store;
use wasmtime_wasi::I32Exit;
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi_http::WasiHttpView as _;
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode, Scheme};
use wasmtime_wasi_http::p2::bindings::{Proxy, ProxyPre};

use crate::app::ByteSize;
use crate::runtime::{Compiled, InstanceSetup, InstanceState, Kind, Runtime};

/// Body of every response the host sends, from a guest or its own.
pub type ResponseBody = wasmtime_wasi_http::p2::body::HyperOutgoingBody;

/// A response body holding `text`.
pub fn text_body(text: impl Into<Bytes>) -> ResponseBody {
    Full::new(text.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

/// What the router gets back for one request.
pub enum Reply {
    /// The guest produced response headers; the body may still be streaming.
    Response(hyper::Response<ResponseBody>),
    /// The guest produced no response.
    Failed(Failure),
}

/// Why a request got no response from its guest.
#[derive(Debug)]
pub enum Failure {
    /// No response headers within the request timeout (504).
    Timeout(Duration),
    /// The instance trapped, exited or ran out of memory (502).
    Crashed(String),
    /// The handler returned without setting a response (502).
    NoResponse,
    /// The guest answered with an error code instead of a response (502).
    Guest(ErrorCode),
}

/// A live web instance, owned by whoever is using it: the router's idle list, or the task
/// handling one request.
pub struct WebInstance {
    /// `web.1`
    pub name: Arc<str>,
    store: Store<InstanceState>,
    proxy: Proxy,
    /// Its memory limit, for crash messages.
    memory: ByteSize,
    /// Tells the instance's supervisor slot why the instance ended; taken on the first crash.
    /// Dropped unsent when the instance is dropped for another reason (its slot stopped).
    exit: Option<oneshot::Sender<String>>,
    /// Set by the slot when it stops: the pool drops the instance instead of reusing it.
    retired: Arc<AtomicBool>,
    /// Requests served by the slot, for `ps`.
    requests: Arc<AtomicU64>,
    /// True while a guest call is in progress: if the instance is dropped then (the request's
    /// future was dropped because the client went away), its state is unknown and the slot must
    /// replace it.
    in_call: bool,
}

impl Drop for WebInstance {
    fn drop(&mut self) {
        if self.in_call {
            self.end("request cancelled mid-call (the client went away); instance recycled");
        }
    }
}

impl crate::router::Member for WebInstance {
    fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }
}

impl WebInstance {
    /// Instantiates a web instance. `exit` receives the reason when it later crashes.
    pub async fn start(
        runtime: &Runtime,
        pre: &ProxyPre<InstanceState>,
        setup: InstanceSetup<'_>,
        exit: oneshot::Sender<String>,
        retired: Arc<AtomicBool>,
        requests: Arc<AtomicU64>,
    ) -> anyhow::Result<Self> {
        let name = Arc::from(setup.instance);
        let memory = setup.memory;
        let mut store = runtime.new_store(setup);
        let proxy = match pre.instantiate_async(&mut store).await {
            Ok(proxy) => proxy,
            Err(e) => return Err(anyhow::anyhow!(describe(&e, &store, memory))),
        };
        Ok(Self {
            name,
            store,
            proxy,
            memory,
            exit: Some(exit),
            retired,
            requests,
            in_call: false,
        })
    }

    /// Handles one request, sending the response (or why there is none) on `reply` as soon as
    /// it is known. Returns the instance if it is still sound; a crashed or timed-out instance
    /// is dropped here and its slot told why.
    pub async fn handle<B>(
        mut self,
        request: hyper::Request<B>,
        reply: oneshot::Sender<Reply>,
        timeout: Duration,
    ) -> Option<Self>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        self.requests.fetch_add(1, Ordering::Relaxed);
        // The guest may set the response at any point of the call, or never: whoever comes
        // first (the outparam callback, or the end of the call) sends the reply.
        let reply = Arc::new(Mutex::new(Some(reply)));
        let send = {
            let reply = reply.clone();
            move |value: Reply| {
                if let Some(tx) = reply.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    let _ = tx.send(value);
                }
            }
        };
        let outcome = {
            let send = send.clone();
            let mut http = self.store.data_mut().http();
            let prepared = http
                .new_incoming_request(Scheme::Http, request)
                .and_then(|req| {
                    let out = http.new_response_outparam_from_callback(move |response| {
                        send(match response {
                            Ok(response) => Reply::Response(response),
                            Err(code) => Reply::Failed(Failure::Guest(code)),
                        })
                    })?;
                    Ok((req, out))
                });
            match prepared {
                Ok((req, out)) => {
                    self.in_call = true;
                    let call = self.proxy.wasi_http_incoming_handler().call_handle(
                        &mut self.store,
                        req,
                        out,
                    );
                    let outcome = tokio::time::timeout(timeout, call).await;
                    self.in_call = false;
                    outcome
                }
                Err(e) => Ok(Err(e)),
            }
        };
        match outcome {
            Ok(Ok(())) => {
                send(Reply::Failed(Failure::NoResponse));
                Some(self)
            }
            Ok(Err(e)) => {
                let reason = describe(&e, &self.store, self.memory);
                send(Reply::Failed(Failure::Crashed(reason.clone())));
                self.end(&format!("crashed: {reason}"));
                None
            }
            Err(_elapsed) => {
                send(Reply::Failed(Failure::Timeout(timeout)));
                self.end(&format!(
                    "request timed out after {}; instance recycled",
                    crate::humanize(timeout)
                ));
                None
            }
        }
    }

    /// Ends this incarnation (the caller drops it); its slot starts a replacement.
    fn end(&mut self, reason: &str) {
        if let Some(exit) = self.exit.take() {
            let _ = exit.send(reason.to_string());
        }
    }
}

/// Runs a worker to completion and says how it ended (`exited with status 0`, a trap, the
/// memory quota…). Dropping the future stops the worker at its next epoch tick.
pub async fn run_worker(
    runtime: &Runtime,
    pre: &CommandPre<InstanceState>,
    setup: InstanceSetup<'_>,
    started: impl FnOnce(),
) -> Result<String, String> {
    let memory = setup.memory;
    let mut store = runtime.new_store(setup);
    let command = pre
        .instantiate_async(&mut store)
        .await
        .map_err(|e| describe(&e, &store, memory))?;
    started();
    Ok(match command.wasi_cli_run().call_run(&mut store).await {
        Ok(Ok(())) => "exited with status 0".to_string(),
        Ok(Err(())) => "exited with status 1".to_string(),
        Err(e) => describe(&e, &store, memory),
    })
}

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
    };
    result.map_err(|e| describe(&e, &store, memory))
}

/// Turns a guest failure into the reason users read in the log.
fn describe(err: &wasmtime::Error, store: &Store<InstanceState>, memory: ByteSize) -> String {
    if let Some(exit) = err.downcast_ref::<I32Exit>() {
        return format!("exited with status {}", exit.0);
    }
    if store.data().limiter.denied().is_some() {
        return format!("memory quota exceeded ({memory})");
    }
    if let Some(trap) = err.downcast_ref::<wasmtime::Trap>() {
        return trap.to_string();
    }
    let text = format!("{err:#}");
    text.lines().next().unwrap_or("unknown error").to_string()
}
