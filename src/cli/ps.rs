//! `wasmform ps`: the instances of the running app.

use std::time::{Duration, SystemTime};

use anyhow::Result;
use hyper::Method;

use super::client::{AppArgs, Client, block_on, size};

/// List every instance, grouped by process type: state, since when, memory, requests, restarts.
#[derive(clap::Args, Debug)]
pub struct PsCommand {
    /// Print the control API's JSON instead of the table.
    #[arg(long)]
    json: bool,

    /// Every instance of the cluster this host is a node of, with its node.
    #[arg(long)]
    cluster: bool,

    #[command(flatten)]
    app: AppArgs,
}

impl PsCommand {
    /// Fetches and prints the report.
    pub fn execute(self) -> Result<()> {
        let client = Client::new(&self.app)?;
        if self.cluster {
            return self.cluster(&client);
        }
        let report = block_on(client.json(Method::GET, "/v1/ps", None))??;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
            return Ok(());
        }
        let instances = report["instances"].as_array().cloned().unwrap_or_default();
        for t in report["types"].as_array().into_iter().flatten() {
            let name = t["name"].as_str().unwrap_or("?");
            let digest = t["digest"].as_str().unwrap_or("");
            let component = t["component"].as_str().unwrap_or("");
            let file = component.rsplit('/').next().unwrap_or(component);
            println!(
                "=== {name} ({}): {}/{} up, {} each · {file} sha256:{}",
                t["kind"].as_str().unwrap_or("?"),
                t["running"],
                t["desired"],
                size(t["memory"].as_u64().unwrap_or(0)),
                &digest[..digest.len().min(12)],
            );
            for i in instances.iter().filter(|i| i["type"] == name) {
                println!("{}", instance_line(i));
            }
            println!();
        }
        for q in report["queues"].as_array().into_iter().flatten() {
            println!(
                "queue {}: {} pending, {} dead-lettered",
                q["queue"].as_str().unwrap_or("?"),
                q["pending"],
                q["dead"]
            );
        }
        let store = &report["store"];
        if store["reachable"] == false {
            println!(
                "shared state: {} cannot be reached ({}): calls that need it fail until it is back",
                store["backend"].as_str().unwrap_or("?"),
                store["error"].as_str().unwrap_or("?")
            );
        }
        println!(
            "capacity: {} of {} reserved",
            size(report["reserved"].as_u64().unwrap_or(0)),
            size(report["capacity"].as_u64().unwrap_or(0))
        );
        Ok(())
    }
}

impl PsCommand {
    /// `ps --cluster`: nodes, then instances with their node.
    fn cluster(&self, client: &Client) -> Result<()> {
        let report = block_on(client.json(Method::GET, "/v1/cluster/ps", None))??;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
            return Ok(());
        }
        let nodes = report["nodes"].as_array().cloned().unwrap_or_default();
        println!(
            "=== cluster {}: {} nodes",
            report["app"].as_str().unwrap_or("?"),
            nodes.len()
        );
        for node in &nodes {
            let labels: Vec<String> = node["labels"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect();
            println!(
                "{:<16} {:<22} {:>5} instances  {}",
                node["node"].as_str().unwrap_or("?"),
                node["addr"].as_str().unwrap_or("?"),
                node["instances"],
                labels.join(",")
            );
        }
        for (process, why) in report["unplaced"].as_object().into_iter().flatten() {
            println!(
                "`{process}` cannot be placed: {}",
                why.as_str().unwrap_or("?")
            );
        }
        println!();
        for i in report["instances"].as_array().into_iter().flatten() {
            println!(
                "{:<16} {:<10} {}",
                i["id"].as_str().unwrap_or("?"),
                i["state"].as_str().unwrap_or("?"),
                i["node"].as_str().unwrap_or("?")
            );
        }
        Ok(())
    }
}

fn instance_line(i: &serde_json::Value) -> String {
    let id = i["id"].as_str().unwrap_or("?");
    let state = i["state"].as_str().unwrap_or("?");
    let mut detail = match state {
        "pending" | "exited" => i["reason"].as_str().unwrap_or_default().to_string(),
        "crashed" => format!(
            "restart in {}: {}",
            crate::units::humanize(Duration::from_millis(
                i["restart_in_ms"].as_u64().unwrap_or(0)
            )),
            i["reason"].as_str().unwrap_or_default()
        ),
        _ => String::new(),
    };
    if state != "pending" {
        let since = i["since"].as_f64().map(ago).unwrap_or_default();
        // A TCP process counts connections, and shows how many are open.
        let served = match i["connections"].as_u64() {
            Some(open) => format!("{:>6} conn ({open} open)", i["requests"]),
            None => format!("{:>6} req", i["requests"]),
        };
        let stats = format!(
            "{since:<14} {:>10} / {:<8} {served}  {} restarts",
            size(i["memory_used"].as_u64().unwrap_or(0)),
            size(i["memory_limit"].as_u64().unwrap_or(0)),
            i["restarts"],
        );
        let stats = match i["health"].as_str() {
            Some(health) => format!("{stats}  health: {health}"),
            None => stats,
        };
        let stats = match i["release"].as_u64() {
            Some(release) if release > 0 => format!("{stats}  v{release}"),
            _ => stats,
        };
        detail = if detail.is_empty() {
            stats
        } else {
            format!("{stats}  {detail}")
        };
    }
    format!("{id:<10} {state:<9} {detail}")
}

/// `2m ago` for a Unix time.
fn ago(unix: f64) -> String {
    let then = SystemTime::UNIX_EPOCH + Duration::from_secs_f64(unix);
    let secs = SystemTime::now()
        .duration_since(then)
        .unwrap_or_default()
        .as_secs();
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}
