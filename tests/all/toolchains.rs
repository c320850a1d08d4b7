//! Components from the other WASI toolchains, built by the tests from `guest-examples/` with
//! the registries' own tools (componentize-js from the npm registry, componentize-py from
//! PyPI; see `tools.rs`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use crate::support::{App, Load};
use crate::tools;

/// Where the tests put the components they build with other toolchains.
fn out_dir() -> PathBuf {
    let dir = tools::root().join("target/test-guests/toolchains");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `out`, built by `build` unless it is newer than every file in `inputs`.
fn built(out: PathBuf, inputs: &[PathBuf], build: impl FnOnce(&Path)) -> PathBuf {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let newest = inputs
        .iter()
        .map(|p| modified(p).unwrap_or(SystemTime::now()))
        .max()
        .unwrap_or(SystemTime::UNIX_EPOCH);
    if modified(&out).is_none_or(|built| built <= newest) {
        build(&out);
    }
    out
}

/// `guest-examples/js-hello` built with componentize-js (StarlingMonkey), ~13 MB.
fn js_hello() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = tools::componentize_js();
        let inputs = ["app.js", "build.mjs", "package-lock.json"].map(|f| dir.join(f));
        built(
            out_dir().join("js-hello.wasm"),
            &inputs,
            tools::build_js_guest,
        )
    })
}

/// `guest-examples/python-worker` built with componentize-py (CPython inside), ~18 MB.
fn python_worker() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let app = tools::root().join("guest-examples/python-worker/app.py");
        built(out_dir().join("python-worker.wasm"), &[app], |out| {
            tools::build_python_guest("python-worker", "wasi:cli/command@0.2.12", out)
        })
    })
}

/// Log lines that a per-request replacement would write.
fn replacement_lines(out: &str) -> Vec<&str> {
    out.lines()
        .filter(|l| l.contains("recycled") || l.ends_with(" up") || l.contains("restarting"))
        .collect()
}

#[test]
fn js_web_instances_answer_every_request_with_a_fresh_instance_each() {
    let app = App::new(&format!("web: {}\n", js_hello().display()));
    app.write("wasmform.toml", "[processes.web]\nmax_requests = 1\n");
    let host = app.up(&["-m", "web=2"]);
    for i in 0..100 {
        let response = host.get(&format!("/seq/{i}"));
        assert_eq!(response.status, 200, "request {i}: {}", response.body);
        // A fresh instance for every request: its counter starts again each time.
        assert_eq!(
            response.body,
            format!("hello from js, request 1, path /seq/{i}\n")
        );
    }
    let answers = Load::start_counted(host.addr(), "/concurrent", 16, 1000).stop_when_done();
    assert_eq!(answers.len(), 1000);
    let failed: Vec<_> = answers
        .iter()
        .filter(|(status, _)| *status != 200)
        .collect();
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(
        answers
            .iter()
            .all(|(_, body)| body == "hello from js, request 1, path /concurrent\n")
    );
    // No replace-and-log cycle per request.
    let out = host.output();
    let lines = replacement_lines(&out);
    assert!(lines.is_empty(), "{lines:#?}");
    // Both instances served.
    for id in ["web.1", "web.2"] {
        assert!(
            out.contains(&format!("instance={id} ")),
            "{id} served nothing"
        );
    }
}

#[test]
fn a_type_whose_instances_break_on_their_second_request_is_switched_to_single_use() {
    let app = App::new(&format!("web: {}\n", js_hello().display()));
    let host = app.up(&["-m", "web=2"]);
    let statuses: Vec<u16> = (0..20).map(|_| host.get("/").status).collect();
    // Each instance answers its first request; the first two that break on their second are
    // replaced, and then the type is switched: everything after that is answered.
    let failed = statuses.iter().filter(|s| **s != 200).count();
    assert!(failed <= 2, "{statuses:?}");
    assert!(statuses[10..].iter().all(|s| *s == 200), "{statuses:?}");
    let out = host.wait_for(
        "process type `web`: its instances answer their first request and fail their second, so its component cannot serve twice (componentize-js/StarlingMonkey components cannot); `web` gets a fresh instance for every request from now on: set `max_requests = 1` under [processes.web] in wasmform.toml to start it that way",
        Duration::from_secs(10),
    );
    assert!(
        out.contains("returned without a response; restarting now"),
        "{out}"
    );
}

#[test]
fn python_workers_run_on_several_instances() {
    let app = App::new(&format!("worker: {} 4\n", python_worker().display()));
    app.write(
        "wasmform.toml",
        "[processes.worker]\nrestart = \"on-failure\"\n",
    );
    let host = app.up(&["-m", "worker=2"]);
    for id in ["worker.1", "worker.2"] {
        host.wait_for(
            &format!("python tick 4 of 4 from {id}"),
            Duration::from_secs(60),
        );
        host.wait_for(
            &format!("{id} exited with status 0; not restarted (restart = \"on-failure\")"),
            Duration::from_secs(60),
        );
    }
}
