//! Memory per instance (host RSS) and live scaling through `wasmform scale` and the control API.

use std::path::Path;
use std::time::Duration;

use crate::harness::{Host, get_many, load_for, ms, ps_counts, scale, scale_api};

/// Idle host RSS with 1 and 1000 instances, before and after one request each.
pub fn memory_rows(procfile: &Path) {
    println!("## memory (host RSS; per instance = difference between web=1000 and web=1)");
    let one = Host::start(procfile, &["-m", "web=1"]);
    let base = one.rss_kib();
    get_many(one.port, 1);
    let base_after = one.rss_kib();
    drop(one);
    // `--rotate 0`: sequential requests walk every instance, not only the warm ring.
    let many = Host::start(procfile, &["-m", "web=1000", "--rotate", "0"]);
    let idle = many.rss_kib();
    // Sequential requests go round-robin: 1000 of them touch every instance once.
    get_many(many.port, 1000);
    let served = many.rss_kib();
    drop(many);
    println!("{:<34} {:>12}", "web=1 idle RSS", format!("{base} KiB"));
    println!("{:<34} {:>12}", "web=1000 idle RSS", format!("{idle} KiB"));
    println!(
        "{:<34} {:>12}",
        "per idle instance",
        format!("{:.1} KiB", (idle as f64 - base as f64) / 999.0)
    );
    println!(
        "{:<34} {:>12}",
        "per instance after one request",
        format!("{:.1} KiB", (served as f64 - base_after as f64) / 999.0)
    );
}

/// 1 → 1000 instances by the CLI and by the control API, and 1000 → 1 under load.
pub fn scale_rows(dir: &Path, procfile: &Path) {
    println!("## live scaling (`wasmform scale`, which answers once new instances are up)");
    let host = Host::start(procfile, &["-m", "web=1"]);
    let up = scale(dir, "web=1000");
    let after_up = ps_counts(dir);
    // Scale back down while requests flow: draining must not fail any of them.
    let traffic = std::thread::spawn({
        let port = host.port;
        move || load_for(port, Duration::from_millis(1500))
    });
    std::thread::sleep(Duration::from_millis(300));
    let down = scale(dir, "web=1");
    let (served, failed) = traffic.join().unwrap();
    let after_down = ps_counts(dir);
    drop(host);
    println!(
        "{:<34} {:>12} ({after_up} instances up after)",
        "web=1 → web=1000",
        ms(up)
    );
    // The same through the control API alone: what the host spends, without a CLI process.
    let host = Host::start(procfile, &["-m", "web=1"]);
    let api_up = scale_api(dir, "web=1000");
    let api_after = ps_counts(dir);
    drop(host);
    println!(
        "{:<34} {:>12} ({api_after} instances up after; {:.1} µs per instance)",
        "web=1 → web=1000, control API",
        ms(api_up),
        api_up.as_secs_f64() * 1e6 / 999.0
    );
    println!(
        "{:<34} {:>12} ({after_down} up after; {served} requests during, {failed} failed)",
        "web=1000 → web=1, under load",
        ms(down)
    );
}
