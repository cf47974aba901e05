//! The VNC accept loop: one task per client, bounded in number, each with its own damage
//! tracking and output, so a slow or hostile client never holds up the others or QEMU.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::config::VncConfig;
use super::handshake::ConnError;
use super::session::serve;
use crate::net::{Io, accept_bounded};
use crate::session::Desktop;

/// Most clients served at once; more wait in the kernel backlog.
pub const MAX_CLIENTS: usize = 64;

/// Accepts VNC clients on `listener` until `stop`.
pub async fn run(
    listener: TcpListener,
    cfg: Arc<VncConfig>,
    desktop: Desktop,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    if let Ok(addr) = listener.local_addr() {
        let auth = if cfg.auth.required() { "vnc" } else { "none" };
        info!(%addr, auth, "VNC server listening");
    }
    while let Some((permit, stream, peer)) = accept_bounded(&listener, &slots, &stop).await {
        let (cfg, desktop, stop) = (Arc::clone(&cfg), desktop.clone(), stop.clone());
        tokio::spawn(
            async move {
                let _permit = permit;
                info!("VNC client connected");
                tokio::select! {
                    () = serve_client(stream, peer, cfg, desktop) => {}
                    () = stop.cancelled() => {}
                }
            }
            .instrument(info_span!("vnc", %peer)),
        );
    }
}

/// Serves one client on any byte stream (TCP here, a WebSocket pipe for the browser) and logs
/// how it ended.
pub async fn serve_client<S: Io + 'static>(
    stream: S,
    peer: SocketAddr,
    cfg: Arc<VncConfig>,
    desktop: Desktop,
) {
    match serve(stream, peer, cfg, desktop).await {
        Ok(()) => info!("VNC client disconnected"),
        Err(ConnError::Io(e)) => debug!(error = %e, "VNC client connection ended"),
        Err(e) => warn!(error = %e, "VNC client refused or dropped"),
    }
}
