//! Network plumbing every listener shares: a bounded accept loop and the byte-stream trait the
//! protocol servers run on (plain TCP, TLS, or a WebSocket pipe).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// A byte stream a protocol server runs on.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Waits for a free slot, then for a client (`TCP_NODELAY` set); `None` once `stop` fires. The
/// permit goes with the connection's task, so at most `slots` connections run at once and the
/// rest wait in the kernel's backlog.
pub async fn accept_bounded(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
    stop: &CancellationToken,
) -> Option<(OwnedSemaphorePermit, TcpStream, SocketAddr)> {
    loop {
        let permit = tokio::select! {
            p = Arc::clone(slots).acquire_owned() => p.ok()?,
            () = stop.cancelled() => return None,
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = stop.cancelled() => return None,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                return Some((permit, stream, peer));
            }
            Err(e) => {
                // Out of file descriptors and the like: do not spin on it.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
