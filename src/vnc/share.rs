//! Encode once for every viewer. Viewers with the same encoding settings (a [`Group`]) share
//! one chain of encoded frames: each frame covers the damage from the chain's previous position
//! to a newer one and is encoded once, when the first viewer asks for it, then sent as the same
//! bytes to every viewer that is in step. A viewer joining (or asking for everything) takes a
//! shared key frame; one that fell out of the retained chain gets its own catch-up update, and
//! is in step again after it.
//!
//! Encoding runs on the encoder pool and publishes its frame itself, so a viewer that leaves
//! mid-encode never strands the others waiting for it. Memory: the chain keeps frames up to a
//! byte budget (at least the newest); a viewer holds only the frame it is writing.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tracing::{debug, warn};

use super::frame::{self, Encoded, Settings};
use super::scroll::{RowHash, RowHashes, row_hash};
use super::update::{self, Part, Source};
use crate::framebuffer::{Framebuffer, Position, Rect};

/// How long the screen must stay still before lossy areas are resent losslessly.
pub const LOSSLESS_REFRESH: Duration = Duration::from_millis(150);
/// Catch-up damage larger than this share of the screen is sent as a (shared) key frame.
const CATCH_UP_MAX_SHARE: f64 = 0.5;
/// Chain frames kept at most (besides the byte budget): a viewer further behind catches up
/// rather than replay history.
const MAX_FRAMES: usize = 8;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The damage after the chain's previous frame.
    Delta,
    /// The whole screen: how viewers join.
    Key,
    /// The areas last sent lossy, now lossless (nothing changed since).
    Refresh,
    /// One viewer's own catch-up (never in the chain).
    CatchUp,
}

/// One encoded update, shared by every viewer it is sent to.
#[derive(Debug)]
pub struct Frame {
    pub id: u64,
    pub kind: Kind,
    /// The damage covered: after `from` up to `to` (pixels at least as new as `to`).
    pub from: Position,
    pub to: Position,
    /// For key frames: the chain frame it stands after (viewers continue with the next one).
    pub follows: u64,
    pub width: u32,
    pub height: u32,
    pub encoded: Encoded,
    /// Holds CopyRects from the screen at `from`: only for viewers exactly there.
    pub copies: usize,
    /// The damage rectangles it covers (before they were cut into bands).
    pub damage: Vec<Rect>,
}

impl Frame {
    /// Whether this frame repaints every pixel `other` does (so a viewer may skip `other`).
    fn covers(&self, other: &Frame) -> bool {
        other.damage.iter().all(|r| {
            self.damage.iter().any(|d| {
                d.x <= r.x && d.y <= r.y && d.x + d.w >= r.x + r.w && d.y + d.h >= r.y + r.h
            })
        })
    }
}

/// Where a viewer stands against its group's chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub pos: Position,
    /// The newest chain frame it has taken (or stood after).
    pub last_id: u64,
}

/// What a viewer asking for an update must do next.
#[derive(Debug)]
pub enum Next {
    /// Send this frame; the viewer is then at the cursor.
    Send(Arc<Frame>, Cursor),
    /// Encode this job (the group marked itself busy for this viewer).
    Encode(Job),
    /// Another viewer is encoding: wait for it.
    Wait,
    /// Nothing new; a lossless refresh is due at the instant, if any.
    Idle(Option<Instant>),
    /// Behind the retained chain: this viewer needs its own catch-up.
    CatchUp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    Delta,
    Key,
    Refresh,
}

/// The chain of one group, without I/O or encoding: pure bookkeeping, unit tested.
#[derive(Debug, Default)]
pub struct Chain {
    generation: Option<u64>,
    frames: VecDeque<Arc<Frame>>,
    key: Option<Arc<Frame>>,
    /// Where the newest chain frame left the screen.
    head: Option<Position>,
    next_id: u64,
    retained: usize,
    max_bytes: usize,
    /// Areas sent lossy since the last refresh, and when the screen last changed.
    lossy: Vec<Rect>,
    changed_at: Option<Instant>,
    /// What in-step viewers' screens show, row by row (for CopyRect).
    rows: RowHashes,
    busy: bool,
}

