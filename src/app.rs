//! The resolved application: what the runtime sees after the Procfile has been parsed and
//! validated. Nothing here knows about wasmtime.
//!
//! Also home of the small validated value types shared by the CLI, the Procfile parser and the
//! formation: [`ProcessName`], [`ByteSize`] and [`parse_duration`].

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::{manifest, procfile};

/// A process type name such as `web` or `worker`: `[A-Za-z0-9_-]+`, as foreman accepts.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String")]
pub struct ProcessName(String);

impl TryFrom<String> for ProcessName {
    type Error = String;

    fn try_from(name: String) -> Result<Self, String> {
        Self::new(&name)
    }
}

impl ProcessName {
    /// Validates `name`; the error says which characters are allowed.
    pub fn new(name: &str) -> Result<Self, String> {
        if name.is_empty() {
            return Err("process type name is empty".to_string());
        }
        if let Some(bad) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
        {
            return Err(format!(
                "invalid process type name `{name}`: character `{}` is not allowed (use letters, digits, `_` and `-`)",
                bad.escape_default()
            ));
        }
        Ok(Self(name.to_string()))
    }

    /// The name as written in the Procfile.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for ProcessName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProcessName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A size in bytes, parsed from `256MiB`, `512M`, `1GiB`, `64KiB` or a bare number of MiB
/// (`--memory 512`, as Heroku and Convox take it).
///
/// `K`/`M`/`G`, `KiB`/`MiB`/`GiB` are binary units; `KB`/`MB`/`GB` are decimal, as in SI.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ByteSize(u64);

impl ByteSize {
    /// One mebibyte.
    pub const MIB: u64 = 1 << 20;

    /// A size of exactly `bytes`.
    pub const fn bytes(bytes: u64) -> Self {
        Self(bytes)
    }

    /// A size of `mib` mebibytes.
    pub const fn mib(mib: u64) -> Self {
        Self(mib * Self::MIB)
    }

    /// The size in bytes.
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// The size in bytes, saturating on 32-bit hosts.
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let hint = "expected a number with an optional unit, e.g. `256MiB`, `512M` or `1GiB` (a bare number means MiB)";
        let text = s.trim();
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number: f64 = match number.parse() {
            Ok(n) if !number.is_empty() => n,
            _ => return Err(format!("invalid memory size `{s}`: {hint}")),
        };
        let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "m" | "mi" | "mib" => 1 << 20,
            "b" => 1,
            "k" | "ki" | "kib" => 1 << 10,
            "g" | "gi" | "gib" => 1 << 30,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            _ => {
                return Err(format!(
                    "invalid memory size `{s}`: unknown unit `{unit}`; {hint}"
                ));
            }
        };
        let bytes = number * multiplier as f64;
        if bytes < 65536.0 {
            return Err(format!(
                "invalid memory size `{s}`: must be at least 64KiB (one WebAssembly page)"
            ));
        }
        if bytes > (4u64 << 30) as f64 {
            return Err(format!(
                "invalid memory size `{s}`: must be at most 4GiB (the limit of 32-bit WebAssembly)"
            ));
        }
        Ok(Self(bytes as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
        // The largest unit that fits; whole numbers stay whole (`256 MiB`, `1.5 GiB`).
        for (size, unit) in UNITS {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{} {unit}", self.0 / size);
            }
            if self.0 >= size {
                return write!(f, "{:.1} {unit}", self.0 as f64 / size as f64);
            }
        }
        write!(f, "{} B", self.0)
    }
}

/// Parses a duration such as `30s`, `500ms`, `2m` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let text = s.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let bad = || format!("invalid duration `{s}`: expected e.g. `30s`, `500ms` or `2m`");
    let number: f64 = number.parse().map_err(|_| bad())?;
    let seconds = match unit {
        "" | "s" => number,
        "ms" => number / 1000.0,
        "m" | "min" => number * 60.0,
        "h" => number * 3600.0,
        _ => return Err(bad()),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| bad())
}

/// Parses a host-wide size (`--capacity`, `capacity =`), which unlike a per-instance limit may
/// exceed 4 GiB.
pub fn parse_capacity(s: &str) -> Result<ByteSize, String> {
    match s.parse::<ByteSize>() {
        Ok(size) => Ok(size),
        Err(_) => {
            let gib = s
                .trim()
                .strip_suffix("GiB")
                .or_else(|| s.trim().strip_suffix('G'))
                .and_then(|n| n.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    format!("invalid capacity `{s}`: expected e.g. `2GiB` or `512MiB`")
                })?;
            Ok(ByteSize::bytes(gib << 30))
        }
    }
}

