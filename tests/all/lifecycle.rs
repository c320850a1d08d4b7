//! The lifecycle a CI job scripts: `wasmform down`, and `wasmform up -- CMD`.

use std::time::{Duration, Instant};

use crate::support::{App, Wasmform};

/// `wasmform up -f PROCFILE -p 0 ARGS…` for `app`, not waiting for anything.
fn up(app: &App, args: &[&str]) -> Wasmform {
    let procfile = app.procfile();
    let mut all = vec!["up", "-f", procfile.to_str().unwrap(), "-p", "0"];
    all.extend_from_slice(args);
    Wasmform::spawn(&all)
}

#[test]
fn down_stops_the_host_and_succeeds_again_when_nothing_runs() {
    let app = App::new("web: {guests}/hello.wasm\nworker: {guests}/ticker.wasm 50\n");
    let mut host = app.up(&[]);
    assert_eq!(host.get("/").status, 200);
    let down = app.cli(&["down"]);
    assert!(down.ok, "{}", down.stderr);
    assert!(
        down.stderr.contains("stopped the host (pid"),
        "{}",
        down.stderr
    );
    // `down` returns once the process has exited, so there is nothing left to wait for.
    let status = host
        .wait_exit(Duration::ZERO)
        .expect("the host is gone when `down` returns");
    assert!(status.success(), "{status}\n{}", host.output());
    let output = host.output();
    assert!(
        output.contains("Shutdown requested (`wasmform down`)"),
        "{output}"
    );
    assert!(output.contains("stopped"), "{output}");
    assert!(!app.path(".wasmform/control.sock").exists());
    // Idempotent: nothing runs, nothing to do, success.
    let again = app.cli(&["down"]);
    assert!(again.ok, "{}", again.stderr);
    assert!(
        again.stderr.contains("no wasmform host is running"),
        "{}",
        again.stderr
    );
    // The formation and releases stay for the next `up`, unless purged.
    assert!(app.path(".wasmform").exists());
    let purge = app.cli(&["down", "--purge"]);
    assert!(purge.ok, "{}", purge.stderr);
    assert!(!app.path(".wasmform").exists(), "{}", purge.stderr);
}

#[test]
fn up_with_a_command_exits_with_its_status_and_leaves_nothing_running() {
    let app = App::new("web: {guests}/hello.wasm\n");
    let mut host = up(&app, &["--", "sh", "-c", "exit 7"]);
    let status = host
        .wait_exit(Duration::from_secs(60))
        .expect("`up` exits when its command does");
    let output = host.output();
    assert_eq!(status.code(), Some(7), "{output}");
    assert!(
        output.contains("`sh` exited with status 7: shutting down"),
        "{output}"
    );
    assert!(!app.path(".wasmform/control.sock").exists(), "{output}");
}

#[test]
fn the_command_after_the_double_dash_reaches_the_formation() {
    let app = App::new("web: {guests}/hello.wasm\n");
    app.write(
        "check.py",
        "import os, urllib.request\n\
         url = os.environ['WASMFORM_URL']\n\
         body = urllib.request.urlopen(url + '/from-ci').read().decode()\n\
         assert body.startswith('hello from web.1'), body\n\
         assert url.endswith(':' + os.environ['PORT']), url\n\
         assert os.path.exists(os.environ['WASMFORM_CONTROL'])\n\
         print('check passed')\n",
    );
    let script = app.path("check.py");
    let python = crate::tools::python();
    let mut host = up(
        &app,
        &["--", python.to_str().unwrap(), script.to_str().unwrap()],
    );
    let status = host
        .wait_exit(Duration::from_secs(60))
        .expect("`up` exits when its command does");
    let output = host.output();
    assert!(status.success(), "{status}\n{output}");
    assert!(output.contains("check passed"), "{output}");
    assert!(output.contains("path=\"/from-ci\""), "{output}");
}

