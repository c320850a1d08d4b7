//! `wasmform releases`: the release history.

use anyhow::Result;
use hyper::Method;

use super::client::{AppArgs, Client, block_on};

/// List the app's releases, newest first: version, time, and what changed.
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
        let answer = block_on(client.json(Method::GET, "/v1/releases", None))??;
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
