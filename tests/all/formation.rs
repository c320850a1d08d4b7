//! Round-robin, per-instance state, workers, env isolation, shutdown.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::support::{App, get};

#[test]
fn round_robin_keeps_state_per_instance() {
    let app = App::new("web: {guests}/hello.wasm\n");
    let host = app.up(&["-m", "web=3"]);
    let mut seen: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for i in 0..30 {
        let response = host.get(&format!("/r{i}"));
        assert_eq!(response.status, 200, "{response:?}");
        // `hello from web.2, request 4, path /r10`
        let body = response.body.trim();
        let rest = body.strip_prefix("hello from ").expect(body);
        let (instance, rest) = rest.split_once(", request ").expect(body);
        let (count, path) = rest.split_once(", path ").expect(body);
        assert_eq!(path, format!("/r{i}"));
        seen.entry(instance.to_string())
            .or_default()
            .push(count.parse().unwrap());
    }
    let instances: Vec<&String> = seen.keys().collect();
    assert_eq!(instances, ["web.1", "web.2", "web.3"]);
    for (instance, counts) in &seen {
        assert_eq!(*counts, (1..=10).collect::<Vec<u32>>(), "{instance}");
    }
}

#[test]
fn workers_run_with_their_own_prefixes_and_args() {
    let app = App::new("web: {guests}/hello.wasm\nworker: {guests}/ticker.wasm 50\n");
    let host = app.up(&["-m", "worker=2"]);
    host.wait_for("worker.1 | tick 2 from worker.1", Duration::from_secs(30));
    host.wait_for("worker.2 | tick 2 from worker.2", Duration::from_secs(30));
}

#[test]
fn guests_see_only_the_formation_environment() {
    let app = App::new(
        "web: {guests}/test_web.wasm\nworker: {guests}/test-worker.wasm env 'two words'\n",
    );
    let host = app.up(&[]);
    let port = host.addr().port();
    let env = host.get("/env").body;
    assert_eq!(
        env,
        format!(
            "DYNO=web.1\nPORT={port}\nPS=web.1\nWASMFORM_INSTANCE=web.1\nWASMFORM_PROCESS=web\n"
        )
    );
    let out = host.wait_for("arg 2=two words", Duration::from_secs(30));
    assert!(out.contains("worker.1 | arg 0=test-worker.wasm"), "{out}");
    assert!(out.contains("worker.1 | arg 1=env"), "{out}");
    assert!(out.contains("worker.1 | WASMFORM_PROCESS=worker"), "{out}");
    assert!(!out.contains("worker.1 | HOME="), "host env leaked:\n{out}");
}

#[test]
fn busy_instances_queue_requests_up_to_the_bound_then_503() {
    let app = App::new("web: {guests}/test_web.wasm\n");
    let host = app.up(&["--queue", "1"]);
    let addr = host.addr();
    let busy = std::thread::spawn(move || get(addr, "/sleep?ms=2000"));
    std::thread::sleep(Duration::from_millis(300));
    let queued = std::thread::spawn(move || get(addr, "/whoami"));
    std::thread::sleep(Duration::from_millis(300));
    let refused = host.get("/whoami");
    assert_eq!(refused.status, 503, "{refused:?}");
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert!(
        refused.body.contains("all `web` instances are busy"),
        "{}",
        refused.body
    );
    assert_eq!(busy.join().unwrap().status, 200);
    let queued = queued.join().unwrap();
    assert_eq!((queued.status, queued.body.as_str()), (200, "web.1\n"));
    host.wait_for("at=error code=H11", Duration::from_secs(5));
}

#[test]
fn no_instance_up_is_503_at_once() {
    let app = App::new("web: {guests}/hello.wasm\n");
    let host = app.up(&["-m", "web=0"]);
    let response = host.get("/");
    assert_eq!(response.status, 503);
    assert_eq!(response.header("retry-after"), Some("1"));
    assert!(
        response.body.contains("no `web` instance is up"),
        "{}",
        response.body
    );
}

#[test]
fn sigterm_lets_in_flight_requests_finish_and_exits_zero() {
    let app = App::new("web: {guests}/test_web.wasm\nworker: {guests}/test-worker.wasm sleep\n");
    let mut host = app.up(&["--grace", "10s"]);
    let addr = host.addr();
    let slow = std::thread::spawn(move || get(addr, "/sleep?ms=1500"));
    // Let the request reach the instance before the signal.
    std::thread::sleep(Duration::from_millis(300));
    host.signal(libc::SIGTERM);
    let response = slow.join().unwrap();
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.body, "slept 1500 ms\n");
    let status = host
        .wait_exit(Duration::from_secs(20))
        .expect("did not exit");
    assert!(status.success(), "{status}");
    let out = host.output();
    assert!(out.contains("SIGTERM received: shutting down"), "{out}");
    assert!(out.contains("wasmform | stopped"), "{out}");
    // The listener is closed.
    assert!(std::net::TcpStream::connect(addr).is_err());
}

#[test]
fn second_signal_exits_at_once() {
    let app = App::new("web: {guests}/test_web.wasm\n");
    let mut host = app.up(&["--grace", "60s"]);
    let addr = host.addr();
    // Held in flight: the first signal waits for it, the second does not.
    let _slow =
        std::thread::spawn(move || std::panic::catch_unwind(|| get(addr, "/sleep?ms=30000")));
    std::thread::sleep(Duration::from_millis(300));
    host.signal(libc::SIGINT);
    host.wait_for("SIGINT received: shutting down", Duration::from_secs(10));
    host.signal(libc::SIGINT);
    let status = host
        .wait_exit(Duration::from_secs(10))
        .expect("second signal did not exit");
    assert_eq!(status.code(), Some(130), "{status}");
}

#[test]
fn components_built_for_older_wasi_releases_run() {
    for (file, version) in [
        ("compat_0_2_0.wasm", "0.2.0"),
        ("compat_0_2_3.wasm", "0.2.3"),
    ] {
        let app = App::new(&format!("web: {{guests}}/{file}\n"));
        let host = app.up(&[]);
        let response = host.get("/");
        assert_eq!(response.status, 200, "{response:?}");
        assert_eq!(response.body, format!("compat {version} from web.1\n"));
    }
}
