//! Shared state and queues through the real binary, on both backends: the embedded store and
//! a real `redis-server`. Every scenario runs once per backend.

use std::time::{Duration, Instant};

use crate::support::{App, Load, RedisServer, get, request};

/// Which store a test runs against; the Redis server lives as long as the backend.
enum Backend {
    Embedded,
    Redis(RedisServer),
}

impl Backend {
    fn both() -> [fn() -> Backend; 2] {
        [
            || Backend::Embedded,
            || Backend::Redis(RedisServer::start()),
        ]
    }

    /// The `[state]` table for the manifest.
    fn state(&self) -> String {
        self.state_of("app")
    }

    /// The `[state]` table of an app with its own namespace on the Redis server.
    fn state_of(&self, namespace: &str) -> String {
        match self {
            Backend::Embedded => String::new(),
            Backend::Redis(server) => {
                format!("[state]\nurl = \"{}/?namespace={namespace}\"\n", server.url)
            }
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Backend::Embedded => "embedded",
            Backend::Redis(_) => "redis",
        }
    }
}

fn post(addr: std::net::SocketAddr, path: &str) -> crate::support::Response {
    request(
        addr,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ),
    )
}

/// `(sent, duplicates, failed deliveries)` from the newsletter's `GET /sent`.
fn report(addr: std::net::SocketAddr) -> (u64, u64, u64) {
    let body = get(addr, "/sent").body;
    let words: Vec<&str> = body.split_whitespace().collect();
    assert_eq!(words.len(), 6, "{body}");
    (
        words[1].parse().unwrap(),
        words[3].parse().unwrap(),
        words[5].parse().unwrap(),
    )
}

/// `(sent, duplicates)` from the newsletter's `GET /sent`.
fn sent(addr: std::net::SocketAddr) -> (u64, u64) {
    let (sent, duplicates, _) = report(addr);
    (sent, duplicates)
}

