//! Validated values shared by every layer: process type names, sizes, durations. A leaf:
//! nothing here imports another module of the crate.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A process type name such as `web` or `worker`: `[A-Za-z0-9_-]+`, as foreman accepts.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String")]
pub struct ProcessName(String);

impl TryFrom<String> for ProcessName {
    type Error = String;

    fn try_from(name: String) -> Result<Self, String> {
        Self::new(&name)
    }
}

impl ProcessName {
    /// Validates `name`; the error says which characters are allowed.
    pub fn new(name: &str) -> Result<Self, String> {
        if name.is_empty() {
            return Err("process type name is empty".to_string());
        }
        if let Some(bad) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
        {
            return Err(format!(
                "invalid process type name `{name}`: character `{}` is not allowed (use letters, digits, `_` and `-`)",
                bad.escape_default()
            ));
        }
        Ok(Self(name.to_string()))
    }

    /// The name as written in the Procfile.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for ProcessName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProcessName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A size in bytes, parsed from `256MiB`, `512M`, `1GiB`, `64KiB` or a bare number of MiB
/// (`--memory 512`, as Heroku and Convox take it).
///
/// `K`/`M`/`G`, `KiB`/`MiB`/`GiB` are binary units; `KB`/`MB`/`GB` are decimal, as in SI.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ByteSize(u64);

impl ByteSize {
    /// One mebibyte.
    pub const MIB: u64 = 1 << 20;

    /// A size of exactly `bytes`.
    pub const fn bytes(bytes: u64) -> Self {
        Self(bytes)
    }

    /// A size of `mib` mebibytes.
    pub const fn mib(mib: u64) -> Self {
        Self(mib * Self::MIB)
    }

    /// The size in bytes.
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// The size in bytes, saturating on 32-bit hosts.
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let hint = "expected a number with an optional unit, e.g. `256MiB`, `512M` or `1GiB` (a bare number means MiB)";
        let text = s.trim();
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number: f64 = match number.parse() {
            Ok(n) if !number.is_empty() => n,
            _ => return Err(format!("invalid memory size `{s}`: {hint}")),
        };
        let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "m" | "mi" | "mib" => 1 << 20,
            "b" => 1,
            "k" | "ki" | "kib" => 1 << 10,
            "g" | "gi" | "gib" => 1 << 30,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            _ => {
                return Err(format!(
                    "invalid memory size `{s}`: unknown unit `{unit}`; {hint}"
                ));
            }
        };
        let bytes = number * multiplier as f64;
        if bytes < 65536.0 {
            return Err(format!(
                "invalid memory size `{s}`: must be at least 64KiB (one WebAssembly page)"
            ));
        }
        if bytes > (4u64 << 30) as f64 {
            return Err(format!(
                "invalid memory size `{s}`: must be at most 4GiB (the limit of 32-bit WebAssembly)"
            ));
        }
        Ok(Self(bytes as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
        // The largest unit that fits; whole numbers stay whole (`256 MiB`, `1.5 GiB`).
        for (size, unit) in UNITS {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{} {unit}", self.0 / size);
            }
            if self.0 >= size {
                return write!(f, "{:.1} {unit}", self.0 as f64 / size as f64);
            }
        }
        write!(f, "{} B", self.0)
    }
}

/// Parses a duration such as `30s`, `500ms`, `2m` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let text = s.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let bad = || format!("invalid duration `{s}`: expected e.g. `30s`, `500ms` or `2m`");
    let number: f64 = number.parse().map_err(|_| bad())?;
    let seconds = match unit {
        "" | "s" => number,
        "ms" => number / 1000.0,
        "m" | "min" => number * 60.0,
        "h" => number * 3600.0,
        _ => return Err(bad()),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| bad())
}

/// Parses a host-wide size (`--capacity`, `capacity =`), which unlike a per-instance limit may
/// exceed 4 GiB.
pub fn parse_capacity(s: &str) -> Result<ByteSize, String> {
    match s.parse::<ByteSize>() {
        Ok(size) => Ok(size),
        Err(_) => {
            let gib = s
                .trim()
                .strip_suffix("GiB")
                .or_else(|| s.trim().strip_suffix('G'))
                .and_then(|n| n.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    format!("invalid capacity `{s}`: expected e.g. `2GiB` or `512MiB`")
                })?;
            Ok(ByteSize::bytes(gib << 30))
        }
    }
}

/// Formats a duration for people: `850 µs`, `12.3 ms`, `2 s`, `1.5 min`.
pub fn humanize(d: Duration) -> String {
    let micros = d.as_micros();
    if micros < 1_000 {
        format!("{micros} µs")
    } else if micros < 1_000_000 {
        format!("{:.1} ms", micros as f64 / 1000.0)
    } else if d.as_secs() < 120 {
        let s = d.as_secs_f64();
        if s.fract() == 0.0 {
            format!("{s} s")
        } else {
            format!("{s:.1} s")
        }
    } else {
        format!("{:.1} min", d.as_secs_f64() / 60.0)
    }
}

/// An `allowed_outbound_hosts` entry for sockets: `tcp://10.0.0.5:5432`, `udp://*:53`,
/// `tcp://localhost:*`. The address is an IP, `localhost` (either loopback) or `*`; the port a
/// number or `*`, and it is required: a socket rule says exactly what it opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketRule {
    /// TCP (`tcp://`) or UDP (`udp://`).
    pub udp: bool,
    /// `None`: any address.
    host: RuleHost,
    /// `None`: any port.
    port: Option<u16>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RuleHost {
    Any,
    Loopback,
    Ip(std::net::IpAddr),
}

