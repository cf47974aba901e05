//! One H.264 stream per console, shared by every H.264 viewer of it (encode once): a task
//! follows the framebuffer while anyone subscribes, encodes the damage on the blocking pool at
//! most `max_fps` times a second, and broadcasts each picture. A viewer that joins, or that
//! fell behind (it missed pictures, so its decoder's reference is gone), asks for a key frame
//! and skips everything before it; the key frame goes to everybody, which costs the others
//! bytes, not correctness. No subscriber, no task and no encoder memory.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{Notify, broadcast};
use tracing::{debug, warn};

use super::encoder::Encoder;
use crate::framebuffer::{Framebuffer, Rect};

/// Pictures kept for subscribers that are a little behind; older ones are lost (a lagging
/// subscriber then waits for a key frame).
const QUEUE: usize = 8;
/// Key frames asked for by viewers are made at most this often (a viewer that keeps falling
/// behind must not turn everybody's stream into key frames).
const KEY_GAP: Duration = Duration::from_millis(500);

/// One picture of the stream.
#[derive(Debug)]
pub struct Frame {
    pub width: u32,
    pub height: u32,
    /// An IDR covering the whole surface: where a new or lagging viewer starts.
    pub key: bool,
    /// Annex B bytes.
    pub data: Bytes,
    /// The areas that changed (the whole surface for a key frame): a client shows only these
    /// from the decoded picture, so areas refreshed losslessly stay exact.
    pub rects: Vec<Rect>,
    /// Position in the stream (1, 2, ...).
    pub seq: u64,
    /// CPU time the conversion and encoding took.
    pub encode_time: Duration,
}

/// What the stream has done, for logs, metrics and benchmarks.
#[derive(Debug, Default)]
pub struct StreamStats {
    pub frames: AtomicU64,
    pub key_frames: AtomicU64,
    pub bytes: AtomicU64,
    pub encode_ns: AtomicU64,
    pub encoders_made: AtomicU64,
}

struct Inner {
    fb: Framebuffer,
    tx: broadcast::Sender<Arc<Frame>>,
    want_key: AtomicBool,
    wake: Notify,
    /// Whether the encoding task runs (it ends when the last subscriber left).
    running: Mutex<bool>,
    max_fps: f32,
    stats: StreamStats,
}

/// The console's shared H.264 stream (cheap to clone).
#[derive(Clone)]
pub struct Video {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Video {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Video(subscribers: {})", self.inner.tx.receiver_count())
    }
}

impl Video {
    pub fn new(fb: Framebuffer, max_fps: f32) -> Self {
        let (tx, _) = broadcast::channel(QUEUE);
        Self {
            inner: Arc::new(Inner {
                fb,
                tx,
                want_key: AtomicBool::new(false),
                wake: Notify::new(),
                running: Mutex::new(false),
                max_fps: max_fps.clamp(1.0, 60.0),
                stats: StreamStats::default(),
            }),
        }
    }

    /// A new subscriber; it gets pictures from the next key frame on. Must be called inside a
    /// tokio runtime (the encoding task starts there if it is not running).
    pub fn subscribe(&self) -> Subscription {
        let rx = {
            let mut running = self.inner.running.lock().unwrap_or_else(|p| p.into_inner());
            let rx = self.inner.tx.subscribe();
            if !*running {
                *running = true;
                tokio::spawn(run(Arc::clone(&self.inner)));
            }
            rx
        };
        self.ask_key();
        Subscription {
            rx,
            video: self.clone(),
            synced: false,
            last_ask: Instant::now(),
        }
    }

    fn ask_key(&self) {
        self.inner.want_key.store(true, Ordering::Release);
        self.inner.wake.notify_one();
    }

    /// The size of the encoder one more subscriber would start: `None` while the stream runs
    /// (its encoder is shared, joining costs nothing more).
    pub fn encoder_to_start(&self) -> Option<(u32, u32)> {
        (self.subscribers() == 0).then(|| self.inner.fb.size())
    }

    pub fn subscribers(&self) -> usize {
        self.inner.tx.receiver_count()
    }

    pub fn stats(&self) -> &StreamStats {
        &self.inner.stats
    }

    pub fn framebuffer(&self) -> &Framebuffer {
        &self.inner.fb
    }
}

