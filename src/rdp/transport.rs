//! The byte stream ironrdp-server runs on: we do the TLS upgrade ourselves (right after the
//! X.224 Connection Confirm, as the protocol says) so that we see the plaintext, and we take the
//! fast-path input PDUs out of it before ironrdp does.
//!
//! Why: ironrdp-server 0.13 decodes fast-path input lossily (no middle button, no horizontal
//! wheel, X buttons turned into left/right, the E1 flag of Pause dropped). Decoding the same PDUs
//! with ironrdp-pdu here keeps every flag. Every inbound PDU is framed and bounded here first, so
//! a hostile length never reaches ironrdp.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use ironrdp::pdu::input::fast_path::FastPathInput;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::dvc_tap::DvcTap;
use super::input::Event;

/// Largest CredSSP message accepted (NTLM needs a few KiB; Kerberos tickets more).
const MAX_DER: usize = 256 * 1024;
/// Bytes buffered while waiting for the rest of a PDU (a TPKT is at most 64 KiB).
const MAX_BUFFERED: usize = MAX_DER + 16 * 1024;

/// One framed inbound PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pdu {
    /// Slow-path (X.224 over TPKT): passed to ironrdp.
    Tpkt(usize),
    /// A CredSSP TSRequest (DER SEQUENCE): passed to ironrdp.
    Der(usize),
    /// Fast-path input: decoded here.
    FastPathInput(usize),
}

impl Pdu {
    pub fn size(self) -> usize {
        match self {
            Pdu::Tpkt(n) | Pdu::Der(n) | Pdu::FastPathInput(n) => n,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("TPKT length {0} is shorter than its header")]
    ShortTpkt(usize),
    #[error("CredSSP message of {0} bytes is too large or badly encoded")]
    BadDer(usize),
    #[error("fast-path length {0} is shorter than its header")]
    ShortFastPath(usize),
    #[error("encrypted fast-path input inside TLS")]
    EncryptedFastPath,
    #[error("CredSSP message after the MCS connection started")]
    LateDer,
    #[error("unknown PDU header byte {0:#04x}")]
    Unknown(u8),
}

/// Frames the PDU at the start of `buf`: `Ok(None)` if more bytes are needed. `mcs_started` says
/// a TPKT has been seen, after which no CredSSP message may come (their first bytes overlap
/// with fast-path headers).
pub fn next_pdu(buf: &[u8], mcs_started: bool) -> Result<Option<Pdu>, FrameError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if first == 0x03 {
        if buf.len() < 4 {
            return Ok(None);
        }
        let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
        if len < 7 {
            return Err(FrameError::ShortTpkt(len));
        }
        return Ok(Some(Pdu::Tpkt(len)));
    }
    if first == 0x30 && !mcs_started {
        let Some(&l0) = buf.get(1) else {
            return Ok(None);
        };
        let (len, header) = if l0 < 0x80 {
            (usize::from(l0), 2)
        } else {
            let n = usize::from(l0 & 0x7f);
            if n == 0 || n > 3 {
                return Err(FrameError::BadDer(0));
            }
            if buf.len() < 2 + n {
                return Ok(None);
            }
            let len = buf[2..2 + n]
                .iter()
                .fold(0usize, |acc, b| acc << 8 | usize::from(*b));
            (len, 2 + n)
        };
        let total = len + header;
        if total > MAX_DER {
            return Err(FrameError::BadDer(total));
        }
        return Ok(Some(Pdu::Der(total)));
    }
    if first & 0x03 == 0 {
        if first >> 6 != 0 {
            return Err(FrameError::EncryptedFastPath);
        }
        let Some(&l0) = buf.get(1) else {
            return Ok(None);
        };
        let (len, header) = if l0 & 0x80 == 0 {
            (usize::from(l0), 2)
        } else {
            let Some(&l1) = buf.get(2) else {
                return Ok(None);
            };
            (usize::from(l0 & 0x7f) << 8 | usize::from(l1), 3)
        };
        // numEvents of 0 in the header means a separate count byte follows.
        let count_byte = usize::from((first >> 2) & 0x0f == 0);
        if len < header + count_byte + 1 {
            return Err(FrameError::ShortFastPath(len));
        }
        return Ok(Some(Pdu::FastPathInput(len)));
    }
    if first == 0x30 {
        return Err(FrameError::LateDer);
    }
    Err(FrameError::Unknown(first))
}

