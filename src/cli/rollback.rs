//! `wasmform rollback vN`: run an earlier release again.

use anyhow::Result;
use hyper::Method;

use super::client::{AppArgs, Client, block_on};
use super::deploy::print_release;

/// Bring back exactly what release vN ran (its stored components and configuration), as a new
/// release, rolled out like a deploy.
#[derive(clap::Args, Debug)]
pub struct RollbackCommand {
    /// The release: `v3` or `3` (see `wasmform releases`).
    #[arg(value_name = "RELEASE")]
    release: String,

    #[command(flatten)]
    app: AppArgs,
}

impl RollbackCommand {
    /// Asks the host to roll back and prints the new release.
    pub fn execute(self) -> Result<()> {
        let client = Client::new(&self.app)?;
        let body = serde_json::json!({ "version": self.release });
        let answer = block_on(client.json(Method::POST, "/v1/rollback", Some(body)))??;
        print_release(&answer);
        Ok(())
    }
}