/// One viewer's place in the stream.
pub struct Subscription {
    rx: broadcast::Receiver<Arc<Frame>>,
    video: Video,
    /// Has had a key frame since it joined or last fell behind.
    synced: bool,
    last_ask: Instant,
}

impl Subscription {
    /// The next picture this viewer can decode: from a key frame on, then every picture in
    /// order. `None` once the stream is gone.
    ///
    /// # Cancel safety
    /// Cancel safe (a broadcast receive loses nothing when dropped).
    pub async fn next(&mut self) -> Option<Arc<Frame>> {
        loop {
            match self.rx.recv().await {
                Ok(f) if self.synced || f.key => {
                    self.synced = true;
                    return Some(f);
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    debug!(missed = n, "H.264 viewer fell behind the stream");
                    self.resync();
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// The viewer could not send a picture (its client is behind): skip to the next key frame.
    pub fn resync(&mut self) {
        self.synced = false;
        self.last_ask = Instant::now();
        self.video.ask_key();
    }

    /// Whether the viewer waits for a key frame.
    pub fn synced(&self) -> bool {
        self.synced
    }

    pub fn video(&self) -> &Video {
        &self.video
    }
}

/// Marks the task stopped however it ends (its runtime may shut down under it).
struct Running(Arc<Inner>);

impl Drop for Running {
    fn drop(&mut self) {
        *self.0.running.lock().unwrap_or_else(|p| p.into_inner()) = false;
    }
}

async fn run(inner: Arc<Inner>) {
    let guard = Running(inner);
    let inner = &guard.0;
    let mut viewer = inner.fb.viewer();
    let mut encoder: Option<Encoder> = None;
    let gap = Duration::from_secs_f32(1.0 / inner.max_fps);
    let mut last = Instant::now() - gap;
    let mut last_key = Instant::now() - KEY_GAP;
    let mut seq = 0;
    loop {
        {
            // Under the lock `subscribe` takes: a subscriber either sees the task running or
            // starts a new one.
            let mut running = inner.running.lock().unwrap_or_else(|p| p.into_inner());
            if inner.tx.receiver_count() == 0 {
                *running = false;
                debug!("H.264 stream stopped: no subscriber");
                return;
            }
        }
        let want_key = inner.want_key.load(Ordering::Acquire);
        if !want_key {
            tokio::select! {
                _ = viewer.changed() => {}
                _ = inner.wake.notified() => {}
                // Notice a last subscriber that left while the screen was still.
                _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
            }
        }
        let now = Instant::now();
        let mut next = last + gap;
        if inner.want_key.load(Ordering::Acquire) {
            next = next.max(last_key + KEY_GAP);
        }
        if next > now {
            tokio::time::sleep(next - now).await;
        }
        let damage = viewer.take_damage();
        if !damage.attached || damage.width == 0 || damage.height == 0 {
            // Nothing to show yet (a key frame stays wanted): wait for the display, never spin
            // (the task may share a current-thread runtime with the sessions).
            tokio::select! {
                _ = viewer.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        }
        let key = inner.want_key.swap(false, Ordering::AcqRel);
        let mut rects = damage.rects;
        let (w, h) = (damage.width, damage.height);
        let mut enc = match encoder.take() {
            Some(e) if e.size() == (w, h) => e,
            _ => match Encoder::new(w, h, inner.max_fps) {
                Ok(e) => {
                    inner.stats.encoders_made.fetch_add(1, Ordering::Relaxed);
                    e
                }
                Err(e) => {
                    warn!(error = %e, width = w, height = h, "no H.264 encoder for this size");
                    // Wait for another size.
                    continue;
                }
            },
        };
        let full = key || damage.new_surface || enc.wants_key();
        if full {
            enc.force_key();
            rects = vec![Rect::full(w, h)];
        } else {
            // Clients reject a picture whose regions overlap (FreeRDP aborts its decode).
            rects = disjoint(&rects);
        }
        if rects.is_empty() {
            encoder = Some(enc);
            continue;
        }
        let fb = inner.fb.clone();
        let job = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let out = enc.encode(&fb, &rects);
            (enc, out, rects, started.elapsed())
        });
        let Ok((enc, out, rects, took)) = job.await else {
            warn!("H.264 encoding task failed");
            continue;
        };
        last = Instant::now();
        let coded = match out {
            Ok(Some(c)) => c,
            // The framebuffer changed size under the encoding: start over at the new size.
            Ok(None) => continue,
            Err(e) => {
                warn!(error = %e, "H.264 encoding failed");
                continue;
            }
        };
        encoder = Some(enc);
        if coded.data.is_empty() {
            continue;
        }
        seq += 1;
        let key = coded.key && full;
        if key {
            last_key = last;
            inner.stats.key_frames.fetch_add(1, Ordering::Relaxed);
        }
        let s = &inner.stats;
        s.frames.fetch_add(1, Ordering::Relaxed);
        s.bytes
            .fetch_add(coded.data.len() as u64, Ordering::Relaxed);
        s.encode_ns
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        // No receiver left is noticed at the top of the loop.
        let _ = inner.tx.send(Arc::new(Frame {
            width: w,
            height: h,
            key,
            data: Bytes::from(coded.data),
            rects,
            seq,
            encode_time: took,
        }));
    }
}

/// Most region rectangles one picture carries; more become their bounding box.
const MAX_REGIONS: usize = 64;

/// The area `rects` cover as rectangles that do not overlap: horizontal bands between every
/// top and bottom edge, each band's spans merged, and a span continued from the band above
/// when it is the same.
pub fn disjoint(rects: &[Rect]) -> Vec<Rect> {
    let rects: Vec<Rect> = rects
        .iter()
        .copied()
        .filter(|r| r.w > 0 && r.h > 0)
        .collect();
    let mut edges: Vec<u32> = rects.iter().flat_map(|r| [r.y, r.y + r.h]).collect();
    edges.sort_unstable();
    edges.dedup();
    let mut out: Vec<Rect> = Vec::new();
    // Indices in `out` of the previous band's spans (candidates to extend).
    let mut above: Vec<usize> = Vec::new();
    for band in edges.windows(2) {
        let (y0, y1) = (band[0], band[1]);
        let mut spans: Vec<(u32, u32)> = rects
            .iter()
            .filter(|r| r.y < y1 && r.y + r.h > y0)
            .map(|r| (r.x, r.x + r.w))
            .collect();
        spans.sort_unstable();
        let mut merged: Vec<(u32, u32)> = Vec::with_capacity(spans.len());
        for (a, b) in spans {
            match merged.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        let mut here = Vec::with_capacity(merged.len());
        for (a, b) in merged {
            let same = above.iter().copied().find(|&i| {
                let r = out[i];
                r.x == a && r.x + r.w == b && r.y + r.h == y0
            });
            match same {
                Some(i) => {
                    out[i].h += y1 - y0;
                    here.push(i);
                }
                None => {
                    here.push(out.len());
                    out.push(Rect {
                        x: a,
                        y: y0,
                        w: b - a,
                        h: y1 - y0,
                    });
                }
            }
        }
        above = here;
    }
    if out.len() > MAX_REGIONS {
        return Rect::bounding(&out).into_iter().collect();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pixman::X8R8G8B8;

    fn solid(w: u32, h: u32, px: u32) -> Vec<u8> {
        std::iter::repeat_n(px.to_ne_bytes(), (w * h) as usize)
            .flatten()
            .collect()
    }

    fn overlap(a: &Rect, b: &Rect) -> bool {
        a.x < b.x + b.w && b.x < a.x + a.w && a.y < b.y + b.h && b.y < a.y + a.h
    }

    #[test]
    fn regions_never_overlap_and_cover_the_same_pixels() {
        let r = |x, y, w, h| Rect { x, y, w, h };
        let cases: Vec<Vec<Rect>> = vec![
            vec![r(0, 0, 10, 10), r(5, 5, 10, 10)],
            vec![r(0, 0, 10, 10), r(0, 0, 10, 10)],
            vec![r(0, 0, 100, 2), r(40, 0, 2, 100), r(10, 50, 80, 3)],
            vec![r(3, 3, 1, 1)],
            vec![],
        ];
        for rects in cases {
            let out = disjoint(&rects);
            for (i, a) in out.iter().enumerate() {
                for b in &out[i + 1..] {
                    assert!(!overlap(a, b), "{a:?} overlaps {b:?}");
                }
            }
            for y in 0..110 {
                for x in 0..110 {
                    let inside = |v: &[Rect]| v.iter().any(|q| overlap(q, &r(x, y, 1, 1)));
                    assert_eq!(inside(&rects), inside(&out), "pixel {x},{y} of {rects:?}");
                }
            }
        }
        // Two overlapping squares: three pieces (top, middle band, bottom), not one per row.
        assert_eq!(disjoint(&[r(0, 0, 10, 10), r(5, 5, 10, 10)]).len(), 3);
        assert_eq!(
            disjoint(&[r(0, 0, 10, 10), r(0, 0, 10, 10)]),
            [r(0, 0, 10, 10)]
        );
    }

    async fn next(s: &mut Subscription) -> Arc<Frame> {
        tokio::time::timeout(Duration::from_secs(10), s.next())
            .await
            .expect("a picture in time")
            .expect("stream open")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn viewers_share_one_encoding_and_late_ones_start_at_a_key_frame() {
        let fb = Framebuffer::new();
        fb.scanout(64, 48, 256, X8R8G8B8, &solid(64, 48, 0x0010_2030))
            .expect("scanout");
        let video = Video::new(fb.clone(), 30.0);
        let mut a = video.subscribe();
        let first = next(&mut a).await;
        assert!(first.key);
        assert_eq!(first.rects, [Rect::full(64, 48)]);

        fb.update(0, 0, 8, 8, 32, X8R8G8B8, &solid(8, 8, 0x00ff_ffff), false)
            .expect("update");
        let second = next(&mut a).await;
        assert!(!second.key);
        assert_eq!(
            second.rects,
            [Rect {
                x: 0,
                y: 0,
                w: 8,
                h: 8
            }]
        );

        // A second viewer: a key frame for everybody, then both get the same pictures.
        let mut b = video.subscribe();
        let kb = next(&mut b).await;
        assert!(kb.key);
        let ka = next(&mut a).await;
        assert!(Arc::ptr_eq(&ka, &kb), "one encoding for both");
        fb.update(8, 8, 8, 8, 32, X8R8G8B8, &solid(8, 8, 0), false)
            .expect("update");
        let (pa, pb) = (next(&mut a).await, next(&mut b).await);
        assert!(Arc::ptr_eq(&pa, &pb));
        assert_eq!(video.stats().encoders_made.load(Ordering::Relaxed), 1);
        assert_eq!(video.subscribers(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_size_change_starts_a_new_encoder_with_a_key_frame_and_the_task_ends_unwatched() {
        let fb = Framebuffer::new();
        fb.scanout(32, 32, 128, X8R8G8B8, &solid(32, 32, 1))
            .expect("scanout");
        let video = Video::new(fb.clone(), 30.0);
        let mut a = video.subscribe();
        assert!(next(&mut a).await.key);
        fb.scanout(48, 32, 192, X8R8G8B8, &solid(48, 32, 2))
            .expect("scanout");
        let f = next(&mut a).await;
        assert!(f.key);
        assert_eq!((f.width, f.height), (48, 32));
        drop(a);
        let stopped = async {
            while *video.inner.running.lock().expect("lock") {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), stopped)
            .await
            .expect("the task ends when nobody watches");
    }

    /// With no display yet the task waits instead of spinning: on a current-thread runtime
    /// other tasks still run.
    #[tokio::test(flavor = "current_thread")]
    async fn a_detached_console_does_not_starve_the_runtime() {
        let fb = Framebuffer::new();
        let video = Video::new(fb.clone(), 30.0);
        let _a = video.subscribe();
        let ticks = tokio::spawn(async {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        tokio::time::timeout(Duration::from_secs(5), ticks)
            .await
            .expect("other tasks ran")
            .expect("join");
        fb.scanout(16, 16, 64, X8R8G8B8, &solid(16, 16, 3))
            .expect("scanout");
        let mut b = video.subscribe();
        assert!(next(&mut b).await.key, "pictures once the display is there");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_viewer_that_fell_behind_waits_for_a_key_frame() {
        let fb = Framebuffer::new();
        fb.scanout(32, 32, 128, X8R8G8B8, &solid(32, 32, 1))
            .expect("scanout");
        let video = Video::new(fb.clone(), 60.0);
        let mut a = video.subscribe();
        assert!(next(&mut a).await.key);
        // Pictures the viewer never reads push it out of the queue.
        for i in 0..(QUEUE as u32 + 4) {
            fb.update(0, 0, 4, 4, 16, X8R8G8B8, &solid(4, 4, i), false)
                .expect("update");
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        let f = next(&mut a).await;
        assert!(f.key, "after a lag the first picture is a key frame");
    }
}
