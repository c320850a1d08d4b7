//! `wasmform wait`: block until conditions on the running formation hold, fail at once when
//! one can no longer hold, or time out (124).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::Method;
use serde_json::Value;

use super::client::{AppArgs, Client, Lines, NoHost, block_on};
use crate::app::parse_duration;
use crate::units::humanize;

/// How often the formation is checked.
const POLL: Duration = Duration::from_millis(25);

/// Lines of the scope's log shown when a wait fails.
const TAIL: usize = 20;

/// How long background and consumer instances must have been up to count as ready: they
/// report up once instantiated, so a crash loop with short delays would look up between its
/// crashes (`up --detach` waits the same).
const SETTLE: Duration = Duration::from_millis(500);

/// Wait until every condition holds for the running formation.
///
/// Conditions (`--for`, repeatable; all must hold; default `ready`):
///
///   ready            every desired instance up (web ones past their first health check,
///                    background ones for 0.5 s), none pending, starting or crashed;
///                    workers that exited 0 count as done
///   healthy          ready, and no health check failing
///   stopped          no instance left (with --ps); without --ps: no host runs for the app
///   exited[=CODE]    every instance exited (with that status)
///   release=vN       release vN is current and every up instance runs it
///   log=REGEX        a log line (of --ps, if given) matches, history included
///   http=PATH[=STATUS]  GET PATH on the front door answers STATUS (default: any 2xx)
///
/// Exit status: 0 when all hold; 1 when one can no longer hold (the host exited, an instance
/// crash-loops with its restart delay at `--restart-max`, a worker exited with another status,
/// a newer release replaced vN), with the reason and the scope's last log lines on stderr;
/// 3 when no host runs; 124 when `--timeout` passed first. `--timeout 0` checks once.
///
/// Examples:
///
///   wasmform wait                                  # the formation is ready
///   wasmform wait --for healthy --for http=/health --timeout 30s
///   wasmform wait --ps migrate --for exited=0      # a one-shot worker finished well
///   wasmform wait --for release=v3                 # a deploy rolled out
///   wasmform wait --ps web.1 --for 'log=listening|ready'
#[derive(clap::Args, Debug)]
pub struct WaitCommand {
    /// A condition to wait for (repeatable): ready, healthy, stopped, exited[=CODE],
    /// release=vN, log=REGEX, http=PATH[=STATUS].
    #[arg(long = "for", value_name = "COND", value_parser = Condition::parse)]
    conditions: Vec<Condition>,

    /// Only this process type (`web`) or instance (`web.1`).
    #[arg(long = "ps", value_name = "TYPE|INSTANCE")]
    ps: Option<String>,

    /// Longest wait (`0`: check once).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    timeout: Duration,

    #[command(flatten)]
    app: AppArgs,
}

/// One `--for`.
#[derive(Clone, Debug)]
enum Condition {
    Ready,
    Healthy,
    Stopped,
    Exited(Option<i32>),
    Release(u64),
    Log(regex::Regex),
    Http { path: String, status: Option<u16> },
}

impl Condition {
    fn parse(text: &str) -> Result<Self, String> {
        let (name, value) = match text.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (text, None),
        };
        let bad = |what: &str| format!("invalid condition `{text}`: {what}");
        Ok(match (name, value) {
            ("ready", None) => Condition::Ready,
            ("healthy", None) => Condition::Healthy,
            ("stopped", None) => Condition::Stopped,
            ("exited", None) => Condition::Exited(None),
            ("exited", Some(code)) => Condition::Exited(Some(
                code.parse()
                    .map_err(|_| bad("expected an exit status such as `exited=0`"))?,
            )),
            ("release", Some(version)) => Condition::Release(
                version
                    .trim_start_matches('v')
                    .parse()
                    .map_err(|_| bad("expected a release such as `release=v3`"))?,
            ),
            ("log", Some(pattern)) => Condition::Log(
                regex::Regex::new(pattern).map_err(|e| bad(&format!("bad regex: {e}")))?,
            ),
            ("http", Some(rest)) => {
                let (path, status) = match rest.rsplit_once('=') {
                    Some((path, status)) => (
                        path,
                        Some(
                            status
                                .parse::<u16>()
                                .ok()
                                .filter(|s| (100..600).contains(s))
                                .ok_or_else(|| {
                                    bad("expected a status such as `http=/health=200`")
                                })?,
                        ),
                    ),
                    None => (rest, None),
                };
                if !path.starts_with('/') {
                    return Err(bad("the path must start with `/`, e.g. `http=/health`"));
                }
                Condition::Http {
                    path: path.to_string(),
                    status,
                }
            }
            ("ready" | "healthy" | "stopped", Some(_)) => {
                return Err(bad(&format!("`{name}` takes no value")));
            }
            ("release" | "log" | "http", None) => {
                return Err(bad(&format!("`{name}` needs a value, e.g. `{name}=…`")));
            }
            _ => {
                return Err(bad(
                    "expected one of ready, healthy, stopped, exited[=CODE], release=vN, log=REGEX, http=PATH[=STATUS]",
                ));
            }
        })
    }

    fn describe(&self) -> String {
        match self {
            Condition::Ready => "ready".into(),
            Condition::Healthy => "healthy".into(),
            Condition::Stopped => "stopped".into(),
            Condition::Exited(None) => "exited".into(),
            Condition::Exited(Some(code)) => format!("exited={code}"),
            Condition::Release(v) => format!("release=v{v}"),
            Condition::Log(re) => format!("log={re}"),
            Condition::Http { path, status } => match status {
                Some(status) => format!("http={path}={status}"),
                None => format!("http={path}"),
            },
        }
    }
}

