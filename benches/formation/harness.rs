//! The bench's harness: `wasmform up` and the baseline servers as child processes, the load
//! generators (wrk, or a bounded hyper client), and small HTTP and control-API clients.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;

pub use crate::tools::which;
use crate::{CONNECTIONS, MEASURE, NAME, NATIVE_ENV, WARMUP};

/// One request on a fresh connection: status and body.
pub fn http(port: u16, method: &str, path: &str) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// The header of the tables [`print_load`] prints rows of; `versus` names the baseline.
pub fn print_load_header(versus: &str) {
    println!(
        "{:<NAME$} {:>10} {:>10} {:>10} {:>7} {:>9} {:>9} {:>10} {:>9}",
        "server", "req/s", "p50", "p99", "errors", versus, "CPU/req", "req/CPU-s", versus
    );
}

/// One row: req/s, latency and errors, then the server's CPU per request and requests per
/// CPU-second (what an edge node pays; steadier than req/s on 2 shared cores), each beside
/// `baseline`'s.
pub fn print_load(name: &str, load: &Load, baseline: &Load) {
    let (cpu, per_cpu, ratio) = match (load.per_cpu_second(), baseline.per_cpu_second()) {
        (Some(mine), base) => (
            format!("{:.1} µs", 1e6 / mine),
            format!("{mine:.0}"),
            base.map_or("-".to_string(), |base| format!("{:.2}×", mine / base)),
        ),
        (None, _) => ("-".to_string(), "-".to_string(), "-".to_string()),
    };
    println!(
        "{name:<NAME$} {:>10.0} {:>10} {:>10} {:>7} {:>8.2}× {cpu:>9} {per_cpu:>10} {ratio:>9}",
        load.rps,
        format!("{:.2} ms", load.p50.as_secs_f64() * 1e3),
        format!("{:.2} ms", load.p99.as_secs_f64() * 1e3),
        load.errors,
        load.rps / baseline.rps
    );
}

/// A server under load: where it listens and which process does the work, whose CPU time
/// is read from `/proc`.
pub trait Served {
    fn port(&self) -> u16;
    fn pid(&self) -> u32;
}

impl Served for Server {
    fn port(&self) -> u16 {
        self.port
    }
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Served for Host {
    fn port(&self) -> u16 {
        self.port
    }
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// CPU time (user + system, all threads, also those that ended) of process `pid` so far.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name may hold spaces: fields are counted after its closing parenthesis,
    // where field 3 (state) comes first; utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // SAFETY: `sysconf` only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Duration::from_secs_f64((ticks(11) + ticks(12)) as f64 / per_second)
}

/// Runs `wasmform scale CHANGE` for the app in `dir`; returns how long it took.
/// `POST /v1/scale` straight on the control socket: the host's own time to apply `change`
/// (its answer comes once the new instances are up), without starting a CLI process.
pub fn scale_api(dir: &Path, change: &str) -> Duration {
    use std::io::{Read as _, Write as _};
    let mut conn =
        std::os::unix::net::UnixStream::connect(dir.join(".wasmform/control.sock")).unwrap();
    let body = format!("{{\"changes\": [\"{change}\"]}}");
    let started = Instant::now();
    write!(
        conn,
        "POST /v1/scale HTTP/1.1\r\nHost: wasmform\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    let took = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    took
}

pub fn scale(dir: &Path, change: &str) -> Duration {
    scale_at("--app", dir, change)
}

/// Runs `wasmform scale CHANGE FLAG PATH` (`--app DIR` or `--state-dir DIR`); how long it
/// took.
pub fn scale_at(flag: &str, path: &Path, change: &str) -> Duration {
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_wasmform"))
        .args(["scale", change, flag])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    started.elapsed()
}

/// Instances `up` according to `wasmform ps --json`, once the formation has settled.
pub fn ps_counts(dir: &Path) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let output = Command::new(env!("CARGO_BIN_EXE_wasmform"))
            .args(["ps", "--json", "--app"])
            .arg(dir)
            .output()
            .unwrap();
        let ps: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        let instances = ps["instances"].as_array().unwrap();
        let up = instances.iter().filter(|i| i["state"] == "up").count();
        if up == instances.len() || Instant::now() > deadline {
            return up;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sequential requests over 8 connections for `duration`; returns (served, failed).
pub fn load_for(port: u16, duration: Duration) -> (u64, u64) {
    runtime().block_on(async move {
        let deadline = Instant::now() + duration;
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                tokio::spawn(async move {
                    let mut conn = Conn::open(port).await;
                    let (mut served, mut failed) = (0u64, 0u64);
                    while Instant::now() < deadline {
                        if conn.get().await == Some(200) {
                            served += 1;
                        } else {
                            failed += 1;
                            conn = Conn::open(port).await;
                        }
                    }
                    (served, failed)
                })
            })
            .collect();
        let mut total = (0, 0);
        for task in tasks {
            let (s, f) = task.await.unwrap();
            total.0 += s;
            total.1 += f;
        }
        total
    })
}

pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// Builds the example guests in release mode into the bench's own target dir.
pub fn build_guests() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = root.join("target/bench-guests");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "--quiet", "--target", "wasm32-wasip2"])
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(root.join("guest-examples"))
        .status()
        .expect("failed to run cargo");
    assert!(
        status.success(),
        "building the guests failed (is `wasm32-wasip2` installed? `rustup target add wasm32-wasip2`)"
    );
    target.join("wasm32-wasip2/release")
}

