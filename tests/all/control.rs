//! Live formation control through the real binary: `scale`, `ps`, `logs`, `restart`, capacity,
//! persistence, and bad input that must leave the formation unchanged.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::support::{App, get};

const WEB_AND_TICKER: &str = "web: {guests}/hello.wasm\nworker: {guests}/ticker.wasm 50\n";

fn formation(pairs: &[(&str, u64)]) -> Vec<(String, u64)> {
    pairs.iter().map(|(n, c)| (n.to_string(), *c)).collect()
}

/// The rows of a `PROCESS COUNT MEM` table, whitespace-normalised.
fn table(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter(|l| !l.starts_with("note:"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

#[test]
fn scale_changes_the_running_formation() {
    let app = App::new(WEB_AND_TICKER);
    let host = app.up(&[]);
    let out = app.cli(&["scale", "web=3", "worker+1"]);
    assert!(out.ok, "{out:?}");
    assert_eq!(
        table(&out.stdout),
        ["PROCESS COUNT MEM", "web 3 256 MiB", "worker 2 256 MiB"]
    );
    host.wait_for(
        "wasmform[api] | Scale to web=3, worker=2",
        Duration::from_secs(5),
    );
    host.wait_for("worker.2 | tick 2 from worker.2", Duration::from_secs(30));
    let ps = app.wait_settled(Duration::from_secs(30));
    let ids: Vec<&str> = ps["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["web.1", "web.2", "web.3", "worker.1", "worker.2"]);
    let mut answered = BTreeMap::new();
    for _ in 0..30 {
        let response = host.get("/");
        assert_eq!(response.status, 200);
        *answered
            .entry(response.header("x-wasmform-instance").unwrap().to_string())
            .or_insert(0) += 1;
    }
    assert_eq!(
        answered.values().collect::<Vec<_>>(),
        [&10, &10, &10],
        "{answered:?}"
    );

    // Scale down: the highest numbers go; ps shows exactly what runs.
    let out = app.cli(&["scale", "web-2", "worker=0"]);
    assert!(out.ok, "{out:?}");
    let ps = app.wait_settled(Duration::from_secs(30));
    let ids: Vec<&str> = ps["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["web.1"]);
    assert_eq!(ps["instances"][0]["requests"], 10);
    assert_eq!(host.get("/").status, 200);

    // The human table names each instance with its state, memory and requests.
    let out = app.cli(&["ps"]);
    assert!(out.ok, "{out:?}");
    assert!(
        out.stdout
            .contains("=== web (http): 1/1 up, 256 MiB each · hello.wasm sha256:"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("=== worker (background): 0/0 up"),
        "{}",
        out.stdout
    );
    let line = out.stdout.lines().find(|l| l.starts_with("web.1")).unwrap();
    assert!(
        line.contains(" up ") && line.contains("/ 256 MiB") && line.contains("11 req"),
        "{line}"
    );
}

#[test]
fn scale_down_finishes_requests_in_flight() {
    let app = App::new("web: {guests}/test_web.wasm\n");
    let host = app.up(&["-m", "web=3"]);
    let addr = host.addr();
    let slow: Vec<_> = (0..3)
        .map(|_| std::thread::spawn(move || get(addr, "/sleep?ms=1500")))
        .collect();
    // Let each request reach an instance.
    std::thread::sleep(Duration::from_millis(300));
    let out = app.cli(&["scale", "web=1"]);
    assert!(out.ok, "{out:?}");
    for request in slow {
        let response = request.join().unwrap();
        assert_eq!(response.status, 200, "{response:?}");
        assert_eq!(response.body, "slept 1500 ms\n");
    }
    let ps = app.wait_settled(Duration::from_secs(30));
    assert_eq!(ps["instances"].as_array().unwrap().len(), 1);
}

#[test]
fn bad_scale_input_is_rejected_and_changes_nothing() {
    let app = App::new(WEB_AND_TICKER);
    let _host = app.up(&["-m", "web=2"]);
    let before = app.formation();
    assert_eq!(before, formation(&[("web", 2), ("worker", 1)]));
    for (args, needle) in [
        (&["scale", "web=-1"][..], "invalid count `-1` for `web`"),
        (&["scale", "web=abc"], "invalid count `abc` for `web`"),
        (&["scale", "web="], "missing count for `web`"),
        (
            &["scale", "=3"],
            "missing the process type before `=` (known types: web, worker)",
        ),
        (&["scale", "web=1.5"], "invalid count `1.5` for `web`"),
        (&["scale", "web=99999999999"], "too large"),
        (
            &["scale", "wrk=2"],
            "unknown process type `wrk` in `wrk=2`: known types are web, worker",
        ),
        (&["scale", "web=5", "wrk=1"], "unknown process type `wrk`"),
        (&["scale", "web-3"], "would scale `web` below 0 (it has 2)"),
        (
            &["scale", "web=1", "--memory", "12XB"],
            "invalid memory size `12XB`",
        ),
        (&["scale", "web=1:8GiB"], "at most 4GiB"),
        (
            &["scale", "web=1:2GiB"],
            "above this host's maximum of 1 GiB",
        ),
        (
            &["scale", "web=1:64KiB"],
            "`web` cannot run with 64 KiB: memory quota exceeded (64 KiB); the formation is unchanged",
        ),
        (
            &["restart", "nope"],
            "nothing to restart: no running instance matches `nope`",
        ),
    ] {
        let out = app.cli(args);
        assert!(!out.ok, "{args:?} succeeded: {out:?}");
        assert!(out.stderr.contains(needle), "{args:?}:\n{}", out.stderr);
        assert_eq!(app.formation(), before, "{args:?} changed the formation");
    }
    let ps = app.wait_settled(Duration::from_secs(10));
    for instance in ps["instances"].as_array().unwrap() {
        assert_eq!(instance["memory_limit"], 256 << 20, "{instance}");
    }
}

#[test]
fn client_commands_without_a_host_say_how_to_start_one() {
    let app = App::new(WEB_AND_TICKER);
    for args in [&["ps"][..], &["scale", "web=2"], &["logs"], &["restart"]] {
        let out = app.cli(args);
        assert!(!out.ok);
        assert!(
            out.stderr.contains("no wasmform host is running for"),
            "{args:?}: {}",
            out.stderr
        );
        assert!(
            out.stderr.contains("start one with `wasmform up`"),
            "{}",
            out.stderr
        );
    }
}

#[test]
fn socket_is_private_and_other_users_are_refused() {
    use std::os::unix::fs::PermissionsExt as _;
    use std::os::unix::process::CommandExt as _;

    let app = App::new(WEB_AND_TICKER);
    let _host = app.up(&[]);
    let state = app.path(".wasmform");
    assert_eq!(
        std::fs::metadata(&state).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let socket = state.join("control.sock");
    assert_eq!(
        std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Let another user reach the directory, so the socket's own mode is what refuses them.
    std::fs::set_permissions(app.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o711)).unwrap();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: cannot run the client as another user; skipping that part");
        return;
    }
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_wasmform"))
        .args(["ps", "--app"])
        .arg(app.dir.path())
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("permission denied on the control socket"),
        "{stderr}"
    );

    // With the socket's mode loosened by hand, the host still checks who is calling.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_wasmform"))
        .args(["scale", "web=3", "--app"])
        .arg(app.dir.path())
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("permission denied by the control API: this host's control API belongs to uid 0; you are uid 65534"),
        "{stderr}"
    );
    assert_eq!(app.formation(), formation(&[("web", 1), ("worker", 1)]));
}

#[test]
fn memory_change_is_a_rolling_replacement_without_failed_requests() {
    let app = App::new("web: {guests}/test_web.wasm\n");
    let host = app.up(&["-m", "web=2"]);
    let addr = host.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let traffic = {
        let (stop, failures) = (stop.clone(), failures.clone());
        std::thread::spawn(move || {
            let mut sent = 0;
            while !stop.load(Ordering::Relaxed) && sent < 5000 {
                if get(addr, "/whoami").status != 200 {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                sent += 1;
            }
            sent
        })
    };
    let out = app.cli(&["scale", "web=2:64MiB"]);
    assert!(out.ok, "{out:?}");
    assert_eq!(table(&out.stdout), ["PROCESS COUNT MEM", "web 2 64 MiB"]);
    let ps = app.wait_settled(Duration::from_secs(30));
    stop.store(true, Ordering::Relaxed);
    let sent = traffic.join().unwrap();
    assert!(sent > 0);
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "requests failed during the roll"
    );
    for instance in ps["instances"].as_array().unwrap() {
        assert_eq!(instance["memory_limit"], 64 << 20, "{instance}");
    }
    // The new limit is enforced.
    assert_eq!(host.get("/alloc?mb=100").status, 502);
    host.wait_for(
        "crashed: memory quota exceeded (64 MiB)",
        Duration::from_secs(10),
    );
}

#[test]
fn capacity_keeps_extra_instances_pending_until_room_frees() {
    let app = App::new(WEB_AND_TICKER);
    let host = app.up(&["--capacity", "768MiB"]);
    let out = app.cli(&["scale", "web=3"]);
    assert!(out.ok, "{out:?}");
    assert!(
        out.stdout
            .contains("note: web.3 pending: capacity: needs 256 MiB, 768 MiB of 768 MiB in use"),
        "{}",
        out.stdout
    );
    let ps = app.ps();
    let web3 = ps["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == "web.3")
        .unwrap();
    assert_eq!(web3["state"], "pending", "{web3}");
    assert!(
        web3["reason"].as_str().unwrap().starts_with("capacity:"),
        "{web3}"
    );
    assert_eq!(
        app.cli(&["ps"])
            .stdout
            .lines()
            .filter(|l| l.contains("pending"))
            .count(),
        1
    );
    // Freeing room starts the pending instance by itself.
    let out = app.cli(&["scale", "worker=0"]);
    assert!(out.ok, "{out:?}");
    let ps = app.wait_settled(Duration::from_secs(30));
    let ids: Vec<&str> = ps["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["web.1", "web.2", "web.3"]);
    assert_eq!(host.get("/").status, 200);
}

#[test]
fn formation_survives_a_restart_and_m_overrides_it() {
    let app = App::new(WEB_AND_TICKER);
    let mut host = app.up(&[]);
    assert!(app.cli(&["scale", "web=2:128MiB", "worker=0"]).ok);
    host.signal(libc::SIGTERM);
    assert!(host.wait_exit(Duration::from_secs(20)).unwrap().success());
    assert!(
        !app.path(".wasmform/control.sock").exists(),
        "socket removed at shutdown"
    );

    let mut host = app.up(&[]);
    host.wait_for("formation web=2, worker=0 up", Duration::from_secs(5));
    let ps = app.wait_settled(Duration::from_secs(10));
    assert_eq!(ps["types"][0]["memory"], 128 << 20);
    host.signal(libc::SIGKILL);
    host.wait_exit(Duration::from_secs(10)).unwrap();

    // A stale socket from the killed host is replaced; `-m` overrides and is stored in turn.
    let mut host = app.up(&["-m", "worker=1"]);
    host.wait_for("formation web=2, worker=1 up", Duration::from_secs(5));
    host.signal(libc::SIGTERM);
    host.wait_exit(Duration::from_secs(20)).unwrap();
    let host = app.up(&[]);
    host.wait_for("formation web=2, worker=1 up", Duration::from_secs(5));
}

#[test]
fn second_host_for_the_same_app_is_refused_and_changes_nothing() {
    let app = App::new(WEB_AND_TICKER);
    let _host = app.up(&[]);
    let stored = std::fs::read_to_string(app.path(".wasmform/formation.json")).unwrap();
    let out = app.up_fails(&["-m", "web=5"]);
    assert!(
        out.contains("another wasmform host is already running for this app"),
        "{out}"
    );
    assert_eq!(
        std::fs::read_to_string(app.path(".wasmform/formation.json")).unwrap(),
        stored
    );
    assert_eq!(app.formation(), formation(&[("web", 1), ("worker", 1)]));
}

#[test]
fn corrupt_state_file_is_a_clear_error() {
    let app = App::new(WEB_AND_TICKER);
    std::fs::create_dir(app.path(".wasmform")).unwrap();
    std::fs::write(
        app.path(".wasmform/formation.json"),
        "{\"version\": 1, \"types\": {",
    )
    .unwrap();
    let out = app.up_fails(&[]);
    assert!(out.contains("formation.json` is corrupt"), "{out}");
    assert!(
        out.contains("delete it to start from the Procfile's formation"),
        "{out}"
    );
}

#[test]
fn logs_shows_recent_lines_and_follows() {
    let app = App::new("web: {guests}/test_web.wasm\nworker: {guests}/ticker.wasm 50\n");
    let host = app.up(&[]);
    assert_eq!(host.get("/print?n=3").status, 200);
    host.wait_for("web.1 | line 3 from web.1", Duration::from_secs(10));
    let out = app.cli(&["logs", "--ps", "web", "-n", "2"]);
    assert!(out.ok, "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].ends_with("web.1 | line 2 from web.1"), "{lines:?}");
    assert!(lines[1].ends_with("web.1 | line 3 from web.1"), "{lines:?}");

    let mut follow = std::process::Command::new(env!("CARGO_BIN_EXE_wasmform"))
        .args(["logs", "-f", "-n", "0", "--ps", "worker.1", "--app"])
        .arg(app.dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead as _;
        std::io::BufReader::new(stdout)
            .lines()
            .take(3)
            .map(Result::unwrap)
            .collect::<Vec<_>>()
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !reader.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = follow.kill();
    let _ = follow.wait();
    let lines = reader.join().unwrap();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(
        lines.iter().all(|l| l.contains("worker.1 | tick ")),
        "{lines:?}"
    );
}

#[test]
fn restart_replaces_instances_one_at_a_time() {
    let app = App::new("web: {guests}/test_web.wasm\n");
    let host = app.up(&["-m", "web=2"]);
    assert_eq!(host.get("/count").body, "1\n");
    assert_eq!(host.get("/count").body, "1\n");
    assert_eq!(host.get("/count").body, "2\n");
    let out = app.cli(&["restart", "web"]);
    assert!(out.ok, "{out:?}");
    host.wait_for("wasmform[api] | Restart web", Duration::from_secs(5));
    app.wait_settled(Duration::from_secs(30));
    // Fresh instances: counters start over.
    assert_eq!(host.get("/count").body, "1\n");
    assert_eq!(host.get("/count").body, "1\n");
    let out = app.cli(&["restart", "web.2"]);
    assert!(out.ok, "{out:?}");
    app.wait_settled(Duration::from_secs(30));
}

/// A small deterministic generator, so a failing storm can be replayed.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[test]
fn scale_storm_with_traffic_applies_every_change_in_order() {
    let app = Arc::new(App::new(WEB_AND_TICKER));
    let host = app.up(&["-m", "web=2"]);
    let addr = host.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let traffic = {
        let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
        std::thread::spawn(move || {
            // Bounded: stops when told, or after 20 000 requests.
            while !stop.load(Ordering::Relaxed) && sent.load(Ordering::Relaxed) < 20_000 {
                let response = get(addr, "/");
                sent.fetch_add(1, Ordering::Relaxed);
                if response.status != 200 {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let callers: Vec<_> = (0..8)
        .map(|seed| {
            let app = app.clone();
            std::thread::spawn(move || {
                let mut rng = Lcg(seed);
                let mut answers = (0, 0);
                for _ in 0..25 {
                    // `web` never goes to 0, so every request must succeed.
                    let change = match rng.next(8) {
                        0 => "web=-1".to_string(),
                        1 => "wrk=1".to_string(),
                        2 => format!("worker-{}", rng.next(3)),
                        3 => format!("worker+{}", rng.next(3)),
                        4 => format!("web=abc worker={}", rng.next(3)),
                        _ => format!("web={} worker={}", 1 + rng.next(6), rng.next(4)),
                    };
                    let args: Vec<&str> =
                        std::iter::once("scale").chain(change.split(' ')).collect();
                    let out = app.cli(&args);
                    if out.ok {
                        answers.0 += 1;
                    } else {
                        assert!(out.stderr.starts_with("error: "), "{change}: {out:?}");
                        answers.1 += 1;
                    }
                }
                answers
            })
        })
        .collect();
    let (mut accepted, mut rejected) = (0, 0);
    for caller in callers {
        let (a, r) = caller.join().unwrap();
        accepted += a;
        rejected += r;
    }
    assert_eq!(accepted + rejected, 200);
    assert!(
        accepted > 50 && rejected > 20,
        "accepted {accepted}, rejected {rejected}"
    );
    let ps = app.wait_settled(Duration::from_secs(60));
    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap();
    assert!(sent.load(Ordering::Relaxed) > 0);
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during the storm"
    );

    // The final formation is the last change the host accepted, and nothing leaked.
    let out = host.output();
    let last = out
        .lines()
        .rev()
        .find_map(|l| l.split("wasmform[api] | Scale to ").nth(1))
        .unwrap();
    let running: Vec<String> = ps["types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| format!("{}={}", t["name"].as_str().unwrap(), t["desired"]))
        .collect();
    assert_eq!(running.join(", "), last);
    assert_eq!(
        out.matches("wasmform[api] | Scale to ").count(),
        accepted,
        "every accepted change is logged once"
    );
}

#[test]
fn sigkill_during_a_scale_storm_keeps_the_last_accepted_formation() {
    let app = Arc::new(App::new(WEB_AND_TICKER));
    let mut host = app.up(&[]);
    let caller = {
        let app = app.clone();
        std::thread::spawn(move || {
            let mut rng = Lcg(42);
            let (mut acked, mut attempting) = (None, None);
            for _ in 0..10_000 {
                let target = (1 + rng.next(5), rng.next(4));
                attempting = Some(target);
                let out = app.cli(&[
                    "scale",
                    &format!("web={}", target.0),
                    &format!("worker={}", target.1),
                ]);
                if !out.ok {
                    break;
                }
                acked = Some(target);
            }
            (acked, attempting)
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    host.signal(libc::SIGKILL);
    host.wait_exit(Duration::from_secs(10)).unwrap();
    let (acked, attempting) = caller.join().unwrap();
    let acked = acked.expect("no scale call was acknowledged before the kill");
    let _host = app.up(&[]);
    let restored = app.formation();
    let expected = |(web, worker): (u64, u64)| formation(&[("web", web), ("worker", worker)]);
    assert!(
        restored == expected(acked) || Some(restored.clone()) == attempting.map(expected),
        "restored {restored:?}, last acknowledged {acked:?}, in flight {attempting:?}"
    );
}

#[test]
fn symlinked_control_socket_is_refused() {
    let app = App::new(WEB_AND_TICKER);
    std::fs::create_dir(app.path(".wasmform")).unwrap();
    std::os::unix::fs::symlink("/tmp/elsewhere.sock", app.path(".wasmform/control.sock")).unwrap();
    let out = app.up_fails(&[]);
    assert!(out.contains("refusing to use the control socket"), "{out}");
    assert!(out.contains("it is a symbolic link"), "{out}");
}

fn token_file(app: &App, mode: u32) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let path = app.path("control.token");
    std::fs::write(&path, "0123456789abcdef0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

#[test]
fn tcp_control_needs_the_token_and_the_host() {
    use crate::support::request;

    let app = App::new(WEB_AND_TICKER);
    let token = token_file(&app, 0o600);
    let host = app.up(&[
        "--control-tcp",
        "127.0.0.1:0",
        "--control-token-file",
        token.to_str().unwrap(),
    ]);
    host.wait_for("(bearer token required)", Duration::from_secs(5));
    let addr = host.logged_addr("control API on");
    let call = |auth: &str, host_header: &str, method: &str, path: &str, body: &str| {
        request(
            addr,
            &format!(
                "{method} {path} HTTP/1.1\r\nHost: {host_header}\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
        )
    };
    let good = "Authorization: Bearer 0123456789abcdef0123456789abcdef\r\n";
    let me = addr.to_string();

    let response = call("", &me, "GET", "/v1/ps", "");
    assert_eq!(response.status, 401, "{response:?}");
    assert_eq!(response.header("www-authenticate"), Some("Bearer"));
    let response = call(
        "Authorization: Bearer 0123456789abcdef0123456789abcdeX\r\n",
        &me,
        "GET",
        "/v1/ps",
        "",
    );
    assert_eq!(response.status, 401, "{response:?}");
    let response = call(good, "evil.example:80", "GET", "/v1/ps", "");
    assert_eq!(response.status, 403, "{response:?}");
    assert!(
        response.body.contains("wrong Host header"),
        "{}",
        response.body
    );

    let response = call(good, &me, "POST", "/v1/scale", r#"{"changes": ["web=2"]}"#);
    assert_eq!(response.status, 200, "{response:?}");
    assert!(
        response
            .headers
            .iter()
            .all(|(n, _)| !n.to_ascii_lowercase().starts_with("access-control"))
    );
    assert_eq!(app.formation(), formation(&[("web", 2), ("worker", 1)]));
}

#[test]
fn tcp_control_refuses_public_addresses_and_loose_token_files() {
    let app = App::new(WEB_AND_TICKER);
    let token = token_file(&app, 0o600);
    let out = app.up_fails(&[
        "--control-tcp",
        "0.0.0.0:0",
        "--control-token-file",
        token.to_str().unwrap(),
    ]);
    assert!(out.contains("not a loopback address"), "{out}");
    assert!(out.contains("--control-tls-cert"), "{out}");

    let loose = token_file(&app, 0o644);
    let out = app.up_fails(&[
        "--control-tcp",
        "127.0.0.1:0",
        "--control-token-file",
        loose.to_str().unwrap(),
    ]);
    assert!(
        out.contains("is readable by other users (mode 644): `chmod 600` it"),
        "{out}"
    );
}

/// Each type's `(desired, memory)` in `ps --json`.
fn scales(app: &App) -> BTreeMap<String, (u64, u64)> {
    app.ps()["types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let name = t["name"].as_str().unwrap().to_string();
            (
                name,
                (
                    t["desired"].as_u64().unwrap(),
                    t["memory"].as_u64().unwrap(),
                ),
            )
        })
        .collect()
}

/// The scales after `reset`.
fn scales_after_reset(app: &App, reset: &[&str]) -> BTreeMap<String, (u64, u64)> {
    assert!(app.cli(reset).ok);
    scales(app)
}

#[test]
fn scale_takes_the_words_of_every_platform_as_heroku_does() {
    let app = App::new(
        "web: {guests}/hello.wasm\nworker: {guests}/ticker.wasm 60000\ncron: {guests}/ticker.wasm 60000\n",
    );
    let _host = app.up(&["--memory", "64MiB"]);
    let reset = ["scale", "web=1:64MiB", "worker=1:64MiB", "cron=1:64MiB"];
    // (command, its Heroku equivalent)
    let forms: &[(&[&str], &[&str])] = &[
        (&["ps:scale", "web=2", "worker+1"], &["web=2", "worker+1"]),
        (&["scale", "web", "--count", "2"], &["web=2"]),
        (&["scale", "web", "--memory", "96"], &["web+0:96MiB"]),
        (
            &["scale", "web", "--count", "3", "--memory", "80"],
            &["web=3:80MiB"],
        ),
        (&["scale", "count", "web=2", "cron=2"], &["web=2", "cron=2"]),
        (&["scale", "count", "3", "-g", "worker"], &["worker=3"]),
        (
            &["scale", "memory", "128", "--process-group", "cron"],
            &["cron+0:128MiB"],
        ),
        (
            &["scale", "--process", "web", "-i", "2", "-m", "96M"],
            &["web=2:96MiB"],
        ),
        (
            &["scale", "--process", "worker", "-m", "1G"],
            &["worker+0:1GiB"],
        ),
        (
            &["scale", "web:instances=3", "worker:memory=72M"],
            &["web=3", "worker+0:72MiB"],
        ),
    ];
    for (form, heroku) in forms {
        assert!(app.cli(&reset).ok);
        let out = app.cli(form);
        assert!(out.ok, "{form:?}: {}", out.stderr);
        let after_form = scales(&app);
        assert!(app.cli(&reset).ok);
        let out = app.cli(&[&["scale"][..], heroku].concat());
        assert!(out.ok, "{heroku:?}: {}", out.stderr);
        assert_eq!(after_form, scales(&app), "{form:?} vs {heroku:?}");
        assert_ne!(
            after_form,
            scales_after_reset(&app, &reset),
            "{form:?} changed nothing"
        );
    }
    // Malformed forms are refused, naming the value, and change nothing.
    assert!(app.cli(&reset).ok);
    let before = scales(&app);
    for (form, needle) in [
        (&["--count", "2"][..], "`--count 2` needs the process type"),
        (&["-i", "2"], "`-i 2` needs the process type"),
        (
            &["web:instances=x"],
            "invalid instance count `x` in `web:instances=x`",
        ),
        (&["count"], "`scale count` needs `TYPE=N` pairs"),
        (
            &["--process", "web", "-k", "1G"],
            "`-k 1G`: instances have no disk",
        ),
        (
            &["web", "--count", "x"],
            "invalid instance count `x` in `--count x`",
        ),
        (
            &["--process", "web", "-i", "2", "web=3"],
            "`--process web` takes only",
        ),
        (&["wrk", "--count", "2"], "unknown process type `wrk`"),
    ] {
        let out = app.cli(&[&["scale"][..], form].concat());
        assert!(!out.ok, "{form:?} succeeded: {out:?}");
        assert!(out.stderr.contains(needle), "{form:?}:\n{}", out.stderr);
        assert_eq!(scales(&app), before, "{form:?} changed the formation");
    }
}

/// `wasmform ps | true`: the reader is gone before anything is printed.
#[test]
fn client_commands_end_quietly_when_their_reader_is_gone() {
    use std::os::unix::process::ExitStatusExt as _;
    let app = App::new(WEB_AND_TICKER);
    let _host = app.up(&[]);
    for args in [
        &["ps"][..],
        &["ps", "--json"],
        &["releases"],
        &["scale", "web=2"],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wasmform"))
            .args(args)
            .arg("--app")
            .arg(app.dir.path())
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGPIPE),
            "{args:?}: {:?}",
            out.status
        );
    }
}

/// Refusals a client can cause at will are not one log line each.
#[test]
fn refusals_of_a_type_scaled_to_zero_are_logged_at_most_once_a_second() {
    let app = App::new(WEB_AND_TICKER);
    let host = app.up(&[]);
    assert!(app.cli(&["scale", "web=0"]).ok);
    let started = std::time::Instant::now();
    for _ in 0..300 {
        assert_eq!(host.get("/").status, 503);
    }
    let seconds = started.elapsed().as_secs();
    std::thread::sleep(Duration::from_millis(1100));
    // The next line counts the refusals it stood for.
    assert_eq!(host.get("/").status, 503);
    let out = host.wait_for("status=503 refused=", Duration::from_secs(5));
    let lines = out.matches("at=error code=H10").count() as u64;
    assert!(
        lines <= seconds + 3,
        "{lines} H10 lines in {seconds} s:\n{out}"
    );
}

/// `(up, pending)` instances of `web` and the memory reserved, once nothing is starting or
/// draining.
fn budget(app: &App) -> (usize, usize, u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let ps = app.ps();
        let states: Vec<String> = ps["instances"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["type"] == "web")
            .map(|i| i["state"].as_str().unwrap().to_string())
            .collect();
        if states.iter().all(|s| s == "up" || s == "pending") {
            let count = |state: &str| states.iter().filter(|s| *s == state).count();
            return (
                count("up"),
                count("pending"),
                ps["reserved"].as_u64().unwrap(),
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "did not settle: {ps:#}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The memory budget holds for memory changes too: what does not fit is pending.
#[test]
fn memory_changes_stay_within_the_capacity() {
    const MIB: u64 = 1 << 20;
    let app = App::new("web: {guests}/hello.wasm\n");
    let _host = app.up(&["--capacity", "600MiB", "-m", "web=4", "--memory", "128MiB"]);
    assert_eq!(budget(&app), (4, 0, 512 * MIB));
    // 4 × 512 MiB: only one fits.
    let out = app.cli(&["scale", "web=4:512MiB"]);
    assert!(out.ok, "{out:?}");
    assert!(out.stdout.contains("pending: capacity"), "{}", out.stdout);
    assert_eq!(budget(&app), (1, 3, 512 * MIB));
    // `--memory` for a type without a count change: two of 256 MiB fit.
    let out = app.cli(&["scale", "--memory", "256MiB", "web+0"]);
    assert!(out.ok, "{out:?}");
    assert_eq!(budget(&app), (2, 2, 512 * MIB));
    // A deploy that raises the type's memory.
    app.write("wasmform.toml", "[processes.web]\nmemory = \"300MiB\"\n");
    let out = app.cli(&["deploy"]);
    assert!(out.ok, "{out:?}");
    assert_eq!(budget(&app), (2, 2, 600 * MIB));
    // Back down: all four fit again, and the pending ones start by themselves; the notes
    // printed mid-roll do not call them short of room.
    let out = app.cli(&["scale", "web=4:128MiB"]);
    assert!(out.ok, "{out:?}");
    assert!(!out.stdout.contains("pending: capacity"), "{}", out.stdout);
    assert_eq!(budget(&app), (4, 0, 512 * MIB));
}

/// `cd sub && wasmform up -f ../Procfile` is the same app as `up -f Procfile`: the same state
/// directory, and no release for a path spelled differently.
#[test]
fn a_procfile_path_spelled_differently_is_the_same_app() {
    let app = App::new(WEB_AND_TICKER);
    std::fs::create_dir(app.path("sub")).unwrap();
    let dir = std::fs::canonicalize(app.dir.path()).unwrap();
    let roundabout = app.path("sub/../Procfile");
    for procfile in [app.procfile(), roundabout.clone(), app.procfile()] {
        let mut host =
            crate::support::Wasmform::spawn(&["up", "-f", procfile.to_str().unwrap(), "-p", "0"]);
        let out = host.wait_for("listening on", Duration::from_secs(60));
        assert!(
            !out.contains("changed since"),
            "{}: {out}",
            procfile.display()
        );
        assert!(
            out.contains(&format!(
                "control API on {}/.wasmform/control.sock",
                dir.display()
            )),
            "{out}"
        );
        host.signal(libc::SIGTERM);
        assert!(host.wait_exit(Duration::from_secs(20)).unwrap().success());
    }
}

/// `logs -f` ends cleanly when its host shuts down.
#[test]
fn a_follower_ends_with_a_clear_line_when_the_host_stops() {
    let app = App::new(WEB_AND_TICKER);
    let mut host = app.up(&[]);
    let mut follower = std::process::Command::new(env!("CARGO_BIN_EXE_wasmform"))
        .args(["logs", "-f", "--app"])
        .arg(app.dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Once it follows (a tick arrived through it), stop the host.
    let mut stdout = std::io::BufReader::new(follower.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("tick") {
        line.clear();
        assert!(std::io::BufRead::read_line(&mut stdout, &mut line).unwrap() > 0);
    }
    host.signal(libc::SIGTERM);
    assert!(host.wait_exit(Duration::from_secs(20)).unwrap().success());
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let out = follower.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(
        stderr.contains("the host stopped; no more lines to follow"),
        "{stderr}"
    );
}

/// An instance that its restart policy left exited starts again when a scale names its type.
#[test]
fn a_scale_naming_a_type_starts_its_exited_instances_again() {
    let app = App::new("oneshot: {guests}/test-worker.wasm exit 0\n");
    app.write(
        "wasmform.toml",
        "[processes.oneshot]\nrestart = \"on-failure\"\n",
    );
    let host = app.up(&[]);
    let runs = |id: &str| {
        host.output()
            .lines()
            .filter(|l| l.contains(id) && l.ends_with("exiting with 0"))
            .count()
    };
    let exited = |n: usize| {
        host.wait_until(Duration::from_secs(20), |out| {
            out.matches("oneshot.1 exited with status 0; not restarted")
                .count()
                >= n
        })
        .expect("oneshot.1 did not exit")
    };
    exited(1);
    // An exited instance is not listed as running.
    let out = app.cli(&["restart", "oneshot.9"]);
    assert!(
        out.stderr.contains("(running: none; exited: oneshot.1)"),
        "{}",
        out.stderr
    );
    for (i, change) in ["oneshot=1", "oneshot+0"].iter().enumerate() {
        let out = app.cli(&["scale", change]);
        assert!(out.ok, "{out:?}");
        exited(i + 2);
        assert_eq!(runs("oneshot.1"), i + 2, "{change}: {}", host.output());
    }
    let out = app.cli(&["scale", "oneshot=2"]);
    assert!(out.ok, "{out:?}");
    exited(4);
    host.wait_for("oneshot.2 exited with status 0", Duration::from_secs(20));
    assert_eq!(runs("oneshot.1"), 4);
    assert_eq!(runs("oneshot.2"), 1);
}

/// `up -m` takes `scale`'s `TYPE=N:SIZE`; the size wins over `--memory` for its type.
#[test]
fn up_takes_memory_in_its_formation_as_scale_does() {
    let app = App::new(WEB_AND_TICKER);
    let _host = app.up(&["--memory", "128MiB", "-m", "web=2:64MiB,worker=1"]);
    let by_type = scales(&app);
    assert_eq!(by_type["web"], (2, 64 << 20));
    assert_eq!(by_type["worker"], (1, 128 << 20));
    let other = App::new(WEB_AND_TICKER);
    let out = other.up_fails(&["-m", "web=2:12XB"]);
    assert!(
        out.contains("`web=2:12XB`: invalid memory size `12XB`"),
        "{out}"
    );
}

/// Releases persist in the state directory, so listing them needs no host.
#[test]
fn releases_are_listed_without_a_host() {
    let app = App::new("web: app.wasm\n");
    app.install("hello.wasm", "app.wasm");
    let mut host = app.up(&[]);
    app.install("test_web.wasm", "app.wasm");
    assert!(app.cli(&["deploy"]).ok);
    let running = app.cli(&["releases"]);
    assert!(running.ok, "{running:?}");
    host.signal(libc::SIGTERM);
    assert!(host.wait_exit(Duration::from_secs(20)).unwrap().success());
    let stopped = app.cli(&["releases"]);
    assert!(stopped.ok, "{stopped:?}");
    assert_eq!(stopped.stdout, running.stdout);
    assert!(stopped.stdout.starts_with("v2 "), "{}", stopped.stdout);
    // An app that never ran still says no host runs.
    let never = App::new(WEB_AND_TICKER);
    let out = never.cli(&["releases"]);
    assert!(
        !out.ok && out.stderr.contains("no wasmform host is running"),
        "{out:?}"
    );
}

/// Parameters a route does not take, and log filters naming nothing, are refused.
#[test]
fn the_control_api_refuses_parameters_it_does_not_take() {
    let app = App::new(WEB_AND_TICKER);
    let _host = app.up(&[]);
    for target in ["/v1/ps?verbose=1", "/v1/releases?all", "/v1/formation?x=y"] {
        let raw = app.control_get(target);
        assert!(raw.starts_with("HTTP/1.1 400"), "{target}: {raw}");
        assert!(raw.contains("unknown parameter"), "{target}: {raw}");
    }
    let raw = app.control_get("/v1/logs?follow=yes");
    assert!(
        raw.contains("invalid `follow=yes`: expected `true` or `false`"),
        "{raw}"
    );
    assert!(app.control_get("/v1/ps").starts_with("HTTP/1.1 200"));
    let out = app.cli(&["logs", "--ps", "bogus"]);
    assert!(!out.ok, "{out:?}");
    assert!(
        out.stderr
            .contains("unknown process type or instance `bogus`: known types are web, worker"),
        "{}",
        out.stderr
    );
    for filter in ["web", "worker.1", "wasmform"] {
        let out = app.cli(&["logs", "--ps", filter, "-n", "1"]);
        assert!(out.ok, "{filter}: {out:?}");
    }
}

#[test]
fn the_health_check_answers_whether_a_web_instance_is_ready() {
    let app = App::new(WEB_AND_TICKER);
    let host = app.up(&["--health", "127.0.0.1:0"]);
    let health = host.logged_addr("health check on");
    let ok = get(health, "/health");
    assert_eq!(
        (ok.status, ok.body.as_str()),
        (200, "ok: 1 `web` instances ready\n")
    );
    assert!(app.cli(&["scale", "web=0"]).ok);
    let down = get(health, "/health");
    assert_eq!(
        (down.status, down.body.as_str()),
        (503, "unavailable: no `web` instance is ready here\n")
    );
    assert_eq!(get(health, "/metrics").status, 404);
}
