//! `wasmform releases`: the release history.

use anyhow::Result;
use hyper::Method;

use super::client::{AppArgs, Client, block_on};
use crate::app::ByteSize;
use crate::release::ReleaseStore;

/// List the app's releases, newest first: version, time, and what changed. Without a running
/// host they are read from the app's state directory.
#[derive(clap::Args, Debug)]
pub struct ReleasesCommand {
    /// Print the API's JSON instead of a table.
    #[arg(long = "json")]
    json: bool,

    #[command(flatten)]
    app: AppArgs,
}

impl ReleasesCommand {
    /// Fetches and prints the list.
    pub fn execute(self) -> Result<()> {
        let client = Client::new(&self.app)?;
        let answer = match block_on(client.json(Method::GET, "/v1/releases", None))? {
            Ok(answer) => answer,
            // Releases persist in the state directory: without a host, they are read there.
            Err(e) if !client.host_running() => {
                let store = ReleaseStore::open(Some(client.state()), usize::MAX, ByteSize::mib(1))?;
                if store.list().is_empty() {
                    return Err(e);
                }
                let newest_first: Vec<_> = store.list().iter().rev().collect();
                serde_json::json!({ "releases": newest_first })
            }
            Err(e) => return Err(e),
        };
        if self.json {
            println!("{}", serde_json::to_string_pretty(&answer)?);
            return Ok(());
        }
        let releases = answer["releases"].as_array().cloned().unwrap_or_default();
        for (i, release) in releases.iter().enumerate() {
            let version = format!("v{}", release["version"].as_u64().unwrap_or(0));
            let current = if i == 0 { "  (current)" } else { "" };
            println!(
                "{version:<5} {}  {}{current}",
                release["created"].as_str().unwrap_or("-"),
                release["description"].as_str().unwrap_or("")
            );
        }
        Ok(())
    }
}