#[test]
fn a_command_that_cannot_start_fails_up_with_the_reason() {
    let app = App::new("web: {guests}/hello.wasm\n");
    let mut host = up(&app, &["--", "no-such-command-wasmform-test"]);
    let status = host.wait_exit(Duration::from_secs(60)).expect("`up` exits");
    let output = host.output();
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(
        output.contains(
            "cannot run `no-such-command-wasmform-test` (the command after `--`): is it installed and on PATH?"
        ),
        "{output}"
    );
    assert!(!app.path(".wasmform/control.sock").exists(), "{output}");
}

#[test]
fn a_signal_to_up_stops_its_command_too() {
    let app = App::new("web: {guests}/hello.wasm\n");
    let pid_file = app.path("command.pid");
    let script = format!("echo $$ > {}; exec sleep 600", pid_file.display());
    let mut host = up(&app, &["--", "sh", "-c", &script]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let pid = loop {
        if let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
        {
            break pid;
        }
        assert!(
            Instant::now() < deadline,
            "the command never started:\n{}",
            host.output()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    host.signal(libc::SIGTERM);
    let status = host
        .wait_exit(Duration::from_secs(60))
        .expect("`up` exits on SIGTERM");
    let output = host.output();
    assert_eq!(status.code(), Some(143), "{output}");
    assert!(
        output.contains("SIGTERM received: shutting down"),
        "{output}"
    );
    // `up` stopped and reaped its command before exiting.
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the command (pid {pid}) outlived `up`:\n{output}"
    );
}

#[test]
fn exit_with_drains_the_host_when_its_process_ends() {
    let app = App::new("web: {guests}/hello.wasm\n");
    let mut job = std::process::Command::new("sleep")
        .arg("600")
        .spawn()
        .unwrap();
    let pid = job.id().to_string();
    let mut host = app.up(&["--exit-with", &pid]);
    assert_eq!(host.get("/").status, 200);
    job.kill().unwrap();
    job.wait().unwrap();
    let status = host
        .wait_exit(Duration::from_secs(60))
        .expect("the host exits once its --exit-with process has ended");
    let output = host.output();
    assert!(status.success(), "{status}\n{output}");
    assert!(
        output.contains(&format!("process {pid} ended (--exit-with): shutting down")),
        "{output}"
    );
    assert!(!app.path(".wasmform/control.sock").exists(), "{output}");
}

#[test]
fn exit_with_a_process_that_does_not_exist_is_refused() {
    let app = App::new("web: {guests}/hello.wasm\n");
    let procfile = app.procfile();
    let out = crate::support::run_fails(&[
        "up",
        "-f",
        procfile.to_str().unwrap(),
        "-p",
        "0",
        "--exit-with",
        "999999999",
    ]);
    assert!(
        out.contains("--exit-with 999999999: cannot watch process 999999999"),
        "{out}"
    );
}

#[test]
fn ttl_is_a_hard_deadline_with_the_status_of_timeout() {
    let app = App::new("web: {guests}/hello.wasm\n");
    let mut host = app.up(&["--ttl", "1s"]);
    let status = host
        .wait_exit(Duration::from_secs(60))
        .expect("the host exits at its --ttl");
    let output = host.output();
    assert_eq!(status.code(), Some(124), "{output}");
    assert!(
        output.contains("--ttl 1 s reached: shutting down"),
        "{output}"
    );
    assert!(!app.path(".wasmform/control.sock").exists(), "{output}");
}

#[test]
fn client_commands_without_a_host_exit_3_and_refusals_exit_1() {
    let app = App::new("web: {guests}/hello.wasm\n");
    for args in [&["ps"][..], &["scale", "web=2"], &["restart"], &["deploy"]] {
        let out = app.cli(args);
        assert_eq!(out.code, Some(3), "{args:?}: {}", out.stderr);
        assert!(
            out.stderr.contains("no wasmform host is running for"),
            "{args:?}: {}",
            out.stderr
        );
    }
    let host = app.up(&[]);
    assert_eq!(host.get("/").status, 200);
    let refused = app.cli(&["scale", "nosuchtype=2"]);
    assert_eq!(refused.code, Some(1), "{}", refused.stderr);
}

/// `wasmform up --detach -f PROCFILE ARGS…` for `app`, run to its end: (status, stdout,
/// stderr). The detached host, if any, is stopped when the returned guard drops.
fn up_detached<'a>(app: &'a App, args: &[&str]) -> (std::process::Output, Teardown<'a>) {
    let procfile = app.procfile();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_wasmform"))
        .args(["up", "--detach", "-f", procfile.to_str().unwrap()])
        .args(args)
        .env_remove("PORT")
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("failed to run wasmform");
    (output, Teardown(app))
}

/// Runs `wasmform down` for the app when dropped, so a failed test leaves no host behind.
struct Teardown<'a>(&'a App);