/// When an instance that ended is started again (`restart =` in the manifest).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartMode {
    /// Always (the default, as on Heroku).
    #[default]
    Always,
    /// Only if it failed: a worker whose `run` returned success stays exited.
    OnFailure,
    /// Never: an instance that ended stays exited until a restart, scale or deploy.
    Never,
}

/// A resolved health check (see `docs/manifest.md`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    /// Path requested with GET; 2xx and 3xx pass.
    pub path: String,
    /// Time between checks of a running instance.
    pub interval: Duration,
    /// Longest a check may take.
    pub timeout: Duration,
    /// How long a new instance has to pass its first check.
    pub grace: Duration,
    /// Failed checks in a row that restart an instance.
    pub threshold: u32,
}

/// One process type of the app, resolved: absolute component path, guest arguments, settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProcessSpec {
    /// The type's name, e.g. `web`.
    pub name: ProcessName,
    /// Absolute path of the component file.
    pub component: PathBuf,
    /// Arguments after the program name, as written in the Procfile.
    pub args: Vec<String>,
    /// Where the type was declared (`Procfile:3`), for error messages.
    pub origin: String,
    /// Instances when the type first runs (manifest `count`); `None`: one.
    pub count: Option<u32>,
    /// Memory limit per instance (manifest `memory`); `None`: the host's default.
    pub memory: Option<ByteSize>,
    /// At most one instance ever, even during restarts and deploys.
    pub singleton: bool,
    /// When an instance that ended starts again.
    pub restart: RestartMode,
    /// Longest time for response headers; `None`: the host's `--request-timeout`.
    pub request_timeout: Option<Duration>,
    /// Recycle a web instance after this many requests.
    pub max_requests: Option<u64>,
    /// The guest's environment: `.env`, then `[env]`, then the type's `env`.
    pub env: BTreeMap<String, String>,
    /// Readiness and liveness check of a web instance.
    pub health: Option<HealthCheck>,
    /// Hosts outgoing HTTP may reach (`host`, `host:port`, or `*`); empty: none.
    pub allowed_outbound_hosts: Vec<String>,
    /// Key-value buckets the type may open.
    pub buckets: Vec<String>,
    /// Queues the type may enqueue to.
    pub queues: Vec<String>,
    /// The queue a consumer type handles.
    pub consume: Option<String>,
    /// Deliveries of one message before it is dead-lettered.
    pub max_attempts: u32,
    /// Where the manifest set the keys that only some kinds of process take, by key
    /// (`consume` → `wasmform.toml:5:11: processes.web.consume`), for the errors found once the
    /// component is compiled. Not part of the type's settings, nor stored with releases.
    #[serde(skip)]
    pub set_at: BTreeMap<String, String>,
}

impl ProcessSpec {
    /// A type from a Procfile line, with every setting at its default.
    pub fn new(name: ProcessName, component: PathBuf, args: Vec<String>, origin: String) -> Self {
        Self {
            name,
            component,
            args,
            origin,
            count: None,
            memory: None,
            singleton: false,
            restart: RestartMode::Always,
            request_timeout: None,
            max_requests: None,
            env: BTreeMap::new(),
            health: None,
            allowed_outbound_hosts: Vec::new(),
            buckets: Vec::new(),
            queues: Vec::new(),
            consume: None,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            set_at: BTreeMap::new(),
        }
    }

    /// Where `key` was set (`wasmform.toml:5:11: processes.web.consume`), else where the type
    /// was declared.
    pub fn origin_of(&self, key: &str) -> String {
        match self.set_at.get(key) {
            Some(at) => at.clone(),
            None => format!("process type `{}` ({})", self.name, self.origin),
        }
    }

    /// Whether `other` runs the same way given the same component bytes: everything but where
    /// it was declared and where its file is (the digest compares the code).
    pub fn same_settings(&self, other: &Self) -> bool {
        let strip = |s: &Self| Self {
            origin: String::new(),
            set_at: BTreeMap::new(),
            component: PathBuf::new(),
            count: None,
            memory: None,
            ..s.clone()
        };
        strip(self) == strip(other)
    }
}

/// Deliveries of a message before it is dead-lettered, unless `max_attempts` says otherwise.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;

