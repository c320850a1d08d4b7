//! The HTTP front door: request limits answered before any guest runs, and router log lines.

use std::time::Duration;

use crate::support::{App, request};

#[test]
fn oversized_requests_are_refused_before_the_guest_runs() {
    let app = App::new("web: {guests}/test_web.wasm\n");
    let host = app.up(&["--max-body", "64KiB", "--max-headers", "20"]);
    let addr = host.addr();

    let response = request(
        addr,
        "POST /count HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(response.status, 413, "{response:?}");
    assert!(
        response.body.contains("request body over 65536 bytes"),
        "{}",
        response.body
    );
    host.wait_for("at=error code=H25", Duration::from_secs(5));

    let headers: String = (0..30).map(|i| format!("X-Filler-{i}: {i}\r\n")).collect();
    let response = request(
        addr,
        &format!("GET /count HTTP/1.1\r\nHost: x\r\n{headers}\r\n"),
    );
    assert_eq!(response.status, 431, "{response:?}");

    // Neither request reached the guest: its counter starts at 1.
    assert_eq!(host.get("/count").body, "1\n");
}

#[test]
fn every_request_gets_a_router_log_line_unless_switched_off() {
    let app = App::new("web: {guests}/hello.wasm\n");
    let host = app.up(&[]);
    assert_eq!(host.get("/hi?x=1").status, 200);
    let out = host.wait_for(
        "at=info method=GET path=\"/hi\" instance=web.1 service=",
        Duration::from_secs(5),
    );
    assert!(out.contains("status=200"), "{out}");
    drop(host);

    let host = app.up(&["--no-router-log"]);
    assert_eq!(host.get("/quiet").status, 200);
    assert_eq!(host.get("/no-such-thing").status, 200);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!host.output().contains("at=info"), "{}", host.output());
}

#[test]
fn trap_after_the_body_started_aborts_the_connection() {
    use std::io::{Read as _, Write as _};

    let app = App::new("web: {guests}/test_web.wasm\n");
    let host = app.up(&[]);
    let mut stream = std::net::TcpStream::connect(host.addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
        .write_all(b"GET /trap-after-headers HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut raw = Vec::new();
    // Ends with EOF or a reset, possibly before hyper flushed anything: either way the client
    // must not see a complete response.
    let _ = stream.read_to_end(&mut raw);
    let raw = String::from_utf8_lossy(&raw);
    assert!(raw.is_empty() || raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(
        !raw.ends_with("0\r\n\r\n"),
        "a trapped stream must not look complete: {raw:?}"
    );
    host.wait_for("web.1 crashed: ", Duration::from_secs(10));
    assert_eq!(host.get("/whoami").status, 200);
}
