//! systemd socket activation: listeners passed in `LISTEN_FDS` (`LISTEN_PID`,
//! `LISTEN_FDNAMES`), adopted for the front door and the `[[services]]` instead of bound.
//!
//! systemd keeps its copy of each socket while the host restarts, so connections that arrive
//! in between wait in the kernel's backlog instead of being refused. A passed socket is
//! matched to a listener by its name (`FileDescriptorName=`: `web` or `http` for the front
//! door, a service's process type for that service), else by its address (`ListenStream=`
//! equal to `-p`'s address or a service's `listen`). A socket that matches nothing fails the
//! start: it would otherwise take connections that nobody answers.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{FromRawFd as _, RawFd};

use anyhow::{Context as _, Result, bail};

/// One passed socket.
#[derive(Debug)]
struct Passed {
    fd: RawFd,
    name: String,
    listener: TcpListener,
    addr: SocketAddr,
}

/// The sockets systemd passed to this process, until each is claimed.
#[derive(Debug, Default)]
pub struct Activated {
    passed: Vec<Passed>,
    /// What was adopted, for the log.
    adopted: Vec<String>,
}

impl Activated {
    /// The sockets passed to this process; none without `LISTEN_FDS` (or when `LISTEN_PID`
    /// names another process). Each must be a listening TCP socket.
    pub fn from_env() -> Result<Self> {
        let fds = sd_notify::listen_fds_with_names()
            .context("socket activation: LISTEN_FDS, LISTEN_PID or LISTEN_FDNAMES is invalid")?;
        let mut passed = Vec::new();
        for (fd, name) in fds {
            if !is_listening_tcp(fd) {
                bail!(
                    "socket activation: socket {fd} (`{name}`) is not a listening TCP socket: wasmform adopts only `ListenStream=` sockets of `Accept=no` units"
                );
            }
            // SAFETY: systemd passed us this descriptor (LISTEN_PID is our pid) and nothing
            // else in this process owns it; it is wrapped exactly once, here.
            let listener = unsafe { TcpListener::from_raw_fd(fd) };
            listener
                .set_nonblocking(true)
                .with_context(|| format!("socket activation: socket {fd} (`{name}`)"))?;
            let addr = listener
                .local_addr()
                .with_context(|| format!("socket activation: socket {fd} (`{name}`)"))?;
            passed.push(Passed {
                fd,
                name,
                listener,
                addr,
            });
        }
        Ok(Self {
            passed,
            adopted: Vec::new(),
        })
    }

    /// The passed socket named one of `names`, else the one bound to `addr`, for `what` (the
    /// listener, for the log). Must be called inside the async runtime.
    pub fn take(
        &mut self,
        what: &str,
        names: &[&str],
        addr: Option<SocketAddr>,
    ) -> Result<Option<tokio::net::TcpListener>> {
        let by_name = self
            .passed
            .iter()
            .position(|p| names.contains(&p.name.as_str()));
        let Some(at) = by_name.or_else(|| {
            let addr = addr?;
            self.passed.iter().position(|p| same_address(p.addr, addr))
        }) else {
            return Ok(None);
        };
        let passed = self.passed.remove(at);
        let listener = tokio::net::TcpListener::from_std(passed.listener).with_context(|| {
            format!(
                "socket activation: socket {} (`{}`)",
                passed.fd, passed.name
            )
        })?;
        self.adopted.push(format!(
            "{what} serves socket {} (`{}`, {}) passed by systemd",
            passed.fd, passed.name, passed.addr
        ));
        Ok(Some(listener))
    }

    /// Fails if a passed socket was claimed by no listener; else what was adopted, for the
    /// log.
    pub fn finish(self) -> Result<Vec<String>> {
        if let Some(p) = self.passed.first() {
            bail!(
                "socket activation: socket {} (`{}`, {}) matches no listener of this app: name it `web` (FileDescriptorName=) for the front door or after a `[[services]]` process type, or give it the address of `-p` or of a service's `listen`",
                p.fd,
                p.name,
                p.addr
            );
        }
        Ok(self.adopted)
    }
}

/// `ListenStream=8080` binds `[::]:8080`, which serves `0.0.0.0:8080` as well: a port-only
/// wildcard matches either family's wildcard.
fn same_address(passed: SocketAddr, wanted: SocketAddr) -> bool {
    passed == wanted
        || (passed.port() == wanted.port()
            && passed.ip().is_unspecified()
            && wanted.ip().is_unspecified())
}

/// Whether `fd` is a TCP socket in the listening state.
fn is_listening_tcp(fd: RawFd) -> bool {
    let option = |level, name| {
        let mut value: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `value` and `len` are valid for writes of a c_int; an fd that is not a
        // socket makes getsockopt fail, which is handled.
        let rc =
            unsafe { libc::getsockopt(fd, level, name, (&raw mut value).cast(), &raw mut len) };
        (rc == 0).then_some(value)
    };
    option(libc::SOL_SOCKET, libc::SO_TYPE) == Some(libc::SOCK_STREAM)
        && option(libc::SOL_SOCKET, libc::SO_ACCEPTCONN) == Some(1)
        && matches!(
            option(libc::SOL_SOCKET, libc::SO_DOMAIN),
            Some(libc::AF_INET | libc::AF_INET6)
        )
}