impl Chain {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            next_id: 1,
            max_bytes,
            ..Self::default()
        }
    }

    fn newest_id(&self) -> u64 {
        self.frames.back().map_or(self.next_id - 1, |f| f.id)
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Starts over for a new surface generation.
    fn reset(&mut self, generation: u64) {
        *self = Self {
            generation: Some(generation),
            next_id: self.next_id,
            max_bytes: self.max_bytes,
            ..Self::default()
        };
    }

    /// A key frame viewers can still join: every chain frame after it is retained.
    fn joinable_key(&self, generation: u64) -> Option<&Arc<Frame>> {
        let key = self.key.as_ref()?;
        let complete = self.frames.front().is_none_or(|f| f.id <= key.follows + 1);
        (key.to.generation == generation && complete).then_some(key)
    }

    fn start(&mut self, job: Job) -> Next {
        if self.busy {
            Next::Wait
        } else {
            self.busy = true;
            Next::Encode(job)
        }
    }

    /// What a viewer at `cursor` (`None`: it needs everything) does next, with the framebuffer
    /// at `now_pos` and the clock at `now`.
    pub fn next(&mut self, cursor: Option<Cursor>, now_pos: Position, now: Instant) -> Next {
        if self.generation != Some(now_pos.generation) {
            self.reset(now_pos.generation);
        }
        let Some(mut c) = cursor.filter(|c| c.pos.generation == now_pos.generation) else {
            return match self.joinable_key(now_pos.generation) {
                Some(key) => {
                    let to = Cursor {
                        pos: key.to,
                        last_id: key.follows,
                    };
                    Next::Send(Arc::clone(key), to)
                }
                None => self.start(Job::Key),
            };
        };
        loop {
            let Some(f) = self.frames.iter().find(|f| f.id > c.last_id) else {
                // At the end of the chain.
                let head = self.head.unwrap_or(c.pos);
                if c.pos.seq < head.seq {
                    return Next::CatchUp;
                }
                if now_pos.seq > head.seq {
                    return self.start(Job::Delta);
                }
                let refresh_at = self.changed_at.map(|t| t + LOSSLESS_REFRESH);
                return match refresh_at {
                    Some(at) if !self.lossy.is_empty() && at <= now => self.start(Job::Refresh),
                    _ if !self.lossy.is_empty() => Next::Idle(refresh_at),
                    _ => Next::Idle(None),
                };
            };
            if f.id > c.last_id + 1 {
                return Next::CatchUp; // frames it needed were dropped
            }
            match f.kind {
                Kind::Refresh if f.from.seq <= c.pos.seq => {
                    let to = Cursor {
                        pos: c.pos,
                        last_id: f.id,
                    };
                    return Next::Send(Arc::clone(f), to);
                }
                Kind::Refresh => return Next::CatchUp,
                _ => {}
            }
            if f.to.seq <= c.pos.seq && f.from.seq < c.pos.seq {
                // The viewer is already newer than this frame (it joined by a key frame).
                c.last_id = f.id;
                continue;
            }
            if f.from.seq > c.pos.seq || (f.copies > 0 && f.from.seq != c.pos.seq) {
                return Next::CatchUp;
            }
            // Behind by more than one frame: a newer frame that repaints everything the frames
            // in between did (a full-screen animation always does) is sent alone, so a slow
            // viewer skips frames instead of replaying them.
            let f = self.skip_target(f).unwrap_or(f);
            let to = Cursor {
                pos: if f.to.seq > c.pos.seq { f.to } else { c.pos },
                last_id: f.id,
            };
            return Next::Send(Arc::clone(f), to);
        }
    }

    /// The newest delta after `first` that covers every frame from `first` up to it.
    fn skip_target<'a>(&'a self, first: &'a Arc<Frame>) -> Option<&'a Arc<Frame>> {
        let later: Vec<&Arc<Frame>> = self.frames.iter().filter(|f| f.id > first.id).collect();
        later.iter().rev().copied().find(|g| {
            g.kind == Kind::Delta
                && g.copies == 0
                && self
                    .frames
                    .iter()
                    .filter(|f| f.id >= first.id && f.id < g.id)
                    .all(|f| g.covers(f))
        })
    }

    /// The chain's head, where the next delta starts (`None`: no frame yet).
    pub fn head(&self) -> Option<Position> {
        self.head
    }

    /// Publishes a finished job's frame and makes the group free again.
    pub fn publish(&mut self, mut frame: Frame, rows: &[(u32, RowHash)], now: Instant) {
        self.busy = false;
        if self.generation != Some(frame.to.generation) {
            return; // the surface changed while it was encoded: nobody can use it
        }
        self.lossy
            .extend(frame.encoded.rects.iter().filter_map(|r| r.lossy));
        update::cap_rects(&mut self.lossy);
        // Chain frames are numbered without gaps (a gap means frames were dropped); a key frame
        // is not in the chain but stands after its newest frame.
        if frame.kind == Kind::Key {
            frame.follows = self.newest_id();
        } else {
            frame.id = self.take_id();
        }
        match frame.kind {
            Kind::Key => {
                if self.head.is_none() {
                    // The chain starts (again) where the key frame left the screen.
                    self.head = Some(frame.to);
                    self.rows.reset(frame.height);
                    for &(y, h) in rows {
                        self.rows.record(y, &[h]);
                    }
                }
                self.changed_at = Some(now);
                self.key = Some(Arc::new(frame));
                return;
            }
            Kind::Refresh => self.lossy.clear(),
            Kind::Delta => {
                self.head = Some(frame.to);
                if !frame.encoded.rects.is_empty() {
                    self.changed_at = Some(now);
                }
                for &(y, h) in rows {
                    self.rows.record(y, &[h]);
                }
            }
            Kind::CatchUp => return,
        }
        self.retained += frame.encoded.bytes;
        self.frames.push_back(Arc::new(frame));
        while (self.retained > self.max_bytes || self.frames.len() > MAX_FRAMES)
            && self.frames.len() > 1
        {
            if let Some(old) = self.frames.pop_front() {
                self.retained -= old.encoded.bytes;
            }
        }
        // Key frames refer to chain positions: one whose successors are gone cannot be joined.
        if self
            .key
            .as_ref()
            .is_some_and(|k| self.frames.front().is_some_and(|f| f.id > k.follows + 1))
        {
            self.key = None;
        }
    }

    /// A job ended without a frame (the encoder failed): make the group free again.
    pub fn abandon(&mut self) {
        self.busy = false;
    }

    /// The newest chain frame id, for a viewer brought up to date by its own catch-up.
    pub fn position_id(&self) -> u64 {
        self.newest_id()
    }

    /// Remembers lossy areas a catch-up sent, so the next refresh covers them too.
    pub fn add_lossy(&mut self, rects: impl IntoIterator<Item = Rect>) {
        self.lossy.extend(rects);
        update::cap_rects(&mut self.lossy);
        self.changed_at = Some(Instant::now());
    }

    pub fn retained_bytes(&self) -> usize {
        self.retained + self.key.as_ref().map_or(0, |k| k.encoded.bytes)
    }

    /// CopyRect planning state for a delta.
    fn rows_mut(&mut self) -> &mut RowHashes {
        &mut self.rows
    }
}

