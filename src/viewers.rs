//! The listeners viewers connect to — VNC, RDP and the web client — bound together and run until
//! `stop`, so `serve`, `bridge` and `demo` start them the same way.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::qemu::source::Consoles;
use crate::rdp::RdpConfig;
use crate::vnc::conn::VncConfig;
use crate::web::WebConfig;

/// Which listeners to run (`None` disables one).
#[derive(Clone, Default)]
pub struct Viewers {
    pub vnc: Option<(SocketAddr, Arc<VncConfig>)>,
    pub rdp: Option<(SocketAddr, Arc<RdpConfig>)>,
    pub web: Option<(SocketAddr, WebConfig)>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}")]
pub struct ListenError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Where the listeners ended up (ports may have been chosen by the system).
#[derive(Debug, Clone, Copy, Default)]
pub struct Listening {
    pub vnc: Option<SocketAddr>,
    pub rdp: Option<SocketAddr>,
    pub web: Option<SocketAddr>,
}

impl Viewers {
    /// Binds every listener first (so a bad address fails before anything runs), then serves
    /// the primary console on each until `stop`.
    pub async fn start(
        &self,
        consoles: &Consoles,
        stop: &CancellationToken,
    ) -> Result<Listening, ListenError> {
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ListenError { addr, source })
        };
        let vnc = match &self.vnc {
            Some((addr, cfg)) => Some((bind(*addr).await?, Arc::clone(cfg))),
            None => None,
        };
        let rdp = match &self.rdp {
            Some((addr, cfg)) => Some((bind(*addr).await?, Arc::clone(cfg))),
            None => None,
        };
        let web = match &self.web {
            Some((addr, cfg)) => Some((bind(*addr).await?, cfg.clone())),
            None => None,
        };
        let mut at = Listening::default();
        if let Some((listener, cfg)) = vnc {
            at.vnc = listener.local_addr().ok();
            tokio::spawn(crate::vnc::server::run(
                listener,
                cfg,
                consoles.desktop(),
                stop.child_token(),
            ));
        }
        if let Some((listener, cfg)) = rdp {
            let addr = listener.local_addr().ok();
            crate::rdp::spawn(listener, cfg, consoles.desktop(), stop.child_token()).map_err(
                |e| ListenError {
                    addr: addr.unwrap_or(([0, 0, 0, 0], 0).into()),
                    source: std::io::Error::other(format!("{e:#}")),
                },
            )?;
            at.rdp = addr;
        }
        if let Some((listener, cfg)) = web {
            at.web = listener.local_addr().ok();
            tokio::spawn(crate::web::run(
                listener,
                cfg,
                consoles.desktop(),
                stop.child_token(),
            ));
        }
        Ok(at)
    }
}

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
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}
