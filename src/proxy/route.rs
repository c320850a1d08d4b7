//! One request through the router: the front door's checks, a free instance from the pool, the
//! guest call, and the answer — the guest's, or the router's own ([`RouterError`]).

use std::sync::Arc;
use std::time::Instant;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode, header};
use tokio::sync::oneshot;

use super::Router;
use super::body::{Answer, BodyFault, Ended, Guard, InfoLine, Outcome, RequestBody};
use super::error::{REQUEST_ID, RouterError, plain, request_id};
use crate::instance::{Failure, Reply, ResponseBody, WebInstance};
use crate::router::Busy;

/// What a router line names of the request.
struct Line<'a> {
    method: &'a hyper::Method,
    path: &'a str,
    started: Instant,
    /// The client's `X-Request-Id`, if it sent one (a refcount, not a copy).
    request_id: Option<header::HeaderValue>,
}

impl Router {
    /// Answers one request, counted and timed.
    pub(super) async fn handle(&self, req: Request<Incoming>) -> Response<Answer> {
        let started = Instant::now();
        let response = self.route(req, started).await;
        self.metrics
            .request(response.status().as_u16(), started.elapsed().as_secs_f64());
        response
    }

    async fn route(&self, req: Request<Incoming>, started: Instant) -> Response<Answer> {
        let method = req.method().clone();
        // A cheap clone (hyper's `Uri` shares the head's bytes): the path is only formatted
        // when a line is written.
        let uri = req.uri().clone();
        let line = Line {
            method: &method,
            path: uri.path(),
            started,
            request_id: req.headers().get(&REQUEST_ID).cloned(),
        };
        if let Some(refused) = self.refuse_early(&req, &line) {
            return refused.map(Answer::new);
        }
        let waiting = Instant::now();
        let instance = match self.acquire().await {
            Ok(instance) => instance,
            Err(error) => return self.fail(&error, &line, "-").map(Answer::new),
        };
        let connect = waiting.elapsed();
        let name = instance.name.clone();
        let (reply, outcome) = match self.call(instance, req, &line).await {
            Ok(called) => called,
            Err(fault) => return self.body_fault(fault, &line, &name).map(Answer::new),
        };
        let response = match reply {
            Ok(Reply::Response(response)) => response,
            Ok(Reply::Failed(failure)) => {
                let error = match failure {
                    Failure::Timeout(after) => RouterError::Timeout { after },
                    Failure::MemoryQuota(reason) => RouterError::MemoryQuota { reason },
                    Failure::Crashed(reason) => RouterError::Crashed { reason },
                    Failure::NoResponse => RouterError::NoResponse,
                    Failure::Guest(code) => RouterError::Invalid { code },
                };
                return self.fail(&error, &line, &name).map(Answer::new);
            }
            Err(_) => return self.fail(&RouterError::Lost, &line, &name).map(Answer::new),
        };
        let status = response.status().as_u16();
        let guard = match outcome {
            Outcome::Known(true) => None,
            outcome => Some(Guard {
                outcome,
                logs: self.logs.clone(),
                request: format!(
                    "method={method} path=\"{}\" instance={name} status={status}",
                    uri.path()
                ),
                max_body: self.limits.max_body,
            }),
        };
        response.map(|body| {
            let mut answer = Answer::new(body);
            if let Some(guard) = guard {
                answer = answer.guarded(guard);
            }
            if self.log_requests {
                answer = answer.logged(InfoLine {
                    logs: self.logs.clone(),
                    method,
                    uri: uri.clone(),
                    instance: name,
                    started,
                    connect,
                    status,
                });
            }
            answer
        })
    }

