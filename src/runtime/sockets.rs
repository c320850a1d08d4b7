//! What an instance may do with `wasi:sockets`: the `socket_addr_check` of its WASI context.
//!
//! - A TCP process ([`Listening`]) may bind and listen on its own `$PORT` only, on a loopback
//!   or unspecified address (`0.0.0.0:$PORT` works, as Heroku apps write it), and accepts only
//!   the host's own connections ([`Peers`]): a client that reaches the port directly, from
//!   another interface or another local process, is reset before the guest sees it (a local
//!   one after at most 200 ms, the time the host's own connections have to be registered).
//! - Outgoing TCP and UDP are denied unless a `tcp://` or `udp://` entry of the type's
//!   `allowed_outbound_hosts` opens the destination ([`SocketRule`]).
//! - Each denial is logged once per type version and destination, with what to change.
//!
//! wasmtime-wasi asks before each bind, listen, accept, connect and datagram, with the address;
//! the answer can only allow or deny, not rewrite the address.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::watch;
use wasmtime_wasi::sockets::SocketAddrUse;

use super::shared::Denied;
use crate::net::Peers;
use crate::units::SocketRule;

/// A TCP process instance's grant: the port it listens on, the host's connections it may
/// accept, and the news that it listens.
#[derive(Debug)]
pub struct Listening {
    /// Its `$PORT`.
    pub port: u16,
    /// The host's connections to it.
    pub peers: Arc<Peers>,
    /// Set to the listener's address when the guest calls `listen` on its port.
    bound: watch::Sender<Option<SocketAddr>>,
}

impl Listening {
    pub fn new(port: u16) -> Arc<Self> {
        Arc::new(Self {
            port,
            peers: Arc::default(),
            bound: watch::Sender::new(None),
        })
    }

    /// Resolves with the address the guest listens on, once it does.
    pub async fn listened(&self) -> SocketAddr {
        let mut rx = self.bound.subscribe();
        let addr = rx.wait_for(Option::is_some).await.map(|a| *a);
        addr.ok().flatten().expect("the sender lives in self")
    }
}

/// The check of one instance's socket uses.
pub(super) struct Policy {
    /// `web.1`, for the log.
    pub instance: String,
    pub listen: Option<Arc<Listening>>,
    /// The type's `tcp://` and `udp://` rules.
    pub rules: Vec<SocketRule>,
    pub denied: Option<Arc<Denied>>,
}

impl Policy {
    /// Whether UDP sockets may be created at all.
    pub fn any_udp(&self) -> bool {
        self.rules.iter().any(|r| r.udp)
    }

    pub async fn check(&self, addr: SocketAddr, use_: SocketAddrUse) -> bool {
        let own_port = |addr: SocketAddr| {
            let local = addr.ip().is_unspecified() || addr.ip().is_loopback();
            self.listen
                .as_ref()
                .filter(|l| local && addr.port() == l.port)
        };
        let allowed = match use_ {
            // Port 0 is the implicit bind of a connect, or an ephemeral port that `listen`
            // below refuses; a TCP process may also bind its own port.
            SocketAddrUse::TcpBind => addr.port() == 0 || own_port(addr).is_some(),
            SocketAddrUse::TcpListen => match own_port(addr) {
                Some(listening) => {
                    listening.bound.send_replace(Some(addr));
                    true
                }
                None => false,
            },
            SocketAddrUse::TcpAccept => match &self.listen {
                Some(listening) => listening.peers.admits(addr).await,
                None => false,
            },
            SocketAddrUse::TcpConnect => self.rules.iter().any(|r| !r.udp && r.allows(addr)),
            SocketAddrUse::UdpBind => self.any_udp() && (addr.port() == 0 || self.udp_allows(addr)),
            SocketAddrUse::UdpSend | SocketAddrUse::UdpReceive => self.udp_allows(addr),
        };
        if !allowed {
            self.report(addr, use_);
        }
        allowed
    }

    fn udp_allows(&self, addr: SocketAddr) -> bool {
        self.rules.iter().any(|r| r.udp && r.allows(addr))
    }

