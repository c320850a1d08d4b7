//! Releases and deploys through the real binary: zero-downtime roll-outs under load, rejected
//! and rolled-back releases, rollback to stored components, `up --watch`.

use std::time::{Duration, Instant};

use crate::support::{App, Load};

/// Answers of `Load` that were not 200.
fn failures(answers: &[(u16, String)]) -> Vec<&(u16, String)> {
    answers
        .iter()
        .filter(|(status, _)| *status != 200)
        .collect()
}

fn release_versions(app: &App) -> Vec<u64> {
    let out = app.cli(&["releases", "--json"]);
    assert!(out.ok, "{out:?}");
    let json: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    json["releases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["version"].as_u64().unwrap())
        .collect()
}

#[test]
fn deploy_under_load_switches_versions_without_a_failed_request() {
    let app = App::new("web: app.wasm\n");
    app.install("hello.wasm", "app.wasm");
    let host = app.up(&["-m", "web=4"]);
    assert!(host.get("/").body.starts_with("hello from web."));
    let load = Load::start(host.addr(), "/", 32);
    std::thread::sleep(Duration::from_millis(300));

    app.install("test_web.wasm", "app.wasm");
    let out = app.cli(&["deploy"]);
    assert!(out.ok, "{out:?}");
    assert_eq!(out.stdout.trim(), "Released v2: Deploy: web changed");
    // Every request after the deploy returned reaches the new version.
    for _ in 0..20 {
        let body = host.get("/").body;
        assert!(body.starts_with("test-web web."), "{body}");
    }
    std::thread::sleep(Duration::from_millis(200));
    let answers = load.stop();
    assert!(answers.len() > 100, "too little load: {}", answers.len());
    assert_eq!(failures(&answers), Vec::<&(u16, String)>::new());
    let old = answers
        .iter()
        .filter(|(_, b)| b.starts_with("hello from"))
        .count();
    let new = answers
        .iter()
        .filter(|(_, b)| b.starts_with("test-web"))
        .count();
    assert!(old > 0 && new > 0, "old {old}, new {new}");
    assert_eq!(old + new, answers.len());

    let ps = app.wait_settled(Duration::from_secs(30));
    for instance in ps["instances"].as_array().unwrap() {
        assert_eq!(instance["release"], 2, "{instance}");
    }
    host.wait_for("Release v2 is live", Duration::from_secs(5));
    assert_eq!(release_versions(&app), [2, 1]);
    let table = app.cli(&["releases"]);
    assert!(
        table.stdout.contains("Deploy: web changed  (current)"),
        "{table:?}"
    );
    assert!(table.stdout.contains("Initial release"), "{table:?}");

    // Nothing changed: no new release.
    let out = app.cli(&["deploy"]);
    assert!(out.ok, "{out:?}");
    assert!(out.stdout.contains("nothing changed: v2"), "{out:?}");
}

#[test]
fn broken_releases_are_rejected_and_the_old_version_keeps_serving() {
    let app = App::new("web: app.wasm\n");
    app.install("hello.wasm", "app.wasm");
    let host = app.up(&["-m", "web=2"]);
    let load = Load::start(host.addr(), "/", 32);

    // Does not compile.
    std::fs::write(app.path("app.wasm"), b"\0asm\x0d\0\x01\0garbage").unwrap();
    let out = app.cli(&["deploy"]);
    assert!(!out.ok, "{out:?}");
    assert!(out.stderr.contains("failed to compile"), "{out:?}");
    assert!(out.stderr.contains("v1 keeps running"), "{out:?}");

    // Not a component (a core module).
    std::fs::write(app.path("app.wasm"), wat::parse_str("(module)").unwrap()).unwrap();
    let out = app.cli(&["deploy"]);
    assert!(!out.ok, "{out:?}");
    assert!(out.stderr.contains("core WebAssembly module"), "{out:?}");

    // Compiles, but never passes its health check: rolled back.
    app.install("test_web.wasm", "app.wasm");
    app.write(
        "wasmform.toml",
        "[processes.web]\nenv = { HEALTH_STATUS = 500 }\nhealth = { path = \"/health\", grace = \"1s\" }\n",
    );
    let out = app.cli(&["deploy"]);
    assert!(!out.ok, "{out:?}");
    assert!(
        out.stderr.contains("release v2 failed and was rolled back"),
        "{out:?}"
    );
    assert!(
        out.stderr
            .contains("did not pass its health check within 1 s"),
        "{out:?}"
    );
    assert!(out.stderr.contains("GET /health answered 500"), "{out:?}");

    let answers = load.stop();
    assert_eq!(failures(&answers), Vec::<&(u16, String)>::new());
    assert!(answers.iter().all(|(_, b)| b.starts_with("hello from")));
    assert!(host.get("/").body.starts_with("hello from"));
    let out = host.wait_for("Deploy failed", Duration::from_secs(5));
    assert!(out.contains("did not pass its health check"), "{out}");
    // The new instance that failed is not said to restart: the deploy stopped it.
    let failed = out
        .lines()
        .find(|l| l.contains("failed to start: did not pass its health check"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(!failed.contains("restarting"), "{failed}");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !host.output().contains("restarting after failing to start"),
        "{}",
        host.output()
    );
    assert_eq!(release_versions(&app), [1]);
    app.wait_settled(Duration::from_secs(30));
    // What the rejected releases staged is not kept.
    let stored = std::fs::read_dir(app.path(".wasmform/components"))
        .unwrap()
        .count();
    assert_eq!(stored, 1);
}

#[test]
fn rollback_runs_the_stored_components_even_after_the_files_changed() {
    let app = App::new("web: app.wasm\n");
    app.install("hello.wasm", "app.wasm");
    let mut host = app.up(&[]);
    app.install("test_web.wasm", "app.wasm");
    assert!(app.cli(&["deploy"]).ok);
    assert!(host.get("/").body.starts_with("test-web"));

    // The file on disk is gone; v1's stored copy is not.
    std::fs::remove_file(app.path("app.wasm")).unwrap();
    let out = app.cli(&["rollback", "v1"]);
    assert!(out.ok, "{out:?}");
    assert_eq!(
        out.stdout.trim(),
        "Released v3: Rollback to v1: web changed"
    );
    assert!(host.get("/").body.starts_with("hello from"));
    let out = app.cli(&["rollback", "v9"]);
    assert!(!out.ok);
    assert!(
        out.stderr
            .contains("no release v9: kept releases are v1, v2, v3"),
        "{out:?}"
    );
    let out = app.cli(&["rollback", "latest"]);
    assert!(out.stderr.contains("invalid release"), "{out:?}");

    // Releases persist across a restart of the host. The files are v2's again, as when the
    // rollback replaced them: the rollback keeps running, no new release.
    app.install("test_web.wasm", "app.wasm");
    host.signal(libc::SIGTERM);
    host.wait_exit(Duration::from_secs(30)).unwrap();
    let mut host = app.up(&[]);
    host.wait_for("release v3:", Duration::from_secs(5));
    host.wait_for(
        "v3 keeps running (Rollback to v1: web changed): the app's files are unchanged since",
        Duration::from_secs(5),
    );
    assert_eq!(release_versions(&app), [3, 2, 1]);
    assert!(host.get("/").body.starts_with("hello from"));

    // Files equal to the running release: nothing new either.
    app.install("hello.wasm", "app.wasm");
    host.signal(libc::SIGTERM);
    host.wait_exit(Duration::from_secs(30)).unwrap();
    let mut host = app.up(&[]);
    host.wait_for("release v3:", Duration::from_secs(5));
    assert_eq!(release_versions(&app), [3, 2, 1]);
    assert!(host.get("/").body.starts_with("hello from"));

    // Files that changed since are what `up` runs, as a new release.
    app.install("test_web.wasm", "app.wasm");
    app.write("Procfile", "web: app.wasm v4\n");
    host.signal(libc::SIGTERM);
    host.wait_exit(Duration::from_secs(30)).unwrap();
    let host = app.up(&[]);
    host.wait_for("release v4:", Duration::from_secs(5));
    assert_eq!(release_versions(&app), [4, 3, 2, 1]);
    assert!(host.get("/").body.starts_with("test-web"));
}

#[test]
fn deploy_adds_and_removes_types_and_leaves_unchanged_ones_alone() {
    let app = App::new("web: {guests}/hello.wasm\nworker: {guests}/ticker.wasm 100\n");
    let host = app.up(&[]);
    host.wait_for("worker.1 | tick 1", Duration::from_secs(30));
    let before = app.ps();
    let worker_since = before["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == "worker.1")
        .unwrap()["since"]
        .clone();

    app.write(
        "Procfile",
        "web: {guests}/test_web.wasm\nworker: {guests}/ticker.wasm 100\nclock: {guests}/ticker.wasm 1000\n",
    );
    let out = app.cli(&["deploy"]);
    assert!(out.ok, "{out:?}");
    assert_eq!(
        out.stdout.trim(),
        "Released v2: Deploy: web changed; clock added"
    );
    let ps = app.wait_settled(Duration::from_secs(30));
    let worker = ps["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == "worker.1")
        .unwrap()
        .clone();
    assert_eq!(
        worker["since"], worker_since,
        "unchanged type was restarted"
    );
    assert_eq!(worker["release"], 1);
    host.wait_for("clock.1 | tick 1", Duration::from_secs(30));

    app.write("Procfile", "web: {guests}/test_web.wasm\n");
    let out = app.cli(&["deploy"]);
    assert!(out.ok, "{out:?}");
    assert_eq!(
        out.stdout.trim(),
        "Released v3: Deploy: clock, worker removed"
    );
    let ps = app.wait_settled(Duration::from_secs(30));
    let ids: Vec<&str> = ps["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["web.1"]);

    // An invalid Procfile is refused with its line; nothing changes.
    app.write("Procfile", "web: {guests}/test_web.wasm\nnonsense\n");
    let out = app.cli(&["deploy"]);
    assert!(!out.ok);
    assert!(
        out.stderr
            .contains("Procfile:2: expected `name: component.wasm"),
        "{out:?}"
    );
    assert!(out.stderr.contains("v3 keeps running"), "{out:?}");
}

#[test]
fn watch_deploys_when_a_component_is_rebuilt() {
    let app = App::new("web: app.wasm\n");
    app.install("hello.wasm", "app.wasm");
    let host = app.up(&["--watch"]);
    assert!(host.get("/").body.starts_with("hello from"));
    let changed = Instant::now();
    app.install("test_web.wasm", "app.wasm");
    host.wait_for("Release v2 is live", Duration::from_secs(20));
    eprintln!(
        "watch: new release {:?} after the change",
        changed.elapsed()
    );
    assert!(host.get("/").body.starts_with("test-web"));

    // A broken build is refused, and the next good one deploys.
    std::fs::write(app.path("app.wasm"), b"\0asm\x0d\0\x01\0garbage").unwrap();
    host.wait_for("Deploy failed", Duration::from_secs(20));
    assert!(host.get("/").body.starts_with("test-web"));
    app.install("hello.wasm", "app.wasm");
    host.wait_for("Release v3 is live", Duration::from_secs(20));
    assert!(host.get("/").body.starts_with("hello from"));

    // The Procfile and the manifest are watched too: a new type, then a changed setting.
    app.write(
        "Procfile",
        "web: app.wasm\nclock: {guests}/ticker.wasm 1000\n",
    );
    host.wait_for("Release v4 is live", Duration::from_secs(20));
    host.wait_for("clock.1 | tick 1", Duration::from_secs(20));
    app.write(
        "wasmform.toml",
        "[processes.clock.env]\nGREETING = \"hi\"\n",
    );
    let out = host.wait_for("Release v5 is live", Duration::from_secs(20));
    assert!(
        out.contains("Release v5 is live (Deploy: clock changed)"),
        "{out}"
    );
}

/// Touching files without changing them (`touch`, a rebuild to the same bytes) deploys
/// nothing under `--watch`, so it cannot undo a rollback; a real change still deploys.
#[test]
fn watch_leaves_a_rollback_alone_when_files_are_touched_but_unchanged() {
    let app = App::new("web: app.wasm\n");
    app.install("hello.wasm", "app.wasm");
    let host = app.up(&["--watch"]);
    app.install("test_web.wasm", "app.wasm");
    host.wait_for("Release v2 is live", Duration::from_secs(20));
    let out = app.cli(&["rollback", "v1"]);
    assert!(out.ok, "{out:?}");
    assert!(host.get("/").body.starts_with("hello from"));
    let later = std::time::SystemTime::now() + Duration::from_secs(5);
    for file in ["app.wasm", "Procfile"] {
        let file = std::fs::File::options()
            .write(true)
            .open(app.path(file))
            .unwrap();
        file.set_modified(later).unwrap();
    }
    // Six polls of the watcher, and its settling poll.
    std::thread::sleep(Duration::from_secs(2));
    let out = host.output();
    assert!(!out.contains("Release v4"), "{out}");
    assert!(host.get("/").body.starts_with("hello from"));
    app.write("wasmform.toml", "[processes.web.env]\nGREETING = \"hi\"\n");
    host.wait_for("Release v4 is live", Duration::from_secs(20));
}

#[test]
fn control_and_routing_keep_answering_while_a_deploy_compiles() {
    let app = App::new("web: app.wasm\n");
    app.install("hello.wasm", "app.wasm");
    let host = app.up(&[]);
    // A component with a core module big enough to take a while to compile. It is not a
    // process (no exports), so the deploy fails after compiling; that is fine here.
    let mut wat = String::from("(component (core module");
    for i in 0..20_000 {
        wat.push_str(&format!(
            " (func $f{i} (param i32) (result i32) local.get 0 i32.const {i} i32.mul i32.const 7 i32.add)"
        ));
    }
    wat.push_str("))");
    std::fs::write(app.path("app.wasm"), wat::parse_str(&wat).unwrap()).unwrap();
    let dir = app.dir.path().to_path_buf();
    let deploy = std::thread::spawn(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_wasmform"))
            .args(["deploy", "--app"])
            .arg(dir)
            .output()
            .unwrap()
    });
    // While it compiles, the host answers: routing, `ps` and `releases`.
    let mut answered_during = 0;
    while !deploy.is_finished() {
        assert!(host.get("/").body.starts_with("hello from"));
        let _ = app.ps();
        assert_eq!(release_versions(&app), [1]);
        if !deploy.is_finished() {
            answered_during += 1;
        }
    }
    let out = deploy.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("not a process"), "{stderr}");
    assert!(
        answered_during > 0,
        "the deploy finished before any request"
    );
}

#[test]
fn singleton_is_never_scaled_past_one_nor_doubled_by_a_restart() {
    let app = App::new("web: {guests}/hello.wasm\nclock: {guests}/ticker.wasm 50\n");
    app.write("wasmform.toml", "[processes.clock]\nsingleton = true\n");
    let host = app.up(&[]);
    host.wait_for("clock.1 | tick 1", Duration::from_secs(30));
    let out = app.cli(&["scale", "clock=2"]);
    assert!(!out.ok);
    assert!(out.stderr.contains("`clock` is a singleton"), "{out:?}");
    assert_eq!(
        app.formation(),
        [("clock".to_string(), 1), ("web".to_string(), 1)]
    );

    // Watch `ps` while the clock restarts and redeploys: never two clock instances.
    let watcher = {
        let dir = app.dir.path().to_path_buf();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut most = 0;
            let mut polls = 0;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) && polls < 10_000 {
                polls += 1;
                let out = std::process::Command::new(env!("CARGO_BIN_EXE_wasmform"))
                    .args(["ps", "--json", "--app"])
                    .arg(&dir)
                    .output()
                    .unwrap();
                let Ok(ps) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
                    continue;
                };
                let clocks = ps["instances"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|i| i["type"] == "clock" && i["state"] != "pending")
                    .count();
                most = most.max(clocks);
            }
            most
        });
        (stop, thread)
    };
    for _ in 0..3 {
        let out = app.cli(&["restart", "clock"]);
        assert!(out.ok, "{out:?}");
    }
    app.write(
        "wasmform.toml",
        "[processes.clock]\nsingleton = true\nenv = { V = 2 }\n",
    );
    let out = app.cli(&["deploy"]);
    assert!(out.ok, "{out:?}");
    assert!(out.stdout.contains("clock changed"), "{out:?}");
    app.wait_settled(Duration::from_secs(30));
    watcher.0.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        watcher.1.join().unwrap(),
        1,
        "two clock instances were alive at once"
    );

    // A manifest asking for two is refused at `up`.
    drop(host);
    app.write(
        "wasmform.toml",
        "[processes.clock]\nsingleton = true\ncount = 2\n",
    );
    let out = app.up_fails(&[]);
    assert!(
        out.contains("wasmform.toml:3:9: processes.clock.count: `clock` is a singleton"),
        "{out}"
    );
}

