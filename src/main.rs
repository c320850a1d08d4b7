//! The `wasmform` command: parses arguments, sets up tracing, runs the subcommand and turns an
//! error into a message and a non-zero exit. No logic lives here.

use clap::Parser as _;

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: a log file or pipe gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = wasmform::cli::Cli::parse();
    if !cli.runs_a_host() {
        // A client prints and exits: a reader that went away (`wasmform ps | head -1`) ends it
        // quietly, as it ends `ls`, instead of a panic in `println!`. The host keeps Rust's
        // default (SIGPIPE ignored): a peer closing a socket must never kill it.
        // SAFETY: called before any thread is started; `SIG_DFL` is a valid disposition.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match cli.execute() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            wasmform::cli::exit_code(&e)
        }
    }
}
