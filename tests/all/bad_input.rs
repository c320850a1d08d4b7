//! Bad input is refused before anything listens, with a message naming what is wrong.

use crate::support::{App, Wasmform, guest, run_fails};

fn write_wat(app: &App, name: &str, wat: &str) {
    std::fs::write(app.path(name), wat::parse_str(wat).unwrap()).unwrap();
}

#[test]
fn missing_procfile() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("Procfile");
    let out = run_fails(&["up", "-f", path.to_str().unwrap(), "-p", "0"]);
    assert!(out.contains("no Procfile at"), "{out}");
    assert!(out.contains("-f PATH"), "{out}");
}

#[test]
fn malformed_procfile_lines_name_the_line() {
    for (text, needle) in [
        (
            "web: a.wasm\nthis line has no colon\n",
            "Procfile:2: expected `name: component.wasm [args…]`",
        ),
        (
            "web: a.wasm\nweb: b.wasm\n",
            "Procfile:2: duplicate process type `web` (first defined on line 1)",
        ),
        (
            "\nweb:\n",
            "Procfile:2: process type `web` has an empty command",
        ),
        (
            "w eb: a.wasm\n",
            "Procfile:1: invalid process type name `w eb`",
        ),
    ] {
        let app = App::new(text);
        let out = app.up_fails(&[]);
        assert!(out.contains(needle), "{text:?}:\n{out}");
    }
}

#[test]
fn crlf_and_bom_are_accepted() {
    let app = App::new("\u{feff}# comment\r\nweb: {guests}/hello.wasm\r\n");
    let host = app.up(&[]);
    assert_eq!(host.get("/").status, 200);
}

#[test]
fn missing_empty_truncated_and_non_component_files() {
    let app = App::new("web: nope.wasm\n");
    let out = app.up_fails(&[]);
    assert!(out.contains("process type `web`"), "{out}");
    assert!(out.contains("nope.wasm"), "{out}");
    assert!(out.contains("file not found"), "{out}");

    let app = App::new("web: empty.wasm\n");
    std::fs::write(app.path("empty.wasm"), b"").unwrap();
    let out = app.up_fails(&[]);
    assert!(
        out.contains("empty.wasm` (") || out.contains("empty.wasm"),
        "{out}"
    );
    assert!(out.contains("the file is empty"), "{out}");

    let app = App::new("web: truncated.wasm\n");
    let bytes = std::fs::read(guest("hello.wasm")).unwrap();
    std::fs::write(app.path("truncated.wasm"), &bytes[..bytes.len() / 2]).unwrap();
    let out = app.up_fails(&[]);
    assert!(out.contains("truncated.wasm"), "{out}");
    assert!(out.contains("failed to compile"), "{out}");

    let app = App::new("web: random.wasm\n");
    std::fs::write(app.path("random.wasm"), b"#!/bin/sh\necho not wasm\n").unwrap();
    let out = app.up_fails(&[]);
    assert!(out.contains("not a WebAssembly file"), "{out}");

    let app = App::new("web: huge.wasm\n");
    // Sparse: no disk is spent, the size is what counts.
    std::fs::File::create(app.path("huge.wasm"))
        .unwrap()
        .set_len(300 << 20)
        .unwrap();
    let out = app.up_fails(&["--max-component-size", "256MiB"]);
    assert!(out.contains("process type `web`"), "{out}");
    assert!(
        out.contains("the file is 300 MiB, above the limit of 256 MiB"),
        "{out}"
    );

    // A compile that takes too long is refused (hello takes far more than 1 ms to compile
    // without the cache).
    let app = App::new("web: {guests}/hello.wasm\n");
    let out = app.up_fails(&["--no-cache", "--compile-timeout", "1ms"]);
    assert!(out.contains("process type `web`"), "{out}");
    assert!(
        out.contains("took longer than 1.0 ms to compile: raise `--compile-timeout`"),
        "{out}"
    );

    let app = App::new("web: core.wasm\n");
    write_wat(&app, "core.wasm", "(module)");
    let out = app.up_fails(&[]);
    assert!(
        out.contains("core WebAssembly module, not a component"),
        "{out}"
    );
}

#[test]
fn wrong_world_and_unsatisfied_imports() {
    let app = App::new("web: {guests}/hello.wasm\nclock: nothing.wasm\n");
    write_wat(&app, "nothing.wasm", "(component)");
    let out = app.up_fails(&[]);
    assert!(out.contains("process type `clock`"), "{out}");
    assert!(
        out.contains(
            "must export `wasi:http/incoming-handler` (an HTTP process), `wasi:cli/run` (a background process) or `wasmform:host/consumer` (a queue consumer)"
        ),
        "{out}"
    );
    assert!(out.contains("it exports nothing"), "{out}");

    let app = App::new("web: imports.wasm\n");
    write_wat(
        &app,
        "imports.wasm",
        r#"(component (import "acme:nope/thing@1.0.0" (instance (export "f" (func)))))"#,
    );
    let out = app.up_fails(&[]);
    assert!(
        out.contains("imports something this host does not provide"),
        "{out}"
    );
    assert!(out.contains("acme:nope/thing@1.0.0"), "{out}");
}

#[test]
fn bad_formation_and_memory_values() {
    let app = App::new("web: {guests}/hello.wasm\nworker: {guests}/ticker.wasm\n");
    for (args, needle) in [
        (
            &["-m", "wrk=2"][..],
            "unknown process type `wrk` in formation `wrk=2`: known types are web, worker",
        ),
        (&["-m", "web=-1"], "invalid count `-1` for `web`"),
        (&["-m", "web=two"], "invalid count `two` for `web`"),
        (&["--memory", "12XB"], "invalid memory size `12XB`"),
        (&["--request-timeout", "soon"], "invalid duration `soon`"),
    ] {
        let out = app.up_fails(args);
        assert!(out.contains(needle), "{args:?}:\n{out}");
    }
}

#[test]
fn an_address_space_limit_gets_the_small_memory_layout_or_says_what_to_lower() {
    let app = App::new("web: {guests}/hello.wasm\n");
    let procfile = app.procfile();
    let procfile = procfile.to_str().unwrap();
    // 32 GiB: too little for the default pool's 4096 memories even at 1 GiB each.
    let out = Wasmform::spawn_limited(&["up", "-f", procfile, "-p", "0"], 32 << 20).fails();
    assert!(
        out.contains("the instance pool needs 4224 GiB of address space (4096 memories of 1 GiB for --max-instances 1024")
            && out.contains("address-space limit of 32 GiB (`ulimit -v`")
            && out.contains("lower `--max-instances` or `--max-memory`"),
        "{out}"
    );
    // A pool that fits under the limit, though not with 4 GiB slots: bounds-checked code,
    // serving as usual.
    let mut host = Wasmform::spawn_limited(
        &[
            "up",
            "-f",
            procfile,
            "-p",
            "0",
            "--max-memory",
            "16MiB",
            "--max-instances",
            "8",
        ],
        32 << 20,
    );
    host.wait_listening();
    let response = host.get("/");
    assert_eq!(response.status, 200, "{}", response.body);
    assert!(
        response.body.starts_with("hello from web.1"),
        "{}",
        response.body
    );
}

#[test]
fn port_in_use() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let app = App::new("web: {guests}/hello.wasm\n");
    let mut args = vec![
        "up",
        "-f",
        app.procfile().to_str().unwrap().to_string().leak(),
        "-p",
    ];
    args.push(port.as_str());
    let out = run_fails(&args);
    assert!(
        out.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{out}"
    );
    assert!(out.contains("-p 0"), "{out}");
}
