//! TCP processes: the `tcp-server` guest behind a `protocol = "tcp"` service against a native
//! `std::net` server speaking the same line protocol (a thread per connection), on loopback:
//! request/response round trips over open connections, and connections per second (connect,
//! one line, close). Then the socket-based web server (`web: tcp-server.wasm`, HTTP through the
//! TCP path) against the `wasi:http` hello, both `web=2`.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::harness::{Host, RUNS, generator_name, load};
use crate::{MEASURE, NAME, WARMUP};

/// Client threads of the line-protocol load.
const CLIENTS: usize = 16;

pub fn rows(guests: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    std::fs::write(
        dir.path().join("Procfile"),
        format!("cache: {}\n", guests.join("tcp-server.wasm").display()),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("wasmform.toml"),
        format!(
            "[[services]]\nprotocol = \"tcp\"\nlisten = \"127.0.0.1:{port}\"\nprocesses = [\"cache\"]\n"
        ),
    )
    .unwrap();
    let procfile = dir.path().join("Procfile");

    println!(
        "## TCP processes: line protocol, {CLIENTS} client threads, {}s after {}s warm-up, best of {RUNS}",
        MEASURE.as_secs(),
        WARMUP.as_secs()
    );
    println!(
        "{:<NAME$} {:>14} {:>9} {:>14} {:>9}",
        "server", "round trips/s", "vs native", "connections/s", "vs native"
    );
    let native = native_line_server();
    let base = (best(|| round_trips(native)), best(|| connections(native)));
    print_row("native std::net (thread per connection)", base, base);
    for n in [1u32, 2] {
        let host = Host::start(&procfile, &["-m", &format!("cache={n}")]);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_serving(addr);
        let figures = (best(|| round_trips(addr)), best(|| connections(addr)));
        print_row(
            &format!("wasmform cache={n} (tcp-server.wasm)"),
            figures,
            base,
        );
        drop(host);
    }
    println!();

    println!(
        "## socket-based web server vs wasi:http: GET /, web=2, 64 connections, load from {}",
        generator_name()
    );
    println!(
        "{:<NAME$} {:>10} {:>10} {:>10}",
        "server", "req/s", "p99", "vs wasi:http"
    );
    let served = |guest: &str, extra: &[&str]| {
        // Each in a directory of its own: the TCP app's wasmform.toml names `cache`.
        let dir = tempfile::tempdir().unwrap();
        let procfile = dir.path().join("Procfile");
        std::fs::write(
            &procfile,
            format!("web: {}\n", guests.join(guest).display()),
        )
        .unwrap();
        let mut args = vec!["-m", "web=2"];
        args.extend_from_slice(extra);
        let host = Host::start(&procfile, &args);
        load(&host)
    };
    let fast = served("hello.wasm", &[]);
    let quiet = served("hello.wasm", &["--no-router-log"]);
    let sockets = served("tcp-server.wasm", &[]);
    for (name, figures) in [
        ("wasmform web=2, hello.wasm (wasi:http)", &fast),
        ("wasmform web=2, hello.wasm, --no-router-log", &quiet),
        (
            "wasmform web=2, tcp-server.wasm (sockets, TCP path)",
            &sockets,
        ),
    ] {
        println!(
            "{name:<NAME$} {:>10.0} {:>10} {:>11.2}×",
            figures.rps,
            format!("{:.2} ms", figures.p99.as_secs_f64() * 1e3),
            figures.rps / fast.rps
        );
    }
}

fn print_row(name: &str, (trips, conns): (f64, f64), (base_trips, base_conns): (f64, f64)) {
    println!(
        "{name:<NAME$} {trips:>14.0} {:>8.2}× {conns:>14.0} {:>8.2}×",
        trips / base_trips,
        conns / base_conns
    );
}

fn best(measure: impl Fn() -> f64) -> f64 {
    (0..RUNS).map(|_| measure()).fold(0.0, f64::max)
}

/// Round trips per second: each client thread keeps one connection and sends a line, reads
/// the answer, and again, for [`MEASURE`] after [`WARMUP`].
fn round_trips(addr: SocketAddr) -> f64 {
    let counted = run_clients(|deadline, measuring| {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_nodelay(true).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut writer = stream;
        let mut line = String::new();
        let mut n = 0u64;
        while Instant::now() < deadline {
            writer.write_all(b"ping\n").unwrap();
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            if Instant::now() >= measuring {
                n += 1;
            }
        }
        n
    });
    counted as f64 / MEASURE.as_secs_f64()
}

/// Connections per second: each client thread connects, sends a line, reads the answer and
/// closes, again and again.
fn connections(addr: SocketAddr) -> f64 {
    let counted = run_clients(|deadline, measuring| {
        let mut n = 0u64;
        let mut line = String::new();
        while Instant::now() < deadline {
            let Ok(stream) = TcpStream::connect(addr) else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut writer = stream;
            if writer.write_all(b"hello\n").is_err() {
                continue;
            }
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) > 0 && Instant::now() >= measuring {
                n += 1;
            }
        }
        n
    });
    counted as f64 / MEASURE.as_secs_f64()
}

/// Runs [`CLIENTS`] threads of `client(deadline, measuring_from)`; sums what they count.
fn run_clients(client: impl Fn(Instant, Instant) -> u64 + Sync) -> u64 {
    let measuring = Instant::now() + WARMUP;
    let deadline = measuring + MEASURE;
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..CLIENTS)
            .map(|_| scope.spawn(|| client(deadline, measuring)))
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).sum()
    })
}

/// The baseline: a `std::net` server of the same line protocol, a thread per connection, in
/// this process; it runs until the bench ends.
fn native_line_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        for stream in listener.incoming().flatten() {
            let count = count.clone();
            std::thread::spawn(move || {
                let _ = stream.set_nodelay(true);
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut writer = stream;
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap_or(0) > 0 {
                    let n = count.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                    let answer = format!("native {n} {}", line.trim_end());
                    if writeln!(writer, "{answer}").is_err() {
                        break;
                    }
                    line.clear();
                }
            });
        }
    });
    addr
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until the service answers a line (the host logs `listening` once it is bound).
fn wait_serving(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(stream) = TcpStream::connect(addr) {
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut writer = stream;
            let mut line = String::new();
            if writer.write_all(b"up?\n").is_ok()
                && reader.read_line(&mut line).is_ok_and(|n| n > 0)
            {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the TCP service on {addr} did not answer");
}
