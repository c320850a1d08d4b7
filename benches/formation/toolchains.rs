//! Guests from the other toolchains: JavaScript (componentize-js) and Python (componentize-py),
//! beside `wasmtime serve` on the same component.

use crate::NAME;
use crate::harness::{Host, RUNS, Server, generator_name, load_with, print_load, which};
use crate::tools;

/// Connections of the toolchain rows: the issue measured JS guests with `wrk -t2 -c16`.
const TOOLCHAIN_CONNECTIONS: usize = 16;

/// Guests from the other toolchains, which spend their time in their interpreter: the JS
/// guest (componentize-js), which must get a fresh instance per request, and the Python
/// guest (componentize-py), single-use and reused, each beside `wasmtime serve` as it comes
/// (a fresh instance per request) on the same component. The tools come from `PATH` or are
/// installed as the tests install them (`tests/all/tools.rs`).
pub fn rows() {
    println!();
    println!(
        "## other toolchains: GET /, {TOOLCHAIN_CONNECTIONS} connections, best of {RUNS}, load from {}",
        generator_name()
    );
    let wasmtime = which("wasmtime");
    let out = tempfile::tempdir().unwrap();
    let js = out.path().join("js-hello.wasm");
    tools::build_js_guest(&js);
    let python = out.path().join("python-hello.wasm");
    tools::build_python_guest("python-hello", "wasi:http/proxy@0.2.12", &python);
    println!(
        "{:<NAME$} {:>10} {:>10} {:>10} {:>7} {:>9}",
        "server", "req/s", "p50", "p99", "errors", "vs serve"
    );
    let mut ratios = Vec::new();
    for (label, component, reusable) in [("js-hello", &js, false), ("python-hello", &python, true)]
    {
        let size = std::fs::metadata(component).unwrap().len() as f64 / 1e6;
        let serve = wasmtime.as_ref().map(|wasmtime| {
            let server = Server::wasmtime_serve(wasmtime, component, &[]);
            load_with(server.port, TOOLCHAIN_CONNECTIONS)
        });
        let mut rows = vec![("max_requests = 1", "max_requests = 1\n")];
        if reusable {
            rows.push(("reused", ""));
        }
        if let Some(serve) = &serve {
            print_load(
                &format!("{label} ({size:.1} MB): wasmtime serve default"),
                serve,
                serve,
            );
        }
        for (how, manifest) in rows {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(
                dir.path().join("Procfile"),
                format!("web: {}\n", component.display()),
            )
            .unwrap();
            std::fs::write(
                dir.path().join("wasmform.toml"),
                format!("[processes.web]\n{manifest}"),
            )
            .unwrap();
            let host = Host::start(&dir.path().join("Procfile"), &["-m", "web=4"]);
            let result = load_with(host.port, TOOLCHAIN_CONNECTIONS);
            let name = format!("{label}: wasmform web=4, {how}");
            match &serve {
                Some(serve) => {
                    print_load(&name, &result, serve);
                    // The target is for the guest that must be single-use.
                    if !reusable {
                        ratios.push((label, result.rps / serve.rps));
                    }
                }
                None => print_load(&name, &result, &result),
            }
        }
    }
    match wasmtime {
        Some(wasmtime) => {
            println!("(wasmtime serve rows: {})", wasmtime.display());
            for (label, ratio) in ratios {
                println!(
                    "{:<52} {:>10}  target {:<8} {}",
                    format!("{label} single-use vs wasmtime serve (default)"),
                    format!("{ratio:.2}×"),
                    "≥ 2×",
                    if ratio >= 2.0 { "met" } else { "NOT met" }
                );
            }
        }
        None => println!("wasmtime serve rows skipped: no `wasmtime` binary on PATH"),
    }
}
