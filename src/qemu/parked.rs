//! Inline frames "parked" by the listener socket: an 8 MB `Scanout` (or a large `Update`) is read
//! straight from the socket into a buffer we reuse, and zbus is handed a tiny `Take(token)` call
//! in its place, so the frame is applied in QEMU's order with the rest of the listener's calls.
//!
//! Why: zbus gives every message a fresh allocation of its exact length, zero-filled before the
//! read. With the allocator settings of a memory-limited pod (`MALLOC_MMAP_THRESHOLD_`) each 1080p
//! frame became an mmap, 2,000 page faults, the kernel's and zbus' zeroing, and an munmap — a
//! quarter of what a full-screen animation cost under 200m CPU (perf, README). Parking also bounds
//! what the socket reader can run ahead of the handlers: at most [`MAX_IN_FLIGHT`] frames, each in
//! a buffer that is kept for the next reads.
//!
//! Only calls QEMU makes without waiting for a reply are parked (GDBus sets NO_REPLY_EXPECTED on a
//! call without a callback, as QEMU's listener calls are), so nobody is owed an answer.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tracing::{debug, warn};

/// Our private interface on the listener's path; only the socket reader sends to it.
pub const PARKED_INTERFACE: &str = "vdi.sidecar.ParkedFrame";
/// Frames read but not yet applied, at most: the reader reads the next of QEMU's back-to-back
/// Updates while the handler applies one (so one refresh's Updates land together, which scroll
/// detection needs), and each in-flight frame has a buffer of its own that is kept for reuse.
pub const MAX_IN_FLIGHT: usize = 2;
/// The same under a cgroup limit (where whole frames are held in QEMU anyway): one frame, one
/// buffer. Two cost 22 MB more peak memory under 200m/64M at 1080p (budget bench: Tight 24 -> 46
/// MB, ZRLE 37 -> 59 MB), too close to the limit for what they buy.
pub const MAX_IN_FLIGHT_BUDGET: usize = 1;
/// A parked frame whose `Take` never ran (zbus refused it) is dropped after this long.
pub const STUCK: Duration = Duration::from_secs(1);
/// The reused buffer is let go when no message came for this long (a still screen): an idle
/// sidecar does not keep a frame's worth of memory (8 MB at 1080p).
pub const SPARE_IDLE: Duration = Duration::from_secs(1);

/// The two inline frame calls of `org.qemu.Display1.Listener`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `Scanout(uuuuay)`: width, height, stride, pixman format, data.
    Scanout,
    /// `Update(iiiiuuay)`: x, y, width, height, stride, pixman format, data.
    Update,
}

impl Kind {
    pub fn signature(self) -> &'static [u8] {
        match self {
            Kind::Scanout => b"uuuuay",
            Kind::Update => b"iiiiuuay",
        }
    }

    pub fn from_member(member: &[u8]) -> Option<Self> {
        match member {
            b"Scanout" => Some(Kind::Scanout),
            b"Update" => Some(Kind::Update),
            _ => None,
        }
    }
}

/// A whole message read by the socket: `bytes[..len]`, its body at `body_at`.
#[derive(Debug)]
pub struct Parked {
    token: u64,
    pub kind: Kind,
    pub big_endian: bool,
    pub body_at: usize,
    pub len: usize,
    pub bytes: Vec<u8>,
}

/// The fields of a parked frame's body; `data` borrows from the parked buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    Scanout {
        width: u32,
        height: u32,
        stride: u32,
        format: u32,
        data: &'a [u8],
    },
    Update {
        x: i32,
        y: i32,
        width: i32,
        height: i32,
        stride: u32,
        format: u32,
        data: &'a [u8],
    },
}

impl Parked {
    /// The body's fields, or `None` when the body does not hold what its signature says (a pure
    /// reader of D-Bus marshalling: fixed 4-byte fields, then the byte array's length and bytes).
    pub fn frame(&self) -> Option<Frame<'_>> {
        let msg = self.bytes.get(..self.len)?;
        let body = msg.get(self.body_at..)?;
        let word = |i: usize| -> Option<u32> {
            let b: [u8; 4] = body.get(i * 4..i * 4 + 4)?.try_into().ok()?;
            Some(if self.big_endian {
                u32::from_be_bytes(b)
            } else {
                u32::from_le_bytes(b)
            })
        };
        let fixed = match self.kind {
            Kind::Scanout => 4,
            Kind::Update => 6,
        };
        let len = usize::try_from(word(fixed)?).ok()?;
        let start = (fixed + 1) * 4;
        let data = body.get(start..start.checked_add(len)?)?;
        let int = |i| word(i).map(|v| v as i32);
        Some(match self.kind {
            Kind::Scanout => Frame::Scanout {
                width: word(0)?,
                height: word(1)?,
                stride: word(2)?,
                format: word(3)?,
                data,
            },
            Kind::Update => Frame::Update {
                x: int(0)?,
                y: int(1)?,
                width: int(2)?,
                height: int(3)?,
                stride: word(4)?,
                format: word(5)?,
                data,
            },
        })
    }
}