#[test]
fn a_release_whose_instances_crash_during_the_roll_out_is_rolled_back() {
    let app = App::new("web: {guests}/hello.wasm\nworker: {guests}/ticker.wasm 100\n");
    let host = app.up(&["-m", "worker=3"]);
    app.wait_settled(Duration::from_secs(30));
    // Starts fine, then exits at once: up, then crashed, while the other instances roll.
    app.write(
        "Procfile",
        "web: {guests}/hello.wasm\nworker: {guests}/test-worker.wasm exit 3\n",
    );
    let out = app.cli(&["deploy"]);
    assert!(!out.ok, "{out:?}");
    assert!(
        out.stderr
            .contains("release v2 failed and was rolled back: worker."),
        "{out:?}"
    );
    assert!(
        out.stderr
            .contains("failed during the roll-out: exited with status 3"),
        "{out:?}"
    );
    let ps = app.wait_settled(Duration::from_secs(30));
    for instance in ps["instances"].as_array().unwrap() {
        assert_eq!(instance["release"], 1, "{instance}");
    }
    let before = host.output().len();
    host.wait_until(Duration::from_secs(10), |out| {
        ["worker.1", "worker.2", "worker.3"]
            .iter()
            .all(|w| out[before..].contains(&format!("{w} | tick")))
    })
    .expect("the old workers did not tick again");
    assert_eq!(release_versions(&app), [1]);
}

