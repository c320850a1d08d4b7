//! wasmform as a library in another crate's `#[tokio::test]`: start, scale, assert, shut down,
//! in process (README, "Embedding").

use std::time::Duration;

use wasmform::{AppSpec, Host, HostOptions};

use crate::support::{App, get};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_formation_runs_in_process_in_a_tokio_test() {
    let app = App::new("web: {guests}/hello.wasm\n");
    let spec = AppSpec::from_procfile(&app.procfile()).unwrap();
    let options = HostOptions {
        log_requests: false,
        ..HostOptions::default()
    };
    // Compiling is blocking work.
    let host = tokio::task::spawn_blocking(move || Host::new(spec, options))
        .await
        .unwrap()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running = host.start(listener).await.unwrap();
    let addr = running.local_addr();
    assert_eq!(running.running()["web"], 1);

    let formation = running.scale(&["web=3"]).await.unwrap();
    assert_eq!(formation.to_string(), "web=3");
    assert_eq!(running.running()["web"], 3);
    // The test's own requests, on a blocking thread (the helper is synchronous).
    let bodies = tokio::task::spawn_blocking(move || {
        (0..9).map(|_| get(addr, "/").body).collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for n in 1..=3 {
        assert!(
            bodies
                .iter()
                .any(|b| b.starts_with(&format!("hello from web.{n}"))),
            "round-robin over web.1..3: {bodies:?}"
        );
    }
    let refused = running.scale(&["web=lots"]).await.unwrap_err();
    assert!(
        refused.to_string().contains("`lots` for `web`"),
        "{refused}"
    );
    assert_eq!(
        running.running()["web"],
        3,
        "a refused change changes nothing"
    );
    running.shutdown(Duration::from_secs(5)).await;
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "nothing listens after shutdown"
    );
}
