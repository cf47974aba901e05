//! Admission under the memory limit. A sidecar in a 64M cgroup must never be OOM-killed (the
//! desktop would vanish for everyone), so a new viewer is refused, with a reason its client
//! shows, when what the cgroup uses plus what that viewer will cost would come too close to the
//! limit. Without a limit nobody is refused here (the listeners' own caps still apply).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::cgroup::Limits;

/// Admissions this recent are counted on top of the measured use: their memory may not be
/// allocated yet (50 viewers connecting at once must not all pass the same measurement).
const SETTLE: Duration = Duration::from_secs(5);

/// Why a viewer was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the desktop is at its memory limit ({used_mb} of {limit_mb} MB in use); try again later")]
pub struct Refused {
    pub used_mb: u64,
    pub limit_mb: u64,
}

/// The process's resource budget, shared by every listener.
#[derive(Debug)]
pub struct Budget {
    pub limits: Limits,
    /// Memory kept free below the limit (allocator slack, the kernel's share, dbus-daemon).
    headroom: u64,
    /// Recent admissions: when, their estimate, and the usage measured then.
    recent: Mutex<VecDeque<(Instant, u64, u64)>>,
    refused: std::sync::atomic::AtomicU64,
}

impl Budget {
    pub fn new(limits: Limits) -> Arc<Self> {
        let headroom = limits.memory.map_or(0, |m| (m / 8).max(6 << 20));
        Arc::new(Self {
            limits,
            headroom,
            recent: Mutex::new(VecDeque::new()),
            refused: Default::default(),
        })
    }

    /// No limits (tests, and machines without cgroups).
    pub fn unlimited() -> Arc<Self> {
        Self::new(Limits::none())
    }

    /// The limits of this process's cgroup, logged.
    pub fn detect() -> Arc<Self> {
        let limits = Limits::detect();
        info!(
            memory_limit = ?limits.memory,
            cpu_limit = ?limits.cpus,
            cgroup = ?limits.version,
            encoder_threads = limits.workers(),
            "resource limits"
        );
        Self::new(limits)
    }

    /// Viewers refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Memory in use now: the cgroup's working set, or this process's RSS.
    pub fn usage(&self) -> u64 {
        self.limits.memory_usage().unwrap_or_else(rss)
    }

    /// Whether a viewer expected to cost `estimate` bytes would be admitted now (nothing is
    /// reserved).
    pub fn check(&self, estimate: u64) -> Result<(), Refused> {
        self.decide(estimate, false)
    }

    /// Admits a viewer expected to cost `estimate` bytes, or says why not.
    pub fn admit(&self, estimate: u64) -> Result<(), Refused> {
        self.decide(estimate, true)
    }

    /// Reserves `estimate` bytes for something viewers share (an H.264 encoder), like
    /// [`Self::admit`], but a refusal is not a refused viewer: the viewer stays, served another
    /// way.
    pub fn reserve_shared(&self, estimate: u64) -> Result<(), Refused> {
        if self.limits.memory.is_none() {
            return Ok(());
        }
        self.decide_for(
            self.usage(),
            estimate,
            true,
            Instant::now(),
            "shared encoder",
        )
    }

    /// Whether one more subscriber may join the console's H.264 stream: free while it runs,
    /// otherwise the encoder it would start must fit (reserved, see [`Self::reserve_shared`]).
    pub fn reserve_encoder(&self, video: &crate::h264::Video) -> Result<(), Refused> {
        match video.encoder_to_start() {
            None => Ok(()),
            Some((w, h)) => self.reserve_shared(crate::h264::encoder::memory_cost(w, h)),
        }
    }

    /// A budget of `memory` bytes whatever the cgroup says (tests, and what-ifs).
    pub fn with_memory_limit(memory: u64) -> Arc<Self> {
        let mut limits = Limits::none();
        limits.memory = Some(memory);
        Self::new(limits)
    }

    fn decide(&self, estimate: u64, reserve: bool) -> Result<(), Refused> {
        if self.limits.memory.is_none() {
            return Ok(());
        }
        self.decide_at(self.usage(), estimate, reserve, Instant::now())
    }

    /// [`Self::decide`] with the usage measured now.
    fn decide_at(
        &self,
        used: u64,
        estimate: u64,
        reserve: bool,
        now: Instant,
    ) -> Result<(), Refused> {
        self.decide_for(used, estimate, reserve, now, "viewer")
    }

