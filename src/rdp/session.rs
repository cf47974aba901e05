//! One RDP client: its own `RdpServer`, the TLS/input tap under it, a deadline until the desktop
//! is activated, and the connection policy applied once the client has logged in.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ironrdp_server::{
    Credentials, KeyboardEvent, MouseEvent, RdpServer, RdpServerInputHandler, TransportTls,
};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::clipboard::ClipboardFactory;
use super::display::{Display, H264};
use super::dvc_tap::DvcTap;
use super::gfx::GfxLink;
use super::input::{self, Event, Inbound};
use super::login::Login;
use super::sound::SoundFactory;
use super::transport::RdpStream;
use super::{Policy, RdpConfig, Security};
use crate::metrics::Protocol;
use crate::qemu::clipboard::Policy as ClipboardPolicy;
use crate::qemu::input::button;
use crate::session::Desktop;
use crate::session::audit::SessionAudit;
use crate::session::budget::rdp_viewer_cost;
use crate::session::stats::{Counters, ViewerStats};

/// Input events queued per session before the connection's own are dropped.
const INPUT_QUEUE: usize = 1024;

/// Activated sessions, for the connection policy.
#[derive(Clone, Default)]
pub struct Registry {
    inner: Arc<Mutex<Vec<(u64, CancellationToken)>>>,
    next: Arc<AtomicU64>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(u64, CancellationToken)>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `policy` to a session that just logged in; `false` means it must go.
    fn admit(&self, id: u64, token: &CancellationToken, policy: Policy) -> bool {
        let mut sessions = self.lock();
        match policy {
            Policy::Share => {}
            Policy::Reject if !sessions.is_empty() => return false,
            Policy::Reject => {}
            Policy::Preempt => {
                for (other, t) in sessions.drain(..) {
                    info!(
                        session = other,
                        "disconnected: a new client took over (preempt)"
                    );
                    t.cancel();
                }
            }
        }
        sessions.push((id, token.clone()));
        true
    }

    fn remove(&self, id: u64) {
        self.lock().retain(|(s, _)| *s != id);
    }

    pub fn active(&self) -> usize {
        self.lock().len()
    }

    pub fn close_all(&self) {
        for (_, t) in self.lock().drain(..) {
            t.cancel();
        }
    }
}

pub struct Session {
    pub cfg: Arc<RdpConfig>,
    pub desktop: Desktop,
    pub registry: Registry,
    pub stop: CancellationToken,
    /// The listener's token (`stop` is this session's child of it): cancelled means shutdown,
    /// `stop` alone cancelled means another client preempted this one.
    pub server_stop: CancellationToken,
}

