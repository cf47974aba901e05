//! What a viewer has been sent, whatever its protocol. Each viewer counts into its own
//! [`Counters`] and into its front end's total at once, so logs can name one session's traffic
//! and benchmarks and tests read the sum.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Counters of one viewer, or summed over a front end's viewers.
#[derive(Debug, Default)]
pub struct Counters {
    /// Framebuffer updates (VNC) or batches of bitmaps (RDP): the frame rate the client sees.
    pub updates: AtomicU64,
    /// Rectangles (VNC) or bitmaps (RDP) in those updates.
    pub rects: AtomicU64,
    pub jpeg_rects: AtomicU64,
    pub copy_rects: AtomicU64,
    /// Updates that resent lossy areas losslessly once the screen was still.
    pub lossless_refreshes: AtomicU64,
    /// Updates a viewer that fell behind the shared encoding got for itself.
    pub catch_ups: AtomicU64,
    /// H.264 pictures sent (RDP graphics pipeline), how many of them were key frames, how many
    /// were not sent because the client was too far behind, and the (shared) encoding time of
    /// those sent.
    pub h264_frames: AtomicU64,
    pub h264_key_frames: AtomicU64,
    pub h264_dropped: AtomicU64,
    pub h264_encode_ns: AtomicU64,
    /// Bytes written to and read from the client (after TLS).
    pub bytes_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub input_events: AtomicU64,
    /// Input events dropped because the session's queue was full.
    pub input_dropped: AtomicU64,
    /// PCM bytes of guest sound handed to the client, and their size on the wire.
    pub audio_bytes: AtomicU64,
    pub audio_wire_bytes: AtomicU64,
    /// Sound dropped because the client had stopped reading.
    pub audio_dropped: AtomicU64,
    /// How long guest sound waited in this server before it was written.
    pub audio_wait: AudioWait,
}

impl Counters {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// One viewer's counters and its front end's total, bumped together.
#[derive(Debug, Clone)]
pub struct ViewerStats {
    own: Arc<Counters>,
    total: Arc<Counters>,
}

impl ViewerStats {
    pub fn new(total: &Arc<Counters>) -> Self {
        Self {
            own: Arc::default(),
            total: Arc::clone(total),
        }
    }

    /// Adds `n` to the counter `pick` selects, in this viewer's counters and the total.
    pub fn add(&self, pick: impl Fn(&Counters) -> &AtomicU64, n: u64) {
        if n > 0 {
            pick(&self.own).fetch_add(n, Ordering::Relaxed);
            pick(&self.total).fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Records sound that arrived from QEMU at `since` and is being written now.
    pub fn audio_sent(&self, since: Instant) {
        self.own.audio_wait.record(since);
        self.total.audio_wait.record(since);
    }

    /// This viewer's own counters.
    pub fn own(&self) -> &Counters {
        &self.own
    }
}

/// How long guest sound waits in our server between QEMU's `Write` and the socket: the
/// latency we add. Summed over every chunk or wave a server sends.
#[derive(Debug, Default)]
pub struct AudioWait {
    total_us: AtomicU64,
    count: AtomicU64,
    max_us: AtomicU64,
}

impl AudioWait {
    /// Records sound that arrived from QEMU at `since` and is being written now.
    pub fn record(&self, since: Instant) {
        let us = since.elapsed().as_micros().min(u128::from(u64::MAX)) as u64;
        self.total_us.fetch_add(us, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.max_us.fetch_max(us, Ordering::Relaxed);
    }

    /// (mean, max) in milliseconds, and how many sends they cover.
    pub fn summary(&self) -> (f64, f64, u64) {
        let n = self.count.load(Ordering::Relaxed);
        let total = self.total_us.load(Ordering::Relaxed) as f64;
        let mean = if n == 0 {
            0.0
        } else {
            total / n as f64 / 1000.0
        };
        (mean, self.max_us.load(Ordering::Relaxed) as f64 / 1000.0, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn viewers_count_into_their_own_and_the_total() {
        let total = Arc::new(Counters::default());
        let a = ViewerStats::new(&total);
        let b = ViewerStats::new(&total);
        a.add(|c| &c.updates, 2);
        b.add(|c| &c.updates, 3);
        b.add(|c| &c.bytes_out, 0);
        assert_eq!(Counters::get(&a.own().updates), 2);
        assert_eq!(Counters::get(&b.own().updates), 3);
        assert_eq!(Counters::get(&total.updates), 5);
        a.audio_sent(Instant::now());
        assert_eq!(total.audio_wait.summary().2, 1);
    }
}
