//! The rest of the CI lifecycle through the real binary: `wait`, `events`, one-off `run`.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{App, Cli};

/// `wasmform run --app DIR ARGS…` (the app first: everything after `--` is the guest's).
fn run(app: &App, args: &[&str], stdin: &[u8]) -> Cli {
    let dir = app.path("");
    let mut all = vec!["run", "--app", dir.to_str().unwrap()];
    all.extend_from_slice(args);
    let mut child = Command::new(env!("CARGO_BIN_EXE_wasmform"))
        .args(&all)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("failed to run wasmform");
    let mut input = child.stdin.take().unwrap();
    let bytes = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        use std::io::Write as _;
        let _ = input.write_all(&bytes);
    });
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap();
    Cli {
        ok: output.status.success(),
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

#[test]
fn wait_holds_for_each_condition_fails_fast_and_times_out_with_124() {
    let app = App::new("web: {guests}/test_web.wasm\noneshot: {guests}/test-worker.wasm exit 0\n");
    app.write(
        "wasmform.toml",
        "[processes.web]\nhealth = { path = \"/health\", interval = \"200ms\" }\n[processes.oneshot]\nrestart = \"on-failure\"\n",
    );
    let _host = app.up(&[]);
    let wait = |args: &[&str]| {
        let mut all = vec!["wait"];
        all.extend_from_slice(args);
        app.cli(&all)
    };
    let ready = wait(&[]);
    assert_eq!(ready.code, Some(0), "{}", ready.stderr);
    let all = wait(&[
        "--for",
        "healthy",
        "--for",
        "http=/",
        "--for",
        "http=/health=200",
        "--for",
        "release=v1",
        "--for",
        r"log=oneshot\.1 .*exiting with 0",
    ]);
    assert_eq!(all.code, Some(0), "{}", all.stderr);
    let exited = wait(&["--ps", "oneshot", "--for", "exited=0"]);
    assert_eq!(exited.code, Some(0), "{}", exited.stderr);
    // Fast failures: conditions that can no longer hold, not a timeout.
    let started = Instant::now();
    let other_code = wait(&["--ps", "oneshot.1", "--for", "exited=5", "--timeout", "60s"]);
    assert_eq!(other_code.code, Some(1), "{}", other_code.stderr);
    assert!(
        other_code
            .stderr
            .contains("exited=5 can no longer hold: oneshot.1 exited with status 0"),
        "{}",
        other_code.stderr
    );
    assert!(
        other_code.stderr.contains("--- last lines of oneshot.1"),
        "{}",
        other_code.stderr
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    let old = wait(&["--for", "release=v0"]);
    assert_eq!(old.code, Some(1), "{}", old.stderr);
    assert!(
        old.stderr.contains("release v1 is current"),
        "{}",
        old.stderr
    );
    // Timeouts: 124, saying what was still missing.
    let later = wait(&["--for", "release=v2", "--timeout", "300ms"]);
    assert_eq!(later.code, Some(124), "{}", later.stderr);
    assert!(
        later
            .stderr
            .contains("waiting for release=v2: release v1 is current"),
        "{}",
        later.stderr
    );
    let once = wait(&["--timeout", "0", "--for", "log=never printed"]);
    assert_eq!(once.code, Some(124), "{}", once.stderr);
    let status = wait(&["--for", "http=/=418", "--timeout", "0"]);
    assert_eq!(status.code, Some(124), "{}", status.stderr);
    assert!(
        status.stderr.contains("GET / answered 200"),
        "{}",
        status.stderr
    );
    // Bad input names the value.
    let unknown = wait(&["--ps", "nosuch"]);
    assert_eq!(unknown.code, Some(1), "{}", unknown.stderr);
    assert!(
        unknown
            .stderr
            .contains("unknown process type or instance `nosuch` in --ps: known types are"),
        "{}",
        unknown.stderr
    );
    let bad = wait(&["--for", "sunny"]);
    assert_eq!(bad.code, Some(2), "{}", bad.stderr);
    assert!(
        bad.stderr.contains("invalid condition `sunny`"),
        "{}",
        bad.stderr
    );
    // stopped: a type scaled to 0, then the host itself.
    assert!(app.cli(&["scale", "web=0"]).ok);
    let stopped = wait(&["--ps", "web", "--for", "stopped"]);
    assert_eq!(stopped.code, Some(0), "{}", stopped.stderr);
    assert!(app.cli(&["down"]).ok);
    let gone = wait(&["--for", "stopped"]);
    assert_eq!(gone.code, Some(0), "{}", gone.stderr);
    let no_host = wait(&[]);
    assert_eq!(no_host.code, Some(3), "{}", no_host.stderr);
}

#[test]
fn wait_fails_fast_on_a_crash_loop_and_when_the_host_exits() {
    let app = App::new("web: {guests}/hello.wasm\nworker: {guests}/test-worker.wasm panic\n");
    let _host = app.up(&["--restart-delay", "20ms", "--restart-max", "80ms"]);
    let started = Instant::now();
    let looping = app.cli(&["wait", "--timeout", "120s"]);
    assert_eq!(looping.code, Some(1), "{}", looping.stderr);
    assert!(
        looping
            .stderr
            .contains("ready can no longer hold: worker.1 crash-loops"),
        "{}",
        looping.stderr
    );
    assert!(
        looping.stderr.contains("about to panic"),
        "{}",
        looping.stderr
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    let ps = app.ps();
    let worker = ps["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == "worker.1")
        .unwrap();
    assert!(worker["restarts"].as_u64().unwrap() > 1, "{worker}");

    // A wait in progress fails when the host goes away.
    let waiting = app.cli_spawn(&["wait", "--for", "release=v9", "--timeout", "120s"]);
    // Time for the client to start and find the host, even on a loaded machine (it exits 3
    // if the host is gone before it looks).
    std::thread::sleep(Duration::from_millis(1500));
    assert!(app.cli(&["down"]).ok);
    let output = waiting.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the host exited while waiting for release=v9"),
        "{stderr}"
    );
}

/// The kinds docs/events.md lists.
const KINDS: &[&str] = &[
    "instance.starting",
    "instance.up",
    "instance.crashed",
    "instance.exited",
    "instance.draining",
    "instance.stopped",
    "instance.pending",
    "health.passing",
    "health.failing",
    "formation.scaled",
    "formation.restarted",
    "release.deployed",
    "release.rolled_back",
    "release.failed",
    "run.started",
    "run.exited",
    "host.listening",
    "host.stopping",
    "events.skipped",
];

#[test]
fn events_follow_the_documented_schema_during_a_scale_and_a_deploy() {
    let app = App::new("web: {guests}/hello.wasm\n");
    let _host = app.up(&[]);
    let mut follower = app.cli_spawn(&["events", "--json", "--since", "0"]);
    let lines = BufReader::new(follower.stdout.take().unwrap());
    let reader =
        std::thread::spawn(move || lines.lines().map_while(Result::ok).collect::<Vec<_>>());
    let scaled = app.cli(&["scale", "web=2"]);
    assert!(scaled.ok, "{}", scaled.stderr);
    app.write(
        "wasmform.toml",
        "[processes.web]\nenv = { GREETING = \"v2\" }\n",
    );
    let deployed = app.cli(&["deploy"]);
    assert!(deployed.ok, "{}", deployed.stderr);
    // Readable lines, without following.
    let readable = app.cli(&["events", "--no-follow"]);
    assert!(readable.ok, "{}", readable.stderr);
    assert!(
        readable.stdout.contains("formation.scaled web=2"),
        "{}",
        readable.stdout
    );
    assert!(app.cli(&["down"]).ok);
    let lines = reader.join().unwrap();
    let _ = follower.wait();
    let events: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let mut last = 0;
    for e in &events {
        assert_eq!(e["v"], 1, "{e}");
        let seq = e["seq"].as_u64().unwrap();
        assert!(seq > last, "seq in order: {e}");
        last = seq;
        let time = e["time"].as_str().unwrap();
        assert!(time.ends_with('Z') && time.contains('T'), "{e}");
        let kind = e["event"].as_str().unwrap();
        assert!(KINDS.contains(&kind), "undocumented kind: {e}");
        for (key, value) in e.as_object().unwrap() {
            assert!(!value.is_null(), "`{key}` is null, not absent: {e}");
        }
    }
    assert_eq!(events[0]["seq"], 1, "replayed from the start");
    let find = |kind: &str, pred: &dyn Fn(&serde_json::Value) -> bool| {
        events
            .iter()
            .find(|e| e["event"] == kind && pred(e))
            .unwrap_or_else(|| panic!("no {kind}: {lines:#?}"))
    };
    let listening = find("host.listening", &|_| true);
    assert!(
        listening["url"]
            .as_str()
            .unwrap()
            .starts_with("http://127.0.0.1:")
    );
    find("instance.up", &|e| {
        e["instance"] == "web.2" && e["release"] == 1
    });
    find("formation.scaled", &|e| e["formation"]["web"]["count"] == 2);
    find("release.deployed", &|e| e["release"] == 2);
    find("instance.up", &|e| {
        e["instance"] == "web.1" && e["release"] == 2
    });
    find("instance.draining", &|e| e["release"] == 1);
    find("instance.stopped", &|e| e["release"] == 1);
    find("host.stopping", &|_| true);
}

#[test]
fn run_passes_the_exit_status_through_with_its_streams_attached() {
    let app = App::new("web: {guests}/hello.wasm\ntask: {guests}/test-worker.wasm exit 0\n");
    let host = app.up(&["-m", "web=1,task=0"]);
    let seven = run(&app, &["task", "--", "exit", "7"], b"");
    assert_eq!(seven.code, Some(7), "{}", seven.stderr);
    assert_eq!(seven.stdout, "exiting with 7\n");
    host.wait_for("run.1 exited with status 7", Duration::from_secs(10));
    let own_args = run(&app, &["task"], b"");
    assert_eq!(own_args.code, Some(0), "{}", own_args.stderr);
    assert_eq!(own_args.stdout, "exiting with 0\n");
    let env = run(
        &app,
        &["task", "-e", "GREETING=hi", "--", "getenv", "GREETING"],
        b"",
    );
    assert_eq!(env.code, Some(0), "{}", env.stderr);
    assert_eq!(env.stdout, "GREETING=hi\n");
    assert_eq!(
        run(&app, &["task", "--", "getenv", "GREETING"], b"").code,
        Some(3)
    );
    let cat = run(&app, &["task", "--", "cat"], b"hello\nworld\n");
    assert_eq!(cat.code, Some(0), "{}", cat.stderr);
    assert_eq!(cat.stdout, "hello\nworld\n");
    assert!(
        cat.stderr.contains("stdin closed after 12 bytes"),
        "{}",
        cat.stderr
    );
    // wasmform's own endings have codes of their own.
    let trap = run(&app, &["task", "--", "panic"], b"");
    assert_eq!(trap.code, Some(134), "{}", trap.stderr);
    assert!(
        trap.stderr.contains("test-worker panic requested"),
        "{}",
        trap.stderr
    );
    let memory = run(
        &app,
        &["task", "--memory", "16MiB", "--", "alloc", "64"],
        b"",
    );
    assert_eq!(memory.code, Some(137), "{}", memory.stderr);
    assert!(
        memory.stderr.contains("memory quota exceeded (16 MiB)"),
        "{}",
        memory.stderr
    );
    let slow = run(&app, &["task", "--timeout", "300ms", "--", "sleep"], b"");
    assert_eq!(slow.code, Some(124), "{}", slow.stderr);
    assert!(
        slow.stderr.contains("stopped after its timeout of 300"),
        "{}",
        slow.stderr
    );
    // Refusals name the value.
    let http = run(&app, &["web"], b"");
    assert_eq!(http.code, Some(1), "{}", http.stderr);
    assert!(
        http.stderr.contains("`web` is an HTTP component"),
        "{}",
        http.stderr
    );
    let unknown = run(&app, &["nosuch"], b"");
    assert_eq!(unknown.code, Some(1), "{}", unknown.stderr);
    assert!(
        unknown
            .stderr
            .contains("unknown process type `nosuch`: known types are task, web"),
        "{}",
        unknown.stderr
    );
    // Detached: the output goes to the app log under its name.
    let detached = run(&app, &["task", "--detach", "--", "print", "3"], b"");
    assert_eq!(detached.code, Some(0), "{}", detached.stderr);
    let name = detached.stdout.trim().to_string();
    assert!(name.starts_with("run."), "{}", detached.stdout);
    host.wait_for(
        &format!("{name} | line 3 from {name}"),
        Duration::from_secs(10),
    );
    // A one-off is not part of the formation.
    let ps = app.ps();
    assert!(
        ps["instances"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["type"] != "task"),
        "{ps}"
    );
}

#[test]
fn run_is_cancelled_by_ctrl_c_and_by_a_client_that_goes_away() {
    let app = App::new("web: {guests}/hello.wasm\ntask: {guests}/test-worker.wasm sleep\n");
    let host = app.up(&["-m", "web=1,task=0"]);
    let dir = app.path("");
    for (signal, code) in [(libc::SIGINT, Some(130)), (libc::SIGKILL, None)] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_wasmform"))
            .args(["run", "--app", dir.to_str().unwrap(), "task"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Its output is attached: once it arrives, the client is attached too.
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line, "sleeping\n");
        // SAFETY: kill has no memory preconditions; the pid is our own child's.
        unsafe { libc::kill(child.id() as i32, signal) };
        let status = child.wait().unwrap();
        assert_eq!(status.code(), code, "{status}");
    }
    host.wait_for("run.1 cancelled by its client", Duration::from_secs(10));
    host.wait_for("run.2 cancelled by its client", Duration::from_secs(10));
}

#[test]
fn run_without_a_host_runs_in_a_host_of_its_own() {
    let app = App::new("web: {guests}/hello.wasm\ntask: {guests}/test-worker.wasm exit 5\n");
    let five = run(&app, &["task"], b"");
    assert_eq!(five.code, Some(5), "{}", five.stderr);
    assert_eq!(five.stdout, "exiting with 5\n");
    let cat = run(&app, &["task", "--", "cat"], b"abc");
    assert_eq!(cat.code, Some(0), "{}", cat.stderr);
    assert_eq!(cat.stdout, "abc");
    let file = crate::support::guest("test-worker.wasm");
    let direct = run(
        &app,
        &[file.to_str().unwrap(), "-e", "X=1", "--", "getenv", "X"],
        b"",
    );
    assert_eq!(direct.code, Some(0), "{}", direct.stderr);
    assert_eq!(direct.stdout, "X=1\n");
    // Nothing recorded: no release, no formation.
    assert!(!app.path(".wasmform/releases.json").exists());
    assert!(!app.path(".wasmform/formation.json").exists());
    let http = run(&app, &["web"], b"");
    assert_eq!(http.code, Some(1), "{}", http.stderr);
    assert!(
        http.stderr.contains("is an HTTP component"),
        "{}",
        http.stderr
    );
}
