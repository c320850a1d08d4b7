//! `wasmform export systemd`: a systemd unit that runs the app (foreman's `export`, adapted:
//! wasmform supervises its own instances, so one unit per app runs `wasmform up`, not one per
//! instance).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use super::up::parse_size;
use crate::app::{AppSpec, parse_duration};
use crate::units::ByteSize;

/// Write a systemd unit that runs this app with `wasmform up`.
///
/// The unit is `Type=notify` (READY once the formation is ready), restarts on failure, is
/// watched by systemd's watchdog, reloads with `wasmform deploy`, and stops with SIGTERM
/// within the grace period. Existing files are kept unless `--force`.
///
/// Example: `wasmform export systemd /etc/systemd/system -a shop -u shop -m web=4,worker=2 -p 8080`
#[derive(clap::Args, Debug)]
pub struct ExportCommand {
    /// The format: `systemd`.
    #[arg(value_parser = ["systemd"])]
    format: String,

    /// Where to write `APP.service` (a directory), or `-` for standard output.
    #[arg(default_value = "-")]
    location: PathBuf,

    /// The Procfile (or wasmform.toml) of the app.
    #[arg(short = 'f', long = "procfile", default_value = "Procfile")]
    procfile: PathBuf,

    /// The unit's name (`APP.service`). Default: the app directory's name.
    #[arg(short = 'a', long = "app-name", value_name = "APP")]
    name: Option<String>,

    /// The user the unit runs as (`User=`). Default: systemd's (root).
    #[arg(short = 'u', long = "user")]
    user: Option<String>,

    /// The formation `up` pins (`web=2,worker=1`).
    #[arg(short = 'm', long = "formation")]
    formation: Option<String>,

    /// The HTTP port.
    #[arg(short = 'p', long = "port", default_value_t = 5000)]
    port: u16,

    /// The address the front door binds (`up --host`).
    #[arg(long = "host", default_value = "127.0.0.1")]
    host: std::net::IpAddr,

    /// The host's state directory (`up --state-dir`), e.g. `/var/lib/wasmform/shop`; one under
    /// `/var/lib` becomes the unit's `StateDirectory=`. Default: `.wasmform/` in the app.
    #[arg(long = "state-dir", value_name = "DIR")]
    state_dir: Option<PathBuf>,

    /// Also write `APP.socket`: systemd holds the front door's and the services' sockets, so
    /// connections made while the host restarts wait instead of being refused.
    #[arg(long = "socket-activation")]
    socket_activation: bool,

    /// How long in-flight requests may take at shutdown (`up --grace`); `TimeoutStopSec`
    /// covers it.
    #[arg(long = "grace", default_value = "30s", value_parser = parse_duration)]
    grace: Duration,

    /// `WatchdogSec=`: systemd restarts the host when its runtime stops pinging for this long
    /// (`0` turns the watchdog off).
    #[arg(long = "watchdog", default_value = "30s", value_parser = parse_duration)]
    watchdog: Duration,

    /// `MemoryMax=` of the unit: the whole host's memory, instances included.
    #[arg(long = "memory-max", value_parser = parse_size)]
    memory_max: Option<ByteSize>,

    /// Open client connections of the front door (`up --max-connections`); `LimitNOFILE`
    /// is set above it.
    #[arg(long = "max-connections", default_value_t = 10_000)]
    max_connections: u64,

    /// Overwrite an existing unit file.
    #[arg(long = "force")]
    force: bool,
}

