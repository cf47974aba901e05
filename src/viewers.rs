//! The listeners viewers connect to — VNC, RDP and the web client — bound together and run until
//! `stop`, so `serve`, `bridge` and `demo` start them the same way. This is where the front ends
//! are wired to the console and to each other (the browser page carries the VNC server); they
//! never import one another.

use crate::qemu::clipboard::ClipboardSettings;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::h264::record::{RecordConfig, Recorder};
use crate::metrics::Protocol;
use crate::qemu::source::Consoles;
use crate::rdp::RdpConfig;
use crate::session::Desktop;
use crate::session::budget::Budget;
use crate::session::stats::Counters;
use crate::vnc::VncConfig;
use crate::web::{StreamServer, WebConfig};

/// Which listeners to run (`None` disables one).
#[derive(Clone, Default)]
pub struct Viewers {
    pub vnc: Option<(SocketAddr, Arc<VncConfig>)>,
    pub rdp: Option<(SocketAddr, Arc<RdpConfig>)>,
    /// The web listener, and the VNC settings for connections over its WebSocket (no VeNCrypt:
    /// the page's HTTPS is the TLS).
    pub web: Option<(SocketAddr, WebConfig, Arc<VncConfig>)>,
    /// Plain-HTTP `/metrics` for scrapers (the web listener serves it too).
    pub metrics: Option<SocketAddr>,
    /// What viewers may cost (unlimited unless set).
    pub budget: Option<Arc<Budget>>,
    /// Which way clipboard text may go, and how much (the source applies it, see
    /// [`crate::qemu::source::SourceOptions`]).
    pub clipboard: ClipboardSettings,
    /// Where viewer sessions are recorded (`--record-dir`), if anywhere.
    pub record: Option<RecordConfig>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}")]
pub struct ListenError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Where the listeners ended up (ports may have been chosen by the system).
#[derive(Debug, Clone, Default)]
pub struct Listening {
    pub vnc: Option<SocketAddr>,
    pub rdp: Option<SocketAddr>,
    pub web: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    /// The console's shared H.264 stream (its counters, for benchmarks).
    pub video: Option<crate::h264::Video>,
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, ListenError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ListenError { addr, source })
}

impl Viewers {
    /// Binds every listener first (so a bad address fails before anything runs), then serves
    /// the primary console on each until `stop`.
    pub async fn start(
        &self,
        consoles: &Consoles,
        stop: &CancellationToken,
    ) -> Result<Listening, ListenError> {
        let vnc = match &self.vnc {
            Some((addr, cfg)) => Some((bind(*addr).await?, Arc::clone(cfg))),
            None => None,
        };
        let rdp = match &self.rdp {
            Some((addr, cfg)) => Some((bind(*addr).await?, Arc::clone(cfg))),
            None => None,
        };
        let web = match &self.web {
            Some((addr, cfg, vnc)) => Some((bind(*addr).await?, cfg.clone(), Arc::clone(vnc))),
            None => None,
        };
        let metrics_listener = match self.metrics {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let mut desktop = Desktop::primary(consoles);
        if let Some(b) = &self.budget {
            desktop.budget = Arc::clone(b);
        }
        if let Some(r) = &self.record {
            desktop.recorder = Some(Recorder::new(r.clone(), desktop.video.clone()));
        }
        register_metrics(&desktop, &vnc, &rdp, &web);
        let mut at = Listening {
            video: Some(desktop.video.clone()),
            ..Listening::default()
        };
        if let Some((listener, cfg)) = vnc {
            at.vnc = listener.local_addr().ok();
            tokio::spawn(crate::vnc::server::run(
                listener,
                cfg,
                desktop.clone(),
                stop.child_token(),
            ));
        }
        if let Some((listener, cfg)) = rdp {
            let addr = listener.local_addr().ok();
            crate::rdp::spawn(listener, cfg, desktop.clone(), stop.child_token()).map_err(
                |source| ListenError {
                    addr: addr.unwrap_or(([0, 0, 0, 0], 0).into()),
                    source,
                },
            )?;
            at.rdp = addr;
        }
        if let Some((listener, cfg, vnc)) = web {
            at.web = listener.local_addr().ok();
            let for_rfb = desktop.clone();
            let rfb: StreamServer = Arc::new(move |stream, peer| {
                let (cfg, desktop) = (Arc::clone(&vnc), for_rfb.clone());
                Box::pin(crate::vnc::server::serve_client(stream, peer, cfg, desktop))
            });
            tokio::spawn(crate::web::run(
                listener,
                cfg,
                desktop.clone(),
                rfb,
                stop.child_token(),
            ));
        }
        if let Some(listener) = metrics_listener {
            at.metrics = listener.local_addr().ok();
            tokio::spawn(crate::web::run_metrics(listener, stop.child_token()));
        }
        Ok(at)
    }
}

/// What `/metrics` reads at scrape time from the console, the clipboard, the budget and each
/// front end's totals (the metrics module depends on none of them).
fn register_metrics(
    desktop: &Desktop,
    vnc: &Option<(TcpListener, Arc<VncConfig>)>,
    rdp: &Option<(TcpListener, Arc<RdpConfig>)>,
    web: &Option<(TcpListener, WebConfig, Arc<VncConfig>)>,
) {
    use crate::framebuffer::PathCounters;
    use crate::metrics as m;
    let metrics = m::global();
    let budget = Arc::clone(&desktop.budget);
    metrics.register_budget(Box::new(move || m::Budget {
        memory_limit: budget.limits.memory,
        cpus: budget.limits.cpus,
        usage: budget.usage(),
        refusals: budget.refused(),
    }));
    let fb = desktop.fb.clone();
    metrics.register_frames(Box::new(move || {
        let (c, get) = (fb.counters(), PathCounters::get);
        m::Frames {
            inline: get(&c.scanout) + get(&c.update),
            shm: get(&c.scanout_map) + get(&c.update_map),
        }
    }));
    let video = desktop.video.clone();
    metrics.register_h264(Box::new(move || {
        let s = video.stats();
        let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        m::H264 {
            key_frames: get(&s.key_frames),
            frames: get(&s.frames),
            bytes: get(&s.bytes),
            encode_seconds: get(&s.encode_ns) as f64 / 1e9,
            subscribers: video.subscribers() as u64,
        }
    }));
    let clipboard = desktop.clipboard.clone();
    metrics.register_clipboard(Box::new(move || {
        let c = clipboard.counters();
        m::Clipboard {
            to_guest: c.to_guest,
            from_guest: c.from_guest,
            refused: c.refused,
        }
    }));
    let totals = [
        vnc.as_ref().map(|(_, c)| (c.protocol, &c.stats)),
        rdp.as_ref().map(|(_, c)| (Protocol::Rdp, &c.stats)),
        web.as_ref().map(|(_, _, c)| (c.protocol, &c.stats)),
    ];
    for (protocol, stats) in totals.into_iter().flatten() {
        let c = Arc::clone(stats);
        let read = move || m::Traffic {
            bytes_out: Counters::get(&c.bytes_out),
            bytes_in: Counters::get(&c.bytes_in),
            updates: Counters::get(&c.updates),
            input_events: Counters::get(&c.input_events),
            audio_bytes: Counters::get(&c.audio_bytes),
        };
        metrics.register_traffic(protocol, Arc::as_ptr(stats) as usize, Box::new(read));
    }
}
