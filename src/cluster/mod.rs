//! Several hosts of one app share one formation on etcd (`wasmform up --cluster`).
//!
//! Each node holds one etcd lease: its node key and every claim it makes live under it. The
//! cluster's formation is one key, changed by any node's `scale` in a transaction guarded by
//! the revision that node applied. Every node computes the same placement from the state it
//! reads ([`place`]), claims the slots that fall to it (a transaction that creates the claim
//! only if no claim exists, so a slot runs on at most one node), and runs exactly the slots it
//! holds claims for. A node that dies loses its lease, its claims vanish with it, and the
//! survivors claim its slots in their next round.
//!
//! | file | what it holds |
//! |---|---|
//! | `mod.rs` | the options of `--cluster` and the key layout |
//! | `place.rs` | pure placement: which node claims which slot, who gives one back |
//! | `etcd.rs` | the node agent: lease, claims, formation, fencing (feature `cluster`) |

#[cfg(feature = "cluster")]
pub mod etcd;
#[cfg(any(test, feature = "cluster"))]
pub mod place;

use std::time::Duration;

/// How a host joins a cluster, as `wasmform up --cluster` takes it.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// etcd's client endpoints (`http://127.0.0.1:2379`).
    pub endpoints: Vec<String>,
    /// This node's name, unique in the cluster.
    pub node: String,
    /// The app's name: its keys live under `/wasmform/APP/`, so apps share one etcd.
    pub app: String,
    /// TTL of the node's lease: how long a lost node's instances take to come back elsewhere.
    pub lease_ttl: Duration,
    /// The node's labels (`--label region=eu`), which a type's `placement` selects on.
    pub labels: std::collections::BTreeMap<String, String>,
}

/// Parses `--label KEY=VALUE`.
pub fn parse_label(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("--label `{text}`: give KEY=VALUE, e.g. `region=eu`"))?;
    for part in [key, value] {
        crate::units::check_label(part).map_err(|e| format!("--label `{text}`: {e}"))?;
    }
    Ok((key.to_string(), value.to_string()))
}

/// The shortest lease etcd grants.
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(2);

/// Parses `etcd://HOST:PORT[,HOST:PORT…]` into etcd client endpoints.
pub fn parse_url(url: &str) -> Result<Vec<String>, String> {
    let hosts = url.strip_prefix("etcd://").ok_or_else(|| {
        format!("--cluster `{url}`: give etcd's client address as `etcd://HOST:PORT[,HOST:PORT…]`")
    })?;
    let endpoints: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|h| format!("http://{h}"))
        .collect();
    if endpoints.is_empty() {
        return Err(format!(
            "--cluster `{url}`: no etcd address; give one like `etcd://127.0.0.1:2379`"
        ));
    }
    for host in hosts.split(',').map(str::trim).filter(|h| !h.is_empty()) {
        let port = host.rsplit_once(':').map(|(_, p)| p);
        if port.is_none_or(|p| p.parse::<u16>().is_err()) {
            return Err(format!(
                "--cluster `{url}`: `{host}` has no port; give HOST:PORT, e.g. `{host}:2379`"
            ));
        }
    }
    Ok(endpoints)
}

/// Checks a node or app name: it is part of etcd keys.
pub fn check_name(flag: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{flag} `{name}`: use 1 to 63 letters, digits, `-`, `_` or `.` (it names etcd keys)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_urls_name_what_is_wrong() {
        assert_eq!(
            parse_url("etcd://127.0.0.1:2379,127.0.0.1:2381").unwrap(),
            ["http://127.0.0.1:2379", "http://127.0.0.1:2381"]
        );
        assert!(
            parse_url("http://x:1")
                .unwrap_err()
                .contains("etcd://HOST:PORT")
        );
        assert!(
            parse_url("etcd://edge1")
                .unwrap_err()
                .contains("`edge1:2379`")
        );
        assert!(
            parse_url("etcd://")
                .unwrap_err()
                .contains("no etcd address")
        );
        assert!(check_name("--node", "edge-1.eu").is_ok());
        assert!(
            check_name("--node", "a/b")
                .unwrap_err()
                .contains("--node `a/b`")
        );
    }
}
