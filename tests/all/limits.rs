//! Misbehaving guests: memory bombs, panics, endless loops, exits. The host and the other
//! instances keep going; the failing instance is replaced.

use std::time::{Duration, Instant};

use crate::support::{App, get};

#[test]
fn memory_bomb_is_502_and_the_instance_is_replaced() {
    let app = App::new("web: {guests}/test_web.wasm\n");
    let host = app.up(&["--memory", "32MiB"]);
    assert_eq!(host.get("/alloc?mb=8").status, 200);
    let rss_before = host.rss_kib();
    for _ in 0..5 {
        let response = host.get("/alloc?mb=64");
        assert_eq!(response.status, 502, "{response:?}");
        assert!(
            response.body.contains("(R14, request id "),
            "{}",
            response.body
        );
        // The replacement starts at once; the next request waits for it rather than failing.
        let ok = host.get("/whoami");
        assert_eq!(ok.status, 200, "{ok:?}");
    }
    let out = host.wait_for(
        "web.1 crashed: memory quota exceeded (32 MiB)",
        Duration::from_secs(5),
    );
    assert!(
        out.contains("code=R14 desc=\"Memory quota exceeded\""),
        "{out}"
    );
    // Five crashed 32 MiB instances must not leave their memory behind.
    let rss_after = host.rss_kib();
    assert!(
        rss_after < rss_before + 48 * 1024,
        "host RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
}

#[test]
fn panic_is_502_and_other_instances_keep_their_state() {
    let app = App::new("web: {guests}/test_web.wasm\n");
    let host = app.up(&["-m", "web=2"]);
    // web.1 and web.2 count to 1 each.
    assert_eq!(host.get("/count").body, "1\n");
    assert_eq!(host.get("/count").body, "1\n");
    let response = host.get("/panic");
    assert_eq!(response.status, 502, "{response:?}");
    // The body says H13 and the request id; the log line with that id names the instance.
    assert!(
        response.body.contains("(H13, request id "),
        "{}",
        response.body
    );
    let id = response.header("x-request-id").unwrap().to_string();
    let out = host.wait_for(&format!("request_id={id}"), Duration::from_secs(10));
    let line = out.lines().find(|l| l.contains(&id)).unwrap();
    let crashed = line
        .split("instance=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let out = host.wait_for(&format!("{crashed} crashed: "), Duration::from_secs(10));
    assert!(out.contains("test-web panic requested"), "{out}");
    host.wait_for(&format!("{crashed} up"), Duration::from_secs(30));
    // web.2 kept its counter; the fresh web.1 starts over.
    let mut counts = vec![host.get("/count").body, host.get("/count").body];
    counts.sort();
    assert_eq!(counts, ["1\n", "2\n"]);
}

/// A handler that returns without setting its response leaves its instance in an unknown
/// state: 502, and the instance is never entered again.
#[test]
fn an_instance_that_returned_without_a_response_is_replaced() {
    let app = App::new("web: {guests}/test_web.wasm\n");
    let host = app.up(&[]);
    assert_eq!(host.get("/count").body, "1\n");
    assert_eq!(host.get("/count").body, "2\n");
    let response = host.get("/no-response");
    assert_eq!(response.status, 502);
    host.wait_for(
        "at=error code=H13 desc=\"No response\"",
        Duration::from_secs(10),
    );
    host.wait_for(
        "web.1 returned without a response; restarting now",
        Duration::from_secs(10),
    );
    // The next request on the slot is served by a fresh instance: its counter starts again.
    assert_eq!(host.get("/count").body, "1\n");
    let ps = app.ps();
    assert_eq!(ps["instances"][0]["restarts"], 1, "{ps:#}");
}

#[test]
fn spinning_request_times_out_while_others_keep_answering() {
    let app = App::new("web: {guests}/test_web.wasm\n");
    let host = app.up(&["-m", "web=2", "--request-timeout", "2s"]);
    let addr = host.addr();
    let started = Instant::now();
    let spin = std::thread::spawn(move || get(addr, "/spin?ms=60000"));
    std::thread::sleep(Duration::from_millis(200));
    let mut answered = 0;
    while !spin.is_finished() && answered < 500 {
        let response = host.get("/whoami");
        assert_eq!(response.status, 200, "{response:?}");
        answered += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let response = spin.join().unwrap();
    let took = started.elapsed();
    assert_eq!(response.status, 504, "{response:?}");
    assert!(took < Duration::from_secs(30), "504 took {took:?}");
    assert!(
        answered > 5,
        "the other instance answered only {answered} times"
    );
    host.wait_for(
        "request timed out after 2 s; instance recycled",
        Duration::from_secs(5),
    );
    host.wait_for("code=H12", Duration::from_secs(5));
}

#[test]
fn spinning_worker_does_not_stall_web_and_sigterm_stops_it() {
    let app = App::new("web: {guests}/hello.wasm\nworker: {guests}/test-worker.wasm spin\n");
    let mut host = app.up(&["-m", "worker=2", "--grace", "5s"]);
    host.wait_for("worker.2 | spinning", Duration::from_secs(30));
    for _ in 0..50 {
        assert_eq!(host.get("/").status, 200);
    }
    host.signal(libc::SIGTERM);
    let status = host
        .wait_exit(Duration::from_secs(15))
        .expect("SIGTERM did not stop the host");
    assert!(status.success(), "{status}");
}

#[test]
fn exited_worker_is_restarted_with_backoff() {
    let app = App::new("web: {guests}/hello.wasm\nworker: {guests}/test-worker.wasm exit 3\n");
    let host = app.up(&["--restart-delay", "100ms"]);
    host.wait_for(
        "worker.1 exited with status 3; restarting now",
        Duration::from_secs(30),
    );
    host.wait_for(
        "worker.1 exited with status 3; restarting in 100.0 ms",
        Duration::from_secs(30),
    );
    host.wait_for(
        "worker.1 exited with status 3; restarting in 200.0 ms",
        Duration::from_secs(30),
    );
    assert_eq!(host.get("/").status, 200);
}

#[test]
fn panicking_worker_reports_its_trap() {
    let app = App::new("worker: {guests}/test-worker.wasm panic\n");
    let host = app.up(&[]);
    let out = host.wait_for("worker.1 wasm trap", Duration::from_secs(30));
    assert!(out.contains("test-worker panic requested"), "{out}");
}

#[test]
fn client_going_away_mid_request_recycles_the_instance() {
    use std::io::Write as _;

    let app = App::new("web: {guests}/test_web.wasm\n");
    let host = app.up(&[]);
    assert_eq!(host.get("/count").body, "1\n");
    let mut stream = std::net::TcpStream::connect(host.addr()).unwrap();
    stream
        .write_all(b"GET /sleep?ms=5000 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    drop(stream);
    host.wait_for(
        "web.1 request cancelled mid-call (the client went away); instance recycled; restarting now",
        Duration::from_secs(10),
    );
    host.wait_for(
        "at=error code=H27 desc=\"Client request interrupted\" method=GET path=\"/sleep\" instance=web.1",
        Duration::from_secs(10),
    );
    // A fresh instance: its counter starts over.
    assert_eq!(host.get("/count").body, "1\n");
}

#[test]
fn a_guest_answering_with_an_error_code_is_502_and_keeps_serving() {
    let app = App::new("web: {guests}/test_web.wasm\n");
    let host = app.up(&[]);
    assert_eq!(host.get("/count").body, "1\n");
    let response = host.get("/error-code");
    assert_eq!(response.status, 502, "{response:?}");
    assert!(
        response
            .body
            .starts_with("application error: the app answered with an error (H17, request id "),
        "{}",
        response.body
    );
    host.wait_for(
        "at=error code=H17 desc=\"Invalid response\" method=GET path=\"/error-code\" instance=web.1",
        Duration::from_secs(5),
    );
    // Not a crash: the same instance, with its state, serves on.
    assert_eq!(host.get("/count").body, "2\n");
    assert!(!host.output().contains("crashed"), "{}", host.output());
}
