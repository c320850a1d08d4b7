//! `wasmform up --detach`: the host in a session of its own, and a foreground that returns
//! only once the formation is ready — or fails fast, with the failing instances' output.
//!
//! The host is this binary again, with the same arguments and `WASMFORM_DETACHED=1` in its
//! environment (it then runs in the foreground of its new session), its output going to
//! `host.log` in the state directory and its pid to `host.pid`. Ready means: the host
//! listens, and every desired instance is up (web instances past their first health check),
//! with no instance pending, starting or crashed; background and consumer instances must stay
//! so for [`SETTLE`], since they report up once instantiated. A host that exits, or an
//! instance that crashes, fails at once; nothing is left running unless `--keep-on-failure`.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use hyper::Method;

use super::client::Client;

use crate::state::StateDir;

/// Set in the detached host's environment: it runs in the foreground of its own session.
pub const DETACHED_ENV: &str = "WASMFORM_DETACHED";

/// How long background and consumer instances must stay up before the formation is ready.
pub(super) const SETTLE: Duration = Duration::from_millis(500);

/// How often readiness is checked.
const POLL: Duration = Duration::from_millis(25);

/// Lines of a failing instance's output shown on failure.
const TAIL: usize = 20;

/// What `up --detach` needs besides the host's own arguments.
pub struct Detach {
    pub state: StateDir,
    pub wait_timeout: Duration,
    pub json: bool,
    pub keep_on_failure: bool,
}

