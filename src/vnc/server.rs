//! The VNC accept loop: one task per client, bounded in number, each with its own damage
//! tracking and output, so a slow or hostile client never holds up the others or QEMU.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::conn::{ConnError, VncConfig, serve};
use crate::qemu::source::Desktop;
use crate::viewers::accept_bounded;

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
        info!(%addr, auth = if cfg.password.is_some() { "vnc" } else { "none" }, "VNC server listening");
    }
    while let Some((permit, stream, peer)) = accept_bounded(&listener, &slots, &stop).await {
        let (cfg, desktop, stop) = (Arc::clone(&cfg), desktop.clone(), stop.clone());
        tokio::spawn(
            async move {
                let _permit = permit;
                info!("VNC client connected");
                let result = tokio::select! {
                    r = serve(stream, peer, cfg, desktop) => r,
                    () = stop.cancelled() => Ok(()),
                };
                match result {
                    Ok(()) => info!("VNC client disconnected"),
                    Err(ConnError::Io(e)) => debug!(error = %e, "VNC client connection ended"),
                    Err(e) => warn!(error = %e, "VNC client refused or dropped"),
                }
            }
            .instrument(info_span!("vnc", %peer)),
        );
    }
}
