//! Command-line interface: one file per subcommand, each a clap struct with `execute`.
//! `up` runs a host; the others are clients of a running host's control API.

mod client;
mod deploy;
mod detach;
mod down;
mod events;
mod export;
mod logs;
mod node;
mod pidfd;
mod ps;
mod releases;
mod restart;
mod rollback;
mod run;
mod scale;
mod systemd;
mod up;
mod wait;

/// The exit status of a client command that found no host running for the app (the shared
/// codes: 0 ok, 1 failed with the reason on stderr, 2 usage, 3 no host, 124 timed out).
pub const NO_HOST: u8 = 3;

/// The exit status for a command that failed with `error`.
pub fn exit_code(error: &anyhow::Error) -> std::process::ExitCode {
    if error.downcast_ref::<client::NoHost>().is_some() {
        std::process::ExitCode::from(NO_HOST)
    } else {
        std::process::ExitCode::FAILURE
    }
}

/// Runs a Procfile of WebAssembly components as a formation of isolated instances.
#[derive(clap::Parser, Debug)]
#[command(name = "wasmform", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand, Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "parsed once per process; boxing would only obscure the clap definitions"
)]
enum Command {
    Up(up::UpCommand),
    // Also `ps:scale`, as Heroku spells it.
    #[command(alias = "ps:scale")]
    Scale(scale::ScaleCommand),
    Ps(ps::PsCommand),
    Logs(logs::LogsCommand),
    Restart(restart::RestartCommand),
    Deploy(deploy::DeployCommand),
    Releases(releases::ReleasesCommand),
    Rollback(rollback::RollbackCommand),
    Down(down::DownCommand),
    Wait(wait::WaitCommand),
    Events(events::EventsCommand),
    Run(run::RunCommand),
    Export(export::ExportCommand),
    Node(node::NodeCommand),
}

impl Cli {
    /// Whether this command runs a host (`up`), rather than being a client of one.
    pub fn runs_a_host(&self) -> bool {
        matches!(self.command, Command::Up(_))
    }

    /// Runs the chosen subcommand; its exit code (`up -- CMD` exits with CMD's).
    pub fn execute(self) -> anyhow::Result<std::process::ExitCode> {
        let done = match self.command {
            Command::Up(cmd) => return cmd.execute(),
            Command::Wait(cmd) => return cmd.execute(),
            Command::Run(cmd) => return cmd.execute(),
            Command::Node(cmd) => return cmd.execute(),
            Command::Scale(cmd) => cmd.execute(),
            Command::Ps(cmd) => cmd.execute(),
            Command::Logs(cmd) => cmd.execute(),
            Command::Restart(cmd) => cmd.execute(),
            Command::Deploy(cmd) => cmd.execute(),
            Command::Releases(cmd) => cmd.execute(),
            Command::Rollback(cmd) => cmd.execute(),
            Command::Down(cmd) => cmd.execute(),
            Command::Events(cmd) => cmd.execute(),
            Command::Export(cmd) => cmd.execute(),
        };
        done.map(|()| std::process::ExitCode::SUCCESS)
    }
}