/// The baseline: a native hyper HTTP/1 server answering like `hello` (instance name, request
/// counter, path), on a default multi-threaded tokio runtime — the same stack wasmform uses,
/// without wasm.
pub fn native_server() {
    use std::sync::atomic::{AtomicU64, Ordering};
    // A busy-spin per request (`Server::native_spinning`): the operating point of a server
    // that spends as much CPU per request as wasmform does, without wasm.
    let spin = std::env::var(NATIVE_SPIN_ENV)
        .ok()
        .and_then(|us| us.parse().ok())
        .map(Duration::from_micros);
    runtime().block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("listening on http://{}", listener.local_addr().unwrap());
        let counter = std::sync::Arc::new(AtomicU64::new(0));
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            stream.set_nodelay(true).unwrap();
            let counter = counter.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        if let Some(spin) = spin {
                            let until = Instant::now() + spin;
                            while Instant::now() < until {
                                std::hint::spin_loop();
                            }
                        }
                        let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
                        let body = format!(
                            "hello from native, request {n}, path {}\n",
                            req.uri().path()
                        );
                        async move {
                            Ok::<_, std::convert::Infallible>(
                                hyper::Response::builder()
                                    .header("content-type", "text/plain; charset=utf-8")
                                    .body(http_body_util::Full::new(Bytes::from(body)))
                                    .unwrap(),
                            )
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

/// The native baseline server, a copy of this bench binary, killed on drop.
pub struct Server {
    pub child: Child,
    pub port: u16,
}

/// Set, in µs, for the native server to busy-spin that long per request.
const NATIVE_SPIN_ENV: &str = "WASMFORM_BENCH_NATIVE_SPIN_US";

impl Server {
    pub fn native() -> Self {
        Self::native_spinning(Duration::ZERO)
    }

    /// The native server, spinning `spin` per request.
    pub fn native_spinning(spin: Duration) -> Self {
        let mut command = Command::new(std::env::current_exe().unwrap());
        if !spin.is_zero() {
            command.env(NATIVE_SPIN_ENV, spin.as_micros().to_string());
        }
        let mut child = command
            .env(NATIVE_ENV, "1")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().rsplit(':').next().unwrap().parse().unwrap();
        Self { child, port }
    }
}

impl Server {
    /// `wasmtime serve -S cli` on `component` (hello imports `wasi:cli`), port chosen by the
    /// kernel and read from its `Serving HTTP on` line.
    pub fn wasmtime_serve(wasmtime: &Path, component: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(wasmtime)
            .args(["serve", "-S", "cli", "--addr", "127.0.0.1:0"])
            .args(extra)
            .arg(component)
            .env("RUST_BACKTRACE", "0")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("failed to start wasmtime serve");
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let mut lines = stderr.lines();
        let port = loop {
            let line = lines
                .next()
                .expect("wasmtime serve exited before serving")
                .unwrap();
            if let Some(addr) = line.split("Serving HTTP on http://").nth(1) {
                break addr
                    .trim_end_matches('/')
                    .rsplit(':')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap();
            }
        };
        // Keep draining its output so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Self { child, port }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `wasmform up`, killed and waited for on drop.
pub struct Host {
    pub child: Child,
    pub port: u16,
    pub to_listening: Duration,
    pub formation_up: Duration,
}

impl Host {
    #[expect(clippy::zombie_processes, reason = "the child is waited for in `Drop`")]
    pub fn start(procfile: &Path, args: &[&str]) -> Self {
        let started = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_wasmform"))
            // 1000 × 256 MiB limits exceed this machine's memory, which is the default
            // capacity; hello uses ~1 MiB, so lift the budget rather than the limits.
            .args([
                "up",
                "-f",
                procfile.to_str().unwrap(),
                "-p",
                "0",
                "--capacity",
                "1024GiB",
            ])
            .args(args)
            .env("RUST_BACKTRACE", "0")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("failed to start wasmform");
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        // The default configuration, router log on: its line per request is written by the
        // host into this pipe, which is read but, once the host listens, not parsed.
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                if tx.send(std::mem::take(&mut line)).is_err() {
                    break;
                }
            }
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        let mut formation_up = None;
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(120))
                .expect("wasmform did not start");
            if let Some(rest) = line.split(" up in ").nth(1) {
                formation_up = Some(parse_human(rest.split(" (").next().unwrap()));
            }
            if let Some(addr) = line.split("listening on http://").nth(1) {
                let port = addr.trim().rsplit(':').next().unwrap().parse().unwrap();
                return Self {
                    child,
                    port,
                    to_listening: started.elapsed(),
                    formation_up: formation_up.expect("no `up in` line before `listening`"),
                };
            }
        }
    }

    pub fn rss_kib(&self) -> u64 {
        // Let the allocator settle after the last request.
        std::thread::sleep(Duration::from_millis(300));
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parses wasmform's `850 µs`, `12.3 ms`, `2 s`.
pub fn parse_human(text: &str) -> Duration {
    let (number, unit) = text.trim().split_once(' ').unwrap();
    let number: f64 = number.parse().unwrap();
    Duration::from_secs_f64(match unit {
        "µs" => number / 1e6,
        "ms" => number / 1e3,
        "s" => number,
        other => panic!("unknown unit {other}"),
    })
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// `count` sequential requests over one keep-alive connection.
pub fn get_many(port: u16, count: usize) {
    runtime().block_on(async move {
        let mut conn = Conn::open(port).await;
        for _ in 0..count {
            assert_eq!(conn.get().await, Some(200));
        }
    });
}

#[derive(Clone, Copy)]
pub struct Load {
    pub rps: f64,
    pub p50: Duration,
    pub p99: Duration,
    pub errors: u64,
    /// Requests answered in the measured run, and the server's CPU time over it.
    pub requests: u64,
    pub cpu: Duration,
}

impl Load {
    /// Requests per second of the server's CPU time, if it was measured.
    pub fn per_cpu_second(&self) -> Option<f64> {
        (self.requests > 0 && !self.cpu.is_zero())
            .then(|| self.requests as f64 / self.cpu.as_secs_f64())
    }
}

/// The best of [`RUNS`] measurements of `port` (the host shares its two cores with the load
/// generator and whatever else the machine does, so single runs vary by ±10-30 %).
pub fn load(server: &impl Served) -> Load {
    load_with(server, CONNECTIONS)
}

/// [`load`] over `connections` connections.
pub fn load_with(server: &impl Served, connections: usize) -> Load {
    let (port, pid) = (server.port(), server.pid());
    match which("wrk") {
        Some(wrk) => best_of_runs(|| load_wrk(&wrk, port, pid, connections, &Traffic::HELLO)),
        None => best_of_runs(|| load_builtin(port, pid, connections)),
    }
}

/// [`load`] with `traffic` as each request, driven by `wrk` (the built-in client sends only
/// [`Traffic::HELLO`]).
pub fn load_traffic(wrk: &Path, server: &impl Served, traffic: &Traffic) -> Load {
    best_of_runs(|| load_wrk(wrk, server.port(), server.pid(), CONNECTIONS, traffic))
}

/// The run with the most req/s of [`RUNS`].
fn best_of_runs(mut run: impl FnMut() -> Load) -> Load {
    (0..RUNS)
        .map(|_| run())
        .max_by(|a, b| a.rps.total_cmp(&b.rps))
        .expect("at least one run")
}

/// `wasmtime serve`'s options for instance reuse, its fastest mode and the nearest peer of a
/// wasmform web instance.
pub const SERVE_REUSE: &[&str] = &["--max-instance-reuse-count", "1000000000"];

/// Measurements per row; the best is kept.
pub const RUNS: usize = 2;

/// The name of the load generator `load` uses, for the table's heading.
pub fn generator_name() -> &'static str {
    if which("wrk").is_some() {
        "wrk -t2"
    } else {
        "the built-in hyper client (install wrk for the issue's load generator)"
    }
}

/// `wrk -t2 -c64`, the load generator the figures come from: a `WARMUP` run, then a
/// `MEASURE` run whose summary is parsed. Errors: socket errors and non-2xx responses.
pub fn load_wrk(wrk: &Path, port: u16, pid: u32, connections: usize, traffic: &Traffic) -> Load {
    let url = format!("http://127.0.0.1:{port}{}", traffic.path);
    // A POST body is set by a script: wrk has no option for it.
    let script = traffic.body.map(|bytes| {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        use std::io::Write as _;
        write!(
            file,
            "wrk.method = \"POST\"\nwrk.body = string.rep(\"x\", {bytes})\n\
             wrk.headers[\"Content-Type\"] = \"application/octet-stream\"\n"
        )
        .unwrap();
        file
    });
    let run = |duration: Duration, latency: bool| {
        let mut command = Command::new(wrk);
        command.args([
            "-t2".to_string(),
            format!("-c{connections}"),
            format!("-d{}s", duration.as_secs()),
        ]);
        if latency {
            command.arg("--latency");
        }
        for (name, value) in traffic.headers {
            command.arg("-H").arg(format!("{name}: {value}"));
        }
        if let Some(script) = &script {
            command.arg("-s").arg(script.path());
        }
        let output = command.arg(&url).output().expect("failed to run wrk");
        assert!(output.status.success(), "wrk failed: {output:?}");
        String::from_utf8(output.stdout).expect("wrk prints UTF-8")
    };
    run(WARMUP, false);
    let before = cpu_time(pid);
    let summary = run(MEASURE, true);
    let cpu = cpu_time(pid).saturating_sub(before);
    let field = |prefix: &str| {
        summary
            .lines()
            .map(str::trim)
            .find_map(|line| line.strip_prefix(prefix))
            .map(str::trim)
    };
    let errors = field("Socket errors:").map_or(0, |rest| {
        rest.split(',')
            .filter_map(|part| part.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum()
    }) + field("Non-2xx or 3xx responses:").map_or(0, |n| n.parse().unwrap_or(0));
    Load {
        rps: field("Requests/sec:")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no Requests/sec in wrk's output:\n{summary}")),
        p50: field("50%").map(parse_wrk_duration).unwrap_or_default(),
        p99: field("99%").map(parse_wrk_duration).unwrap_or_default(),
        errors,
        // `261178 requests in 5.00s, 25.66MB read`
        requests: summary
            .lines()
            .find(|line| line.contains(" requests in "))
            .and_then(|line| line.split_whitespace().next()?.parse().ok())
            .unwrap_or(0),
        cpu,
    }
}

/// What each request of a load is.
pub struct Traffic {
    pub path: &'static str,
    /// Headers besides the `Host` wrk sends.
    pub headers: &'static [(&'static str, &'static str)],
    /// A POST body of this many bytes; a GET without.
    pub body: Option<usize>,
}

impl Traffic {
    pub const HELLO: Traffic = Traffic {
        path: "/",
        headers: &[],
        body: None,
    };
}

/// Parses wrk's `261.00us`, `1.26ms`, `1.02s`, `2.00m`.
pub fn parse_wrk_duration(text: &str) -> Duration {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().unwrap_or(0.0);
    Duration::from_secs_f64(match unit {
        "us" => number / 1e6,
        "ms" => number / 1e3,
        "s" => number,
        "m" => number * 60.0,
        other => panic!("unknown wrk unit {other:?} in {text:?}"),
    })
}

/// Drives `connections` keep-alive connections for `WARMUP` + `MEASURE` with hyper's client;
/// every loop is bounded by the deadline.
pub fn load_builtin(port: u16, pid: u32, connections: usize) -> Load {
    runtime().block_on(async move {
        let start = Instant::now();
        let measure_from = start + WARMUP;
        let deadline = measure_from + MEASURE;
        let cpu = tokio::spawn(async move {
            tokio::time::sleep_until(measure_from.into()).await;
            let before = cpu_time(pid);
            tokio::time::sleep_until(deadline.into()).await;
            cpu_time(pid).saturating_sub(before)
        });
        let tasks: Vec<_> = (0..connections)
            .map(|_| {
                tokio::spawn(async move {
                    let mut conn = Conn::open(port).await;
                    let mut latencies = Vec::new();
                    let mut errors = 0u64;
                    loop {
                        let sent = Instant::now();
                        if sent >= deadline {
                            break;
                        }
                        let ok = conn.get().await == Some(200);
                        if sent >= measure_from {
                            if ok {
                                latencies.push(sent.elapsed());
                            } else {
                                errors += 1;
                            }
                        }
                        if !ok {
                            conn = Conn::open(port).await;
                        }
                    }
                    (latencies, errors)
                })
            })
            .collect();
        let mut all = Vec::new();
        let mut errors = 0;
        for task in tasks {
            let (latencies, e) = task.await.unwrap();
            all.extend(latencies);
            errors += e;
        }
        all.sort();
        let pct = |p: f64| {
            all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
                .copied()
                .unwrap_or_default()
        };
        Load {
            rps: all.len() as f64 / MEASURE.as_secs_f64(),
            p50: pct(0.50),
            p99: pct(0.99),
            errors,
            requests: all.len() as u64,
            cpu: cpu.await.unwrap(),
        }
    })
}

/// One HTTP/1.1 keep-alive client connection.
pub struct Conn {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
}

impl Conn {
    async fn open(port: u16) -> Self {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        stream.set_nodelay(true).unwrap();
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        Self { sender }
    }

    async fn get(&mut self) -> Option<u16> {
        let request = hyper::Request::get("/")
            .header("host", "127.0.0.1")
            .body(Empty::new())
            .unwrap();
        self.sender.ready().await.ok()?;
        let response = self.sender.send_request(request).await.ok()?;
        let status = response.status().as_u16();
        response.into_body().collect().await.ok()?;
        Some(status)
    }
}
