//! Accepting connections, for every server of the host (HTTP, TCP services, control API,
//! metrics), and the host's own connections to the instances of a TCP process.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// The next accepted connection, or `None` once `shutdown` is cancelled. A failed accept (out
/// of file descriptors, say) is logged and retried after a short pause instead of spinning.
pub async fn next_connection<S, F>(
    accept: impl Fn() -> F,
    shutdown: &CancellationToken,
) -> Option<S>
where
    F: Future<Output = std::io::Result<S>>,
{
    loop {
        tokio::select! {
            accepted = accept() => match accepted {
                Ok(stream) => return Some(stream),
                Err(e) => {
                    tracing::warn!(cause = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = shutdown.cancelled() => return None,
        }
    }
}

/// The local addresses of the host's own open connections to one instance: the only clients
/// its listener may accept (a TCP process is reached through its service, never directly).
#[derive(Debug, Default)]
pub struct Peers(std::sync::Mutex<std::collections::HashSet<std::net::SocketAddr>>);

impl Peers {
    /// Whether `addr` is one of the host's connections.
    pub fn contains(&self, addr: std::net::SocketAddr) -> bool {
        self.lock().contains(&addr)
    }

    #[cfg(test)]
    pub fn insert_for_test(&self, addr: std::net::SocketAddr) {
        self.lock().insert(addr);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<std::net::SocketAddr>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A connection of the host's, registered in its instance's [`Peers`] until dropped.
pub struct PeerConnection {
    pub stream: tokio::net::TcpStream,
    peers: std::sync::Arc<Peers>,
    local: std::net::SocketAddr,
}

impl Drop for PeerConnection {
    fn drop(&mut self) {
        self.peers.lock().remove(&self.local);
    }
}

/// Connects to an instance listening on `to`. The socket is bound (to an ephemeral loopback
/// port) and registered in `peers` *before* it connects, so the instance's accept check finds
/// it however fast the guest accepts.
pub async fn connect_as_host(
    to: std::net::SocketAddr,
    peers: &std::sync::Arc<Peers>,
) -> std::io::Result<PeerConnection> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    let (socket, from) = if to.is_ipv4() {
        (
            tokio::net::TcpSocket::new_v4()?,
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
        )
    } else {
        (
            tokio::net::TcpSocket::new_v6()?,
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 0),
        )
    };
    // An ephemeral port whose last connection is in TIME_WAIT may be taken again.
    socket.set_reuseaddr(true)?;
    socket.bind(from)?;
    let local = socket.local_addr()?;
    peers.lock().insert(local);
    let connection = PeerConnection {
        stream: match socket.connect(to).await {
            Ok(stream) => stream,
            Err(e) => {
                peers.lock().remove(&local);
                return Err(e);
            }
        },
        peers: peers.clone(),
        local,
    };
    connection.stream.set_nodelay(true)?;
    Ok(connection)
}
