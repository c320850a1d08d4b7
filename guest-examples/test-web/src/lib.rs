//! `test-web`: a web component with one route per behaviour the host must
//! handle (state across requests, memory limits, traps, runaway CPU, logging,
//! streaming bodies, broken responses). See ../README.md for the contract.

use std::hint::black_box;
use std::str::FromStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use wasip2::http::types::{
    ErrorCode, Fields, IncomingBody, IncomingRequest, OutgoingBody, OutgoingResponse,
    ResponseOutparam,
};
use wasip2::io::streams::{OutputStream, StreamError};

const MIB: usize = 1024 * 1024;

/// Requests to `/count` seen by this instance (instances are long-lived).
static COUNT: AtomicU64 = AtomicU64::new(0);
/// Set by `/sick`: from then on `/health` answers 503.
static SICK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// Memory grabbed by `/alloc`, never freed so that repeated calls accumulate.
static HELD: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// Status and body of a plain-text response.
type Reply = (u16, String);

struct TestWeb;

wasip2::http::proxy::export!(TestWeb);

impl wasip2::exports::http::incoming_handler::Guest for TestWeb {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let path_with_query = request.path_with_query().unwrap_or_else(|| "/".into());
        let (path, query) = path_with_query
            .split_once('?')
            .unwrap_or((&path_with_query, ""));

        // Routes that need the request body or misuse the response protocol.
        match path {
            "/echo" => return echo(&request, response_out),
            "/stream-echo" => return stream_echo(&request, response_out),
            "/consume" => return consume(&request, response_out),
            // Dropping the outparam unset: the host must notice no response came.
            "/no-response" => return,
            // An error code instead of a response: the only invalid answer wasi-http lets a
            // guest give (fields and status codes are validated as the guest builds them).
            "/error-code" => {
                let code = ErrorCode::InternalError(Some("test-web error code".into()));
                return ResponseOutparam::set(response_out, Err(code));
            }
            "/trap-after-headers" => trap_after_headers(response_out),
            _ => {}
        }

        let (status, body) = route(path, query).unwrap_or_else(|bad| bad);
        let out_body = send_head(response_out, status, "text/plain; charset=utf-8");
        let stream = out_body.write().expect("body stream taken once");
        write_all(&stream, body.as_bytes());
        finish(stream, out_body);
    }
}

/// Plain-text routes. `Err` carries a 400 reply for a bad query parameter.
fn route(path: &str, query: &str) -> Result<Reply, Reply> {
    let instance = instance();
    let reply = match path {
        "/whoami" => (200, format!("{instance}\n")),
        // A response of `n` bytes, for the benchmark's large-response row.
        "/bytes" => {
            let n: usize = required(query, "n")?;
            if n > 16 * MIB {
                return Err(bad("n over 16 MiB"));
            }
            (200, "x".repeat(n))
        }
        "/count" => {
            let n = COUNT.fetch_add(1, Ordering::Relaxed) + 1;
            (200, format!("{n}\n"))
        }
        "/alloc" => {
            let mb: usize = required(query, "mb")?;
            // A non-zero fill makes every page really committed (a zeroed
            // allocation could stay untouched). Past the host's memory limit
            // the allocation fails, Rust aborts and the instance traps.
            let bytes = mb.checked_mul(MIB).ok_or_else(|| bad("mb too large"))?;
            let block = vec![0xA5u8; bytes];
            let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
            held.push(block);
            let total: usize = held.iter().map(|b| b.len() / MIB).sum();
            (200, format!("allocated {mb} MiB, holding {total} MiB\n"))
        }
        "/panic" => panic!("test-web panic requested"),
        "/spin" => {
            let ms: Option<u64> = optional(query, "ms")?;
            spin(ms.map(Duration::from_millis));
            (200, format!("spun {} ms\n", ms.unwrap_or_default()))
        }
        "/sleep" => {
            let ms: u64 = required(query, "ms")?;
            std::thread::sleep(Duration::from_millis(ms));
            (200, format!("slept {ms} ms\n"))
        }
        "/env" => match param(query, "name") {
            Some(name) => match std::env::var(&name) {
                Ok(value) => (200, format!("{value}\n")),
                Err(_) => (404, "unset\n".into()),
            },
            None => {
                let mut vars: Vec<String> = std::env::vars()
                    .map(|(k, v)| format!("{k}={v}\n"))
                    .collect();
                vars.sort();
                (200, vars.concat())
            }
        },
        "/print" => {
            let n: u64 = required(query, "n")?;
            for i in 1..=n {
                println!("line {i} from {instance}");
            }
            (200, format!("printed {n}\n"))
        }
        "/stderr" => {
            let msg = param(query, "msg").ok_or_else(|| bad("missing msg"))?;
            eprintln!("{msg}");
            (200, "printed to stderr\n".into())
        }
        "/status" => {
            let code: u16 = required(query, "code")?;
            // The range `http::StatusCode` accepts; anything else the host rejects.
            if !(100..=999).contains(&code) {
                return Err(bad("code must be 100..=999"));
            }
            (code, format!("status {code}\n"))
        }
        "/stack-overflow" => {
            let depth = recurse(0);
            (200, format!("recursion returned at depth {depth}?\n"))
        }
        "/health" => {
            // `HEALTH_STATUS` (default 200) unless `/sick` was requested on this instance.
            let status = match std::env::var("HEALTH_STATUS") {
                Ok(code) => code.parse().map_err(|_| bad("HEALTH_STATUS is not a number"))?,
                Err(_) => 200,
            };
            if SICK.load(Ordering::Relaxed) {
                (503, "sick\n".into())
            } else {
                (status, format!("health {status}\n"))
            }
        }
        "/sick" => {
            SICK.store(true, Ordering::Relaxed);
            (200, format!("{instance} is sick now\n"))
        }
        "/fetch" => {
            let url = param(query, "url").ok_or_else(|| bad("missing url"))?;
            match fetch(&url) {
                Ok((status, body)) => (200, format!("fetched {status}: {body}")),
                Err(why) => (502, format!("fetch failed: {why}\n")),
            }
        }
        "/" => (200, format!("test-web {instance}: ok\n")),
        _ => (404, format!("not found: {path}\n")),
    };
    Ok(reply)
}

