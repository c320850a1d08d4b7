//! `wasmform.toml` and `.env` through the real binary: per-type settings, health checks,
//! restart policies, recycling, services, outgoing HTTP, and errors with positions.

use std::io::{Read as _, Write as _};
use std::net::TcpListener;
use std::time::Duration;

use crate::support::{App, get};

#[test]
fn manifest_errors_name_file_line_column_and_key() {
    let app = App::new("web: {guests}/hello.wasm\n");
    let cases = [
        (
            "[processes.web]\ncout = 2\n",
            "wasmform.toml:2:1: processes.web.cout: unknown field `cout`, expected one of",
        ),
        (
            "[processes.web]\nmemory = \"12XB\"\n",
            "wasmform.toml:2:10: processes.web.memory: invalid memory size `12XB`",
        ),
        (
            "[processes.web]\ncount = \"two\"\n",
            "wasmform.toml:2:9: processes.web.count: invalid type: string \"two\", expected u32",
        ),
        (
            "[processes.web]\ncommand = \"other.wasm\"\n",
            "processes.web.command: process type `web` already has a command in",
        ),
        (
            "[processes.worker]\ncount = 2\n",
            "processes.worker: process type `worker` has no command: add `command = \"worker.wasm\"`",
        ),
        (
            "[processes.web.health]\npath = \"health\"\n",
            "wasmform.toml:2:8: processes.web.health.path: health check path `health` must start with `/`",
        ),
        (
            "[processes.web]\nhealth = { path = \"/h\", threshold = 0 }\n",
            "wasmform.toml:2:37: processes.web.health.threshold: must be at least 1",
        ),
        (
            "[processes.web]\nmax_requests = 0\n",
            "wasmform.toml:2:16: processes.web.max_requests: must be at least 1",
        ),
        (
            "[state]\nurl = \"redis://127.0.0.1:6379\"\n",
            "wasmform.toml:2:7: state.url `redis://127.0.0.1:6379` names no namespace",
        ),
        (
            "[env]\nGREETING = \"hi\"\nPORT = \"8080\"\n",
            "wasmform.toml:3:1: env.PORT: wasmform sets PORT for every instance (PORT, WASMFORM_PROCESS, WASMFORM_INSTANCE, PS, DYNO, WASMFORM_NODE, WASMFORM_FENCE), so it cannot be set here: remove it",
        ),
        (
            "[processes.web.env]\nDYNO = \"web.9\"\n",
            "wasmform.toml:2:1: processes.web.env.DYNO: wasmform sets DYNO",
        ),
        (
            "[[services]]\nlisten = \"localhost\"\nprocesses = [\"web\"]\n",
            "wasmform.toml:2:10: services[0].listen: invalid listen address `localhost`",
        ),
        (
            "[[services]]\nlisten = \"127.0.0.1:0\"\nprocesses = [\"web\", \"web\"]\n",
            "wasmform.toml:3:13: services[0].processes: a service routes to exactly one HTTP process type",
        ),
        (
            "[processes.web]\nallowed_outbound_hosts = [\"http://a b\"]\n",
            "wasmform.toml:2:27: processes.web.allowed_outbound_hosts: `http://a b` is not a host",
        ),
        (
            "[[services]]\nlisten = \"127.0.0.1:0\"\nprocesses = [\"admin\"]\n",
            "wasmform.toml:3:13: services[0].processes: unknown process type `admin` (known: web)",
        ),
        (
            "env_file = \"missing.env\"\n",
            "wasmform.toml:1:12: env_file `",
        ),
        ("[processes.web\n", "wasmform.toml:1:"),
    ];
    for (manifest, expected) in cases {
        app.write("wasmform.toml", manifest);
        let out = app.up_fails(&[]);
        assert!(
            out.contains(expected),
            "for {manifest:?} expected {expected:?} in:\n{out}"
        );
    }

    // Settings that do not fit the component's kind are refused after compiling, at the key
    // that set them.
    let app = App::new("worker: {guests}/ticker.wasm\nweb: {guests}/hello.wasm\n");
    for (manifest, expected) in [
        (
            "[processes.worker]\nmax_requests = 5\n",
            "wasmform.toml:2:16: processes.worker.max_requests: `",
        ),
        (
            "[processes.worker]\nrequest_timeout = \"5s\"\n",
            "wasmform.toml:2:19: processes.worker.request_timeout: `",
        ),
        (
            "[processes.web]\nmax_attempts = 3\n",
            "wasmform.toml:2:16: processes.web.max_attempts: `",
        ),
        (
            "[processes.web]\nconsume = \"mail\"\n",
            "wasmform.toml:2:11: processes.web.consume: `consume` needs a queue consumer",
        ),
    ] {
        app.write("wasmform.toml", manifest);
        let out = app.up_fails(&[]);
        assert!(
            out.contains(expected),
            "for {manifest:?} expected {expected:?} in:\n{out}"
        );
    }
    app.write("wasmform.toml", "[processes.worker]\nmax_requests = 5\n");
    let out = app.up_fails(&[]);
    assert!(out.contains("is a background process"), "{out}");
    assert!(out.contains("apply to HTTP process types only"), "{out}");
    app.write(
        "wasmform.toml",
        "[processes.worker]\nrequest_timeout = \"5s\"\n",
    );
    let out = app.up_fails(&[]);
    assert!(
        out.contains("`request_timeout` applies to HTTP types and queue consumers"),
        "{out}"
    );
    app.write("wasmform.toml", "[processes.web]\nmax_attempts = 3\n");
    let out = app.up_fails(&[]);
    assert!(
        out.contains("`max_attempts` applies to queue consumers only"),
        "{out}"
    );

    let app = App::new("web: {guests}/hello.wasm\n");
    app.write(".env", "GOOD=1\nnot a line\n");
    let out = app.up_fails(&[]);
    assert!(out.contains(".env:2: cannot parse `not a line`"), "{out}");
}