/// Where ironrdp's output stands, so that PDUs of ours are written between its PDUs, never
/// inside one. ironrdp writes TPKTs and fast-path output PDUs; their headers give the length.
#[derive(Debug, Default)]
struct OutFrames {
    /// Tracking since the client's first MCS PDU: everything before it (CredSSP, the early
    /// authorization result) has been written by then, and is framed differently.
    active: bool,
    /// Bytes left of the PDU being written.
    left: usize,
    /// Header bytes of the next PDU seen so far (its length not yet known).
    head: Vec<u8>,
    /// Output we could not frame: nothing is injected any more.
    lost: bool,
}

/// Length of the PDU whose first bytes are `head`: `Ok(None)` if more are needed.
fn out_pdu_len(head: &[u8]) -> Result<Option<usize>, ()> {
    let Some(&b0) = head.first() else {
        return Ok(None);
    };
    if b0 == 0x03 {
        if head.len() < 4 {
            return Ok(None);
        }
        let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
        return if len >= 4 { Ok(Some(len)) } else { Err(()) };
    }
    if b0 & 0x03 == 0 {
        let Some(&b1) = head.get(1) else {
            return Ok(None);
        };
        let len = if b1 & 0x80 == 0 {
            usize::from(b1)
        } else {
            let Some(&b2) = head.get(2) else {
                return Ok(None);
            };
            usize::from(b1 & 0x7f) << 8 | usize::from(b2)
        };
        return if len >= 2 { Ok(Some(len)) } else { Err(()) };
    }
    Err(())
}

impl OutFrames {
    fn at_boundary(&self) -> bool {
        self.active && !self.lost && self.left == 0 && self.head.is_empty()
    }

    /// Accounts for `bytes` written by ironrdp.
    fn advance(&mut self, mut bytes: &[u8]) {
        if !self.active {
            return;
        }
        while !bytes.is_empty() && !self.lost {
            if self.left > 0 {
                let n = self.left.min(bytes.len());
                self.left -= n;
                bytes = &bytes[n..];
                continue;
            }
            let before = self.head.len();
            let n = bytes.len().min(4 - before);
            self.head.extend_from_slice(&bytes[..n]);
            match out_pdu_len(&self.head) {
                Ok(None) => {
                    if self.head.len() >= 4 {
                        self.lost = true;
                    }
                    bytes = &bytes[n..];
                }
                Ok(Some(len)) => {
                    // The header bytes taken from `bytes` beyond `before` count towards `len`.
                    let Some(left) = len.checked_sub(before) else {
                        self.lost = true;
                        continue;
                    };
                    self.left = left;
                    self.head.clear();
                }
                Err(()) => {
                    warn!("RDP output not framed: no more microphone messages on this connection");
                    self.lost = true;
                }
            }
        }
    }
}

/// Bytes in and out of one connection (after TLS), for logs and benchmarks.
#[derive(Debug, Default)]
pub struct Traffic {
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub input_events: AtomicU64,
    /// Server-wide counters to add `bytes_out` to as well.
    pub total: Option<Arc<super::RdpStats>>,
}

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
    /// Bytes of the Connection Confirm written so far, and its length once known.
    confirm: (usize, Option<usize>),
    confirm_header: [u8; 4],
    /// The same for the client's Connection Request, read before TLS.
    request: (usize, Option<usize>),
    request_header: [u8; 4],
    raw: BytesMut,
    ready: BytesMut,
    mcs_started: bool,
    eof: bool,
    events: mpsc::Sender<Event>,
    traffic: Arc<Traffic>,
    /// Our own dynamic channel (the microphone) and its PDUs waiting for a gap in ironrdp's.
    tap: DvcTap,
    inject: BytesMut,
    out_frames: OutFrames,
}

