//! The guest's microphone: QEMU's `org.qemu.Display1.AudioInListener`. Viewers (RDP's
//! AUDIO_INPUT channel) push PCM in their own format; it is converted to the format QEMU
//! announced in `Init` and kept in a short ring that `Read` drains. `Read` is a synchronous call
//! from QEMU's audio timer, so it answers at once. While a viewer is streaming, it returns only
//! the sound there is (QEMU takes short reads; the guest's capture then follows the viewer's
//! clock instead of hearing gaps of made-up silence); with no viewer streaming it returns
//! silence, so recording apps in the guest still run. The ring keeps at most
//! [`MAX_BUFFERED_MS`] so a bursty client cannot build up delay.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::pcm::{Converter, PcmFormat, Volume};

pub const IN_LISTENER_PATH: &str = "/org/qemu/Display1/AudioInListener";
/// Most sound kept for the guest; older samples are dropped first.
pub const MAX_BUFFERED_MS: u32 = 200;
/// A viewer that pushed nothing for this long is no longer streaming: silence from then on.
const STREAM_IDLE: Duration = Duration::from_millis(250);
/// Largest single `Read` answered (QEMU asks for one timer period, a few KiB).
const MAX_READ: u64 = 1 << 20;

#[derive(Default)]
struct Mic {
    /// QEMU's capture format, once `Init` said it.
    format: Option<PcmFormat>,
    enabled: bool,
    /// The viewer whose microphone the guest hears, and when it last pushed sound. One at a
    /// time: two interleaved microphones would be noise. Another may take over once the
    /// current one has been silent for [`STREAM_IDLE`].
    speaker: Option<u64>,
    last_push: Option<Instant>,
    /// The guest's capture gain: QEMU's D-Bus backend leaves it to us, as for playback.
    volume: Volume,
    ring: VecDeque<u8>,
    /// Sound pushed and sound dropped because the ring was full, in bytes of QEMU's format.
    pushed: u64,
    dropped: u64,
    underruns: u64,
    converter: Converter,
}

/// The microphone path shared by the QEMU listener and the viewers; cheap to clone.
#[derive(Clone, Default)]
pub struct MicHub {
    inner: Arc<Mutex<Mic>>,
}

impl MicHub {
    fn lock(&self) -> MutexGuard<'_, Mic> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes of sound pushed and dropped so far (QEMU's format), and reads answered short
    /// because the guest read faster than the viewer's sound came.
    pub fn counters(&self) -> (u64, u64, u64) {
        let m = self.lock();
        (m.pushed, m.dropped, m.underruns)
    }

    /// Sound from `viewer` (any id unique among viewers) in `src`; converted to QEMU's capture
    /// format, or dropped when the guest is not capturing (so it never hears stale sound when
    /// it starts).
    pub fn push(&self, viewer: u64, src: &PcmFormat, data: &[u8]) {
        let mut m = self.lock();
        let idle = m.last_push.is_none_or(|t| t.elapsed() >= STREAM_IDLE);
        if m.speaker != Some(viewer) {
            if !idle {
                return;
            }
            debug!(viewer, "microphone: this viewer now speaks to the guest");
            m.speaker = Some(viewer);
            m.ring.clear();
        }
        let Some(qemu) = m.format.filter(|_| m.enabled) else {
            return;
        };
        let Some(dst) = qemu.as_target() else {
            return;
        };
        let m = &mut *m;
        m.last_push = Some(Instant::now());
        let pcm = m.converter.convert(src, data, &dst);
        m.pushed += pcm.len() as u64;
        m.ring.extend(pcm);
        let frame = qemu.bytes_per_frame();
        let cap = (qemu.freq * MAX_BUFFERED_MS / 1000) as usize * frame;
        if m.ring.len() > cap {
            // Keep whole frames: drop a multiple of the frame size.
            let excess = (m.ring.len() - cap).div_ceil(frame) * frame;
            m.ring.drain(..excess.min(m.ring.len()));
            m.dropped += excess as u64;
        }
    }

    /// Up to `size` bytes for QEMU: the buffered sound; padded with silence only when no viewer
    /// is streaming.
    fn read(&self, size: u64) -> Vec<u8> {
        let mut m = self.lock();
        let Some(f) = m.format else {
            return Vec::new();
        };
        let frame = f.bytes_per_frame();
        let size = (size.min(MAX_READ) as usize) / frame * frame;
        let take = m.ring.len().min(size) / frame * frame;
        let mut out: Vec<u8> = m.ring.drain(..take).collect();
        f.apply_volume(&mut out, m.volume);
        if m.last_push.is_some_and(|t| t.elapsed() < STREAM_IDLE) {
            if take < size {
                m.underruns += 1;
            }
            return out;
        }
        let start = out.len() / usize::from(f.bits / 8);
        out.resize(size, 0);
        if !f.signed && !f.float {
            // Unsigned silence is the midpoint, not zero bytes.
            for i in start..size / usize::from(f.bits / 8) {
                f.put(&mut out, i, 0.0);
            }
        }
        out
    }
}

