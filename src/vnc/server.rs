//! The VNC accept loop: one task per client, bounded in number, each with its own damage
//! tracking and output, so a slow or hostile client never holds up the others or QEMU.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::config::{SharePolicy, VncConfig};
use super::handshake::{ConnError, handshake};
use super::session::Session;
use crate::net::{Io, accept_bounded};
use crate::session::Desktop;
use crate::session::audit::{SessionAudit, io_reason};
use crate::session::budget::vnc_viewer_cost;
use crate::session::stats::ViewerStats;

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

/// Serves one accepted connection to the end: handshake, then the session, audited from login
/// to its end.
async fn serve<S: Io + 'static>(
    s: S,
    peer: SocketAddr,
    cfg: Arc<VncConfig>,
    desktop: Desktop,
) -> Result<(), ConnError> {
    let (w, h) = desktop.fb.size();
    let over_budget = desktop.budget.admit(vnc_viewer_cost(w, h)).err();
    let hs = handshake(s, &cfg, peer, over_budget);
    let (io, shared, user) = match tokio::time::timeout(cfg.handshake_timeout, hs).await {
        Ok(r) => r?,
        Err(_) => return Err(ConnError::Timeout),
    };
    let session = cfg.sessions.join();
    if !shared && cfg.share == SharePolicy::AllowExclusive {
        info!("exclusive client: disconnecting the other viewers");
        cfg.sessions.evict_before(session.0);
    }
    info!(shared, "VNC client authenticated");
    let stats = ViewerStats::new(&cfg.stats);
    let audit = SessionAudit::start(cfg.protocol, peer, user.as_deref(), shared, &stats)
        .record(desktop.recorder.as_ref());
    let r = Session::new(io, cfg, desktop, session, stats).run().await;
    audit.end(&match &r {
        Ok(()) => "client disconnected".to_owned(),
        Err(ConnError::Io(e)) => io_reason(e),
        Err(ConnError::Evicted) => "preempted by an exclusive viewer".to_owned(),
        Err(e) => format!("protocol error: {e}"),
    });
    r
}
