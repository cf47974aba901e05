//! Open H.264 (RFB encoding 50) for viewers that decode it — noVNC ≥ 1.6 where the browser has
//! WebCodecs H.264. noVNC lists it before Tight, so the server chooses: while the screen changes
//! like video (a large part of it, several updates in a row) the viewer gets the console's
//! shared H.264 stream (`crate::h264`, encoded once for every H.264 viewer of any protocol);
//! once it calms down the viewer goes back to Tight with a complete update, whose JPEG parts the
//! lossless refresh later makes exact. Text and still screens therefore never stay lossy.
//!
//! noVNC keys a decoder by the rectangle and draws the whole decoded picture into it, so every
//! H.264 rectangle is the whole screen; the first one after (re)joining the stream carries the
//! reset-context flag, and the stream starts every subscription at a key frame.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::h264::{Frame, Subscription, Video};
use crate::session::budget::Budget;
use tracing::warn;

/// The encoding number (RFB community registry: Open H.264).
pub const ENCODING: i32 = 50;
/// Flags word: forget the decoder of this rectangle before decoding.
const RESET_CONTEXT: u32 = 1;

/// An update counts as video-like when it changes at least 1/`LARGE` of the screen.
const LARGE: u64 = 8;
/// Video-like updates in a row, each within [`GAP`] of the previous, that switch to H.264.
const ENTER_RUN: u32 = 5;
const GAP: Duration = Duration::from_millis(250);
/// Back to Tight after this long without a video-like picture.
const CALM: Duration = Duration::from_millis(600);

/// What the H.264 side of a viewer does next.
#[derive(Debug)]
pub enum Next {
    Picture(Arc<Frame>),
    /// The screen calmed down: leave H.264.
    Calm,
}

/// One viewer's choice between Tight and the shared H.264 stream.
#[derive(Default)]
pub struct VideoMode {
    /// Video-like Tight updates in a row, and when the last update went out.
    run: u32,
    last: Option<Instant>,
    sub: Option<Subscription>,
    /// The next rectangle resets the client's decoder.
    reset: bool,
    /// When the last video-like picture came.
    large_at: Option<Instant>,
    /// H.264 did not fit the memory limit: Tight until then.
    refused_until: Option<Instant>,
}

/// How long a viewer that H.264 did not fit for stays on Tight before it is tried again.
const RETRY: Duration = Duration::from_secs(30);

fn large(changed: u64, screen: u64) -> bool {
    screen > 0 && changed.saturating_mul(LARGE) >= screen
}

fn area(rects: &[crate::framebuffer::Rect]) -> u64 {
    rects.iter().map(|r| u64::from(r.w) * u64::from(r.h)).sum()
}

impl VideoMode {
    pub fn active(&self) -> bool {
        self.sub.is_some()
    }

