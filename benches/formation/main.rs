//! `cargo bench`: start-up time, idle memory per instance, live scaling and HTTP throughput of the real
//! `wasmform` binary serving the `hello` example guest, on loopback.
//!
//! Every figure comes from this run on this machine: the harness builds the guests, starts
//! `wasmform up` with each formation, reads the start-up figures from its log and its RSS
//! from /proc, and drives HTTP load with `wrk -t2 -c64` when wrk is on PATH (the load
//! generator), else with the bounded hyper client below (64 keep-alive connections, fixed
//! duration). Each HTTP row is the best of two runs.
//!
//! One file per table: `startup.rs`, `scaling.rs` (memory per instance and live scaling),
//! `throughput.rs` (HTTP, against native hyper and `wasmtime serve`, and the targets),
//! `traffic.rs` (browser headers, a 16 KiB echo, a 64 KiB response), `toolchains.rs`
//! (JavaScript and Python guests), `compute.rs` (a CPU-bound guest run to its end), `queues.rs`
//! (queue drain), `journey.rs` (the CI journey: `up --detach`, scale, `down`), `tcp.rs` (TCP
//! processes and the socket-based web server), `cluster.rs` (placement and recovery of a cluster
//! on etcd, with `--features cluster`); `harness.rs` starts the hosts and servers and drives
//! the load.

#[cfg(feature = "cluster")]
mod cluster;
mod compute;
mod harness;
mod journey;
mod queues;
mod scaling;
mod startup;
mod tcp;
mod throughput;
mod toolchains;
#[path = "../../tests/all/tools.rs"]
mod tools;
mod traffic;

use std::time::Duration;

const CONNECTIONS: usize = 64;
/// Width of the first column of the throughput tables.
const NAME: usize = 52;
const WARMUP: Duration = Duration::from_secs(1);
const MEASURE: Duration = Duration::from_secs(5);

/// Set in the environment of the bench re-executing itself as the native baseline server.
const NATIVE_ENV: &str = "WASMFORM_BENCH_NATIVE_SERVER";

fn main() {
    if std::env::var_os(NATIVE_ENV).is_some() {
        harness::native_server();
        return;
    }
    // `cargo bench` passes `--bench`; other arguments name the tables to run (`cargo bench --
    // tcp queues`), all of them without any.
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let run = |table: &str| only.is_empty() || only.iter().any(|o| o == table);
    let guests = harness::build_guests();
    let hello = guests.join("hello.wasm");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("Procfile"),
        format!("web: {}\n", hello.display()),
    )
    .unwrap();
    let procfile = dir.path().join("Procfile");

    println!(
        "wasmform benchmark: hello guest ({} KiB), {} CPUs",
        std::fs::metadata(&hello).unwrap().len() / 1024,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    if run("startup") {
        startup::rows(&procfile);
        println!();
    }
    if run("memory") {
        scaling::memory_rows(&procfile);
        println!();
    }
    if run("scale") {
        scaling::scale_rows(dir.path(), &procfile);
        println!();
    }
    if run("journey") {
        journey::rows(&procfile);
        println!();
    }
    if run("throughput") {
        let figures = throughput::rows(&procfile, &hello, &guests);
        println!();
        throughput::targets(&figures);
    }
    if run("traffic") {
        println!();
        traffic::rows(&guests);
    }
    if run("toolchains") {
        toolchains::rows();
    }
    if run("compute") {
        println!();
        compute::rows(&guests);
    }
    if run("queues") {
        queues::rows(&guests);
        println!();
    }
    if run("tcp") {
        tcp::rows(&guests);
    }
    #[cfg(feature = "cluster")]
    if run("cluster") {
        println!();
        cluster::rows(&procfile);
    }
}
