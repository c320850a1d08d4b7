//! Guests from the other toolchains: JavaScript (componentize-js) and Python (componentize-py),
//! beside `wasmtime serve` on the same component.

use std::path::Path;

use crate::harness::{
    Host, Load, RUNS, SERVE_REUSE, Server, generator_name, load_with, print_load,
    print_load_header, which,
};
use crate::tools;

/// A `wasmtime serve` row: its name and options.
type ServeRow<'a> = (&'static str, &'a [&'a str]);

/// A wasmform row: its name, web instances, manifest, the index of the serve row it is
/// compared with, and the target for that ratio, if it has one.
struct OurRow {
    how: &'static str,
    web: u32,
    manifest: &'static str,
    versus: usize,
    target: Option<f64>,
}

/// Connections of the toolchain rows: the issue measured JS guests with `wrk -t2 -c16`.
const TOOLCHAIN_CONNECTIONS: usize = 16;

/// Guests from the other toolchains, which spend their time in their interpreter: the JS
/// guest (componentize-js), which must get a fresh instance per request, beside `wasmtime
/// serve` as it comes (a fresh instance per request), and the Python guest (componentize-py),
/// single-use and reused, beside `wasmtime serve` as it comes and reusing instances, with and
/// without `-W timeout`. The tools come from `PATH` or are installed as the tests install them
/// (`tests/all/tools.rs`).
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
    print_load_header("vs serve");
    let reuse_timeout: &[&str] = &[SERVE_REUSE, &["-W", "timeout=30s"]].concat();
    // Per guest: the `wasmtime serve` rows, then wasmform's, each compared with the serve row
    // of equal reuse and safety (epoch interruption being on in wasmform).
    let guests: [(&str, &Path, &[ServeRow<'_>], &[OurRow]); 2] = [
        (
            "js-hello",
            &js,
            &[("default", &[])],
            &[OurRow {
                how: "web=4, max_requests = 1",
                web: 4,
                manifest: "max_requests = 1\n",
                versus: 0,
                target: Some(2.0),
            }],
        ),
        (
            "python-hello",
            &python,
            &[
                ("default", &[]),
                ("reuse", SERVE_REUSE),
                ("reuse, -W timeout=30s", reuse_timeout),
            ],
            &[
                OurRow {
                    how: "web=4, max_requests = 1",
                    web: 4,
                    manifest: "max_requests = 1\n",
                    versus: 0,
                    target: None,
                },
                OurRow {
                    how: "web=2, reused",
                    web: 2,
                    manifest: "",
                    versus: 2,
                    target: Some(1.1),
                },
            ],
        ),
    ];
    let mut ratios = Vec::new();
    for (label, component, serve_rows, our_rows) in guests {
        let size = std::fs::metadata(component).unwrap().len() as f64 / 1e6;
        println!("{label}: {size:.1} MB");
        let serve: Vec<Load> = match &wasmtime {
            Some(wasmtime) => serve_rows
                .iter()
                .map(|(name, args)| {
                    let server = Server::wasmtime_serve(wasmtime, component, args);
                    let load = load_with(&server, TOOLCHAIN_CONNECTIONS);
                    print_load(&format!("{label}: wasmtime serve {name}"), &load, &load);
                    load
                })
                .collect(),
            None => Vec::new(),
        };
        for &OurRow {
            how,
            web,
            manifest,
            versus,
            target,
        } in our_rows
        {
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
            let host = Host::start(&dir.path().join("Procfile"), &["-m", &format!("web={web}")]);
            let result = load_with(&host, TOOLCHAIN_CONNECTIONS);
            let name = format!("{label}: wasmform {how}");
            match serve.get(versus) {
                Some(base) => {
                    print_load(&name, &result, base);
                    if let Some(goal) = target {
                        ratios.push((
                            format!("{label} {how} vs wasmtime serve {}", serve_rows[versus].0),
                            result.rps / base.rps,
                            goal,
                        ));
                    }
                }
                None => print_load(&name, &result, &result),
            }
        }
    }
    match wasmtime {
        Some(wasmtime) => {
            println!(
                "(wasmtime serve rows: {}; a wasmform row's ratios are to the serve row of equal \
                 reuse and safety: single-use to default, reused to reuse with -W timeout)",
                wasmtime.display()
            );
            // The targets: a single-use JS guest ≥ 2× serve's fresh instance per request; a
            // reused Python guest ≥ 1.1× serve's reuse with a timeout (equal safety).
            for (what, ratio, goal) in ratios {
                println!(
                    "{what:<70} {:>7}  target ≥ {goal}×  {}",
                    format!("{ratio:.2}×"),
                    if ratio >= goal { "met" } else { "NOT met" }
                );
            }
        }
        None => println!("wasmtime serve rows skipped: no `wasmtime` binary on PATH"),
    }
}
