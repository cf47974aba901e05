//! Guest sound to RDP clients (MS-RDPEA, the `rdpsnd` channel): PCM 16-bit stereo at 48 kHz (what
//! the domain rewrite asks QEMU for, so usually no resampling) or 44.1 kHz, converted from
//! whatever QEMU announced. Waves of ~40 ms: ironrdp-server keeps only the newest 4 waves of a
//! batch, so many small waves would be dropped under load rather than late. The guest's volume
//! is already in the samples (applied where QEMU hands them over), so it reaches every client,
//! also those without rdpsnd's VOLUME capability.

use std::time::Instant;

use ironrdp::rdpsnd::pdu::{AudioFormat, WaveFormat};
use ironrdp::rdpsnd::server::{RdpsndError, RdpsndServerHandler, RdpsndServerMessage};
use ironrdp_server::{ServerEvent, ServerEventSender, SoundServerFactory};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::pcm::{ClientFormat, Converter};
use crate::qemu::audio::{AudioEvent, AudioHub};
use crate::session::stats::{Counters, ViewerStats};

/// Milliseconds of sound per wave.
const WAVE_MS: usize = 40;
/// Sound handed to a session that has written nothing since: more is dropped, not queued.
/// (ironrdp's event channel is unbounded, and a stalled client would otherwise grow it.)
const MAX_UNWRITTEN_MS: usize = 500;

/// Opus at 48 kHz stereo, constant 96 kbit/s: a sixteenth of PCM's 1536 kbit/s.
const OPUS_BITRATE: u32 = 96_000;

fn opus() -> AudioFormat {
    AudioFormat {
        format: WaveFormat::OPUS,
        n_channels: 2,
        n_samples_per_sec: 48_000,
        n_avg_bytes_per_sec: OPUS_BITRATE / 8,
        n_block_align: 4,
        bits_per_sample: 16,
        data: None,
    }
}

fn pcm(rate: u32) -> AudioFormat {
    AudioFormat {
        format: WaveFormat::PCM,
        n_channels: 2,
        n_samples_per_sec: rate,
        n_avg_bytes_per_sec: rate * 4,
        n_block_align: 4,
        bits_per_sample: 16,
        data: None,
    }
}

/// Builds one [`Sound`] per session.
pub struct SoundFactory {
    hub: AudioHub,
    events: Option<mpsc::UnboundedSender<ServerEvent>>,
    stats: ViewerStats,
}

impl SoundFactory {
    /// `stats` are the session's: its output counter tells whether the client is reading.
    pub fn new(hub: AudioHub, stats: ViewerStats) -> Self {
        Self {
            hub,
            events: None,
            stats,
        }
    }
}

impl ServerEventSender for SoundFactory {
    fn set_sender(&mut self, sender: mpsc::UnboundedSender<ServerEvent>) {
        self.events = Some(sender);
    }
}

impl SoundServerFactory for SoundFactory {
    fn build_backend(&self) -> Box<dyn RdpsndServerHandler> {
        Box::new(Sound {
            hub: self.hub.clone(),
            events: self.events.clone(),
            formats: vec![opus(), pcm(48_000), pcm(44_100)],
            running: None,
            stats: self.stats.clone(),
        })
    }
}

pub struct Sound {
    hub: AudioHub,
    events: Option<mpsc::UnboundedSender<ServerEvent>>,
    formats: Vec<AudioFormat>,
    running: Option<CancellationToken>,
    stats: ViewerStats,
}

impl std::fmt::Debug for Sound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sound")
            .field("formats", &self.formats.len())
            .field("running", &self.running.is_some())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for SoundFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoundFactory").finish_non_exhaustive()
    }
}

impl RdpsndServerHandler for Sound {
    fn get_formats(&self) -> &[AudioFormat] {
        &self.formats
    }

