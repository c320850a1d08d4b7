//! Test helpers: building the example guests once, running the real `wasmform` binary, and a
//! minimal HTTP/1.1 client over loopback.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The guest-examples workspace.
pub fn guest_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("guest-examples")
}

/// Builds every example guest once per test run (own target dir) and returns the directory
/// holding the `.wasm` files.
pub fn guests() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-guests");
        let output = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--release", "--target", "wasm32-wasip2"])
            .env("CARGO_TARGET_DIR", &target)
            .current_dir(guest_dir())
            .output()
            .expect("failed to run cargo for the guests");
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            if stderr.contains("wasm32-wasip2") && stderr.contains("target may not be installed") {
                panic!("the wasm32-wasip2 target is missing: run `rustup target add wasm32-wasip2`\n{stderr}");
            }
            panic!("building the guests failed:\n{stderr}");
        }
        target.join("wasm32-wasip2/release")
    })
}

/// Path of a built guest, e.g. `hello.wasm`.
pub fn guest(file: &str) -> PathBuf {
    guests().join(file)
}

/// A temporary app directory with a Procfile.
pub struct App {
    pub dir: tempfile::TempDir,
}

impl App {
    /// Writes `procfile` (with `{guests}` replaced by the guests' directory).
    pub fn new(procfile: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let text = procfile.replace("{guests}", &guests().display().to_string());
        std::fs::write(dir.path().join("Procfile"), text).unwrap();
        Self { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn procfile(&self) -> PathBuf {
        self.path("Procfile")
    }

    /// Starts `wasmform up -f Procfile -p 0 <args>` and waits until it listens.
    pub fn up(&self, args: &[&str]) -> Wasmform {
        let procfile = self.procfile();
        let mut all = vec!["up", "-f", procfile.to_str().unwrap(), "-p", "0"];
        all.extend_from_slice(args);
        let mut host = Wasmform::spawn(&all);
        host.wait_listening();
        host
    }

    /// Writes `name` in the app directory, with `{guests}` replaced by the guests' directory.
    pub fn write(&self, name: &str, text: &str) {
        let text = text.replace("{guests}", &guests().display().to_string());
        std::fs::write(self.path(name), text).unwrap();
    }

    /// Puts built guest `guest_file` at `name` in the app directory the way a build does it
    /// atomically: write a temporary file, then rename.
    pub fn install(&self, guest_file: &str, name: &str) {
        let tmp = self.path(&format!(".{name}.tmp"));
        std::fs::copy(guest(guest_file), &tmp).unwrap();
        std::fs::rename(tmp, self.path(name)).unwrap();
    }

    /// Runs a client command (`scale`, `ps`…) against this app; returns (success, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> Cli {
        let output = Command::new(env!("CARGO_BIN_EXE_wasmform"))
            .args(args)
            .arg("--app")
            .arg(self.dir.path())
            .env("RUST_BACKTRACE", "0")
            .output()
            .expect("failed to run wasmform");
        Cli::from(output)
    }

    /// Starts a client command in the background, its output piped.
    pub fn cli_spawn(&self, args: &[&str]) -> Child {
        Command::new(env!("CARGO_BIN_EXE_wasmform"))
            .args(args)
            .arg("--app")
            .arg(self.dir.path())
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("failed to run wasmform")
    }

    /// `GET target` on the app's control socket, raw: status line, headers and body.
    pub fn control_get(&self, target: &str) -> String {
        let mut socket =
            std::os::unix::net::UnixStream::connect(self.path(".wasmform/control.sock")).unwrap();
        write!(
            socket,
            "GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut raw = String::new();
        socket.read_to_string(&mut raw).unwrap();
        raw
    }

    /// `wasmform ps --json`, parsed.
    pub fn ps(&self) -> serde_json::Value {
        let out = self.cli(&["ps", "--json"]);
        assert!(out.ok, "ps failed: {}", out.stderr);
        serde_json::from_str(&out.stdout).unwrap()
    }

    /// `(type, desired)` of the running formation, in name order.
    pub fn formation(&self) -> Vec<(String, u64)> {
        self.ps()["types"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                (
                    t["name"].as_str().unwrap().to_string(),
                    t["desired"].as_u64().unwrap(),
                )
            })
            .collect()
    }

    /// Waits until every instance is up and each type runs exactly its desired count.
    pub fn wait_settled(&self, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let ps = self.ps();
            let settled = ps["instances"]
                .as_array()
                .unwrap()
                .iter()
                .all(|i| i["state"] == "up")
                && ps["types"].as_array().unwrap().iter().all(|t| {
                    let name = t["name"].as_str().unwrap();
                    let live = ps["instances"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .filter(|i| i["type"] == name)
                        .count();
                    t["running"] == t["desired"] && live as u64 == t["desired"].as_u64().unwrap()
                });
            if settled {
                return ps;
            }
            assert!(
                Instant::now() < deadline,
                "formation did not settle: {ps:#}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `wasmform up …` expecting it to fail; returns its combined output.
    pub fn up_fails(&self, args: &[&str]) -> String {
        let procfile = self.procfile();
        let mut all = vec!["up", "-f", procfile.to_str().unwrap(), "-p", "0"];
        all.extend_from_slice(args);
        run_fails(&all)
    }
}

/// A finished client command.
#[derive(Debug)]
pub struct Cli {
    pub ok: bool,
    /// The exit status (`None`: killed by a signal).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<std::process::Output> for Cli {
    fn from(output: std::process::Output) -> Self {
        Cli {
            ok: output.status.success(),
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

/// Runs wasmform expecting a non-zero exit within 60 s; returns stdout + stderr.
pub fn run_fails(args: &[&str]) -> String {
    Wasmform::spawn(args).fails()
}

/// The real binary, killed on drop; its output is printed if the test fails.
pub struct Wasmform {
    child: Child,
    /// While set, the output pipes are not read (a terminal that stopped reading).
    paused: Arc<std::sync::atomic::AtomicBool>,
    output: Arc<(Mutex<String>, Condvar)>,
    pub addr: Option<SocketAddr>,
}

impl Wasmform {
    pub fn spawn(args: &[&str]) -> Self {
        Self::spawn_with(args, &[])
    }

    /// [`Wasmform::spawn`] with more environment variables.
    pub fn spawn_with(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_wasmform"));
        command.args(args).envs(env.iter().copied());
        Self::start(command)
    }

    /// [`Wasmform::spawn`] inside network namespace `netns` (`ip netns exec`).
    #[cfg(feature = "cluster")]
    pub fn spawn_in_netns(netns: &str, args: &[&str]) -> Self {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", netns])
            .arg(env!("CARGO_BIN_EXE_wasmform"))
            .args(args);
        Self::start(command)
    }

    /// [`Wasmform::spawn`] under an address-space limit (`ulimit -v`, in KiB).
    pub fn spawn_limited(args: &[&str], address_space_kib: u64) -> Self {
        let mut command = Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(format!("ulimit -v {address_space_kib} && exec \"$@\""))
            .arg("sh")
            .arg(env!("CARGO_BIN_EXE_wasmform"))
            .args(args);
        Self::start(command)
    }

    /// [`Wasmform::spawn`] as systemd's socket activation starts it: `sockets` passed as
    /// descriptors 3, 4… with `LISTEN_FDS`, `LISTEN_PID` (set by a shell that then execs
    /// wasmform, so the pid is wasmform's) and `LISTEN_FDNAMES`.
    pub fn spawn_activated(args: &[&str], sockets: &[(&std::net::TcpListener, &str)]) -> Self {
        use std::os::fd::AsRawFd as _;
        use std::os::unix::process::CommandExt as _;
        let fds: Vec<i32> = sockets.iter().map(|(l, _)| l.as_raw_fd()).collect();
        let names: Vec<&str> = sockets.iter().map(|(_, n)| *n).collect();
        let mut command = Command::new("/bin/sh");
        command
            .arg("-c")
            .arg("export LISTEN_PID=$$; exec \"$@\"")
            .arg("sh")
            .arg(env!("CARGO_BIN_EXE_wasmform"))
            .args(args)
            .env("LISTEN_FDS", fds.len().to_string())
            .env("LISTEN_FDNAMES", names.join(":"));
        // SAFETY: only fcntl and dup2, which are async-signal-safe, between fork and exec.
        unsafe {
            command.pre_exec(move || {
                // Out of the way first, so no target descriptor overwrites a source.
                let mut high = Vec::with_capacity(fds.len());
                for (i, fd) in fds.iter().enumerate() {
                    let moved = libc::fcntl(*fd, libc::F_DUPFD, 200 + i as i32);
                    if moved < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    high.push(moved);
                }
                for (i, fd) in high.iter().enumerate() {
                    if libc::dup2(*fd, 3 + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::close(*fd);
                }
                Ok(())
            });
        }
        Self::start(command)
    }

    fn start(mut command: Command) -> Self {
        let mut child = command
            .env_remove("PORT")
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("failed to start wasmform");
        let output = Arc::new((Mutex::new(String::new()), Condvar::new()));
        let paused = Arc::new(std::sync::atomic::AtomicBool::new(false));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let output = output.clone();
            let paused = paused.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    while paused.load(std::sync::atomic::Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    let Ok(line) = line else { break };
                    let line = unpad(&line);
                    let (text, cond) = &*output;
                    let mut text = text.lock().unwrap();
                    text.push_str(&line);
                    text.push('\n');
                    cond.notify_all();
                }
            });
        }
        Self {
            child,
            paused,
            output,
            addr: None,
        }
    }

    /// Stops (or resumes) reading the host's output, so its pipe fills up.
    pub fn pause_output(&self, paused: bool) {
        self.paused
            .store(paused, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything printed so far.
    pub fn output(&self) -> String {
        self.output.0.lock().unwrap().clone()
    }

    /// Waits until the output contains `needle`; panics after `timeout`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        self.wait_until(timeout, |out| out.contains(needle))
            .unwrap_or_else(|| panic!("timed out waiting for `{needle}`"))
    }

    /// Waits until `pred` holds for the output.
    pub fn wait_until(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let (text, cond) = &*self.output;
        let mut guard = text.lock().unwrap();
        loop {
            if pred(&guard) {
                return Some(guard.clone());
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            guard = cond.wait_timeout(guard, left).unwrap().0;
        }
    }

    pub fn wait_listening(&mut self) {
        let out = self
            .wait_until(Duration::from_secs(120), |out| {
                out.contains("listening on http://") || out.contains("error:")
            })
            .expect("wasmform did not start listening within 120 s");
        if !out.contains("listening on http://") {
            panic!("wasmform failed to start:\n{out}");
        }
        self.addr = Some(self.logged_addr("listening on"));
    }

    /// The address in the first logged `{what} http://ADDR…` line, waiting for it.
    pub fn logged_addr(&self, what: &str) -> SocketAddr {
        self.logged_url_addr(what, "http")
    }

    /// The address in the first logged `{what} SCHEME://ADDR…` line, waiting for it.
    pub fn logged_url_addr(&self, what: &str, scheme: &str) -> SocketAddr {
        let prefix = format!("{what} {scheme}://");
        let out = self.wait_for(&prefix, Duration::from_secs(30));
        let rest = &out[out.find(&prefix).unwrap() + prefix.len()..];
        let end = rest
            .find(|c: char| c.is_whitespace() || c == '/')
            .unwrap_or(rest.len());
        rest[..end].parse().unwrap()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("not listening")
    }

    pub fn get(&self, path: &str) -> Response {
        get(self.addr(), path)
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill has no memory preconditions; the pid is our own child's.
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader threads catch the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for a non-zero exit within 60 s, with nothing listening and no panic; returns
    /// stdout + stderr.
    pub fn fails(mut self) -> String {
        let status = self
            .wait_exit(Duration::from_secs(60))
            .expect("wasmform did not exit");
        let out = self.output();
        assert!(!status.success(), "expected failure, got {status}:\n{out}");
        assert!(
            !out.contains("listening on"),
            "nothing may listen on bad input:\n{out}"
        );
        assert!(
            !out.contains("panicked"),
            "a panic is not an error message:\n{out}"
        );
        out
    }

    /// Resident memory of the host process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
}

impl Drop for Wasmform {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- wasmform output ----\n{}", self.output());
        }
    }
}

/// `12:00:00 web.1    | text` → `12:00:00 web.1 | text`: tests match lines without caring how
/// wide the source column is.
fn unpad(line: &str) -> String {
    match line.find(" | ") {
        Some(at) => format!("{} | {}", line[..at].trim_end(), &line[at + 3..]),
        None => line.to_string(),
    }
}

/// An HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` over a fresh connection, with a 60 s read timeout.
pub fn get(addr: SocketAddr, path: &str) -> Response {
    request(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
}

/// Sends a raw request and reads the whole response.
pub fn request(addr: SocketAddr, raw: &str) -> Response {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    stream.write_all(raw.as_bytes()).unwrap();
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).expect("read response");
    parse_response(&bytes)
}

fn parse_response(bytes: &[u8]) -> Response {
    let text = String::from_utf8_lossy(bytes);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete response in {text:?}"));
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Response {
        status,
        headers,
        body,
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// Concurrent clients sending `GET path` in a loop (at most 20 000 requests each) until
/// stopped: every answer's status and body is kept.
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Vec<(u16, String)>>>,
}

impl Load {
    pub fn start(addr: SocketAddr, path: &str, clients: usize) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = (0..clients)
            .map(|_| {
                let (stop, path) = (stop.clone(), path.to_string());
                std::thread::spawn(move || {
                    let mut answers = Vec::new();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) && answers.len() < 20_000
                    {
                        let response = get(addr, &path);
                        answers.push((response.status, response.body));
                    }
                    answers
                })
            })
            .collect();
        Self { stop, threads }
    }

    /// `clients` concurrent clients sending `total` requests in all, then stopping.
    pub fn start_counted(addr: SocketAddr, path: &str, clients: usize, total: u64) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let left = Arc::new(std::sync::atomic::AtomicU64::new(total));
        let threads = (0..clients)
            .map(|_| {
                let (left, path) = (left.clone(), path.to_string());
                std::thread::spawn(move || {
                    let mut answers = Vec::new();
                    while left
                        .fetch_update(
                            std::sync::atomic::Ordering::Relaxed,
                            std::sync::atomic::Ordering::Relaxed,
                            |n| n.checked_sub(1),
                        )
                        .is_ok()
                    {
                        let response = get(addr, &path);
                        answers.push((response.status, response.body));
                    }
                    answers
                })
            })
            .collect();
        Self { stop, threads }
    }

    /// Waits for a counted load to finish; returns every answer.
    pub fn stop_when_done(self) -> Vec<(u16, String)> {
        self.threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    }

    /// Stops the clients; returns every answer, in order per client.
    pub fn stop(self) -> Vec<(u16, String)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    }
}

/// A `redis-server` of its own on a free loopback port, without persistence; killed on drop.
pub struct RedisServer {
    _server: crate::tools::Redis,
    pub url: String,
}

impl RedisServer {
    pub fn start() -> Self {
        let server = crate::tools::Redis::start();
        let url = format!("redis://127.0.0.1:{}", server.port);
        Self {
            _server: server,
            url,
        }
    }
}