/// Everything viewers must agree on to share a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    pub settings: Settings,
    pub copy_rect: bool,
}

/// How much encoding the groups did, summed (tests, benchmarks, logs).
#[derive(Debug, Default)]
pub struct Counters {
    pub keys: AtomicU64,
    pub deltas: AtomicU64,
    pub refreshes: AtomicU64,
    pub catch_ups: AtomicU64,
    pub encoded_bytes: AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Frames encoded for a group (key, delta and refresh frames).
    pub encoded: u64,
    pub keys: u64,
    pub catch_ups: u64,
    pub encoded_bytes: u64,
}

/// Viewers of one console with the same [`Key`].
pub struct Group {
    pub key: Key,
    fb: Framebuffer,
    pool: Arc<rayon::ThreadPool>,
    counters: Arc<Counters>,
    chain: Mutex<Chain>,
    done: Notify,
}

impl Group {
    fn lock(&self) -> MutexGuard<'_, Chain> {
        self.chain.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn framebuffer(&self) -> &Framebuffer {
        &self.fb
    }

    /// What the viewer at `cursor` does next.
    pub fn next(&self, cursor: Option<Cursor>) -> Next {
        let now_pos = self.fb.position();
        self.lock().next(cursor, now_pos, Instant::now())
    }

    /// Waits until a job in progress has published.
    pub async fn wait(&self) {
        let notified = self.done.notified();
        tokio::pin!(notified);
        // Registered before looking: a publish in between is not missed.
        notified.as_mut().enable();
        if !self.lock().busy {
            return;
        }
        notified.await;
    }

