//! Strict line endings in request heads: a bare LF is refused with 400.
//!
//! hyper (httparse) accepts a lone LF as a line ending in the request line and the headers, as
//! RFC 9112 §2.2 permits. A proxy in front of wasmform that reads such a head differently could
//! frame requests differently from it, which is how requests get smuggled, so wasmform refuses
//! them. [`HeadGuard`] wraps a connection's socket and inspects exactly the bytes that belong to
//! request heads, never body bytes (a body may hold bare LFs legitimately):
//!
//! - While a head is read, every byte is checked. The head ends at its first empty line
//!   (CRLF CRLF, after empty lines before the request line, which hyper skips). hyper is given
//!   the head and nothing after it; the rest of that read waits in a stash.
//! - hyper parses the head and calls the service, which reports hyper's own framing of the body
//!   through [`Framing::set`]: its exact length (no body, or `Content-Length`), or unknown
//!   (chunked). Until then nothing more is handed over: what arrives meanwhile waits in the
//!   stash.
//! - A body of known length is passed through uninspected, byte-exact, and the next byte starts
//!   the next head. A chunked body's end is only known to hyper's decoder, so after a chunked
//!   request nothing more is inspected and the response closes the connection
//!   (`Connection: close`): no second request is ever read from it.
//! - A bare LF in a head is handed to hyper as a NUL byte, which httparse rejects wherever it
//!   stands; hyper then answers 400 and closes the connection as for any malformed head. Reads
//!   after it see the end of the stream, so nothing behind it is parsed.
//!
//! hyper stays the only parser of requests: this layer only decides which bytes it checks, from
//! hyper's own framing, and can only refuse, never reframe.
//!
//! The guard also keeps the connection's two clocks, because hyper has only one: its
//! `header_read_timeout` starts when hyper begins waiting for the next head, so it would also
//! close idle keep-alive connections, at the same timeout. Here (with hyper's switched off):
//!
//! - the **header timeout** runs from the connection's acceptance for its first request, and
//!   from the first byte of each later head; when it fires the read fails (`TimedOut`) and hyper
//!   closes the connection without an answer, as its own timeout does;
//! - the **keep-alive timeout** runs while the connection is idle: its last response has ended
//!   ([`Framing::responded`]) and no byte of the next head has come. When it fires, hyper sees
//!   the end of the stream and closes the connection gracefully;
//! - neither runs while a request is being answered: the request and body timeouts bound that.
//!
//! Neither the service nor the end of a response wakes the connection's task: both happen inside
//! that task, and a task that wakes itself is rescheduled as a yield, which in tokio also unparks
//! another worker (a syscall and a context switch per request, and the connection hops threads).
//! Instead the reads that wait for a framing also wait on the socket, so new bytes wake them (and
//! only a read that already holds bytes it may not hand over asks [`Framing::set`] for a wake-up),
//! and the clocks are lazy: one timer per connection, armed no later than the deadline in force,
//! which on firing re-reads the state and re-arms at the real deadline if that moved. A timer is
//! then reset about once per timeout period, not twice per request.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// hyper's framing of the current request's body, reported by the service.
#[derive(Default)]
pub(crate) struct Framing {
    slot: Mutex<Slot>,
}

#[derive(Default)]
struct Slot {
    /// `Some(Some(n))`: `n` body bytes follow the head; `Some(None)`: chunked.
    body: Option<Option<u64>>,
    /// A read that holds bytes it may hand over only once the framing is known.
    waker: Option<Waker>,
    /// Requests read whose responses have not ended: while there are any, the connection is
    /// not idle.
    responding: usize,
    /// When the last response ended: the keep-alive clock runs from here.
    idle_since: Option<Instant>,
}

impl Framing {
    /// Reports the body length hyper framed for the request just parsed (`None`: chunked).
    /// Its response has then begun; [`Framing::responded`] says when it ended.
    pub(crate) fn set(&self, body: Option<u64>) {
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        slot.body = Some(body);
        slot.responding += 1;
        if let Some(waker) = slot.waker.take() {
            waker.wake();
        }
    }