/// The queue between the socket reader and the `Take` handler, and the one buffer reused.
#[derive(Debug, Clone, Default)]
pub struct ParkedFrames {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    taken: Notify,
    /// Frames in flight at most (0: [`MAX_IN_FLIGHT`]).
    limit: usize,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Parked>,
    /// Buffers kept for the next reads, at most the queue's limit.
    spare: Vec<Vec<u8>>,
    next_token: u64,
    /// Parked and not yet given back (queued, or being applied).
    in_flight: usize,
    /// Buffers made or grown (each zeroed once): stays at one while frames keep their size.
    allocations: u64,
}

impl ParkedFrames {
    /// A queue with at most `limit` frames (and buffers) in flight.
    pub fn with_limit(limit: usize) -> Self {
        Self {
            shared: Arc::new(Shared {
                limit: limit.max(1),
                ..Shared::default()
            }),
        }
    }

    fn limit(&self) -> usize {
        match self.shared.limit {
            0 => MAX_IN_FLIGHT,
            n => n,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A buffer to read a message of `len` bytes into: the spare when there is one (zeroed only
    /// where it grows). `surface` is the console's size in bytes: a spare much larger than that
    /// is from before a switch to a smaller mode and is let go. (Not `len`: a small Update between
    /// two whole-surface Scanouts must not cost the next Scanout a new buffer.)
    pub fn buffer(&self, len: usize, surface: usize) -> Vec<u8> {
        let mut buf = self.lock().spare.pop().unwrap_or_default();
        if buf.len() / 2 > len.max(surface).max(64 << 10) {
            buf = Vec::new();
        }
        if buf.len() < len {
            buf.resize(len, 0);
            self.lock().allocations += 1;
        }
        buf
    }

    /// How many buffers were made or grown so far.
    pub fn allocations(&self) -> u64 {
        self.lock().allocations
    }

    /// Bytes the spare already holds (memory that reading a frame will not add).
    pub fn spare_len(&self) -> usize {
        self.lock().spare.iter().map(Vec::len).sum()
    }

    /// Queues a frame read into `bytes`; returns the token of its `Take` call.
    pub fn park(
        &self,
        kind: Kind,
        big_endian: bool,
        body_at: usize,
        len: usize,
        bytes: Vec<u8>,
    ) -> u64 {
        let mut st = self.lock();
        st.next_token += 1;
        st.in_flight += 1;
        let token = st.next_token;
        st.queue.push_back(Parked {
            token,
            kind,
            big_endian,
            body_at,
            len,
            bytes,
        });
        token
    }

    /// Waits until fewer than the limit's frames are parked and not yet applied; a frame
    /// that waited [`STUCK`] is dropped (its `Take` is not coming), so the reader never stops for
    /// good.
    pub async fn wait_room(&self) {
        let deadline = tokio::time::Instant::now() + STUCK;
        loop {
            let taken = self.shared.taken.notified();
            tokio::pin!(taken);
            taken.as_mut().enable();
            if self.lock().in_flight < self.limit() {
                return;
            }
            if tokio::time::timeout_at(deadline, taken).await.is_err() {
                let mut st = self.lock();
                if let Some(p) = st.queue.pop_front() {
                    st.in_flight = st.in_flight.saturating_sub(1);
                    warn!(token = p.token, "a parked frame was never taken; dropped");
                }
                return;
            }
        }
    }

    /// The frame of `token` (older ones left behind are dropped: their calls are gone).
    pub fn take(&self, token: u64) -> Option<Parked> {
        let mut st = self.lock();
        while let Some(front) = st.queue.front() {
            if front.token > token {
                return None;
            }
            let p = st.queue.pop_front()?;
            if p.token == token {
                return Some(p);
            }
            st.in_flight = st.in_flight.saturating_sub(1);
            debug!(token = p.token, "parked frame skipped");
        }
        None
    }

    /// Lets the reused buffer go (see [`SPARE_IDLE`]).
    pub fn drop_spare(&self) {
        self.lock().spare.clear();
    }

    /// Returns a handled frame's buffer for the next read and wakes the reader.
    pub fn give_back(&self, bytes: Vec<u8>) {
        {
            let limit = self.limit();
            let mut st = self.lock();
            st.in_flight = st.in_flight.saturating_sub(1);
            if st.spare.len() < limit {
                st.spare.push(bytes);
            }
        }
        self.shared.taken.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(body: &[u8]) -> (Vec<u8>, usize) {
        // The header is irrelevant to the body reader: any 8-aligned offset.
        let mut bytes = vec![0xee; 24];
        bytes.extend_from_slice(body);
        (bytes, 24)
    }

    fn words(ws: &[u32], data: &[u8]) -> Vec<u8> {
        let mut b: Vec<u8> = ws.iter().flat_map(|w| w.to_le_bytes()).collect();
        b.extend_from_slice(&(data.len() as u32).to_le_bytes());
        b.extend_from_slice(data);
        b
    }

    fn parked(kind: Kind, body: &[u8]) -> Parked {
        let (bytes, body_at) = message(body);
        Parked {
            token: 1,
            kind,
            big_endian: false,
            body_at,
            len: bytes.len(),
            bytes,
        }
    }

    #[test]
    fn reads_scanout_and_update_bodies() {
        let data = [1u8, 2, 3, 4, 5, 6, 7, 8];
        let p = parked(Kind::Scanout, &words(&[2, 1, 8, 0x20020888], &data));
        assert_eq!(
            p.frame(),
            Some(Frame::Scanout {
                width: 2,
                height: 1,
                stride: 8,
                format: 0x20020888,
                data: &data
            })
        );
        let p = parked(
            Kind::Update,
            &words(&[(-1i32) as u32, 5, 2, 1, 8, 0x20020888], &data),
        );
        assert_eq!(
            p.frame(),
            Some(Frame::Update {
                x: -1,
                y: 5,
                width: 2,
                height: 1,
                stride: 8,
                format: 0x20020888,
                data: &data
            })
        );
    }

    #[test]
    fn a_body_shorter_than_it_says_is_none_never_a_panic() {
        let whole = words(&[2, 1, 8, 0x20020888], &[9u8; 8]);
        for n in 0..whole.len() {
            let p = parked(Kind::Scanout, &whole[..n]);
            assert_eq!(p.frame(), None, "{n} bytes");
        }
        let mut lying = whole.clone();
        lying[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(parked(Kind::Scanout, &lying).frame(), None);
        // `len` bounds the message even when the buffer (reused) is longer.
        let mut p = parked(Kind::Scanout, &whole);
        p.len -= 1;
        p.bytes.extend_from_slice(&[0; 64]);
        assert_eq!(p.frame(), None);
    }

    #[test]
    fn tokens_are_taken_in_order_and_buffers_come_back() {
        let q = ParkedFrames::default();
        let a = q.park(Kind::Scanout, false, 0, 4, q.buffer(4, 0));
        let b = q.park(Kind::Update, false, 0, 4, q.buffer(4, 0));
        assert_eq!(
            q.take(b).map(|p| p.kind),
            Some(Kind::Update),
            "a is skipped"
        );
        assert!(q.take(a).is_none(), "gone with b's take");
        assert!(q.take(99).is_none());
        assert_eq!(q.lock().in_flight, 1, "b is being applied");
        q.give_back(vec![0; 100]);
        assert_eq!(q.lock().in_flight, 0);
        assert_eq!(q.spare_len(), 100);
        assert_eq!(
            q.buffer(10, 0).len(),
            100,
            "the spare is reused, not shrunk"
        );
        assert_eq!(q.spare_len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_reader_waits_for_room_but_not_forever() {
        let q = ParkedFrames::default();
        for _ in 0..MAX_IN_FLIGHT {
            q.park(Kind::Scanout, false, 0, 0, Vec::new());
        }
        let t0 = tokio::time::Instant::now();
        q.wait_room().await;
        assert!(t0.elapsed() >= STUCK, "no Take came: waited the bound");
        assert_eq!(
            q.lock().in_flight,
            MAX_IN_FLIGHT - 1,
            "the oldest was dropped"
        );
        // A handler taking a frame wakes the reader at once.
        q.park(Kind::Scanout, false, 0, 0, Vec::new());
        let q2 = q.clone();
        let handler = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let token = q2.lock().queue.front().map(|p| p.token).unwrap_or(0);
            let p = q2.take(token).expect("front frame");
            q2.give_back(p.bytes);
        });
        let t0 = tokio::time::Instant::now();
        q.wait_room().await;
        assert!(t0.elapsed() < STUCK);
        handler.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn under_a_budget_one_frame_is_in_flight_and_one_buffer_kept() {
        let q = ParkedFrames::with_limit(MAX_IN_FLIGHT_BUDGET);
        let t0 = tokio::time::Instant::now();
        q.wait_room().await;
        assert!(t0.elapsed() < STUCK, "room for the first");
        let a = q.park(Kind::Scanout, false, 0, 0, vec![0; 10]);
        q.wait_room().await;
        assert!(t0.elapsed() >= STUCK, "no room for a second");
        assert!(q.take(a).is_none(), "the stuck one was dropped");
        for n in [10, 20] {
            let t = q.park(Kind::Update, false, 0, 0, vec![0; n]);
            let p = q.take(t).expect("taken");
            q.give_back(p.bytes);
        }
        q.give_back(vec![0; 30]);
        assert_eq!(q.lock().spare.len(), 1, "one buffer kept");
    }
}