    fn choose_format<'a>(
        &mut self,
        common: &'a [ironrdp::rdpsnd::server::NegotiatedFormat],
    ) -> Option<&'a ironrdp::rdpsnd::server::NegotiatedFormat> {
        // In our preference order already: Opus, then PCM at 48 kHz.
        common.first()
    }

    fn start(
        &mut self,
        format: &ironrdp::rdpsnd::server::NegotiatedFormat,
    ) -> Result<(), Box<dyn RdpsndError>> {
        self.stop();
        let Some(events) = self.events.clone() else {
            return Ok(());
        };
        let rate = format.format().n_samples_per_sec;
        let codec = if format.format().format == WaveFormat::OPUS {
            match opus_encoder() {
                Ok(enc) => {
                    info!(rate, bitrate = OPUS_BITRATE, "RDP audio: Opus stereo");
                    Codec::Opus(Box::new(enc), Vec::new())
                }
                Err(e) => {
                    warn!(error = %e, "Opus encoder unavailable: no sound for this client");
                    return Ok(());
                }
            }
        } else {
            info!(rate, "RDP audio: PCM s16 stereo");
            Codec::Pcm
        };
        let token = CancellationToken::new();
        self.running = Some(token.clone());
        let rx = self.hub.subscribe();
        let stats = self.stats.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = pump(rx, events, rate, codec, &stats) => {}
                () = token.cancelled() => {}
            }
        });
        Ok(())
    }

    fn stop(&mut self) {
        if let Some(t) = self.running.take() {
            t.cancel();
        }
    }
}