/// An extra HTTP listener (`[[services]]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// Where it listens.
    pub listen: SocketAddr,
    /// The HTTP process type it routes to.
    pub process: ProcessName,
    /// `wasmform.toml:12`, for error messages.
    pub origin: String,
}

/// The whole application as the runtime sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AppSpec {
    /// Directory the Procfile or manifest lives in; relative paths were resolved against it.
    pub dir: PathBuf,
    /// Process types in declaration order (Procfile first, then manifest-only types by name).
    pub processes: Vec<ProcessSpec>,
    /// Memory budget from the manifest.
    pub capacity: Option<ByteSize>,
    /// `[build] command`.
    pub build: Option<String>,
    /// Extra HTTP listeners.
    pub services: Vec<Service>,
    /// The configuration files read (Procfile, manifest, env file), for `up --watch`.
    pub sources: Vec<PathBuf>,
    /// `[state] url`: Redis for shared state; `None`: the embedded store.
    pub state_url: Option<String>,
    /// `[http]`: front-door limits; `up`'s flags override them. Left out of the serialized
    /// form when unset, so releases of apps without the table keep their digests.
    #[serde(default, skip_serializing_if = "HttpSettings::is_unset")]
    pub http: HttpSettings,
}

/// Front-door limits as configured (`[http]` in the manifest, or `up`'s flags); `None` leaves
/// the limit to the next source, then to the default (see `proxy::HttpLimits`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpSettings {
    /// Largest request body (`max_body`, `--max-body`).
    pub max_body: Option<ByteSize>,
    /// Most header fields in a request (`max_headers`).
    pub max_headers: Option<usize>,
    /// Largest request head (`max_head_bytes`).
    pub max_head_bytes: Option<ByteSize>,
    /// Longest time to send a request head (`header_timeout`).
    pub header_timeout: Option<Duration>,
    /// Longest stall of a request body while the guest reads it (`body_timeout`).
    pub body_timeout: Option<Duration>,
    /// Longest idle time of a keep-alive connection between requests (`keepalive_timeout`).
    pub keepalive_timeout: Option<Duration>,
    /// Most open client connections (`max_connections`).
    pub max_connections: Option<usize>,
}

impl HttpSettings {
    /// Whether nothing is set.
    pub fn is_unset(&self) -> bool {
        *self == Self::default()
    }

    /// These settings, with the unset ones taken from `fallback`.
    pub fn or(self, fallback: Self) -> Self {
        Self {
            max_body: self.max_body.or(fallback.max_body),
            max_headers: self.max_headers.or(fallback.max_headers),
            max_head_bytes: self.max_head_bytes.or(fallback.max_head_bytes),
            header_timeout: self.header_timeout.or(fallback.header_timeout),
            body_timeout: self.body_timeout.or(fallback.body_timeout),
            keepalive_timeout: self.keepalive_timeout.or(fallback.keepalive_timeout),
            max_connections: self.max_connections.or(fallback.max_connections),
        }
    }
}

/// Smallest `max_head_bytes`: a request line and a few headers.
pub const MIN_HEAD_BYTES: u64 = 1024;

/// Largest `max_head_bytes`: hyper buffers a whole head in memory, per connection.
pub const MAX_HEAD_BYTES: u64 = 16 << 20;

/// Parses an HTTP size limit (`--max-body`, `max_body =`): `10MiB`, `64KiB`, `512KB`, `1024B`.
/// The unit is required: a bare number would be bytes to some readers and MiB to others.
pub fn parse_http_size(s: &str) -> Result<ByteSize, String> {
    let hint = "expected a size with a unit, e.g. `10MiB`, `64KiB` or `1024B`";
    let text = s.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = match number.parse() {
        Ok(n) if !number.is_empty() => n,
        _ => return Err(format!("invalid size `{s}`: {hint}")),
    };
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" => return Err(format!("invalid size `{s}`: no unit; {hint}")),
        "b" => 1,
        "k" | "ki" | "kib" => 1 << 10,
        "m" | "mi" | "mib" => 1 << 20,
        "g" | "gi" | "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => return Err(format!("invalid size `{s}`: unknown unit `{unit}`; {hint}")),
    };
    let bytes = number * multiplier as f64;
    if bytes.fract() != 0.0 || bytes > (1u64 << 50) as f64 {
        return Err(format!(
            "invalid size `{s}`: must be a whole number of bytes up to 1PiB"
        ));
    }
    Ok(ByteSize::bytes(bytes as u64))
}

