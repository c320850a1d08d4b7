//! `wasmform deploy`: make the running host run what is on disk now.

use anyhow::Result;
use hyper::Method;

use super::client::{AppArgs, Client, block_on};

/// Deploy the app's current files (Procfile, wasmform.toml, .env, components) to its running
/// host as a new release, without dropping a request.
///
/// Everything is read, validated and compiled before anything running changes. Changed types
/// then roll one instance at a time: a new instance starts, passes its health check, and only
/// then does an old one drain. A release that fails is rolled back and the previous one keeps
/// serving; the command then exits with status 1 and says why.
#[derive(clap::Args, Debug)]
pub struct DeployCommand {
    #[command(flatten)]
    app: AppArgs,
}

impl DeployCommand {
    /// Asks the host to deploy and prints the release.
    pub fn execute(self) -> Result<()> {
        let client = Client::new(&self.app)?;
        let answer =
            block_on(client.json(Method::POST, "/v1/deploy", Some(serde_json::json!({}))))??;
        print_release(&answer);
        Ok(())
    }
}

/// Prints a deploy or rollback answer: `Released v4: Deploy: web changed`.
pub fn print_release(answer: &serde_json::Value) {
    let version = answer["release"].as_u64().unwrap_or(0);
    let description = answer["description"].as_str().unwrap_or_default();
    if answer["created"].as_bool() == Some(true) {
        println!("Released v{version}: {description}");
    } else {
        println!("{description}");
    }
    for note in answer["notes"].as_array().into_iter().flatten() {
        eprintln!("note: {}", note.as_str().unwrap_or_default());
    }
}