impl Drop for Sound {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How waves are coded for the client.
enum Codec {
    Pcm,
    /// One CBR Opus packet of [`WAVE_MS`] per wave (with its sample buffer, reused).
    Opus(Box<opus::Encoder>, Vec<i16>),
}

impl Codec {
    /// `pcm` (one wave of s16 stereo) as the wave's bytes.
    fn code(&mut self, pcm: Vec<u8>, packet: &mut [u8]) -> Option<Vec<u8>> {
        match self {
            Codec::Pcm => Some(pcm),
            Codec::Opus(enc, samples) => {
                samples.clear();
                samples.extend(
                    pcm.chunks_exact(2)
                        .map(|b| i16::from_le_bytes([b[0], b[1]])),
                );
                match enc.encode(samples, packet) {
                    Ok(n) => Some(packet[..n].to_vec()),
                    Err(e) => {
                        warn!(error = %e, "Opus encoding failed: wave dropped");
                        None
                    }
                }
            }
        }
    }
}

fn opus_encoder() -> Result<opus::Encoder, opus::Error> {
    let mut enc = opus::Encoder::new(48_000, opus::Channels::Stereo, opus::Application::Audio)?;
    enc.set_bitrate(opus::Bitrate::Bits(OPUS_BITRATE as i32))?;
    // Constant bitrate: clients time waves by nAvgBytesPerSec (FreeRDP drops "overruns").
    enc.set_vbr(false)?;
    Ok(enc)
}

/// Guest PCM → waves in the client's format, until the session or the hub goes away.
async fn pump(
    mut rx: broadcast::Receiver<AudioEvent>,
    events: mpsc::UnboundedSender<ServerEvent>,
    rate: u32,
    mut codec: Codec,
    stats: &ViewerStats,
) {
    let dst = ClientFormat {
        sample: 3, // S16
        channels: 2,
        freq: rate,
    };
    let wave_bytes = rate as usize * 4 * WAVE_MS / 1000;
    let mut conv = Converter::default();
    let mut pcm = Vec::with_capacity(wave_bytes * 2);
    let mut packet = vec![0u8; 4000];
    let start = Instant::now();
    let max_unwritten = rate as usize * 4 * MAX_UNWRITTEN_MS / 1000;
    let mut stall = Stall::default();
    // When the oldest and the newest sound in `pcm` arrived from QEMU.
    let mut oldest: Option<Instant> = None;
    let mut newest = Instant::now();
    loop {
        let ev = match rx.recv().await {
            Ok(ev) => ev,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                debug!(chunks = n, "RDP audio fell behind: chunks dropped");
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        match ev {
            AudioEvent::Pcm(fmt, data, since) => {
                oldest.get_or_insert(since);
                newest = since;
                pcm.extend_from_slice(conv.convert(&fmt, &data, &dst));
            }
            // The end of a sound: what is left goes out as a last, padded wave.
            AudioEvent::Stopped if !pcm.is_empty() => pcm.resize(wave_bytes, 0),
            AudioEvent::Stopped | AudioEvent::Started(_) => continue,
        }
        while pcm.len() >= wave_bytes {
            let chunk: Vec<u8> = pcm.drain(..wave_bytes).collect();
            // What is left came with the newest chunk and starts the next wave.
            let since = if pcm.is_empty() {
                oldest.take()
            } else {
                oldest.replace(newest)
            };
            if !stall.admit(
                Counters::get(&stats.own().bytes_out),
                chunk.len(),
                max_unwritten,
            ) {
                stats.add(|c| &c.audio_dropped, 1);
                continue;
            }
            let Some(wave) = codec.code(chunk, &mut packet) else {
                continue;
            };
            // The wave's timestamp is in milliseconds and wraps, as MS-RDPEA says.
            let ts = start.elapsed().as_millis() as u32;
            stats.add(|c| &c.audio_bytes, wave_bytes as u64);
            stats.add(|c| &c.audio_wire_bytes, wave.len() as u64);
            let msg = RdpsndServerMessage::Wave(wave, ts);
            if events.send(ServerEvent::Rdpsnd(msg)).is_err() {
                return;
            }
            if let Some(since) = since {
                stats.audio_sent(since);
            }
        }
    }
}

/// Keeps a stalled client from queueing sound without bound: waves handed over since the
/// connection last wrote anything are counted, and past the limit new ones are dropped.
#[derive(Debug, Default)]
struct Stall {
    bytes_out: u64,
    unwritten: usize,
    dropping: bool,
}

impl Stall {
    fn admit(&mut self, bytes_out: u64, wave: usize, limit: usize) -> bool {
        if bytes_out != self.bytes_out {
            self.bytes_out = bytes_out;
            self.unwritten = 0;
            if self.dropping {
                debug!("RDP client reads again: sound resumes");
                self.dropping = false;
            }
        }
        if self.unwritten + wave > limit {
            if !self.dropping {
                debug!("RDP client is not reading: sound dropped until it does");
                self.dropping = true;
            }
            return false;
        }
        self.unwritten += wave;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stalled_connection_gets_a_bounded_amount_of_sound() {
        let mut s = Stall::default();
        let sent = (0..100).filter(|_| s.admit(5000, 7680, 96_000)).count();
        assert_eq!(sent, 12, "0.5 s of 48 kHz stereo s16 in 40 ms waves");
        assert!(
            s.admit(6000, 7680, 96_000),
            "writing again resumes the sound"
        );
    }

    #[test]
    fn offers_opus_then_pcm_48k() {
        let f = SoundFactory::new(AudioHub::default(), ViewerStats::new(&Default::default()))
            .build_backend();
        let formats = f.get_formats();
        assert_eq!(formats[0].format, WaveFormat::OPUS);
        assert_eq!(formats[0].n_avg_bytes_per_sec * 8, OPUS_BITRATE);
        assert_eq!(formats[1].n_samples_per_sec, 48_000);
        assert_eq!(formats[1].format, WaveFormat::PCM);
        assert_eq!((formats[1].n_channels, formats[1].bits_per_sample), (2, 16));
        assert_eq!(formats[1].n_avg_bytes_per_sec, 192_000);
    }

    #[test]
    fn opus_waves_are_constant_size_and_decode_back_to_the_tone() {
        let mut codec = Codec::Opus(Box::new(opus_encoder().expect("encoder")), Vec::new());
        let mut dec = opus::Decoder::new(48_000, opus::Channels::Stereo).expect("decoder");
        let mut packet = vec![0u8; 4000];
        let frames = 48_000 * WAVE_MS / 1000;
        let mut heard = Vec::new();
        for w in 0..10 {
            let pcm: Vec<u8> = (0..frames)
                .flat_map(|i| {
                    let t = (w * frames + i) as f64 / 48_000.0;
                    let v = ((t * 1000.0 * std::f64::consts::TAU).sin() * 12_000.0) as i16;
                    [v.to_le_bytes(), v.to_le_bytes()].concat()
                })
                .collect();
            let wave = codec.code(pcm, &mut packet).expect("encode");
            assert_eq!(
                wave.len(),
                OPUS_BITRATE as usize / 8 * WAVE_MS / 1000,
                "CBR"
            );
            let mut out = vec![0i16; frames * 2];
            let n = dec.decode(&wave, &mut out, false).expect("decode");
            assert_eq!(n, frames);
            heard.extend(out.chunks_exact(2).map(|f| f32::from(f[0]) / 32768.0));
        }
        // Past the codec's start-up, the pitch is the tone's.
        let tail = &heard[frames * 2..];
        let crossings = tail
            .windows(2)
            .filter(|w| (w[0] < 0.0) != (w[1] < 0.0))
            .count();
        let hz = crossings as f64 / 2.0 / (tail.len() as f64 / 48_000.0);
        assert!((hz - 1000.0).abs() < 10.0, "{hz}");
    }
}