/// Parses `--max-head-bytes` / `max_head_bytes`: an HTTP size from 1KiB to 16MiB.
pub fn parse_head_bytes(s: &str) -> Result<ByteSize, String> {
    let size = parse_http_size(s)?;
    if !(MIN_HEAD_BYTES..=MAX_HEAD_BYTES).contains(&size.as_u64()) {
        return Err(format!(
            "invalid head size `{s}`: must be from 1KiB to 16MiB"
        ));
    }
    Ok(size)
}

impl AppSpec {
    /// An app of `processes` in `dir` with no app-wide settings.
    pub fn new(dir: PathBuf, processes: Vec<ProcessSpec>) -> Self {
        Self {
            dir,
            processes,
            capacity: None,
            build: None,
            services: Vec::new(),
            sources: Vec::new(),
            state_url: None,
            http: HttpSettings::default(),
        }
    }

    /// Reads and resolves a Procfile (see [`AppSpec::load`]).
    pub fn from_procfile(path: &Path) -> Result<Self> {
        Self::load(path)
    }

    /// Reads the app at `path`: a Procfile (and `wasmform.toml` beside it, if there is one),
    /// or a `wasmform.toml` (and a Procfile beside it, if there is one). If `path` is a
    /// Procfile that does not exist, a `wasmform.toml` beside it is used alone. The `.env`
    /// file beside them (or the manifest's `env_file`) is loaded, as foreman does.
    pub fn load(path: &Path) -> Result<Self> {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        // Canonical, so `-f ../Procfile` from a subdirectory is the same app (the same state
        // directory and stored paths) as `-f Procfile` from its own.
        let dir = std::fs::canonicalize(dir)
            .or_else(|_| std::path::absolute(dir))
            .with_context(|| format!("failed to resolve `{}`", dir.display()))?;
        let is_manifest = path.extension().is_some_and(|e| e == "toml");
        let (procfile, manifest) = if is_manifest {
            let procfile = dir.join("Procfile");
            (
                procfile.exists().then_some(procfile),
                Some(path.to_path_buf()),
            )
        } else {
            let manifest = dir.join(manifest::FILE_NAME);
            if path.exists() {
                (
                    Some(path.to_path_buf()),
                    manifest.exists().then_some(manifest),
                )
            } else if manifest.exists() {
                (None, Some(manifest))
            } else {
                anyhow::bail!(
                    "no Procfile at `{}` (and no `{}` beside it): create one with lines like `web: app.wasm`, or pass `-f PATH`",
                    path.display(),
                    manifest::FILE_NAME
                );
            }
        };
        let mut sources = Vec::new();
        let mut processes = Vec::new();
        if let Some(path) = &procfile {
            let text = read(path)?;
            sources.push(path.clone());
            let entries = procfile::parse(&text)
                .map_err(|e| anyhow::anyhow!("{}:{}: {}", path.display(), e.line, e.message))?;
            processes.extend(entries.into_iter().map(|entry| {
                ProcessSpec::new(
                    entry.name,
                    dir.join(&entry.component),
                    entry.args,
                    format!("{}:{}", path.display(), entry.line),
                )
            }));
        }
        let mut app = Self {
            dir: dir.clone(),
            processes,
            capacity: None,
            build: None,
            services: Vec::new(),
            sources,
            state_url: None,
            http: HttpSettings::default(),
        };
        let mut env = BTreeMap::new();
        match &manifest {
            Some(path) => app.apply_manifest(path, &mut env)?,
            None => {
                let dotenv = dir.join(".env");
                if dotenv.exists() {
                    env = load_env_file(&dotenv)?;
                    app.sources.push(dotenv);
                }
                for process in &mut app.processes {
                    process.env = env.clone();
                }
            }
        }
        Ok(app)
    }

