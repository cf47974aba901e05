//! What every VNC connection of a listener shares: credentials (shared with the other front
//! ends), TLS, the share policy and the session registry that lets an exclusive client end the
//! others, and the counters.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;

use super::share::Groups;
use crate::metrics::Protocol;
use crate::session::auth::Auth;
use crate::session::stats::Counters;
use crate::tls::TlsIdentity;

/// Time a client has to finish the handshake (including typing a password into a dialog).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// What a non-shared (exclusive) ClientInit may do to the viewers already connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SharePolicy {
    /// Every viewer shares the desktop; the exclusive flag is ignored (the default: a VM desktop
    /// is often watched by several people).
    #[default]
    ForceShared,
    /// RFC 6143 behaviour: an exclusive client disconnects the others.
    AllowExclusive,
}

/// What every connection shares.
pub struct VncConfig {
    /// Who may log in; shared with the RDP and web listeners (one failed-login limit).
    pub auth: Arc<Auth>,
    pub desktop_name: String,
    /// Enables VeNCrypt (TLS) when set.
    pub tls: Option<TlsIdentity>,
    /// Offer only VeNCrypt: no password or desktop ever crosses the network in clear.
    pub require_tls: bool,
    pub share: SharePolicy,
    /// A client that has not finished the handshake by then is dropped (slow-loris guard).
    pub handshake_timeout: Duration,
    /// What was sent, summed over all connections (logs, tests, benchmarks).
    pub stats: Arc<Counters>,
    /// The front end these viewers come by (plain VNC, or the browser's WebSocket), for metrics.
    pub protocol: Protocol,
    /// The shared encodings (and encoder pool) of the console; give every listener serving it
    /// the same one so their viewers share.
    pub groups: Arc<Groups>,
    /// Open H.264 for clients that list it (noVNC with WebCodecs), while the screen looks like
    /// video.
    pub h264: bool,
    pub(super) sessions: Sessions,
}

/// Encoded frames a group keeps, in bytes, when the budget says nothing tighter.
pub const DEFAULT_FRAME_BYTES: usize = 12 * 1024 * 1024;

impl VncConfig {
    pub fn new(auth: Arc<Auth>, desktop_name: impl Into<String>) -> Self {
        Self {
            auth,
            desktop_name: desktop_name.into(),
            tls: None,
            require_tls: false,
            share: SharePolicy::default(),
            handshake_timeout: HANDSHAKE_TIMEOUT,
            stats: Arc::default(),
            protocol: Protocol::Vnc,
            groups: Groups::new(
                std::thread::available_parallelism().map_or(1, |n| n.get()),
                DEFAULT_FRAME_BYTES,
            ),
            h264: true,
            sessions: Sessions::default(),
        }
    }
}

/// Numbers sessions so an exclusive client can end the ones that came before it.
pub(super) struct Sessions {
    next: AtomicU64,
    /// Every session with an id below this value must end.
    evict_below: watch::Sender<u64>,
}

impl Default for Sessions {
    fn default() -> Self {
        Self {
            next: AtomicU64::new(1),
            evict_below: watch::Sender::new(0),
        }
    }
}

impl Sessions {
    /// A new session's id, and the signal that tells it to end.
    pub(super) fn join(&self) -> (u64, watch::Receiver<u64>) {
        (
            self.next.fetch_add(1, Ordering::Relaxed),
            self.evict_below.subscribe(),
        )
    }

    /// Ends every session that joined before `id`.
    pub(super) fn evict_before(&self, id: u64) {
        self.evict_below.send_replace(id);
    }
}
