//! The RDP server: ironrdp-server sessions fed from the shared framebuffer, behind our own
//! accept loop so several clients can be connected at once.
//!
//! `RdpServer` is not `Send`, so all sessions share one dedicated "rdp" thread running a
//! current-thread runtime with a `LocalSet`; ironrdp encodes on that runtime's blocking pool.
//! Each session gets its own `RdpServer` (its own encoder state and diff copy of the screen).
//!
//! Modules: `framing` (pure PDU framing, both directions), `transport` (TLS and the byte
//! stream under ironrdp), `login` (the shared failed-login limit), `input` (typed events →
//! guest input), `display` (framebuffer → bitmaps), `sound`, `audio_input` + `dvc_tap`
//! (microphone), `session` (one client and the connection policy).

pub mod audio_input;
pub mod clipboard;
pub mod display;
pub mod dvc_tap;
pub mod framing;
pub mod gfx;
pub mod gfx_display;
pub mod input;
pub mod login;
pub mod session;
pub mod sound;
pub mod transport;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span};

use crate::net::accept_bounded;
use crate::session::Desktop;
use crate::session::auth::Auth;
use crate::session::stats::Counters;
use crate::tls::TlsIdentity;

/// Clients connected (or connecting) at once; more wait in the kernel's backlog.
pub const MAX_SESSIONS: usize = 16;

/// What happens when a second client finishes logging in while another is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Policy {
    /// Both see and control the desktop.
    #[default]
    Share,
    /// The newcomer takes over; the others are disconnected.
    Preempt,
    /// The newcomer is disconnected.
    Reject,
}

/// How clients prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Security {
    /// Network Level Authentication (CredSSP, HYBRID and HYBRID_EX) inside TLS.
    #[default]
    Nla,
    /// TLS, then the user name and password in the Client Info PDU (older clients).
    Tls,
}

#[derive(Debug, Clone)]
pub struct RdpConfig {
    pub tls: TlsIdentity,
    pub security: Security,
    /// Who may log in; shared with the VNC and web listeners (one failed-login limit). Without
    /// credentials (`--insecure-no-auth`) `security` must be TLS.
    pub auth: Arc<Auth>,
    pub policy: Policy,
    /// Time from TCP accept to an activated desktop (including typing a password).
    pub handshake_timeout: Duration,
    /// Counters summed over every session (logs, tests, benchmarks).
    pub stats: Arc<Counters>,
    /// Offer the graphics pipeline and send H.264 to clients that take it.
    pub h264: bool,
    /// How long the screen must be still before H.264's lossy areas are sent again exactly
    /// (Planar); `None`: never (tests look at the lossy picture).
    pub h264_lossless_after: Option<Duration>,
}

impl RdpConfig {
    pub fn new(tls: TlsIdentity, auth: Arc<Auth>) -> Self {
        Self {
            tls,
            security: if auth.required() {
                Security::Nla
            } else {
                Security::Tls
            },
            auth,
            policy: Policy::Share,
            handshake_timeout: Duration::from_secs(30),
            stats: Arc::default(),
            h264: true,
            h264_lossless_after: Some(gfx_display::STILL),
        }
    }
}

/// The JSON libvirt reads from an RDP helper's `--print-capabilities`.
pub fn capabilities_json() -> String {
    serde_json::json!({
        "type": "qemu-rdp",
        "features": ["dbus-address", "remotefx"],
    })
    .to_string()
}

/// Serves RDP on `listener` until `stop`, on a thread of its own. Returns once the thread runs.
pub fn spawn(
    listener: TcpListener,
    cfg: Arc<RdpConfig>,
    desktop: Desktop,
    stop: CancellationToken,
) -> io::Result<()> {
    if cfg.security == Security::Nla && !cfg.auth.required() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "NLA needs credentials: set a password or choose --rdp-security tls",
        ));
    }
    // rustls is built with two crypto providers in this graph (ironrdp's and ours); anything
    // that asks for the process default must not panic on the ambiguity.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let listener = listener.into_std()?;
    std::thread::Builder::new()
        .name("rdp".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    error!(error = %e, "RDP runtime did not start");
                    return;
                }
            };
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => accept_loop(listener, cfg, desktop, stop).await,
                    Err(e) => error!(error = %e, "RDP listener unusable"),
                }
            });
        })?;
    Ok(())
}

async fn accept_loop(
    listener: TcpListener,
    cfg: Arc<RdpConfig>,
    desktop: Desktop,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_SESSIONS));
    let registry = session::Registry::default();
    info!(
        addr = ?listener.local_addr().ok(),
        security = ?cfg.security,
        policy = ?cfg.policy,
        "RDP listening"
    );
    while let Some((permit, stream, peer)) = accept_bounded(&listener, &slots, &stop).await {
        let span = info_span!("rdp", client = %peer);
        let session = session::Session {
            cfg: Arc::clone(&cfg),
            desktop: desktop.clone(),
            registry: registry.clone(),
            stop: stop.child_token(),
            server_stop: stop.clone(),
        };
        tokio::task::spawn_local(
            async move {
                session.run(stream, peer).await;
                drop(permit);
            }
            .instrument(span),
        );
    }
    registry.close_all();
}
