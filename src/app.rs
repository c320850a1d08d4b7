//! The resolved application: what the runtime sees after the Procfile has been parsed and
//! validated. Nothing here knows about wasmtime.
//!
//! The small validated value types it is made of live in [`crate::units`] and are re-exported
//! here.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use serde::{Deserialize, Serialize};

pub use crate::units::{ByteSize, ProcessName, parse_capacity, parse_duration};

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
    /// In a cluster: the labels (`up --label KEY=VALUE`) a node must have to run this type.
    #[serde(default)]
    pub placement: BTreeMap<String, String>,
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
            placement: BTreeMap::new(),
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

/// An extra listener (`[[services]]`): HTTP to an HTTP type, or TCP to a TCP process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// Where it listens.
    pub listen: SocketAddr,
    /// The process type it routes to.
    pub process: ProcessName,
    /// `wasmform.toml:12`, for error messages.
    pub origin: String,
    /// `protocol = "tcp"`: connections are balanced over the type's instances, each listening
    /// on its own `$PORT`. `None`: HTTP. Left out of the serialized form for HTTP, so releases
    /// of apps without TCP services keep their digests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpSettings>,
}

/// How a TCP service balances connections (`[[services]]` with `protocol = "tcp"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpSettings {
    /// Open connections per instance; past it, connections go to another instance or wait.
    pub max_connections: u32,
    /// Connections that may wait for an instance with room; past it, new ones are closed at
    /// once.
    pub backlog: u32,
    /// A connection with no byte either way for this long is closed.
    pub idle_timeout: Duration,
    /// How long a new instance has to listen on its `$PORT` before it counts as failed.
    pub ready_timeout: Duration,
    /// How long a stopping instance's open connections may go on before they are closed.
    pub drain_timeout: Duration,
}

impl Default for TcpSettings {
    fn default() -> Self {
        Self {
            max_connections: 256,
            backlog: 128,
            idle_timeout: Duration::from_secs(300),
            ready_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
        }
    }
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
    /// Largest wasi:http fields resource in a guest (`max_fields_size`).
    pub max_fields_size: Option<ByteSize>,
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
            max_fields_size: self.max_fields_size.or(fallback.max_fields_size),
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

    /// Finds a type.
    pub fn process(&self, name: &str) -> Option<&ProcessSpec> {
        self.processes.iter().find(|p| p.name.as_str() == name)
    }
}

/// Variables wasmform gives every instance itself (foreman's `PORT`, Heroku's `DYNO`…): the
/// environment cannot override them.
pub const PLATFORM_ENV: [&str; 7] = [
    "PORT",
    "WASMFORM_PROCESS",
    "WASMFORM_INSTANCE",
    "PS",
    "DYNO",
    "WASMFORM_NODE",
    "WASMFORM_FENCE",
];

#[cfg(test)]
mod tests {
    use super::*;

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
}
