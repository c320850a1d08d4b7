//! `up --cluster`: real etcd, several real `wasmform up` nodes of one app on loopback.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::support::{App, Wasmform};
use crate::tools::Etcd;

/// One node of the app's cluster, with a state directory of its own.
struct Node {
    name: String,
    state: PathBuf,
    host: Wasmform,
}

fn join(app: &App, etcd: &Etcd, name: &str, extra: &[&str]) -> Node {
    let state = app.path(&format!("state-{name}"));
    let url = etcd.url();
    let mut args = vec![
        "--cluster",
        &url,
        "--node",
        name,
        "--app",
        "shop",
        "--lease-ttl",
        "2s",
        "--state-dir",
        state.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let host = app.up(&args);
    Node {
        name: name.to_string(),
        state,
        host,
    }
}

impl Node {
    /// A client command against this node.
    fn cli(&self, app: &App, args: &[&str]) -> crate::support::Cli {
        let mut all = args.to_vec();
        all.extend(["--state-dir", self.state.to_str().unwrap()]);
        app.cli(&all)
    }

    /// `ps --cluster --json` through this node.
    fn cluster_ps(&self, app: &App) -> serde_json::Value {
        let out = self.cli(app, &["ps", "--cluster", "--json"]);
        assert!(out.ok, "ps --cluster failed: {}", out.stderr);
        serde_json::from_str(&out.stdout).unwrap()
    }
}

/// Instance id → nodes that report it up.
fn up_instances(ps: &serde_json::Value) -> BTreeMap<String, Vec<String>> {
    let mut up: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for i in ps["instances"].as_array().unwrap() {
        if i["state"] == "up" {
            up.entry(i["id"].as_str().unwrap().to_string())
                .or_default()
                .push(i["node"].as_str().unwrap().to_string());
        }
    }
    up
}

/// Polls `ps --cluster` through `node` until `done` holds; every sample must pass `always`.
fn until(
    app: &App,
    node: &Node,
    timeout: Duration,
    always: impl Fn(&serde_json::Value),
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let ps = node.cluster_ps(app);
        always(&ps);
        if done(&ps) {
            return ps;
        }
        assert!(
            Instant::now() < deadline,
            "the cluster did not settle: {ps:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// No instance id is up on two nodes at once.
fn never_twice(ps: &serde_json::Value) {
    for (id, nodes) in up_instances(ps) {
        assert!(nodes.len() == 1, "{id} is up on {nodes:?}: {ps:#}");
    }
}

/// Each of `names` runs `per_node` of `ids` up, and nothing else runs.
fn spread(ps: &serde_json::Value, ids: &[String], names: &[&str], per_node: usize) -> bool {
    let up = up_instances(ps);
    let all: BTreeSet<&String> = up.keys().collect();
    let want: BTreeSet<&String> = ids.iter().collect();
    all == want
        && names
            .iter()
            .all(|n| up.values().filter(|nodes| nodes[0] == *n).count() == per_node)
}

fn ids(process: &str, count: u32) -> Vec<String> {
    (1..=count).map(|i| format!("{process}.{i}")).collect()
}

#[test]
fn a_cluster_formation_spreads_over_its_nodes_and_scales_from_any_node() {
    let etcd = Etcd::start();
    let app = App::new("web: {guests}/test_web.wasm\n");
    let n1 = join(&app, &etcd, "n1", &["-m", "web=3"]);
    // The first node's formation is the cluster's; it runs all of it alone.
    let ps = until(&app, &n1, Duration::from_secs(30), never_twice, |ps| {
        spread(ps, &ids("web", 3), &["n1"], 3)
    });
    assert_eq!(ps["formation"]["web"]["count"], 3, "{ps:#}");
    // Joining nodes take the cluster's formation (not their own `-m`) and get their share by
    // the first one giving slots back, never two instances of a slot at once.
    let n2 = join(&app, &etcd, "n2", &["-m", "web=1"]);
    let n3 = join(&app, &etcd, "n3", &[]);
    until(&app, &n2, Duration::from_secs(30), never_twice, |ps| {
        spread(ps, &ids("web", 3), &["n1", "n2", "n3"], 1)
    });
    // A scale through any node changes the formation of all.
    let out = n3.cli(&app, &["scale", "web=6"]);
    assert!(out.ok, "{out:?}");
    let ps = until(&app, &n1, Duration::from_secs(30), never_twice, |ps| {
        spread(ps, &ids("web", 6), &["n1", "n2", "n3"], 2)
    });
    // Every node's front door serves with its own instances.
    let up = up_instances(&ps);
    for node in [&n1, &n2, &n3] {
        let body = node.host.get("/whoami").body;
        let id = body.trim();
        assert_eq!(
            up[id].as_slice(),
            std::slice::from_ref(&node.name),
            "{} answered from {id}",
            node.name
        );
        // Its own `ps` shows its share only, each instance with the fencing token of its
        // claim in its environment.
        let local = node.cli(&app, &["ps", "--json"]);
        let local: serde_json::Value = serde_json::from_str(&local.stdout).unwrap();
        assert_eq!(local["instances"].as_array().unwrap().len(), 2, "{local:#}");
        let fence = node.host.get("/env?name=WASMFORM_FENCE").body;
        assert!(fence.trim().parse::<u64>().is_ok_and(|f| f > 0), "{fence}");
        assert_eq!(
            node.host.get("/env?name=WASMFORM_NODE").body.trim(),
            node.name
        );
    }
    // Scaling down removes the highest slots cluster-wide.
    let out = n2.cli(&app, &["scale", "web=2"]);
    assert!(out.ok, "{out:?}");
    until(&app, &n1, Duration::from_secs(30), never_twice, |ps| {
        up_instances(ps).keys().cloned().collect::<Vec<_>>() == ids("web", 2)
    });
}

#[test]
fn a_killed_nodes_instances_come_back_on_the_others_and_a_singleton_never_runs_twice() {
    let etcd = Etcd::start();
    let app = App::new("web: {guests}/test_web.wasm\nclock: {guests}/ticker.wasm 100\n");
    app.write("wasmform.toml", "[processes.clock]\nsingleton = true\n");
    let mut nodes: Vec<Node> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| join(&app, &etcd, n, &["-m", "web=6,clock=1"]))
        .collect();
    let all = |ps: &serde_json::Value| {
        let up = up_instances(ps);
        ids("web", 6).iter().all(|id| up.contains_key(id)) && up.contains_key("clock.1")
    };
    let ps = until(&app, &nodes[0], Duration::from_secs(30), never_twice, all);
    // Kill the clock's node: its lease expires, the survivors take its slots.
    let holder = up_instances(&ps)["clock.1"][0].clone();
    let at = nodes.iter().position(|n| n.name == holder).unwrap();
    let killed = nodes.remove(at);
    killed.host.signal(libc::SIGKILL);
    let started = Instant::now();
    let ps = until(
        &app,
        &nodes[0],
        Duration::from_secs(30),
        never_twice,
        |ps| {
            let up = up_instances(ps);
            all(ps) && up.values().all(|n| n[0] != holder)
        },
    );
    eprintln!(
        "a killed node's instances ran elsewhere after {:?} (lease TTL 2s)",
        started.elapsed()
    );
    assert_eq!(ps["nodes"].as_array().unwrap().len(), 2, "{ps:#}");
    // The clock runs on one survivor; the other never started it.
    let clock_node = &up_instances(&ps)["clock.1"][0];
    for node in &nodes {
        let ticks = node.host.output().contains("clock.1 | tick");
        assert_eq!(
            ticks,
            node.name == *clock_node,
            "{}: {}",
            node.name,
            node.host.output()
        );
    }
    drop(killed);
}

#[test]
fn without_etcd_a_node_keeps_serving_and_stops_its_singleton_by_itself() {
    let mut etcd = Etcd::start();
    let app = App::new("web: {guests}/test_web.wasm\nclock: {guests}/ticker.wasm 100\n");
    app.write("wasmform.toml", "[processes.clock]\nsingleton = true\n");
    let node = join(
        &app,
        &etcd,
        "n1",
        &["-m", "web=2,clock=1", "--health", "127.0.0.1:0"],
    );
    until(&app, &node, Duration::from_secs(30), never_twice, |ps| {
        up_instances(ps).len() == 3
    });
    let health = node.host.logged_addr("health check on");
    assert_eq!(crate::support::get(health, "/health").status, 200);
    etcd.kill();
    // Before its lease can have expired, the node stops its clock (another node could get
    // it then); its web instances go on serving.
    node.host.wait_for(
        "stopping this node's singletons before etcd can give them to another node",
        Duration::from_secs(10),
    );
    node.host.wait_for(
        "claiming nothing new until etcd answers",
        Duration::from_secs(10),
    );
    assert_eq!(node.host.get("/").status, 200);
    let ps = node.cli(&app, &["ps", "--json"]);
    let ps: serde_json::Value = serde_json::from_str(&ps.stdout).unwrap();
    let states: BTreeMap<&str, &str> = ps["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["id"].as_str().unwrap(), i["state"].as_str().unwrap()))
        .collect();
    assert_eq!(states.get("web.1"), Some(&"up"), "{ps:#}");
    assert!(
        !states.contains_key("clock.1") || states["clock.1"] == "pending",
        "{ps:#}"
    );
    // etcd back: the node reconciles and runs its clock again.
    etcd.resume();
    node.host
        .wait_for("etcd answers again", Duration::from_secs(20));
    until(&app, &node, Duration::from_secs(30), never_twice, |ps| {
        up_instances(ps).contains_key("clock.1")
    });
    assert_eq!(crate::support::get(health, "/health").status, 200);
}

#[test]
fn cluster_mistakes_are_refused_with_what_to_do() {
    let etcd = Etcd::start();
    let app = App::new("web: {guests}/test_web.wasm\n");
    let _n1 = join(&app, &etcd, "n1", &[]);
    // The same node name twice.
    let state = app.path("state-again");
    let url = etcd.url();
    let cluster = [
        "--cluster",
        &url,
        "--app",
        "shop",
        "--state-dir",
        state.to_str().unwrap(),
    ];
    let err = app.up_fails(&[&cluster[..], &["--node", "n1"]].concat());
    assert!(
        err.contains("--node `n1`: a live node of cluster `shop` already has this name")
            && err.contains("give each node its own `--node NAME`"),
        "{err}"
    );
    // No etcd at the address.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let nowhere = format!("etcd://127.0.0.1:{port}");
    let err = app.up_fails(&[
        "--cluster",
        &nowhere,
        "--node",
        "n9",
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert!(
        err.contains(&format!(
            "--cluster: cannot reach etcd at http://127.0.0.1:{port}"
        )) && err.contains("start etcd, or fix the address"),
        "{err}"
    );
    // Bad values.
    let err = app.up_fails(&["--cluster", "127.0.0.1:2379", "--node", "n9"]);
    assert!(
        err.contains("give etcd's client address as `etcd://HOST:PORT"),
        "{err}"
    );
    let err = app.up_fails(&[&cluster[..], &["--node", "n/9"]].concat());
    assert!(err.contains("--node `n/9`: use 1 to 63 letters"), "{err}");
    let err = app.up_fails(&[&cluster[..], &["--node", "n9", "--lease-ttl", "1s"]].concat());
    assert!(
        err.contains("invalid lease TTL `1s`: etcd grants whole seconds, at least 2s"),
        "{err}"
    );
    // Shared state that would be one node's alone.
    let shared = App::new("web: {guests}/counter.wasm\n");
    shared.write(
        "wasmform.toml",
        "[processes.web]\nbuckets = [\"counter\"]\n",
    );
    let err = shared.up_fails(&["--cluster", &url, "--node", "n9"]);
    assert!(
        err.contains("--cluster: `web` (")
            && err.contains("uses buckets or queues, and the embedded store is one node's alone")
            && err.contains("[state] url = \"redis://HOST:PORT\""),
        "{err}"
    );
}