    /// Merges `wasmform.toml` into the Procfile's types (see `docs/manifest.md`).
    fn apply_manifest(&mut self, path: &Path, env: &mut BTreeMap<String, String>) -> Result<()> {
        let text = read(path)?;
        self.sources.push(path.to_path_buf());
        let raw = manifest::parse(&text, path)?;
        let at = |span: std::ops::Range<usize>| {
            let (line, column) = manifest::position(&text, span.start);
            format!("{}:{line}:{column}", path.display())
        };
        let env_file = match &raw.env_file {
            Some(file) => Some((self.dir.join(file.get_ref()), Some(at(file.span())))),
            None => {
                let default = self.dir.join(".env");
                default.exists().then_some((default, None))
            }
        };
        if let Some((file, origin)) = env_file {
            if !file.exists() {
                anyhow::bail!(
                    "{}: env_file `{}` does not exist: create it or remove the key",
                    origin.unwrap_or_default(),
                    file.display()
                );
            }
            *env = load_env_file(&file)?;
            self.sources.push(file);
        }
        env.extend(platform_checked(raw.env, "env", &at)?);
        self.capacity = raw.capacity.map(|c| c.0);
        if let Some(url) = raw.state.as_ref().and_then(|s| s.url.as_ref()) {
            if !(url.get_ref().starts_with("redis://") || url.get_ref().starts_with("rediss://")) {
                anyhow::bail!(
                    "{}: state.url: `{}` is not supported: use `redis://HOST:PORT/?namespace=APP`, or leave `url` out for the embedded store",
                    at(url.span()),
                    url.get_ref()
                );
            }
            crate::shared::redis::namespace(url.get_ref())
                .map_err(|e| anyhow::anyhow!("{}: {e}", at(url.span())))?;
            self.state_url = Some(url.get_ref().clone());
        }
        self.build = raw.build.map(|b| b.command);
        if let Some(http) = &raw.http {
            self.http = http
                .resolve()
                .map_err(|e| anyhow::anyhow!("{}: http.{}: {}", at(e.span), e.key, e.message))?;
        }
        for process in &mut self.processes {
            process.env = env.clone();
        }
        for (name, settings) in raw.processes {
            let origin = match manifest::find_process(&text, &name) {
                Some(offset) => at(offset..offset),
                None => path.display().to_string(),
            };
            let name = ProcessName::new(&name)
                .map_err(|e| anyhow::anyhow!("{origin}: processes.{name}: {e}"))?;
            let key = format!("processes.{name}");
            let existing = self.processes.iter().position(|p| p.name == name);
            let index = match (&settings.command, existing) {
                (Some(command), Some(i)) => anyhow::bail!(
                    "{}: {key}.command: process type `{name}` already has a command in {}: keep one of the two",
                    at(command.span()),
                    self.processes[i].origin
                ),
                (None, Some(i)) => i,
                (Some(command), None) => {
                    let words = procfile::split_words(command.get_ref()).map_err(|e| {
                        anyhow::anyhow!("{}: {key}.command: {e}", at(command.span()))
                    })?;
                    let Some((component, args)) = words.split_first() else {
                        anyhow::bail!(
                            "{}: {key}.command: empty command: give the path of a `.wasm` component",
                            at(command.span())
                        );
                    };
                    self.processes.push(ProcessSpec::new(
                        name.clone(),
                        self.dir.join(component),
                        args.to_vec(),
                        origin.clone(),
                    ));
                    self.processes.len() - 1
                }
                (None, None) => anyhow::bail!(
                    "{origin}: {key}: process type `{name}` has no command: add `command = \"{name}.wasm\"` or a Procfile line `{name}: {name}.wasm`"
                ),
            };
            let spec = &mut self.processes[index];
            spec.env = env.clone();
            spec.env
                .extend(platform_checked(settings.env, &format!("{key}.env"), &at)?);
            let singleton = settings.singleton;
            if let Some(count) = &settings.count {
                if singleton && *count.get_ref() > 1 {
                    anyhow::bail!(
                        "{}: {key}.count: `{name}` is a singleton, so it runs at most 1 instance (duplicate scheduled work otherwise): set `count = 1` or drop `singleton`",
                        at(count.span())
                    );
                }
                if *count.get_ref() > crate::formation::MAX_COUNT {
                    anyhow::bail!(
                        "{}: {key}.count: {} is above the maximum of {}",
                        at(count.span()),
                        count.get_ref(),
                        crate::formation::MAX_COUNT
                    );
                }
                spec.count = Some(*count.get_ref());
            }
            spec.singleton = singleton;
            // Where each key that only some kinds of process take was set, for the errors
            // found once the component's kind is known.
            let spans = [
                ("memory", settings.memory.as_ref().map(|m| m.span())),
                (
                    "request_timeout",
                    settings.request_timeout.as_ref().map(|d| d.span()),
                ),
                (
                    "max_requests",
                    settings.max_requests.as_ref().map(|m| m.span()),
                ),
                ("health", settings.health.as_ref().map(|h| h.path.span())),
                ("consume", settings.consume.as_ref().map(|c| c.span())),
                (
                    "max_attempts",
                    settings.max_attempts.as_ref().map(|m| m.span()),
                ),
            ];
            for (name, span) in spans {
                if let Some(span) = span {
                    spec.set_at
                        .insert(name.to_string(), format!("{}: {key}.{name}", at(span)));
                }
            }
            spec.memory = settings.memory.map(|m| m.into_inner().0);
            spec.restart = settings.restart.unwrap_or_default();
            spec.request_timeout = settings.request_timeout.map(|d| d.into_inner().0);
            if let Some(max) = &settings.max_requests {
                if *max.get_ref() == 0 {
                    anyhow::bail!(
                        "{}: {key}.max_requests: must be at least 1 (leave it out to never recycle)",
                        at(max.span())
                    );
                }
                spec.max_requests = Some(*max.get_ref());
            }
            if let Some(health) = &settings.health {
                spec.health = Some(manifest::Manifest::health(health).map_err(|e| {
                    anyhow::anyhow!("{}: {key}.health.{}: {}", at(e.span), e.key, e.message)
                })?);
            }
            spec.allowed_outbound_hosts = settings
                .allowed_outbound_hosts
                .iter()
                .map(|host| {
                    check_outbound_host(host.get_ref()).map_err(|e| {
                        anyhow::anyhow!("{}: {key}.allowed_outbound_hosts: {e}", at(host.span()))
                    })
                })
                .collect::<Result<_>>()?;
            let names = |list: &[toml::Spanned<String>], what: &str| -> Result<Vec<String>> {
                list.iter()
                    .map(|name| {
                        check_state_name(name.get_ref())
                            .map(|()| name.get_ref().clone())
                            .map_err(|e| anyhow::anyhow!("{}: {key}.{what}: {e}", at(name.span())))
                    })
                    .collect()
            };
            spec.buckets = names(&settings.buckets, "buckets")?;
            spec.queues = names(&settings.queues, "queues")?;
            if let Some(queue) = &settings.consume {
                check_state_name(queue.get_ref())
                    .map_err(|e| anyhow::anyhow!("{}: {key}.consume: {e}", at(queue.span())))?;
                spec.consume = Some(queue.get_ref().clone());
            }
            if let Some(max) = &settings.max_attempts {
                if *max.get_ref() == 0 {
                    anyhow::bail!("{}: {key}.max_attempts: must be at least 1", at(max.span()));
                }
                spec.max_attempts = *max.get_ref();
            }
            spec.origin = if spec.origin.ends_with(".toml") || existing.is_none() {
                origin
            } else {
                spec.origin.clone()
            };
        }
        for (i, service) in raw.services.iter().enumerate() {
            let origin = at(service.span());
            let service = service.get_ref();
            let key = format!("services[{i}]");
            let listen = manifest::listen_address(service.listen.get_ref())
                .map_err(|e| anyhow::anyhow!("{}: {key}.listen: {e}", at(service.listen.span())))?;
            let processes = at(service.processes.span());
            let [process] = service.processes.get_ref().as_slice() else {
                anyhow::bail!(
                    "{processes}: {key}.processes: a service routes to exactly one HTTP process type, e.g. `processes = [\"admin\"]` (found {})",
                    service.processes.get_ref().len()
                );
            };
            let Some(spec) = self.processes.iter().find(|p| p.name.as_str() == process) else {
                anyhow::bail!(
                    "{processes}: {key}.processes: unknown process type `{process}` (known: {})",
                    self.processes
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            };
            if let Some(other) = self.services.iter().find(|s| s.listen == listen) {
                anyhow::bail!(
                    "{}: {key}.listen: {listen} is already used by the service at {}",
                    at(service.listen.span()),
                    other.origin
                );
            }
            self.services.push(Service {
                listen,
                process: spec.name.clone(),
                origin,
            });
        }
        if self.processes.is_empty() {
            anyhow::bail!(
                "{}: no process types defined: add `[processes.web]` with `command = \"app.wasm\"`",
                path.display()
            );
        }
        Ok(())
    }

    /// Finds a type.
    pub fn process(&self, name: &str) -> Option<&ProcessSpec> {
        self.processes.iter().find(|p| p.name.as_str() == name)
    }
}

/// A bucket or queue name: 1 to 128 of `[A-Za-z0-9_.-]`.
fn check_state_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 128 {
        anyhow::bail!("`{name}` must be 1 to 128 characters long");
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        anyhow::bail!(
            "`{name}`: character `{}` is not allowed (use letters, digits, `_`, `-` and `.`)",
            bad.escape_default()
        );
    }
    Ok(())
}

