//! `wasmform.toml`: per-type settings that a Procfile cannot express, parsed into a raw schema
//! (`deny_unknown_fields`) and resolved into the [`AppSpec`](crate::app::AppSpec) together with
//! the Procfile and the `.env` file. The whole schema is documented in `docs/manifest.md`.
//!
//! Every error names the file, line and column, the key path (`processes.web.memory`) and what
//! to write instead. Nothing here knows about wasmtime.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::app::{ByteSize, HealthCheck, RestartMode, parse_duration};

/// File name of the manifest.
pub const FILE_NAME: &str = "wasmform.toml";

/// The manifest as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Variables every process type gets (after the `.env` file, before the type's own).
    #[serde(default)]
    pub env: BTreeMap<Spanned<String>, EnvValue>,
    /// The env file to load, relative to the manifest (default `.env`, if it exists).
    pub env_file: Option<Spanned<String>>,
    /// Memory budget for all instances (`--capacity` overrides it).
    pub capacity: Option<Capacity>,
    /// What `up --build` runs.
    pub build: Option<Build>,
    /// Process types by name.
    #[serde(default)]
    pub processes: BTreeMap<String, Process>,
    /// Extra HTTP listeners, as in fly.toml.
    #[serde(default)]
    pub services: Vec<Spanned<Service>>,
    /// Where shared state (buckets, queues) lives.
    pub state: Option<State>,
    /// Limits of the HTTP front door.
    pub http: Option<Http>,
}

/// `[http]`: the front door's limits, for every listener of the app. `up`'s flags of the same
/// names (`--max-body` for `max_body`…) override them.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Http {
    /// Largest request body (413 above it).
    pub max_body: Option<HttpSize>,
    /// Most header fields in a request (431 above it).
    pub max_headers: Option<Spanned<usize>>,
    /// Largest request head: request line and headers (431 above it).
    pub max_head_bytes: Option<Spanned<HttpSize>>,
    /// Longest time to send a request head.
    pub header_timeout: Option<DurationValue>,
    /// Longest stall of a request body while the guest reads it (408 after).
    pub body_timeout: Option<DurationValue>,
    /// Longest idle time of a keep-alive connection between requests.
    pub keepalive_timeout: Option<DurationValue>,
    /// Most open client connections (503 past it).
    pub max_connections: Option<Spanned<usize>>,
    /// Largest size of one wasi:http fields resource (headers, trailers) in a guest.
    pub max_fields_size: Option<HttpSize>,
}

impl Http {
    /// The settings, checked.
    pub fn resolve(&self) -> Result<crate::app::HttpSettings, FieldError> {
        let at_least_one = |value: &Option<Spanned<usize>>, key| match value {
            Some(v) if *v.get_ref() == 0 => {
                Err(FieldError::new(v, key, "must be at least 1".to_string()))
            }
            _ => Ok(value.as_ref().map(|v| *v.get_ref())),
        };
        let max_head_bytes = match &self.max_head_bytes {
            Some(size) => {
                let bytes = size.get_ref().0.as_u64();
                if !(crate::app::MIN_HEAD_BYTES..=crate::app::MAX_HEAD_BYTES).contains(&bytes) {
                    return Err(FieldError::new(
                        size,
                        "max_head_bytes",
                        format!(
                            "invalid head size `{}`: must be from 1KiB to 16MiB",
                            size.get_ref().1
                        ),
                    ));
                }
                Some(size.get_ref().0)
            }
            None => None,
        };
        Ok(crate::app::HttpSettings {
            max_body: self.max_body.as_ref().map(|s| s.0),
            max_headers: at_least_one(&self.max_headers, "max_headers")?,
            max_head_bytes,
            header_timeout: self.header_timeout.map(|d| d.0),
            body_timeout: self.body_timeout.map(|d| d.0),
            keepalive_timeout: self.keepalive_timeout.map(|d| d.0),
            max_connections: at_least_one(&self.max_connections, "max_connections")?,
            max_fields_size: self.max_fields_size.as_ref().map(|s| s.0),
        })
    }
}