impl ExportCommand {
    pub fn execute(self) -> Result<()> {
        let app = AppSpec::from_procfile(&self.procfile)?;
        let procfile = std::fs::canonicalize(&self.procfile)
            .with_context(|| format!("cannot resolve `{}`", self.procfile.display()))?;
        let name = match &self.name {
            Some(name) => name.clone(),
            None => app
                .dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "wasmform".to_string()),
        };
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            bail!(
                "-a {name:?}: a unit name takes letters, digits, `-`, `_` and `.` only, e.g. `-a shop`"
            );
        }
        if let Some(formation) = &self.formation {
            // The same check `up -m` makes, now rather than when systemd starts it.
            crate::formation::Formation::default_for(&app, crate::host::DEFAULT_MEMORY)
                .apply_spec(formation)
                .map_err(|e| anyhow::anyhow!("-m {formation}: {e}"))?;
        }
        if let Some(dir) = &self.state_dir
            && !dir.is_absolute()
        {
            bail!(
                "--state-dir {}: systemd starts the unit elsewhere, so give an absolute path (e.g. /var/lib/wasmform/{name})",
                dir.display()
            );
        }
        let exe = std::env::current_exe().context("cannot find the wasmform executable")?;
        let mut files = vec![(
            format!("{name}.service"),
            self.unit(&name, &exe, &procfile, &app.dir),
        )];
        if self.socket_activation {
            files.push((format!("{name}.socket"), self.socket(&name, &app)));
        }
        if self.location == Path::new("-") {
            for (file, text) in &files {
                if files.len() > 1 {
                    println!("# {file}");
                }
                print!("{text}");
            }
            return Ok(());
        }
        if !self.location.is_dir() {
            bail!(
                "{}: not a directory: export writes `{name}.service` into a directory (e.g. /etc/systemd/system), or to standard output with `-`",
                self.location.display()
            );
        }
        // Nothing is written unless every file may be.
        for (file, _) in &files {
            let path = self.location.join(file);
            if path.exists() && !self.force {
                bail!(
                    "{} exists: it is kept; pass --force to overwrite it",
                    path.display()
                );
            }
        }
        for (file, text) in &files {
            let path = self.location.join(file);
            std::fs::write(&path, text)
                .with_context(|| format!("cannot write {}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
        let enable = if self.socket_activation {
            format!("{name}.socket {name}.service")
        } else {
            name
        };
        eprintln!("then: systemctl daemon-reload && systemctl enable --now {enable}");
        Ok(())
    }

    /// The `.socket` unit: the front door's address and every `[[services]]` listen address,
    /// which `up` matches to its listeners by address.
    fn socket(&self, name: &str, app: &AppSpec) -> String {
        let mut listen = vec![format!(
            "ListenStream={}",
            std::net::SocketAddr::new(self.host, self.port)
        )];
        listen.extend(
            app.services
                .iter()
                .map(|s| format!("ListenStream={}", s.listen)),
        );
        format!(
            "# Written by `wasmform export systemd --socket-activation`. `wasmform up` adopts\n\
             # each socket as the listener with the same address.\n\
             [Unit]\n\
             Description=sockets of wasmform app {name}\n\
             \n\
             [Socket]\n\
             {}\n\
             NoDelay=true\n\
             Backlog=4096\n\
             Service={name}.service\n\
             \n\
             [Install]\n\
             WantedBy=sockets.target\n",
            listen.join("\n"),
        )
    }

    /// The unit's text.
    fn unit(&self, name: &str, exe: &Path, procfile: &Path, dir: &Path) -> String {
        let exe = exe.display();
        let mut start = format!(
            "{exe} up -f {} -p {} --grace {}",
            procfile.display(),
            self.port,
            systemd_time(self.grace)
        );
        if self.host != std::net::IpAddr::from([127, 0, 0, 1]) {
            start.push_str(&format!(" --host {}", self.host));
        }
        if let Some(formation) = &self.formation {
            start.push_str(&format!(" -m {formation}"));
        }
        let mut app = format!("--app {}", dir.display());
        if let Some(state) = &self.state_dir {
            start.push_str(&format!(" --state-dir {}", state.display()));
            app = format!("--state-dir {}", state.display());
        }
        if self.max_connections != 10_000 {
            start.push_str(&format!(" --max-connections {}", self.max_connections));
        }
        let mut service = vec!["Type=notify".to_string(), "NotifyAccess=main".to_string()];
        if let Some(user) = &self.user {
            service.push(format!("User={user}"));
        }
        service.extend([
            format!("WorkingDirectory={}", dir.display()),
            format!("ExecStart={start}"),
            format!("ExecReload={exe} deploy {app}"),
            "KillSignal=SIGTERM".to_string(),
            // The grace, the instances' own drain after it, and a margin.
            format!(
                "TimeoutStopSec={}",
                systemd_time(self.grace + Duration::from_secs(15))
            ),
            "Restart=on-failure".to_string(),
            "RestartSec=1s".to_string(),
        ]);
        if let Some(relative) = self
            .state_dir
            .as_ref()
            .and_then(|d| d.strip_prefix("/var/lib").ok())
        {
            // systemd creates it, owned by `User=`.
            service.push(format!("StateDirectory={}", relative.display()));
            service.push("StateDirectoryMode=0700".to_string());
        }
        if self.socket_activation {
            service.push(format!("Sockets={name}.socket"));
        }
        if !self.watchdog.is_zero() {
            service.push(format!("WatchdogSec={}", systemd_time(self.watchdog)));
        }
        // Every connection and instance holds descriptors; keep well above the front door's
        // own limit.
        service.push(format!(
            "LimitNOFILE={}",
            (self.max_connections * 2 + 1024).max(65_536)
        ));
        if let Some(memory) = self.memory_max {
            // Never LimitAS: the pooling allocator reserves address space it does not use.
            service.push(format!("MemoryMax={}", memory.as_u64()));
        }
        service.push("Environment=RUST_BACKTRACE=0".to_string());
        format!(
            "# Written by `wasmform export systemd`. Never MemoryDenyWriteExecute= (the\n\
             # Cranelift JIT writes code) nor LimitAS= (the pooling allocator reserves\n\
             # address space it does not use).\n\
             [Unit]\n\
             Description=wasmform app {name} ({procfile})\n\
             Wants=network-online.target\n\
             After=network-online.target{sockets}\n\
             \n\
             [Service]\n\
             {}\n\
             \n\
             [Install]\n\
             WantedBy=multi-user.target\n",
            service.join("\n"),
            procfile = procfile.display(),
            sockets = if self.socket_activation {
                format!("\nRequires={name}.socket\nAfter={name}.socket")
            } else {
                String::new()
            },
        )
    }
}

/// A duration as systemd writes one (`30s`, `1500ms`).
fn systemd_time(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}
