//! The byte stream ironrdp-server runs on. We do the TLS upgrade ourselves (right after the
//! X.224 Connection Confirm, as the protocol says) so that we see the plaintext; every inbound
//! PDU is framed and bounded ([`super::framing`]) before ironrdp gets it; fast-path input PDUs
//! are taken out and handed to the session's input task as they are.
//!
//! Why: ironrdp-server 0.13 decodes fast-path input lossily (no middle button, no horizontal
//! wheel, X buttons turned into left/right, the E1 flag of Pause dropped), and a hostile length
//! must never reach it. The same place follows the login ([`super::login`]) and carries our own
//! dynamic channel ([`super::dvc_tap`]) between ironrdp's PDUs.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::dvc_tap::DvcTap;
use super::framing::{MAX_BUFFERED, OutFrames, Pdu, TpktProgress, next_pdu};
use super::input::Inbound;
use super::login::Login;
use crate::session::stats::ViewerStats;

enum Link<S> {
    Plain(S),
    Accepting(Box<tokio_rustls::Accept<S>>),
    Tls(Box<tokio_rustls::server::TlsStream<S>>),
    Closed,
}

/// The stream handed to `RdpServer::run_connection_with(…, TransportTls::AlreadyDone)`.
pub struct RdpStream<S> {
    link: Link<S>,
    acceptor: TlsAcceptor,
    /// The Connection Confirm written and the Connection Request read before TLS.
    confirm: TpktProgress,
    request: TpktProgress,
    raw: BytesMut,
    ready: BytesMut,
    mcs_started: bool,
    eof: bool,
    input: mpsc::Sender<Inbound>,
    stats: ViewerStats,
    login: Login,
    /// A refusal to write before closing (a client over the failed-login limit).
    refusal: Option<BytesMut>,
    /// Our own dynamic channel (the microphone) and its PDUs waiting for a gap in ironrdp's.
    tap: DvcTap,
    inject: BytesMut,
    out_frames: OutFrames,
    last_drop_warning: Option<Instant>,
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl<S: AsyncRead + AsyncWrite + Unpin> RdpStream<S> {
    pub fn new(
        stream: S,
        acceptor: TlsAcceptor,
        input: mpsc::Sender<Inbound>,
        stats: ViewerStats,
        login: Login,
        tap: DvcTap,
    ) -> Self {
        Self {
            link: Link::Plain(stream),
            acceptor,
            confirm: TpktProgress::default(),
            request: TpktProgress::default(),
            raw: BytesMut::new(),
            ready: BytesMut::new(),
            mcs_started: false,
            eof: false,
            input,
            stats,
            login,
            refusal: None,
            tap,
            inject: BytesMut::new(),
            out_frames: OutFrames::default(),
            last_drop_warning: None,
        }
    }

    pub fn login(&self) -> &Login {
        &self.login
    }

    /// Moves to TLS once the Connection Confirm has been written, and drives the handshake.
    fn poll_upgrade(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let confirm_sent = self.confirm.complete();
            match &mut self.link {
                Link::Plain(_) if confirm_sent => {
                    let Link::Plain(s) = std::mem::replace(&mut self.link, Link::Closed) else {
                        return Poll::Ready(Err(invalid("bad transport state")));
                    };
                    self.link = Link::Accepting(Box::new(self.acceptor.accept(s)));
                }
                Link::Accepting(accept) => {
                    // A finished handshake must never be polled again (tokio-rustls panics):
                    // leave `Accepting` whichever way it ended.
                    match ready!(Pin::new(&mut **accept).poll(cx)) {
                        Ok(tls) => self.link = Link::Tls(Box::new(tls)),
                        Err(e) => {
                            debug!(error = %e, "TLS handshake failed");
                            self.link = Link::Closed;
                            return Poll::Ready(Err(e));
                        }
                    }
                }
                Link::Closed => return Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
                Link::Plain(_) | Link::Tls(_) => return Poll::Ready(Ok(())),
            }
        }
    }

    /// Writes `bytes` (advancing it) on the TLS link.
    fn poll_write_ours(&mut self, cx: &mut Context<'_>, ours: Ours) -> Poll<io::Result<()>> {
        let Link::Tls(tls) = &mut self.link else {
            return Poll::Ready(Ok(()));
        };
        let buf = match ours {
            Ours::Inject => &mut self.inject,
            Ours::Refusal => match self.refusal.as_mut() {
                Some(r) => r,
                None => return Poll::Ready(Ok(())),
            },
        };
        while !buf.is_empty() {
            let n = ready!(Pin::new(&mut **tls).poll_write(cx, buf))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            buf.advance(n);
            self.stats.add(|c| &c.bytes_out, n as u64);
        }
        Pin::new(&mut **tls).poll_flush(cx)
    }