    /// Reports that a response ended (or was dropped unfinished). No wake-up: the guard's timer
    /// is armed no later than the keep-alive deadline this starts (see the module docs).
    pub(crate) fn responded(&self) {
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        slot.responding = slot.responding.saturating_sub(1);
        if slot.responding == 0 {
            slot.idle_since = Some(Instant::now());
        }
    }
}

/// The connection's clocks (see the module docs).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timeouts {
    /// Longest time to send a request head.
    pub(crate) header: Duration,
    /// Longest idle time between a response and the next request.
    pub(crate) keepalive: Duration,
}

/// Which clock runs while a read waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wait {
    /// A head is (or the first request is) awaited: the header timeout.
    Head,
    /// Idle between requests: the keep-alive timeout.
    Idle,
}

/// What the bytes read next belong to.
#[derive(Debug, PartialEq, Eq)]
enum State {
    /// A request head; `prev` is the byte before, `line` the current line's length without
    /// CR, `started` whether the request line has begun (empty lines before it are skipped).
    Head {
        prev: u8,
        line: usize,
        started: bool,
    },
    /// A head has been handed over; waiting for the service to say how its body is framed.
    AwaitBody,
    /// This many body bytes remain.
    Body(u64),
    /// After a chunked request: passed through, never inspected (the connection closes after
    /// the response).
    Unchecked,
    /// A bare LF was found, or a clock ran out: the stream ends here for hyper.
    Refused,
}

const HEAD: State = State::Head {
    prev: 0,
    line: 0,
    started: false,
};

/// A connection's socket whose request heads are checked for bare LFs (see the module docs).
pub(crate) struct HeadGuard<S> {
    io: S,
    state: State,
    /// Bytes read past the end of a head, handed over before reading the socket again.
    stash: Vec<u8>,
    /// How much of `stash` has been handed over.
    stash_pos: usize,
    /// Where the service reports each request's framing.
    framing: Arc<Framing>,
    timeouts: Timeouts,
    /// Whether a request head was read: after it, waiting for a head is keep-alive idling.
    served: bool,
    /// When the head being read began: the connection's acceptance for the first, the first
    /// byte of the head for later ones.
    head_since: Instant,
    /// The connection's one timer, armed no later than the deadline in force (see the module
    /// docs); `None` until a read first waits.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// How far ahead a read waiting for a framing reads into the stash.
const READ_AHEAD: usize = 8192;

impl<S> HeadGuard<S> {
    pub(crate) fn new(io: S, framing: Arc<Framing>, timeouts: Timeouts) -> Self {
        Self {
            io,
            state: HEAD,
            stash: Vec::new(),
            stash_pos: 0,
            framing,
            timeouts,
            served: false,
            head_since: Instant::now(),
            sleep: None,
        }
    }

    /// The clock in force for a read in the current state, and its deadline; `None` while a
    /// response is on its way (or a body is read).
    fn clock(&self, slot: &Slot) -> Option<(Wait, Instant)> {
        if slot.responding > 0 {
            return None;
        }
        match self.state {
            State::Head { started: false, .. } if self.served => Some((
                Wait::Idle,
                slot.idle_since.unwrap_or(self.head_since) + self.timeouts.keepalive,
            )),
            State::Head { .. } => Some((Wait::Head, self.head_since + self.timeouts.header)),
            _ => None,
        }
    }

