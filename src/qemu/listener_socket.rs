//! The socket of the display listener, read and written by us instead of by zbus: inline frames
//! are read into a reused buffer (see [`super::parked`]), and a whole-surface inline frame can
//! wait *in QEMU* while every viewer is still busy with the last one.
//!
//! Why wait: std VGA's 32 bpp surfaces have no memfd, so QEMU sends each full-screen frame inline
//! as an 8 MB `Scanout` call, ~30 a second. Taking all of them in is most of what a 1080p
//! animation costs us, and under a 200m CPU limit it leaves the encoders nothing.
//! QEMU drops any queued older Scanout/Update when it queues a new Scanout, so not reading one
//! just lets QEMU replace it with a newer one: the frames we take in follow what the viewers can
//! use, and at most one frame is in our memory ahead of them. Only `Scanout` waits — an `Update`
//! or `UpdateMap` is never superseded and would pile up in QEMU — and never longer than
//! [`MAX_WAIT`], so cursor and other calls behind it still flow.
//!
//! zbus 6 keeps its own socket code private, so this is a small `ReadHalf`/`WriteHalf` over
//! tokio's `UnixStream` with `SCM_RIGHTS` (ScanoutMap passes a memfd), through rustix's safe
//! `recvmsg`/`sendmsg`.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use tokio::io::Interest;
use tokio::net::UnixStream;
use zbus::connection::socket::{BoxedSplit, ReadHalf, Split, WriteHalf};
use zbus::message::{Flags, Message};

use super::parked::{Kind, PARKED_INTERFACE, ParkedFrames, SPARE_IDLE};
use super::proxies::LISTENER_PATH;
use crate::cgroup::Limits;
use crate::framebuffer::Framebuffer;

/// Longest a Scanout waits for a viewer to take the previous frame: the floor of the frame rate
/// we take in (5/s) however slow the viewers are, and of how stale a new viewer's first frame is.
pub const MAX_WAIT: Duration = Duration::from_millis(200);
/// The D-Bus primary header: zbus reads exactly this much at the start of every message.
const PRIMARY_HEADER: usize = 16;
/// What is peeked to find the member name (header fields of a Scanout call are ~150 bytes).
const PEEK: usize = 512;
/// File descriptors accepted per read (QEMU sends one with a ScanoutMap).
const MAX_FDS: usize = 4;
/// Under a memory limit, a Scanout is taken in only with its size plus this much to spare…
const MEMORY_SLACK: u64 = 8 << 20;
/// …waiting for viewers to finish (and free) what they hold at most this long.
const MAX_MEMORY_WAIT: Duration = Duration::from_secs(1);
/// The D-Bus specification's largest message; anything claiming more is left to zbus to refuse.
const MAX_MESSAGE: usize = 128 << 20;
/// The header flag of a call whose caller waits for no reply.
const NO_REPLY_EXPECTED: u8 = 0x1;

/// The cgroup this process runs in (read once: limits do not change under a running pod).
pub(crate) fn limits() -> &'static Limits {
    static LIMITS: OnceLock<Limits> = OnceLock::new();
    LIMITS.get_or_init(Limits::detect)
}

/// Whether taking in `need` more bytes would come within [`MEMORY_SLACK`] of the memory limit.
fn memory_tight(limits: &Limits, need: u64) -> bool {
    match (limits.memory, limits.memory_usage()) {
        (Some(limit), Some(used)) => used.saturating_add(need).saturating_add(MEMORY_SLACK) > limit,
        _ => false,
    }
}

/// What the reader does with one console's inline frames.
#[derive(Debug, Clone)]
pub struct Frames {
    pub fb: Framebuffer,
    /// Where inline frames are read to instead of a message of their own.
    pub parked: ParkedFrames,
    /// Whether a Scanout waits in QEMU until a viewer took the previous frame.
    pub hold: bool,
}