impl Session {
    pub async fn run(self, stream: TcpStream, peer: SocketAddr) {
        let id = self.registry.next.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let stats = ViewerStats::new(&self.cfg.stats);
        let (input_tx, input_rx) = mpsc::channel::<Inbound>(INPUT_QUEUE);
        tokio::spawn(input::drive(
            self.desktop.viewer_input(),
            self.desktop.control.clone(),
            input_rx,
        ));
        let (activated_tx, mut activated) = watch::channel(false);
        let gfx = GfxLink::default();
        let mut display = Display::new(
            self.desktop.fb.clone(),
            self.desktop.control.clone(),
            activated_tx,
            stats.clone(),
        );
        if self.cfg.h264 {
            display = display.with_h264(H264 {
                link: gfx.clone(),
                video: self.desktop.video.clone(),
                lossless_after: self.cfg.h264_lossless_after,
                budget: Arc::clone(&self.desktop.budget),
            });
        }
        let acceptor = TlsAcceptor::from(Arc::clone(&self.cfg.tls.config));
        let builder = RdpServer::builder().with_addr(([127, 0, 0, 1], 0));
        let builder = match self.cfg.security {
            Security::Nla => builder.with_hybrid(acceptor.clone(), self.cfg.tls.public_key.clone()),
            Security::Tls => builder.with_tls(acceptor.clone()),
        };
        let mut server = builder
            .with_input_handler(SlowPathInput {
                events: input_tx.clone(),
                stats: stats.clone(),
            })
            .with_display_handler(display)
            // The graphics pipeline channel, offered only with H.264 on.
            .with_gfx_factory(self.cfg.h264.then(|| gfx.factory()))
            .with_sound_factory(Some(Box::new(SoundFactory::new(
                self.desktop.audio.clone(),
                stats.clone(),
            ))))
            // `--clipboard off`: no cliprdr channel at all.
            .with_cliprdr_factory(
                (self.desktop.clipboard.policy() != ClipboardPolicy::Off).then(|| {
                    Box::new(ClipboardFactory::new(self.desktop.clipboard.clone()))
                        as Box<dyn ironrdp_server::CliprdrServerFactory>
                }),
            )
            .build();
        let auth = &self.cfg.auth;
        server.set_credentials(auth.credentials().map(|c| Credentials {
            username: auth.rdp_username().to_owned(),
            password: c.password.clone(),
            domain: None,
        }));
        let mut login = Login::new(Arc::clone(auth), peer, self.cfg.security);
        let (w, h) = self.desktop.fb.size();
        if let Err(e) = self.desktop.budget.admit(rdp_viewer_cost(w, h)) {
            warn!(session = id, "{e}");
            login = login.refuse_over_budget();
        }
        let mut stream = RdpStream::new(
            stream,
            acceptor,
            input_tx,
            stats.clone(),
            login,
            DvcTap::new(self.desktop.mic.clone()),
        );

        let token = self.stop.clone();
        let recorder = self.desktop.recorder.clone();
        let registry = self.registry.clone();
        let policy = self.cfg.policy;
        let timeout = self.cfg.handshake_timeout;
        // Until the desktop is activated the client gets `handshake_timeout`; once it is, the
        // policy decides whether it may stay.
        let mut audit = None;
        let audit_slot = &mut audit;
        let gate = async {
            // Drop the watch's read guard at once: the display sets the flag again on every
            // reactivation and would wait for it.
            let seen = tokio::time::timeout(timeout, activated.wait_for(|a| *a))
                .await
                .map(|r| r.is_ok());
            match seen {
                Ok(true) => {
                    if registry.admit(id, &token, policy) {
                        let user = Some(auth.rdp_username());
                        let shared = policy == Policy::Share;
                        *audit_slot = Some(
                            SessionAudit::start(Protocol::Rdp, peer, user, shared, &stats)
                                .record(recorder.as_ref()),
                        );
                        info!(
                            session = id,
                            login_ms = started.elapsed().as_millis() as u64,
                            "RDP client logged in"
                        );
                        std::future::pending::<&str>().await
                    } else {
                        "another client is connected (--rdp-policy reject)"
                    }
                }
                Ok(false) => std::future::pending::<&str>().await,
                Err(_) => "no desktop within the handshake timeout",
            }
        };
        let reason: String = tokio::select! {
            r = server.run_connection_with(&mut stream, TransportTls::AlreadyDone) => match r {
                Ok(()) => {
                    debug!(session = id, "RDP client left");
                    "client disconnected".into()
                }
                Err(e) => {
                    let error = format!("{e:#}");
                    info!(session = id, error, "RDP connection ended");
                    let lower = error.to_ascii_lowercase();
                    if ["reset", "broken pipe", "eof"].iter().any(|w| lower.contains(w)) {
                        "client reset".into()
                    } else {
                        format!("connection error: {error}")
                    }
                }
            },
            why = gate => {
                warn!(session = id, reason = why, "RDP client disconnected");
                why.into()
            }
            () = token.cancelled() => {
                debug!(session = id, "RDP session closed");
                if self.server_stop.is_cancelled() {
                    "sidecar shutdown".into()
                } else {
                    "preempted by a new RDP client".into()
                }
            }
        };
        if let Some(a) = audit.take() {
            a.end(&reason);
        }
        self.registry.remove(id);
        let own = stats.own();
        info!(
            session = id,
            secs = started.elapsed().as_secs(),
            login = ?stream.login().outcome(),
            bytes_out = Counters::get(&own.bytes_out),
            bytes_in = Counters::get(&own.bytes_in),
            updates = Counters::get(&own.updates),
            "RDP session over"
        );
    }
}

/// Input ironrdp decoded itself (slow-path Input Event PDUs, which FreeRDP and mstsc do not use
/// once fast-path input is negotiated). Its conversions lose the E1 flag, the middle button and
/// the horizontal wheel; what survives becomes typed events for the same translator.
struct SlowPathInput {
    events: mpsc::Sender<Inbound>,
    stats: ViewerStats,
}