/// GET `url` (`http://host:port/path`) with `wasi:http/outgoing-handler`; returns the status
/// and the body as text, or the error code.
fn fetch(url: &str) -> Result<(u16, String), String> {
    use wasip2::http::outgoing_handler;
    use wasip2::http::types::{OutgoingRequest, Scheme};

    let (scheme, rest) = url.split_once("://").ok_or("url needs a scheme")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let request = OutgoingRequest::new(Fields::new());
    request
        .set_scheme(Some(&match scheme {
            "https" => Scheme::Https,
            _ => Scheme::Http,
        }))
        .map_err(|()| "bad scheme")?;
    request.set_authority(Some(authority)).map_err(|()| "bad authority")?;
    request.set_path_with_query(Some(path)).map_err(|()| "bad path")?;
    let future = outgoing_handler::handle(request, None).map_err(|e| format!("{e:?}"))?;
    future.subscribe().block();
    let response = future
        .get()
        .ok_or("no response")?
        .map_err(|()| "response taken twice")?
        .map_err(|e| format!("{e:?}"))?;
    let status = response.status();
    let body = response.consume().map_err(|()| "body taken twice")?;
    let stream = body.stream().map_err(|()| "stream taken twice")?;
    let mut bytes = Vec::new();
    loop {
        match stream.blocking_read(64 * 1024) {
            Ok(chunk) => bytes.extend_from_slice(&chunk),
            Err(StreamError::Closed) => break,
            Err(e) => return Err(format!("body read failed: {e:?}")),
        }
    }
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

fn instance() -> String {
    std::env::var("WASMFORM_INSTANCE").unwrap_or_else(|_| "unknown".into())
}

fn bad(why: &str) -> Reply {
    (400, format!("bad request: {why}\n"))
}

/// The value of query parameter `name`, `%XX`-decoded (`+` stays literal).
fn param(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| percent_decode(value))
}

fn optional<T: FromStr>(query: &str, name: &str) -> Result<Option<T>, Reply> {
    param(query, name)
        .map(|v| {
            v.parse()
                .map_err(|_| bad(&format!("invalid {name}: {v:?}")))
        })
        .transpose()
}

