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
    let response = host.get("/hi?x=1");
    assert_eq!(response.status, 200);
    let out = host.wait_for(
        "at=info method=GET path=\"/hi\" instance=web.1 connect=",
        Duration::from_secs(5),
    );
    // `connect=0ms service=3ms status=200 bytes=12`, Heroku's fields in Heroku's order.
    let line = out.lines().find(|l| l.contains("at=info")).unwrap();
    let fields: Vec<(&str, &str)> = line
        .split_whitespace()
        .skip_while(|f| !f.starts_with("connect="))
        .filter_map(|f| f.split_once('='))
        .collect();
    let names: Vec<&str> = fields.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, ["connect", "service", "status", "bytes"], "{line}");
    for (name, value) in &fields[..2] {
        let ms = value
            .strip_suffix("ms")
            .unwrap_or_else(|| panic!("{name} in {line}"));
        assert!(ms.parse::<u64>().is_ok(), "{line}");
    }
    assert_eq!(fields[2].1, "200", "{line}");
    assert_eq!(fields[3].1, response.body.len().to_string(), "{line}");
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
    host.wait_for(
        "at=error code=H18 desc=\"Response aborted\" method=GET path=\"/trap-after-headers\" instance=web.1 status=200",
        Duration::from_secs(10),
    );
    assert_eq!(host.get("/whoami").status, 200);
}

#[test]
fn metrics_on_loopback_and_the_control_socket() {
    let app = App::new("web: {guests}/test_web.wasm\n");
    let host = app.up(&["-m", "web=2", "--metrics", "127.0.0.1:0"]);
    for _ in 0..3 {
        assert_eq!(host.get("/whoami").status, 200);
    }
    assert_eq!(host.get("/panic").status, 502);
    host.wait_for("crashed: ", Duration::from_secs(10));
    // The replacement is up again.
    host.wait_until(Duration::from_secs(10), |out| {
        out.contains("web.1 up\n") || out.contains("web.2 up\n")
    })
    .expect("the crashed instance was not replaced");
    let addr = host.logged_addr("metrics on");
    let text = request(
        addr,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .body;
    for line in [
        "wasmform_http_requests_total{type=\"web\",status=\"200\"} 3",
        "wasmform_http_requests_total{type=\"web\",status=\"502\"} 1",
        "wasmform_instance_restarts_total{type=\"web\",reason=\"trap\"} 1",
        "wasmform_desired_instances{type=\"web\"} 2",
        "wasmform_instances{type=\"web\",state=\"up\"} 2",
        "wasmform_queued_requests{type=\"web\"} 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in:\n{text}"
        );
    }
    for name in [
        "wasmform_http_request_duration_seconds_bucket",
        "wasmform_instantiate_seconds_count",
        "wasmform_compile_seconds{type=\"web\"}",
        "wasmform_instance_memory_bytes{type=\"web\",instance=\"web.1\"}",
        "wasmform_capacity_bytes",
    ] {
        assert!(text.contains(name), "missing `{name}` in:\n{text}");
    }

    // The numbers match `ps`.
    let ps = app.ps();
    let text = request(
        addr,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .body;
    for instance in ps["instances"].as_array().unwrap() {
        let line = format!(
            "wasmform_instance_memory_bytes{{type=\"web\",instance=\"{}\"}} {}",
            instance["id"].as_str().unwrap(),
            instance["memory_used"]
        );
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in:\n{text}"
        );
    }
    let running = ps["types"][0]["running"].as_u64().unwrap();
    assert!(
        text.lines()
            .any(|l| l == format!("wasmform_running_instances{{type=\"web\"}} {running}"))
    );

    // The same exposition on the control socket.
    let raw = app.control_get("/metrics");
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(
        raw.contains("wasmform_desired_instances{type=\"web\"} 2"),
        "{raw}"
    );
    // The content type says what the body is: OpenMetrics (`# EOF`, `_total` counters).
    assert!(
        raw.contains("content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"),
        "{raw}"
    );
    assert!(raw.trim_end().ends_with("# EOF"), "{raw}");
}

#[test]
fn metrics_refuse_non_loopback_addresses() {
    let app = App::new("web: {guests}/hello.wasm\n");
    let out = app.up_fails(&["--metrics", "0.0.0.0:0"]);
    assert!(
        out.contains("metrics are served on loopback addresses only"),
        "{out}"
    );
}