    /// Frames what has been read: forwards slow-path and CredSSP PDUs, hands fast-path input to
    /// the session.
    fn frame(&mut self) -> io::Result<()> {
        while let Some(pdu) = next_pdu(&self.raw, self.mcs_started).map_err(invalid)? {
            if self.raw.len() < pdu.size() {
                break;
            }
            let bytes = self.raw.split_to(pdu.size());
            match pdu {
                Pdu::Tpkt(_) => {
                    if !self.mcs_started {
                        self.out_frames.active = true;
                    }
                    self.mcs_started = true;
                    if !self.login.tpkt(&bytes) {
                        return Err(io::Error::new(
                            io::ErrorKind::PermissionDenied,
                            "too many failed logins",
                        ));
                    }
                    if self.tap.inbound(&bytes) {
                        self.ready.extend_from_slice(&bytes);
                    }
                    if !self.tap.out.is_empty() {
                        self.inject.extend_from_slice(&self.tap.out);
                        self.tap.out.clear();
                    }
                }
                Pdu::Der(_) => match self.login.credssp_request(&bytes) {
                    Some(refusal) => {
                        self.refusal = Some(BytesMut::from(&refusal[..]));
                        return Ok(());
                    }
                    None => self.ready.extend_from_slice(&bytes),
                },
                Pdu::FastPathInput(_) => {
                    self.stats.add(|c| &c.input_events, 1);
                    if self
                        .input
                        .try_send(Inbound::FastPath(bytes.freeze()))
                        .is_err()
                    {
                        self.input_dropped();
                    }
                }
            }
        }
        if self.raw.len() > MAX_BUFFERED {
            return Err(invalid("PDU larger than the input buffer"));
        }
        Ok(())
    }

    /// Counts a dropped input PDU; warns at most once a second (a flood must not flood the log).
    fn input_dropped(&mut self) {
        self.stats.add(|c| &c.input_dropped, 1);
        let now = Instant::now();
        if self
            .last_drop_warning
            .is_none_or(|t| now.duration_since(t).as_secs() >= 1)
        {
            self.last_drop_warning = Some(now);
            warn!("RDP input queue full: events dropped");
        }
    }
}

#[derive(Clone, Copy)]
enum Ours {
    Inject,
    Refusal,
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RdpStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_upgrade(cx))?;
        if let Link::Plain(s) = &mut this.link {
            // Before TLS only the X.224 Connection Request passes, byte for byte, and nothing
            // after it: ironrdp asserts that no bytes are left over when it starts TLS, so a
            // client that pipelines more would otherwise panic it.
            let limit = this.request.remaining().min(buf.remaining());
            if limit == 0 {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 1024];
            let mut rb = ReadBuf::new(&mut chunk[..limit.min(1024)]);
            ready!(Pin::new(s).poll_read(cx, &mut rb))?;
            let got = rb.filled();
            this.request.advance(got);
            buf.put_slice(got);
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.refusal.is_some() {
                ready!(this.poll_write_ours(cx, Ours::Refusal))?;
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "too many failed logins",
                )));
            }
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            // Answers on our channel go out now if ironrdp is between PDUs; else with its next.
            if !this.inject.is_empty()
                && this.out_frames.at_boundary()
                && let Poll::Ready(Err(e)) = this.poll_write_ours(cx, Ours::Inject)
            {
                return Poll::Ready(Err(e));
            }
            let Link::Tls(tls) = &mut this.link else {
                return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
            };
            let mut chunk = [0u8; 16 * 1024];
            let mut rb = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut **tls).poll_read(cx, &mut rb))?;
            let got = rb.filled();
            if got.is_empty() {
                this.eof = true;
                if !this.raw.is_empty() {
                    debug!(bytes = this.raw.len(), "connection closed inside a PDU");
                }
                continue;
            }
            this.stats.add(|c| &c.bytes_in, got.len() as u64);
            this.raw.extend_from_slice(got);
            this.frame()?;
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RdpStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_upgrade(cx))?;
        match &mut this.link {
            Link::Plain(s) => {
                // The first thing ironrdp writes is the Connection Confirm (one TPKT): follow
                // its length so we know when to expect the TLS hello.
                let n = ready!(Pin::new(s).poll_write(cx, buf))?;
                this.confirm.advance(&buf[..n]);
                Poll::Ready(Ok(n))
            }
            Link::Tls(_) => {
                if !this.inject.is_empty() && this.out_frames.at_boundary() {
                    ready!(this.poll_write_ours(cx, Ours::Inject))?;
                }
                let Link::Tls(tls) = &mut this.link else {
                    return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
                };
                let n = ready!(Pin::new(&mut **tls).poll_write(cx, buf))?;
                let written = &buf[..n];
                if this.mcs_started {
                    this.out_frames.advance(written);
                } else {
                    this.login.server_wrote(written);
                }
                this.stats.add(|c| &c.bytes_out, n as u64);
                Poll::Ready(Ok(n))
            }
            Link::Accepting(_) | Link::Closed => {
                Poll::Ready(Err(io::ErrorKind::NotConnected.into()))
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match &mut this.link {
            Link::Plain(s) => Pin::new(s).poll_flush(cx),
            Link::Tls(tls) => Pin::new(&mut **tls).poll_flush(cx),
            Link::Accepting(_) | Link::Closed => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match &mut this.link {
            Link::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Link::Tls(tls) => Pin::new(&mut **tls).poll_shutdown(cx),
            Link::Accepting(_) | Link::Closed => Poll::Ready(Ok(())),
        }
    }
}