/// An HTTP size limit: `"10MiB"`, `"64KiB"`, `"1024B"` (a unit is required), and the text as
/// written, for messages.
#[derive(Debug, Clone)]
pub struct HttpSize(pub ByteSize, pub String);

impl<'de> Deserialize<'de> for HttpSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = match toml::Value::deserialize(d)? {
            toml::Value::String(s) => s,
            other => {
                return Err(serde::de::Error::custom(format!(
                    "expected a size with a unit such as \"1MiB\" or \"1024B\", found {}",
                    other.type_str()
                )));
            }
        };
        crate::app::parse_http_size(&text)
            .map(|size| Self(size, text))
            .map_err(serde::de::Error::custom)
    }
}

/// `[state]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// `redis://127.0.0.1:6379`; absent: the embedded store in the state directory.
    pub url: Option<Spanned<String>>,
}

/// `[build]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Build {
    /// A shell command run in the manifest's directory, e.g. `cargo build --release`.
    pub command: String,
}

/// `[processes.NAME]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Process {
    /// `component.wasm [args…]`, as in a Procfile line; absent if the Procfile defines the type.
    pub command: Option<Spanned<String>>,
    /// Instances when the type first runs, or when this value changes in a deploy.
    pub count: Option<Spanned<u32>>,
    /// Memory limit per instance.
    pub memory: Option<Spanned<Memory>>,
    /// At most one instance, ever (a clock).
    #[serde(default)]
    pub singleton: bool,
    /// When an instance that ended is started again.
    pub restart: Option<RestartMode>,
    /// Longest time for a response's headers (504 after).
    pub request_timeout: Option<Spanned<DurationValue>>,
    /// Recycle an instance after this many requests (as gunicorn's `max_requests`).
    pub max_requests: Option<Spanned<u64>>,
    /// Variables of this type only.
    #[serde(default)]
    pub env: BTreeMap<Spanned<String>, EnvValue>,
    /// A readiness and liveness check.
    pub health: Option<Health>,
    /// Hosts that outgoing HTTP requests may go to (none by default).
    #[serde(default)]
    pub allowed_outbound_hosts: Vec<Spanned<String>>,
    /// Key-value buckets the type may open (none by default).
    #[serde(default)]
    pub buckets: Vec<Spanned<String>>,
    /// Queues the type may enqueue to (none by default).
    #[serde(default)]
    pub queues: Vec<Spanned<String>>,
    /// The queue a consumer type handles.
    pub consume: Option<Spanned<String>>,
    /// Deliveries of one message before it is dead-lettered (default 5).
    pub max_attempts: Option<Spanned<u32>>,
    /// In a cluster: the labels a node must have (`up --label`) to run this type.
    #[serde(default)]
    pub placement: BTreeMap<Spanned<String>, Spanned<String>>,
}

/// `[processes.NAME.health]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// Path requested with GET, e.g. `/health`; 2xx and 3xx pass.
    pub path: Spanned<String>,
    /// Time between checks of a running instance (default 10s).
    pub interval: Option<DurationValue>,
    /// Longest a check may take (default 2s).
    pub timeout: Option<DurationValue>,
    /// How long a new instance has to pass its first check (default 30s).
    pub grace: Option<DurationValue>,
    /// Failed checks in a row that take an instance out and restart it (default 3).
    pub threshold: Option<Spanned<u32>>,
}

/// `[[services]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// `http` (the default) or `tcp`.
    pub protocol: Option<Spanned<String>>,
    /// `127.0.0.1:8081`.
    pub listen: Spanned<String>,
    /// The process type this port routes to (exactly one).
    pub processes: Spanned<Vec<String>>,
    /// TCP: open connections per instance before the next one goes elsewhere (default 256).
    pub max_connections: Option<Spanned<u32>>,
    /// TCP: connections that may wait for an instance with room (default 128).
    pub backlog: Option<Spanned<u32>>,
    /// TCP: a connection with no byte either way for this long is closed (default 5m).
    pub idle_timeout: Option<Spanned<DurationValue>>,
    /// TCP: how long a new instance has to listen on its `$PORT` (default 30s).
    pub ready_timeout: Option<Spanned<DurationValue>>,
    /// TCP: how long a stopping instance's open connections may go on (default 30s).
    pub drain_timeout: Option<Spanned<DurationValue>>,
}

