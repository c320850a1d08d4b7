//! systemd integration through the real binary: the notifications `up` sends to a
//! `NOTIFY_SOCKET` this test listens on, and the unit `export systemd` writes.

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::{App, Wasmform, get};

/// The next datagram on `socket` (panics after its read timeout).
fn next(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).expect("a notification in time");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn ready_comes_once_requests_succeed_then_watchdog_pings_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let app = App::new("web: {guests}/hello.wasm\nworker: {guests}/ticker.wasm\n");
    let procfile = app.procfile();
    let host = Wasmform::spawn_with(
        &["up", "-f", procfile.to_str().unwrap(), "-p", "0"],
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    let mut messages = Vec::new();
    loop {
        let message = next(&socket);
        let ready = message.lines().any(|l| l == "READY=1");
        messages.push(message);
        if ready {
            break;
        }
    }
    // Ready means serving: a request succeeds at once.
    let addr = host.logged_addr("listening on");
    assert_eq!(get(addr, "/").status, 200);
    assert!(
        messages[0].contains("STATUS=compiling 2 components")
            && messages[0].contains("EXTEND_TIMEOUT_USEC=300000000"),
        "{messages:?}"
    );
    let ready = messages.last().unwrap();
    assert!(
        ready.contains("STATUS=formation web=1,worker=1 ready"),
        "{messages:?}"
    );
    // Every half of WATCHDOG_USEC (100 ms) from the host's runtime.
    let started = Instant::now();
    let mut pings = 0;
    while started.elapsed() < Duration::from_secs(1) {
        if next(&socket).lines().any(|l| l == "WATCHDOG=1") {
            pings += 1;
        }
    }
    assert!((6..=14).contains(&pings), "{pings} pings in 1 s");
    host.signal(libc::SIGTERM);
    loop {
        let message = next(&socket);
        if message.contains("STOPPING=1") {
            assert!(
                message.contains("STATUS=stopping: SIGTERM received"),
                "{message}"
            );
            break;
        }
    }
}

fn export(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_wasmform"))
        .arg("export")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn export_systemd_writes_every_directive_and_keeps_an_existing_unit() {
    let app = App::new("web: {guests}/hello.wasm\n");
    let procfile = app.procfile();
    let procfile = procfile.to_str().unwrap();
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().to_str().unwrap();
    let args = [
        "systemd",
        dir,
        "-f",
        procfile,
        "-a",
        "shop",
        "-m",
        "web=2",
        "-p",
        "8080",
        "--grace",
        "20s",
        "--watchdog",
        "10s",
        "--memory-max",
        "2GiB",
    ];
    let done = export(&args);
    assert!(done.status.success(), "{done:?}");
    let unit_path = out.path().join("shop.service");
    let unit = std::fs::read_to_string(&unit_path).unwrap();
    let exe = env!("CARGO_BIN_EXE_wasmform");
    let canonical = std::fs::canonicalize(procfile).unwrap();
    let app_dir = canonical.parent().unwrap().display().to_string();
    for line in [
        "Type=notify".to_string(),
        format!(
            "ExecStart={exe} up -f {} -p 8080 --grace 20s -m web=2",
            canonical.display()
        ),
        format!("ExecReload={exe} deploy --app {app_dir}"),
        format!("WorkingDirectory={app_dir}"),
        "KillSignal=SIGTERM".to_string(),
        "TimeoutStopSec=35s".to_string(),
        "Restart=on-failure".to_string(),
        "WatchdogSec=10s".to_string(),
        "LimitNOFILE=65536".to_string(),
        "MemoryMax=2147483648".to_string(),
        "WantedBy=multi-user.target".to_string(),
    ] {
        assert!(unit.lines().any(|l| l == line), "no `{line}` in:\n{unit}");
    }
    for never in ["LimitAS=", "MemoryDenyWriteExecute="] {
        assert!(!unit.lines().any(|l| l.starts_with(never)), "{unit}");
    }

    // An existing unit is kept without --force.
    std::fs::write(&unit_path, "# mine\n").unwrap();
    let kept = export(&args);
    assert!(!kept.status.success());
    let stderr = String::from_utf8_lossy(&kept.stderr);
    assert!(
        stderr.contains("shop.service exists: it is kept; pass --force to overwrite it"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&unit_path).unwrap(), "# mine\n");
    let mut forced = args.to_vec();
    forced.push("--force");
    assert!(export(&forced).status.success());
    assert!(
        std::fs::read_to_string(&unit_path)
            .unwrap()
            .contains("Type=notify")
    );

    // A bad formation is refused now, not when systemd starts the unit.
    let bad = export(&["systemd", "-", "-f", procfile, "-m", "web=x"]);
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("-m web=x:"), "{stderr}");

    verify(&[&unit_path]);
}

/// systemd's own check of `units`, where it is installed.
fn verify(units: &[&std::path::Path]) {
    let Some(analyze) = crate::tools::which("systemd-analyze") else {
        return;
    };
    let verify = Command::new(analyze)
        .arg("verify")
        .args(units)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    for complaint in ["Unknown key", "Invalid", "Failed to parse", "bad-setting"] {
        assert!(!text.contains(complaint), "systemd-analyze verify:\n{text}");
    }
}

