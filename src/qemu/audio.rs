//! Guest sound from QEMU's `org.qemu.Display1.AudioOutListener`: per-stream format from `Init`,
//! PCM from `Write`, fanned out to every interested viewer through a bounded broadcast (a slow
//! viewer loses audio; QEMU is never blocked). Handlers only copy and return.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use serde_bytes::ByteBuf;
use tokio::sync::broadcast;
use tracing::{debug, info, warn};

pub const OUT_LISTENER_PATH: &str = "/org/qemu/Display1/AudioOutListener";
pub const AUDIO_PATH: &str = "/org/qemu/Display1/Audio";
/// Chunks buffered per viewer (QEMU writes ~10 ms chunks: about 2.5 s).
const BACKLOG: usize = 256;
/// Largest Write accepted (QEMU's are a few KiB).
const MAX_WRITE: usize = 1 << 20;

/// A PCM stream's sample format, as `Init` announced it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PcmFormat {
    pub bits: u8,
    pub signed: bool,
    pub float: bool,
    pub freq: u32,
    pub channels: u8,
    pub big_endian: bool,
}

impl PcmFormat {
    /// What the domain rewrite asks QEMU for: 48 kHz, 2 channels, s16 little-endian.
    pub const S16_STEREO_48K: PcmFormat = PcmFormat {
        bits: 16,
        signed: true,
        float: false,
        freq: 48000,
        channels: 2,
        big_endian: false,
    };

    pub fn bytes_per_frame(&self) -> usize {
        usize::from(self.bits / 8) * usize::from(self.channels)
    }

    fn valid(&self) -> bool {
        matches!(self.bits, 8 | 16 | 32)
            && (1..=8).contains(&self.channels)
            && (4000..=192_000).contains(&self.freq)
            && !(self.float && self.bits != 32)
    }

    /// Sample `i` (frame-major) as a float in -1..1.
    pub fn sample(&self, data: &[u8], i: usize) -> f32 {
        let b = usize::from(self.bits / 8);
        let s = &data[i * b..i * b + b];
        let raw = |bytes: [u8; 4]| {
            if self.big_endian {
                u32::from_be_bytes(bytes)
            } else {
                u32::from_le_bytes(bytes)
            }
        };
        match (self.bits, self.float, self.signed) {
            (8, _, true) => f32::from(s[0] as i8) / 128.0,
            (8, _, false) => (f32::from(s[0]) - 128.0) / 128.0,
            (16, _, signed) => {
                let v = if self.big_endian {
                    u16::from_be_bytes([s[0], s[1]])
                } else {
                    u16::from_le_bytes([s[0], s[1]])
                };
                if signed {
                    f32::from(v as i16) / 32768.0
                } else {
                    (f32::from(v) - 32768.0) / 32768.0
                }
            }
            (_, true, _) => f32::from_bits(raw([s[0], s[1], s[2], s[3]])),
            (_, false, true) => raw([s[0], s[1], s[2], s[3]]) as i32 as f32 / 2_147_483_648.0,
            (_, false, false) => {
                (raw([s[0], s[1], s[2], s[3]]) as f32 - 2_147_483_648.0) / 2_147_483_648.0
            }
        }
    }
}

impl PcmFormat {
    /// Writes `v` (-1..1) as sample `i`, the inverse of [`PcmFormat::sample`].
    pub fn put(&self, data: &mut [u8], i: usize, v: f32) {
        let b = usize::from(self.bits / 8);
        let v = f64::from(v.clamp(-1.0, 1.0));
        let raw: u32 = if self.float {
            (v as f32).to_bits()
        } else {
            let full = (1u64 << (self.bits - 1)) as f64;
            let s = (v * (full - 1.0)).round() as i64;
            (if self.signed { s } else { s + full as i64 }) as u32
        };
        let s = &mut data[i * b..i * b + b];
        if self.big_endian {
            s.copy_from_slice(&raw.to_be_bytes()[4 - b..]);
        } else {
            s.copy_from_slice(&raw.to_le_bytes()[..b]);
        }
    }

    /// Applies the guest mixer's volume to `data` in place. QEMU leaves this to us: its D-Bus
    /// audio backend implements `volume_out`, so QEMU does not scale the samples itself.
    pub fn apply_volume(&self, data: &mut [u8], volume: Volume) {
        if volume.is_unity() {
            return;
        }
        let channels = usize::from(self.channels);
        let frames = data.len().checked_div(self.bytes_per_frame()).unwrap_or(0);
        for i in 0..frames * channels {
            let gain = volume.gain(i % channels);
            let v = self.sample(data, i) * gain;
            self.put(data, i, v);
        }
    }
}

/// The guest mixer's setting for one stream: QEMU's one byte per channel, 255 = full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Volume {
    pub mute: bool,
    pub left: u8,
    pub right: u8,
}

impl Default for Volume {
    fn default() -> Self {
        Self {
            mute: false,
            left: 255,
            right: 255,
        }
    }
}

impl Volume {
    /// From QEMU's `SetVolume` arguments: one byte per channel; a mono stream's one byte is
    /// both sides, and a missing byte is full volume.
    pub fn from_qemu(mute: bool, volume: &[u8]) -> Self {
        let left = volume.first().copied().unwrap_or(255);
        let right = volume.get(1).copied().unwrap_or(left);
        Self { mute, left, right }
    }

    fn is_unity(&self) -> bool {
        *self == Self::default()
    }

    /// Linear gain for channel `c` (QEMU's own software mixer scales by `vol / 255` too).
    fn gain(&self, c: usize) -> f32 {
        if self.mute {
            return 0.0;
        }
        f32::from(if c == 0 { self.left } else { self.right }) / 255.0
    }
}

