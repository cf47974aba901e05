//! Guest sound from QEMU's `org.qemu.Display1.AudioOutListener`: per-stream format from `Init`,
//! PCM from `Write`, fanned out to every interested viewer through a bounded broadcast (a slow
//! viewer loses audio; QEMU is never blocked). Handlers only copy and return.

use std::collections::HashMap;
use std::time::Instant;

use bytes::Bytes;
use serde_bytes::ByteBuf;
use tokio::sync::broadcast;
use tracing::{debug, info, warn};

use crate::pcm::{PcmFormat, Volume};

pub const OUT_LISTENER_PATH: &str = "/org/qemu/Display1/AudioOutListener";
pub const AUDIO_PATH: &str = "/org/qemu/Display1/Audio";
/// Chunks buffered per viewer (QEMU writes ~10 ms chunks: about 2.5 s).
const BACKLOG: usize = 256;
/// Largest Write accepted (QEMU's are a few KiB).
const MAX_WRITE: usize = 1 << 20;

/// What viewers receive.
#[derive(Debug, Clone)]
pub enum AudioEvent {
    /// Guest playback started (or the stream was announced) in this format.
    Started(PcmFormat),
    Stopped,
    /// Samples with the guest's volume already applied, and when QEMU handed them over.
    Pcm(PcmFormat, Bytes, Instant),
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
        let f = PcmFormat::from_qemu_init(bits, is_signed, is_float, freq, nchannels, be);
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