/// Where a condition stands.
enum Check {
    Holds,
    NotYet(String),
    /// It can no longer hold: fail now.
    Never(String),
}

impl WaitCommand {
    pub fn execute(mut self) -> Result<std::process::ExitCode> {
        if self.conditions.is_empty() {
            self.conditions.push(Condition::Ready);
        }
        let client = Client::new(&self.app)?;
        block_on(self.run(client))?
    }

    async fn run(self, client: Client) -> Result<std::process::ExitCode> {
        let started = Instant::now();
        let deadline = started + self.timeout;
        let only_stopped = self.ps.is_none()
            && self
                .conditions
                .iter()
                .all(|c| matches!(c, Condition::Stopped));
        let mut seen_host = false;
        // `log=` conditions read the log once, history first then live, on a task of their own.
        let mut logs = Vec::new();
        for condition in &self.conditions {
            if let Condition::Log(re) = condition {
                let matched = Arc::new(AtomicBool::new(false));
                logs.push(matched.clone());
                tokio::spawn(watch_log(
                    Client::new(&self.app)?,
                    self.ps.clone(),
                    re.clone(),
                    matched,
                ));
            }
        }
        loop {
            let ps = match client.json(Method::GET, "/v1/ps", None).await {
                Ok(ps) => ps,
                Err(e) if e.downcast_ref::<NoHost>().is_some() => {
                    if only_stopped {
                        eprintln!("wasmform: no host runs: stopped");
                        return Ok(std::process::ExitCode::SUCCESS);
                    }
                    if !seen_host {
                        return Err(e);
                    }
                    eprintln!("error: the host exited while waiting for {}", self.wanted());
                    return Ok(std::process::ExitCode::FAILURE);
                }
                Err(e) => return Err(e),
            };
            seen_host = true;
            if let Some(scope) = &self.ps {
                check_scope(&ps, scope)?;
            }
            let mut log_index = 0;
            let mut waiting = Vec::new();
            for condition in &self.conditions {
                let check = match condition {
                    Condition::Log(re) => {
                        let matched = logs[log_index].load(Ordering::Acquire);
                        log_index += 1;
                        if matched {
                            Check::Holds
                        } else {
                            Check::NotYet(format!("no log line matches `{re}` yet"))
                        }
                    }
                    Condition::Http { path, status } => http(&ps, path, *status).await,
                    other => evaluate(other, &ps, self.ps.as_deref()),
                };
                match check {
                    Check::Holds => {}
                    Check::NotYet(why) => waiting.push(why),
                    Check::Never(why) => {
                        eprintln!("error: {} can no longer hold: {why}", condition.describe());
                        self.print_tail(&client).await;
                        return Ok(std::process::ExitCode::FAILURE);
                    }
                }
            }
            if waiting.is_empty() {
                eprintln!(
                    "wasmform: {} after {}",
                    self.wanted(),
                    humanize(started.elapsed())
                );
                return Ok(std::process::ExitCode::SUCCESS);
            }
            if Instant::now() >= deadline {
                eprintln!(
                    "error: timed out after {} waiting for {}: {}",
                    humanize(self.timeout),
                    self.wanted(),
                    waiting.join("; ")
                );
                self.print_tail(&client).await;
                return Ok(std::process::ExitCode::from(124));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn wanted(&self) -> String {
        let conditions: Vec<String> = self.conditions.iter().map(Condition::describe).collect();
        match &self.ps {
            Some(scope) => format!("{} of `{scope}`", conditions.join(", ")),
            None => conditions.join(", "),
        }
    }

    /// The scope's last log lines, so a failed wait in CI shows why.
    async fn print_tail(&self, client: &Client) {
        let mut path = format!("/v1/logs?lines={TAIL}");
        if let Some(ps) = &self.ps {
            path.push_str(&format!("&ps={ps}"));
        }
        let Ok(response) = client.call(Method::GET, &path, None).await else {
            return;
        };
        let Ok(body) = response.into_body().collect().await else {
            return;
        };
        let text = String::from_utf8_lossy(&body.to_bytes()).into_owned();
        if !text.is_empty() {
            eprintln!(
                "--- last lines of {}",
                self.ps.as_deref().unwrap_or("the app")
            );
            eprint!("{text}");
        }
    }
}

/// Refuses a `--ps` that names no type of the formation.
fn check_scope(ps: &Value, scope: &str) -> Result<()> {
    let types: Vec<&str> = ps["types"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["name"].as_str())
        .collect();
    let (name, index) = scope.split_once('.').unwrap_or((scope, ""));
    if types.contains(&name) && index.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(());
    }
    bail!(
        "unknown process type or instance `{scope}` in --ps: known types are {} (an instance is `TYPE.N`)",
        types.join(", ")
    )
}

fn in_scope(instance: &Value, scope: Option<&str>) -> bool {
    scope.is_none_or(|s| instance["type"] == s || instance["id"] == s)
}

/// Judges a condition other than `log` and `http` on one `ps` answer.
fn evaluate(condition: &Condition, ps: &Value, scope: Option<&str>) -> Check {
    let empty = Vec::new();
    let instances: Vec<&Value> = ps["instances"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .filter(|i| in_scope(i, scope))
        .collect();
    let id = |i: &Value| i["id"].as_str().unwrap_or("?").to_string();
    let state = |i: &Value| i["state"].as_str().unwrap_or("").to_string();
    // `web.1 up, web.2 draining`: what `stopped` and `exited` still wait for.
    let not_exited = || -> Vec<String> {
        instances
            .iter()
            .filter(|i| state(i) != "exited")
            .map(|i| format!("{} {}", id(i), state(i)))
            .collect()
    };
    match condition {
        Condition::Ready | Condition::Healthy => {
            for i in &instances {
                if state(i) == "crashed" && i["backoff_capped"] == true {
                    return Check::Never(format!(
                        "{} crash-loops (its restart delay reached --restart-max): {}",
                        id(i),
                        i["reason"].as_str().unwrap_or("")
                    ));
                }
                if state(i) == "exited" && i["exit_code"].as_i64() != Some(0) {
                    return Check::Never(format!(
                        "{} {} and is not restarted",
                        id(i),
                        i["reason"].as_str().unwrap_or("exited")
                    ));
                }
            }
            let not_ready: Vec<String> = instances
                .iter()
                .filter(|i| !matches!(state(i).as_str(), "up" | "exited" | "draining"))
                .map(|i| format!("{} {}", id(i), state(i)))
                .collect();
            if !not_ready.is_empty() {
                return Check::NotYet(not_ready.join(", "));
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            let http =
                |i: &Value| {
                    ps["types"].as_array().unwrap_or(&empty).iter().any(|t| {
                        t["name"] == i["type"] && (t["kind"] == "http" || t["kind"] == "tcp")
                    })
                };
            let settling: Vec<String> = instances
                .iter()
                .filter(|i| state(i) == "up" && !http(i))
                .filter(|i| now - i["since"].as_f64().unwrap_or(now) < SETTLE.as_secs_f64())
                .map(|i| format!("{} up for less than {}", id(i), humanize(SETTLE)))
                .collect();
            if !settling.is_empty() {
                return Check::NotYet(settling.join(", "));
            }
            // Desired instances that do not exist yet (a scale in flight) are not ready.
            for t in ps["types"].as_array().unwrap_or(&empty) {
                let name = t["name"].as_str().unwrap_or("");
                if scope.is_some_and(|s| s != name && !s.starts_with(&format!("{name}."))) {
                    continue;
                }
                let live = instances
                    .iter()
                    .filter(|i| i["type"] == name && state(i) != "draining")
                    .count() as u64;
                let desired = t["desired"].as_u64().unwrap_or(0);
                let wanted = if scope.is_some_and(|s| s.contains('.')) {
                    1
                } else {
                    desired
                };
                if live < wanted {
                    return Check::NotYet(format!("{name}: {live} of {wanted} instances exist"));
                }
            }
            if matches!(condition, Condition::Healthy) {
                let failing: Vec<String> = instances
                    .iter()
                    .filter(|i| i["health"].as_str().is_some_and(|h| h != "passing"))
                    .map(|i| format!("{} health {}", id(i), i["health"].as_str().unwrap_or("")))
                    .collect();
                if !failing.is_empty() {
                    return Check::NotYet(failing.join(", "));
                }
            }
            Check::Holds
        }
        Condition::Stopped => {
            let running = not_exited();
            if scope.is_none() {
                Check::NotYet("the host is running".into())
            } else if running.is_empty() {
                Check::Holds
            } else {
                Check::NotYet(running.join(", "))
            }
        }
        Condition::Exited(code) => {
            if instances.is_empty() {
                return Check::NotYet("no instance".into());
            }
            for i in &instances {
                if state(i) == "exited"
                    && let Some(code) = code
                    && i["exit_code"].as_i64() != Some(i64::from(*code))
                {
                    return Check::Never(format!(
                        "{} {}",
                        id(i),
                        i["reason"].as_str().unwrap_or("exited")
                    ));
                }
            }
            let running = not_exited();
            if running.is_empty() {
                Check::Holds
            } else {
                Check::NotYet(running.join(", "))
            }
        }
        Condition::Release(version) => {
            let current = ps["types"]
                .as_array()
                .unwrap_or(&empty)
                .iter()
                .filter_map(|t| t["release"].as_u64())
                .max()
                .unwrap_or(0);
            if current > *version {
                return Check::Never(format!(
                    "release v{current} is current: v{version} cannot be again (a rollback makes a new release)"
                ));
            }
            if current < *version {
                return Check::NotYet(format!("release v{current} is current"));
            }
            let old: Vec<String> = instances
                .iter()
                .filter(|i| state(i) != "draining" && i["release"].as_u64() != Some(*version))
                .map(|i| format!("{} runs v{}", id(i), i["release"]))
                .collect();
            if old.is_empty() {
                Check::Holds
            } else {
                Check::NotYet(old.join(", "))
            }
        }
        Condition::Log(_) | Condition::Http { .. } => unreachable!("checked by the caller"),
    }
}

/// `http=PATH[=STATUS]`: one GET on the front door.
async fn http(ps: &Value, path: &str, status: Option<u16>) -> Check {
    let Some(url) = ps["url"].as_str() else {
        return Check::NotYet("the host does not say its URL (an older wasmform?)".into());
    };
    let authority = url.trim_start_matches("http://").to_string();
    let answer = async {
        let stream = tokio::net::TcpStream::connect(&authority).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let request = hyper::Request::get(path)
            .header("host", &authority)
            .body(Empty::<Bytes>::new())?;
        let response = sender.send_request(request).await?;
        anyhow::Ok(response.status().as_u16())
    };
    match tokio::time::timeout(Duration::from_secs(5), answer).await {
        Ok(Ok(got)) if status.map_or((200..300).contains(&got), |s| s == got) => Check::Holds,
        Ok(Ok(got)) => Check::NotYet(format!("GET {path} answered {got}")),
        Ok(Err(e)) => Check::NotYet(format!("GET {path} failed: {e}")),
        Err(_) => Check::NotYet(format!("GET {path} did not answer within 5 s")),
    }
}

/// Sets `matched` once a log line of `scope` matches `re`, history first.
async fn watch_log(
    client: Client,
    scope: Option<String>,
    re: regex::Regex,
    matched: Arc<AtomicBool>,
) {
    let mut path = format!("/v1/logs?lines={}&follow=true", crate::logs::HISTORY);
    if let Some(ps) = &scope {
        path.push_str(&format!("&ps={ps}"));
    }
    let Ok(response) = client.call(Method::GET, &path, None).await else {
        return;
    };
    let mut lines = Lines::new(response);
    while let Some(Ok(line)) = lines.next().await {
        if re.is_match(&String::from_utf8_lossy(&line)) {
            matched.store(true, Ordering::Release);
            return;
        }
    }
}
