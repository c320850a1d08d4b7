//! One TCP process instance's life in its slot: a loopback port of its own as `$PORT`, ready
//! once it listens there and takes a connection from the host, connections from its service
//! while it runs, and the drain when the slot stops.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::sync::oneshot;

use super::Supervisor;
use super::slot::{Ended, ProcessType, Up};
use crate::instance::{self, RunEnd};
use crate::net::connect_as_host;
use crate::runtime::{InstanceSetup, Kind, Listening};
use crate::tcp::Backend;
use crate::units::humanize;

/// How long the host keeps trying its first connection once the guest called `listen` (the
/// check runs just before the system call).
const PROBE_FOR: Duration = Duration::from_secs(2);

impl Supervisor {
    /// Runs a TCP process instance: starts it on a port of its own, waits until it listens,
    /// adds it to its type's backends and runs until it ends or the slot stops (then drains).
    pub(super) async fn run_listener(
        &self,
        process: &ProcessType,
        mut setup: InstanceSetup<'_>,
        up: Up<'_>,
        ready: &mut Option<oneshot::Sender<Result<(), String>>>,
    ) -> Result<Ended, String> {
        let Kind::Command(pre) = &process.compiled.kind else {
            unreachable!("run_listener runs commands");
        };
        let backends = process
            .backends
            .as_ref()
            .expect("TCP processes have backends");
        let settings = backends.settings;
        let slot = up.slot;
        let port = free_port().map_err(|e| format!("no free loopback port for $PORT: {e}"))?;
        let listening = Listening::new(port);
        setup.port = port;
        setup.listen = Some(listening.clone());
        let run = instance::run_command(&self.runtime, pre, setup, || {});
        tokio::pin!(run);

        let before = |end: RunEnd| match end {
            RunEnd::FailedToStart(why) => why,
            end => format!("{} before it listened on $PORT ({port})", end.reason()),
        };
        let listened = tokio::select! {
            end = &mut run => return Err(before(end)),
            addr = listening.listened() => addr,
            () = tokio::time::sleep(settings.ready_timeout) => return Err(format!(
                "did not listen on $PORT ({port}) within {} (ready_timeout): a TCP process must listen on the port in $PORT",
                humanize(settings.ready_timeout)
            )),
            () = slot.cancel.cancelled() => return Ok(Ended::Stopped),
        };
        let addr = reachable(listened);
        let probe = async {
            let started = std::time::Instant::now();
            loop {
                match connect_as_host(addr, &listening.peers).await {
                    Ok(connection) => {
                        drop(connection);
                        return Ok(());
                    }
                    Err(_) if started.elapsed() < PROBE_FOR => {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        tokio::select! {
            end = &mut run => return Err(before(end)),
            probed = probe => probed.map_err(|e| format!(
                "listens on {listened} but does not take connections: {e}"
            ))?,
            () = slot.cancel.cancelled() => return Ok(Ended::Stopped),
        }

        let backend = Backend::new(
            addr,
            listening.peers.clone(),
            slot.connections.clone(),
            slot.requests.clone(),
        );
        backends.add(backend.clone());
        self.mark_up(&up, ready);
        let end = tokio::select! {
            end = &mut run => end,
            () = slot.cancel.cancelled() => {
                // Drain: no new connection; the open ones go on within the drain timeout, while
                // the instance runs. Ending it then closes what is still open.
                backends.remove(&backend);
                tokio::select! {
                    _ = &mut run => {}
                    () = backend.idle() => {}
                    () = tokio::time::sleep(settings.drain_timeout) => {
                        let open = slot.connections.load(std::sync::atomic::Ordering::Relaxed);
                        self.logs.host(format!(
                            "{} closing {open} connection{} still open after {} (drain_timeout)",
                            up.name,
                            if open == 1 { "" } else { "s" },
                            humanize(settings.drain_timeout)
                        ));
                    }
                }
                return Ok(Ended::Stopped);
            }
        };
        backends.remove(&backend);
        Ok(Ended::Process {
            reason: end.reason(),
            code: end.exit_code(),
        })
    }
}

/// A loopback port free now, for an instance's `$PORT`. Another process could take it before
/// the guest binds it; the guest then fails to listen and its slot restarts with another.
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// Where the host reaches a listener bound to `addr`: the loopback address of an unspecified
/// one (`0.0.0.0:$PORT`).
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}
