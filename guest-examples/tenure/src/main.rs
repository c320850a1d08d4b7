//! `tenure`: a clock that records its own tenure in the shared store, so a test can prove
//! that two instances of a singleton never ran at once, whichever node they ran on.
//!
//! At start it takes the next tenure number (`increment("tenures")` in bucket `clock`), then
//! every 20 ms writes `tenure-N` = `NODE FENCE START_MS LAST_MS` (wall-clock milliseconds;
//! `NODE` and `FENCE` from `WASMFORM_NODE` and `WASMFORM_FENCE`, `-` outside a cluster). A
//! write that fails (the store unreachable) is retried on the next beat.
//!
//! The type must list the bucket: `buckets = ["clock"]` in wasmform.toml.

wit_bindgen::generate!({
    path: "../../wit",
    world: "wasmform:host/shared-state",
    generate_all,
});

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use wasi::keyvalue::{atomics, store};

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

fn main() {
    let bucket = store::open("clock").expect("bucket `clock` (list it in `buckets`)");
    let tenure = loop {
        match atomics::increment(&bucket, "tenures", 1) {
            Ok(n) => break n,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| "-".into());
    let (node, fence) = (var("WASMFORM_NODE"), var("WASMFORM_FENCE"));
    let start = now_ms();
    println!("tenure {tenure} on {node} (fence {fence})");
    loop {
        let record = format!("{node} {fence} {start} {}", now_ms());
        let _ = bucket.set(&format!("tenure-{tenure}"), record.as_bytes());
        std::thread::sleep(Duration::from_millis(20));
    }
}