/// Our `org.qemu.Display1.AudioInListener` object.
pub struct AudioInListener {
    hub: MicHub,
    stream: Option<u64>,
}

impl AudioInListener {
    pub fn new(hub: MicHub) -> Self {
        Self { hub, stream: None }
    }
}

#[zbus::interface(name = "org.qemu.Display1.AudioInListener", spawn = false)]
impl AudioInListener {
    #[allow(clippy::too_many_arguments)]
    fn init(
        &mut self,
        id: u64,
        bits: u8,
        is_signed: bool,
        is_float: bool,
        freq: u32,
        nchannels: u8,
        _bytes_per_frame: u32,
        _bytes_per_second: u32,
        be: bool,
    ) {
        let f = PcmFormat::from_qemu_init(bits, is_signed, is_float, freq, nchannels, be);
        if f.as_target().is_none() {
            warn!(id, ?f, "microphone stream refused: unsupported format");
            return;
        }
        info!(id, ?f, "microphone stream");
        self.stream = Some(id);
        let mut m = self.hub.lock();
        m.format = Some(f);
        m.ring.clear();
    }

    fn fini(&mut self, id: u64) {
        if self.stream == Some(id) {
            self.stream = None;
            let mut m = self.hub.lock();
            m.format = None;
            m.enabled = false;
            m.ring.clear();
        }
    }

    fn set_enabled(&mut self, id: u64, enabled: bool) {
        if self.stream == Some(id) {
            debug!(id, enabled, "microphone stream enabled");
            let mut m = self.hub.lock();
            m.enabled = enabled;
            if !enabled {
                m.ring.clear();
            }
        }
    }

    fn set_volume(&mut self, id: u64, mute: bool, volume: serde_bytes::ByteBuf) {
        debug!(id, mute, volume = ?volume.as_ref(), "microphone volume");
        if self.stream == Some(id) {
            self.hub.lock().volume = Volume::from_qemu(mute, &volume);
        }
    }

    fn read(&mut self, id: u64, size: u64) -> serde_bytes::ByteBuf {
        if self.stream != Some(id) {
            return serde_bytes::ByteBuf::new();
        }
        serde_bytes::ByteBuf::from(self.hub.read(size))
    }

    #[zbus(property)]
    fn interfaces(&self) -> Vec<String> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S16: PcmFormat = PcmFormat::S16_STEREO_48K;

    fn hub_with(f: PcmFormat) -> MicHub {
        let hub = MicHub::default();
        hub.lock().format = Some(f);
        hub.lock().enabled = true;
        hub
    }

    #[test]
    fn reads_are_sound_then_silence_and_frame_aligned() {
        let hub = hub_with(S16);
        assert_eq!(hub.read(10), vec![0; 8], "no viewer: silence, whole frames");
        hub.push(1, &S16, &[1, 0, 2, 0, 3, 0, 4, 0]);
        assert_eq!(
            hub.read(12),
            vec![1, 0, 2, 0, 3, 0, 4, 0],
            "a streaming viewer: only its sound, never made-up silence"
        );
        assert_eq!(hub.read(8), Vec::<u8>::new());
        assert_eq!(hub.counters().2, 2, "two short reads");
        hub.push(2, &S16, &[7; 8]);
        assert_eq!(
            hub.read(8),
            Vec::<u8>::new(),
            "a second microphone is not mixed in"
        );
        hub.lock().last_push = Instant::now().checked_sub(STREAM_IDLE * 2);
        assert_eq!(hub.read(8), vec![0; 8], "the viewer stopped: silence again");
        hub.push(2, &S16, &[7; 8]);
        assert_eq!(hub.read(8), vec![7; 8], "then another viewer may speak");
        let u8m = hub_with(PcmFormat {
            bits: 8,
            signed: false,
            channels: 1,
            ..S16
        });
        assert_eq!(
            u8m.read(3),
            vec![0x80; 3],
            "unsigned silence is the midpoint"
        );
    }

    #[test]
    fn the_ring_keeps_only_the_newest_sound() {
        let hub = hub_with(S16);
        let second = vec![0x11u8; 48000 * 4];
        hub.push(1, &S16, &second);
        let (pushed, dropped, _) = hub.counters();
        assert_eq!(pushed, 192_000);
        assert_eq!(dropped, 192_000 - 48 * 4 * MAX_BUFFERED_MS as u64);
        assert_eq!(hub.lock().ring.len(), 48 * 4 * MAX_BUFFERED_MS as usize);
    }

    #[test]
    fn viewer_sound_is_converted_to_the_guest_format() {
        let mono22 = PcmFormat {
            channels: 1,
            freq: 22050,
            ..S16
        };
        let hub = hub_with(S16);
        hub.push(1, &mono22, &vec![0u8; 22050 * 2 / 10]);
        let len = hub.lock().ring.len();
        assert!(
            (19_100..=19_300).contains(&len),
            "100 ms at 48 kHz stereo: {len}"
        );
        let nothing = MicHub::default();
        nothing.push(1, &S16, &[0; 8]);
        assert_eq!(nothing.counters(), (0, 0, 0), "no guest stream: dropped");
    }
}
