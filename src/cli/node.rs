//! `wasmform node cordon|uncordon|drain NAME`: a cluster's nodes, through any node.

use std::time::{Duration, Instant};

use anyhow::Result;
use hyper::Method;

use super::client::{AppArgs, Client, block_on};
use crate::app::parse_duration;

/// Take a node of the cluster out of placement or put it back (through any node of it).
#[derive(clap::Args, Debug)]
pub struct NodeCommand {
    /// `cordon`: the node gets no new instance, keeps those it runs. `uncordon`: it gets work
    /// again (the others give slots back to it). `drain`: cordon, fail its health check so a
    /// load balancer moves traffic off it, then hand its instances to the other nodes.
    #[arg(value_parser = ["cordon", "uncordon", "drain"])]
    action: String,

    /// The node's name (`up --node`).
    node: String,

    /// With `drain`: how long to wait for the node to hand over every instance (exit 124
    /// after).
    #[arg(long = "deadline", default_value = "60s", value_parser = parse_duration)]
    deadline: Duration,

    #[command(flatten)]
    app: AppArgs,
}

impl NodeCommand {
    /// 0 once done (for `drain`: once the node runs nothing), 124 when `--deadline` passed.
    pub fn execute(self) -> Result<std::process::ExitCode> {
        let client = Client::new(&self.app)?;
        let body = serde_json::json!({ "node": self.node, "action": self.action });
        let answer = block_on(client.json(Method::POST, "/v1/cluster/node", Some(body)))??;
        println!("{}", answer["message"].as_str().unwrap_or("done"));
        if self.action != "drain" {
            return Ok(std::process::ExitCode::SUCCESS);
        }
        let started = Instant::now();
        loop {
            let ps = block_on(client.json(Method::GET, "/v1/cluster/ps", None))??;
            let left: Vec<String> = ps["instances"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|i| i["node"] == self.node.as_str())
                .filter_map(|i| i["id"].as_str().map(String::from))
                .collect();
            if left.is_empty() {
                println!(
                    "node `{}` drained: its instances run on the other nodes",
                    self.node
                );
                return Ok(std::process::ExitCode::SUCCESS);
            }
            if started.elapsed() >= self.deadline {
                eprintln!(
                    "error: node `{}` still runs {} after {}: see `wasmform ps --cluster`",
                    self.node,
                    left.join(", "),
                    crate::units::humanize(self.deadline)
                );
                return Ok(std::process::ExitCode::from(124));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