    /// The decision for a viewer or for something viewers share (`what`); only viewers count
    /// as refused.
    fn decide_for(
        &self,
        used: u64,
        estimate: u64,
        reserve: bool,
        now: Instant,
        what: &'static str,
    ) -> Result<(), Refused> {
        let Some(limit) = self.limits.memory else {
            return Ok(());
        };
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        while recent
            .front()
            .is_some_and(|(t, _, _)| now.duration_since(*t) > SETTLE)
        {
            recent.pop_front();
        }
        // What recent viewers will still allocate: their estimates, less the growth measured
        // since the first of them was admitted (that part is in `used` already).
        let estimated: u64 = recent.iter().map(|(_, b, _)| b).sum();
        let grown = recent
            .iter()
            .map(|(_, _, at)| *at)
            .min()
            .map_or(0, |at| used.saturating_sub(at));
        let pending = estimated.saturating_sub(grown);
        if used + pending + estimate + self.headroom > limit {
            if what == "viewer" {
                self.refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            warn!(
                used,
                pending, estimate, limit, what, "refused: memory limit"
            );
            return Err(Refused {
                used_mb: (used + pending) >> 20,
                limit_mb: limit >> 20,
            });
        }
        if reserve {
            recent.push_back((now, estimate, used));
        }
        Ok(())
    }

    /// Bytes of encoded frames a shared encoding may keep: a fraction of what the limit leaves.
    pub fn frame_bytes(&self, default: usize) -> usize {
        match self.limits.memory {
            Some(limit) => usize::try_from(limit / 8)
                .unwrap_or(default)
                .min(default)
                .max(1 << 20),
            None => default,
        }
    }
}

/// This process's resident set, from `/proc/self/statm` (0 if unreadable).
pub fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// What one viewer is expected to cost at a `width`x`height` surface: its connection and
/// session (buffers, TLS), row hashes, and its share of what catch-up encodes hold. Frames are
/// shared (encode once), so this stays well above what a viewer was measured to add — about
/// 0.1 MB at 1080p under 200m/64M (`cargo bench --bench compare -- --budget-only`: 22.7 MB peak
/// with one Tight viewer, 23.6 MB with eight) — and 16 viewers of a 1080p console fit the budget.
pub fn vnc_viewer_cost(width: u32, height: u32) -> u64 {
    (1 << 20) + u64::from(width) * u64::from(height) / 4
}

/// An RDP session keeps its own copy of the screen and RemoteFX buffers (ironrdp-server).
pub fn rdp_viewer_cost(width: u32, height: u32) -> u64 {
    (4 << 20) + 3 * 4 * u64::from(width) * u64::from(height)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limited(memory: u64) -> Arc<Budget> {
        let mut limits = Limits::none();
        limits.memory = Some(memory);
        Budget::new(limits)
    }

    #[test]
    fn memory_recent_viewers_already_use_is_not_counted_twice() {
        const MB: u64 = 1 << 20;
        let b = limited(100 * MB); // 12.5 MB kept free
        let t = Instant::now();
        assert!(b.decide_at(10 * MB, 20 * MB, true, t).is_ok());
        assert!(b.decide_at(10 * MB, 20 * MB, true, t).is_ok());
        // They have allocated 30 of their 40 MB: 10 are still to come, not 40.
        assert!(b.decide_at(40 * MB, 20 * MB, true, t).is_ok());
        // Now 40 + 10 + 20 (still pending) + 20 + 12.5 is over.
        assert!(b.decide_at(40 * MB, 20 * MB, true, t).is_err());
        // Once they have settled only the measured use counts.
        assert!(b.decide_at(60 * MB, 20 * MB, true, t + SETTLE * 2).is_ok());
    }

    #[test]
    fn sixteen_vnc_viewers_of_a_1080p_console_fit_the_sidecar_budget() {
        // KubeVirt's 64,000,000 bytes, ~24 MB in use with the first viewers (the budget rows'
        // peak), sixteen joining at once.
        let b = limited(64_000_000);
        let t = Instant::now();
        for i in 0..16 {
            let r = b.decide_at(24 << 20, vnc_viewer_cost(1920, 1080), true, t);
            assert!(r.is_ok(), "viewer {i} refused: {r:?}");
        }
        // The estimates still count: a burst that would cross the limit is refused.
        let more = (0..16)
            .filter(|_| {
                b.decide_at(24 << 20, vnc_viewer_cost(1920, 1080), true, t)
                    .is_ok()
            })
            .count();
        assert!(more < 16, "{more} more admitted at once");
    }

    #[test]
    fn a_shared_encoder_that_does_not_fit_is_not_a_refused_viewer() {
        let b = limited(64 << 20);
        let t = Instant::now();
        let cost = crate::h264::encoder::memory_cost(1920, 1080);
        assert!(
            b.decide_for(20 << 20, cost, true, t, "shared encoder")
                .is_err(),
            "a 1080p encoder does not fit next to 20 MB in 64 MB"
        );
        assert_eq!(b.refused(), 0);
        assert!(
            b.decide_for(
                20 << 20,
                crate::h264::encoder::memory_cost(800, 600),
                true,
                t,
                "shared encoder"
            )
            .is_ok()
        );
    }

    #[test]
    fn no_limit_admits_everyone() {
        let b = Budget::unlimited();
        for _ in 0..1000 {
            assert!(b.admit(1 << 30).is_ok());
        }
    }

    #[test]
    fn a_burst_of_viewers_is_counted_before_it_allocates() {
        // A limit just above what this test process uses: a few small viewers fit, a burst of
        // them does not, and the refusal says why.
        let used = rss();
        let b = limited(used + (64 << 20));
        let mut admitted = 0;
        let mut refused = None;
        for _ in 0..100 {
            match b.admit(4 << 20) {
                Ok(()) => admitted += 1,
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
        }
        assert!((5..16).contains(&admitted), "{admitted} admitted");
        let e = refused.expect("refused");
        assert!(e.to_string().contains("memory limit"), "{e}");
        assert_eq!(b.refused(), 1);
        assert!(b.frame_bytes(12 << 20) <= 12 << 20);
    }
}