#[test]
fn env_file_app_env_and_type_env_layer_in_order() {
    let app = App::new("web: {guests}/test_web.wasm\n");
    app.write(
        ".env",
        "# comment\nFROM_DOTENV=dotenv\nSHARED=dotenv\nexport QUOTED=\"a b\"\nPORT=1\n",
    );
    app.write(
        "wasmform.toml",
        "[env]\nSHARED = \"app\"\nNUMBER = 42\n[processes.web.env]\nONLY_WEB = true\n",
    );
    let host = app.up(&[]);
    let env = |name: &str| host.get(&format!("/env?name={name}")).body;
    assert_eq!(env("FROM_DOTENV"), "dotenv\n");
    assert_eq!(env("SHARED"), "app\n");
    assert_eq!(env("NUMBER"), "42\n");
    assert_eq!(env("QUOTED"), "a b\n");
    assert_eq!(env("ONLY_WEB"), "true\n");
    // The platform's variables win over a `.env` file, which foreman users keep a PORT in (a
    // manifest that sets one is refused: see the errors test).
    assert_eq!(env("PORT"), format!("{}\n", host.addr().port()));
}

#[test]
fn manifest_alone_names_components_counts_and_memory() {
    let app = App::new("");
    std::fs::remove_file(app.procfile()).unwrap();
    app.write(
        "wasmform.toml",
        "capacity = \"2GiB\"\n[processes.web]\ncommand = \"{guests}/hello.wasm\"\ncount = 3\nmemory = 64\n\n[processes.worker]\ncommand = \"{guests}/ticker.wasm 100\"\n",
    );
    // `up` without -f finds the manifest when there is no Procfile.
    let mut host = crate::support::Wasmform::spawn(&[
        "up",
        "-p",
        "0",
        "-f",
        app.path("Procfile").to_str().unwrap(),
    ]);
    let out = host.wait_for("listening on", Duration::from_secs(60));
    assert!(out.contains("formation web=3, worker=1"), "{out}");
    let ps = app.wait_settled(Duration::from_secs(30));
    assert_eq!(ps["capacity"], 2u64 << 30);
    for instance in ps["instances"].as_array().unwrap() {
        if instance["type"] == "web" {
            assert_eq!(instance["memory_limit"], 64 << 20);
        }
    }
    host.signal(libc::SIGTERM);
    host.wait_exit(Duration::from_secs(30));
}

