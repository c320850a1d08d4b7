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
pub struct Peers {
    open: std::sync::Mutex<std::collections::HashSet<std::net::SocketAddr>>,
    /// Told when a connection is registered.
    registered: tokio::sync::Notify,
}

/// How long an instance's accept waits for a loopback client to be registered as the host's.
/// The host registers a connection as soon as `connect` returns, which is when the guest can
/// first accept it; this bounds the race (and what a local process reaching the port directly
/// can hold up the guest's accept for).
const REGISTRATION: Duration = Duration::from_millis(200);

impl Peers {
    /// Whether `addr` is one of the host's connections: at once for other addresses, within
    /// [`REGISTRATION`] for a loopback one not registered yet.
    pub async fn admits(&self, addr: std::net::SocketAddr) -> bool {
        if !addr.ip().is_loopback() {
            return false;
        }
        let deadline = tokio::time::Instant::now() + REGISTRATION;
        loop {
            let registered = self.registered.notified();
            tokio::pin!(registered);
            registered.as_mut().enable();
            if self.lock().contains(&addr) {
                return true;
            }
            tokio::select! {
                () = registered => {}
                () = tokio::time::sleep_until(deadline) => return false,
            }
        }
    }

    fn insert(&self, addr: std::net::SocketAddr) {
        self.lock().insert(addr);
        self.registered.notify_waiters();
    }

    #[cfg(test)]
    pub fn insert_for_test(&self, addr: std::net::SocketAddr) {
        self.insert(addr);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<std::net::SocketAddr>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
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

/// Connects to an instance listening on `to` and registers the connection in `peers`, which
/// the instance's accept check waits for ([`Peers::admits`]). The kernel picks the source
/// port at `connect`: binding one first (to register it before connecting) made every bind
/// search the ports in TIME_WAIT, which grew with the connections made.
pub async fn connect_as_host(
    to: std::net::SocketAddr,
    peers: &std::sync::Arc<Peers>,
) -> std::io::Result<PeerConnection> {
    let stream = tokio::net::TcpStream::connect(to).await?;
    let local = stream.local_addr()?;
    peers.insert(local);
    let connection = PeerConnection {
        stream,
        peers: peers.clone(),
        local,
    };
    connection.stream.set_nodelay(true)?;
    Ok(connection)
}
