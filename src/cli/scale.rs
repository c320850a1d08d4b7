//! `wasmform scale`: change the running formation, Heroku style.

use anyhow::Result;
use hyper::Method;

use super::client::{AppArgs, Client, block_on, print_formation};

/// Scale process types of the running app: `web=3 worker+1 clock=0`, `web=2:512MiB`.
///
/// Only the named types change. New instances start at once; surplus ones (highest number
/// first) stop taking requests, finish the ones in flight, then stop. A memory change replaces
/// instances one at a time, each new one up before an old one stops.
#[derive(clap::Args, Debug)]
pub struct ScaleCommand {
    /// Changes: `TYPE=N`, `TYPE+N`, `TYPE-N`, optionally `:SIZE` for the memory limit.
    #[arg(required = true, value_name = "TYPE=N")]
    changes: Vec<String>,

    /// Memory limit for the named types (unless a change gives its own `:SIZE`).
    #[arg(long = "memory")]
    memory: Option<String>,

    #[command(flatten)]
    app: AppArgs,
}

impl ScaleCommand {
    /// Sends the change and prints the whole formation.
    pub fn execute(self) -> Result<()> {
        let client = Client::new(&self.app)?;
        let body = serde_json::json!({ "changes": self.changes, "memory": self.memory });
        let answer = block_on(client.json(Method::POST, "/v1/scale", Some(body)))??;
        print_formation(&answer);
        Ok(())
    }
}