#[test]
fn health_checks_gate_traffic_and_restart_sick_instances() {
    let app = App::new("web: {guests}/test_web.wasm\n");
    app.write(
        "wasmform.toml",
        "[processes.web.health]\npath = \"/health\"\ninterval = \"100ms\"\nthreshold = 2\n",
    );
    let host = app.up(&["-m", "web=2"]);
    let ps = app.wait_settled(Duration::from_secs(30));
    for instance in ps["instances"].as_array().unwrap() {
        assert_eq!(instance["health"], "passing", "{instance}");
    }
    let table = app.cli(&["ps"]).stdout;
    assert_eq!(table.matches("health: passing").count(), 2, "{table}");
    let sick = host.get("/sick").body;
    let name = sick.split_whitespace().next().unwrap().to_string();
    let out = host.wait_for("failed 2 health checks in a row", Duration::from_secs(10));
    assert!(
        out.contains(&format!(
            "{name} health check failed (1/2): GET /health answered 503"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("{name} failed 2 health checks in a row")),
        "{out}"
    );
    // Replaced: the formation settles with every instance passing, and it serves.
    let ps = app.wait_settled(Duration::from_secs(30));
    let restarted = ps["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == name.as_str())
        .unwrap()
        .clone();
    assert_eq!(restarted["restarts"], 1, "{restarted}");
    for _ in 0..10 {
        assert_eq!(host.get("/health").status, 200);
    }

    // An instance that never passes does not start: `up` fails and says why.
    app.write(
        "wasmform.toml",
        "[processes.web]\nenv = { HEALTH_STATUS = 404 }\nhealth = { path = \"/health\", grace = \"300ms\" }\n",
    );
    drop(host);
    let out = app.up_fails(&[]);
    assert!(
        out.contains("web.1 failed to start: did not pass its health check within 300.0 ms (grace): GET /health answered 404"),
        "{out}"
    );
}

#[test]
fn an_instance_that_keeps_failing_its_health_check_restarts_with_backoff() {
    let app = App::new("web: {guests}/test_web.wasm\n");
    app.write(
        "wasmform.toml",
        "[processes.web.health]\npath = \"/health\"\ninterval = \"100ms\"\nthreshold = 2\n",
    );
    let host = app.up(&["--restart-delay", "400ms"]);
    app.wait_settled(Duration::from_secs(30));
    // The first failure restarts at once, as a first crash does.
    assert_eq!(host.get("/sick").status, 200);
    host.wait_for(
        "web.1 failed 2 health checks in a row (GET /health answered 503); taken out of rotation; restarting now",
        Duration::from_secs(10),
    );
    app.wait_settled(Duration::from_secs(30));
    // Sick again soon after: the crash backoff applies instead of a hot restart loop.
    assert_eq!(host.get("/sick").status, 200);
    host.wait_for(
        "taken out of rotation; restarting in 400.0 ms",
        Duration::from_secs(10),
    );
    let ps = app.wait_settled(Duration::from_secs(30));
    assert_eq!(ps["instances"][0]["restarts"], 2, "{ps:#}");
}

#[test]
fn restart_policies_and_max_requests() {
    let app = App::new(
        "web: {guests}/test_web.wasm\ndone: {guests}/test-worker.wasm exit 0\nfails: {guests}/test-worker.wasm exit 3\n",
    );
    app.write(
        "wasmform.toml",
        "[processes.web]\nmax_requests = 3\n[processes.done]\nrestart = \"on-failure\"\n[processes.fails]\nrestart = \"never\"\n",
    );
    let host = app.up(&[]);
    let out = host.wait_for(
        "fails.1 exited with status 3; not restarted",
        Duration::from_secs(30),
    );
    let out = if out.contains("done.1 exited with status 0; not restarted") {
        out
    } else {
        host.wait_for(
            "done.1 exited with status 0; not restarted (restart = \"on-failure\")",
            Duration::from_secs(30),
        )
    };
    assert!(
        !out.contains("done.1 exited with status 0; restarting"),
        "{out}"
    );
    let ps = app.ps();
    for id in ["done.1", "fails.1"] {
        let instance = ps["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["id"] == id)
            .unwrap()
            .clone();
        assert_eq!(instance["state"], "exited", "{instance}");
    }
    // A restart brings an exited instance back.
    assert!(app.cli(&["restart", "fails"]).ok);
    host.wait_for("fails.1 | exiting with 3", Duration::from_secs(30));

    // Recycled after every 3 requests, without a failed request and without counting a crash.
    let counts: Vec<String> = (0..7)
        .map(|_| host.get("/count").body.trim().to_string())
        .collect();
    assert_eq!(counts, ["1", "2", "3", "1", "2", "3", "1"]);
    host.wait_for(
        "web.1 served 3 requests (max_requests); recycled",
        Duration::from_secs(5),
    );
    let ps = app.ps();
    let web = ps["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == "web.1")
        .unwrap()
        .clone();
    assert_eq!(web["restarts"], 0, "{web}");
}

/// A one-shot HTTP server on loopback answering `body` to every request, for outgoing calls.
fn upstream(body: &'static str) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(50) {
            let Ok(mut stream) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    addr
}

#[test]
fn outgoing_http_is_denied_unless_the_host_is_allowed() {
    let allowed = upstream("from upstream");
    let other = upstream("should not be reached");
    let app = App::new("web: {guests}/test_web.wasm\nadmin: {guests}/test_web.wasm\n");
    let admin_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    app.write(
        "wasmform.toml",
        &format!(
            "[processes.web]\nallowed_outbound_hosts = [\"http://127.0.0.1:{}\"]\n\n[[services]]\nlisten = \"127.0.0.1:{admin_port}\"\nprocesses = [\"admin\"]\n",
            allowed.port()
        ),
    );
    let host = app.up(&[]);
    let ok = host.get(&format!("/fetch?url=http://{allowed}/"));
    assert_eq!(ok.body, "fetched 200: from upstream");
    let denied = host.get(&format!("/fetch?url=http://{other}/"));
    assert_eq!(denied.status, 502, "{denied:?}");
    assert!(denied.body.contains("HttpRequestDenied"), "{denied:?}");

    // The service port routes to `admin`, which has no allow-list at all.
    let service = host.logged_addr("service `admin` serving");
    assert_eq!(service.port(), admin_port);
    assert_eq!(get(service, "/whoami").body, "admin.1\n");
    let denied = get(service, &format!("/fetch?url=http://{allowed}/"));
    assert!(denied.body.contains("HttpRequestDenied"), "{denied:?}");
    assert_eq!(host.get("/whoami").body, "web.1\n");
}

#[test]
fn up_build_runs_the_manifest_build_command() {
    let app = App::new("web: app.wasm\n");
    app.write(
        "wasmform.toml",
        "[build]\ncommand = \"cp {guests}/hello.wasm app.wasm && echo built-by-manifest\"\n",
    );
    let host = app.up(&["--build"]);
    assert!(host.output().contains("built-by-manifest"));
    assert!(host.get("/").body.starts_with("hello from web.1"));
    drop(host);

    app.write("wasmform.toml", "[build]\ncommand = \"exit 7\"\n");
    let out = app.up_fails(&["--build"]);
    assert!(out.contains("`exit 7` in `"), "{out}");
    assert!(out.contains("failed (exit status: 7)"), "{out}");
}

#[test]
fn manifest_count_and_memory_apply_when_they_change_and_scale_wins_otherwise() {
    let app = App::new("web: {guests}/hello.wasm\n");
    app.write("wasmform.toml", "[processes.web]\ncount = 2\n");
    let _host = app.up(&[]);
    assert_eq!(app.formation(), [("web".to_string(), 2)]);
    // `scale` owns the formation from now on…
    assert!(app.cli(&["scale", "web=3"]).ok);
    app.write(
        "wasmform.toml",
        "[processes.web]\ncount = 2\nenv = { A = 1 }\n",
    );
    assert!(app.cli(&["deploy"]).ok);
    assert_eq!(app.formation(), [("web".to_string(), 3)]);
    // …until the manifest's own value changes: a memory-only change is a release that rolls.
    app.write(
        "wasmform.toml",
        "[processes.web]\ncount = 1\nmemory = \"64MiB\"\nenv = { A = 1 }\n",
    );
    let out = app.cli(&["deploy"]);
    assert!(out.ok, "{out:?}");
    assert_eq!(out.stdout.trim(), "Released v3: Deploy: web changed");
    let ps = app.wait_settled(Duration::from_secs(30));
    let instances = ps["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 1, "{ps:#}");
    assert_eq!(instances[0]["memory_limit"], 64 << 20);
    // A count-only change says so, and so does one that applies at the next `up`.
    app.write(
        "wasmform.toml",
        "[processes.web]\ncount = 2\nmemory = \"64MiB\"\nenv = { A = 1 }\n",
    );
    let out = app.cli(&["deploy"]);
    assert_eq!(
        out.stdout.trim(),
        "Released v4: Deploy: web scaled to 2",
        "{out:?}"
    );
    app.write(
        "wasmform.toml",
        "capacity = \"8GiB\"\n[processes.web]\ncount = 2\nmemory = \"64MiB\"\nenv = { A = 1 }\n",
    );
    let out = app.cli(&["deploy"]);
    assert!(
        out.stdout.starts_with(
            "Released v5: Deploy: no process type changed; capacity changed (at the next `up`)"
        ),
        "{out:?}"
    );
}

#[test]
fn a_type_request_timeout_overrides_the_host_default() {
    let app = App::new("web: {guests}/test_web.wasm\n");
    app.write(
        "wasmform.toml",
        "[processes.web]\nrequest_timeout = \"300ms\"\n",
    );
    let host = app.up(&["--request-timeout", "60s"]);
    let response = host.get("/sleep?ms=5000");
    assert_eq!(response.status, 504, "{response:?}");
    let out = host.wait_for("at=error code=H12", Duration::from_secs(5));
    assert!(out.contains("status=504"), "{out}");
    // The replacement serves; a request within the limit is answered.
    assert_eq!(host.get("/sleep?ms=10").status, 200);
}

#[test]
fn the_http_table_sets_front_door_limits_and_flags_override_it() {
    let app = App::new("web: {guests}/test_web.wasm\n");
    app.write("wasmform.toml", "[http]\nmax_body = \"1KiB\"\n");
    let post = format!(
        "POST /consume HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\nConnection: close\r\n\r\n{}",
        "b".repeat(2000)
    );
    let host = app.up(&[]);
    let response = crate::support::request(host.addr(), &post);
    assert_eq!(response.status, 413, "{response:?}");
    assert!(
        response.body.contains("request body over 1024 bytes"),
        "{}",
        response.body
    );
    drop(host);

    // The flag wins over the manifest.
    let host = app.up(&["--max-body", "64KiB"]);
    let response = crate::support::request(host.addr(), &post);
    assert_eq!(
        (response.status, response.body.as_str()),
        (200, "consumed 2000 bytes\n")
    );
    drop(host);

    let cases = [
        (
            "[http]\nmax_body = 1024\n",
            "wasmform.toml:2:12: http.max_body: expected a size with a unit such as \"1MiB\" or \"1024B\", found integer",
        ),
        (
            "[http]\nmax_body = \"10\"\n",
            "wasmform.toml:2:12: http.max_body: invalid size `10`: no unit",
        ),
        (
            "[http]\nmax_head_bytes = \"100B\"\n",
            "wasmform.toml:2:18: http.max_head_bytes: invalid head size `100B`: must be from 1KiB to 16MiB",
        ),
        (
            "[http]\nmax_headers = 0\n",
            "wasmform.toml:2:15: http.max_headers: must be at least 1",
        ),
        (
            "[http]\nmax_connections = 0\n",
            "wasmform.toml:2:19: http.max_connections: must be at least 1",
        ),
        (
            "[http]\nkeepalive_timeout = \"0s\"\n",
            "wasmform.toml:2:21: http.keepalive_timeout: invalid duration `0s`: must be above zero",
        ),
        (
            "[http]\nheader_timeout = \"soon\"\n",
            "wasmform.toml:2:18: http.header_timeout: invalid duration `soon`",
        ),
        (
            "[http]\nmax_bodies = \"1KiB\"\n",
            "wasmform.toml:2:1: http.max_bodies: unknown field `max_bodies`, expected one of",
        ),
    ];
    for (manifest, expected) in cases {
        app.write("wasmform.toml", manifest);
        let out = app.up_fails(&[]);
        assert!(
            out.contains(expected),
            "for {manifest:?} expected {expected:?} in:\n{out}"
        );
    }
}