    /// Runs `job` on the encoder pool; the pool publishes the frame, whether or not the caller
    /// is still there to see it.
    pub async fn run(self: &Arc<Self>, job: Job) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let group = Arc::clone(self);
        self.pool.spawn(move || {
            let published = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                group.encode_and_publish(job)
            }));
            if published.is_err() {
                warn!(?job, "shared encoding failed");
                group.lock().abandon();
            }
            group.done.notify_waiters();
            let _ = tx.send(());
        });
        let _ = rx.await;
    }

    fn encode_and_publish(&self, job: Job) {
        let (from, lossy) = {
            let chain = self.lock();
            (chain.head(), chain.lossy.clone())
        };
        let mut settings = self.key.settings;
        let (parts, damage_to, width, height, kind) = match job {
            Job::Key | Job::Delta => {
                let since = if job == Job::Key { None } else { from };
                let d = self.fb.damage_since(since);
                let full = d.new_surface || job == Job::Key;
                let rects = update::update_rects(
                    &d,
                    full,
                    Rect::full(d.width, d.height),
                    d.width,
                    d.height,
                );
                let parts = if job == Job::Delta && !full {
                    self.plan_delta(&rects, d.width)
                } else {
                    rects.iter().map(|r| (*r, Source::Framebuffer)).collect()
                };
                let kind = if job == Job::Key {
                    Kind::Key
                } else {
                    Kind::Delta
                };
                (parts, d.to, d.width, d.height, kind)
            }
            Job::Refresh => {
                settings.jpeg = None;
                let pos = self.fb.position();
                let (w, h) = self.fb.size();
                let mut rects = lossy;
                update::merge_overlaps(&mut rects);
                let parts = rects.iter().map(|r| (*r, Source::Framebuffer)).collect();
                (parts, from.unwrap_or(pos), w, h, Kind::Refresh)
            }
        };
        let damage: Vec<Rect> = parts.iter().map(|p| p.0).collect();
        let started = std::time::Instant::now();
        let encoded = frame::encode(&self.fb, &parts, &settings, width, &self.pool);
        crate::metrics::global().encoded(started.elapsed());
        let copies = parts
            .iter()
            .filter(|p| matches!(p.1, Source::CopyFrom(_)))
            .count();
        let frame = Frame {
            id: 0,
            kind,
            from: if kind == Kind::Refresh {
                damage_to
            } else {
                from.unwrap_or(damage_to)
            },
            to: damage_to,
            follows: 0,
            width,
            height,
            copies,
            damage,
            encoded,
        };
        debug!(
            ?kind,
            bytes = frame.encoded.bytes,
            rects = frame.encoded.rects.len(),
            "shared frame"
        );
        let c = &self.counters;
        match kind {
            Kind::Key => &c.keys,
            Kind::Refresh => &c.refreshes,
            _ => &c.deltas,
        }
        .fetch_add(1, Ordering::Relaxed);
        c.encoded_bytes
            .fetch_add(frame.encoded.bytes as u64, Ordering::Relaxed);
        let rows = frame.encoded.rows.clone();
        self.lock().publish(frame, &rows, Instant::now());
    }

    /// CopyRect planning for a delta: a single full-width band may be a scroll of what the
    /// in-step viewers show.
    fn plan_delta(&self, rects: &[Rect], width: u32) -> Vec<Part> {
        if !self.key.copy_rect {
            return rects.iter().map(|r| (*r, Source::Framebuffer)).collect();
        }
        let mut parts = Vec::new();
        let mut chain = self.lock();
        if let Some(band) = update::single_band(rects, width) {
            let mut hashes = Vec::with_capacity(band.h as usize);
            let got = self.fb.with_rows(band, |row| hashes.push(row_hash(row)));
            if got == band {
                update::plan_band(band, &hashes, true, chain.rows_mut(), &mut parts);
                // Rows not copied are read again when encoded; the encoder's hashes replace
                // these. Band parts are read from the framebuffer like any other.
                for p in &mut parts {
                    if p.1 == Source::Band {
                        p.1 = Source::Framebuffer;
                    }
                }
                return parts;
            }
        }
        for r in rects {
            chain.rows_mut().forget(r);
            parts.push((*r, Source::Framebuffer));
        }
        parts
    }

    /// One viewer's own catch-up: the damage since `since`, unless it is most of the screen
    /// (`None`: join by a key frame instead). Returns the frame and where it leaves the viewer.
    pub async fn catch_up(self: &Arc<Self>, since: Position) -> Option<(Arc<Frame>, Cursor)> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let group = Arc::clone(self);
        self.pool.spawn(move || {
            let _ = tx.send(group.encode_catch_up(since));
        });
        rx.await.ok().flatten()
    }

    fn encode_catch_up(&self, since: Position) -> Option<(Arc<Frame>, Cursor)> {
        // The chain's position is read with the damage, so later frames continue from here.
        let (d, last_id) = {
            let chain = self.lock();
            (self.fb.damage_since(Some(since)), chain.position_id())
        };
        if d.new_surface {
            return None;
        }
        let area: u64 = d
            .rects
            .iter()
            .map(|r| u64::from(r.w) * u64::from(r.h))
            .sum();
        let screen = (u64::from(d.width) * u64::from(d.height)).max(1);
        if area as f64 > screen as f64 * CATCH_UP_MAX_SHARE {
            return None;
        }
        let rects =
            update::update_rects(&d, false, Rect::full(d.width, d.height), d.width, d.height);
        let parts: Vec<Part> = rects.iter().map(|r| (*r, Source::Framebuffer)).collect();
        let encoded = frame::encode(&self.fb, &parts, &self.key.settings, d.width, &self.pool);
        self.counters.catch_ups.fetch_add(1, Ordering::Relaxed);
        self.counters
            .encoded_bytes
            .fetch_add(encoded.bytes as u64, Ordering::Relaxed);
        self.lock()
            .add_lossy(encoded.rects.iter().filter_map(|r| r.lossy));
        let frame = Frame {
            id: 0,
            kind: Kind::CatchUp,
            from: since,
            to: d.to,
            follows: last_id,
            width: d.width,
            height: d.height,
            copies: 0,
            damage: rects,
            encoded,
        };
        Some((Arc::new(frame), Cursor { pos: d.to, last_id }))
    }

    /// Encodes `parts` for one viewer only (a part of the screen it asked for).
    pub async fn encode_private(self: &Arc<Self>, parts: Vec<Part>, to: Position) -> Arc<Frame> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let group = Arc::clone(self);
        self.pool.spawn(move || {
            let (w, _) = group.fb.size();
            let encoded = frame::encode(&group.fb, &parts, &group.key.settings, w, &group.pool);
            let _ = tx.send(encoded);
        });
        let encoded = rx.await.unwrap_or_default();
        let (width, height) = self.fb.size();
        Arc::new(Frame {
            id: 0,
            kind: Kind::CatchUp,
            from: to,
            to,
            follows: 0,
            width,
            height,
            copies: 0,
            damage: Vec::new(),
            encoded,
        })
    }

    pub fn retained_bytes(&self) -> usize {
        self.lock().retained_bytes()
    }
}