/// An env value: strings, numbers and booleans are accepted and passed as text.
#[derive(Debug, Clone)]
pub struct EnvValue(pub String);

impl<'de> Deserialize<'de> for EnvValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match toml::Value::deserialize(d)? {
            toml::Value::String(s) => Ok(Self(s)),
            toml::Value::Integer(i) => Ok(Self(i.to_string())),
            toml::Value::Float(f) => Ok(Self(f.to_string())),
            toml::Value::Boolean(b) => Ok(Self(b.to_string())),
            other => Err(serde::de::Error::custom(format!(
                "an env value must be a string, number or boolean, not {}",
                other.type_str()
            ))),
        }
    }
}

/// A per-instance memory size: `"256MiB"`, or a bare number of MiB.
#[derive(Debug, Clone, Copy)]
pub struct Memory(pub ByteSize);

impl<'de> Deserialize<'de> for Memory {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = match toml::Value::deserialize(d)? {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            other => {
                return Err(serde::de::Error::custom(format!(
                    "expected a size such as \"256MiB\", found {}",
                    other.type_str()
                )));
            }
        };
        text.parse().map(Self).map_err(serde::de::Error::custom)
    }
}

/// A host-wide size, which may be above 4 GiB.
#[derive(Debug, Clone, Copy)]
pub struct Capacity(pub ByteSize);

impl<'de> Deserialize<'de> for Capacity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        crate::app::parse_capacity(&text)
            .map(Self)
            .map_err(serde::de::Error::custom)
    }
}

/// A duration: `"30s"`, `"500ms"`, `"2m"`, or a number of seconds.
#[derive(Debug, Clone, Copy)]
pub struct DurationValue(pub Duration);

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = match toml::Value::deserialize(d)? {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) if i >= 0 => i.to_string(),
            toml::Value::Float(f) if f >= 0.0 => f.to_string(),
            other => {
                return Err(serde::de::Error::custom(format!(
                    "expected a duration such as \"30s\" or \"500ms\", found {}",
                    other.type_str()
                )));
            }
        };
        let value = parse_duration(&text).map_err(serde::de::Error::custom)?;
        if value.is_zero() {
            return Err(serde::de::Error::custom(format!(
                "invalid duration `{text}`: must be above zero"
            )));
        }
        Ok(Self(value))
    }
}