#[test]
fn a_rejected_release_leaves_removed_types_running_and_listeners_keep_their_types() {
    let app = App::new("web: {guests}/hello.wasm\nworker: {guests}/ticker.wasm 100\n");
    let host = app.up(&[]);
    host.wait_for("worker.1 | tick 1", Duration::from_secs(30));
    let worker = |ps: &serde_json::Value| {
        ps["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["id"] == "worker.1")
            .cloned()
            .unwrap_or_default()
    };
    let before = worker(&app.ps());

    // A release that removes `worker` and whose new `web` never gets healthy: rolled back,
    // and `worker` was never stopped on its way.
    app.write("Procfile", "web: {guests}/test_web.wasm\n");
    app.write(
        "wasmform.toml",
        "[processes.web]\nenv = { HEALTH_STATUS = 500 }\nhealth = { path = \"/health\", grace = \"300ms\" }\n",
    );
    let out = app.cli(&["deploy"]);
    assert!(!out.ok, "{out:?}");
    assert!(
        out.stderr.contains("did not pass its health check"),
        "{out:?}"
    );
    let after = worker(&app.wait_settled(Duration::from_secs(30)));
    assert_eq!(after["since"], before["since"], "{after}");
    assert_eq!(after["restarts"], 0, "{after}");
    assert!(host.get("/").body.starts_with("hello from"));
    std::fs::remove_file(app.path("wasmform.toml")).unwrap();

    // The main port routes to `web` until the next `up`: a release cannot remove it or make
    // it a background process.
    app.write("Procfile", "worker: {guests}/ticker.wasm 100\n");
    let out = app.cli(&["deploy"]);
    assert!(!out.ok);
    assert!(
        out.stderr.contains(
            "the main HTTP port routes HTTP to `web`, which this release removed: the listener stays until the next `wasmform up`, so keep `web` an HTTP process type; v1 keeps running"
        ),
        "{out:?}"
    );
    app.write("Procfile", "web: {guests}/ticker.wasm 100\n");
    let out = app.cli(&["deploy"]);
    assert!(
        out.stderr
            .contains("which this release made a background process"),
        "{out:?}"
    );
    assert_eq!(release_versions(&app), [1]);

    // Settings `up` applies once are recorded, and the deploy says they wait for `up`.
    app.write(
        "Procfile",
        "web: {guests}/hello.wasm\nworker: {guests}/ticker.wasm 100\nadmin: {guests}/hello.wasm\n",
    );
    app.write(
        "wasmform.toml",
        "capacity = \"8GiB\"\n[http]\nmax_body = \"1MiB\"\n[[services]]\nlisten = \"127.0.0.1:0\"\nprocesses = [\"admin\"]\n",
    );
    let out = app.cli(&["deploy"]);
    assert!(out.ok, "{out:?}");
    assert!(
        out.stderr.contains(
            "note: [[services]], [http], capacity changed: recorded, but applied only when `wasmform up` starts again"
        ),
        "{out:?}"
    );
    host.wait_for(
        "Release v2: [[services]], [http], capacity changed",
        Duration::from_secs(5),
    );
}

#[test]
fn a_deploy_refuses_a_component_over_the_size_cap() {
    let app = App::new("web: app.wasm\n");
    app.install("hello.wasm", "app.wasm");
    let host = app.up(&["--max-component-size", "1MiB"]);
    std::fs::File::create(app.path("app.wasm"))
        .unwrap()
        .set_len(3 << 20)
        .unwrap();
    let out = app.cli(&["deploy"]);
    assert!(!out.ok);
    assert!(out.stderr.contains("process type `web`"), "{out:?}");
    assert!(
        out.stderr
            .contains("the file is 3 MiB, above the limit of 1 MiB"),
        "{out:?}"
    );
    assert!(out.stderr.contains("v1 keeps running"), "{out:?}");
    assert!(host.get("/").body.starts_with("hello from"));
    assert_eq!(release_versions(&app), [1]);
}

#[test]
fn releases_record_digests_and_are_pruned_past_keep_releases() {
    use sha2::Digest as _;
    let app = App::new("web: app.wasm\n");
    app.install("hello.wasm", "app.wasm");
    let _host = app.up(&["--keep-releases", "2"]);
    app.install("test_web.wasm", "app.wasm");
    assert!(app.cli(&["deploy"]).ok);
    // A type added by a deploy starts with the manifest's count.
    app.write(
        "Procfile",
        "web: app.wasm\nworker: {guests}/ticker.wasm 100\n",
    );
    app.write("wasmform.toml", "[processes.worker]\ncount = 2\n");
    let out = app.cli(&["deploy"]);
    assert!(out.ok, "{out:?}");
    assert_eq!(
        app.formation(),
        [("web".to_string(), 1), ("worker".to_string(), 2)]
    );

    // Two kept, newest first, each naming what it ran by digest.
    assert_eq!(release_versions(&app), [3, 2]);
    let out = app.cli(&["releases", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let newest = &json["releases"][0];
    let digest = |file: &std::path::Path| {
        let bytes = std::fs::read(file).unwrap();
        sha2::Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    assert_eq!(
        newest["components"]["web"],
        digest(&app.path("app.wasm")).as_str()
    );
    assert_eq!(
        newest["components"]["worker"],
        digest(&crate::support::guest("ticker.wasm")).as_str()
    );
    assert_eq!(newest["config_digest"].as_str().unwrap().len(), 64);
    // v1's hello is pruned with v1: only the components of v2 and v3 stay stored.
    let mut stored: Vec<String> = std::fs::read_dir(app.path(".wasmform/components"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    stored.sort();
    let mut expected = vec![
        format!("{}.wasm", digest(&app.path("app.wasm"))),
        format!("{}.wasm", digest(&crate::support::guest("ticker.wasm"))),
    ];
    expected.sort();
    assert_eq!(stored, expected);
}

#[test]
fn a_singleton_that_stops_being_one_scales_up_in_the_same_deploy() {
    let app = App::new("web: {guests}/hello.wasm\nclock: {guests}/ticker.wasm 50\n");
    app.write("wasmform.toml", "[processes.clock]\nsingleton = true\n");
    let host = app.up(&[]);
    host.wait_for("clock.1 | tick 1", Duration::from_secs(30));
    // The new count starts clock.2 and clock.3 on the new version before clock.1 is replaced;
    // the replacement waits for clock.1 only, not for those.
    app.write(
        "wasmform.toml",
        "[processes.clock]\nsingleton = false\ncount = 3\n",
    );
    let out = app.cli(&["deploy"]);
    assert!(out.ok, "{out:?}");
    let ps = app.wait_settled(Duration::from_secs(30));
    let clocks: Vec<&serde_json::Value> = ps["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["type"] == "clock")
        .collect();
    assert_eq!(clocks.len(), 3, "{ps:#}");
    assert!(clocks.iter().all(|i| i["release"] == 2), "{ps:#}");
}

#[test]
fn an_added_type_that_only_fits_without_a_removed_one_takes_its_place() {
    // web and worker fill the capacity exactly (256 MiB each).
    let app = App::new("web: {guests}/hello.wasm\nworker: {guests}/ticker.wasm 100\n");
    let host = app.up(&["--capacity", "512MiB"]);
    host.wait_for("worker.1 | tick 1", Duration::from_secs(30));
    // The added type runs (and is checked) within the deploy, in the removed one's room: one
    // that crashes fails the release instead of crashing after it was called live.
    app.write(
        "Procfile",
        "web: {guests}/hello.wasm\nclock: {guests}/test-worker.wasm exit 3\n",
    );
    let out = app.cli(&["deploy"]);
    assert!(!out.ok, "{out:?}");
    assert!(
        out.stderr
            .contains("clock.1 failed during the roll-out: exited with status 3"),
        "{out:?}"
    );
    assert_eq!(release_versions(&app), [1]);
    app.wait_settled(Duration::from_secs(30));

    app.write(
        "Procfile",
        "web: {guests}/hello.wasm\nclock: {guests}/ticker.wasm 100\n",
    );
    let out = app.cli(&["deploy"]);
    assert!(out.ok, "{out:?}");
    assert_eq!(
        out.stdout.trim(),
        "Released v2: Deploy: clock added; worker removed"
    );
    // The release went live with clock.1 running, not pending behind worker.1.
    host.wait_for("clock.1 | tick 1", Duration::from_secs(30));
    let ps = app.wait_settled(Duration::from_secs(30));
    let types: Vec<&str> = ps["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["clock", "web"], "{ps:#}");
}

#[test]
fn a_deploy_records_the_compile_time_of_its_types() {
    let app = App::new("web: {guests}/hello.wasm\n");
    let host = app.up(&["--metrics", "127.0.0.1:0"]);
    let addr = host.logged_addr("metrics on");
    let scrape = || {
        crate::support::request(
            addr,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .body
    };
    let compiled = |text: &str, process: &str| {
        text.lines()
            .any(|l| l.starts_with(&format!("wasmform_compile_seconds{{type=\"{process}\"}} ")))
    };
    assert!(compiled(&scrape(), "web"));
    assert!(!compiled(&scrape(), "clock"));
    app.write(
        "Procfile",
        "web: {guests}/hello.wasm\nclock: {guests}/ticker.wasm 100\n",
    );
    assert!(app.cli(&["deploy"]).ok);
    assert!(compiled(&scrape(), "clock"), "{}", scrape());
}

/// A deploy's memory above `--max-memory` is refused at the manifest key that set it.
#[test]
fn a_deploy_over_the_max_memory_names_the_key() {
    let app = App::new("web: {guests}/hello.wasm\n");
    let _host = app.up(&[]);
    app.write("wasmform.toml", "[processes.web]\nmemory = \"2GiB\"\n");
    let out = app.cli(&["deploy"]);
    assert!(!out.ok, "{out:?}");
    assert!(
        out.stderr.contains("wasmform.toml:2:10: processes.web.memory: memory 2 GiB is above this host's maximum of 1 GiB"),
        "{}",
        out.stderr
    );
}

/// A rollback is logged as a rollback, not as a deploy.
#[test]
fn a_rollback_is_logged_as_one() {
    let app = App::new("web: app.wasm\n");
    app.install("hello.wasm", "app.wasm");
    let host = app.up(&[]);
    app.install("test_web.wasm", "app.wasm");
    assert!(app.cli(&["deploy"]).ok);
    host.wait_for(
        "Deploy: v2 rolling out, web changed",
        Duration::from_secs(20),
    );
    assert!(app.cli(&["rollback", "v1"]).ok);
    let out = host.wait_for(
        "Rollback to v1: v3 rolling out, web changed",
        Duration::from_secs(20),
    );
    assert!(!out.contains("Deploy: v3"), "{out}");
}
