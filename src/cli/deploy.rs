//! `wasmform deploy`: make the running host run what is on disk now.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use hyper::Method;

use super::client::{AppArgs, Client, block_on};
use crate::app::AppSpec;

/// Deploy the app's current files (Procfile, wasmform.toml, .env, components) to its running
/// host as a new release, without dropping a request. With `--remote`, this machine's files
/// are read, validated and sent to the host first (every file the app names must be inside
/// its directory).
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
    /// Asks the host to deploy and prints the release; a remote host is sent this
    /// machine's files first.
    pub fn execute(self) -> Result<()> {
        let client = Client::new(&self.app)?;
        let answer = if client.is_remote() {
            let (files, body) = upload(client.dir())?;
            eprintln!(
                "uploading {} files ({}) to {}",
                files,
                super::client::size(body.len() as u64),
                client.describe()
            );
            let request = client
                .request(Method::POST, "/v1/deploy/upload")?
                .header(
                    hyper::header::CONTENT_TYPE,
                    crate::control::upload::CONTENT_TYPE,
                )
                .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                .expect("valid request");
            block_on(async {
                let response = client.send(request).await?;
                let bytes = http_body_util::BodyExt::collect(response.into_body())
                    .await?
                    .to_bytes();
                serde_json::from_slice::<serde_json::Value>(&bytes)
                    .context("the control API answered with invalid JSON")
            })??
        } else {
            block_on(client.json(Method::POST, "/v1/deploy", Some(serde_json::json!({}))))??
        };
        print_release(&answer);
        Ok(())
    }
}

/// The app in `dir`, read and validated as the host would, as an upload: the number of files
/// and the request body (the header line, then each file).
fn upload(dir: &Path) -> Result<(usize, Vec<u8>)> {
    let source = ["Procfile", "wasmform.toml"]
        .into_iter()
        .map(|name| dir.join(name))
        .find(|p| p.exists())
        .with_context(|| {
            format!(
                "no Procfile or wasmform.toml in `{}` to deploy: run it where the app is, or name the app with `--app DIR`",
                dir.display()
            )
        })?;
    let app = AppSpec::load(&source)?;
    let root = std::fs::canonicalize(&app.dir)
        .with_context(|| format!("cannot resolve `{}`", app.dir.display()))?;
    let mut files: Vec<(PathBuf, Vec<u8>)> = Vec::new();
    let named = app
        .sources
        .iter()
        .map(|s| (s, "configuration file"))
        .chain(app.processes.iter().map(|p| (&p.component, "component")));
    for (path, what) in named {
        let full = std::fs::canonicalize(path)
            .with_context(|| format!("cannot resolve `{}`", path.display()))?;
        let Ok(relative) = full.strip_prefix(&root) else {
            bail!(
                "{what} `{}` is outside the app directory `{}`: a remote deploy sends the app directory's files, so put it inside (e.g. build into `{}/target`) and name it by a relative path",
                path.display(),
                root.display(),
                root.display()
            );
        };
        if !files.iter().any(|(f, _)| f == relative) {
            let bytes = std::fs::read(&full)
                .with_context(|| format!("cannot read `{}`", full.display()))?;
            files.push((relative.to_path_buf(), bytes));
        }
    }
    let body = crate::control::upload::encode(&files);
    Ok((files.len(), body))
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
