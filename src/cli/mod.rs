//! Command-line interface: one file per subcommand, each a clap struct with `execute`.

mod up;

/// Runs a Procfile of WebAssembly components as a formation of isolated instances.
#[derive(clap::Parser, Debug)]
#[command(name = "wasmform", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    Up(up::UpCommand),
}

impl Cli {
    /// Runs the chosen subcommand.
    pub fn execute(self) -> anyhow::Result<()> {
        match self.command {
            Command::Up(cmd) => cmd.execute(),
        }
    }
}
