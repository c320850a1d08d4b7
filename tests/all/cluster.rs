//! `up --cluster`: real etcd, several real `wasmform up` nodes of one app on loopback.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::support::{App, Wasmform};
use crate::tools::{Etcd, Netns};

/// One node of the app's cluster, with a state directory of its own.
struct Node {
    name: String,
    state: PathBuf,
    host: Wasmform,
}

fn join(app: &App, etcd: &Etcd, name: &str, extra: &[&str]) -> Node {
    join_at(app, &etcd.url(), "2s", name, extra)
}

/// A node joining the cluster at `url` with lease TTL `ttl`.
fn join_at(app: &App, url: &str, ttl: &str, name: &str, extra: &[&str]) -> Node {
    let state = app.path(&format!("state-{name}"));
    let mut args = vec![
        "--cluster",
        url,
        "--node",
        name,
        "--app",
        "shop",
        "--lease-ttl",
        ttl,
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

    /// `ps --cluster --json`, or `None` while etcd cannot answer (an election).
    fn try_cluster_ps(&self, app: &App) -> Option<serde_json::Value> {
        let out = self.cli(app, &["ps", "--cluster", "--json"]);
        if !out.ok {
            assert!(
                out.stderr.contains("the cluster's state cannot be read"),
                "{}",
                out.stderr
            );
            return None;
        }
        Some(serde_json::from_str(&out.stdout).unwrap())
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
        let Some(ps) = node.try_cluster_ps(app) else {
            assert!(Instant::now() < deadline, "etcd did not answer again");
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
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
fn killing_the_etcd_leader_during_a_scale_runs_no_slot_twice() {
    let mut members = Etcd::cluster(3);
    let url = Etcd::url_of(&members);
    let app = App::new("web: {guests}/test_web.wasm\n");
    let nodes: Vec<Node> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| join_at(&app, &url, "5s", n, &["-m", "web=6"]))
        .collect();
    until(
        &app,
        &nodes[0],
        Duration::from_secs(30),
        never_twice,
        |ps| spread(ps, &ids("web", 6), &["n1", "n2", "n3"], 2),
    );
    let scale = nodes[1].cli(&app, &["scale", "web=12"]);
    assert!(scale.ok, "{scale:?}");
    let leader = members.iter().position(Etcd::is_leader).expect("a leader");
    members[leader].kill();
    // The two others elect a leader; the nodes reach them and finish the scale, and no
    // sample ever shows a slot on two nodes.
    until(
        &app,
        &nodes[0],
        Duration::from_secs(60),
        never_twice,
        |ps| spread(ps, &ids("web", 12), &["n1", "n2", "n3"], 4),
    );
}

/// Node `name` of `app`'s cluster inside `netns`, reaching etcd over the namespace's first
/// veth pair; started with formation `formation` (lease TTL 2 s).
fn in_netns(netns: &Netns, etcd: &Etcd, app: &App, name: &str, formation: &str) -> Wasmform {
    let state = app.path(&format!("state-{name}"));
    let url = format!("etcd://{}:{}", netns.host_ips[0], etcd.port);
    let procfile = app.procfile();
    Wasmform::spawn_in_netns(
        &netns.name,
        &[
            "up",
            "-f",
            procfile.to_str().unwrap(),
            "-p",
            "0",
            "-m",
            formation,
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
        ],
    )
}

/// How many clock ticks a node's log holds.
fn ticks(host: &Wasmform) -> usize {
    host.output().matches("clock.1 | tick").count()
}

#[test]
fn a_partitioned_clock_stops_before_the_other_side_starts_it() {
    let netns = Netns::new(1);
    let etcd = Etcd::start_also_on(&netns.host_ips[0]);
    let app = App::new("web: {guests}/test_web.wasm\nclock: {guests}/ticker.wasm 50\n");
    app.write("wasmform.toml", "[processes.clock]\nsingleton = true\n");
    // Node a runs in the namespace and reaches etcd over the veth pair; it starts first, so
    // the clock is its.
    let mut a = in_netns(&netns, &etcd, &app, "a", "web=1,clock=1");
    a.wait_listening();
    a.wait_for("clock.1 | tick 1", Duration::from_secs(30));
    let b = join(&app, &etcd, "b", &[]);
    let ps = until(&app, &b, Duration::from_secs(30), never_twice, |ps| {
        up_instances(ps).len() == 2
    });
    assert_eq!(up_instances(&ps)["clock.1"], ["a"], "{ps:#}");
    // Cut a off. Its clock must stop by itself before b can start one: sample both logs.
    netns.attach(0, false);
    let cut = Instant::now();
    let (mut last_a, mut seen_a, mut first_b) = (cut, ticks(&a), None);
    while first_b.is_none_or(|t: Instant| t.elapsed() < Duration::from_secs(1)) {
        assert!(
            cut.elapsed() < Duration::from_secs(20),
            "b never ran the clock:\n{}",
            b.host.output()
        );
        let now_a = ticks(&a);
        if now_a > seen_a {
            (seen_a, last_a) = (now_a, Instant::now());
        }
        if first_b.is_none() && ticks(&b.host) > 0 {
            first_b = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let first_b = first_b.unwrap();
    assert!(
        last_a < first_b,
        "a ticked {:?} after the cut, b from {:?}",
        last_a - cut,
        first_b - cut
    );
    eprintln!(
        "partition: a's last tick {:?} after the cut, b's first {:?} (gap {:?})",
        last_a - cut,
        first_b - cut,
        first_b - last_a
    );
    a.wait_for("stopping this node's singletons", Duration::from_secs(1));
    // Healed: a joins again, finds the clock held by b, and never runs it again.
    netns.attach(0, true);
    let rejoined = a.wait_until(Duration::from_secs(20), |out| {
        out.contains("joined again with a new lease")
    });
    assert!(rejoined.is_some(), "a did not join again:\n{}", a.output());
    let after = ticks(&a);
    until(&app, &b, Duration::from_secs(30), never_twice, |ps| {
        let up = up_instances(ps);
        up.get("clock.1").is_some_and(|n| n == &["b"]) && up.len() == 2
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(ticks(&a), after, "a ran the clock again:\n{}", a.output());
}

/// `HGETALL key` on the Redis at 127.0.0.1:`port`, over RESP.
fn hgetall(port: u16, key: &str) -> BTreeMap<String, String> {
    use std::io::{BufRead as _, BufReader, Read as _, Write as _};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(conn, "*2\r\n$7\r\nHGETALL\r\n${}\r\n{key}\r\n", key.len()).unwrap();
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let n: usize = line.trim().strip_prefix('*').unwrap().parse().unwrap();
    let mut items = Vec::new();
    for _ in 0..n {
        line.clear();
        reader.read_line(&mut line).unwrap();
        let len: usize = line.trim().strip_prefix('$').unwrap().parse().unwrap();
        let mut bytes = vec![0; len + 2];
        reader.read_exact(&mut bytes).unwrap();
        items.push(String::from_utf8_lossy(&bytes[..len]).into_owned());
    }
    items
        .chunks(2)
        .map(|kv| (kv[0].clone(), kv[1].clone()))
        .collect()
}

#[test]
fn clock_tenures_recorded_in_redis_never_overlap_across_a_partition_and_a_kill() {
    // Pair 0 reaches etcd, pair 1 Redis: node a can lose etcd and still write its tenure.
    let netns = Netns::new(2);
    let etcd = Etcd::start_also_on(&netns.host_ips[0]);
    let redis = crate::tools::Redis::start_also_on(&netns.host_ips[1]);
    let procfile = "web: {guests}/counter.wasm\nclock: {guests}/tenure.wasm\n";
    let manifest = |host: &str| {
        format!(
            "[state]\nurl = \"redis://{host}:{}/?namespace=shop\"\n\n[processes.web]\nbuckets = [\"clock\"]\n\n[processes.clock]\nsingleton = true\nbuckets = [\"clock\"]\n",
            redis.port
        )
    };
    let app_a = App::new(procfile);
    app_a.write("wasmform.toml", &manifest(&netns.host_ips[1]));
    let app_b = App::new(procfile);
    app_b.write("wasmform.toml", &manifest("127.0.0.1"));
    let mut a = in_netns(&netns, &etcd, &app_a, "a", "web=1,clock=1");
    a.wait_listening();
    a.wait_for("tenure 1 on a", Duration::from_secs(30));
    let b = join(&app_b, &etcd, "b", &[]);
    // a loses etcd, not Redis: its clock writes until it stops itself; b's starts after.
    netns.attach(0, false);
    b.host.wait_for("tenure 2 on b", Duration::from_secs(20));
    netns.attach(0, true);
    let rejoined = a.wait_until(Duration::from_secs(20), |out| {
        out.contains("joined again with a new lease")
    });
    assert!(rejoined.is_some(), "a did not join again:\n{}", a.output());
    // b is killed: a takes the clock back once b's lease has expired.
    b.host.signal(libc::SIGKILL);
    a.wait_for("tenure 3 on a", Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(200));
    let bucket = hgetall(redis.port, "wasmform:shop:kv:clock");
    let mut tenures: Vec<(String, i64, u128, u128)> = (1..=3)
        .map(|n| {
            let record = &bucket[&format!("tenure-{n}")];
            let f: Vec<&str> = record.split(' ').collect();
            (
                f[0].to_string(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
                f[3].parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(bucket["tenures"], "3", "{bucket:?}");
    tenures.sort_by_key(|t| t.2);
    let nodes: Vec<&str> = tenures.iter().map(|t| t.0.as_str()).collect();
    assert_eq!(nodes, ["a", "b", "a"], "{tenures:?}");
    for pair in tenures.windows(2) {
        let (before, after) = (&pair[0], &pair[1]);
        assert!(
            before.3 < after.2,
            "tenures overlap: {before:?} and {after:?}"
        );
        assert!(
            before.1 < after.1,
            "fencing tokens must grow: {before:?} then {after:?}"
        );
    }
    eprintln!("tenures (node, fence, start ms, last ms): {tenures:?}");
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
    // Each step is told on the event stream too.
    let events = node.cli(&app, &["events", "--no-follow", "--json"]);
    let kinds: Vec<String> = events
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["node"] == "n1")
        .map(|e| e["event"].as_str().unwrap().to_string())
        .collect();
    for kind in [
        "cluster.joined",
        "cluster.fenced",
        "cluster.unreachable",
        "cluster.reachable",
    ] {
        assert!(kinds.iter().any(|k| k == kind), "no {kind} in {kinds:?}");
    }
}

/// Up instances per node.
fn per_node(ps: &serde_json::Value) -> BTreeMap<String, usize> {
    let mut per = BTreeMap::new();
    for nodes in up_instances(ps).values() {
        *per.entry(nodes[0].clone()).or_default() += 1;
    }
    per
}

#[test]
fn a_cordoned_node_gets_nothing_new_and_a_drained_one_hands_its_instances_over() {
    let etcd = Etcd::start();
    let app = App::new("web: {guests}/test_web.wasm\n");
    let n1 = join(&app, &etcd, "n1", &["-m", "web=6"]);
    let _n2 = join(&app, &etcd, "n2", &[]);
    let n3 = join(&app, &etcd, "n3", &["--health", "127.0.0.1:0"]);
    let health = n3.host.logged_addr("health check on");
    let count = |ps: &serde_json::Value, node: &str| per_node(ps).get(node).copied().unwrap_or(0);
    until(&app, &n1, Duration::from_secs(30), never_twice, |ps| {
        spread(ps, &ids("web", 6), &["n1", "n2", "n3"], 2)
    });
    let out = n1.cli(&app, &["node", "cordon", "n3"]);
    assert!(
        out.ok && out.stdout.contains("node `n3` cordoned"),
        "{out:?}"
    );
    assert!(n1.cli(&app, &["scale", "web=9"]).ok);
    // The new slots go to n1 and n2; n3 keeps its two.
    let ps = until(&app, &n1, Duration::from_secs(30), never_twice, |ps| {
        up_instances(ps).len() == 9
    });
    assert_eq!(count(&ps, "n3"), 2, "{ps:#}");
    // Drain: n3's health check fails, then its instances move.
    let out = n1.cli(&app, &["node", "drain", "n3", "--deadline", "30s"]);
    assert!(
        out.ok && out.stdout.contains("node `n3` drained"),
        "{out:?}"
    );
    let down = crate::support::get(health, "/health");
    assert_eq!(down.status, 503, "{}", down.body);
    assert!(down.body.contains("being drained"), "{}", down.body);
    let ps = until(&app, &n1, Duration::from_secs(30), never_twice, |ps| {
        up_instances(ps).len() == 9
    });
    assert_eq!(count(&ps, "n3"), 0, "{ps:#}");
    // Back in placement: the others give slots back until every node runs its share.
    let out = n1.cli(&app, &["node", "uncordon", "n3"]);
    assert!(out.ok, "{out:?}");
    until(&app, &n1, Duration::from_secs(60), never_twice, |ps| {
        spread(ps, &ids("web", 9), &["n1", "n2", "n3"], 3)
    });
    assert_eq!(crate::support::get(health, "/health").status, 200);
    let out = n1.cli(&app, &["node", "cordon", "nx"]);
    assert!(!out.ok, "{out:?}");
    assert!(
        out.stderr
            .contains("no node `nx` in cluster `shop`: its nodes are n1, n2, n3"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_types_placement_picks_the_nodes_with_its_labels_and_says_when_none_has_them() {
    let etcd = Etcd::start();
    let app = App::new("web: {guests}/test_web.wasm\napi: {guests}/hello.wasm\n");
    app.write(
        "wasmform.toml",
        "[processes.web]\nplacement = { region = \"eu\" }\n\n[processes.api]\nplacement = { disk = \"ssd\" }\n",
    );
    let n1 = join(
        &app,
        &etcd,
        "n1",
        &["-m", "web=4,api=1", "--label", "region=eu"],
    );
    let _n2 = join(&app, &etcd, "n2", &["--label", "region=us"]);
    let _n3 = join(&app, &etcd, "n3", &[]);
    let ps = until(&app, &n1, Duration::from_secs(30), never_twice, |ps| {
        up_instances(ps).len() == 4
            && ps["unplaced"]["api"]
                == "0 of 3 uncordoned nodes match disk=ssd (start a node with `--label disk=ssd`)"
    });
    assert_eq!(
        per_node(&ps),
        BTreeMap::from([("n1".to_string(), 4)]),
        "{ps:#}"
    );
    n1.host.wait_for(
        "`api` cannot be placed: 0 of 3 uncordoned nodes match disk=ssd",
        Duration::from_secs(5),
    );
    let table = n1.cli(&app, &["ps", "--cluster"]);
    assert!(table.stdout.contains("region=eu"), "{}", table.stdout);
    // A node with the label takes the type.
    let _n4 = join(&app, &etcd, "n4", &["--label", "disk=ssd"]);
    until(&app, &n1, Duration::from_secs(30), never_twice, |ps| {
        up_instances(ps).get("api.1").is_some_and(|n| n == &["n4"])
            && ps["unplaced"].as_object().is_some_and(|u| u.is_empty())
    });
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
    let err = app.up_fails(&[&cluster[..], &["--node", "n9", "--label", "region"]].concat());
    assert!(
        err.contains("--label `region`: give KEY=VALUE, e.g. `region=eu`"),
        "{err}"
    );
    let labelled = App::new("web: {guests}/test_web.wasm\n");
    labelled.write(
        "wasmform.toml",
        "[processes.web]\nplacement = { region = \"e u\" }\n",
    );
    let err = labelled.up_fails(&[]);
    assert!(
        err.contains("wasmform.toml:2:")
            && err.contains(
                "processes.web.placement.region: `e u` must be 1 to 63 of A-Z a-z 0-9 _ . -"
            ),
        "{err}"
    );
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
