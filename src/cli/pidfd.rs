//! Process file descriptors (Linux pidfds): waiting for a process to end, and signalling it,
//! without being fooled by a pid the kernel gave to another process since.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::time::Duration;

/// A pidfd of one process.
pub struct Pidfd {
    fd: OwnedFd,
    pid: libc::pid_t,
}

impl Pidfd {
    /// Opens a pidfd of `pid`; `ESRCH` if no such process exists.
    pub fn open(pid: libc::pid_t) -> std::io::Result<Self> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = i32::try_from(fd).expect("a descriptor fits an int");
        // SAFETY: `fd` was just returned by pidfd_open and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd, pid })
    }

    /// The process's pid.
    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// Waits up to `timeout` for the process to end; whether it has.
    pub fn wait_blocking(&self, timeout: Duration) -> bool {
        let mut poll = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `poll` is one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut poll, 1, ms) > 0 }
    }

    /// Resolves once the process has ended.
    pub async fn exited(self) {
        let interest = tokio::io::Interest::READABLE;
        // SAFETY: `self.fd` is an open pidfd owned by the `AsyncFd` from here on, and an
        // `OwnedFd` always returns that same descriptor.
        let registered =
            unsafe { tokio::io::unix::AsyncFd::register_with_interest(self.fd, interest) };
        match registered {
            Ok(fd) => {
                // A pidfd becomes readable, and stays so, once its process has ended.
                let _ = fd.readable().await;
            }
            // Not pollable by the runtime (it is on every Linux with pidfds): wait on a
            // blocking thread instead.
            Err(e) => {
                let (fd, _) = e.into_parts();
                let this = Self { fd, pid: self.pid };
                let wait = move || while !this.wait_blocking(Duration::from_secs(3600)) {};
                let _ = tokio::task::spawn_blocking(wait).await;
            }
        }
    }

    /// Sends `signal` to the process.
    pub fn kill(&self, signal: i32) {
        // SAFETY: pidfd_send_signal on our descriptor; no siginfo is passed.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
    }
}