#[test]
fn malformed_requests_get_400_and_nothing_can_be_smuggled() {
    let app = App::new("web: {guests}/test_web.wasm\n");
    let host = app.up(&[]);
    let addr = host.addr();
    for raw in [
        // Conflicting Content-Lengths.
        "POST /count HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        // Invalid bytes in a header name.
        "GET /count HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n",
        // Not HTTP at all.
        "HELLO\r\n\r\n",
    ] {
        let response = request(addr, raw);
        assert_eq!(response.status, 400, "{raw:?}: {response:?}");
    }
    // None of those reached the guest.
    assert_eq!(host.get("/count").body, "1\n");

    // Content-Length with Transfer-Encoding, the classic smuggling vector: hyper frames the
    // request by Transfer-Encoding (RFC 9112 §6.3), drops the Content-Length and closes the
    // connection after the response, so the request hidden behind it is never read.
    let response = request(
        addr,
        "POST /count HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /count HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert_eq!(response.header("connection"), Some("close"), "{response:?}");
    assert_eq!(response.body, "2\n", "one response only");
    assert_eq!(host.get("/count").body, "3\n", "the smuggled GET never ran");
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    use std::io::{Read as _, Write as _};

    let app = App::new("web: {guests}/test_web.wasm\n");
    let host = app.up(&[]);
    let mut stream = std::net::TcpStream::connect(host.addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let pipeline: String = (1..=3)
        .map(|i| {
            let close = if i == 3 { "Connection: close\r\n" } else { "" };
            format!(
                "GET /status?code={} HTTP/1.1\r\nHost: x\r\n{close}\r\n",
                200 + i
            )
        })
        .collect();
    stream.write_all(pipeline.as_bytes()).unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    let statuses: Vec<&str> = raw
        .lines()
        .filter(|l| l.starts_with("HTTP/1.1 "))
        .map(|l| &l[9..12])
        .collect();
    assert_eq!(statuses, ["201", "202", "203"], "{raw}");
}

#[test]
fn slow_headers_are_cut_off_and_normal_clients_are_unaffected() {
    use std::io::{Read as _, Write as _};

    let app = App::new("web: {guests}/hello.wasm\n");
    let host = app.up(&["--header-timeout", "1s"]);
    let mut slow = std::net::TcpStream::connect(host.addr()).unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost").unwrap();
    // Normal clients are served while the slow one dawdles.
    for _ in 0..5 {
        assert_eq!(host.get("/").status, 200);
    }
    // The server hangs up on the slow client (a read would block forever otherwise; the
    // 20 s read timeout only bounds the test).
    slow.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut rest = Vec::new();
    let outcome = slow.read_to_end(&mut rest);
    assert!(
        outcome.is_ok()
            || outcome
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "the slow connection was not closed: {outcome:?}"
    );
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.is_empty() || rest.starts_with("HTTP/1.1 408"),
        "{rest}"
    );
}

#[test]
fn the_head_cap_is_a_setting_and_a_long_uri_gets_414() {
    let app = App::new("web: {guests}/test_web.wasm\n");
    let long_uri = format!(
        "GET /{} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "a".repeat(70_000)
    );
    // Within the default 64 KiB cap the head does not fit: 431.
    let host = app.up(&[]);
    assert_eq!(request(host.addr(), &long_uri).status, 431);
    drop(host);

    // With room for it, the URI itself is too long: 414.
    let host = app.up(&["--max-head-bytes", "128KiB"]);
    let response = request(host.addr(), &long_uri);
    assert_eq!(response.status, 414, "{response:?}");
    assert_eq!(host.get("/whoami").status, 200);
    drop(host);

    // A smaller cap refuses heads the default takes.
    let big_header = format!(
        "GET /whoami HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "b".repeat(3000)
    );
    let host = app.up(&["--max-head-bytes", "2KiB"]);
    assert_eq!(request(host.addr(), &big_header).status, 431);
    assert_eq!(host.get("/whoami").status, 200);
    drop(host);

    for (value, expected) in [
        (
            "10",
            "invalid size `10`: no unit; expected a size with a unit",
        ),
        (
            "100B",
            "invalid head size `100B`: must be from 1KiB to 16MiB",
        ),
        ("1TiB", "invalid size `1TiB`: unknown unit `TiB`"),
    ] {
        let out = app.up_fails(&["--max-head-bytes", value]);
        assert!(out.contains(expected), "{value}: {out}");
    }
    let out = app.up_fails(&["--keepalive-timeout", "0s"]);
    assert!(
        out.contains("invalid duration `0s`: must be above zero"),
        "{out}"
    );
    let out = app.up_fails(&["--max-connections", "0"]);
    assert!(
        out.contains("invalid value '0' for '--max-connections"),
        "{out}"
    );
}

/// Reads one response from a keep-alive connection (a `Content-Length` or chunked body).
fn read_response(stream: &mut std::net::TcpStream) -> String {
    use std::io::Read as _;

    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&bytes).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head.lines().find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>().unwrap())
            });
            let complete = match length {
                Some(n) => body.len() >= n,
                None => body.ends_with("0\r\n\r\n"),
            };
            if complete {
                return text;
            }
        }
        let n = stream.read(&mut buf).expect("read a response");
        assert!(n > 0, "the connection closed mid-response: {text:?}");
        bytes.extend_from_slice(&buf[..n]);
    }
}

