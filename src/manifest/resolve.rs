//! Resolving an app: the Procfile, `wasmform.toml` and `.env` read, checked and merged into an
//! [`AppSpec`]. Every refusal names the file, the line (and column) and the key at fault.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context as _, Result};

use super::dotenv::load_env_file;
use super::{procfile, schema as manifest};
use crate::app::{
    AppSpec, HttpSettings, PLATFORM_ENV, ProcessName, ProcessSpec, Service, TcpSettings,
};
use crate::units::SocketRule;

/// The app-wide keys of a manifest.
struct AppSettings {
    table: BTreeMap<toml::Spanned<String>, manifest::EnvValue>,
    env_file: Option<toml::Spanned<String>>,
    capacity: Option<manifest::Capacity>,
    build: Option<manifest::Build>,
    state: Option<manifest::State>,
    http: Option<manifest::Http>,
}

impl AppSpec {
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

    /// Merges `wasmform.toml` into the Procfile's types (see `docs/manifest.md`): the app's
    /// settings, then each `[processes.NAME]`, then the `[[services]]`.
    fn apply_manifest(&mut self, path: &Path, env: &mut BTreeMap<String, String>) -> Result<()> {
        let text = read(path)?;
        self.sources.push(path.to_path_buf());
        let raw = manifest::parse(&text, path)?;
        let at = |span: std::ops::Range<usize>| {
            let (line, column) = manifest::position(&text, span.start);
            format!("{}:{line}:{column}", path.display())
        };
        let manifest::Manifest {
            env: table,
            env_file,
            capacity,
            build,
            processes,
            services,
            state,
            http,
        } = raw;
        self.apply_app_settings(
            AppSettings {
                table,
                env_file,
                capacity,
                build,
                state,
                http,
            },
            &at,
            env,
        )?;
        for process in &mut self.processes {
            process.env = env.clone();
        }
        for (name, settings) in processes {
            let origin = match manifest::find_process(&text, &name) {
                Some(offset) => at(offset..offset),
                None => path.display().to_string(),
            };
            self.apply_process(&name, settings, origin, &at, env)?;
        }
        for (i, service) in services.iter().enumerate() {
            self.apply_service(i, service, &at)?;
        }
        if self.processes.is_empty() {
            anyhow::bail!(
                "{}: no process types defined: add `[processes.web]` with `command = \"app.wasm\"`",
                path.display()
            );
        }
        Ok(())
    }

