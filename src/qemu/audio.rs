//! Guest sound from QEMU's `org.qemu.Display1.AudioOutListener`: per-stream format from `Init`,
//! PCM from `Write`, fanned out to every interested viewer through a bounded broadcast (a slow
//! viewer loses audio; QEMU is never blocked). Handlers only copy and return.

use std::collections::HashMap;

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

/// What viewers receive.
#[derive(Debug, Clone)]
pub enum AudioEvent {
    /// Guest playback started (or the stream was announced) in this format.
    Started(PcmFormat),
    Stopped,
    Pcm(PcmFormat, Bytes),
    /// The guest's mixer: mute, and left/right volume 0..=255 (QEMU's per-channel bytes).
    Volume {
        mute: bool,
        left: u8,
        right: u8,
    },
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
    streams: HashMap<u64, PcmFormat>,
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
        self.streams.insert(id, f);
    }

    fn fini(&mut self, id: u64) {
        if self.streams.remove(&id).is_some() {
            self.hub.send(AudioEvent::Stopped);
        }
    }

    fn set_enabled(&mut self, id: u64, enabled: bool) {
        if let Some(f) = self.streams.get(&id) {
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
        if !self.streams.contains_key(&id) {
            return;
        }
        // One byte per channel; a mono stream's one byte is both sides.
        let left = volume.first().copied().unwrap_or(255);
        let right = volume.get(1).copied().unwrap_or(left);
        self.hub.send(AudioEvent::Volume { mute, left, right });
    }

    fn write(&mut self, id: u64, data: ByteBuf) {
        let Some(f) = self.streams.get(&id) else {
            return;
        };
        let frame = f.bytes_per_frame();
        if data.len() > MAX_WRITE || frame == 0 || !data.len().is_multiple_of(frame) {
            warn!(id, len = data.len(), "audio write refused: bad length");
            return;
        }
        self.hub
            .send(AudioEvent::Pcm(*f, Bytes::from(data.into_vec())));
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
            bits: 16,
            signed: true,
            float: false,
            freq: 44100,
            channels: 2,
            big_endian: false,
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
        assert!(!PcmFormat { channels: 0, ..s16 }.valid());
    }
}
