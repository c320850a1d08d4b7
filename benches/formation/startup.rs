//! Start-up: spawn → `listening`, and the instantiation time wasmform logs; a large component
//! (componentize-py's CPython) cold and warm.

use std::path::Path;

use crate::harness::{Host, ms};
use crate::tools;

/// The start-up table.
pub fn rows(procfile: &Path) {
    println!("## start-up (spawn → `listening`; instantiation time as logged by wasmform)");
    println!(
        "{:<34} {:>12} {:>16} {:>14}",
        "formation", "to listening", "instantiate all", "per instance"
    );
    let cold = Host::start(procfile, &["-m", "web=1", "--no-cache"]);
    println!(
        "{:<34} {:>12} {:>16} {:>14}",
        "web=1, cold (no compile cache)",
        ms(cold.to_listening),
        ms(cold.formation_up),
        "-"
    );
    drop(cold);
    for n in [1u32, 100, 1000] {
        let host = Host::start(procfile, &["-m", &format!("web={n}")]);
        println!(
            "{:<34} {:>12} {:>16} {:>14}",
            format!("web={n}, warm (compile cache hit)"),
            ms(host.to_listening),
            ms(host.formation_up),
            format!(
                "{:.1} µs",
                host.formation_up.as_secs_f64() * 1e6 / f64::from(n)
            )
        );
    }

    large_component_rows();
}

/// Cold and warm start of a large component: the Python guest built with componentize-py
/// (CPython inside, ~18 MB; componentize-py from `PATH` or installed as the tests do).
fn large_component_rows() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("python-hello.wasm");
    tools::build_python_guest("python-hello", "wasi:http/proxy@0.2.12", &wasm);
    let size = std::fs::metadata(&wasm).unwrap().len();
    std::fs::write(dir.path().join("Procfile"), "web: python-hello.wasm\n").unwrap();
    let procfile = dir.path().join("Procfile");
    let label = format!("python-hello ({:.1} MB), web=1", size as f64 / 1e6);
    let cold = Host::start(&procfile, &["--no-cache"]);
    println!(
        "{:<34} {:>12} {:>16} {:>14}",
        format!("{label}, cold"),
        ms(cold.to_listening),
        ms(cold.formation_up),
        "-"
    );
    drop(cold);
    // Fill the cache, then measure a warm start.
    drop(Host::start(&procfile, &[]));
    let warm = Host::start(&procfile, &[]);
    println!(
        "{:<34} {:>12} {:>16} {:>14}",
        format!("{label}, warm"),
        ms(warm.to_listening),
        ms(warm.formation_up),
        "-"
    );
}
