//! What clients and operators read when something fails: aborted responses that must not look
//! complete, error bodies without the host's internals, causes kept whole, wasi:http's fields
//! limit, plain log files.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::Duration;

use crate::support::{App, request};

/// The request id in an error body: `… (H13, request id ID)`.
fn body_request_id(body: &str) -> String {
    let start = body.find("request id ").expect("a request id") + "request id ".len();
    body[start..].trim_end().trim_end_matches(')').to_string()
}

#[test]
fn a_chunked_upload_cut_after_the_answer_started_ends_in_an_abort_and_h25() {
    let app = App::new("web: {guests}/test_web.wasm\n");
    let host = app.up(&["--max-body", "64KiB"]);
    let mut stream = TcpStream::connect(host.addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
        .write_all(b"POST /stream-echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        .unwrap();
    let chunk = |stream: &mut TcpStream| {
        let data = vec![b'a'; 8192];
        let _ = stream.write_all(format!("{:x}\r\n", data.len()).as_bytes());
        let _ = stream.write_all(&data);
        let _ = stream.write_all(b"\r\n");
    };
    // The guest answers (and echoes) before the body goes over the limit.
    for _ in 0..2 {
        chunk(&mut stream);
    }
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..30 {
        chunk(&mut stream);
    }
    let _ = stream.write_all(b"0\r\n\r\n");
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "{}",
        &text[..text.len().min(300)]
    );
    assert!(
        text.contains("transfer-encoding: chunked"),
        "{}",
        &text[..300]
    );
    // No last chunk: the client can tell the answer is incomplete.
    assert!(
        !text.ends_with("0\r\n\r\n"),
        "the aborted response ends like a complete one ({} bytes)",
        raw.len()
    );
    let out = host.wait_for("code=H25", Duration::from_secs(10));
    assert!(
        out.contains("response aborted: the request body went over 65536 bytes after the response had started"),
        "{out}"
    );
    assert!(
        out.contains("stream-echo: reading the request body failed"),
        "{out}"
    );
    // A declared length over the limit is still refused cleanly before the guest runs.
    let refused = request(
        host.addr(),
        "POST /stream-echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(refused.status, 413, "{refused:?}");
}

#[test]
fn error_bodies_carry_the_code_and_a_request_id_not_the_hosts_internals() {
    let app = App::new("web: {guests}/test_web.wasm\n");
    let host = app.up(&[]);
    let trapped = host.get("/panic");
    assert_eq!(trapped.status, 502, "{trapped:?}");
    for secret in ["web.1", "trap", "panic", "unreachable"] {
        assert!(
            !trapped.body.contains(secret),
            "`{secret}` in {:?}",
            trapped.body
        );
    }
    assert!(
        trapped.body.starts_with(
            "application error: the app failed while answering this request (H13, request id "
        ),
        "{:?}",
        trapped.body
    );
    let id = body_request_id(&trapped.body);
    assert_eq!(id.len(), 16, "{id}");
    assert_eq!(trapped.header("x-request-id"), Some(id.as_str()));
    // The operator finds the request in the log, with the instance and the trap.
    let out = host.wait_for(&format!("request_id={id}"), Duration::from_secs(10));
    let line = out.lines().find(|l| l.contains(&id)).unwrap();
    assert!(
        line.contains("code=H13") && line.contains("instance=web.1"),
        "{line}"
    );
    host.wait_for("web.1 crashed: wasm trap", Duration::from_secs(10));
    // A client's own request id is kept.
    let mine = request(
        host.addr(),
        "GET /panic HTTP/1.1\r\nHost: x\r\nX-Request-Id: ci-run-42.7\r\nConnection: close\r\n\r\n",
    );
    assert!(mine.body.contains("request id ci-run-42.7)"), "{mine:?}");
    host.wait_for("request_id=ci-run-42.7", Duration::from_secs(10));
    drop(host);

    // `--error-detail`, for local development, shows the failure.
    let host = app.up(&["--error-detail"]);
    let detailed = host.get("/panic");
    assert!(
        detailed.body.starts_with("web.1 crashed: wasm trap"),
        "{:?}",
        detailed.body
    );
}

#[test]
fn the_fields_limit_is_a_setting_and_its_errors_keep_their_cause() {
    let app = App::new("web: {guests}/hello.wasm\n");
    let host = app.up(&["--max-http-fields-size", "2KiB"]);
    let header = |size: usize| {
        format!(
            "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
            "b".repeat(size)
        )
    };
    let under = request(host.addr(), &header(1024));
    assert_eq!(under.status, 200, "{under:?}");
    let over = request(host.addr(), &header(3000));
    assert_eq!(over.status, 431, "{over:?}");
    assert!(
        over.body
            .starts_with("request header fields over 2048 bytes (as wasi:http counts them) (H25"),
        "{:?}",
        over.body
    );
    host.wait_for(
        "desc=\"Request header fields too large\"",
        Duration::from_secs(10),
    );
}

#[test]
fn a_log_written_to_a_file_has_no_escape_codes() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let app = App::new("web: {guests}/test_web.wasm\n");
    app.write(
        "wasmform.toml",
        &format!("[processes.web]\nallowed_outbound_hosts = [\"http://127.0.0.1:{port}\"]\n"),
    );
    // `up`'s output is a pipe here, as a log file would be.
    let host = app.up(&[]);
    let fetched = host.get(&format!("/fetch?url=http://127.0.0.1:{port}/"));
    assert_eq!(fetched.status, 502, "{fetched:?}");
    let out = host.wait_for("WARN", Duration::from_secs(10));
    assert!(
        !out.contains('\x1b'),
        "escape codes in a piped log: {out:?}"
    );
}