    /// The front door's answer to a request it refuses before any guest runs: a transfer
    /// coding it does not decode, a declared body over `--max-body`.
    fn refuse_early(
        &self,
        req: &Request<Incoming>,
        line: &Line<'_>,
    ) -> Option<Response<ResponseBody>> {
        if !plain_transfer_encoding(req.headers()) {
            // hyper refuses a `Transfer-Encoding` whose last coding is not `chunked`; anything
            // but exactly one `chunked` is refused here too, since no other coding is decoded.
            let mut response = plain(
                StatusCode::BAD_REQUEST,
                "unsupported Transfer-Encoding: only a single `chunked` is accepted\n".to_string(),
            );
            response.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            return Some(response);
        }
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > self.limits.max_body) {
            let error = RouterError::BodyTooLarge {
                limit: self.limits.max_body,
            };
            return Some(self.fail(&error, line, "-"));
        }
        if self.limits.fields_may_overflow()
            && fields_size(req.headers()) > self.limits.max_fields_size
        {
            let error = RouterError::FieldsTooLarge {
                limit: self.limits.max_fields_size,
            };
            return Some(self.fail(&error, line, "-"));
        }
        None
    }

    /// A free instance of the routed type, waiting in the pool's queue up to the request
    /// timeout.
    async fn acquire(&self) -> Result<WebInstance, RouterError> {
        let Some(pool) = &self.pool else {
            return Err(RouterError::NoHttpType);
        };
        match tokio::time::timeout(self.request_timeout, pool.acquire()).await {
            Ok(Ok(instance)) => Ok(instance),
            Ok(Err(Busy::NoneUp)) => Err(RouterError::NoneUp {
                process: self.process.clone(),
            }),
            Ok(Err(Busy::QueueFull)) | Err(_) => Err(RouterError::Busy {
                process: self.process.clone(),
            }),
        }
    }

    /// Calls the guest with `req` and waits for its reply: the reply and how the call ended
    /// (or will), or the request body's fault if the body failed before the guest answered.
    ///
    /// The guest runs inline, in this connection's task: most handlers set the response and
    /// finish in one go, and a task per request would cost a cross-thread wake-up. If the
    /// response headers come while the guest is still writing the body, the rest of the call
    /// moves to a task of its own so the body can stream. If the client goes away mid-call, the
    /// instance is dropped mid-call and its slot replaces it.
    async fn call(
        &self,
        instance: WebInstance,
        req: Request<Incoming>,
        line: &Line<'_>,
    ) -> Result<(Result<Reply, oneshot::error::RecvError>, Outcome), BodyFault> {
        let name = instance.name.clone();
        // A body that passes the limit as it arrives (chunked) is cut off, and one that stops
        // arriving while the guest waits for it times out: the guest sees a read error, and if
        // it has not answered yet the router answers for it (413, 408).
        let (fault_tx, mut fault_rx) = oneshot::channel();
        let req = req.map(|body| {
            RequestBody::new(
                body,
                self.limits.max_body,
                self.limits.body_idle_timeout,
                fault_tx,
            )
        });
        let (tx, mut rx) = oneshot::channel();
        let pool = self.pool.clone().expect("an instance came from the pool");
        let timeout = self.request_timeout;
        // Resolves to whether the call ended soundly (the instance went back to the pool).
        let mut call = Box::pin(async move {
            match instance.handle(req, tx, timeout).await {
                Ok(Some(instance)) => {
                    pool.release(instance);
                    true
                }
                // Recycled after its `max_requests`: this call was fine.
                Ok(None) => true,
                Err(()) => false,
            }
        });
        // Logs H27 if this future is dropped before the guest answered: the client went away.
        let mut interrupted = ClientGone {
            router: self,
            line,
            instance: &name,
            armed: true,
        };
        // The call is polled first: a guest that answers and returns in one go then sends its
        // reply (and drops its request body) before either channel holds this task's waker, so
        // it never wakes its own task. A task that wakes itself is rescheduled as a yield, which
        // also unparks another worker: a syscall and a thread hop per request.
        let called = tokio::select! {
            biased;
            sound = &mut call => match fault_rx.try_recv() {
                Ok(fault) => Err(fault),
                Err(_) => Ok((rx.await, Outcome::Known(sound))),
            },
            reply = &mut rx => match fault_rx.try_recv() {
                // The guest answered after its body failed: the router's answer says why.
                Ok(fault) => {
                    tokio::spawn(call);
                    Err(fault)
                }
                Err(_) => {
                    // The response streams while the call goes on. If the request body is cut
                    // meanwhile (over `--max-body`), the guest may still end its response
                    // cleanly, with what it read: the end is then an abort, not a complete
                    // answer.
                    let (done_tx, done_rx) = oneshot::channel();
                    tokio::spawn(async move {
                        let sound = call.await;
                        let cut = matches!(fault_rx.try_recv(), Ok(BodyFault::TooLarge));
                        let _ = done_tx.send(if cut {
                            Ended::BodyCut
                        } else {
                            Ended::Call(sound)
                        });
                    });
                    Ok((reply, Outcome::Later(done_rx)))
                }
            },
            Ok(fault) = &mut fault_rx => {
                // Answer for the guest, which now sees a read error, and let it finish on its
                // own.
                tokio::spawn(call);
                Err(fault)
            }
        };
        interrupted.armed = false;
        called
    }

    /// The router's answer for `error`, logged (`at=error`, rate-limited for refusals).
    fn fail(&self, error: &RouterError, line: &Line<'_>, instance: &str) -> Response<ResponseBody> {
        let id = request_id(line.request_id.as_ref());
        let admitted = match error.refusal() {
            Some(kind) => self.refusals.admit(kind),
            None => Some(1),
        };
        if let Some(refused) = admitted {
            let refused = if refused > 1 {
                format!(" refused={refused}")
            } else {
                String::new()
            };
            let Line {
                method,
                path,
                started,
                ..
            } = line;
            self.logs.host(format!(
                "at=error code={} desc=\"{}\" method={method} path=\"{path}\" instance={instance} request_id={id} service={}ms status={}{refused}",
                error.code(),
                error.description(),
                started.elapsed().as_millis(),
                error.status().as_u16()
            ));
        }
        error.response(instance, &id, self.error_detail)
    }

    /// The router's answer when the request body failed before the guest answered.
    fn body_fault(
        &self,
        fault: BodyFault,
        line: &Line<'_>,
        instance: &str,
    ) -> Response<ResponseBody> {
        let error = match fault {
            BodyFault::Idle => RouterError::BodyIdle {
                after: self.limits.body_idle_timeout,
            },
            BodyFault::TooLarge => RouterError::BodyTooLarge {
                limit: self.limits.max_body,
            },
        };
        let mut response = self.fail(&error, line, instance);
        // The rest of the body is not read: the connection cannot carry another request.
        response.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
        response
    }
}