#[test]
fn socket_activation_serves_the_passed_sockets_and_a_restart_queues_connections() {
    use std::io::{Read as _, Write as _};

    let front = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let service = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (front_addr, service_addr) = (front.local_addr().unwrap(), service.local_addr().unwrap());
    let app = App::new("web: {guests}/hello.wasm\nadmin: {guests}/hello.wasm\n");
    app.write(
        "wasmform.toml",
        &format!("[[services]]\nlisten = \"{service_addr}\"\nprocesses = [\"admin\"]\n"),
    );
    let procfile = app.procfile();
    // `-p 0`: the front door's socket is found by its name, the service's by its address.
    let args = ["up", "-f", procfile.to_str().unwrap(), "-p", "0"];
    let sockets = [(&front, "web"), (&service, "wasmform-shop.socket")];
    let mut host = Wasmform::spawn_activated(&args, &sockets);
    host.wait_listening();
    let out = host.output();
    assert!(
        out.contains(&format!(
            "the front door serves socket 3 (`web`, {front_addr}) passed by systemd"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "service `admin` serves socket 4 (`wasmform-shop.socket`, {service_addr}) passed by systemd"
        )),
        "{out}"
    );
    // No port of its own: it listens where systemd's sockets are.
    assert_eq!(host.addr(), front_addr);
    assert_eq!(get(front_addr, "/").status, 200);
    assert_eq!(get(service_addr, "/").status, 200);

    // Stopped, the host no longer accepts, but the socket is still open (systemd holds
    // it; here the test does): a connection waits in the backlog instead of being refused…
    host.signal(libc::SIGTERM);
    assert!(host.wait_exit(Duration::from_secs(30)).is_some());
    let mut waiting = std::net::TcpStream::connect(front_addr).expect("queued, not refused");
    waiting
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    // …and the next host answers it.
    let mut next = Wasmform::spawn_activated(&args, &sockets);
    next.wait_listening();
    waiting
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut answer = String::new();
    waiting.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[test]
fn a_passed_socket_that_matches_no_listener_fails_the_start() {
    let stray = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let stray_addr = stray.local_addr().unwrap();
    let app = App::new("web: {guests}/hello.wasm\n");
    let procfile = app.procfile();
    let mut host = Wasmform::spawn_activated(
        &["up", "-f", procfile.to_str().unwrap(), "-p", "0"],
        &[(&stray, "metrics")],
    );
    let status = host.wait_exit(Duration::from_secs(60)).expect("it exits");
    assert!(!status.success());
    let out = host.output();
    assert!(
        out.contains(&format!(
            "socket activation: socket 3 (`metrics`, {stray_addr}) matches no listener of this app: name it `web`"
        )),
        "{out}"
    );
    assert!(!out.contains("listening on"), "{out}");
}

#[test]
fn export_with_socket_activation_writes_a_matching_socket_unit() {
    let app = App::new("web: {guests}/hello.wasm\nadmin: {guests}/hello.wasm\n");
    app.write(
        "wasmform.toml",
        "[[services]]\nlisten = \"127.0.0.1:8081\"\nprocesses = [\"admin\"]\n",
    );
    let procfile = app.procfile();
    let out = tempfile::tempdir().unwrap();
    let done = export(&[
        "systemd",
        out.path().to_str().unwrap(),
        "-f",
        procfile.to_str().unwrap(),
        "-a",
        "shop",
        "-p",
        "8080",
        "--socket-activation",
        "--state-dir",
        "/var/lib/wasmform/shop",
    ]);
    assert!(done.status.success(), "{done:?}");
    let unit = std::fs::read_to_string(out.path().join("shop.service")).unwrap();
    let socket = std::fs::read_to_string(out.path().join("shop.socket")).unwrap();
    for line in [
        "Requires=shop.socket",
        "After=shop.socket",
        "Sockets=shop.socket",
        "StateDirectory=wasmform/shop",
    ] {
        assert!(unit.lines().any(|l| l == line), "no `{line}` in:\n{unit}");
    }
    assert!(
        unit.lines()
            .any(|l| l.starts_with("ExecStart=")
                && l.ends_with("--state-dir /var/lib/wasmform/shop")),
        "{unit}"
    );
    assert!(
        unit.lines()
            .any(|l| l.ends_with("deploy --state-dir /var/lib/wasmform/shop")),
        "{unit}"
    );
    for line in [
        "ListenStream=127.0.0.1:8080",
        "ListenStream=127.0.0.1:8081",
        "Service=shop.service",
        "WantedBy=sockets.target",
    ] {
        assert!(
            socket.lines().any(|l| l == line),
            "no `{line}` in:\n{socket}"
        );
    }
    // Nothing is overwritten without --force, the socket unit included.
    let again = export(&[
        "systemd",
        out.path().to_str().unwrap(),
        "-f",
        procfile.to_str().unwrap(),
        "-a",
        "shop",
        "--socket-activation",
    ]);
    assert!(!again.status.success());
    verify(&[
        &out.path().join("shop.socket"),
        &out.path().join("shop.service"),
    ]);
}