    /// Logs a denial once per type version and destination, with what to change.
    fn report(&self, addr: SocketAddr, use_: SocketAddrUse) {
        let Some(denied) = &self.denied else {
            return;
        };
        let process = denied.process();
        let instance = &self.instance;
        let (key, line) = match use_ {
            SocketAddrUse::TcpBind | SocketAddrUse::TcpListen => {
                let line = match &self.listen {
                    Some(l) => format!(
                        "{instance} tried to listen on {addr}, which is denied: a TCP process listens on the port in $PORT only (here {}), on 0.0.0.0, 127.0.0.1 or ::",
                        l.port
                    ),
                    None => format!(
                        "{instance} tried to listen on {addr}, which is denied: only a TCP process listens, on its $PORT: route process type `{process}` from a [[services]] entry with protocol = \"tcp\" in wasmform.toml"
                    ),
                };
                (format!("listen {addr}"), line)
            }
            SocketAddrUse::TcpAccept => (
                format!("accept {}", addr.ip()),
                format!(
                    "{instance} reset a connection from {addr} that did not come through wasmform: a TCP process is reached through its service's address only"
                ),
            ),
            SocketAddrUse::TcpConnect => (
                format!("tcp {addr}"),
                format!(
                    "process type `{process}` was denied an outgoing TCP connection to {addr}: add \"tcp://{addr}\" to allowed_outbound_hosts under [processes.{process}] in wasmform.toml"
                ),
            ),
            SocketAddrUse::UdpBind | SocketAddrUse::UdpSend | SocketAddrUse::UdpReceive => (
                format!("udp {addr}"),
                format!(
                    "process type `{process}` was denied UDP with {addr}: add \"udp://{addr}\" to allowed_outbound_hosts under [processes.{process}] in wasmform.toml"
                ),
            ),
        };
        denied.report_once(key, line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn policy(listen: Option<Arc<Listening>>, rules: &[&str]) -> Policy {
        Policy {
            instance: "cache.1".into(),
            listen,
            rules: rules
                .iter()
                .map(|r| SocketRule::parse(r).unwrap().unwrap())
                .collect(),
            denied: None,
        }
    }

    #[tokio::test]
    async fn a_tcp_process_listens_on_its_port_only_and_accepts_only_the_host() {
        let listening = Listening::new(4000);
        let p = policy(Some(listening.clone()), &[]);
        for own in ["0.0.0.0:4000", "127.0.0.1:4000", "[::]:4000", "[::1]:4000"] {
            assert!(p.check(addr(own), SocketAddrUse::TcpBind).await, "{own}");
            assert!(p.check(addr(own), SocketAddrUse::TcpListen).await, "{own}");
        }
        assert_eq!(
            *listening.bound.borrow(),
            Some(addr("[::1]:4000")),
            "the last listen is told"
        );
        assert!(!p.check(addr("10.1.2.3:4000"), SocketAddrUse::TcpBind).await);
        assert!(!p.check(addr("0.0.0.0:4001"), SocketAddrUse::TcpBind).await);
        // An ephemeral port may be bound (a connect does), never listened on.
        assert!(p.check(addr("0.0.0.0:0"), SocketAddrUse::TcpBind).await);
        assert!(!p.check(addr("0.0.0.0:0"), SocketAddrUse::TcpListen).await);
        assert!(
            !p.check(addr("127.0.0.1:41000"), SocketAddrUse::TcpListen)
                .await
        );
        let host = addr("127.0.0.1:50000");
        assert!(!p.check(host, SocketAddrUse::TcpAccept).await);
        listening.peers.insert_for_test(host);
        assert!(
            !p.check(addr("10.0.0.9:50000"), SocketAddrUse::TcpAccept)
                .await
        );
        assert!(p.check(host, SocketAddrUse::TcpAccept).await);
        assert!(
            !p.check(addr("127.0.0.1:50001"), SocketAddrUse::TcpAccept)
                .await
        );
    }

    #[tokio::test]
    async fn outgoing_sockets_need_a_rule_and_other_types_never_listen() {
        let p = policy(None, &["tcp://10.0.0.5:5432", "udp://*:53"]);
        assert!(
            p.check(addr("10.0.0.5:5432"), SocketAddrUse::TcpConnect)
                .await
        );
        assert!(
            !p.check(addr("10.0.0.5:5433"), SocketAddrUse::TcpConnect)
                .await
        );
        assert!(
            !p.check(addr("10.0.0.5:53"), SocketAddrUse::TcpConnect)
                .await,
            "tcp ≠ udp"
        );
        assert!(p.check(addr("0.0.0.0:0"), SocketAddrUse::UdpBind).await);
        assert!(p.check(addr("8.8.8.8:53"), SocketAddrUse::UdpSend).await);
        assert!(!p.check(addr("8.8.8.8:54"), SocketAddrUse::UdpSend).await);
        assert!(!p.check(addr("0.0.0.0:8080"), SocketAddrUse::TcpBind).await);
        assert!(!p.check(addr("0.0.0.0:0"), SocketAddrUse::TcpListen).await);
        let none = policy(None, &["tcp://10.0.0.5:5432"]);
        assert!(!none.any_udp());
        assert!(!none.check(addr("0.0.0.0:0"), SocketAddrUse::UdpBind).await);
    }
}
