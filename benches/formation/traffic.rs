//! Requests closer to real traffic than hello's bare `GET /`: `GET /` with a browser's dozen
//! headers, `POST /echo` with a 16 KiB body echoed back, `GET /bytes?n=65536`. The `test-web`
//! guest serves them, under wasmform (the default configuration, web=2) and under `wasmtime
//! serve` reusing instances.

use std::path::Path;

use crate::CONNECTIONS;

use crate::harness::{
    Host, RUNS, SERVE_REUSE, Server, Traffic, generator_name, load_traffic, print_load,
    print_load_header, which,
};

/// A request as Chromium sends it for a page (its `Host` comes from wrk): 12 headers.
const BROWSER: &[(&str, &str)] = &[
    (
        "User-Agent",
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0.0.0 Safari/537.36",
    ),
    (
        "Accept",
        "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8",
    ),
    ("Accept-Language", "en-GB,en;q=0.9,fr;q=0.8"),
    ("Accept-Encoding", "gzip, deflate, br, zstd"),
    ("Referer", "http://127.0.0.1/index.html"),
    ("Cookie", "session=6f1c2a9e4b7d8c03; theme=dark; consent=1"),
    ("Cache-Control", "max-age=0"),
    ("Upgrade-Insecure-Requests", "1"),
    ("Sec-Fetch-Dest", "document"),
    ("Sec-Fetch-Mode", "navigate"),
    ("Sec-Fetch-Site", "same-origin"),
    ("Sec-Fetch-User", "?1"),
];

const KINDS: [(&str, Traffic); 3] = [
    (
        "12 browser headers",
        Traffic {
            path: "/",
            headers: BROWSER,
            body: None,
        },
    ),
    (
        "POST 16 KiB, echoed",
        Traffic {
            path: "/echo",
            headers: &[],
            body: Some(16 * 1024),
        },
    ),
    (
        "64 KiB response",
        Traffic {
            path: "/bytes?n=65536",
            headers: &[],
            body: None,
        },
    ),
];

pub fn rows(guests: &Path) {
    println!(
        "## real traffic on test-web: {CONNECTIONS} keep-alive connections, best of {RUNS}, load from {}",
        generator_name()
    );
    let Some(wrk) = which("wrk") else {
        println!("skipped: these rows need wrk (`apt-get install wrk`)");
        return;
    };
    let component = guests.join("test_web.wasm");
    let dir = tempfile::tempdir().unwrap();
    let procfile = dir.path().join("Procfile");
    std::fs::write(&procfile, format!("web: {}\n", component.display())).unwrap();
    print_load_header("vs serve");
    let wasmtime = which("wasmtime");
    for (name, traffic) in &KINDS {
        let serve = wasmtime.as_ref().map(|wasmtime| {
            let server = Server::wasmtime_serve(wasmtime, &component, SERVE_REUSE);
            load_traffic(&wrk, &server, traffic)
        });
        let host = Host::start(&procfile, &["-m", "web=2"]);
        let mine = load_traffic(&wrk, &host, traffic);
        drop(host);
        match &serve {
            Some(serve) => {
                print_load(&format!("{name}: wasmtime serve, reuse"), serve, serve);
                print_load(&format!("{name}: wasmform web=2"), &mine, serve);
            }
            None => print_load(&format!("{name}: wasmform web=2"), &mine, &mine),
        }
    }
    if wasmtime.is_none() {
        println!("wasmtime serve rows skipped: no `wasmtime` binary on PATH");
    }
}
