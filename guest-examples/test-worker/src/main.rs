//! `test-worker`: a worker component whose behaviour is picked by argv[1], one
//! mode per situation the host must handle (exit codes, traps, runaway CPU,
//! logging, memory limits, idling). See ../README.md for the contract.

use std::hint::black_box;
use std::io::Write;
use std::time::Duration;

const USAGE: &str = "usage: test-worker (exit <code> | exit-std <code> | panic | spin \
                     | print <n> [ms] | alloc <mb> | compute <rounds> | sleep | env | cat \
                     | getenv <name>)";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let instance = std::env::var("WASMFORM_INSTANCE").unwrap_or_else(|_| "unknown".into());
    let mode: Vec<&str> = args.iter().skip(1).map(String::as_str).collect();

    match mode[..] {
        ["exit", code] => {
            let code: u8 = number(code);
            say(&format!("exiting with {code}"));
            exit(code);
        }
        ["exit-std", code] => {
            // std's exit goes through wasi-libc, which reports only success or
            // failure (`exit(ok)`/`exit(err)`): a host sees 0 or 1.
            let code: i32 = number(code);
            say(&format!("exiting with {code}"));
            std::process::exit(code);
        }
        ["panic"] => {
            say("about to panic");
            panic!("test-worker panic requested");
        }
        ["spin"] => {
            say("spinning");
            // Pure CPU: no host call, so only epoch/fuel interruption stops it.
            let mut x = 0u64;
            loop {
                x = black_box(x.wrapping_add(1));
            }
        }
        ["print", n] | ["print", n, _] => {
            let n: u64 = number(n);
            let ms: u64 = mode.get(2).map_or(0, |ms| number(ms));
            for i in 1..=n {
                if i > 1 {
                    std::thread::sleep(Duration::from_millis(ms));
                }
                say(&format!("line {i} from {instance}"));
            }
        }
        ["compute", rounds] => {
            // CPU-bound and memory-bound: a sieve of Eratosthenes over 16 Mi numbers, `rounds`
            // times, then exit. Every step is a guest load or store, none a host call.
            let rounds: u32 = number(rounds);
            let mut primes = 0usize;
            for _ in 0..rounds {
                primes = sieve(black_box(16 << 20));
            }
            say(&format!("{primes} primes below {}", 16 << 20));
        }
        ["alloc", mb] => {
            let mb: usize = number(mb);
            let Some(bytes) = mb.checked_mul(1024 * 1024) else {
                eprintln!("test-worker: {mb} MiB does not fit in a 32-bit address space");
                usage()
            };
            say(&format!("allocating {mb} MiB"));
            // A non-zero fill commits every page; black_box keeps the unused
            // allocation from being optimised away.
            let block = vec![0xA5u8; bytes];
            black_box(&block);
            say("allocated");
            sleep_forever();
        }
        ["sleep"] => {
            say("sleeping");
            sleep_forever();
        }
        ["env", ..] => {
            let mut vars: Vec<String> = std::env::vars().map(|(k, v)| format!("{k}={v}")).collect();
            vars.sort();
            for var in vars {
                say(&var);
            }
            for (i, arg) in args.iter().enumerate() {
                say(&format!("arg {i}={arg}"));
            }
            sleep_forever();
        }
        ["cat"] => {
            // stdin to stdout until it closes, then a line on stderr: what `wasmform run`
            // attaches.
            let mut input = String::new();
            let _ = std::io::Read::read_to_string(&mut std::io::stdin(), &mut input);
            print!("{input}");
            let _ = std::io::stdout().flush();
            eprintln!("stdin closed after {} bytes", input.len());
        }
        ["getenv", name] => match std::env::var(name) {
            Ok(value) => say(&format!("{name}={value}")),
            Err(_) => {
                say(&format!("{name} is not set"));
                exit(3);
            }
        },
        _ => usage(),
    }
}

/// Prints a line and flushes it so the host's log shows it at once.
fn say(line: &str) {
    println!("{line}");
    let _ = std::io::stdout().flush();
}

fn number<T: std::str::FromStr>(arg: &str) -> T {
    arg.parse().unwrap_or_else(|_| {
        eprintln!("test-worker: invalid number: {arg:?}");
        usage()
    })
}

fn usage() -> ! {
    eprintln!("{USAGE}");
    exit(2)
}

/// Exits with exactly `code` (`wasi:cli/exit.exit-with-code`, WASI 0.2.12).
/// `std::process::exit` could only report success or failure.
fn exit(code: u8) -> ! {
    wasip2::cli::exit::exit_with_code(code);
    unreachable!("exit-with-code returned")
}

fn sleep_forever() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// How many primes are below `n`.
fn sieve(n: usize) -> usize {
    let mut composite = vec![false; n];
    let mut count = 0;
    for i in 2..n {
        if !composite[i] {
            count += 1;
            let mut j = i * i;
            while j < n {
                composite[j] = true;
                j += i;
            }
        }
    }
    count
}
