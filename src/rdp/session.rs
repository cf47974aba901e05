//! One RDP client: its own `RdpServer`, the TLS/input tap under it, a deadline until the desktop
//! is activated, and the connection policy applied once the client has logged in.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ironrdp::pdu::input::fast_path::{FastPathInputEvent, KeyboardFlags, SynchronizeFlags};
use ironrdp::pdu::input::mouse::PointerFlags;
use ironrdp::pdu::input::mouse_rel::PointerRelFlags;
use ironrdp::pdu::input::{MousePdu, MouseRelPdu};
use ironrdp::server::{
    Credentials, KeyboardEvent, MouseEvent, RdpServer, RdpServerInputHandler, TransportTls,
};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::display::Display;
use super::dvc_tap::DvcTap;
use super::input::{self, Event};
use super::sound::SoundFactory;
use super::transport::{RdpStream, Traffic};
use super::{Policy, RdpConfig, Security};
use crate::qemu::source::Desktop;

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
}

impl Session {
    pub async fn run(self, stream: TcpStream) {
        let id = self.registry.next.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let (events_tx, events_rx) = mpsc::channel::<Event>(1024);
        tokio::spawn(input::drive(self.desktop.input.clone(), events_rx));
        let (activated_tx, mut activated) = watch::channel(false);
        let display = Display::new(
            self.desktop.fb.clone(),
            self.desktop.input.clone(),
            activated_tx,
            Arc::clone(&self.cfg.stats),
        );
        let acceptor = TlsAcceptor::from(Arc::clone(&self.cfg.tls.config));
        let traffic = Arc::new(Traffic {
            total: Some(Arc::clone(&self.cfg.stats)),
            ..Traffic::default()
        });
        let builder = RdpServer::builder().with_addr(([127, 0, 0, 1], 0));
        let builder = match self.cfg.security {
            Security::Nla => builder.with_hybrid(acceptor.clone(), self.cfg.tls.public_key.clone()),
            Security::Tls => builder.with_tls(acceptor.clone()),
        };
        let mut server = builder
            .with_input_handler(SlowPathInput {
                events: events_tx.clone(),
                last: (0, 0),
            })
            .with_display_handler(display)
            .with_sound_factory(Some(Box::new(SoundFactory::new(
                self.desktop.audio.clone(),
                Arc::clone(&self.cfg.stats),
                Arc::clone(&traffic),
            ))))
            .build();
        server.set_credentials(self.cfg.credentials.as_ref().map(|(u, p)| Credentials {
            username: u.clone(),
            password: p.clone(),
            domain: None,
        }));
        let stream = RdpStream::new(
            stream,
            acceptor,
            events_tx,
            Arc::clone(&traffic),
            DvcTap::new(self.desktop.mic.clone()),
        );

        let token = self.stop.clone();
        let registry = self.registry.clone();
        let policy = self.cfg.policy;
        let timeout = self.cfg.handshake_timeout;
        // Until the desktop is activated the client gets `handshake_timeout`; once it is, the
        // policy decides whether it may stay.
        let gate = async {
            // Drop the watch's read guard at once: the display sets the flag again on every
            // reactivation and would wait for it.
            let seen = tokio::time::timeout(timeout, activated.wait_for(|a| *a))
                .await
                .map(|r| r.is_ok());
            match seen {
                Ok(true) => {
                    if registry.admit(id, &token, policy) {
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
        tokio::select! {
            r = server.run_connection_with(stream, TransportTls::AlreadyDone) => match r {
                Ok(()) => debug!(session = id, "RDP client left"),
                Err(e) => info!(session = id, error = format!("{e:#}"), "RDP connection ended"),
            },
            why = gate => warn!(session = id, reason = why, "RDP client disconnected"),
            () = token.cancelled() => debug!(session = id, "RDP session closed"),
        }
        self.registry.remove(id);
        info!(
            session = id,
            secs = started.elapsed().as_secs(),
            bytes_out = traffic.bytes_out.load(Ordering::Relaxed),
            bytes_in = traffic.bytes_in.load(Ordering::Relaxed),
            "RDP session over"
        );
    }
}

/// Input ironrdp decoded itself (slow-path Input Event PDUs, which FreeRDP and mstsc do not use
/// once fast-path input is negotiated). Its conversions lose the E1 flag, the middle button and
/// the horizontal wheel; what survives is re-expressed as fast-path events.
struct SlowPathInput {
    events: mpsc::Sender<Event>,
    last: (u16, u16),
}

impl SlowPathInput {
    fn send(&self, e: Event) {
        if self.events.try_send(e).is_err() {
            warn!("RDP input queue full: event dropped");
        }
    }

    fn mouse_at(&self, flags: PointerFlags) -> Event {
        FastPathInputEvent::MouseEvent(MousePdu {
            flags,
            number_of_wheel_rotation_units: 0,
            x_position: self.last.0,
            y_position: self.last.1,
        })
    }

    fn rel(&self, flags: PointerRelFlags) -> Event {
        FastPathInputEvent::MouseEventRel(MouseRelPdu {
            flags,
            x_delta: 0,
            y_delta: 0,
        })
    }
}

impl RdpServerInputHandler for SlowPathInput {
    fn keyboard(&mut self, event: KeyboardEvent) {
        let key = |code, extended: bool, up: bool| {
            let mut f = KeyboardFlags::empty();
            f.set(KeyboardFlags::EXTENDED, extended);
            f.set(KeyboardFlags::RELEASE, up);
            FastPathInputEvent::KeyboardEvent(f, code)
        };
        let e = match event {
            KeyboardEvent::Pressed { code, extended } => key(code, extended, false),
            KeyboardEvent::Released { code, extended } => key(code, extended, true),
            KeyboardEvent::UnicodePressed(c) => {
                FastPathInputEvent::UnicodeKeyboardEvent(KeyboardFlags::empty(), c)
            }
            KeyboardEvent::UnicodeReleased(c) => {
                FastPathInputEvent::UnicodeKeyboardEvent(KeyboardFlags::RELEASE, c)
            }
            KeyboardEvent::Synchronize(f) => {
                FastPathInputEvent::SyncEvent(SynchronizeFlags::from_bits_truncate(f.bits()))
            }
        };
        self.send(e);
    }

    fn mouse(&mut self, event: MouseEvent) {
        let down = PointerFlags::DOWN;
        let e = match event {
            MouseEvent::Move { x, y } => {
                self.last = (x, y);
                self.mouse_at(PointerFlags::MOVE)
            }
            MouseEvent::LeftPressed => self.mouse_at(PointerFlags::LEFT_BUTTON | down),
            MouseEvent::LeftReleased => self.mouse_at(PointerFlags::LEFT_BUTTON),
            MouseEvent::RightPressed => self.mouse_at(PointerFlags::RIGHT_BUTTON | down),
            MouseEvent::RightReleased => self.mouse_at(PointerFlags::RIGHT_BUTTON),
            MouseEvent::MiddlePressed => self.mouse_at(PointerFlags::MIDDLE_BUTTON_OR_WHEEL | down),
            MouseEvent::MiddleReleased => self.mouse_at(PointerFlags::MIDDLE_BUTTON_OR_WHEEL),
            MouseEvent::Button4Pressed => {
                self.rel(PointerRelFlags::XBUTTON1 | PointerRelFlags::DOWN)
            }
            MouseEvent::Button4Released => self.rel(PointerRelFlags::XBUTTON1),
            MouseEvent::Button5Pressed => {
                self.rel(PointerRelFlags::XBUTTON2 | PointerRelFlags::DOWN)
            }
            MouseEvent::Button5Released => self.rel(PointerRelFlags::XBUTTON2),
            MouseEvent::VerticalScroll { value } => {
                // Back to the 9-bit wire form the translator reads.
                let units = (value.clamp(-255, 255) as u16) & 0x1ff;
                self.mouse_at(PointerFlags::from_bits_retain(
                    PointerFlags::VERTICAL_WHEEL.bits() | units,
                ))
            }
            MouseEvent::Scroll { x, y } => {
                let (flag, v) = if y != 0 {
                    (PointerFlags::VERTICAL_WHEEL, y)
                } else {
                    (PointerFlags::HORIZONTAL_WHEEL, x)
                };
                let units = (v.clamp(-255, 255) as u16) & 0x1ff;
                self.mouse_at(PointerFlags::from_bits_retain(flag.bits() | units))
            }
            MouseEvent::RelMove { x, y } => FastPathInputEvent::MouseEventRel(MouseRelPdu {
                flags: PointerRelFlags::MOVE,
                x_delta: x.clamp(-32768, 32767) as i16,
                y_delta: y.clamp(-32768, 32767) as i16,
            }),
        };
        self.send(e);
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
    fn slow_path_wheel_keeps_direction() {
        let (tx, mut rx) = mpsc::channel(4);
        let mut h = SlowPathInput {
            events: tx,
            last: (0, 0),
        };
        h.mouse(MouseEvent::VerticalScroll { value: -120 });
        let Ok(FastPathInputEvent::MouseEvent(m)) = rx.try_recv() else {
            panic!("no event");
        };
        let mut out = Vec::new();
        input::Translator::new().translate(&FastPathInputEvent::MouseEvent(m), &mut out);
        assert_eq!(
            out,
            [input::Action::Wheel(crate::qemu::input::button::WHEEL_DOWN)]
        );
    }
}
