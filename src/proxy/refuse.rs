//! Refusals a client can cause at will, kept cheap: connections past `--max-connections`
//! are answered 503 and closed at once, and the log lines of refusals (H10, H11, the
//! connection limit) are written at most once a second, saying how many there were.

use std::sync::Arc;
use std::time::Duration;

use crate::logs::{Logs, Throttle};

/// Requests refused without reaching a guest (H10: none up, H11: the queue is full) are
/// logged at most once a second per code, the line saying how many there were since the last
/// one (`refused=N`, when more than one), so a client cannot flood the log.
#[derive(Default)]
pub struct Refusals(std::sync::Mutex<[Throttle; 2]>);

impl Refusals {
    /// Counts a refusal of kind `index` ([`RouterError::refusal`]); `Some(n)`: log its line
    /// now, for `n` refusals.
    ///
    /// [`RouterError::refusal`]: super::error::RouterError::refusal
    pub(super) fn admit(&self, index: usize) -> Option<u64> {
        let mut logs = self.0.lock().unwrap_or_else(|e| e.into_inner());
        logs[index].admit()
    }
}

/// The answer to connections past `--max-connections`, and the bound on how many of those are
/// closed gracefully at a time.
pub(super) struct Refusal {
    response: Arc<[u8]>,
    lingering: Arc<tokio::sync::Semaphore>,
}

/// Refused connections closed gracefully at a time; past it they are closed at once.
const MAX_LINGERING: usize = 256;

/// How long a refused connection may take to receive its 503.
const LINGER: Duration = Duration::from_secs(2);

impl Refusal {
    pub(super) fn new(max_connections: usize) -> Self {
        let text = format!(
            "all {max_connections} connections of this host are in use (--max-connections); try again shortly\n"
        );
        let response = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{text}",
            text.len()
        );
        Self {
            response: Arc::from(response.into_bytes()),
            lingering: Arc::new(tokio::sync::Semaphore::new(MAX_LINGERING)),
        }
    }

    /// Answers 503 and closes. The close lingers (reading what the client sent, for at most
    /// [`LINGER`]): closing a socket with unread input resets the connection, and the client
    /// may then lose the 503 before reading it.
    pub(super) fn refuse(&self, mut stream: tokio::net::TcpStream) {
        let Ok(permit) = self.lingering.clone().try_acquire_owned() else {
            let _ = stream.try_write(&self.response);
            return;
        };
        let response = self.response.clone();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let _ = tokio::time::timeout(LINGER, async {
                stream.write_all(&response).await?;
                stream.shutdown().await?;
                let mut sink = [0u8; 4096];
                while stream.read(&mut sink).await? > 0 {}
                Ok::<_, std::io::Error>(())
            })
            .await;
            drop(permit);
        });
    }
}

/// Logs a connection refused past `--max-connections`, at most once a second with how many
/// there were since the last line, so a flood of connections cannot flood the log.
pub(super) fn log_connection_limit(throttle: &mut Throttle, logs: &Logs, max_connections: usize) {
    if let Some(refused) = throttle.admit() {
        logs.host(format!(
            "at=error code=H11 desc=\"Connection limit reached\" connections={max_connections} refused={refused} status=503"
        ));
    }
}