/// `host`, `host:port`, `*.domain` or `*`; a scheme is accepted and dropped. No paths.
fn check_outbound_host(host: &str) -> Result<String> {
    let bare = host
        .strip_prefix("http://")
        .or_else(|| host.strip_prefix("https://"))
        .unwrap_or(host)
        .trim_end_matches('/');
    if bare == "*" {
        return Ok(bare.to_string());
    }
    let (wildcard, rest) = match bare.strip_prefix("*.") {
        Some(rest) => ("*.", rest),
        None => ("", bare),
    };
    match rest.parse::<http::uri::Authority>() {
        Ok(authority) if !rest.is_empty() && !rest.contains(['@', '*']) => {
            Ok(format!("{wildcard}{authority}"))
        }
        _ => anyhow::bail!(
            "`{host}` is not a host: write `example.com`, `example.com:8080`, `*.example.com`, `127.0.0.1:3000` or `*`"
        ),
    }
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("failed to read `{}`", path.display()))
}

/// Variables wasmform gives every instance itself (foreman's `PORT`, Heroku's `DYNO`…): the
/// environment cannot override them.
pub const PLATFORM_ENV: [&str; 5] = [
    "PORT",
    "WASMFORM_PROCESS",
    "WASMFORM_INSTANCE",
    "PS",
    "DYNO",
];

