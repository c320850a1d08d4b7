//! TCP processes through the real binary: a `std::net` guest (`tcp-server`) listening on its
//! `$PORT`, balanced by a `[[services]]` entry with `protocol = "tcp"`; its sandbox, its
//! lifecycle (scale-down drains, crashes, readiness) and a socket-based web server.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::support::{App, Wasmform, get};

/// An app running `tcp-server` as `cache` behind a TCP service; `service` adds keys to it.
fn cache_app(args: &str, service: &str, process: &str) -> App {
    let app = App::new(&format!("cache: {{guests}}/tcp-server.wasm {args}\n"));
    app.write(
        "wasmform.toml",
        &format!(
            "[[services]]\nprotocol = \"tcp\"\nlisten = \"127.0.0.1:0\"\nprocesses = [\"cache\"]\n{service}\n{process}"
        ),
    );
    app
}

/// The address of the TCP service in the host's log.
fn service_addr(host: &Wasmform) -> SocketAddr {
    host.logged_url_addr("serving", "tcp")
}

/// One open connection on each of `n` instances, by instance name (`cache.1` first).
fn one_per_instance(addr: SocketAddr, n: usize) -> Vec<(String, Client)> {
    let mut open: Vec<(String, Client)> = Vec::new();
    while open.len() < n {
        let mut client = Client::connect(addr);
        let who = client.instance();
        if open.iter().all(|(w, _)| *w != who) {
            open.push((who, client));
        }
    }
    open.sort_by(|a, b| a.0.cmp(&b.0));
    open
}

/// A line-protocol client.
struct Client {
    reader: BufReader<TcpStream>,
}

impl Client {
    fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        Self {
            reader: BufReader::new(stream),
        }
    }

    /// Sends `line`, returns the answer line (empty if the connection closed; panics if
    /// neither happens within the read timeout).
    fn ask(&mut self, line: &str) -> String {
        self.reader
            .get_mut()
            .write_all(format!("{line}\n").as_bytes())
            .unwrap();
        let mut answer = String::new();
        if let Err(e) = self.reader.read_line(&mut answer) {
            // A reset is a closed connection; silence past the timeout is neither.
            assert!(
                !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "no answer to {line:?} and no close within the read timeout"
            );
        }
        answer.trim_end().to_string()
    }

    /// Whether the host closed the connection (EOF or reset) within the read timeout; a
    /// connection that is still open when the timeout passes, or answers, is not closed.
    fn closed(&mut self) -> bool {
        let mut buf = [0u8; 64];
        match self.reader.read(&mut buf) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    }

    /// The instance that answered `ask`, e.g. `cache.2`.
    fn instance(&mut self) -> String {
        self.ask("who")
            .split(' ')
            .next()
            .unwrap_or_default()
            .to_string()
    }
}

#[test]
fn connections_spread_over_instances_and_each_keeps_its_state() {
    let app = cache_app("", "", "");
    let host = app.up(&["-m", "cache=3"]);
    let addr = service_addr(&host);

    // One connection after the other: round-robin over the three, each counting its own lines.
    let mut answers = Vec::new();
    for i in 0..6 {
        answers.push(Client::connect(addr).ask(&format!("hello {i}")));
    }
    let instances: Vec<&str> = answers
        .iter()
        .map(|a| a.split(' ').next().unwrap())
        .collect();
    let mut distinct = instances.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct, ["cache.1", "cache.2", "cache.3"], "{answers:?}");
    for instance in &distinct {
        let counts: Vec<&str> = answers
            .iter()
            .filter(|a| a.starts_with(&format!("{instance} ")))
            .map(|a| a.split(' ').nth(1).unwrap())
            .collect();
        assert_eq!(
            counts,
            ["1", "2"],
            "each instance counts its own lines: {answers:?}"
        );
    }

    // One connection keeps its instance; its state goes on across connections.
    let mut client = Client::connect(addr);
    let first = client.ask("a");
    let who = first.split(' ').next().unwrap().to_string();
    assert_eq!(first, format!("{who} 3 a"));
    assert_eq!(client.ask("b"), format!("{who} 4 b"));

    // `ps` counts connections per instance and shows the open one.
    let ps = app.ps();
    let types = ps["types"].as_array().unwrap();
    assert_eq!(types[0]["kind"], "tcp", "{ps:#}");
    let instances = ps["instances"].as_array().unwrap();
    let mine = instances.iter().find(|i| i["id"] == who.as_str()).unwrap();
    assert_eq!(mine["connections"], 1, "{ps:#}");
    assert!(mine["requests"].as_u64().unwrap() >= 3, "{ps:#}");
    let text = app.cli(&["ps"]);
    assert!(text.stdout.contains("conn (1 open)"), "{}", text.stdout);

    // The metrics count connections and bytes both ways.
    let metrics = app.control_get("/metrics");
    assert!(
        metrics.contains("wasmform_tcp_connections_total{type=\"cache\"} 7"),
        "{metrics}"
    );
    assert!(
        metrics.contains("wasmform_tcp_connections_open{type=\"cache\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("wasmform_tcp_bytes_total{type=\"cache\",direction=\"in\"}"),
        "{metrics}"
    );

    // An instance's own port is reachable only through the service: a direct connection is
    // reset before the guest sees it, and said so once.
    let out = host.wait_for("cache.1 listening on 0.0.0.0:", Duration::from_secs(5));
    let line = out
        .lines()
        .find(|l| l.contains("cache.1 listening on 0.0.0.0:"))
        .unwrap();
    let port: u16 = line.rsplit(':').next().unwrap().trim().parse().unwrap();
    let mut direct = Client::connect(SocketAddr::from(([127, 0, 0, 1], port)));
    let _ = direct.reader.get_mut().write_all(b"hello\n");
    assert!(direct.closed(), "a direct connection must not be served");
    host.wait_for(
        "that did not come through wasmform: a TCP process is reached through its service's address only",
        Duration::from_secs(5),
    );
    // The service still answers.
    assert!(Client::connect(addr).ask("still").contains(" still"));
}