impl SlowPathInput {
    fn send(&self, e: Event) {
        self.stats.add(|c| &c.input_events, 1);
        if self.events.try_send(Inbound::Event(e)).is_err() {
            self.stats.add(|c| &c.input_dropped, 1);
        }
    }
}

impl RdpServerInputHandler for SlowPathInput {
    fn keyboard(&mut self, event: KeyboardEvent) {
        let key = |code, extended, down| Event::Key {
            code,
            extended,
            extended1: false,
            down,
        };
        self.send(match event {
            KeyboardEvent::Pressed { code, extended } => key(code, extended, true),
            KeyboardEvent::Released { code, extended } => key(code, extended, false),
            KeyboardEvent::UnicodePressed(ch) => Event::Unicode { ch, down: true },
            KeyboardEvent::UnicodeReleased(ch) => Event::Unicode { ch, down: false },
            KeyboardEvent::Synchronize(f) => Event::Sync(input::sync_leds(f)),
        });
    }

    fn mouse(&mut self, event: MouseEvent) {
        let press = |button, down| Event::Button { button, down };
        self.send(match event {
            MouseEvent::Move { x, y } => Event::Move { x, y },
            MouseEvent::LeftPressed => press(button::LEFT, true),
            MouseEvent::LeftReleased => press(button::LEFT, false),
            MouseEvent::RightPressed => press(button::RIGHT, true),
            MouseEvent::RightReleased => press(button::RIGHT, false),
            MouseEvent::MiddlePressed => press(button::MIDDLE, true),
            MouseEvent::MiddleReleased => press(button::MIDDLE, false),
            MouseEvent::Button4Pressed => press(button::SIDE, true),
            MouseEvent::Button4Released => press(button::SIDE, false),
            MouseEvent::Button5Pressed => press(button::EXTRA, true),
            MouseEvent::Button5Released => press(button::EXTRA, false),
            MouseEvent::VerticalScroll { value } => Event::Wheel {
                horizontal: false,
                units: i32::from(value),
            },
            MouseEvent::Scroll { x, y } => {
                if y != 0 {
                    Event::Wheel {
                        horizontal: false,
                        units: y,
                    }
                } else {
                    Event::Wheel {
                        horizontal: true,
                        units: x,
                    }
                }
            }
            MouseEvent::RelMove { x, y } => Event::Relative {
                dx: x.clamp(-32768, 32767) as i16,
                dy: y.clamp(-32768, 32767) as i16,
            },
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies() {
        let r = Registry::default();
        let a = CancellationToken::new();
        let b = CancellationToken::new();
        assert!(r.admit(1, &a, Policy::Reject));
        assert!(!r.admit(2, &b, Policy::Reject));
        assert!(r.admit(2, &b, Policy::Share));
        assert_eq!(r.active(), 2);
        let c = CancellationToken::new();
        assert!(r.admit(3, &c, Policy::Preempt));
        assert!(a.is_cancelled() && b.is_cancelled() && !c.is_cancelled());
        assert_eq!(r.active(), 1);
        r.remove(3);
        assert_eq!(r.active(), 0);
    }

    #[test]
    fn slow_path_input_becomes_typed_events() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut h = SlowPathInput {
            events: tx,
            stats: ViewerStats::new(&Arc::default()),
        };
        h.mouse(MouseEvent::VerticalScroll { value: -120 });
        h.mouse(MouseEvent::MiddlePressed);
        h.keyboard(KeyboardEvent::Pressed {
            code: 0x48,
            extended: true,
        });
        let got: Vec<Event> = std::iter::from_fn(|| match rx.try_recv() {
            Ok(Inbound::Event(e)) => Some(e),
            _ => None,
        })
        .collect();
        assert_eq!(
            got,
            [
                Event::Wheel {
                    horizontal: false,
                    units: -120
                },
                Event::Button {
                    button: button::MIDDLE,
                    down: true
                },
                Event::Key {
                    code: 0x48,
                    extended: true,
                    extended1: false,
                    down: true
                }
            ]
        );
        let mut actions = Vec::new();
        input::Translator::new().translate(&got[0], &mut actions);
        assert_eq!(actions, [input::Action::Wheel(button::WHEEL_DOWN)]);
    }
}