/// Logs H27 when dropped while armed: the request's future went away before the guest
/// answered. The line is only formatted then, not on every request.
struct ClientGone<'a> {
    router: &'a Router,
    line: &'a Line<'a>,
    instance: &'a Arc<str>,
    armed: bool,
}

impl Drop for ClientGone<'_> {
    fn drop(&mut self) {
        if self.armed {
            let Line { method, path, .. } = self.line;
            self.router.logs.host(format!(
                "at=error code=H27 desc=\"Client request interrupted\" method={method} path=\"{path}\" instance={} status=499",
                self.instance
            ));
        }
    }
}

/// Whether the request has no `Transfer-Encoding`, or exactly one field saying `chunked`.
fn plain_transfer_encoding(headers: &header::HeaderMap) -> bool {
    let mut values = headers.get_all(header::TRANSFER_ENCODING).iter();
    match (values.next(), values.next()) {
        (None, _) => true,
        (Some(value), None) => value
            .as_bytes()
            .trim_ascii()
            .eq_ignore_ascii_case(b"chunked"),
        _ => false,
    }
}

/// The size of `headers` as wasi-http counts a fields resource: each name and each value with
/// the size of its in-memory type (`wasmtime_wasi_http::FieldMap::content_size`). A guest that
/// copies the request's headers (a proxy does) traps past its limit.
fn fields_size(headers: &header::HeaderMap) -> usize {
    let names: usize = headers
        .keys()
        .map(|k| k.as_str().len() + size_of::<header::HeaderName>())
        .sum();
    let values: usize = headers
        .values()
        .map(|v| v.len() + size_of::<header::HeaderValue>())
        .sum();
    names + values
}