/// Whether the server closes `stream` (without sending anything) before the read timeout.
fn closed_silently(stream: &mut std::net::TcpStream) -> Result<(), String> {
    use std::io::Read as _;

    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest) {
        Ok(_) if rest.is_empty() => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
        other => Err(format!("{other:?}: {:?}", String::from_utf8_lossy(&rest))),
    }
}

#[test]
fn idle_keep_alive_connections_have_their_own_timeout() {
    use std::io::Write as _;

    let app = App::new("web: {guests}/test_web.wasm\n");
    let get = b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n";

    // Idle longer than the header timeout but within the keep-alive timeout: still served.
    let host = app.up(&["--header-timeout", "1s", "--keepalive-timeout", "60s"]);
    let mut stream = std::net::TcpStream::connect(host.addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream.write_all(get).unwrap();
    assert!(read_response(&mut stream).starts_with("HTTP/1.1 200"));
    std::thread::sleep(Duration::from_secs(3));
    stream.write_all(get).unwrap();
    let second = read_response(&mut stream);
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
    // A later head that stalls is cut off by the header timeout (the keep-alive one is far).
    stream.write_all(b"GET /whoami HTTP/1.1\r\nHo").unwrap();
    closed_silently(&mut stream).expect("a stalled second head is cut off");
    drop(host);

    // An idle connection is closed at the keep-alive timeout, though the header timeout is far.
    let host = app.up(&["--header-timeout", "60s", "--keepalive-timeout", "1s"]);
    let mut stream = std::net::TcpStream::connect(host.addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream.write_all(get).unwrap();
    assert!(read_response(&mut stream).starts_with("HTTP/1.1 200"));
    closed_silently(&mut stream).expect("an idle keep-alive connection is closed");
    // The manifest sets it too.
    drop(host);
    app.write("wasmform.toml", "[http]\nkeepalive_timeout = \"1s\"\n");
    let host = app.up(&[]);
    let mut stream = std::net::TcpStream::connect(host.addr()).unwrap();
    stream.write_all(get).unwrap();
    assert!(read_response(&mut stream).starts_with("HTTP/1.1 200"));
    closed_silently(&mut stream).expect("the manifest's keep-alive timeout applies");
}

#[test]
fn a_guest_flooding_its_output_loses_lines_not_host_memory() {
    let app = App::new("web: {guests}/test_web.wasm\n");
    let host = app.up(&["--no-router-log"]);
    let before = host.rss_kib();
    // The terminal stops reading (the pipe fills up) while the guest prints 100 000 lines:
    // the host keeps serving, holds at most its bounded buffer, and drops the rest.
    host.pause_output(true);
    assert_eq!(host.get("/print?n=100000").status, 200);
    assert_eq!(
        host.get("/whoami").status,
        200,
        "a blocked terminal does not block requests"
    );
    let during = host.rss_kib();
    host.pause_output(false);
    assert_eq!(host.get("/whoami").status, 200);
    let out = host.wait_for(
        "lines dropped (output faster than the log can take)",
        Duration::from_secs(60),
    );
    assert!(
        out.contains("line 1 from web.1"),
        "the first lines are printed"
    );
    assert!(
        out.lines().any(|l| l.contains(" web.1 | … ")
            && l.ends_with(" lines dropped (output faster than the log can take)")),
        "the drops are reported under the instance that lost them:\n{out}"
    );
    assert!(
        during < before + 64 * 1024,
        "host RSS grew from {before} KiB to {during} KiB"
    );
}

#[test]
fn a_flooding_instance_loses_only_its_own_lines() {
    let app = App::new("web: {guests}/test_web.wasm\nclock: {guests}/ticker.wasm 20\n");
    let host = app.up(&[]);
    host.wait_for("tick 3 from clock.1", Duration::from_secs(30));
    // The terminal stops reading while web.1 prints far more than its share of the log's
    // buffer; meanwhile the router logs requests and clock.1 keeps ticking.
    host.pause_output(true);
    assert_eq!(host.get("/print?n=100000").status, 200);
    for i in 0..20 {
        assert_eq!(host.get(&format!("/probe-{i}")).status, 404);
    }
    // Let clock.1 tick while the output is blocked (every tick must survive it).
    std::thread::sleep(Duration::from_millis(2000));
    host.pause_output(false);
    let out = host.wait_for(
        "at=info method=GET path=\"/probe-19\"",
        Duration::from_secs(60),
    );
    let ticks: Vec<u64> = out
        .lines()
        .filter_map(|l| {
            l.split_once(" clock.1 | tick ")?
                .1
                .strip_suffix(" from clock.1")
        })
        .map(|n| n.parse().unwrap())
        .collect();
    let last = *ticks.last().unwrap();
    // Ticks every 20 ms at idle priority: a loaded machine may starve it, but not for 2 s.
    assert!(
        last > 6,
        "clock.1 ticked while the output was blocked: {ticks:?}"
    );
    assert_eq!(
        ticks,
        (1..=last).collect::<Vec<_>>(),
        "no tick of clock.1 was lost"
    );
    for i in 0..20 {
        assert!(
            out.contains(&format!("path=\"/probe-{i}\" instance=web.1 ")),
            "router line for /probe-{i} was lost:\n{out}"
        );
    }
    // Only web.1 lost lines; each report (one per stretch of drops) says how many.
    let mut count = 0;
    for line in out.lines().filter(|l| l.contains(" lines dropped ")) {
        let n = line
            .split_once(" web.1 | … ")
            .and_then(|(_, rest)| {
                rest.strip_suffix(" lines dropped (output faster than the log can take)")
            })
            .unwrap_or_else(|| panic!("not web.1's report: {line}"));
        count += n.parse::<u64>().unwrap();
    }
    assert!(count > 0, "web.1 lost lines and said so:\n{out}");
    let printed = out.lines().filter(|l| l.contains(" from web.1")).count() as u64;
    assert_eq!(printed + count, 100_000, "every line is printed or counted");
}

#[test]
fn thousands_of_connections_queue_to_the_bound_then_get_503_and_the_host_recovers() {
    let app = App::new("web: {guests}/test_web.wasm\n");
    let host = app.up(&["-m", "web=4", "--queue", "40", "--no-router-log"]);
    let addr = host.addr();
    let before = host.rss_kib();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let statuses: Vec<u16> = runtime.block_on(async move {
        let tasks: Vec<_> = (0..5000)
            .map(|_| {
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
                    stream
                        .write_all(
                            b"GET /sleep?ms=500 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                        )
                        .await
                        .ok()?;
                    let mut raw = Vec::new();
                    tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut raw))
                        .await
                        .ok()?
                        .ok()?;
                    String::from_utf8_lossy(&raw)
                        .get(9..12)?
                        .parse::<u16>()
                        .ok()
                })
            })
            .collect();
        let mut statuses = Vec::new();
        for task in tasks {
            statuses.push(task.await.unwrap().unwrap_or(0));
        }
        statuses
    });
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 503).count();
    assert_eq!(
        ok + refused,
        5000,
        "every connection got 200 or 503: {:?}",
        {
            let mut other: Vec<_> = statuses
                .iter()
                .filter(|s| **s != 200 && **s != 503)
                .collect();
            other.dedup();
            other
        }
    );
    // At least the busy instances and the queue were served; everything else was refused.
    assert!(ok >= 44, "only {ok} requests were served");
    assert!(refused > 0);
    let after = host.rss_kib();
    assert!(
        after < before + 256 * 1024,
        "host RSS grew from {before} KiB to {after} KiB"
    );
    // Recovery: the load is gone, requests are served again.
    assert_eq!(host.get("/whoami").status, 200);
    host.wait_for("at=error code=H11", Duration::from_secs(5));
}

