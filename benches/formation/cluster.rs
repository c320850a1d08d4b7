//! The cluster on etcd (`cargo bench --features cluster -- cluster`): time to place 300
//! instances over 3 nodes, and time until a SIGKILLed node's instances run on the others,
//! beside the anchors' published defaults.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::{Host, ms, scale_at};
use crate::tools::Etcd;

/// Fresh clusters whose placement and recovery are measured (the median is printed).
const ROUNDS: usize = 3;
const INSTANCES: usize = 300;

/// `ps --cluster --json` through the node whose state directory is `state`: up instances per
/// node.
fn up_per_node(state: &Path) -> std::collections::BTreeMap<String, usize> {
    let output = Command::new(env!("CARGO_BIN_EXE_wasmform"))
        .args(["ps", "--cluster", "--json", "--state-dir"])
        .arg(state)
        .output()
        .unwrap();
    let ps: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
    let mut per = std::collections::BTreeMap::new();
    for i in ps["instances"].as_array().into_iter().flatten() {
        if i["state"] == "up" {
            *per.entry(i["node"].as_str().unwrap_or("?").to_string())
                .or_default() += 1;
        }
    }
    per
}

/// Polls until `done` holds (bounded); how long it took.
fn until(
    state: &Path,
    done: impl Fn(&std::collections::BTreeMap<String, usize>) -> bool,
) -> Duration {
    let started = Instant::now();
    while !done(&up_per_node(state)) {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the cluster did not settle"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    started.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

pub fn rows(procfile: &Path) {
    println!(
        "## cluster on etcd: 3 nodes of `wasmform up --cluster` (lease TTL 5 s, the default), hello, median of {ROUNDS} fresh clusters"
    );
    let dir = tempfile::tempdir().unwrap();
    let mut place = Vec::new();
    let mut recover = Vec::new();
    for round in 0..ROUNDS {
        let etcd = Etcd::start();
        let url = etcd.url();
        let states: Vec<_> = (1..=3)
            .map(|n| dir.path().join(format!("r{round}-n{n}")))
            .collect();
        let mut nodes: Vec<Host> = states
            .iter()
            .enumerate()
            .map(|(i, state)| {
                let name = format!("n{}", i + 1);
                Host::start(
                    procfile,
                    &[
                        "-m",
                        "web=0",
                        "--no-router-log",
                        "--cluster",
                        &url,
                        "--node",
                        &name,
                        "--app",
                        "bench",
                        "--state-dir",
                        state.to_str().unwrap(),
                    ],
                )
            })
            .collect();
        let started = Instant::now();
        scale_at("--state-dir", &states[0], &format!("web={INSTANCES}"));
        until(&states[0], |per| {
            per.len() == 3 && per.values().sum::<usize>() == INSTANCES
        });
        place.push(started.elapsed());
        let mut killed = nodes.pop().unwrap();
        let _ = killed.child.kill();
        let started = Instant::now();
        until(&states[0], |per| {
            !per.contains_key("n3") && per.values().sum::<usize>() == INSTANCES
        });
        recover.push(started.elapsed());
        drop(killed);
        drop(nodes);
    }
    println!(
        "{:<52} {:>12}",
        format!("place {INSTANCES} instances over 3 nodes (scale → all up)"),
        ms(median(place))
    );
    println!(
        "{:<52} {:>12}   (lease TTL 5 s; bound: TTL + a 250 ms round + start)",
        "a SIGKILLed node's instances up on the others",
        ms(median(recover))
    );
    println!(
        "{:<52} {:>12}",
        "  Kubernetes default (50 s grace + 300 s toleration)", "~350 s"
    );
    println!("{:<52} {:>12}", "  wasmCloud wadm", "~70 s");
    println!("{:<52} {:>12}", "  Nomad", "~20 s");
    println!("{:<52} {:>12}", "  Fly Machines", "never");
}