/// A manifest error with its position. `Display`: `wasmform.toml:5:10: processes.web.memory: …`.
#[derive(Debug, Clone, PartialEq)]
pub struct Error {
    /// The manifest file.
    pub file: PathBuf,
    /// 1-based line and column, when known.
    pub position: Option<(usize, usize)>,
    /// Dotted key path, when known.
    pub key: Option<String>,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((line, column)) = self.position {
            write!(f, ":{line}:{column}")?;
        }
        write!(f, ": ")?;
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// 1-based line and column of byte `offset` in `text`.
pub fn position(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..text.floor_char_boundary(offset)];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Parses a manifest's text; `file` is for messages.
pub fn parse(text: &str, file: &Path) -> Result<Manifest, Error> {
    let fail = |position: Option<(usize, usize)>, key: Option<String>, message: String| Error {
        file: file.to_path_buf(),
        position,
        key,
        message,
    };
    let deserializer = toml::de::Deserializer::parse(text).map_err(|e| {
        fail(
            e.span().map(|s| position(text, s.start)),
            None,
            e.message().trim().to_string(),
        )
    })?;
    let manifest: Manifest = serde_path_to_error::deserialize(deserializer).map_err(|e| {
        // `Spanned` values show up as a private segment of the path; it means the value itself.
        let path = e
            .path()
            .to_string()
            .replace(".$__serde_spanned_private_value", "");
        let inner = e.into_inner();
        fail(
            inner.span().map(|s| position(text, s.start)),
            (path != "." && !path.is_empty()).then_some(path),
            inner.message().trim().to_string(),
        )
    })?;
    Ok(manifest)
}

impl Manifest {
    /// Resolved health check of a type, defaults filled in.
    pub fn health(health: &Health) -> Result<HealthCheck, FieldError> {
        let path = health.path.get_ref();
        if !path.starts_with('/') {
            return Err(FieldError::new(
                &health.path,
                "path",
                format!("health check path `{path}` must start with `/`, e.g. \"/health\""),
            ));
        }
        if path.parse::<http::uri::PathAndQuery>().is_err() {
            return Err(FieldError::new(
                &health.path,
                "path",
                format!("health check path `{path}` is not a valid URL path"),
            ));
        }
        let threshold = match &health.threshold {
            Some(t) if *t.get_ref() == 0 => {
                return Err(FieldError::new(
                    t,
                    "threshold",
                    "must be at least 1".to_string(),
                ));
            }
            Some(t) => *t.get_ref(),
            None => 3,
        };
        Ok(HealthCheck {
            path: path.clone(),
            interval: health.interval.map_or(Duration::from_secs(10), |d| d.0),
            timeout: health.timeout.map_or(Duration::from_secs(2), |d| d.0),
            grace: health.grace.map_or(Duration::from_secs(30), |d| d.0),
            threshold,
        })
    }
}

/// A value that parsed but is not valid: where it is, which key, and why.
#[derive(Debug)]
pub struct FieldError {
    /// Byte range of the value in the manifest.
    pub span: std::ops::Range<usize>,
    /// The key, relative to the table checked (`path`, `threshold`).
    pub key: &'static str,
    /// What is wrong and what to do.
    pub message: String,
}

impl FieldError {
    fn new<T>(value: &Spanned<T>, key: &'static str, message: String) -> Self {
        Self {
            span: value.span(),
            key,
            message,
        }
    }
}

/// Byte offset of where process type `name` is declared: its `[processes.NAME]` table, a
/// sub-table, or an inline `NAME = {…}` entry. For messages about a type as a whole.
pub fn find_process(text: &str, name: &str) -> Option<usize> {
    let patterns = [
        format!("[processes.{name}]"),
        format!("[processes.{name}."),
        format!("processes.{name}."),
        format!("\"{name}\""),
        format!("{name} ="),
        format!("{name}="),
    ];
    patterns.iter().find_map(|p| text.find(p.as_str()))
}

/// Checks a `[[services]]` listen address: loopback unless written out explicitly.
pub fn listen_address(text: &str) -> Result<SocketAddr, String> {
    text.parse::<SocketAddr>().map_err(|_| {
        format!("invalid listen address `{text}`: expected `IP:PORT`, e.g. \"127.0.0.1:8081\"")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> Error {
        parse(text, Path::new("wasmform.toml")).unwrap_err()
    }

    #[test]
    fn parses_the_documented_example() {
        // The annotated example in docs/manifest.md, so the docs cannot drift from the schema.
        let doc = include_str!("../../docs/manifest.md");
        let text = doc
            .split("```toml\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("docs/manifest.md has a ```toml example");
        let m = parse(text, Path::new("docs/manifest.md")).unwrap();
        assert_eq!(m.env["RETRIES"].0, "3");
        let web = &m.processes["web"];
        assert_eq!(web.memory.as_ref().unwrap().get_ref().0, ByteSize::mib(128));
        assert_eq!(*web.count.as_ref().unwrap().get_ref(), 4);
        let health = Manifest::health(web.health.as_ref().unwrap()).unwrap();
        assert_eq!(health.threshold, 3);
        let clock = &m.processes["clock"];
        assert!(clock.singleton);
        assert_eq!(clock.restart, Some(RestartMode::OnFailure));
        assert_eq!(
            m.processes["mailer"].consume.as_ref().unwrap().get_ref(),
            "mail"
        );
        assert_eq!(m.services.len(), 2);
        let tcp = m.services[1].get_ref();
        assert_eq!(tcp.protocol.as_ref().unwrap().get_ref(), "tcp");
        assert_eq!(*tcp.max_connections.as_ref().unwrap().get_ref(), 256);
        assert_eq!(
            tcp.idle_timeout.as_ref().unwrap().get_ref().0,
            Duration::from_secs(300)
        );
        let http = m.http.as_ref().unwrap().resolve().unwrap();
        assert_eq!(http.max_head_bytes, Some(ByteSize::bytes(64 << 10)));
        assert_eq!(http.keepalive_timeout, Some(Duration::from_secs(75)));
        assert_eq!(http.max_connections, Some(10_000));
    }

    #[test]
    fn errors_carry_line_column_and_key_path() {
        let e = err("[processes.web]\ncommand = \"a.wasm\"\ncout = 2\n");
        assert_eq!(e.position, Some((3, 1)), "{e}");
        assert!(e.message.contains("unknown field `cout`"), "{e}");
        assert!(e.to_string().starts_with("wasmform.toml:3:1: "), "{e}");

        let e = err("[processes.web]\nmemory = \"12XB\"\n");
        assert_eq!(e.key.as_deref(), Some("processes.web.memory"), "{e}");
        assert_eq!(e.position.map(|p| p.0), Some(2), "{e}");
        assert!(e.message.contains("invalid memory size `12XB`"), "{e}");

        let e = err("[processes.web]\ncount = \"two\"\n");
        assert_eq!(e.key.as_deref(), Some("processes.web.count"), "{e}");
        assert!(e.message.contains("invalid type"), "{e}");

        let e = err("[processes.web]\ncommand = 5\n");
        assert_eq!(e.key.as_deref(), Some("processes.web.command"), "{e}");
        assert_eq!(e.position.map(|p| p.0), Some(2), "{e}");

        let e = err("[processes.web]\nrestart = \"sometimes\"\n");
        assert!(e.message.contains("unknown variant `sometimes`"), "{e}");

        let e = err("[processes.web.health]\npath = \"/h\"\ninterval = \"soon\"\n");
        assert_eq!(
            e.key.as_deref(),
            Some("processes.web.health.interval"),
            "{e}"
        );
        assert_eq!(e.position.map(|p| p.0), Some(3), "{e}");

        let e = err("[processes.web\n");
        assert_eq!(e.position.map(|p| p.0), Some(1), "{e}");

        let e = err("[env]\nLIST = [1]\n");
        assert!(e.message.contains("string, number or boolean"), "{e}");
    }

    proptest::proptest! {
        /// Any text parses or fails with a position inside it and a message; never a panic.
        #[test]
        fn never_panics(text in "\\PC{0,200}", lines in proptest::collection::vec(
            "(\\[processes\\.[a-z]{1,4}\\]|command = \"[a-z.]{0,6}\"|count = -?[0-9]{1,3}|memory = \"[0-9]{0,4}[A-Za-z]{0,3}\"|singleton = (true|1)|[a-z_]{1,8} = [0-9\"a-z]{0,5}|\\[\\[services\\]\\]|health = \\{ path = \"[/a-z]{0,4}\" \\})", 0..8)) {
            for input in [text, lines.join("\n")] {
                if let Err(e) = parse(&input, Path::new("m.toml")) {
                    proptest::prop_assert!(!e.message.is_empty());
                    if let Some((line, column)) = e.position {
                        proptest::prop_assert!(line >= 1 && line <= input.lines().count().max(1) + 1, "{e} for {input:?}");
                        proptest::prop_assert!(column >= 1);
                    }
                }
            }
        }
    }
}