/// A manifest's `env` table as plain pairs; a platform variable in it is an error at its key
/// (`table` is the key path, `env` or `processes.web.env`), since it could only be ignored.
fn platform_checked(
    table: BTreeMap<toml::Spanned<String>, manifest::EnvValue>,
    path: &str,
    at: &impl Fn(std::ops::Range<usize>) -> String,
) -> Result<Vec<(String, String)>> {
    table
        .into_iter()
        .map(|(key, value)| {
            if PLATFORM_ENV.contains(&key.get_ref().as_str()) {
                anyhow::bail!(
                    "{}: {path}.{}: wasmform sets {} for every instance ({}), so it cannot be set here: remove it",
                    at(key.span()),
                    key.get_ref(),
                    key.get_ref(),
                    PLATFORM_ENV.join(", ")
                );
            }
            Ok((key.into_inner(), value.0))
        })
        .collect()
}

/// Loads a `.env` file the way foreman and `heroku local` do: `KEY=value` lines, `#` comments,
/// optional `export`, quotes.
fn load_env_file(path: &Path) -> Result<BTreeMap<String, String>> {
    let mut env = BTreeMap::new();
    let iter = dotenvy::from_path_iter(path)
        .with_context(|| format!("failed to read `{}`", path.display()))?;
    for item in iter {
        let (key, value) = item.map_err(|e| match e {
            dotenvy::Error::LineParse(line, index) => {
                let text = std::fs::read_to_string(path).unwrap_or_default();
                let number = text
                    .lines()
                    .position(|l| l.contains(line.trim()))
                    .map_or(0, |n| n + 1);
                anyhow::anyhow!(
                    "{}:{number}: cannot parse `{}` at character {index}: expected `KEY=value`",
                    path.display(),
                    line.trim()
                )
            }
            other => anyhow::anyhow!("{}: {other}", path.display()),
        })?;
        env.insert(key, value);
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(128))]
        /// The whole loader (manifest parse, then every value check and the merge with the
        /// Procfile) never panics, and every refusal points into the file at fault.
        #[test]
        fn loading_a_manifest_never_panics_and_errors_point_at_the_file(lines in proptest::collection::vec(
            "(\\[processes\\.(web|worker|x-1|[a-z]{1,3})\\]|\\[processes\\.web\\.health\\]|\\[\\[services\\]\\]|\\[state\\]|\\[env\\]\
    |command = \"[a-z. ]{0,8}\"|count = -?[0-9]{1,6}|memory = \"[0-9]{0,5}[A-Za-z]{0,3}\"|singleton = (true|false)\
    |max_requests = [0-9]{1,2}|max_attempts = [0-9]|consume = \"[a-z!]{0,4}\"|buckets = \\[\"[a-z ]{0,3}\"\\]\
    |path = \"[/a-z ]{0,4}\"|threshold = [0-9]|interval = \"[0-9]{1,3}(ms|s|x)\"|restart = \"(always|never|sometimes)\"\
    |listen = \"[0-9.:a-z]{0,15}\"|processes = \\[(\"web\"|\"admin\"|)\\]|url = \"[a-z:/0-9.]{0,12}\"\
    |allowed_outbound_hosts = \\[\"[a-z*.:/ ]{0,10}\"\\]|capacity = \"[0-9]{0,3}[GMK]i?B?\"|[A-Z]{1,3} = [0-9a-z\"]{0,4}\
    |\\[http\\]|(max_body|max_head_bytes) = (\"[0-9.]{0,5}[KMGBk]?i?B?\"|[0-9]{1,4})|(max_headers|max_connections) = -?[0-9]{1,3}\
    |(header_timeout|body_timeout|keepalive_timeout) = \"[0-9]{1,3}(ms|s|x|)\")",
            0..10,
        )) {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("Procfile"), "web: web.wasm\n").unwrap();
            let manifest = lines.join("\n");
            std::fs::write(dir.path().join("wasmform.toml"), &manifest).unwrap();
            if let Err(e) = AppSpec::load(&dir.path().join("Procfile")) {
                let text = format!("{e:#}");
                proptest::prop_assert!(
                    text.contains("wasmform.toml") || text.contains("Procfile"),
                    "{text} for {manifest:?}"
                );
            }
        }
    }

    #[test]
    fn http_sizes_need_a_unit() {
        assert_eq!(parse_http_size("1KiB").unwrap(), ByteSize::bytes(1024));
        assert_eq!(parse_http_size("1.5KiB").unwrap(), ByteSize::bytes(1536));
        assert_eq!(parse_http_size("0B").unwrap(), ByteSize::bytes(0));
        assert_eq!(parse_http_size("2MB").unwrap(), ByteSize::bytes(2_000_000));
        for (input, needle) in [
            ("10", "invalid size `10`: no unit"),
            (
                "0.5B",
                "invalid size `0.5B`: must be a whole number of bytes",
            ),
            ("1XB", "invalid size `1XB`: unknown unit `XB`"),
            ("MiB", "invalid size `MiB`: expected a size with a unit"),
            ("2000000GiB", "up to 1PiB"),
        ] {
            let err = parse_http_size(input).unwrap_err();
            assert!(err.contains(needle), "{input}: {err}");
        }
        assert_eq!(parse_head_bytes("1KiB").unwrap(), ByteSize::bytes(1024));
        assert!(
            parse_head_bytes("17MiB")
                .unwrap_err()
                .contains("invalid head size `17MiB`: must be from 1KiB to 16MiB")
        );
    }

    #[test]
    fn byte_sizes() {
        assert_eq!("256MiB".parse::<ByteSize>().unwrap(), ByteSize::mib(256));
        assert_eq!("512".parse::<ByteSize>().unwrap(), ByteSize::mib(512));
        assert_eq!("1G".parse::<ByteSize>().unwrap(), ByteSize::mib(1024));
        assert_eq!("64KiB".parse::<ByteSize>().unwrap(), ByteSize::bytes(65536));
        assert_eq!(
            "100MB".parse::<ByteSize>().unwrap(),
            ByteSize::bytes(100_000_000)
        );
        let err = "12XB".parse::<ByteSize>().unwrap_err();
        assert!(err.contains("invalid memory size `12XB`"), "{err}");
        assert!("".parse::<ByteSize>().is_err());
        assert!(
            "1KiB"
                .parse::<ByteSize>()
                .unwrap_err()
                .contains("at least 64KiB")
        );
        assert!(
            "5GiB"
                .parse::<ByteSize>()
                .unwrap_err()
                .contains("at most 4GiB")
        );
        assert_eq!(ByteSize::mib(256).to_string(), "256 MiB");
        assert_eq!(ByteSize::bytes(3 << 29).to_string(), "1.5 GiB");
        assert_eq!(ByteSize::bytes((3 << 29) + 4096).to_string(), "1.5 GiB");
        assert_eq!(ByteSize::bytes(1_114_112 + 1).to_string(), "1.1 MiB");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn process_names() {
        assert!(ProcessName::new("web_2-x").is_ok());
        assert!(
            ProcessName::new("we b")
                .unwrap_err()
                .contains("` ` is not allowed")
        );
        assert!(ProcessName::new("").is_err());
    }
}
