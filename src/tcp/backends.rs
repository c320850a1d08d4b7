//! The instances of one TCP process type that take connections: round-robin over those with
//! room (open connections below `max_connections`), with a bounded number of connections
//! waiting when none has room. No wasmtime types here.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::app::TcpSettings;
use crate::net::Peers;

/// One instance that listens: where, whose connections it accepts, and how many are open.
pub struct Backend {
    /// Where the instance listens, on loopback.
    pub addr: SocketAddr,
    /// The host's connections to it: the only ones it accepts.
    pub peers: Arc<Peers>,
    /// Connections open now (its slot's, for `ps`).
    open: Arc<AtomicU32>,
    /// Connections handed to it, over its slot's incarnations.
    served: Arc<AtomicU64>,
    /// Takes no new connections (its slot stops).
    retired: AtomicBool,
    /// Told when its last open connection ends.
    idle: Notify,
}

impl Backend {
    pub fn new(
        addr: SocketAddr,
        peers: Arc<Peers>,
        open: Arc<AtomicU32>,
        served: Arc<AtomicU64>,
    ) -> Arc<Self> {
        open.store(0, Ordering::Relaxed);
        Arc::new(Self {
            addr,
            peers,
            open,
            served,
            retired: AtomicBool::new(false),
            idle: Notify::new(),
        })
    }

    /// Resolves once no connection is open.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.open.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Why a connection found no instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Every instance is full and so is the backlog.
    Backlog,
    /// No instance had room within the wait.
    NoInstance,
}

impl Refused {
    /// Its label in `wasmform_tcp_refused`.
    pub fn label(self) -> &'static str {
        match self {
            Refused::Backlog => "backlog",
            Refused::NoInstance => "no_instance",
        }
    }
}

/// The instances of one TCP process type that take connections.
pub struct Backends {
    members: Mutex<Vec<Arc<Backend>>>,
    /// Where the next round-robin pick starts.
    next: AtomicUsize,
    /// Told when an instance joins or a connection ends: waiting connections look again.
    room: Notify,
    /// Connections waiting for room now.
    waiting: AtomicU32,
    /// The type's settings (from the first service that routes to it).
    pub settings: TcpSettings,
}

/// A connection's place on an instance; dropping it frees the place.
pub struct Lease {
    pub backend: Arc<Backend>,
    backends: Arc<Backends>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.backend.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.backend.idle.notify_waiters();
        }
        self.backends.room.notify_waiters();
    }
}

impl Backends {
    pub fn new(settings: TcpSettings) -> Arc<Self> {
        Arc::new(Self {
            members: Mutex::default(),
            next: AtomicUsize::new(0),
            room: Notify::new(),
            waiting: AtomicU32::new(0),
            settings,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Backend>>> {
        self.members.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An instance is ready: it takes connections from now on.
    pub fn add(&self, backend: Arc<Backend>) {
        self.lock().push(backend);
        self.room.notify_waiters();
    }

    /// An instance takes no new connections (its open ones go on).
    pub fn remove(&self, backend: &Arc<Backend>) {
        backend.retired.store(true, Ordering::Release);
        self.lock().retain(|b| !Arc::ptr_eq(b, backend));
    }

    /// A place on the next instance with room, round-robin; when none has room, waits up to
    /// `wait` among at most `backlog` others.
    pub async fn take(self: &Arc<Self>, wait: Duration) -> Result<Lease, Refused> {
        if let Some(lease) = self.try_take() {
            return Ok(lease);
        }
        let backlog = self.settings.backlog;
        if self
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < backlog).then_some(n + 1)
            })
            .is_err()
        {
            return Err(Refused::Backlog);
        }
        let _waiting = Waiting(&self.waiting);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(lease) = self.try_take() {
                return Ok(lease);
            }
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep_until(deadline) => return Err(Refused::NoInstance),
            }
        }
    }

    fn try_take(self: &Arc<Self>) -> Option<Lease> {
        let members = self.lock();
        let n = members.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let limit = self.settings.max_connections;
        (0..n).find_map(|k| {
            let backend = &members[(start + k) % n];
            if backend.retired.load(Ordering::Acquire)
                || backend.open.load(Ordering::Acquire) >= limit
            {
                return None;
            }
            // Under the lock, so no two takers pass the limit together.
            backend.open.fetch_add(1, Ordering::AcqRel);
            backend.served.fetch_add(1, Ordering::Relaxed);
            Some(Lease {
                backend: backend.clone(),
                backends: self.clone(),
            })
        })
    }
}

/// A connection counted as waiting until dropped.
struct Waiting<'a>(&'a AtomicU32);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(port: u16) -> Arc<Backend> {
        Backend::new(
            SocketAddr::from(([127, 0, 0, 1], port)),
            Arc::default(),
            Arc::default(),
            Arc::default(),
        )
    }

    fn settings(max_connections: u32, backlog: u32) -> TcpSettings {
        TcpSettings {
            max_connections,
            backlog,
            ..TcpSettings::default()
        }
    }

    #[tokio::test]
    async fn connections_rotate_over_instances_with_room() {
        let backends = Backends::new(settings(2, 0));
        let (a, b) = (backend(1), backend(2));
        backends.add(a.clone());
        backends.add(b.clone());
        let wait = Duration::ZERO;
        let leases: Vec<Lease> = futures_take(&backends, 4, wait).await;
        let ports: Vec<u16> = leases.iter().map(|l| l.backend.addr.port()).collect();
        assert_eq!(ports, [1, 2, 1, 2]);
        // Both full and no backlog: refused at once.
        assert_eq!(backends.take(wait).await.err(), Some(Refused::Backlog));
        drop(leases);
        assert_eq!(a.open.load(Ordering::Relaxed), 0);
        assert_eq!(a.served.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_waiting_connection_gets_the_place_that_frees_up() {
        let backends = Backends::new(settings(1, 1));
        backends.add(backend(1));
        let first = backends.take(Duration::ZERO).await.unwrap();
        let waiter = tokio::spawn({
            let backends = backends.clone();
            async move { backends.take(Duration::from_secs(30)).await.is_ok() }
        });
        tokio::task::yield_now().await;
        // The backlog of 1 is taken by the waiter.
        while backends.waiting.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            backends.take(Duration::from_secs(30)).await.err(),
            Some(Refused::Backlog)
        );
        drop(first);
        assert!(waiter.await.unwrap());
    }

    #[tokio::test]
    async fn a_removed_instance_takes_no_new_connection_and_tells_when_idle() {
        let backends = Backends::new(settings(8, 0));
        let (a, b) = (backend(1), backend(2));
        backends.add(a.clone());
        backends.add(b.clone());
        let on_a = loop {
            let lease = backends.take(Duration::ZERO).await.unwrap();
            if lease.backend.addr.port() == 1 {
                break lease;
            }
        };
        backends.remove(&a);
        for _ in 0..4 {
            let lease = backends.take(Duration::ZERO).await.unwrap();
            assert_eq!(lease.backend.addr.port(), 2);
        }
        let idle = tokio::spawn(async move { a.idle().await });
        tokio::task::yield_now().await;
        assert!(!idle.is_finished());
        drop(on_a);
        idle.await.unwrap();
        backends.remove(&b);
        assert_eq!(
            backends.take(Duration::from_millis(10)).await.err(),
            Some(Refused::Backlog)
        );
    }

    async fn futures_take(backends: &Arc<Backends>, n: usize, wait: Duration) -> Vec<Lease> {
        let mut leases = Vec::new();
        for _ in 0..n {
            leases.push(backends.take(wait).await.unwrap());
        }
        leases
    }
}