    /// The app-wide keys: `env_file`, `env`, `capacity`, `[state]`, `[build]`, `[http]`.
    fn apply_app_settings(
        &mut self,
        settings: AppSettings,
        at: &impl Fn(std::ops::Range<usize>) -> String,
        env: &mut BTreeMap<String, String>,
    ) -> Result<()> {
        let AppSettings {
            table,
            env_file: env_file_key,
            capacity,
            build,
            state,
            http,
        } = settings;
        let env_file = match &env_file_key {
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
        env.extend(platform_checked(table, "env", &at)?);
        self.capacity = capacity.map(|c| c.0);
        if let Some(url) = state.as_ref().and_then(|s| s.url.as_ref()) {
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
        self.build = build.map(|b| b.command);
        if let Some(http) = &http {
            self.http = http
                .resolve()
                .map_err(|e| anyhow::anyhow!("{}: http.{}: {}", at(e.span), e.key, e.message))?;
        }
        Ok(())
    }

    /// One `[processes.NAME]`: a type of the Procfile given settings, or a new type with its
    /// own `command`.
    fn apply_process(
        &mut self,
        name: &str,
        settings: manifest::Process,
        origin: String,
        at: &impl Fn(std::ops::Range<usize>) -> String,
        env: &BTreeMap<String, String>,
    ) -> Result<()> {
        let name = ProcessName::new(name)
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
                let words = procfile::split_words(command.get_ref())
                    .map_err(|e| anyhow::anyhow!("{}: {key}.command: {e}", at(command.span())))?;
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
        apply_settings(spec, settings, &key, at)?;
        spec.origin = if spec.origin.ends_with(".toml") || existing.is_none() {
            origin
        } else {
            spec.origin.clone()
        };
        Ok(())
    }

    /// One `[[services]]` entry: a listener routed to one HTTP type.
    fn apply_service(
        &mut self,
        i: usize,
        service: &toml::Spanned<manifest::Service>,
        at: &impl Fn(std::ops::Range<usize>) -> String,
    ) -> Result<()> {
        let origin = at(service.span());
        let service = service.get_ref();
        let key = format!("services[{i}]");
        let listen = manifest::listen_address(service.listen.get_ref())
            .map_err(|e| anyhow::anyhow!("{}: {key}.listen: {e}", at(service.listen.span())))?;
        let tcp = match service.protocol.as_ref() {
            None => false,
            Some(p) if p.get_ref() == "http" => false,
            Some(p) if p.get_ref() == "tcp" => true,
            Some(p) => anyhow::bail!(
                "{}: {key}.protocol: unknown protocol `{}`: a service speaks \"http\" (the default) or \"tcp\"",
                at(p.span()),
                p.get_ref()
            ),
        };
        let tcp = if tcp {
            Some(tcp_settings(service, &key, at)?)
        } else {
            let tcp_only = [
                (
                    "max_connections",
                    service.max_connections.as_ref().map(|v| v.span()),
                ),
                ("backlog", service.backlog.as_ref().map(|v| v.span())),
                (
                    "idle_timeout",
                    service.idle_timeout.as_ref().map(|v| v.span()),
                ),
                (
                    "ready_timeout",
                    service.ready_timeout.as_ref().map(|v| v.span()),
                ),
                (
                    "drain_timeout",
                    service.drain_timeout.as_ref().map(|v| v.span()),
                ),
            ];
            if let Some((name, Some(span))) = tcp_only.into_iter().find(|(_, s)| s.is_some()) {
                anyhow::bail!(
                    "{}: {key}.{name}: applies to TCP services only: add `protocol = \"tcp\"` to this service, or remove `{name}`",
                    at(span)
                );
            }
            None
        };
        let what = if tcp.is_some() { "TCP" } else { "HTTP" };
        let processes = at(service.processes.span());
        let [process] = service.processes.get_ref().as_slice() else {
            anyhow::bail!(
                "{processes}: {key}.processes: a service routes to exactly one {what} process type, e.g. `processes = [\"admin\"]` (found {})",
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
        if let Some(other) = self
            .services
            .iter()
            .find(|s| s.process == spec.name && s.tcp.is_some() != tcp.is_some())
        {
            anyhow::bail!(
                "{processes}: {key}.processes: `{process}` is routed {} by the service at {}, so it cannot take {what} too: a process type speaks one protocol",
                if other.tcp.is_some() { "TCP" } else { "HTTP" },
                other.origin
            );
        }
        self.services.push(Service {
            listen,
            process: spec.name.clone(),
            origin,
            tcp,
        });
        Ok(())
    }
}

/// A TCP service's settings, each checked where it was written.
fn tcp_settings(
    service: &manifest::Service,
    key: &str,
    at: &impl Fn(std::ops::Range<usize>) -> String,
) -> Result<TcpSettings> {
    let defaults = TcpSettings::default();
    let count = |value: &Option<toml::Spanned<u32>>, name: &str, default: u32| match value {
        Some(v) if *v.get_ref() == 0 => Err(anyhow::anyhow!(
            "{}: {key}.{name}: must be at least 1",
            at(v.span())
        )),
        Some(v) => Ok(*v.get_ref()),
        None => Ok(default),
    };
    let duration = |value: &Option<toml::Spanned<manifest::DurationValue>>, default| {
        value.as_ref().map_or(default, |v| v.get_ref().0)
    };
    Ok(TcpSettings {
        max_connections: count(
            &service.max_connections,
            "max_connections",
            defaults.max_connections,
        )?,
        // 0 is allowed: no waiting, a connection finds room or is closed at once.
        backlog: service
            .backlog
            .as_ref()
            .map_or(defaults.backlog, |v| *v.get_ref()),
        idle_timeout: duration(&service.idle_timeout, defaults.idle_timeout),
        ready_timeout: duration(&service.ready_timeout, defaults.ready_timeout),
        drain_timeout: duration(&service.drain_timeout, defaults.drain_timeout),
    })
}

/// A `[processes.NAME]` table's settings onto its type (`key`: `processes.NAME`). One block
/// per key, each checking its value where it was written: longer than most functions, but a
/// list read top to bottom.
fn apply_settings(
    spec: &mut ProcessSpec,
    settings: manifest::Process,
    key: &str,
    at: &impl Fn(std::ops::Range<usize>) -> String,
) -> Result<()> {
    let name = spec.name.clone();
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
    for (label, value) in &settings.placement {
        for (part, span) in [
            (label.get_ref(), label.span()),
            (value.get_ref(), value.span()),
        ] {
            crate::units::check_label(part).map_err(|e| {
                anyhow::anyhow!("{}: {key}.placement.{}: {e}", at(span), label.get_ref())
            })?;
        }
        spec.placement
            .insert(label.get_ref().clone(), value.get_ref().clone());
    }
    Ok(())
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
/// `tcp://ADDR:PORT` and `udp://ADDR:PORT` open sockets instead ([`SocketRule`]) and are kept
/// as written.
fn check_outbound_host(host: &str) -> Result<String> {
    if let Some(rule) = SocketRule::parse(host) {
        rule.map_err(|e| anyhow::anyhow!(e))?;
        return Ok(host.to_string());
    }
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
}