fn wait_sent(addr: std::net::SocketAddr, n: u64, timeout: Duration) -> (u64, u64) {
    let deadline = Instant::now() + timeout;
    loop {
        let (done, duplicates) = sent(addr);
        if done >= n {
            return (done, duplicates);
        }
        assert!(
            Instant::now() < deadline,
            "only {done} of {n} sent ({duplicates} duplicates)"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn atomic_increments_from_four_instances_add_up_and_get_set_loses_updates() {
    for backend in Backend::both() {
        let backend = backend();
        let app = App::new("web: {guests}/counter.wasm\n");
        app.write(
            "wasmform.toml",
            &format!(
                "{}[processes.web]\ncount = 4\nbuckets = [\"counter\"]\n",
                backend.state()
            ),
        );
        let host = app.up(&["--no-router-log"]);
        // 32 concurrent clients, 20 000 increments over 4 instances (5 000 each).
        let load = Load::start_counted(host.addr(), "/", 32, 20_000);
        let answers = load.stop_when_done();
        assert_eq!(answers.len(), 20_000);
        assert!(answers.iter().all(|(s, _)| *s == 200), "{}", backend.name());
        assert_eq!(host.get("/value").body, "20000\n", "{}", backend.name());
        let ps = app.ps();
        for instance in ps["instances"].as_array().unwrap() {
            let served = instance["requests"].as_u64().unwrap();
            assert!(served >= 4_000, "{}: uneven spread {ps:#}", backend.name());
        }
        drop(host);

        // The same with get + set: updates are lost, which is why `increment` exists. Another
        // app, so on Redis another namespace: it starts from 0, not from the first app's count.
        let racy = App::new("web: {guests}/counter.wasm\n");
        racy.write(
            "wasmform.toml",
            &format!(
                "{}[processes.web]\ncount = 4\nbuckets = [\"counter\"]\n",
                backend.state_of("racy")
            ),
        );
        let host = racy.up(&["--no-router-log"]);
        assert_eq!(host.get("/value").body, "0\n", "{}", backend.name());
        let answers = Load::start_counted(host.addr(), "/racy", 16, 2_000).stop_when_done();
        assert_eq!(answers.len(), 2_000);
        assert!(answers.iter().all(|(s, _)| *s == 200), "{}", backend.name());
        let after: u64 = host.get("/value").body.trim().parse().unwrap();
        assert!(
            (1..2_000).contains(&after),
            "{}: get+set lost no update (0 → {after})",
            backend.name()
        );
    }
}

fn newsletter(backend: &Backend, mailer: &str) -> App {
    newsletter_in(backend, "app", mailer)
}

/// The newsletter app under `namespace` (on Redis; each app directory has its own embedded
/// store anyway).
fn newsletter_in(backend: &Backend, namespace: &str, mailer: &str) -> App {
    let app = App::new("web: {guests}/newsletter.wasm\nmailer: {guests}/mailer.wasm\n");
    app.write(
        "wasmform.toml",
        &format!(
            "{}[processes.web]\nqueues = [\"mail\"]\nbuckets = [\"newsletter\"]\n\n[processes.mailer]\nconsume = \"mail\"\nbuckets = [\"newsletter\"]\n{mailer}\n",
            backend.state_of(namespace)
        ),
    );
    app
}

#[test]
fn twenty_thousand_jobs_are_each_handled_once() {
    for backend in Backend::both() {
        let backend = backend();
        let app = newsletter(&backend, "count = 32\nenv = { MAIL_MS = 5 }\n");
        let host = app.up(&["--no-router-log"]);
        let queued = post(host.addr(), "/send?n=20000");
        assert_eq!(queued.status, 202, "{queued:?}");
        let (done, duplicates) = wait_sent(host.addr(), 20_000, Duration::from_secs(120));
        assert_eq!((done, duplicates), (20_000, 0), "{}", backend.name());
        // The last acknowledgements may still be on their way.
        wait_queue(&app, &backend, 0, 0);
        let ps = app.ps();
        assert_eq!(
            ps["queues"],
            serde_json::json!([{ "queue": "mail", "pending": 0, "dead": 0 }]),
            "{}",
            backend.name()
        );
        let mailers: u64 = ps["instances"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["type"] == "mailer")
            .map(|i| i["requests"].as_u64().unwrap())
            .sum();
        assert_eq!(mailers, 20_000, "{}", backend.name());
        assert_eq!(ps["types"][0]["kind"], "consumer");
    }
}

#[test]
fn consumers_scaled_to_zero_leave_messages_waiting_and_more_drain_them() {
    for backend in Backend::both() {
        let backend = backend();
        let app = newsletter(&backend, "count = 0\nenv = { MAIL_MS = 1 }\n");
        let host = app.up(&[]);
        assert_eq!(post(host.addr(), "/send?n=300").status, 202);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(sent(host.addr()), (0, 0));
        assert_eq!(app.ps()["queues"][0]["pending"], 300, "{}", backend.name());
        assert!(app.cli(&["scale", "mailer=3"]).ok);
        assert_eq!(
            wait_sent(host.addr(), 300, Duration::from_secs(60)),
            (300, 0),
            "{}",
            backend.name()
        );
    }
}

#[test]
fn failing_messages_are_retried_then_dead_lettered() {
    for backend in Backend::both() {
        let backend = backend();
        let app = newsletter(
            &backend,
            "count = 4\nmax_attempts = 3\nenv = { MAIL_MS = 1, FAIL_EVERY = 10 }\n",
        );
        let host = app.up(&["--no-router-log"]);
        assert_eq!(post(host.addr(), "/send?n=200").status, 202);
        let (done, duplicates) = wait_sent(host.addr(), 180, Duration::from_secs(60));
        assert_eq!((done, duplicates), (180, 0), "{}", backend.name());
        wait_queue(&app, &backend, 0, 20);
        // Each of the 20 failing messages was delivered exactly max_attempts times.
        assert_eq!(report(host.addr()).2, 60, "{}", backend.name());
        let out = host.output();
        assert_eq!(out.matches("of `mail` failed").count(), 60, "{out}");
        assert!(
            out.contains("failed: panicked") || out.contains("failed: wasm trap"),
            "{out}"
        );
        assert!(out.contains("will retry (attempt 1/3)"), "{out}");
        assert!(out.contains("dead-lettered after 3 attempts"), "{out}");
        assert_eq!(
            sent(host.addr()),
            (180, 0),
            "the failures were never counted"
        );
    }
}

/// Waits until the queue's depths are `(pending, dead)`.
fn wait_queue(app: &App, backend: &Backend, pending: u64, dead: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let queues = &app.ps()["queues"][0];
        if queues["pending"] == pending && queues["dead"] == dead {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}: expected pending {pending} dead {dead}: {queues}",
            backend.name()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn stopped_consumers_finish_their_message_instead_of_redoing_it() {
    for backend in Backend::both() {
        let backend = backend();
        // Each mail is marked sent, then takes 200 ms: a handler cut short and redone would
        // be counted as a duplicate.
        let app = newsletter(&backend, "count = 8\nenv = { MAIL_MS = 200 }\n");
        let mut host = app.up(&["--no-router-log"]);
        assert_eq!(post(host.addr(), "/send?n=48").status, 202);
        let (at_scale, _) = wait_sent(host.addr(), 8, Duration::from_secs(60));
        assert!(
            at_scale < 40,
            "{}: the drain was nearly over",
            backend.name()
        );
        // Seven of the eight are in the middle of a mail.
        let scaled = app.cli(&["scale", "mailer=1"]);
        assert!(scaled.ok, "{scaled:?}");
        let (at_restart, _) = wait_sent(host.addr(), at_scale + 8, Duration::from_secs(60));
        // A restart replaces the last one: it drains while its replacement starts.
        let restarted = app.cli(&["restart", "mailer"]);
        assert!(restarted.ok, "{restarted:?}");
        let (at_stop, _) = wait_sent(host.addr(), at_restart + 4, Duration::from_secs(60));
        assert!(at_stop < 48, "{}: the drain was over", backend.name());
        // A shutdown drains the last one the same way.
        host.signal(libc::SIGTERM);
        assert!(host.wait_exit(Duration::from_secs(30)).is_some());
        let out = host.output();
        assert!(!out.contains("could not put message"), "{out}");
        let host = app.up(&["--no-router-log"]);
        let (done, duplicates) = wait_sent(host.addr(), 48, Duration::from_secs(60));
        assert_eq!((done, duplicates), (48, 0), "{}", backend.name());
        wait_queue(&app, &backend, 0, 0);
        assert!(
            !host.output().contains("of `mail` failed"),
            "{}",
            host.output()
        );
    }
}

#[test]
fn a_stopped_consumer_whose_handler_runs_out_of_time_puts_its_message_back() {
    for backend in Backend::both() {
        let backend = backend();
        // Subscriber 5 hangs; with one attempt allowed, a timeout would dead-letter it.
        let app = newsletter(
            &backend,
            "count = 1\nmax_attempts = 1\nrequest_timeout = \"5s\"\nenv = { MAIL_MS = 1, FAIL_EVERY = 5, FAIL_MODE = \"hang\" }\n",
        );
        let host = app.up(&["--no-router-log"]);
        assert_eq!(post(host.addr(), "/send?n=5").status, 202);
        let deadline = Instant::now() + Duration::from_secs(60);
        while report(host.addr()) != (4, 0, 1) {
            assert!(Instant::now() < deadline, "{:?}", report(host.addr()));
            std::thread::sleep(Duration::from_millis(20));
        }
        // Stopped while it hangs: the handler gets its timeout, then the message goes back
        // without counting the delivery.
        assert!(app.cli(&["scale", "mailer=0"]).ok);
        let deadline = Instant::now() + Duration::from_secs(60);
        while app.ps()["instances"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["type"] == "mailer")
        {
            assert!(Instant::now() < deadline, "mailer.1 did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
        wait_queue(&app, &backend, 1, 0);
        assert!(
            !host.output().contains("of `mail` failed"),
            "{}",
            host.output()
        );
        // So its one allowed attempt is still to come.
        assert!(app.cli(&["scale", "mailer=1"]).ok);
        wait_queue(&app, &backend, 0, 1);
        assert_eq!(report(host.addr()), (4, 0, 2), "{}", backend.name());
        let out = host.output();
        assert_eq!(
            out.matches("dead-lettered after 1 attempts").count(),
            1,
            "{out}"
        );
    }
}

#[test]
fn kill_9_in_the_middle_of_a_drain_loses_nothing() {
    for backend in Backend::both() {
        let backend = backend();
        let app = newsletter(
            &backend,
            "count = 4\nrequest_timeout = \"2s\"\nenv = { MAIL_MS = 5 }\n",
        );
        let mut host = app.up(&["--no-router-log"]);
        assert_eq!(post(host.addr(), "/send?n=2000").status, 202);
        let (at_kill, _) = wait_sent(host.addr(), 200, Duration::from_secs(60));
        assert!(
            at_kill < 2_000,
            "{}: the drain was over before the kill",
            backend.name()
        );
        host.signal(libc::SIGKILL);
        host.wait_exit(Duration::from_secs(10)).unwrap();
        let host = app.up(&["--no-router-log"]);
        // A message whose mail went out but that was not acknowledged when the host died is
        // handled again, and counted as a duplicate instead of sent: at most one per consumer
        // instance.
        wait_queue(&app, &backend, 0, 0);
        let (done, duplicates) = sent(host.addr());
        assert!(
            duplicates <= 4 && done + duplicates >= 2_000,
            "{}: {done} sent, {duplicates} duplicates",
            backend.name()
        );
        wait_queue(&app, &backend, 0, 0);
    }
}

#[test]
fn handlers_that_return_err_or_hang_are_redelivered_then_dead_lettered() {
    for backend in Backend::both() {
        let backend = backend();
        for (mode, reason) in [
            ("err", "failed: mailer: refusing subscriber-"),
            ("hang", "failed: handling a message took longer than"),
        ] {
            let app = newsletter_in(
                &backend,
                mode,
                &format!(
                    "count = 2\nmax_attempts = 2\nrequest_timeout = \"2s\"\nenv = {{ MAIL_MS = 1, FAIL_EVERY = 10, FAIL_MODE = \"{mode}\" }}\n"
                ),
            );
            let host = app.up(&["--no-router-log"]);
            assert_eq!(post(host.addr(), "/send?n=20").status, 202);
            let (done, duplicates) = wait_sent(host.addr(), 18, Duration::from_secs(60));
            assert_eq!((done, duplicates), (18, 0), "{} {mode}", backend.name());
            wait_queue(&app, &backend, 0, 2);
            // Subscribers 10 and 20, twice each.
            assert_eq!(report(host.addr()), (18, 0, 4), "{} {mode}", backend.name());
            let out = host.output();
            assert_eq!(out.matches(reason).count(), 4, "{mode}: {out}");
            assert_eq!(out.matches("will retry (attempt 1/2)").count(), 2, "{out}");
            assert_eq!(
                out.matches("dead-lettered after 2 attempts").count(),
                2,
                "{out}"
            );
        }
    }
}

#[test]
fn keyvalue_cas_batches_list_keys_and_counter_errors() {
    for backend in Backend::both() {
        let backend = backend();
        let app = App::new("web: {guests}/counter.wasm\n");
        app.write(
            "wasmform.toml",
            &format!(
                "{}[processes.web]\nbuckets = [\"counter\"]\n",
                backend.state()
            ),
        );
        let host = app.up(&["--no-router-log"]);
        let ask = |path: &str| {
            let answer = host.get(path);
            (answer.status, answer.body)
        };
        let ok = |body: &str| (200, format!("{body}\n"));
        let name = backend.name();

        assert_eq!(ask("/cas?key=c&expected=-&new=1"), ok("swapped"), "{name}");
        assert_eq!(
            ask("/cas?key=c&expected=-&new=2"),
            ok("unchanged"),
            "{name}"
        );
        assert_eq!(
            ask("/cas?key=c&expected=2&new=3"),
            ok("unchanged"),
            "{name}"
        );
        assert_eq!(ask("/cas?key=c&expected=1&new=3"), ok("swapped"), "{name}");
        assert_eq!(ask("/get?key=c"), ok("3"), "{name}");

        assert_eq!(ask("/set-many?a=1&b=2&d=4"), ok("ok"), "{name}");
        assert_eq!(
            ask("/get-many?keys=a,b,x,d"),
            ok("a=1 b=2 x=- d=4"),
            "{name}"
        );
        assert_eq!(ask("/delete-many?keys=a,x,d"), ok("ok"), "{name}");
        assert_eq!(ask("/get-many?keys=a,b,d"), ok("a=- b=2 d=-"), "{name}");
        assert_eq!(
            ask("/keys"),
            ok("2 keys, first b, last c, in 1 pages"),
            "{name}"
        );
        // Past one page (1000 keys): the cursor brings the rest.
        let many: Vec<String> = (0..1005).map(|i| format!("k{i:04}=v")).collect();
        assert_eq!(
            ask(&format!("/set-many?{}", many.join("&"))),
            ok("ok"),
            "{name}"
        );
        assert_eq!(
            ask("/keys"),
            ok("1007 keys, first b, last k1004, in 2 pages"),
            "{name}"
        );

        assert_eq!(ask("/set?n=007"), ok("ok"), "{name}");
        assert_eq!(ask("/incr?key=n&by=3"), ok("10"), "{name}");
        // Leading zeros are not significant digits, on either backend.
        assert_eq!(
            ask("/set?z=0000000000000000000000000005"),
            ok("ok"),
            "{name}"
        );
        assert_eq!(ask("/incr?key=z&by=1"), ok("6"), "{name}");
        assert_eq!(ask("/set?t=ten"), ok("ok"), "{name}");
        let not_a_number = (
            500,
            "store error: Error::Other(\"cannot increment `t`: its value is not a decimal number up to 2^53-1\")\n".to_string(),
        );
        assert_eq!(ask("/incr?key=t&by=1"), not_a_number, "{name}");
        assert_eq!(ask("/get?key=t"), ok("ten"), "{name}: left alone");
        assert_eq!(
            ask("/incr?key=m&by=9007199254740990"),
            ok("9007199254740990"),
            "{name}"
        );
        assert_eq!(ask("/incr?key=m&by=1"), ok("9007199254740991"), "{name}");
        let overflow = (
            500,
            "store error: Error::Other(\"cannot increment `m`: the value would pass 2^53-1\")\n"
                .to_string(),
        );
        assert_eq!(ask("/incr?key=m&by=1"), overflow, "{name}");
        assert_eq!(
            ask("/incr?key=o&by=9007199254740992"),
            {
                let mut o = overflow.clone();
                o.1 = o.1.replace("`m`", "`o`");
                o
            },
            "{name}"
        );
        assert_eq!(
            ask("/get?key=m"),
            ok("9007199254740991"),
            "{name}: left alone"
        );
    }
}

#[test]
fn buckets_and_queues_are_denied_unless_listed() {
    let app = App::new("web: {guests}/counter.wasm\nnews: {guests}/newsletter.wasm\n");
    app.write(
        "wasmform.toml",
        "[processes.web]\nbuckets = [\"other\"]\n\n[[services]]\nlisten = \"127.0.0.1:0\"\nprocesses = [\"news\"]\n",
    );
    let host = app.up(&[]);
    let denied = host.get("/");
    assert_eq!(denied.status, 500);
    assert_eq!(denied.body, "store error: Error::AccessDenied\n");
    let news = host.logged_addr("service `news` serving");
    let denied = post(news, "/send?n=1");
    assert_eq!(denied.body, "enqueue failed: Error::AccessDenied\n");
    // The log says what to add, once per type and name.
    let bucket_hint = "process type `web` was denied bucket `counter`, which its entry in wasmform.toml does not list: add `buckets = [\"other\", \"counter\"]` under [processes.web]";
    host.wait_for(bucket_hint, Duration::from_secs(10));
    host.wait_for(
        "process type `news` was denied queue `mail`, which its entry in wasmform.toml does not list: add `queues = [\"mail\"]` under [processes.news]",
        Duration::from_secs(10),
    );
    assert_eq!(host.get("/").status, 500);
    assert_eq!(host.get("/value").status, 500);
    // The router's line for the last request comes after anything its guest call logged.
    let out = host.wait_for("path=\"/value\"", Duration::from_secs(10));
    assert_eq!(out.matches(bucket_hint).count(), 1, "{out}");

    // A consumer must name its queue; `consume` on anything else is refused.
    let app = App::new("mailer: {guests}/mailer.wasm\n");
    let out = app.up_fails(&[]);
    assert!(out.contains("is a queue consumer"), "{out}");
    assert!(out.contains("add `consume = \"jobs\"`"), "{out}");
    let app = App::new("web: {guests}/hello.wasm\n");
    app.write("wasmform.toml", "[processes.web]\nconsume = \"mail\"\n");
    let out = app.up_fails(&[]);
    assert!(out.contains("`consume` needs a queue consumer"), "{out}");
    app.write("wasmform.toml", "[processes.web]\nbuckets = [\"a b\"]\n");
    let out = app.up_fails(&[]);
    assert!(
        out.contains("processes.web.buckets: `a b`: character ` ` is not allowed"),
        "{out}"
    );
    // A Redis store is shared by apps: each names its own namespace.
    app.write("wasmform.toml", "[state]\nurl = \"redis://127.0.0.1:1\"\n");
    let out = app.up_fails(&[]);
    assert!(
        out.contains("state.url `redis://127.0.0.1:1` names no namespace: add `?namespace=NAME`"),
        "{out}"
    );
    app.write(
        "wasmform.toml",
        "[state]\nurl = \"redis://127.0.0.1:1/?namespace=a:b\"\n",
    );
    let out = app.up_fails(&[]);
    assert!(
        out.contains("namespace `a:b` must be 1-128 of A-Z a-z 0-9 _ . -"),
        "{out}"
    );
    app.write("wasmform.toml", "[state]\nurl = \"postgres://x\"\n");
    let out = app.up_fails(&[]);
    assert!(
        out.contains("state.url: `postgres://x` is not supported"),
        "{out}"
    );
}

/// A Redis server that goes away fails the calls that need it fast, leaves what does not need
/// it serving, and is used again once it is back.
#[test]
fn a_redis_store_that_goes_away_fails_fast_and_comes_back() {
    let server = crate::tools::Redis::start();
    let port = server.port;
    let app = App::new("web: {guests}/counter.wasm\nhello: {guests}/hello.wasm\n");
    app.write(
        "wasmform.toml",
        &format!(
            "[state]\nurl = \"redis://127.0.0.1:{port}/?namespace=gone\"\n[processes.web]\nbuckets = [\"counter\"]\n\n[[services]]\nlisten = \"127.0.0.1:0\"\nprocesses = [\"hello\"]\n"
        ),
    );
    let host = app.up(&[]);
    let hello = host.logged_addr("service `hello` serving");
    assert_eq!(host.get("/").body, "1\n");
    drop(server);
    for _ in 0..3 {
        let started = Instant::now();
        let response = host.get("/");
        assert_eq!(response.status, 500, "{response:?}");
        // redis-rs's default reconnection held each call ~9 s.
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(get(hello, "/").status, 200);
    }
    // `ps` and the metrics say so.
    let store = app.ps()["store"].clone();
    assert_eq!(store["reachable"], false, "{store}");
    assert!(
        store["error"].as_str().unwrap().starts_with("redis: "),
        "{store}"
    );
    assert!(store["since"].as_f64().is_some(), "{store}");
    let out = app.cli(&["ps"]);
    assert!(
        out.stdout.contains(&format!(
            "shared state: redis (redis://127.0.0.1:{port}/?namespace=gone) cannot be reached"
        )),
        "{}",
        out.stdout
    );
    assert!(
        app.control_get("/metrics")
            .contains("wasmform_state_store_up 0")
    );
    // Back on the same port: the next calls reconnect by themselves (an empty server now).
    let _server = crate::tools::Redis::start_on(port);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let response = host.get("/");
        if response.status == 200 {
            assert_eq!(response.body, "1\n");
            break;
        }
        assert!(Instant::now() < deadline, "{response:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(app.ps()["store"]["reachable"], true);
    assert!(
        app.control_get("/metrics")
            .contains("wasmform_state_store_up 1")
    );
}
