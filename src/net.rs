//! Accepting connections, for every server of the host (HTTP, control API, metrics).

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