#[test]
fn a_stalled_request_body_gets_408() {
    use std::io::{Read as _, Write as _};

    let app = App::new("web: {guests}/test_web.wasm\n");
    let host = app.up(&["--body-timeout", "1s"]);
    let mut stream = std::net::TcpStream::connect(host.addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // Promise 100 bytes, send 10, then nothing.
    stream
        .write_all(b"POST /consume HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        .unwrap();
    let mut raw = String::new();
    let _ = stream.read_to_string(&mut raw);
    assert!(raw.starts_with("HTTP/1.1 408"), "{raw:?}");
    assert!(raw.contains("request body stalled for 1 s"), "{raw:?}");
    host.wait_for(
        "at=error code=H28 desc=\"Request body idle\"",
        Duration::from_secs(10),
    );
    // Complete bodies are read as usual.
    let response = request(
        host.addr(),
        "POST /consume HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    );
    assert_eq!(
        (response.status, response.body.as_str()),
        (200, "consumed 5 bytes\n")
    );
}

/// Sends `raw` on a fresh connection and reads until the server closes it.
fn exchange(addr: std::net::SocketAddr, raw: &str) -> String {
    use std::io::{Read as _, Write as _};

    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream.write_all(raw.as_bytes()).unwrap();
    let mut bytes = Vec::new();
    stream
        .read_to_end(&mut bytes)
        .unwrap_or_else(|e| panic!("the connection was not closed for {raw:?}: {e}"));
    String::from_utf8_lossy(&bytes).into_owned()
}

#[test]
fn bare_lf_and_obfuscated_transfer_encodings_get_400_and_close() {
    let app = App::new("web: {guests}/test_web.wasm\n");
    let host = app.up(&[]);
    let addr = host.addr();
    // Each is followed by a request that must never be read: the connection closes after the
    // 400 (`exchange` fails if it stays open).
    let smuggled = "GET /count HTTP/1.1\r\nHost: x\r\n\r\n";
    for raw in [
        // Bare LF line endings: everywhere, in one header line, as the final empty line.
        "GET /count HTTP/1.1\nHost: x\n\n",
        "GET /count HTTP/1.1\r\nHost: x\nX-A: 1\r\n\r\n",
        "GET /count HTTP/1.1\r\nHost: x\r\n\n",
        // A bare LF in the head after a request with a body of known length.
        "POST /count HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nokGET /count HTTP/1.1\nHost: x\r\n\r\n",
        // Obfuscated Transfer-Encoding.
        "POST /count HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        "POST /count HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        "POST /count HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        "POST /count HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "POST /count HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "POST /count HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        "POST /count HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    ] {
        let out = exchange(addr, &format!("{raw}{smuggled}"));
        assert_eq!(
            out.matches("HTTP/1.1 ").count(),
            // The one valid request before a bad head is answered; nothing after it.
            1 + usize::from(raw.starts_with("POST /count HTTP/1.1\r\nHost: x\r\nContent-Length")),
            "{raw:?}: {out}"
        );
        let last = out.rfind("HTTP/1.1 ").unwrap_or(0);
        assert!(
            out[last..].starts_with("HTTP/1.1 400 Bad Request"),
            "{raw:?}: {out}"
        );
    }
    // Only the valid POST before the bare-LF head reached the guest.
    assert_eq!(host.get("/count").body, "2\n");
    let out = exchange(
        addr,
        "POST /count HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    );
    assert!(
        out.contains("unsupported Transfer-Encoding: only a single `chunked` is accepted"),
        "{out}"
    );
}

#[test]
fn bodies_may_hold_bare_lf_without_breaking_keep_alive() {
    let app = App::new("web: {guests}/test_web.wasm\n");
    let host = app.up(&[]);
    // A body of known length: the next request on the connection is served.
    let out = exchange(
        host.addr(),
        "POST /consume HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\na\nb\n\n\nGET /count HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(out.contains("consumed 6 bytes\n"), "{out}");
    assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 2, "{out}");
    assert!(out.contains("\r\n1\n\r\n"), "the counter answered: {out}");
    // A chunked body is served too, and the connection closes after its response: the next
    // head is never read.
    let out = exchange(
        host.addr(),
        "POST /consume HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\na\nb\r\n0\r\n\r\nGET /count HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert_eq!(out.matches("HTTP/1.1 ").count(), 1, "{out}");
    assert!(out.contains("consumed 3 bytes\n"), "{out}");
    assert!(out.contains("connection: close"), "{out}");
    assert_eq!(host.get("/count").body, "2\n");
}

#[test]
fn connections_past_the_cap_get_503_at_once_and_the_host_recovers() {
    use std::io::{Read as _, Write as _};

    let app = App::new("web: {guests}/test_web.wasm\n");
    let host = app.up(&["--max-connections", "50"]);
    // 50 keep-alive connections, each served once and then left open.
    let held: Vec<std::net::TcpStream> = (0..50)
        .map(|_| {
            let mut stream = std::net::TcpStream::connect(host.addr()).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            stream
                .write_all(b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            let mut raw = Vec::new();
            let mut buf = [0u8; 1024];
            while !raw.ends_with(b"\r\n0\r\n\r\n") {
                let n = stream.read(&mut buf).unwrap();
                assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&raw));
                raw.extend_from_slice(&buf[..n]);
            }
            assert!(raw.starts_with(b"HTTP/1.1 200"));
            stream
        })
        .collect();

    let response = host.get("/whoami");
    assert_eq!(response.status, 503, "{response:?}");
    assert_eq!(response.header("retry-after"), Some("1"));
    assert_eq!(response.header("connection"), Some("close"));
    assert!(
        response
            .body
            .contains("all 50 connections of this host are in use (--max-connections)"),
        "{}",
        response.body
    );
    host.wait_for(
        "at=error code=H11 desc=\"Connection limit reached\" connections=50 refused=1 status=503",
        Duration::from_secs(5),
    );

    // Once the held connections close, new ones are served again.
    drop(held);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let response = host.get("/whoami");
        if response.status == 200 {
            break;
        }
        assert_eq!(response.status, 503, "{response:?}");
        assert!(
            std::time::Instant::now() < deadline,
            "the host did not recover"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_chunked_body_over_the_limit_gets_413_from_the_router() {
    use std::io::{Read as _, Write as _};

    let app = App::new("web: {guests}/test_web.wasm\n");
    let host = app.up(&["--max-body", "64KiB"]);
    let mut stream = std::net::TcpStream::connect(host.addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // 66 000 bytes in 1 000-byte chunks, no Content-Length; the body never ends, so only the
    // limit can answer it.
    let chunk = format!("3e8\r\n{}\r\n", "a".repeat(1000));
    let raw = format!(
        "POST /consume HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{}",
        chunk.repeat(66)
    );
    stream.write_all(raw.as_bytes()).unwrap();
    let mut out = Vec::new();
    // Ends with EOF, or a reset if some of the body was still unread when the host closed.
    let _ = stream.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 413 Payload Too Large"), "{out}");
    assert!(out.contains("request body over 65536 bytes"), "{out}");
    assert!(out.contains("connection: close"), "{out}");
    host.wait_for(
        "at=error code=H25 desc=\"Request body too large\" method=POST path=\"/consume\" instance=web.1",
        Duration::from_secs(10),
    );
    // The guest saw a read error and finished soundly: the same instance serves on.
    assert_eq!(host.get("/count").body, "1\n");
    // A chunked body within the limit is read whole.
    let out = exchange(
        host.addr(),
        &format!(
            "POST /consume HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{}0\r\n\r\n",
            chunk.repeat(60)
        ),
    );
    assert!(out.contains("consumed 60000 bytes"), "{out}");
}

#[test]
fn control_and_metrics_listeners_cut_off_slow_headers() {
    use std::io::{Read as _, Write as _};
    use std::os::unix::fs::PermissionsExt as _;

    let app = App::new("web: {guests}/hello.wasm\n");
    let token = app.path("token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let host = app.up(&[
        "--metrics",
        "127.0.0.1:0",
        "--control-tcp",
        "127.0.0.1:0",
        "--control-token-file",
        token.to_str().unwrap(),
    ]);
    let slow: Vec<std::net::TcpStream> = [
        host.logged_addr("metrics on"),
        host.logged_addr("control API on"),
    ]
    .into_iter()
    .map(|addr| {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost").unwrap();
        stream
    })
    .collect();
    let mut unix =
        std::os::unix::net::UnixStream::connect(app.path(".wasmform/control.sock")).unwrap();
    unix.write_all(b"GET /v1/ps HTTP/1.1\r\nHost").unwrap();
    // Each listener hangs up on its slow client (the 30 s read timeout only bounds the test).
    let mut outcomes = Vec::new();
    for mut stream in slow {
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut rest = Vec::new();
        outcomes.push((stream.read_to_end(&mut rest).map_err(|e| e.kind()), rest));
    }
    unix.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut rest = Vec::new();
    outcomes.push((unix.read_to_end(&mut rest).map_err(|e| e.kind()), rest));
    for (outcome, rest) in outcomes {
        assert!(
            outcome.is_ok() || outcome == Err(std::io::ErrorKind::ConnectionReset),
            "the slow connection was not closed: {outcome:?}"
        );
        let rest = String::from_utf8_lossy(&rest);
        assert!(
            rest.is_empty() || rest.starts_with("HTTP/1.1 408"),
            "{rest}"
        );
    }
    // Clients that send their request at once are still served.
    let addr = host.logged_addr("metrics on");
    let response = request(
        addr,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(response.status, 200);
}

#[test]
fn while_shutting_down_new_connections_are_refused_and_idle_ones_closed() {
    use std::io::Write as _;

    let app = App::new("web: {guests}/test_web.wasm\n");
    // One instance and no queue: a request gets 503 at once while the slow one holds it.
    let mut host = app.up(&["-m", "web=1", "--queue", "0", "--grace", "60s"]);
    let addr = host.addr();
    let mut idle = std::net::TcpStream::connect(addr).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    idle.write_all(b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert!(read_response(&mut idle).starts_with("HTTP/1.1 200"));

    // With no queue, the slow request itself gets 503 if a probe below holds web.1 at that
    // moment: it tries again until web.1 takes it.
    // Each attempt's raw answer is kept, so that a failure below can say what happened.
    let slow = std::thread::spawn(move || {
        use std::io::Read as _;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut attempts = Vec::new();
        loop {
            let mut stream = std::net::TcpStream::connect(addr).expect("connect");
            stream
                .set_read_timeout(Some(Duration::from_secs(60)))
                .unwrap();
            stream
                .write_all(
                    format!(
                        "GET /sleep?ms=10000 HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
                    )
                    .as_bytes(),
                )
                .unwrap();
            let mut bytes = Vec::new();
            let read = stream.read_to_end(&mut bytes);
            let text = String::from_utf8_lossy(&bytes).into_owned();
            attempts.push(format!("{read:?}: {text:?}"));
            if !text.starts_with("HTTP/1.1 503") || std::time::Instant::now() > deadline {
                break (text, attempts);
            }
        }
    });
    // Twice 503, 200 ms apart: a single 503 can also come from the previous probe's call, whose
    // instance goes back to the pool a moment after its response was sent; the slow request
    // holds web.1 for 10 s.
    let busy = host.wait_until(Duration::from_secs(30), |_| {
        crate::support::get(addr, "/whoami").status == 503 && {
            std::thread::sleep(Duration::from_millis(200));
            crate::support::get(addr, "/whoami").status == 503
        }
    });
    assert!(busy.is_some(), "the slow request never reached web.1");

    host.signal(libc::SIGTERM);
    host.wait_for("SIGTERM received: shutting down", Duration::from_secs(10));
    // The listener is closed (the signal reaches the accept loop a moment after the line is
    // logged), while the slow request is still in flight: a new connection is refused rather
    // than answered.
    let mut attempts = 0;
    let refused = loop {
        attempts += 1;
        match std::net::TcpStream::connect(addr) {
            Ok(_) if attempts < 500 => std::thread::sleep(Duration::from_millis(10)),
            Ok(_) => panic!("connections are still accepted while shutting down"),
            Err(e) => break e,
        }
    };
    // Refused, or reset when the handshake raced the listener's close.
    assert!(
        matches!(
            refused.kind(),
            std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
        ),
        "{refused}"
    );
    // An idle keep-alive connection is closed without an answer.
    closed_silently(&mut idle).expect("an idle connection is closed at shutdown");
    if slow.is_finished() {
        let (_, attempts) = slow.join().unwrap();
        panic!(
            "the slow request ended before the checks; its attempts: {attempts:#?}\nhost output:\n{}",
            host.output()
        );
    }

    // The request in flight finishes, and the host exits cleanly.
    let (text, attempts) = slow.join().unwrap();
    assert!(
        text.starts_with("HTTP/1.1 200") && text.contains("slept 10000 ms\n"),
        "{attempts:#?}"
    );
    let status = host
        .wait_exit(Duration::from_secs(30))
        .expect("did not exit");
    assert!(status.success(), "{status}");
}