    /// A Tight update that changed `damage` of a `screen`-pixel surface went out at `now`:
    /// whether the screen now looks like video.
    pub fn observe(
        &mut self,
        damage: &[crate::framebuffer::Rect],
        screen: u64,
        now: Instant,
    ) -> bool {
        let close = self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) <= GAP);
        self.run = match (large(area(damage), screen), close) {
            (true, true) => self.run + 1,
            (true, false) => 1,
            (false, _) => 0,
        };
        self.last = Some(now);
        self.run >= ENTER_RUN
    }

    /// Joins the console's stream (the first picture will be a key frame), unless its encoder
    /// does not fit `budget`'s memory limit: then Tight goes on and joining is tried again
    /// after [`RETRY`]. Whether it joined.
    pub fn start(&mut self, video: &Video, budget: &Budget) -> bool {
        let now = Instant::now();
        self.run = 0;
        if self.refused_until.is_some_and(|t| now < t) {
            return false;
        }
        if let Err(e) = budget.reserve_encoder(video) {
            warn!(error = %e, "H.264 does not fit the memory limit: Tight for now");
            self.refused_until = Some(now + RETRY);
            return false;
        }
        self.refused_until = None;
        self.sub = Some(video.subscribe());
        self.reset = true;
        self.large_at = Some(now);
        true
    }

    /// Leaves the stream (its encoder stops when nobody else needs it).
    pub fn stop(&mut self) {
        self.sub = None;
        self.run = 0;
        self.last = None;
    }

    /// The next picture to send, or [`Next::Calm`] when the screen stopped looking like video.
    /// Pending forever while not active.
    pub async fn next(&mut self) -> Next {
        let Some(sub) = self.sub.as_mut() else {
            return std::future::pending().await;
        };
        let since = self.large_at.map_or(CALM, |t| t.elapsed());
        let Some(left) = CALM.checked_sub(since) else {
            return Next::Calm;
        };
        match tokio::time::timeout(left, sub.next()).await {
            Ok(Some(f)) => {
                if large(area(&f.rects), u64::from(f.width) * u64::from(f.height)) && !f.key {
                    self.large_at = Some(Instant::now());
                }
                if !sub.synced() {
                    self.reset = true;
                }
                Next::Picture(f)
            }
            Ok(None) | Err(_) => Next::Calm,
        }
    }

    /// The client could not take a picture in time: skip to the next key frame.
    pub fn resync(&mut self) {
        if let Some(s) = self.sub.as_mut() {
            s.resync();
            self.reset = true;
        }
    }

    /// The rectangle header for `f` (the whole screen, encoding 50, length, flags); its
    /// Annex B bytes follow it on the wire.
    pub fn header(&mut self, f: &Frame, out: &mut Vec<u8>) {
        for v in [0, 0, f.width, f.height] {
            out.extend_from_slice(&u16::try_from(v).unwrap_or(u16::MAX).to_be_bytes());
        }
        out.extend_from_slice(&ENCODING.to_be_bytes());
        let len = u32::try_from(f.data.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        let flags = if std::mem::take(&mut self.reset) {
            RESET_CONTEXT
        } else {
            0
        };
        out.extend_from_slice(&flags.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framebuffer::{Framebuffer, Rect};
    use crate::pixman::X8R8G8B8;

    fn band(h: u32) -> Vec<Rect> {
        vec![Rect {
            x: 0,
            y: 0,
            w: 640,
            h,
        }]
    }

    #[test]
    fn only_a_run_of_large_close_updates_looks_like_video() {
        let mut m = VideoMode::default();
        let screen = 640 * 480;
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        for i in 0..4 {
            assert!(!m.observe(&band(60), screen, at(i * 40)), "update {i}");
        }
        assert!(
            m.observe(&band(60), screen, at(160)),
            "the fifth large update"
        );
        // Small changes (typing) never do.
        let mut m = VideoMode::default();
        assert!((0..50).all(|i| !m.observe(&band(16), screen, at(i * 20))));
        // Large changes far apart (a slide show) neither.
        let mut m = VideoMode::default();
        assert!((0..20).all(|i| !m.observe(&band(480), screen, at(i * 400))));
        // A small one breaks the run.
        let mut m = VideoMode::default();
        for i in 0..4 {
            m.observe(&band(480), screen, at(i * 30));
        }
        assert!(!m.observe(&band(4), screen, at(130)));
        assert!(!m.observe(&band(480), screen, at(160)));
    }

    #[tokio::test]
    async fn no_h264_when_its_encoder_does_not_fit_the_memory_limit() {
        let fb = Framebuffer::new();
        let px = vec![0x40u8; 1920 * 1080 * 4];
        fb.scanout(1920, 1080, 1920 * 4, X8R8G8B8, &px)
            .expect("scanout");
        let video = Video::new(fb, 30.0);
        // Less than this process already uses: nothing fits.
        let budget = Budget::with_memory_limit(1 << 20);
        let mut m = VideoMode::default();
        assert!(!m.start(&video, &budget));
        assert!(!m.active());
        assert_eq!(video.subscribers(), 0, "no encoder started");
        assert_eq!(budget.refused(), 0, "the viewer itself was not refused");
        // Not tried again at once.
        assert!(!m.start(&video, &Budget::unlimited()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pictures_come_with_a_reset_first_and_calm_ends_the_mode() {
        let fb = Framebuffer::new();
        let px = vec![0x40u8; 64 * 48 * 4];
        fb.scanout(64, 48, 256, X8R8G8B8, &px).expect("scanout");
        let video = Video::new(fb.clone(), 30.0);
        let mut m = VideoMode::default();
        assert!(!m.active());
        assert!(m.start(&video, &Budget::unlimited()));
        let Next::Picture(f) = m.next().await else {
            panic!("a picture first")
        };
        assert!(f.key);
        let mut out = Vec::new();
        m.header(&f, &mut out);
        assert_eq!(out[..8], [0, 0, 0, 0, 0, 64, 0, 48]);
        assert_eq!(
            i32::from_be_bytes(out[8..12].try_into().expect("4")),
            ENCODING
        );
        assert_eq!(
            u32::from_be_bytes(out[12..16].try_into().expect("4")) as usize,
            f.data.len()
        );
        assert_eq!(out[16..20], RESET_CONTEXT.to_be_bytes(), "first one resets");
        out.clear();
        m.header(&f, &mut out);
        assert_eq!(out[16..20], [0; 4], "later ones do not");
        // Nothing moves: calm within CALM (and a bit).
        let t = Instant::now();
        let calm = tokio::time::timeout(CALM * 3, async {
            loop {
                if let Next::Calm = m.next().await {
                    break;
                }
            }
        })
        .await;
        assert!(calm.is_ok(), "calm after {:?}", t.elapsed());
        m.stop();
        assert!(!m.active());
        assert_eq!(video.subscribers(), 0);
    }
}