/// What viewers receive.
#[derive(Debug, Clone)]
pub enum AudioEvent {
    /// Guest playback started (or the stream was announced) in this format.
    Started(PcmFormat),
    Stopped,
    /// Samples with the guest's volume already applied, and when QEMU handed them over.
    Pcm(PcmFormat, Bytes, Instant),
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

/// The fan-out point; cheap to clone.
#[derive(Clone)]
pub struct AudioHub {
    tx: broadcast::Sender<AudioEvent>,
}

impl Default for AudioHub {
    fn default() -> Self {
        Self {
            tx: broadcast::Sender::new(BACKLOG),
        }
    }
}

impl AudioHub {
    pub fn subscribe(&self) -> broadcast::Receiver<AudioEvent> {
        self.tx.subscribe()
    }

    fn send(&self, ev: AudioEvent) {
        // No viewer listening is fine.
        let _ = self.tx.send(ev);
    }
}

/// Our `org.qemu.Display1.AudioOutListener` object.
pub struct AudioOutListener {
    hub: AudioHub,
    streams: HashMap<u64, (PcmFormat, Volume)>,
}

impl AudioOutListener {
    pub fn new(hub: AudioHub) -> Self {
        Self {
            hub,
            streams: HashMap::new(),
        }
    }
}

#[zbus::interface(name = "org.qemu.Display1.AudioOutListener", spawn = false)]
impl AudioOutListener {
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
        let f = PcmFormat {
            bits,
            signed: is_signed,
            float: is_float,
            freq,
            channels: nchannels,
            big_endian: be,
        };
        if !f.valid() || self.streams.len() >= 16 {
            warn!(id, ?f, "audio stream refused: unsupported format");
            return;
        }
        info!(id, ?f, "audio stream");
        self.streams.insert(id, (f, Volume::default()));
    }

    fn fini(&mut self, id: u64) {
        if self.streams.remove(&id).is_some() {
            self.hub.send(AudioEvent::Stopped);
        }
    }

    fn set_enabled(&mut self, id: u64, enabled: bool) {
        if let Some((f, _)) = self.streams.get(&id) {
            debug!(id, enabled, "audio stream enabled");
            self.hub.send(if enabled {
                AudioEvent::Started(*f)
            } else {
                AudioEvent::Stopped
            });
        }
    }

    fn set_volume(&mut self, id: u64, mute: bool, volume: ByteBuf) {
        debug!(id, mute, volume = ?volume.as_ref(), "audio volume");
        if let Some((_, v)) = self.streams.get_mut(&id) {
            *v = Volume::from_qemu(mute, &volume);
        }
    }

    fn write(&mut self, id: u64, data: ByteBuf) {
        let Some((f, volume)) = self.streams.get(&id) else {
            return;
        };
        let frame = f.bytes_per_frame();
        if data.len() > MAX_WRITE || frame == 0 || !data.len().is_multiple_of(frame) {
            warn!(id, len = data.len(), "audio write refused: bad length");
            return;
        }
        let mut pcm = data.into_vec();
        f.apply_volume(&mut pcm, *volume);
        self.hub
            .send(AudioEvent::Pcm(*f, Bytes::from(pcm), Instant::now()));
    }

    #[zbus(property)]
    fn interfaces(&self) -> Vec<String> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_decode_in_every_width() {
        let s16 = PcmFormat {
            freq: 44100,
            ..PcmFormat::S16_STEREO_48K
        };
        let data = [0x00, 0x40, 0x00, 0xc0];
        assert_eq!(s16.sample(&data, 0), 0.5);
        assert_eq!(s16.sample(&data, 1), -0.5);
        let u8f = PcmFormat {
            bits: 8,
            signed: false,
            ..s16
        };
        assert_eq!(u8f.sample(&[192], 0), 0.5);
        let f32f = PcmFormat {
            bits: 32,
            float: true,
            ..s16
        };
        assert_eq!(f32f.sample(&0.25f32.to_le_bytes(), 0), 0.25);
        assert!(!PcmFormat { bits: 24, ..s16 }.valid());
    }

    #[test]
    fn volume_scales_each_channel_and_round_trips_every_width() {
        let s16 = PcmFormat::S16_STEREO_48K;
        for f in [
            s16,
            PcmFormat {
                big_endian: true,
                ..s16
            },
            PcmFormat {
                signed: false,
                ..s16
            },
            PcmFormat { bits: 8, ..s16 },
            PcmFormat {
                bits: 8,
                signed: false,
                ..s16
            },
            PcmFormat { bits: 32, ..s16 },
            PcmFormat {
                bits: 32,
                float: true,
                ..s16
            },
        ] {
            let mut data = vec![0u8; f.bytes_per_frame() * 2];
            for (i, v) in [0.5f32, -0.5, 0.25, 1.0].into_iter().enumerate() {
                f.put(&mut data, i, v);
            }
            let unity = data.clone();
            f.apply_volume(&mut data, Volume::default());
            assert_eq!(data, unity, "{f:?}");
            let half_left = Volume {
                mute: false,
                left: 51,
                right: 255,
            };
            f.apply_volume(&mut data, half_left);
            let got: Vec<f32> = (0..4).map(|i| f.sample(&data, i)).collect();
            let want = [0.1, -0.5, 0.05, 1.0];
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 0.02, "{f:?}: {got:?} vs {want:?}");
            }
            f.apply_volume(
                &mut data,
                Volume {
                    mute: true,
                    ..half_left
                },
            );
            assert!(
                (0..4).all(|i| f.sample(&data, i).abs() < 0.01),
                "{f:?} muted"
            );
        }
        assert!(!PcmFormat { channels: 0, ..s16 }.valid());
    }
}