impl<S> RdpStream<S> {
    pub fn new(
        stream: S,
        acceptor: TlsAcceptor,
        events: mpsc::Sender<Event>,
        traffic: Arc<Traffic>,
        tap: DvcTap,
    ) -> Self {
        Self {
            link: Link::Plain(stream),
            acceptor,
            confirm: (0, None),
            confirm_header: [0; 4],
            request: (0, None),
            request_header: [0; 4],
            raw: BytesMut::new(),
            ready: BytesMut::new(),
            mcs_started: false,
            eof: false,
            events,
            traffic,
            tap,
            inject: BytesMut::new(),
            out_frames: OutFrames::default(),
        }
    }
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl<S: AsyncRead + AsyncWrite + Unpin> RdpStream<S> {
    /// The Connection Confirm is out: the next thing on the wire is the client's TLS hello.
    fn confirm_sent(&self) -> bool {
        matches!(self.confirm, (n, Some(len)) if n >= len)
    }

    /// Moves to TLS once the Connection Confirm has been written, and drives the handshake.
    fn poll_upgrade(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let confirm_sent = self.confirm_sent();
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

    /// Writes our queued PDUs; only called between ironrdp's.
    fn poll_inject(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Link::Tls(tls) = &mut self.link else {
            return Poll::Ready(Ok(()));
        };
        while !self.inject.is_empty() {
            let n = ready!(Pin::new(&mut **tls).poll_write(cx, &self.inject))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.inject.advance(n);
            self.traffic
                .bytes_out
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        Pin::new(&mut **tls).poll_flush(cx)
    }

    /// Frames what has been read: forwards slow-path and CredSSP PDUs, consumes fast-path input.
    fn split(&mut self) -> io::Result<()> {
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
                    if self.tap.inbound(&bytes) {
                        self.ready.extend_from_slice(&bytes);
                    }
                    if !self.tap.out.is_empty() {
                        self.inject.extend_from_slice(&self.tap.out);
                        self.tap.out.clear();
                    }
                }
                Pdu::Der(_) => self.ready.extend_from_slice(&bytes),
                Pdu::FastPathInput(_) => {
                    let input: FastPathInput = ironrdp::core::decode(&bytes)
                        .map_err(|e| invalid(format!("fast-path input: {e}")))?;
                    for event in input.input_events() {
                        self.traffic.input_events.fetch_add(1, Ordering::Relaxed);
                        if self.events.try_send(*event).is_err() {
                            warn!("RDP input queue full: event dropped");
                        }
                    }
                }
            }
        }
        if self.raw.len() > MAX_BUFFERED {
            return Err(invalid("PDU larger than the input buffer"));
        }
        Ok(())
    }
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
            let (done, len) = &mut this.request;
            let limit = match *len {
                None => 4 - *done,
                Some(len) => len.saturating_sub(*done),
            };
            if limit == 0 {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 1024];
            let mut rb = ReadBuf::new(&mut chunk[..limit.min(1024)]);
            ready!(Pin::new(s).poll_read(cx, &mut rb))?;
            let got = rb.filled();
            for (i, b) in got.iter().enumerate() {
                if *done + i < 4 {
                    this.request_header[*done + i] = *b;
                }
            }
            *done += got.len();
            if len.is_none() && *done >= 4 {
                let h = this.request_header;
                *len = Some(usize::from(u16::from_be_bytes([h[2], h[3]])).max(4));
            }
            let n = got.len().min(buf.remaining());
            buf.put_slice(&got[..n]);
            return Poll::Ready(Ok(()));
        }
        loop {
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
                && let Poll::Ready(Err(e)) = this.poll_inject(cx)
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
            this.traffic
                .bytes_in
                .fetch_add(got.len() as u64, Ordering::Relaxed);
            this.raw.extend_from_slice(got);
            this.split()?;
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
                // The first thing ironrdp writes is the Connection Confirm (one TPKT): note its
                // length from the header so we know when to expect the TLS hello.
                let n = ready!(Pin::new(s).poll_write(cx, buf))?;
                let (done, len) = &mut this.confirm;
                for (i, b) in buf[..n].iter().enumerate() {
                    if *done + i < 4 {
                        this.confirm_header[*done + i] = *b;
                    }
                }
                *done += n;
                if len.is_none() && *done >= 4 {
                    let h = this.confirm_header;
                    *len = Some(usize::from(u16::from_be_bytes([h[2], h[3]])).max(4));
                }
                Poll::Ready(Ok(n))
            }
            Link::Tls(_) => {
                if !this.inject.is_empty() && this.out_frames.at_boundary() {
                    ready!(this.poll_inject(cx))?;
                }
                let Link::Tls(tls) = &mut this.link else {
                    return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
                };
                let n = ready!(Pin::new(&mut **tls).poll_write(cx, buf))?;
                this.out_frames.advance(&buf[..n]);
                this.traffic
                    .bytes_out
                    .fetch_add(n as u64, Ordering::Relaxed);
                if let Some(total) = &this.traffic.total {
                    total.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_framing_finds_every_boundary_whatever_the_write_sizes() {
        // A TPKT of 7, a fast-path PDU of 5 (1-byte length), one of 300 (2-byte length).
        let mut stream = vec![3, 0, 0, 7, 1, 2, 3];
        stream.extend_from_slice(&[0, 5, 9, 9, 9]);
        stream.extend_from_slice(&[0, 0x81, 0x2c]);
        stream.extend(std::iter::repeat_n(7, 297));
        let boundaries = [7, 12, stream.len()];
        for split in 1..=stream.len() {
            let mut f = OutFrames {
                active: true,
                ..OutFrames::default()
            };
            let mut at = Vec::new();
            for (i, chunk) in stream.chunks(split).enumerate() {
                f.advance(chunk);
                if f.at_boundary() {
                    at.push((i * split + chunk.len()).min(stream.len()));
                }
            }
            assert!(!f.lost);
            assert!(f.at_boundary());
            for a in &at {
                assert!(
                    boundaries.contains(a),
                    "split {split}: boundary claimed at {a}"
                );
            }
        }
        let mut bad = OutFrames {
            active: true,
            ..OutFrames::default()
        };
        bad.advance(&[0xff, 1, 2]);
        assert!(bad.lost && !bad.at_boundary());
    }

    #[test]
    fn frames_each_kind() {
        assert_eq!(next_pdu(&[], false), Ok(None));
        assert_eq!(next_pdu(&[3, 0, 0], false), Ok(None));
        assert_eq!(next_pdu(&[3, 0, 0, 19], true), Ok(Some(Pdu::Tpkt(19))));
        assert_eq!(next_pdu(&[3, 0, 0, 2], true), Err(FrameError::ShortTpkt(2)));
        assert_eq!(next_pdu(&[0x30, 0x05], false), Ok(Some(Pdu::Der(7))));
        assert_eq!(
            next_pdu(&[0x30, 0x82, 0x01, 0x00], false),
            Ok(Some(Pdu::Der(0x104)))
        );
        assert_eq!(next_pdu(&[0x30, 0x82, 0x01], false), Ok(None));
        assert!(matches!(
            next_pdu(&[0x30, 0x84, 1, 2, 3, 4], false),
            Err(FrameError::BadDer(_))
        ));
        assert!(matches!(
            next_pdu(&[0x30, 0x83, 0x10, 0, 0], false),
            Err(FrameError::BadDer(_))
        ));
        // One event (numEvents 1 in bits 2..6), length 9.
        assert_eq!(
            next_pdu(&[0x04, 9, 0x20, 0, 0, 0, 0, 0, 0], true),
            Ok(Some(Pdu::FastPathInput(9)))
        );
        // Two-byte length.
        assert_eq!(
            next_pdu(&[0x04, 0x81, 0x00], true),
            Ok(Some(Pdu::FastPathInput(256)))
        );
        assert_eq!(
            next_pdu(&[0x04, 2], true),
            Err(FrameError::ShortFastPath(2))
        );
        // numEvents 0 needs the count byte.
        assert_eq!(
            next_pdu(&[0x00, 3], true),
            Err(FrameError::ShortFastPath(3))
        );
        assert_eq!(
            next_pdu(&[0x84, 9], true),
            Err(FrameError::EncryptedFastPath)
        );
        assert_eq!(next_pdu(&[0x30, 9], true), Ok(Some(Pdu::FastPathInput(9))));
        assert_eq!(next_pdu(&[0x31, 9], true), Err(FrameError::Unknown(0x31)));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut seed = 0x1234_5678_u32;
        for _ in 0..20_000 {
            let mut buf = [0u8; 8];
            for b in &mut buf {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                *b = seed as u8;
            }
            for mcs in [false, true] {
                if let Ok(Some(p)) = next_pdu(&buf, mcs) {
                    assert!(p.size() >= 2 && p.size() <= MAX_DER);
                }
            }
        }
    }

    #[test]
    fn decodes_fast_path_input_with_every_flag() {
        use ironrdp::pdu::input::fast_path::{FastPathInputEvent, KeyboardFlags};
        // Two events: E1-flagged Ctrl (Pause prefix), then a middle-button press at 7,9.
        let pdu = [
            0x08, 11, // header: 2 events, length 11
            0x04, 0x1d, // scancode event, flags EXTENDED1
            0x20, 0x00, 0xc0, 7, 0, 9, 0, // mouse event, flags DOWN|MIDDLE
        ];
        assert_eq!(next_pdu(&pdu, true), Ok(Some(Pdu::FastPathInput(11))));
        let input: FastPathInput = ironrdp::core::decode(&pdu).expect("decodes");
        let events = input.input_events();
        assert_eq!(
            events[0],
            FastPathInputEvent::KeyboardEvent(KeyboardFlags::EXTENDED1, 0x1d)
        );
        let FastPathInputEvent::MouseEvent(m) = events[1] else {
            panic!("not a mouse event: {:?}", events[1]);
        };
        assert_eq!((m.flags.bits(), m.x_position, m.y_position), (0xc000, 7, 9));
    }
}
