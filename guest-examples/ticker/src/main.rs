//! `ticker`: the demo worker process. Prints a numbered tick every interval
//! (argv[1], milliseconds, default 1000) forever.

use std::io::Write;
use std::time::Duration;

fn main() {
    let interval_ms: u64 = match std::env::args().nth(1) {
        None => 1000,
        Some(arg) => match arg.parse() {
            Ok(ms) => ms,
            Err(_) => {
                eprintln!("ticker: interval must be a whole number of milliseconds, got {arg:?}");
                eprintln!("usage: ticker [interval-ms]");
                // std::process::exit(2) would reach the host as plain failure
                // (status 1); exit-with-code (WASI 0.2.12) keeps the 2.
                wasip2::cli::exit::exit_with_code(2);
                unreachable!("exit-with-code returned");
            }
        },
    };
    let instance = std::env::var("WASMFORM_INSTANCE").unwrap_or_else(|_| "unknown".into());
    let interval = Duration::from_millis(interval_ms);

    let mut stdout = std::io::stdout();
    for i in 1u64.. {
        println!("tick {i} from {instance}");
        // Flush each line so the host's log shows it immediately.
        let _ = stdout.flush();
        std::thread::sleep(interval);
    }
}
