//! `wasmform down`: stop the app's running host gracefully and wait until it is gone.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use hyper::Method;

use super::client::{AppArgs, Client, block_on};
use super::pidfd::Pidfd;
use crate::app::parse_duration;

/// Stop the running host: it drains (in-flight requests finish, every instance stops) and
/// exits. Returns once the process is gone; idempotent (succeeds when nothing runs).
#[derive(clap::Args, Debug)]
pub struct DownCommand {
    /// How long to wait for the host to exit before killing it (SIGKILL, after 5 s more).
    /// Its own drain is bounded by `up --grace`.
    #[arg(long = "grace", default_value = "30s", value_parser = parse_duration)]
    grace: Duration,

    /// Also delete the app's state: the stored formation, releases and embedded store (the
    /// whole state directory), as `docker compose down -v` deletes volumes.
    #[arg(long = "purge")]
    purge: bool,

    #[command(flatten)]
    app: AppArgs,
}

/// How long past `--grace` a host gets before SIGKILL.
const MARGIN: Duration = Duration::from_secs(5);

impl DownCommand {
    /// Asks the host to stop and waits for its process to end.
    pub fn execute(self) -> Result<()> {
        let client = Client::new(&self.app)?;
        if self.purge && client.is_remote() {
            bail!(
                "--purge removes this machine's state directory, not a remote host's: leave it out with --remote"
            );
        }
        if client.host_running() {
            let answer =
                block_on(client.json(Method::POST, "/v1/shutdown", Some(serde_json::json!({}))))??;
            let pid = answer["pid"]
                .as_u64()
                .and_then(|p| libc::pid_t::try_from(p).ok())
                .context("the host's answer to `/v1/shutdown` names no pid")?;
            if client.is_remote() {
                // Its process is not this machine's to watch.
                eprintln!(
                    "the host at {} is stopping (pid {pid} there)",
                    client.describe()
                );
                return Ok(());
            }
            wait_gone(pid, self.grace)?;
            // `up --detach` recorded it; the process is gone, so is the record.
            let _ = std::fs::remove_file(client.state().path().join("host.pid"));
            eprintln!("stopped the host (pid {pid})");
        } else {
            eprintln!(
                "no wasmform host is running for `{}`: nothing to stop",
                client.dir().display()
            );
        }
        if self.purge {
            purge(client.state().path())?;
        }
        Ok(())
    }
}

/// Waits until process `pid` has exited: through a pidfd, so a pid reused by another process
/// cannot be mistaken for the host. SIGKILL after `grace` and [`MARGIN`].
fn wait_gone(pid: libc::pid_t, grace: Duration) -> Result<()> {
    let process = match Pidfd::open(pid) {
        Ok(process) => process,
        // Already gone.
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(()),
        Err(e) => bail!("cannot watch the host's process {pid}: {e}"),
    };
    if process.wait_blocking(grace + MARGIN) {
        return Ok(());
    }
    eprintln!(
        "the host (pid {pid}) did not stop within {}: killing it",
        crate::units::humanize(grace + MARGIN)
    );
    process.kill(libc::SIGKILL);
    if !process.wait_blocking(Duration::from_secs(5)) {
        bail!("the host (pid {pid}) is still running after SIGKILL");
    }
    Ok(())
}

/// Deletes the app's state directory (after its host is gone).
fn purge(state: &Path) -> Result<()> {
    match std::fs::remove_dir_all(state) {
        Ok(()) => {
            eprintln!("deleted the app's state `{}`", state.display());
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot delete `{}`", state.display())),
    }
}
