//! Queue drain: a fan-out of jobs handled by 1 to 8 consumers, on the embedded store and Redis.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::harness::{Host, http, ms};
use crate::tools;

/// Drain time of a fan-out: `newsletter` enqueues the jobs in one call, `mailer` consumers
/// "send" each (5 ms of simulated I/O) and count it in the shared store. With 1, 2, 4 and 8
/// consumer instances, on the embedded store and,
/// on a Redis server of the harness's own (`redis-server` from PATH, or installed as the tests do).
/// `WASMFORM_BENCH_JOBS` sets the number of jobs (default 2000; the 20 000 take about
/// four minutes on the embedded store alone).
pub fn rows(guests: &Path) {
    let jobs: u32 = std::env::var("WASMFORM_BENCH_JOBS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2000);
    println!();
    println!("## queue drain: {jobs} jobs of 5 ms simulated I/O each (POST → all counted)");
    println!(
        "{:<34} {:>12} {:>12} {:>10}",
        "consumers", "drain", "jobs/s", "speed-up"
    );
    let redis = Redis::start();
    let backends = [
        ("embedded", String::new()),
        (
            "redis",
            format!("[state]\nurl = \"{}/?namespace=bench\"\n", redis.url),
        ),
    ];
    for (backend, state) in &backends {
        let mut first = None;
        for consumers in [1u32, 2, 4, 8] {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(
                dir.path().join("Procfile"),
                format!(
                    "web: {}\nmailer: {}\n",
                    guests.join("newsletter.wasm").display(),
                    guests.join("mailer.wasm").display()
                ),
            )
            .unwrap();
            std::fs::write(
                dir.path().join("wasmform.toml"),
                format!(
                    "{state}[processes.web]\nqueues = [\"mail\"]\nbuckets = [\"newsletter\"]\n\n\
                     [processes.mailer]\nconsume = \"mail\"\nbuckets = [\"newsletter\"]\n\
                     count = {consumers}\nenv = {{ MAIL_MS = 5 }}\n"
                ),
            )
            .unwrap();
            // Each row starts from an empty namespace.
            redis.flush();
            let host = Host::start(&dir.path().join("Procfile"), &[]);
            let started = Instant::now();
            let (status, _) = http(host.port, "POST", &format!("/send?n={jobs}"));
            assert_eq!(status, 202);
            let deadline = started + Duration::from_secs(600);
            loop {
                let (_, body) = http(host.port, "GET", "/sent");
                // `sent 2000 duplicates 0 …` (inside chunked framing).
                let sent: u32 = body
                    .split_whitespace()
                    .skip_while(|w| *w != "sent")
                    .nth(1)
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                if sent >= jobs {
                    break;
                }
                assert!(Instant::now() < deadline, "the queue did not drain");
                std::thread::sleep(Duration::from_millis(10));
            }
            let took = started.elapsed();
            let first = *first.get_or_insert(took);
            println!(
                "{:<34} {:>12} {:>12.0} {:>9.1}×",
                format!("mailer={consumers}, {backend}"),
                ms(took),
                f64::from(jobs) / took.as_secs_f64(),
                first.as_secs_f64() / took.as_secs_f64()
            );
        }
    }
}

/// A `redis-server` of the harness's own on a free loopback port, without persistence.
struct Redis {
    server: tools::Redis,
    url: String,
}

impl Redis {
    fn start() -> Self {
        let server = tools::Redis::start();
        let url = format!("redis://127.0.0.1:{}", server.port);
        Self { server, url }
    }

    fn flush(&self) {
        use std::io::{Read as _, Write as _};
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", self.server.port)).unwrap();
        conn.write_all(b"FLUSHALL\r\n").unwrap();
        let mut reply = [0u8; 5];
        conn.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"+OK\r\n");
    }
}
