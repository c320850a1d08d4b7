//! `wasmform logs`: recent lines of the running app, and follow.

use anyhow::Result;
use http_body_util::BodyExt as _;
use hyper::Method;
use std::io::Write as _;

use super::client::{AppArgs, Client, block_on};

/// Show recent log lines (guest output and host events), optionally following new ones.
///
/// A follower ends when its host stops (shut down or killed), with a line saying so on stderr
/// and exit status 0.
#[derive(clap::Args, Debug)]
pub struct LogsCommand {
    /// Keep printing new lines as they come.
    #[arg(short = 'f', long = "follow")]
    follow: bool,

    /// Only lines from this process type (`web`) or instance (`web.1`).
    #[arg(long = "ps")]
    ps: Option<String>,

    /// How many recent lines to show.
    #[arg(short = 'n', long = "num", default_value_t = 100)]
    lines: usize,

    #[command(flatten)]
    app: AppArgs,
}

impl LogsCommand {
    /// Streams the lines to stdout.
    pub fn execute(self) -> Result<()> {
        let client = Client::new(&self.app)?;
        let mut path = format!("/v1/logs?lines={}", self.lines);
        if let Some(ps) = &self.ps {
            path.push_str(&format!("&ps={ps}"));
        }
        if self.follow {
            path.push_str("&follow=true");
        }
        block_on(async move {
            let mut body = client.call(Method::GET, &path, None).await?.into_body();
            let mut out = std::io::stdout();
            while let Some(frame) = body.frame().await {
                let frame = match frame {
                    Ok(frame) => frame,
                    // The host went away mid-stream (it shut down, or was killed): the end of
                    // what there is to follow, not a failure of this command.
                    Err(_) if self.follow => {
                        eprintln!("wasmform: the host stopped; no more lines to follow");
                        break;
                    }
                    Err(e) => return Err(e.into()),
                };
                if let Some(data) = frame.data_ref() {
                    out.write_all(data)?;
                    out.flush()?;
                }
            }
            anyhow::Ok(())
        })?
    }
}
