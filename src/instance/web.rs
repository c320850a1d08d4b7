//! A web instance: requests one at a time, health checks, recycling, and what it tells its
//! slot when it ends.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use tokio::sync::oneshot;
use wasmtime::Store;
use wasmtime_wasi_http::WasiHttpView as _;
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode, Scheme};
use wasmtime_wasi_http::p2::bindings::{Proxy, ProxyPre};

use super::{describe, out_of_memory};
use crate::app::ByteSize;
use crate::runtime::{InstanceSetup, InstanceState, Runtime};

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
    /// The instance went over its memory limit (502, R14).
    MemoryQuota(String),
    /// The instance trapped or exited (502).
    Crashed(String),
    /// The handler returned without setting a response (502).
    NoResponse,
    /// The guest answered with an error code instead of a response (502).
    Guest(ErrorCode),
}

/// Why a web instance ended, sent to its slot.
#[derive(Debug)]
pub enum Exit {
    /// It failed (trap, memory quota, timeout, no response, cancelled mid-call): replaced at
    /// once. `answered` counts the requests it had answered soundly before.
    Crashed { reason: String, answered: u64 },
    /// It is used up: replaced at once, not counted as a crash. `Some`: it served its
    /// `max_requests` (logged); `None`: a single-use instance, replaced silently since the
    /// request that took it began.
    Recycled(Option<String>),
    /// Dropped mid-call because the client went away: replaced at once, not the instance's
    /// failure.
    Cancelled(String),
}

/// Per-type settings of a web instance.
#[derive(Clone, Debug, Default)]
pub struct WebSettings {
    /// Longest time for response headers; `None`: the router's.
    pub request_timeout: Option<Duration>,
    /// Recycle after this many requests.
    pub max_requests: Option<u64>,
    /// At most one instance alive, even while one is replaced.
    pub singleton: bool,
    /// Whether the type's instances serve more than one request; shared by its instances.
    pub reuse: Arc<Reuse>,
}

/// Whether a process type's instances may be reused: not when its manifest says
/// `max_requests = 1`, nor once its instances were seen to break on their second request
/// (StarlingMonkey, inside componentize-js, cannot enter its event loop twice). A single-use
/// type gets a fresh instance for every request: its slot starts the replacement as soon as a
/// request takes the instance, so the next request finds one ready.
#[derive(Debug, Default)]
pub struct Reuse {
    single_use: AtomicBool,
    /// An instance of the type answered a second request soundly: it is reusable, and
    /// failures on second requests are the guest's bugs, not a toolchain's limit.
    proven: AtomicBool,
    /// Instances that answered their first request and failed their second.
    broken_second: AtomicU32,
}

/// Instances that must break on their second request, with none proven reusable, before a
/// type is switched to a fresh instance per request.
pub const BROKEN_SECOND_LIMIT: u32 = 2;

impl Reuse {
    /// `single_use`: from the manifest (`max_requests = 1`).
    pub fn new(single_use: bool) -> Self {
        Self {
            single_use: AtomicBool::new(single_use),
            ..Self::default()
        }
    }

    /// Whether each instance serves one request only.
    pub fn single_use(&self) -> bool {
        self.single_use.load(Ordering::Relaxed)
    }

    /// Records an instance that answered its first request and failed its second. Returns
    /// `true` when this switches the type to single use (once).
    pub fn broke_on_second(&self) -> bool {
        if self.proven.load(Ordering::Relaxed) || self.single_use() {
            return false;
        }
        let seen = self.broken_second.fetch_add(1, Ordering::Relaxed) + 1;
        seen >= BROKEN_SECOND_LIMIT && !self.single_use.swap(true, Ordering::Relaxed)
    }