fn required<T: FromStr>(query: &str, name: &str) -> Result<T, Reply> {
    optional(query, name)?.ok_or_else(|| bad(&format!("missing {name}")))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Burns CPU for `limit`, or forever. The clock is a host call, so it is read
/// only every 10 million iterations: the loop body itself never leaves wasm,
/// which is what epoch/fuel interruption has to cope with.
fn spin(limit: Option<Duration>) {
    let start = Instant::now();
    let mut x = 0u64;
    loop {
        for _ in 0..10_000_000 {
            x = black_box(x.wrapping_add(1));
        }
        if limit.is_some_and(|limit| start.elapsed() >= limit) {
            return;
        }
    }
}

/// Recurses until the stack runs out. The frame array, `black_box` and the
/// use of `frame` after the call keep this from becoming a loop or a tail call.
#[inline(never)]
fn recurse(depth: u64) -> u64 {
    let mut frame = [0u8; 1024];
    frame[(depth % 1024) as usize] = depth as u8;
    black_box(&mut frame);
    // Never true; it only spares us the `unconditional_recursion` lint.
    if black_box(depth) == u64::MAX {
        return depth;
    }
    recurse(black_box(depth + 1)) + u64::from(frame[(depth % 1024) as usize])
}

/// Streams the request body back as the response body.
fn echo(request: &IncomingRequest, response_out: ResponseOutparam) {
    let in_body = request.consume().expect("request body consumed once");
    let in_stream = in_body.stream().expect("request stream taken once");
    let out_body = send_head(response_out, 200, "application/octet-stream");
    let out_stream = out_body.write().expect("body stream taken once");
    loop {
        match in_stream.blocking_read(64 * 1024) {
            Ok(chunk) => write_all(&out_stream, &chunk),
            Err(StreamError::Closed) => break,
            Err(StreamError::LastOperationFailed(e)) => {
                panic!("reading request body: {}", e.to_debug_string())
            }
        }
    }
    // Child resources go before their parents.
    drop(in_stream);
    drop(IncomingBody::finish(in_body));
    finish(out_stream, out_body);
}

/// Streams the body back as it arrives, like wasmtime's `p2_api_proxy_streaming` echo: a read
/// error is reported on stderr and the response ends normally with what was read.
fn stream_echo(request: &IncomingRequest, response_out: ResponseOutparam) {
    let in_body = request.consume().expect("request body consumed once");
    let in_stream = in_body.stream().expect("request stream taken once");
    let out_body = send_head(response_out, 200, "application/octet-stream");
    let out_stream = out_body.write().expect("body stream taken once");
    let mut total = 0usize;
    loop {
        match in_stream.blocking_read(64 * 1024) {
            Ok(chunk) => {
                total += chunk.len();
                write_all(&out_stream, &chunk);
            }
            Err(StreamError::Closed) => break,
            Err(StreamError::LastOperationFailed(e)) => {
                eprintln!(
                    "stream-echo: reading the request body failed after {total} bytes: {}",
                    e.to_debug_string()
                );
                break;
            }
        }
    }
    drop(in_stream);
    drop(IncomingBody::finish(in_body));
    finish(out_stream, out_body);
}

/// Reads the whole request body before answering, so the host can still answer for it.
fn consume(request: &IncomingRequest, response_out: ResponseOutparam) {
    let in_body = request.consume().expect("request body consumed once");
    let in_stream = in_body.stream().expect("request stream taken once");
    let mut total = 0usize;
    let outcome = loop {
        match in_stream.blocking_read(64 * 1024) {
            Ok(chunk) => total += chunk.len(),
            Err(StreamError::Closed) => break Ok(()),
            Err(StreamError::LastOperationFailed(e)) => break Err(e.to_debug_string()),
        }
    };
    drop(in_stream);
    drop(IncomingBody::finish(in_body));
    let (status, text) = match outcome {
        Ok(()) => (200, format!("consumed {total} bytes\n")),
        Err(e) => (400, format!("body read failed after {total} bytes: {e}\n")),
    };
    let out_body = send_head(response_out, status, "text/plain; charset=utf-8");
    let out_stream = out_body.write().expect("body stream taken once");
    write_all(&out_stream, text.as_bytes());
    finish(out_stream, out_body);
}

/// Commits a 200 and part of the body, then traps mid-body.
fn trap_after_headers(response_out: ResponseOutparam) -> ! {
    let out_body = send_head(response_out, 200, "text/plain; charset=utf-8");
    let stream = out_body.write().expect("body stream taken once");
    write_all(&stream, b"partial");
    panic!("test-web trap after headers");
}

/// Sends status and headers; the body is written to the returned handle.
fn send_head(response_out: ResponseOutparam, status: u16, content_type: &str) -> OutgoingBody {
    let headers =
        Fields::from_list(&[("content-type".into(), content_type.into())]).expect("valid headers");
    let response = OutgoingResponse::new(headers);
    response.set_status_code(status).expect("valid status");
    let body = response.body().expect("body taken once");
    ResponseOutparam::set(response_out, Ok(response));
    body
}

fn write_all(stream: &OutputStream, bytes: &[u8]) {
    // blocking_write_and_flush accepts at most 4096 bytes per call.
    for chunk in bytes.chunks(4096) {
        stream.blocking_write_and_flush(chunk).expect("write body");
    }
}

fn finish(stream: OutputStream, body: OutgoingBody) {
    // The stream is a child of the body: drop it before finishing the body.
    drop(stream);
    OutgoingBody::finish(body, None).expect("finish body");
}
