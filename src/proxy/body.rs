//! The bodies the front door passes through: [`Answer`], the one type of every response it
//! sends, and [`RequestBody`], the guest's view of the request body under the front door's
//! limits.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming};
use tokio::sync::oneshot;

use super::head;
use crate::instance::ResponseBody;
use crate::logs::Logs;

/// Every response the front door sends, whoever wrote it (a guest, the router): its body, and
/// what has to happen as it streams and when it ends.
///
/// - With request logging on, it counts the data bytes and writes the request's `at=info`
///   router line when dropped: at its end, or when it is cut short (a client gone, an aborted
///   stream).
/// - With a [`Guard`], it fails instead of ending if the guest call behind it did not end
///   soundly: a guest that traps while streaming would otherwise look like a complete response
///   (wasi-http ends the body when the store goes away). The error makes hyper abort the
///   connection.
/// - Dropped, it tells the connection's head guard that the response ended: the keep-alive
///   clock starts then.
pub(super) struct Answer {
    body: ResponseBody,
    /// Data bytes passed on so far.
    bytes: u64,
    line: Option<InfoLine>,
    guard: Option<Guard>,
    responded: Option<Responded>,
}

impl Answer {
    /// A body passed on as it is.
    pub(super) fn new(body: ResponseBody) -> Self {
        Self {
            body,
            bytes: 0,
            line: None,
            guard: None,
            responded: None,
        }
    }

    /// Writes `line` (with the byte count) once the body is dropped.
    pub(super) fn logged(mut self, line: InfoLine) -> Self {
        self.line = Some(line);
        self
    }

    /// Fails the body's end unless the guest call ended soundly.
    pub(super) fn guarded(mut self, guard: Guard) -> Self {
        self.guard = Some(guard);
        self
    }

    /// Reports the response's end to the connection's head guard (through `responded`).
    pub(super) fn reports_to(&mut self, responded: Responded) {
        self.responded = Some(responded);
    }
}

impl Body for Answer {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => match &mut this.guard {
                None => Poll::Ready(None),
                Some(guard) => {
                    let ended = guard.poll_end(cx);
                    if ended.is_ready() {
                        this.guard = None;
                    }
                    ended
                }
            },
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        // A guarded body may still fail at its end.
        self.guard.is_none() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        // A guarded body is sent chunked, whatever its size: a length announced up front
        // (wasi-http's empty body has one) would make a response the guard then aborts look
        // complete.
        if self.guard.is_some() {
            return hyper::body::SizeHint::default();
        }
        self.body.size_hint()
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        let Some(InfoLine {
            logs,
            method,
            uri,
            instance,
            started,
            connect,
            status,
        }) = &self.line
        else {
            return;
        };
        let path = uri.path();
        logs.host(format!(
            "at=info method={method} path=\"{path}\" instance={instance} connect={}ms service={}ms status={status} bytes={}",
            connect.as_millis(),
            started.elapsed().as_millis(),
            self.bytes
        ));
    }
}

/// What the `at=info` line says besides the byte count.
pub(super) struct InfoLine {
    pub logs: Logs,
    pub method: hyper::Method,
    pub uri: hyper::Uri,
    pub instance: Arc<str>,
    /// When the request arrived; `service` runs from here to the end of the body.
    pub started: Instant,
    /// Time spent waiting for a free instance.
    pub connect: Duration,
    pub status: u16,
}

/// How the guest call behind a response ended: known already, or reported when it ends.
pub(super) enum Outcome {
    Known(bool),
    Later(oneshot::Receiver<Ended>),
}

/// How a call whose response was already streaming ended.
pub(super) enum Ended {
    /// Soundly (`true`) or not.
    Call(bool),
    /// Its request body was cut at `--max-body`: what the guest answered is incomplete
    /// whatever it did next.
    BodyCut,
}

/// The end of a guest's response body, held until its call is known to have ended soundly.
pub(super) struct Guard {
    pub outcome: Outcome,
    /// Where the abort is logged (H18, or H25 for a cut request body).
    pub logs: Logs,
    /// The request in the abort's line: `method=GET path="/" instance=web.1 status=200`.
    pub request: String,
    /// `--max-body`, for the H25 line of a response aborted because its request body was cut.
    pub max_body: u64,
}

impl Guard {
    /// The body's end once the call's outcome is known: its end if sound, else an error.
    fn poll_end(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, wasmtime_wasi_http::Error>>> {
        let ended = match &mut self.outcome {
            Outcome::Known(sound) => Ended::Call(*sound),
            Outcome::Later(rx) => match Pin::new(rx).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(ended) => ended.unwrap_or(Ended::Call(false)),
            },
        };
        let request = &self.request;
        self.logs.host(match ended {
            Ended::Call(true) => return Poll::Ready(None),
            Ended::Call(false) => format!("at=error code=H18 desc=\"Response aborted\" {request}"),
            Ended::BodyCut => format!(
                "at=error code=H25 desc=\"Request body too large\" {request} (response aborted: the request body went over {} bytes after the response had started)",
                self.max_body
            ),
        });
        Poll::Ready(Some(Err(wasmtime_wasi_http::Error::HttpResponseIncomplete)))
    }
}

/// Reports the end of a response to the connection's head guard when dropped.
pub(super) struct Responded(pub(super) Arc<head::Framing>);

impl Drop for Responded {
    fn drop(&mut self) {
        self.0.responded();
    }
}

/// Why a request body failed while the guest read it.
#[derive(Debug)]
pub(super) enum BodyFault {
    /// No data for the body idle timeout.
    Idle,
    /// More than `--max-body` bytes.
    TooLarge,
}

/// A request body that fails once more than `limit` bytes arrive, or if no data arrives for
/// `timeout` while it is being read, and says which on `fault`. The idle clock runs only
/// while the guest waits for data, so time spent queued or computing never counts.
pub(super) struct RequestBody {
    body: Incoming,
    limit: u64,
    /// Data bytes received so far.
    received: u64,
    timeout: Duration,
    /// Armed when a read finds no data; disarmed when data comes.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    fault: Option<oneshot::Sender<BodyFault>>,
}

impl RequestBody {
    pub(super) fn new(
        body: Incoming,
        limit: u64,
        timeout: Duration,
        fault: oneshot::Sender<BodyFault>,
    ) -> Self {
        Self {
            body,
            limit,
            received: 0,
            timeout,
            sleep: None,
            fault: Some(fault),
        }
    }

    fn fail(&mut self, fault: BodyFault) -> wasmtime_wasi_http::Error {
        let error = match fault {
            BodyFault::Idle => wasmtime_wasi_http::Error::ConnectionReadTimeout,
            BodyFault::TooLarge => wasmtime_wasi_http::Error::HttpRequestBodySize(Some(self.limit)),
        };
        if let Some(tx) = self.fault.take() {
            let _ = tx.send(fault);
        }
        error
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Pending => {}
            Poll::Ready(Some(Ok(frame))) => {
                this.sleep = None;
                if let Some(data) = frame.data_ref() {
                    this.received += data.len() as u64;
                    if this.received > this.limit {
                        return Poll::Ready(Some(Err(this.fail(BodyFault::TooLarge))));
                    }
                }
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(Some(Err(e))) => {
                this.sleep = None;
                return Poll::Ready(Some(Err(wasmtime_wasi_http::Error::Hyper(e))));
            }
            Poll::Ready(None) => {
                this.sleep = None;
                return Poll::Ready(None);
            }
        }
        let timeout = this.timeout;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        Poll::Ready(Some(Err(this.fail(BodyFault::Idle))))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}