impl Detach {
    /// Starts the host in the background and waits until its formation is ready.
    pub fn run(self) -> Result<ExitCode> {
        let started = Instant::now();
        crate::control::ensure_no_live_host(&self.state)?;
        self.state.create()?;
        let log = self.state.path().join("host.log");
        let output = std::fs::File::create(&log)
            .with_context(|| format!("cannot create `{}`", log.display()))?;
        let mut command = std::process::Command::new(
            std::env::current_exe().context("cannot find the wasmform binary")?,
        );
        command
            .args(std::env::args_os().skip(1))
            .env(DETACHED_ENV, "1")
            .stdin(Stdio::null())
            .stdout(output.try_clone()?)
            .stderr(output);
        // SAFETY: setsid is async-signal-safe and touches no memory of this process.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().context("cannot start the detached host")?;
        let pid = child.id();
        std::fs::write(self.state.path().join("host.pid"), format!("{pid}\n"))?;
        let deadline = started + self.wait_timeout;
        match self.wait_ready(&mut child, &log, deadline) {
            Ok(ready) => {
                let ready_ms = started.elapsed().as_millis();
                if self.json {
                    let answer = serde_json::json!({
                        "url": ready.url,
                        "pid": pid,
                        "control": self.state.socket(),
                        "release": ready.release,
                        "formation": ready.formation,
                        "ready_ms": ready_ms,
                        "log": log,
                    });
                    println!("{answer}");
                } else {
                    println!("{}", ready.url);
                    eprintln!(
                        "formation {} ready in {ready_ms} ms (pid {pid}; log {}; stop it with `wasmform down`)",
                        ready.formation,
                        log.display()
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
            Err(failure) => {
                eprintln!("error: {}", failure.reason);
                if !failure.lines.is_empty() {
                    eprintln!("--- last lines of {}", failure.of);
                    for line in &failure.lines {
                        eprintln!("{line}");
                    }
                }
                if self.keep_on_failure {
                    eprintln!(
                        "the host keeps running (--keep-on-failure): pid {pid}, log {}",
                        log.display()
                    );
                } else {
                    stop(&mut child);
                }
                Ok(ExitCode::from(failure.code))
            }
        }
    }

    /// Polls the host until its formation is ready, it fails, or `deadline` passes.
    fn wait_ready(
        &self,
        child: &mut Child,
        log: &Path,
        deadline: Instant,
    ) -> Result<Ready, Failure> {
        let client = Client::for_state(&self.state);
        // One runtime for every poll of the control API.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Failure {
                reason: format!("failed to start the async runtime: {e}"),
                of: String::new(),
                lines: Vec::new(),
                code: 1,
            })?;
        let ps = || {
            runtime
                .block_on(client.json(Method::GET, "/v1/ps", None))
                .ok()
        };
        let mut steady_since: Option<Instant> = None;
        loop {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if let Ok(Some(status)) = child.try_wait() {
                return Err(Failure {
                    reason: format!("the host exited ({status}) before its formation was ready"),
                    of: "the host's output".to_string(),
                    lines: tail(&text, None),
                    code: 1,
                });
            }
            let url = text
                .lines()
                .find_map(|l| l.split("listening on ").nth(1))
                .map(|u| u.trim().to_string());
            if let Some(url) = url
                && let Some(ps) = ps()
            {
                match judge(&ps) {
                    Verdict::Failed(id, why) => {
                        return Err(Failure {
                            reason: format!("{id} {why}: the formation cannot become ready"),
                            of: id.clone(),
                            lines: tail(&text, Some(&id)),
                            code: 1,
                        });
                    }
                    Verdict::NotYet => steady_since = None,
                    Verdict::Ready { settle } => {
                        let since = *steady_since.get_or_insert_with(Instant::now);
                        if !settle || since.elapsed() >= SETTLE {
                            return Ok(Ready::from_ps(url, &ps));
                        }
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(Failure {
                    reason: format!(
                        "the formation was not ready within {} (--wait-timeout)",
                        crate::units::humanize(self.wait_timeout)
                    ),
                    of: "the host's output".to_string(),
                    lines: tail(&text, None),
                    code: 124,
                });
            }
            std::thread::sleep(POLL);
        }
    }
}

/// A ready formation, for the output.
struct Ready {
    url: String,
    release: u64,
    /// `web=2,worker=1`
    formation: String,
}

impl Ready {
    fn from_ps(url: String, ps: &serde_json::Value) -> Self {
        let types = ps["types"].as_array().cloned().unwrap_or_default();
        let formation = types
            .iter()
            .map(|t| format!("{}={}", t["name"].as_str().unwrap_or("?"), t["desired"]))
            .collect::<Vec<_>>()
            .join(",");
        let release = types
            .iter()
            .filter_map(|t| t["release"].as_u64())
            .max()
            .unwrap_or(0);
        Self {
            url,
            release,
            formation,
        }
    }
}

/// Why the wait failed, and what to show.
struct Failure {
    reason: String,
    /// Whose lines `lines` are.
    of: String,
    lines: Vec<String>,
    /// `up`'s exit status: 1, or 124 for a timeout.
    code: u8,
}

pub(super) enum Verdict {
    /// Every desired instance is up; `settle`: some are background or consumer instances.
    Ready {
        settle: bool,
    },
    NotYet,
    /// An instance crashed or exited with a failure: `(id, what happened)`.
    Failed(String, String),
}

/// Judges one `ps` answer.
pub(super) fn judge(ps: &serde_json::Value) -> Verdict {
    let empty = Vec::new();
    let instances = ps["instances"].as_array().unwrap_or(&empty);
    for i in instances {
        let id = i["id"].as_str().unwrap_or("?").to_string();
        let reason = i["reason"].as_str().unwrap_or("").to_string();
        match i["state"].as_str().unwrap_or("") {
            "crashed" => return Verdict::Failed(id, format!("crashed ({reason})")),
            "exited" if i["exit_code"] != 0 => {
                return Verdict::Failed(id, format!("exited ({reason})"));
            }
            _ if i["restarts"].as_u64().unwrap_or(0) > 0 => {
                return Verdict::Failed(
                    id,
                    "was restarted: it ended while the formation started".to_string(),
                );
            }
            _ => {}
        }
    }
    let types = ps["types"].as_array().unwrap_or(&empty);
    let mut settle = false;
    for t in types {
        let name = t["name"].as_str().unwrap_or("");
        let desired = t["desired"].as_u64().unwrap_or(0);
        let done = instances
            .iter()
            .filter(|i| i["type"] == name)
            .filter(|i| i["state"] == "up" || i["state"] == "exited")
            .count() as u64;
        if done < desired {
            return Verdict::NotYet;
        }
        // HTTP and TCP instances are up once they serve; a background one only started.
        settle |= desired > 0 && t["kind"] != "http" && t["kind"] != "tcp";
    }
    Verdict::Ready { settle }
}

/// The last [`TAIL`] lines of the host's output, or of one instance's (`web.1 | …` lines and
/// host lines naming it).
fn tail(text: &str, instance: Option<&str>) -> Vec<String> {
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| instance.is_none_or(|id| l.contains(&format!(" {id} "))))
        .collect();
    lines[lines.len().saturating_sub(TAIL)..]
        .iter()
        .map(|l| l.to_string())
        .collect()
}

/// Stops the detached host: SIGTERM, SIGKILL after 10 s.
fn stop(child: &mut Child) {
    let pid = libc::pid_t::try_from(child.id()).unwrap_or(0);
    // SAFETY: kill has no memory preconditions; `child` is ours and not yet waited for.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(POLL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The state directory `up` uses for `procfile`'s app.
pub fn state_dir(explicit: Option<&PathBuf>, app_dir: &Path) -> StateDir {
    match explicit {
        Some(dir) => StateDir::new(dir.clone()),
        None => StateDir::for_app(app_dir),
    }
}