impl SocketRule {
    /// The rule of `entry`, `None` if it is not a socket entry (no `tcp://` or `udp://`), or
    /// the error to report at it.
    pub fn parse(entry: &str) -> Option<Result<Self, String>> {
        let (udp, rest) = match entry.split_once("://") {
            Some(("tcp", rest)) => (false, rest),
            Some(("udp", rest)) => (true, rest),
            _ => return None,
        };
        Some(Self::parse_address(udp, rest.trim_end_matches('/')).map_err(|why| {
            let scheme = if udp { "udp" } else { "tcp" };
            format!(
                "`{entry}` is not a socket address: {why}; write `{scheme}://10.0.0.5:5432`, `{scheme}://localhost:6379`, `{scheme}://10.0.0.5:*` or `{scheme}://*:53` (an IP address or `localhost`: guests connect to addresses, and name lookups are not granted)"
            )
        }))
    }

    fn parse_address(udp: bool, text: &str) -> Result<Self, String> {
        let (host, port) = text
            .rsplit_once(':')
            .ok_or_else(|| "the port is missing".to_string())?;
        let port = match port {
            "*" => None,
            p => Some(
                p.parse::<u16>()
                    .map_err(|_| format!("`{p}` is not a port"))?,
            ),
        };
        let host = match host.trim_start_matches('[').trim_end_matches(']') {
            "*" => RuleHost::Any,
            "localhost" => RuleHost::Loopback,
            ip => RuleHost::Ip(
                ip.parse()
                    .map_err(|_| format!("`{ip}` is not an IP address"))?,
            ),
        };
        Ok(Self { udp, host, port })
    }

    /// Whether the rule opens `addr`.
    pub fn allows(&self, addr: std::net::SocketAddr) -> bool {
        let host = match self.host {
            RuleHost::Any => true,
            RuleHost::Loopback => addr.ip().is_loopback(),
            RuleHost::Ip(ip) => canonical(ip) == canonical(addr.ip()),
        };
        host && self.port.is_none_or(|p| p == addr.port())
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn canonical(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
        v4 => v4,
    }
}

/// A node label's key or value (`up --label region=eu`, a type's `placement`): 1 to 63 of
/// `[A-Za-z0-9_.-]`, as Kubernetes labels.
pub fn check_label(part: &str) -> Result<(), String> {
    let ok = (1..=63).contains(&part.len())
        && part
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!("`{part}` must be 1 to 63 of A-Z a-z 0-9 _ . -"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes() {
        assert_eq!("256MiB".parse::<ByteSize>().unwrap(), ByteSize::mib(256));
        assert_eq!("512".parse::<ByteSize>().unwrap(), ByteSize::mib(512));
        assert_eq!("1G".parse::<ByteSize>().unwrap(), ByteSize::mib(1024));
        assert_eq!("64KiB".parse::<ByteSize>().unwrap(), ByteSize::bytes(65536));
        assert_eq!(
            "100MB".parse::<ByteSize>().unwrap(),
            ByteSize::bytes(100_000_000)
        );
        let err = "12XB".parse::<ByteSize>().unwrap_err();
        assert!(err.contains("invalid memory size `12XB`"), "{err}");
        assert!("".parse::<ByteSize>().is_err());
        assert!(
            "1KiB"
                .parse::<ByteSize>()
                .unwrap_err()
                .contains("at least 64KiB")
        );
        assert!(
            "5GiB"
                .parse::<ByteSize>()
                .unwrap_err()
                .contains("at most 4GiB")
        );
        assert_eq!(ByteSize::mib(256).to_string(), "256 MiB");
        assert_eq!(ByteSize::bytes(3 << 29).to_string(), "1.5 GiB");
        assert_eq!(ByteSize::bytes((3 << 29) + 4096).to_string(), "1.5 GiB");
        assert_eq!(ByteSize::bytes(1_114_112 + 1).to_string(), "1.1 MiB");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn process_names() {
        assert!(ProcessName::new("web_2-x").is_ok());
        assert!(
            ProcessName::new("we b")
                .unwrap_err()
                .contains("` ` is not allowed")
        );
        assert!(ProcessName::new("").is_err());
    }

    #[test]
    fn socket_rules_open_exactly_what_they_name() {
        let rule = |s: &str| SocketRule::parse(s).unwrap().unwrap();
        let addr = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        assert!(SocketRule::parse("example.com:443").is_none());
        assert!(SocketRule::parse("https://example.com").is_none());
        let db = rule("tcp://10.0.0.5:5432");
        assert!(!db.udp);
        assert!(db.allows(addr("10.0.0.5:5432")));
        assert!(db.allows(addr("[::ffff:10.0.0.5]:5432")));
        assert!(!db.allows(addr("10.0.0.5:5433")));
        assert!(!db.allows(addr("10.0.0.6:5432")));
        assert!(rule("tcp://localhost:*").allows(addr("[::1]:9")));
        assert!(!rule("tcp://localhost:*").allows(addr("10.0.0.5:9")));
        assert!(rule("udp://*:53").udp);
        assert!(rule("udp://*:53").allows(addr("8.8.8.8:53")));
        assert!(rule("tcp://[::1]:80").allows(addr("[::1]:80")));
        for bad in [
            "tcp://10.0.0.5",
            "tcp://db.internal:5432",
            "udp://1.2.3.4:x",
        ] {
            let err = SocketRule::parse(bad).unwrap().unwrap_err();
            assert!(
                err.contains(bad) && err.contains("://10.0.0.5:5432"),
                "{err}"
            );
        }
    }
}