    fn answered_twice(&self) {
        self.proven.store(true, Ordering::Relaxed);
    }
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
    exit: Option<oneshot::Sender<Exit>>,
    /// Set by the slot when it stops: the pool drops the instance instead of reusing it.
    retired: Arc<AtomicBool>,
    /// Requests served by the slot, for `ps`.
    requests: Arc<AtomicU64>,
    /// Requests served by this incarnation, for `max_requests`.
    served: u64,
    /// The type's request timeout and recycling.
    settings: WebSettings,
    /// True while a guest call is in progress: if the instance is dropped then (the request's
    /// future was dropped because the client went away), its state is unknown and the slot must
    /// replace it.
    in_call: bool,
}

impl Drop for WebInstance {
    fn drop(&mut self) {
        if self.in_call {
            self.end(Exit::Cancelled(
                "request cancelled mid-call (the client went away); instance recycled".into(),
            ));
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
        exit: oneshot::Sender<Exit>,
        retired: Arc<AtomicBool>,
        requests: Arc<AtomicU64>,
        settings: WebSettings,
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
            served: 0,
            settings,
            in_call: false,
        })
    }

    /// Whether this instance was started by the slot that owns `retired`.
    pub fn belongs_to(&self, retired: &Arc<AtomicBool>) -> bool {
        Arc::ptr_eq(&self.retired, retired)
    }

    /// Runs the type's health check on this instance: GET `path`, which must answer 2xx or
    /// 3xx within `timeout`. Returns the instance if it is still sound, and the verdict. A
    /// slow answer fails the check but keeps the instance (the check's `threshold` decides);
    /// a call still running at twice `timeout` is given up and the instance recycled, as a
    /// request past its timeout would be: the instance is out of the rotation meanwhile, so
    /// that wait stays short.
    pub async fn check(self, path: &str, timeout: Duration) -> (Option<Self>, Result<(), String>) {
        let bound = timeout.saturating_mul(2);
        let started = std::time::Instant::now();
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::USER_AGENT, "wasmform-health-check")
            .body(
                http_body_util::Empty::<Bytes>::new()
                    .map_err(|never: Infallible| -> wasmtime_wasi_http::Error { match never {} }),
            )
            .expect("a valid request");
        let (tx, rx) = oneshot::channel();
        let call = self.call(request, tx, bound);
        let verdict = async {
            match rx.await {
                Ok(Reply::Response(_)) if started.elapsed() > timeout => Err(format!(
                    "GET {path} answered after {} (timeout {})",
                    crate::units::humanize(started.elapsed()),
                    crate::units::humanize(timeout)
                )),
                Ok(Reply::Response(response)) => {
                    let status = response.status();
                    // Read the body to its end (up to 1 MiB) so the guest can finish writing
                    // it; past that it is dropped and the guest sees a closed stream.
                    let mut body = response.into_body();
                    let mut read = 0;
                    while read < (1 << 20) {
                        match body.frame().await {
                            Some(Ok(frame)) => read += frame.data_ref().map_or(0, Bytes::len),
                            _ => break,
                        }
                    }
                    if status.is_success() || status.is_redirection() {
                        Ok(())
                    } else {
                        Err(format!("GET {path} answered {}", status.as_u16()))
                    }
                }
                Ok(Reply::Failed(Failure::Timeout(bound))) => Err(format!(
                    "GET {path} got no answer within {}",
                    crate::units::humanize(bound)
                )),
                Ok(Reply::Failed(Failure::Crashed(reason) | Failure::MemoryQuota(reason))) => {
                    Err(format!("GET {path} crashed the instance: {reason}"))
                }
                Ok(Reply::Failed(Failure::NoResponse)) => {
                    Err(format!("GET {path} got no response"))
                }
                Ok(Reply::Failed(Failure::Guest(code))) => {
                    Err(format!("GET {path} failed: {code:?}"))
                }
                Err(_) => Err(format!("GET {path} got no response")),
            }
        };
        tokio::join!(call, verdict)
    }

    /// Handles one request, sending the response (or why there is none) on `reply` as soon as
    /// it is known. `Ok(Some)`: the call ended soundly and the instance can serve again;
    /// `Ok(None)`: it ended soundly and the instance is used up (its `max_requests`, or a
    /// single-use type; its slot replaces it); `Err`: it crashed or timed out, was dropped
    /// here and its slot told why.
    pub async fn handle<B>(
        mut self,
        request: hyper::Request<B>,
        reply: oneshot::Sender<Reply>,
        timeout: Duration,
    ) -> Result<Option<Self>, ()>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.served += 1;
        // The last request of this instance: its slot starts the replacement now, while the
        // guest runs, so the next request finds a fresh instance ready (a crash of this call
        // then needs no replacement of its own; the router logs it). A singleton's
        // replacement waits for the end of the call: never two alive.
        let mut last = if self.settings.reuse.single_use() {
            Some(None)
        } else {
            match self.settings.max_requests {
                Some(max) if self.served >= max => Some(Some(format!(
                    "served {max} requests (max_requests); recycled"
                ))),
                _ => None,
            }
        };
        if !self.settings.singleton
            && let Some(reason) = last.take()
        {
            self.end(Exit::Recycled(reason));
        }
        let timeout = self.settings.request_timeout.unwrap_or(timeout);
        let mut instance = self.call(request, reply, timeout).await.ok_or(())?;
        if instance.served == 2 {
            instance.settings.reuse.answered_twice();
        }
        if let Some(reason) = last {
            instance.end(Exit::Recycled(reason));
        }
        Ok(instance.exit.is_some().then_some(instance))
    }

    /// One guest call, not counted as a request.
    async fn call<B>(
        mut self,
        request: hyper::Request<B>,
        reply: oneshot::Sender<Reply>,
        timeout: Duration,
    ) -> Option<Self>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        // The guest may set the response at any point of the call, or never: whoever comes
        // first (the outparam callback, or the end of the call) sends the reply.
        let reply = Arc::new(Mutex::new(Some(reply)));
        let send = {
            let reply = reply.clone();
            // Whether this sent the reply (`false`: it had been sent).
            move |value: Reply| {
                let tx = reply.lock().unwrap_or_else(|e| e.into_inner()).take();
                let Some(tx) = tx else { return false };
                let _ = tx.send(value);
                true
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
                        });
                    })?;
                    Ok((req, out))
                });
            match prepared {
                Ok((req, out)) => {
                    self.in_call = true;
                    // The epoch deadline is relative to when it was last set: an instance idle
                    // for a few ticks would yield to the runtime at its first check, and a task
                    // that yields reschedules itself and unparks another worker. Counted from
                    // now, a call yields only if it runs into the next tick.
                    self.store.set_epoch_deadline(1);
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
        let answered = self.served.saturating_sub(1);
        let reason = match outcome {
            // Sound only if the guest set its response: one that returned without it (or whose
            // toolchain cannot be entered twice) is in an unknown state, and is replaced.
            Ok(Ok(())) if !send(Reply::Failed(Failure::NoResponse)) => return Some(self),
            Ok(Ok(())) => "returned without a response".to_string(),
            Ok(Err(e)) => {
                let reason = describe(&e, &self.store, self.memory);
                send(Reply::Failed(if out_of_memory(&e, &self.store) {
                    Failure::MemoryQuota(reason.clone())
                } else {
                    Failure::Crashed(reason.clone())
                }));
                format!("crashed: {reason}")
            }
            Err(_elapsed) => {
                send(Reply::Failed(Failure::Timeout(timeout)));
                format!(
                    "request timed out after {}; instance recycled",
                    crate::units::humanize(timeout)
                )
            }
        };
        self.end(Exit::Crashed { reason, answered });
        None
    }

    /// Ends this incarnation (the caller drops it); its slot starts a replacement.
    fn end(&mut self, reason: Exit) {
        if let Some(exit) = self.exit.take() {
            let _ = exit.send(reason);
        }
    }
}