    /// For a read that found no data: pending, or the end of the connection if `clock` ran out
    /// (see the module docs). Without a clock the timer is still kept armed, no later than now
    /// plus the shorter timeout: the next clock starts from an event that does not wake this
    /// task (the end of a response), and no earlier than now.
    fn expired(
        &mut self,
        clock: Option<(Wait, Instant)>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        let target = match clock {
            Some((_, deadline)) => deadline,
            // The next clock starts no earlier than now, so it ends no earlier than this.
            None => {
                let bound = Instant::now() + self.timeouts.header.min(self.timeouts.keepalive);
                match &self.sleep {
                    Some(sleep) if !sleep.is_elapsed() && sleep.deadline() <= bound => {
                        return Poll::Pending;
                    }
                    _ => bound,
                }
            }
        };
        let sleep = match &mut self.sleep {
            Some(sleep) => {
                if sleep.deadline() > target || sleep.is_elapsed() {
                    sleep.as_mut().reset(target);
                }
                sleep
            }
            None => self
                .sleep
                .insert(Box::pin(tokio::time::sleep_until(target))),
        };
        loop {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let Some((wait, deadline)) = clock else {
                // A check-back fired with no clock in force: look again in a while.
                let next = Instant::now() + self.timeouts.header.min(self.timeouts.keepalive);
                sleep.as_mut().reset(next);
                continue;
            };
            if sleep.deadline() < deadline {
                // Armed for an earlier deadline that has since moved on.
                sleep.as_mut().reset(deadline);
                continue;
            }
            self.state = State::Refused;
            return Poll::Ready(match wait {
                Wait::Idle => Ok(()),
                Wait::Head => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no complete request head within the header timeout",
                )),
            });
        }
    }

    /// Checks `bytes`, just read while in a head. Returns how many to hand over: up to the end
    /// of the head, or up to a bare LF (made a NUL).
    fn scan_head(&mut self, bytes: &mut [u8]) -> usize {
        let State::Head {
            prev,
            line,
            started,
        } = &mut self.state
        else {
            unreachable!("only called in a head")
        };
        for (i, b) in bytes.iter_mut().enumerate() {
            let byte = *b;
            let last = std::mem::replace(prev, byte);
            match byte {
                b'\n' if last != b'\r' => {
                    *b = 0;
                    self.state = State::Refused;
                    return i + 1;
                }
                b'\n' if *started && *line == 0 => {
                    self.state = State::AwaitBody;
                    self.served = true;
                    return i + 1;
                }
                b'\n' => *line = 0,
                b'\r' => {}
                _ => {
                    if !*started && self.served {
                        // A later head: its header clock starts at its first byte.
                        self.head_since = Instant::now();
                    }
                    *started = true;
                    *line += 1;
                }
            }
        }
        bytes.len()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for HeadGuard<S> {
    /// The guard's whole state machine in one poll (which clock runs, where the head ends,
    /// what hyper may read): split up, its states would be spread over functions that each
    /// need all of them.
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let clock = {
            let mut slot = this.framing.slot.lock().unwrap_or_else(|e| e.into_inner());
            if this.state == State::AwaitBody {
                match slot.body.take() {
                    Some(Some(0)) => this.state = HEAD,
                    Some(Some(n)) => this.state = State::Body(n),
                    Some(None) => this.state = State::Unchecked,
                    None => {
                        if this.stash_pos == this.stash.len() {
                            // Nothing held back: wait on the socket, so that new bytes (and not
                            // the service) wake this read; what comes waits in the stash.
                            let mut ahead = [MaybeUninit::<u8>::uninit(); READ_AHEAD];
                            let mut ahead = ReadBuf::uninit(&mut ahead);
                            if Pin::new(&mut this.io)
                                .poll_read(cx, &mut ahead)?
                                .is_pending()
                            {
                                return Poll::Pending;
                            }
                            // Bytes, or the end of the stream (which a later read sees again).
                            this.stash.clear();
                            this.stash.extend_from_slice(ahead.filled());
                            this.stash_pos = 0;
                        }
                        slot.waker = Some(cx.waker().clone());
                        return Poll::Pending;
                    }
                }
            }
            this.clock(&slot)
        };
        let limit = match this.state {
            State::Refused => return Poll::Ready(Ok(())),
            State::Body(n) => usize::try_from(n).unwrap_or(usize::MAX),
            _ => usize::MAX,
        }
        .min(buf.remaining());
        let start = buf.filled().len();
        let from_stash = this.stash_pos < this.stash.len();
        if from_stash {
            let n = limit.min(this.stash.len() - this.stash_pos);
            buf.put_slice(&this.stash[this.stash_pos..this.stash_pos + n]);
            this.stash_pos += n;
        } else {
            let mut limited = buf.take(limit);
            let before = limited.filled().as_ptr();
            if Pin::new(&mut this.io)
                .poll_read(cx, &mut limited)?
                .is_pending()
            {
                return this.expired(clock, cx);
            }
            assert_eq!(
                before,
                limited.filled().as_ptr(),
                "the reader swapped buffers"
            );
            let n = limited.filled().len();
            // SAFETY: the inner reader initialised these `n` bytes of `buf`'s unfilled part,
            // which `limited` borrows (as tokio's own `Take` does).
            unsafe { buf.assume_init(n) };
            buf.advance(n);
        }
        let read = buf.filled().len() - start;
        match this.state {
            State::Body(n) => {
                let left = n - read as u64;
                this.state = if left == 0 { HEAD } else { State::Body(left) };
            }
            State::Head { .. } => {
                let keep = this.scan_head(&mut buf.filled_mut()[start..]);
                let rest = read - keep;
                if rest > 0 {
                    if from_stash {
                        this.stash_pos -= rest;
                    } else {
                        this.stash.clear();
                        this.stash.extend_from_slice(&buf.filled()[start + keep..]);
                        this.stash_pos = 0;
                    }
                    buf.set_filled(start + keep);
                }
                if this.state == State::Refused {
                    this.stash.clear();
                    this.stash_pos = 0;
                }
            }
            _ => {}
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for HeadGuard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt as _;

    /// Reads everything hyper would see from `input`, answering each head with the next
    /// framing from `bodies`, in reads of at most `chunk` bytes.
    async fn seen(input: &[u8], bodies: &[Option<u64>], chunk: usize) -> Vec<u8> {
        let framing = Arc::new(Framing::default());
        let timeouts = Timeouts {
            header: Duration::from_secs(3600),
            keepalive: Duration::from_secs(3600),
        };
        let mut guard = HeadGuard::new(input, framing.clone(), timeouts);
        let mut bodies = bodies.iter();
        let mut out = Vec::new();
        let mut buf = vec![0; chunk];
        loop {
            if guard.state == State::AwaitBody {
                framing.set(*bodies.next().expect("a framing per head"));
            }
            let n = guard.read(&mut buf).await.unwrap();
            if n == 0 && guard.state != State::AwaitBody {
                return out;
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    /// A guard over one end of a pipe, a request head sent and read through it, and its
    /// response begun.
    async fn after_a_request(
        timeouts: Timeouts,
    ) -> (
        HeadGuard<tokio::io::DuplexStream>,
        tokio::io::DuplexStream,
        Arc<Framing>,
    ) {
        use tokio::io::AsyncWriteExt as _;

        let (mut client, server) = tokio::io::duplex(4096);
        let framing = Arc::new(Framing::default());
        let mut guard = HeadGuard::new(server, framing.clone(), timeouts);
        let head = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        client.write_all(head).await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(guard.read(&mut buf).await.unwrap(), head.len());
        framing.set(Some(0));
        (guard, client, framing)
    }

    const LONG: Duration = Duration::from_secs(3600);
    const SHORT: Duration = Duration::from_millis(50);

    #[tokio::test]
    async fn no_clock_runs_while_a_response_is_on_its_way() {
        let (mut guard, _client, _framing) = after_a_request(Timeouts {
            header: SHORT,
            keepalive: SHORT,
        })
        .await;
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(10 * SHORT, guard.read(&mut buf)).await;
        assert!(read.is_err(), "the read ended while responding: {read:?}");
    }

    #[tokio::test]
    async fn an_idle_connection_ends_at_the_keepalive_timeout() {
        let (mut guard, _client, framing) = after_a_request(Timeouts {
            header: LONG,
            keepalive: SHORT,
        })
        .await;
        framing.responded();
        let mut buf = [0u8; 64];
        // The end of the stream, for hyper a graceful close.
        assert_eq!(guard.read(&mut buf).await.unwrap(), 0);
        assert_eq!(guard.read(&mut buf).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn the_keepalive_clock_starts_at_the_end_of_a_response_that_did_not_wake_the_read() {
        use tokio::io::AsyncWriteExt as _;

        let (mut client, server) = tokio::io::duplex(4096);
        let framing = Arc::new(Framing::default());
        let timeouts = Timeouts {
            header: LONG,
            keepalive: SHORT,
        };
        let mut guard = HeadGuard::new(server, framing.clone(), timeouts);
        let mut buf = [0u8; 64];
        // A read that waits for the first head arms the timer for the (long) header clock.
        assert!(
            tokio::time::timeout(SHORT, guard.read(&mut buf))
                .await
                .is_err()
        );
        let head = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        client.write_all(head).await.unwrap();
        assert_eq!(guard.read(&mut buf).await.unwrap(), head.len());
        framing.set(Some(0));
        // Polled by hand, as hyper does: again only once woken.
        struct Woken(std::sync::atomic::AtomicBool);
        impl std::task::Wake for Woken {
            fn wake(self: Arc<Self>) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let woken = Arc::new(Woken(Default::default()));
        let waker = Waker::from(woken.clone());
        let mut cx = Context::from_waker(&waker);
        // The read waits while the response is on its way; the response's end wakes nobody.
        let poll = Pin::new(&mut guard).poll_read(&mut cx, &mut ReadBuf::new(&mut buf));
        assert!(poll.is_pending());
        framing.responded();
        let deadline = Instant::now() + 40 * SHORT;
        loop {
            while !woken.0.swap(false, std::sync::atomic::Ordering::SeqCst) {
                assert!(
                    Instant::now() < deadline,
                    "the idle connection was never woken: no keep-alive clock ran"
                );
                tokio::time::sleep(SHORT / 5).await;
            }
            let mut read = ReadBuf::new(&mut buf);
            if let Poll::Ready(done) = Pin::new(&mut guard).poll_read(&mut cx, &mut read) {
                done.unwrap();
                assert!(read.filled().is_empty(), "the end of the stream");
                break;
            }
        }
    }

    #[tokio::test]
    async fn a_later_head_gets_the_header_timeout_from_its_first_byte() {
        use tokio::io::AsyncWriteExt as _;

        let (mut guard, mut client, framing) = after_a_request(Timeouts {
            header: SHORT,
            keepalive: LONG,
        })
        .await;
        framing.responded();
        let mut buf = [0u8; 64];
        // Idle for longer than the header timeout: still open.
        let idle = tokio::time::timeout(10 * SHORT, guard.read(&mut buf)).await;
        assert!(idle.is_err(), "an idle connection got the header timeout");
        client.write_all(b"GET / HT").await.unwrap();
        assert_eq!(guard.read(&mut buf).await.unwrap(), 8);
        let err = guard.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(guard.read(&mut buf).await.unwrap(), 0, "nothing after it");
    }

    #[tokio::test]
    async fn heads_with_crlf_and_bodies_with_bare_lf_pass_unchanged() {
        let input = b"\r\nPOST / HTTP/1.1\r\nContent-Length: 4\r\n\r\na\nb\nGET / HTTP/1.1\r\n\r\nPOST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n\n\n\r\n0\r\n\r\n";
        for chunk in [1, 3, 7, 4096] {
            let out = seen(input, &[Some(4), Some(0), None], chunk).await;
            assert_eq!(out, input, "reads of {chunk}");
        }
    }

    #[tokio::test]
    async fn a_bare_lf_in_a_head_becomes_a_nul_and_ends_the_stream() {
        for (input, bodies, expected) in [
            (
                &b"GET / HTTP/1.1\nHost: x\n\n"[..],
                &[][..],
                &b"GET / HTTP/1.1\0"[..],
            ),
            (
                b"GET / HTTP/1.1\r\nHost: x\n\r\n",
                &[],
                b"GET / HTTP/1.1\r\nHost: x\0",
            ),
            (
                b"GET / HTTP/1.1\r\nHost: x\r\n\n",
                &[],
                b"GET / HTTP/1.1\r\nHost: x\r\n\0",
            ),
            // After a body of known length, the next head is checked again.
            (
                b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\n\n\nGET /\nX",
                &[Some(2)],
                b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\n\n\nGET /\0",
            ),
        ] {
            for chunk in [1, 5, 4096] {
                let out = seen(input, bodies, chunk).await;
                assert_eq!(
                    String::from_utf8_lossy(&out),
                    String::from_utf8_lossy(expected),
                    "reads of {chunk}"
                );
            }
        }
    }
}