/// The read and write halves over `stream`; with `frames`, inline frames are parked (and
/// Scanouts held, if asked).
pub fn split(
    stream: std::os::unix::net::UnixStream,
    frames: Option<Frames>,
) -> io::Result<BoxedSplit> {
    stream.set_nonblocking(true)?;
    let stream = Arc::new(UnixStream::from_std(stream)?);
    let read: Box<dyn ReadHalf> = Box::new(Reader {
        stream: Arc::clone(&stream),
        frames,
        passed: None,
        pending: Vec::new(),
        pending_at: 0,
    });
    let write: Box<dyn WriteHalf> = Box::new(Writer { stream });
    Ok(Split::new(read, write))
}

#[derive(Debug)]
struct Reader {
    stream: Arc<UnixStream>,
    frames: Option<Frames>,
    /// The damage sequence number when the last Scanout was let through.
    passed: Option<u64>,
    /// A `Take` call handed to zbus in place of a parked frame, and how much of it it has read.
    pending: Vec<u8>,
    pending_at: usize,
}

#[derive(Debug)]
struct Writer {
    stream: Arc<UnixStream>,
}

impl Reader {
    /// Peeks at the next message's start without consuming it; lets the parked buffer go while
    /// nothing comes.
    async fn peek(&self, head: &mut [u8]) -> io::Result<usize> {
        loop {
            // The buffer may still be with the handler now: look again after each idle second.
            match &self.frames {
                Some(frames) => {
                    match tokio::time::timeout(SPARE_IDLE, self.stream.readable()).await {
                        Ok(ready) => ready?,
                        Err(_) => {
                            frames.parked.drop_spare();
                            continue;
                        }
                    }
                }
                None => self.stream.readable().await?,
            }
            let peeked = self.stream.try_io(Interest::READABLE, || {
                rustix::net::recv(&*self.stream, &mut *head, RecvFlags::PEEK)
                    .map(|(n, _)| n)
                    .map_err(io::Error::from)
            });
            match peeked {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Copies what is left of the pending `Take` call into `buf`.
    fn serve_pending(&mut self, buf: &mut [u8]) -> Option<usize> {
        let rest = self
            .pending
            .get(self.pending_at..)
            .filter(|r| !r.is_empty())?;
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.pending_at += n;
        Some(n)
    }

    /// A Scanout of the current size waits until the frame let through before it has been
    /// handled and taken by a viewer (a mode switch goes through at once); under a memory
    /// limit, any Scanout waits while taking it in would come too near the limit.
    async fn hold_scanout(&mut self, frames: &Frames, size: (u32, u32), len: usize) {
        let fb = &frames.fb;
        let current = size == fb.size();
        if frames.hold && current {
            let after = self
                .passed
                .unwrap_or_else(|| fb.damage_seq().saturating_sub(1));
            fb.taken_after(after, MAX_WAIT).await;
        }
        // An 8 MB message on top of what the viewers hold can be what crosses the memory
        // limit (an OOM kill ends every session): let them finish first. The reused buffer is
        // counted already.
        let need = len.saturating_sub(frames.parked.spare_len()) as u64;
        let until = tokio::time::Instant::now() + MAX_MEMORY_WAIT;
        while memory_tight(limits(), need) && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if current && fb.size() != size {
            // The console changed size (a Width/Height change on the bus) while this frame
            // waited: it is older than that change and must not undo it.
            fb.expect_stale_scanout();
        }
        self.passed = Some(fb.damage_seq());
    }

    /// Reads the whole inline-frame message `call` describes into the parked queue and makes
    /// its `Take` call pending.
    async fn park(&mut self, frames: &Frames, kind: Kind, call: &Call<'_>) -> io::Result<()> {
        let (fb, parked) = (&frames.fb, &frames.parked);
        parked.wait_room().await;
        let (w, h) = fb.size();
        let mut bytes = parked.buffer(call.total_len, w as usize * h as usize * 4);
        self.read_exact(&mut bytes[..call.total_len]).await?;
        let token = parked.park(kind, call.big_endian, call.body_at, call.total_len, bytes);
        let take = Message::method_call(LISTENER_PATH, "Take")
            .interface(PARKED_INTERFACE)
            .with_flags(Flags::NO_REPLY_EXPECTED)
            .build(&token)
            .map_err(io::Error::other)?;
        self.pending = take.data().to_vec();
        self.pending_at = 0;
        Ok(())
    }

    /// Fills `buf` from the socket (a message announced to carry no file descriptors).
    async fn read_exact(&self, buf: &mut [u8]) -> io::Result<()> {
        let mut at = 0;
        while at < buf.len() {
            self.stream.readable().await?;
            let got = self.stream.try_io(Interest::READABLE, || {
                rustix::net::recv(&*self.stream, &mut buf[at..], RecvFlags::empty())
                    .map(|(n, _)| n)
                    .map_err(io::Error::from)
            });
            match got {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "QEMU closed the listener socket inside a frame",
                    ));
                }
                Ok(n) => at += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// One read of the socket with the file descriptors that came along.
    async fn receive(&self, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
        loop {
            self.stream.readable().await?;
            let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let got = self.stream.try_io(Interest::READABLE, || {
                let mut iov = [IoSliceMut::new(&mut *buf)];
                rustix::net::recvmsg(
                    &*self.stream,
                    &mut iov,
                    &mut control,
                    RecvFlags::CMSG_CLOEXEC,
                )
                .map_err(io::Error::from)
            });
            match got {
                Ok(msg) => {
                    let fds: Vec<OwnedFd> = control
                        .drain()
                        .filter_map(|m| match m {
                            RecvAncillaryMessage::ScmRights(fds) => Some(fds),
                            _ => None,
                        })
                        .flatten()
                        .collect();
                    if msg.flags.contains(ReturnFlags::CTRUNC) {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "QEMU passed more file descriptors than a listener takes",
                        ));
                    }
                    return Ok((msg.bytes, fds));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

#[async_trait::async_trait]
impl ReadHalf for Reader {
    async fn recvmsg(&mut self, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
        if let Some(n) = self.serve_pending(buf) {
            return Ok((n, Vec::new()));
        }
        // zbus asks for exactly the primary header at a message boundary (the handshake reads
        // 1024-byte lines, bodies their remaining length); a mistaken guess only peeks.
        if buf.len() == PRIMARY_HEADER
            && let Some(frames) = self.frames.clone()
        {
            let mut head = [0u8; PEEK];
            let n = self.peek(&mut head).await?;
            if let Some(call) = Call::parse(&head[..n]) {
                if let Some(size) = call.scanout_size() {
                    self.hold_scanout(&frames, size, call.total_len).await;
                }
                if let Some(kind) = call.inline_frame() {
                    self.park(&frames, kind, &call).await?;
                    if let Some(n) = self.serve_pending(buf) {
                        return Ok((n, Vec::new()));
                    }
                }
            }
        }
        self.receive(buf).await
    }

    fn can_pass_unix_fd(&self) -> bool {
        true
    }
}

#[async_trait::async_trait]
impl WriteHalf for Writer {
    async fn sendmsg(&mut self, buffer: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
        loop {
            self.stream.writable().await?;
            // On the stack: this runs for every reply, once per frame.
            if fds.len() > MAX_FDS {
                return Err(io::Error::other(
                    "too many file descriptors for one message",
                ));
            }
            let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
                return Err(io::Error::other(
                    "file descriptors do not fit the control buffer",
                ));
            }
            let sent = self.stream.try_io(Interest::WRITABLE, || {
                rustix::net::sendmsg(
                    &*self.stream,
                    &[IoSlice::new(buffer)],
                    &mut control,
                    SendFlags::NOSIGNAL,
                )
                .map_err(io::Error::from)
            });
            match sent {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }

    async fn close(&mut self) -> io::Result<()> {
        let fd = rustix::fd::AsFd::as_fd(&*self.stream);
        match rustix::net::shutdown(fd, rustix::net::Shutdown::Both) {
            Ok(()) | Err(rustix::io::Errno::NOTCONN) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn can_pass_unix_fd(&self) -> bool {
        true
    }
}

/// What the reader needs of a method call's header: a pure reader of the header fields (D-Bus
/// spec, "Message Format"); anything it does not understand is `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call<'a> {
    pub member: &'a [u8],
    pub interface: Option<&'a [u8]>,
    pub path: Option<&'a [u8]>,
    pub signature: &'a [u8],
    pub unix_fds: u32,
    pub no_reply: bool,
    pub big_endian: bool,
    /// Where the body starts, and the whole message's length.
    pub body_at: usize,
    pub total_len: usize,
    /// The first bytes of the body, as far as `head` holds them.
    body: &'a [u8],
}

impl<'a> Call<'a> {
    pub fn parse(head: &'a [u8]) -> Option<Self> {
        if head.len() < PRIMARY_HEADER || head[1] != 1 || head[3] != 1 {
            return None; // not a method call of protocol version 1
        }
        let big_endian = match head[0] {
            b'l' => false,
            b'B' => true,
            _ => return None,
        };
        let u32_at = |at: usize| u32_at(head, at);
        let body_len = usize::try_from(u32_at(4)?).ok()?;
        let fields_end = PRIMARY_HEADER.checked_add(usize::try_from(u32_at(12)?).ok()?)?;
        if fields_end > head.len() {
            return None;
        }
        let body_at = fields_end.next_multiple_of(8);
        let mut call = Call {
            member: &[],
            interface: None,
            path: None,
            signature: &[],
            unix_fds: 0,
            no_reply: head[2] & NO_REPLY_EXPECTED != 0,
            big_endian,
            body_at,
            total_len: body_at.checked_add(body_len)?,
            body: head.get(body_at..).unwrap_or_default(),
        };
        let mut member = None;
        let mut at = PRIMARY_HEADER;
        while at < fields_end {
            let code = *head.get(at)?;
            let sig_len = usize::from(*head.get(at + 1)?);
            let sig = head.get(at + 2..at + 2 + sig_len)?;
            let mut v = at + 2 + sig_len + 1; // past the signature's nul
            match sig {
                b"s" | b"o" => {
                    v = v.next_multiple_of(4);
                    let len = usize::try_from(u32_at(v)?).ok()?;
                    let s = head.get(v + 4..v + 4 + len)?;
                    match code {
                        1 => call.path = Some(s),
                        2 => call.interface = Some(s),
                        3 => member = Some(s),
                        _ => {}
                    }
                    v += 4 + len + 1;
                }
                b"g" => {
                    let len = usize::from(*head.get(v)?);
                    if code == 8 {
                        call.signature = head.get(v + 1..v + 1 + len)?;
                    }
                    v += 1 + len + 1;
                }
                b"u" => {
                    v = v.next_multiple_of(4);
                    if code == 9 {
                        call.unix_fds = u32_at(v)?;
                    }
                    v += 4;
                }
                _ => return None,
            }
            at = v.next_multiple_of(8);
        }
        call.member = member?;
        Some(call)
    }

    /// Width and height of a `Scanout` call (its body starts `uuuuay`).
    pub fn scanout_size(&self) -> Option<(u32, u32)> {
        if self.member != b"Scanout" {
            return None;
        }
        let word = |i: usize| -> Option<u32> {
            let b: [u8; 4] = self.body.get(i..i + 4)?.try_into().ok()?;
            Some(if self.big_endian {
                u32::from_be_bytes(b)
            } else {
                u32::from_le_bytes(b)
            })
        };
        Some((word(0)?, word(4)?))
    }

    /// The inline frame call this is, if the reader may park it: a listener call with the
    /// expected signature, no file descriptors, no reply owed, of a length D-Bus allows.
    pub fn inline_frame(&self) -> Option<Kind> {
        let kind = Kind::from_member(self.member)?;
        let ours = self.path.is_none_or(|p| p == LISTENER_PATH.as_bytes())
            && self
                .interface
                .is_none_or(|i| i == b"org.qemu.Display1.Listener");
        (ours
            && self.no_reply
            && self.unix_fds == 0
            && self.signature == kind.signature()
            && self.total_len <= MAX_MESSAGE)
            .then_some(kind)
    }
}

/// Width and height of a `Scanout` call whose start is `head`.
pub fn scanout_size(head: &[u8]) -> Option<(u32, u32)> {
    Call::parse(head)?.scanout_size()
}

fn u32_at(head: &[u8], at: usize) -> Option<u32> {
    let b: [u8; 4] = head.get(at..at + 4)?.try_into().ok()?;
    match head.first()? {
        b'l' => Some(u32::from_le_bytes(b)),
        b'B' => Some(u32::from_be_bytes(b)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::parked::MAX_IN_FLIGHT;
    use super::*;
    use crate::framebuffer::PathCounters;

    fn is_scanout_call(head: &[u8]) -> bool {
        scanout_size(head).is_some()
    }

    fn call(member: &str, body_len: usize) -> Vec<u8> {
        let msg = zbus::message::Message::method_call("/org/qemu/Display1/Listener", member)
            .interface("org.qemu.Display1.Listener")
            .destination(":1.42")
            .build(&(
                1920u32,
                1080u32,
                7680u32,
                0x20020888u32,
                serde_bytes::Bytes::new(&vec![7u8; body_len]),
            ))
            .unwrap();
        msg.data().to_vec()
    }

    #[test]
    fn finds_scanout_calls_and_nothing_else() {
        assert_eq!(scanout_size(&call("Scanout", 64)), Some((1920, 1080)));
        assert!(is_scanout_call(&call("Scanout", 64)[..PEEK.min(200)]));
        for other in [
            "Update",
            "ScanoutMap",
            "UpdateMap",
            "CursorDefine",
            "Scanou",
        ] {
            assert!(!is_scanout_call(&call(other, 64)), "{other}");
        }
        // Short, garbled or truncated headers are "no", never a panic.
        let whole = call("Scanout", 64);
        for n in 0..whole.len().min(PEEK) {
            let _ = is_scanout_call(&whole[..n]);
        }
        assert!(!is_scanout_call(&whole[..20]));
        let mut bad = whole.clone();
        bad[0] = b'x';
        assert!(!is_scanout_call(&bad));
        let mut huge = whole.clone();
        huge[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(!is_scanout_call(&huge));
        for seed in 0..2000u32 {
            let noise: Vec<u8> = (0..64u32)
                .map(|i| (seed.wrapping_mul(2654435761).wrapping_add(i * 40503) >> 13) as u8)
                .collect();
            let _ = is_scanout_call(&noise);
        }
    }

    #[test]
    fn a_reply_is_not_a_call() {
        let call = zbus::message::Message::method_call("/a", "Scanout")
            .build(&())
            .unwrap();
        let reply = zbus::message::Message::method_return(&call.header())
            .build(&())
            .unwrap();
        assert!(!is_scanout_call(reply.data()));
    }

    fn inline_call(
        member: &str,
        flags: Option<Flags>,
        body: &(impl serde::Serialize + zbus::zvariant::DynamicType),
    ) -> Message {
        let b = Message::method_call(LISTENER_PATH, member).interface("org.qemu.Display1.Listener");
        let b = match flags {
            Some(f) => b.with_flags(f),
            None => b,
        };
        b.build(body).unwrap()
    }

    #[test]
    fn only_reply_less_listener_frame_calls_are_parked() {
        let data = serde_bytes::Bytes::new(&[0u8; 16]);
        let no_reply = Some(Flags::NO_REPLY_EXPECTED);
        let scanout = inline_call(
            "Scanout",
            no_reply,
            &(2u32, 2u32, 8u32, 0x20020888u32, data),
        );
        let call = Call::parse(scanout.data()).unwrap();
        assert_eq!(call.inline_frame(), Some(Kind::Scanout));
        assert_eq!(call.total_len, scanout.data().len());
        assert_eq!(call.scanout_size(), Some((2, 2)));
        let update = inline_call(
            "Update",
            no_reply,
            &(0i32, 0i32, 2i32, 2i32, 8u32, 0x20020888u32, data),
        );
        assert_eq!(
            Call::parse(update.data()).unwrap().inline_frame(),
            Some(Kind::Update)
        );
        // A caller waiting for the reply is answered by zbus.
        let waits = inline_call("Scanout", None, &(2u32, 2u32, 8u32, 0x20020888u32, data));
        assert_eq!(Call::parse(waits.data()).unwrap().inline_frame(), None);
        // A wrong signature, another member, another interface: not ours to read.
        let odd = inline_call("Scanout", no_reply, &(2u32, 2u32, data));
        assert_eq!(Call::parse(odd.data()).unwrap().inline_frame(), None);
        let cursor = inline_call("CursorDefine", no_reply, &(1i32, 1i32, 0i32, 0i32, data));
        assert_eq!(Call::parse(cursor.data()).unwrap().inline_frame(), None);
        let other = Message::method_call(LISTENER_PATH, "Scanout")
            .interface("org.example.Other")
            .with_flags(Flags::NO_REPLY_EXPECTED)
            .build(&(2u32, 2u32, 8u32, 0x20020888u32, data))
            .unwrap();
        assert_eq!(Call::parse(other.data()).unwrap().inline_frame(), None);
        // A body length past what D-Bus allows is left to zbus to refuse.
        let mut huge = scanout.data().to_vec();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Call::parse(&huge).unwrap().inline_frame(), None);
    }

    /// QEMU's end of a listener socket (the p2p auth server) and ours serving `fb`.
    async fn listener_pair(fb: &Framebuffer) -> (zbus::Connection, zbus::Connection, ParkedFrames) {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let parked = ParkedFrames::default();
        let (l, m, t) =
            super::super::listener::listener_objects(0, fb.clone(), false, parked.clone());
        let frames = Frames {
            fb: fb.clone(),
            parked: parked.clone(),
            hold: false,
        };
        let socket = split(ours, Some(frames)).unwrap();
        let qemu = zbus::connection::Builder::unix_stream(theirs)
            .server(zbus::Guid::generate())
            .p2p()
            .build();
        let us = zbus::connection::Builder::socket(socket)
            .p2p()
            .serve_at(LISTENER_PATH, l)
            .serve_at(LISTENER_PATH, m)
            .serve_at(LISTENER_PATH, t)
            .build();
        let (qemu, us) = tokio::join!(qemu, us);
        (qemu.unwrap(), us.unwrap(), parked)
    }

    fn solid(w: usize, h: usize, bgrx: [u8; 4]) -> Vec<u8> {
        bgrx.repeat(w * h)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn parked_frames_are_applied_in_order_with_calls_zbus_answers() {
        let fb = Framebuffer::new();
        let (qemu, _us, parked) = listener_pair(&fb).await;
        const X8R8G8B8: u32 = 0x20020888;
        let no_reply = Some(Flags::NO_REPLY_EXPECTED);
        let red = solid(64, 32, [0, 0, 0xff, 0]);
        let blue = solid(4, 4, [0xff, 0, 0, 0]);
        let green = solid(2, 2, [0, 0xff, 0, 0]);
        let scanout = (
            64u32,
            32u32,
            256u32,
            X8R8G8B8,
            serde_bytes::Bytes::new(&red),
        );
        qemu.send(&inline_call("Scanout", no_reply, &scanout))
            .await
            .unwrap();
        let update = (
            8i32,
            8i32,
            4i32,
            4i32,
            16u32,
            X8R8G8B8,
            serde_bytes::Bytes::new(&blue),
        );
        qemu.send(&inline_call("Update", no_reply, &update))
            .await
            .unwrap();
        // A body shorter than its rect: refused with a log line, the socket goes on.
        let short = (
            0i32,
            0i32,
            4i32,
            4i32,
            16u32,
            X8R8G8B8,
            serde_bytes::Bytes::new(&blue[..20]),
        );
        qemu.send(&inline_call("Update", no_reply, &short))
            .await
            .unwrap();
        // A call that waits for its reply goes through zbus, after the parked ones.
        let reply = qemu
            .call_method(
                None::<&str>,
                LISTENER_PATH,
                Some("org.qemu.Display1.Listener"),
                "Update",
                &(
                    9i32,
                    9i32,
                    2i32,
                    2i32,
                    8u32,
                    X8R8G8B8,
                    serde_bytes::Bytes::new(&green),
                ),
            )
            .await;
        assert!(reply.is_ok(), "{reply:?}");
        let snap = fb.snapshot();
        assert_eq!((snap.width, snap.height), (64, 32));
        let at = |x: usize, y: usize| snap.pixels[y * 64 + x];
        assert_eq!(at(0, 0), 0xff0000, "the Scanout");
        assert_eq!(at(8, 8), 0x0000ff, "the parked Update");
        assert_eq!(at(12, 12), 0xff0000);
        assert_eq!(at(9, 9), 0x00ff00, "the zbus Update, applied last");
        assert_eq!(at(11, 11), 0x0000ff);
        let c = fb.counters();
        assert_eq!(
            PathCounters::get(&c.parked),
            3,
            "Scanout, Update, the short Update"
        );
        assert_eq!(PathCounters::get(&c.update), 3);
        // Many frames in a row: the reader never runs more than one frame ahead, all arrive.
        for i in 0..50u8 {
            let px = solid(256, 160, [i, i, i, 0]);
            let scanout = (
                256u32,
                160u32,
                1024u32,
                X8R8G8B8,
                serde_bytes::Bytes::new(&px),
            );
            qemu.send(&inline_call("Scanout", no_reply, &scanout))
                .await
                .unwrap();
            // A small Update between whole frames does not cost the next one a new buffer.
            let px = solid(1, 1, [i, i, i, 0]);
            let update = (
                0i32,
                0i32,
                1i32,
                1i32,
                4u32,
                X8R8G8B8,
                serde_bytes::Bytes::new(&px),
            );
            qemu.send(&inline_call("Update", no_reply, &update))
                .await
                .unwrap();
        }
        let ping = qemu
            .call_method(
                None::<&str>,
                LISTENER_PATH,
                Some("org.qemu.Display1.Listener"),
                "MouseSet",
                &(1i32, 1i32, 1i32),
            )
            .await;
        assert!(ping.is_ok(), "{ping:?}");
        assert_eq!(fb.snapshot().pixels[0], 0x313131, "the last of 50");
        assert_eq!(PathCounters::get(&c.parked), 103);
        // A buffer per frame in flight, each made once and grown once for the larger frames,
        // then reused (shrinking one to a small Update's size would make this ~50).
        let made = parked.allocations();
        assert!(
            made <= 2 * MAX_IN_FLIGHT as u64,
            "{made} buffers made or grown for 103 frames"
        );
        // A still screen: the buffer is let go, so an idle sidecar holds no frame's worth.
        assert!(parked.spare_len() > 0);
        tokio::time::sleep(SPARE_IDLE + Duration::from_millis(300)).await;
        assert_eq!(
            parked.spare_len(),
            0,
            "the spare is freed after a second without frames"
        );
    }
}