impl Drop for Teardown<'_> {
    fn drop(&mut self) {
        let _ = self.0.cli(&["down", "--grace", "5s"]);
    }
}

/// Whether process `pid` is gone (reaped, or never existed).
fn gone(pid: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

#[test]
fn up_detach_returns_once_requests_succeed_and_down_stops_it() {
    let app = App::new("web: {guests}/hello.wasm\nworker: {guests}/ticker.wasm 50\n");
    let (output, _teardown) = up_detached(&app, &["-p", "0", "--json", "-m", "web=2"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let answer: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stdout)));
    let url = answer["url"].as_str().unwrap();
    let addr: std::net::SocketAddr = url.strip_prefix("http://").unwrap().parse().unwrap();
    // Ready means requests succeed now, on every instance.
    for _ in 0..4 {
        assert_eq!(crate::support::get(addr, "/").status, 200);
    }
    assert_eq!(answer["formation"], "web=2,worker=1", "{answer}");
    assert_eq!(answer["release"], 1, "{answer}");
    assert!(answer["ready_ms"].as_u64().is_some(), "{answer}");
    assert!(
        std::path::Path::new(answer["control"].as_str().unwrap()).exists(),
        "{answer}"
    );
    let log = std::fs::read_to_string(answer["log"].as_str().unwrap()).unwrap();
    assert!(log.contains("listening on"), "{log}");
    let ps = app.ps();
    for instance in ps["instances"].as_array().unwrap() {
        assert_eq!(instance["state"], "up", "{instance}");
    }
    let pid = answer["pid"].to_string();
    let down = app.cli(&["down"]);
    assert!(down.ok, "{}", down.stderr);
    assert!(gone(&pid), "the detached host (pid {pid}) outlived `down`");
    assert!(!app.path(".wasmform/host.pid").exists());
}

#[test]
fn up_detach_fails_fast_on_a_crash_looping_worker_and_leaves_nothing_running() {
    let app = App::new("web: {guests}/hello.wasm\nworker: {guests}/test-worker.wasm panic\n");
    let (output, _teardown) = up_detached(&app, &["-p", "0", "--wait-timeout", "120s"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    // 1, not 124: it failed at the crash, not at the timeout.
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the formation cannot become ready"),
        "{stderr}"
    );
    assert!(stderr.contains("--- last lines of worker.1"), "{stderr}");
    assert!(
        stderr.contains("about to panic"),
        "the worker's own output: {stderr}"
    );
    let pid = std::fs::read_to_string(app.path(".wasmform/host.pid")).unwrap();
    assert!(
        gone(pid.trim()),
        "the failed host was left running:\n{stderr}"
    );
    assert!(!app.path(".wasmform/control.sock").exists(), "{stderr}");
}

#[test]
fn up_detach_of_an_app_that_cannot_start_says_why() {
    let app = App::new("web: {guests}/no-such-component.wasm\n");
    let (output, _teardown) = up_detached(&app, &["-p", "0"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the host exited (exit status: 1) before its formation was ready"),
        "{stderr}"
    );
    assert!(
        stderr.contains("no-such-component.wasm"),
        "the host's own error: {stderr}"
    );
}