/// The groups of one console; shared by every VNC listener serving it (the VNC port and the
/// browser page), so their viewers share encodings too.
pub struct Groups {
    pool: Arc<rayon::ThreadPool>,
    counters: Arc<Counters>,
    /// Frames a group keeps, in bytes.
    max_bytes: usize,
    groups: Mutex<Vec<Weak<Group>>>,
}

impl Groups {
    /// `workers` encoder threads (from the CPU quota); each group keeps up to `max_bytes` of
    /// encoded frames.
    pub fn new(workers: usize, max_bytes: usize) -> Arc<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(workers.max(1))
            .thread_name(|i| format!("vnc-encode-{i}"))
            .build()
            .unwrap_or_else(|e| {
                warn!(error = %e, "encoder pool: falling back to one thread");
                rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .build()
                    .unwrap_or_else(|_| std::process::abort())
            });
        Arc::new(Self {
            pool: Arc::new(pool),
            counters: Arc::default(),
            max_bytes,
            groups: Mutex::new(Vec::new()),
        })
    }

    /// The group for `key` on `fb`, made on first use.
    pub fn get(&self, key: Key, fb: &Framebuffer) -> Arc<Group> {
        let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        groups.retain(|g| g.strong_count() > 0);
        if let Some(g) = groups
            .iter()
            .filter_map(Weak::upgrade)
            .find(|g| g.key == key && g.fb.same(fb))
        {
            return g;
        }
        let g = Arc::new(Group {
            key,
            fb: fb.clone(),
            pool: Arc::clone(&self.pool),
            counters: Arc::clone(&self.counters),
            chain: Mutex::new(Chain::new(self.max_bytes)),
            done: Notify::new(),
        });
        groups.push(Arc::downgrade(&g));
        g
    }

    /// What the groups have encoded so far.
    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            encoded: get(&c.keys) + get(&c.deltas) + get(&c.refreshes),
            keys: get(&c.keys),
            catch_ups: get(&c.catch_ups),
            encoded_bytes: get(&c.encoded_bytes),
        }
    }

    /// Groups with viewers now.
    pub fn live(&self) -> usize {
        let groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        groups.iter().filter(|g| g.strong_count() > 0).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(seq: u64) -> Position {
        Position { generation: 1, seq }
    }

    fn frame(kind: Kind, from: u64, to: u64, bytes: usize, copies: usize) -> Frame {
        Frame {
            id: 0,
            kind,
            from: pos(from),
            to: pos(to),
            follows: 0,
            width: 8,
            height: 8,
            copies,
            damage: vec![Rect::full(8, 8)],
            encoded: Encoded {
                rects: Vec::new(),
                rows: Vec::new(),
                bytes,
            },
        }
    }

    fn sent(n: Next) -> (Arc<Frame>, Cursor) {
        match n {
            Next::Send(f, c) => (f, c),
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    #[test]
    fn viewers_in_step_share_each_frame_and_a_joiner_takes_the_key() {
        let t = Instant::now();
        let mut chain = Chain::new(1 << 20);
        // The first viewer needs everything: it encodes the key frame, the next one waits.
        assert!(matches!(
            chain.next(None, pos(5), t),
            Next::Encode(Job::Key)
        ));
        assert!(matches!(chain.next(None, pos(5), t), Next::Wait));
        chain.publish(frame(Kind::Key, 0, 5, 100, 0), &[], t);
        let (k, a) = sent(chain.next(None, pos(5), t));
        assert_eq!((k.kind, a.pos), (Kind::Key, pos(5)));
        let (_, b) = sent(chain.next(None, pos(5), t));
        assert_eq!(a, b, "both joined at the same place");
        // Nothing changed: idle. Damage: one encodes the delta, both get the same frame.
        assert!(matches!(chain.next(Some(a), pos(5), t), Next::Idle(None)));
        assert!(matches!(
            chain.next(Some(a), pos(9), t),
            Next::Encode(Job::Delta)
        ));
        assert!(matches!(chain.next(Some(b), pos(9), t), Next::Wait));
        chain.publish(frame(Kind::Delta, 5, 9, 100, 0), &[], t);
        let (fa, a) = sent(chain.next(Some(a), pos(9), t));
        let (fb, b) = sent(chain.next(Some(b), pos(9), t));
        assert!(Arc::ptr_eq(&fa, &fb), "one encoding, two viewers");
        assert_eq!((a.pos, b.pos), (pos(9), pos(9)));
        assert_eq!(chain.head(), Some(pos(9)));
    }

    #[test]
    fn a_viewer_that_fell_out_of_the_chain_catches_up_and_copies_need_the_exact_start() {
        let t = Instant::now();
        // Room for two 100-byte frames.
        let mut chain = Chain::new(200);
        assert!(matches!(
            chain.next(None, pos(1), t),
            Next::Encode(Job::Key)
        ));
        chain.publish(frame(Kind::Key, 0, 1, 100, 0), &[], t);
        let (_, slow) = sent(chain.next(None, pos(1), t));
        let mut fast = slow;
        for (from, to) in [(1, 2), (2, 3), (3, 4)] {
            assert!(matches!(
                chain.next(Some(fast), pos(to), t),
                Next::Encode(Job::Delta)
            ));
            chain.publish(frame(Kind::Delta, from, to, 100, 0), &[], t);
            fast = sent(chain.next(Some(fast), pos(to), t)).1;
        }
        // The slow viewer's next frame (1 -> 2) is gone: it needs its own catch-up.
        assert!(matches!(chain.next(Some(slow), pos(4), t), Next::CatchUp));
        // The key frame's successors are gone too: a newcomer needs a new key frame.
        assert!(matches!(
            chain.next(None, pos(4), t),
            Next::Encode(Job::Key)
        ));
        chain.abandon();
        // After a catch-up the viewer is at the chain's newest frame and in step again.
        let caught_up = Cursor {
            pos: pos(4),
            last_id: chain.position_id(),
        };
        assert!(matches!(
            chain.next(Some(caught_up), pos(4), t),
            Next::Idle(None)
        ));
        // A frame with CopyRects only suits a viewer exactly at its start.
        assert!(matches!(
            chain.next(Some(fast), pos(6), t),
            Next::Encode(Job::Delta)
        ));
        chain.publish(frame(Kind::Delta, 4, 6, 10, 1), &[], t);
        let ahead = Cursor {
            pos: pos(5),
            last_id: fast.last_id,
        };
        assert!(matches!(chain.next(Some(ahead), pos(6), t), Next::CatchUp));
        assert_eq!(sent(chain.next(Some(fast), pos(6), t)).1.pos, pos(6));
    }

    #[test]
    fn lossy_areas_get_one_shared_refresh_once_the_screen_is_still() {
        let t = Instant::now();
        let mut chain = Chain::new(1 << 20);
        assert!(matches!(
            chain.next(None, pos(1), t),
            Next::Encode(Job::Key)
        ));
        let mut key = frame(Kind::Key, 0, 1, 100, 0);
        key.encoded.rects.push(frame::EncodedRect {
            bytes: bytes::Bytes::new(),
            zrle: false,
            lossy: Some(Rect::full(8, 8)),
        });
        chain.publish(key, &[], t);
        let (_, c) = sent(chain.next(None, pos(1), t));
        // Still too soon: idle until the refresh is due; then one viewer encodes it.
        match chain.next(Some(c), pos(1), t) {
            Next::Idle(Some(at)) => assert_eq!(at, t + LOSSLESS_REFRESH),
            other => panic!("{other:?}"),
        }
        let later = t + LOSSLESS_REFRESH;
        assert!(matches!(
            chain.next(Some(c), pos(1), later),
            Next::Encode(Job::Refresh)
        ));
        chain.publish(frame(Kind::Refresh, 1, 1, 100, 0), &[], later);
        let (r, c2) = sent(chain.next(Some(c), pos(1), later));
        assert_eq!((r.kind, c2.pos), (Kind::Refresh, pos(1)));
        assert!(matches!(
            chain.next(Some(c2), pos(1), later),
            Next::Idle(None)
        ));
    }

    #[test]
    fn a_new_surface_starts_a_new_chain() {
        let t = Instant::now();
        let mut chain = Chain::new(1 << 20);
        assert!(matches!(
            chain.next(None, pos(1), t),
            Next::Encode(Job::Key)
        ));
        chain.publish(frame(Kind::Key, 0, 1, 100, 0), &[], t);
        let (_, c) = sent(chain.next(None, pos(1), t));
        let next_gen = Position {
            generation: 2,
            seq: 3,
        };
        assert!(matches!(
            chain.next(Some(c), next_gen, t),
            Next::Encode(Job::Key)
        ));
        // A frame of the old surface, finished late, is dropped.
        chain.publish(frame(Kind::Key, 0, 1, 100, 0), &[], t);
        assert!(matches!(
            chain.next(Some(c), next_gen, t),
            Next::Encode(Job::Key)
        ));
    }
}
