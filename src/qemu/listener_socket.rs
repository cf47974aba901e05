//! The socket of the display listener, read and written by us instead of by zbus, so that a
//! whole-surface inline frame waits *in QEMU* while every viewer is still busy with the last one.
//!
//! Why: std VGA's 32 bpp surfaces have no memfd, so QEMU sends each full-screen frame inline as an
//! 8 MB `Scanout` call, ~30 a second. Taking all of them in (receive, allocate, convert) is most
//! of what a 1080p animation costs us, and under a 200m CPU limit it leaves the encoders nothing.
//! QEMU drops any queued older Scanout/Update when it queues a new Scanout, so not reading one
//! just lets QEMU replace it with a newer one: the frames we take in follow what the viewers can
//! use, and at most one frame is in our memory ahead of them. Only `Scanout` waits — an `Update` or `UpdateMap` is never superseded and would pile up in
//! QEMU — and never longer than [`MAX_WAIT`], so cursor and other calls behind it still flow.
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

/// The read and write halves over `stream`; with `fb`, Scanouts wait for its viewers.
pub fn split(
    stream: std::os::unix::net::UnixStream,
    fb: Option<Framebuffer>,
) -> io::Result<BoxedSplit> {
    stream.set_nonblocking(true)?;
    let stream = Arc::new(UnixStream::from_std(stream)?);
    let read: Box<dyn ReadHalf> = Box::new(Reader {
        stream: Arc::clone(&stream),
        fb,
        passed: None,
    });
    let write: Box<dyn WriteHalf> = Box::new(Writer { stream });
    Ok(Split::new(read, write))
}

#[derive(Debug)]
struct Reader {
    stream: Arc<UnixStream>,
    fb: Option<Framebuffer>,
    /// The damage sequence number when the last Scanout was let through.
    passed: Option<u64>,
}

#[derive(Debug)]
struct Writer {
    stream: Arc<UnixStream>,
}

impl Reader {
    /// Peeks at the next message without consuming it: the size of a `Scanout` call.
    async fn next_scanout(&self) -> io::Result<Option<(u32, u32)>> {
        let mut head = [0u8; PEEK];
        loop {
            self.stream.readable().await?;
            let peeked = self.stream.try_io(Interest::READABLE, || {
                rustix::net::recv(&*self.stream, &mut head[..], RecvFlags::PEEK)
                    .map(|(n, _)| n)
                    .map_err(io::Error::from)
            });
            match peeked {
                Ok(n) => return Ok(scanout_size(&head[..n])),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

#[async_trait::async_trait]
impl ReadHalf for Reader {
    async fn recvmsg(&mut self, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
        // zbus asks for exactly the primary header at a message boundary (the handshake reads
        // 1024-byte lines, bodies their remaining length); a mistaken guess only peeks.
        // Only a frame of the current size waits (a mode switch goes through at once), and only
        // until the frame let through before it has been handled and taken by a viewer.
        if buf.len() == PRIMARY_HEADER
            && let Some(fb) = &self.fb
            && let Some(size) = self.next_scanout().await?
        {
            let current = size == fb.size();
            if current {
                let after = self
                    .passed
                    .unwrap_or_else(|| fb.damage_seq().saturating_sub(1));
                fb.taken_after(after, MAX_WAIT).await;
            }
            // An 8 MB message on top of what the viewers hold can be what crosses the memory
            // limit (an OOM kill ends every session): let them finish first.
            let need = u64::from(size.0) * u64::from(size.1) * 4;
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
        loop {
            self.stream.readable().await?;
            let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let got = self.stream.try_io(Interest::READABLE, || {
                let mut iov = [IoSliceMut::new(buf)];
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

/// Width and height of a `Scanout` call whose start is `head` (its body starts `uuuuay`). A pure
/// reader of the header fields (D-Bus spec, "Message Format"); anything else, or anything it does
/// not understand, is `None`.
pub fn scanout_size(head: &[u8]) -> Option<(u32, u32)> {
    let (member, body) = member(head)?;
    if member != b"Scanout" {
        return None;
    }
    Some((u32_at(head, body)?, u32_at(head, body + 4)?))
}

fn u32_at(head: &[u8], at: usize) -> Option<u32> {
    let b: [u8; 4] = head.get(at..at + 4)?.try_into().ok()?;
    match head.first()? {
        b'l' => Some(u32::from_le_bytes(b)),
        b'B' => Some(u32::from_be_bytes(b)),
        _ => None,
    }
}

/// The member name of a method call, and where its body starts.
fn member(head: &[u8]) -> Option<(&[u8], usize)> {
    if head.len() < PRIMARY_HEADER || head[1] != 1 || head[3] != 1 {
        return None; // not a method call of protocol version 1
    }
    let u32_at = |at: usize| u32_at(head, at);
    let fields_end = PRIMARY_HEADER.checked_add(usize::try_from(u32_at(12)?).ok()?)?;
    if fields_end > head.len() {
        return None;
    }
    let mut at = PRIMARY_HEADER;
    let mut found = None;
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
                if code == 3 {
                    found = Some(s);
                }
                v += 4 + len + 1;
            }
            b"g" => {
                let len = usize::from(*head.get(v)?);
                v += 1 + len + 1;
            }
            b"u" => v = v.next_multiple_of(4) + 4,
            _ => return None,
        }
        at = v.next_multiple_of(8);
    }
    // The body starts at the next 8-byte boundary after the fields.
    found.map(|m| (m, fields_end.next_multiple_of(8)))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