#[test]
fn scaling_down_keeps_open_connections_within_the_drain_and_refuses_no_new_one() {
    let app = cache_app("", "drain_timeout = \"3s\"\n", "");
    let host = app.up(&["-m", "cache=3"]);
    let addr = service_addr(&host);
    // One open connection on each instance.
    let mut open = one_per_instance(addr, 3);
    let scaled = app.cli(&["scale", "cache=1"]);
    assert!(scaled.ok, "{}", scaled.stderr);

    // Every new connection is answered, by the instance that stays.
    for i in 0..10 {
        let answer = Client::connect(addr).ask(&format!("new {i}"));
        assert!(answer.starts_with("cache.1 "), "{answer}");
    }
    // The open connections of the stopping instances still work within the drain.
    for (who, client) in &mut open {
        let answer = client.ask("still there");
        assert!(answer.starts_with(&format!("{who} ")), "{answer}");
    }
    // cache.2's client leaves: cache.2 ends at once. cache.3's stays past the drain timeout
    // and is closed by the host.
    let (_, two) = open.remove(1);
    drop(two);
    let started = Instant::now();
    loop {
        let ps = app.ps();
        let ids: Vec<String> = ps["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_string())
            .collect();
        if !ids.contains(&"cache.2".to_string()) {
            assert!(
                ids.contains(&"cache.3".to_string()),
                "cache.3 drains: {ids:?}"
            );
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{ids:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (_, mut three) = open.remove(1);
    assert!(three.closed(), "closed after the drain timeout");
    host.wait_for(
        "cache.3 closing 1 connection still open after 3 s (drain_timeout)",
        Duration::from_secs(5),
    );
    app.wait_settled(Duration::from_secs(10));
    // The one that stayed kept its connection all along.
    let (_, one) = &mut open[0];
    assert!(one.ask("end").starts_with("cache.1 "));
}

#[test]
fn a_trap_and_a_memory_bomb_leave_the_other_instances_serving() {
    let app = cache_app("", "", "[processes.cache]\nmemory = \"64MiB\"\n");
    let host = app.up(&["-m", "cache=3"]);
    let addr = service_addr(&host);
    let mut by_instance = one_per_instance(addr, 3);
    let [(_, one), (_, two), (_, three)] = &mut by_instance[..] else {
        unreachable!()
    };
    assert_eq!(
        one.ask("crash"),
        "",
        "a trap closes its instance's connections"
    );
    assert_eq!(two.ask("bomb"), "", "so does running out of memory");
    host.wait_for("cache.1 wasm trap", Duration::from_secs(10));
    host.wait_until(Duration::from_secs(10), |out| {
        out.contains("cache.2 memory quota exceeded (64 MiB)")
    })
    .expect("the memory bomb is reported as such");
    // The third instance kept its connection and its state; new connections are answered.
    assert!(three.ask("after").starts_with("cache.3 "));
    for i in 0..6 {
        let answer = Client::connect(addr).ask(&format!("new {i}"));
        assert!(answer.starts_with("cache."), "{answer}");
    }
    let ps = app.wait_settled(Duration::from_secs(30));
    let restarts = |id: &str| {
        ps["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["id"] == id)
            .unwrap()["restarts"]
            .as_u64()
            .unwrap()
    };
    assert!(
        restarts("cache.1") >= 1 && restarts("cache.2") >= 1,
        "{ps:#}"
    );
    assert_eq!(restarts("cache.3"), 0, "{ps:#}");
}

#[test]
fn sockets_are_denied_unless_listed_and_each_denial_is_logged_once() {
    let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target_addr = target.local_addr().unwrap();
    let app = cache_app("", "", "");
    let host = app.up(&[]);
    let addr = service_addr(&host);
    let mut client = Client::connect(addr);
    let connect = format!("connect {target_addr}");
    assert!(
        client.ask(&connect).starts_with("refused "),
        "outgoing TCP is denied"
    );
    assert!(client.ask(&connect).starts_with("refused "));
    let hint = format!(
        "process type `cache` was denied an outgoing TCP connection to {target_addr}: add \"tcp://{target_addr}\" to allowed_outbound_hosts under [processes.cache] in wasmform.toml"
    );
    host.wait_for(&hint, Duration::from_secs(5));
    // Another port than its own is denied too.
    assert!(client.ask("listen 7").starts_with("refused 7"));
    host.wait_for(
        "cache.1 tried to listen on 127.0.0.1:7, which is denied: a TCP process listens on the port in $PORT only",
        Duration::from_secs(5),
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        host.output().matches(&hint).count(),
        1,
        "once per type and destination"
    );
    drop(host);

    // Listed, it connects.
    let listed = cache_app(
        "",
        "",
        &format!("[processes.cache]\nallowed_outbound_hosts = [\"tcp://{target_addr}\"]\n"),
    );
    let host = listed.up(&[]);
    let mut client = Client::connect(service_addr(&host));
    assert_eq!(client.ask(&connect), format!("connected {target_addr}"));

    // A worker that no TCP service routes to may not listen at all.
    let worker = App::new("worker: {guests}/tcp-server.wasm\nweb: {guests}/hello.wasm\n");
    let host = worker.up(&[]);
    host.wait_for(
        "only a TCP process listens, on its $PORT: route process type `worker` from a [[services]] entry with protocol = \"tcp\" in wasmform.toml",
        Duration::from_secs(10),
    );
}

#[test]
fn a_guest_that_does_not_listen_on_its_port_is_not_ready() {
    let never = cache_app("never-listen", "ready_timeout = \"1s\"\n", "");
    let out = never.up_fails(&[]);
    assert!(
        out.contains("instance cache.1 failed to start: did not listen on $PORT (")
            && out.contains(
                "within 1 s (ready_timeout): a TCP process must listen on the port in $PORT"
            ),
        "{out}"
    );
    let elsewhere = cache_app("listen-elsewhere", "ready_timeout = \"1s\"\n", "");
    let out = elsewhere.up_fails(&[]);
    assert!(
        out.contains("cache.1 tried to listen on 0.0.0.0:")
            && out.contains("instance cache.1 failed to start: exited with status 1 before it listened on $PORT ("),
        "{out}"
    );
}

#[test]
fn past_the_connection_limit_and_the_backlog_connections_are_closed_and_counted() {
    let app = cache_app(
        "",
        "max_connections = 1\nbacklog = 1\nidle_timeout = \"1s\"\n",
        "",
    );
    let host = app.up(&[]);
    let addr = service_addr(&host);
    let mut first = Client::connect(addr);
    assert!(first.ask("one").starts_with("cache.1 "));
    // The second waits in the backlog; the third is closed at once.
    let mut second = Client::connect(addr);
    second.reader.get_mut().write_all(b"two\n").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let mut third = Client::connect(addr);
    assert!(third.closed(), "past the backlog: closed at once");
    host.wait_for(
        "desc=\"connection closed: every instance has 1 connections open (max_connections) and 1 more wait (backlog)\"",
        Duration::from_secs(5),
    );
    // The first goes idle past the idle timeout and is closed: the second gets its place.
    assert!(first.closed(), "idle past idle_timeout: closed");
    let mut answer = String::new();
    second.reader.read_line(&mut answer).unwrap();
    assert!(answer.starts_with("cache.1 2 two"), "{answer}");
    let metrics = app.control_get("/metrics");
    assert!(
        metrics.contains("wasmform_tcp_refused_total{type=\"cache\",reason=\"backlog\"} 1"),
        "{metrics}"
    );
}

#[test]
fn a_socket_based_web_server_answers_http_on_the_web_port() {
    let app = App::new("web: {guests}/tcp-server.wasm\n");
    let host = app.up(&["-m", "web=2"]);
    let mut seen = Vec::new();
    for _ in 0..4 {
        let response = host.get("/hi");
        assert_eq!(response.status, 200, "{response:?}");
        seen.push(response.body.split(' ').next().unwrap().to_string());
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen, ["web.1", "web.2"], "balanced over both");
    assert!(get(host.addr(), "/x").body.ends_with(" /x\n"));
    let ps = app.ps();
    assert_eq!(ps["types"][0]["kind"], "tcp", "{ps:#}");
}

#[test]
fn tcp_services_refuse_bad_input_naming_the_key() {
    let app = App::new(
        "cache: {guests}/tcp-server.wasm\nweb: {guests}/hello.wasm\nworker: {guests}/ticker.wasm\n",
    );
    let service = |body: &str| format!("[[services]]\nlisten = \"127.0.0.1:0\"\n{body}\n");
    for (manifest, expected) in [
        (
            service("protocol = \"udp\"\nprocesses = [\"cache\"]"),
            "wasmform.toml:3:12: services[0].protocol: unknown protocol `udp`: a service speaks \"http\" (the default) or \"tcp\"",
        ),
        (
            service("protocol = \"tcp\"\nprocesses = [\"web\"]"),
            "services.processes: `web` is an HTTP process (",
        ),
        (
            service("processes = [\"cache\"]"),
            "if it listens on $PORT, add `protocol = \"tcp\"` to the service",
        ),
        (
            service("processes = [\"web\"]\nbacklog = 3"),
            "wasmform.toml:4:11: services[0].backlog: applies to TCP services only: add `protocol = \"tcp\"`",
        ),
        (
            service("protocol = \"tcp\"\nprocesses = [\"cache\"]\nmax_connections = 0"),
            "wasmform.toml:5:19: services[0].max_connections: must be at least 1",
        ),
        (
            format!(
                "{}{}",
                service("protocol = \"tcp\"\nprocesses = [\"cache\"]"),
                "[[services]]\nlisten = \"127.0.0.1:9\"\nprocesses = [\"cache\"]\n"
            ),
            "wasmform.toml:1:1, so it cannot take HTTP too: a process type speaks one protocol",
        ),
        (
            "[processes.cache]\nallowed_outbound_hosts = [\"tcp://db.internal:5432\"]\n"
                .to_string(),
            "wasmform.toml:2:27: processes.cache.allowed_outbound_hosts: `tcp://db.internal:5432` is not a socket address: `db.internal` is not an IP address",
        ),
    ] {
        app.write("wasmform.toml", &manifest);
        let out = app.up_fails(&[]);
        assert!(
            out.contains(expected),
            "for {manifest:?} expected {expected:?} in:\n{out}"
        );
    }
}

#[test]
fn a_deploy_refuses_no_connection_and_drains_the_old_instances() {
    let manifest = |version: &str| format!("[processes.cache.env]\nVERSION = \"{version}\"\n");
    let app = cache_app("", "drain_timeout = \"2s\"\n", &manifest("1"));
    let host = app.up(&["-m", "cache=2"]);
    let addr = service_addr(&host);
    let mut old = Client::connect(addr);
    let who = old.instance();

    // New connections all through the deploy, none refused.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = std::thread::spawn({
        let stop = stop.clone();
        move || {
            let mut answered = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let answer = Client::connect(addr).ask("during");
                assert!(
                    answer.starts_with("cache."),
                    "refused during the deploy: {answer:?}"
                );
                answered += 1;
            }
            answered
        }
    });
    app.write("wasmform.toml", &format!("[[services]]\nprotocol = \"tcp\"\nlisten = \"127.0.0.1:0\"\nprocesses = [\"cache\"]\ndrain_timeout = \"2s\"\n{}", manifest("2")));
    let deployed = app.cli(&["deploy"]);
    assert!(deployed.ok, "{}{}", deployed.stdout, deployed.stderr);
    // The old connection went on while its instance drained, then was closed with it.
    assert!(old.closed(), "closed once its instance was replaced");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(load.join().unwrap() > 0);
    host.wait_for(
        &format!("{who} closing 1 connection still open after 2 s (drain_timeout)"),
        Duration::from_secs(10),
    );
    let ps = app.wait_settled(Duration::from_secs(30));
    for instance in ps["instances"].as_array().unwrap() {
        assert_eq!(instance["release"], 2, "{ps:#}");
    }
}
