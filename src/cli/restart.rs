//! `wasmform restart`: rolling restart.

use anyhow::Result;
use hyper::Method;

use super::client::{AppArgs, Client, block_on, print_formation};

/// Restart instances one at a time: each replacement is up before the old instance stops, so a
/// type never loses all of its instances at once.
#[derive(clap::Args, Debug)]
pub struct RestartCommand {
    /// A process type (`web`) or an instance (`web.1`); default: everything.
    target: Option<String>,

    #[command(flatten)]
    app: AppArgs,
}

impl RestartCommand {
    /// Sends the restart and prints the formation.
    pub fn execute(self) -> Result<()> {
        let client = Client::new(&self.app)?;
        let body = serde_json::json!({ "target": self.target });
        let answer = block_on(client.json(Method::POST, "/v1/restart", Some(body)))??;
        print_formation(&answer);
        Ok(())
    }
}
