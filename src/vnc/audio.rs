//! QEMU Audio pseudo-encoding (-259): guest PCM converted to the format, channel count and rate
//! the client asked for with set-format (QEMU's VNC server does the same conversions).

use super::encode::rect_header;
use super::proto::enc;
use crate::qemu::audio::PcmFormat;

/// Server → client QEMU message type and its audio submessage.
const QEMU_MSG: u8 = 255;
const AUDIO: u8 = 1;
const OP_END: u16 = 0;
const OP_BEGIN: u16 = 1;
const OP_DATA: u16 = 2;

/// What the client wants (set-format): sample format 0..5 = U8, S8, U16, S16, U32, S32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFormat {
    pub sample: u8,
    pub channels: u8,
    pub freq: u32,
}

impl Default for ClientFormat {
    /// QEMU's VNC default: S16 stereo 44.1 kHz.
    fn default() -> Self {
        Self {
            sample: 3,
            channels: 2,
            freq: 44100,
        }
    }
}

impl ClientFormat {
    /// Checks a set-format request (QEMU refuses rates above 48 kHz; so do we past 192 kHz).
    pub fn new(sample: u8, channels: u8, freq: u32) -> Option<Self> {
        (sample <= 5 && (1..=2).contains(&channels) && (4000..=192_000).contains(&freq)).then_some(
            Self {
                sample,
                channels,
                freq,
            },
        )
    }

    fn bytes_per_sample(&self) -> usize {
        1 << (self.sample / 2)
    }
}

/// The pseudo-rectangle that tells the client audio messages are understood.
pub fn ack(out: &mut Vec<u8>) {
    rect_header(out, 0, 0, 0, 0, enc::QEMU_AUDIO);
}

pub fn begin(out: &mut Vec<u8>) {
    out.extend_from_slice(&[QEMU_MSG, AUDIO]);
    out.extend_from_slice(&OP_BEGIN.to_be_bytes());
}

pub fn end(out: &mut Vec<u8>) {
    out.extend_from_slice(&[QEMU_MSG, AUDIO]);
    out.extend_from_slice(&OP_END.to_be_bytes());
}

/// Converts PCM chunk by chunk; keeps the resampling phase between chunks so the stream stays
/// continuous.
#[derive(Default)]
pub struct Converter {
    pos: f64,
    pcm: Vec<u8>,
}

impl Converter {
    /// Appends one audio data message carrying `data` (in `src`) converted to `dst`.
    pub fn data(&mut self, src: &PcmFormat, data: &[u8], dst: &ClientFormat, out: &mut Vec<u8>) {
        self.convert(src, data, dst);
        out.extend_from_slice(&[QEMU_MSG, AUDIO]);
        out.extend_from_slice(&OP_DATA.to_be_bytes());
        out.extend_from_slice(&u32::try_from(self.pcm.len()).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(&self.pcm);
    }

    /// `data` (in `src`) converted to `dst`, little-endian interleaved PCM (also what RDP's
    /// WAVE_FORMAT_PCM carries).
    pub fn convert(&mut self, src: &PcmFormat, data: &[u8], dst: &ClientFormat) -> &[u8] {
        self.pcm.clear();
        let frame = src.bytes_per_frame();
        let frames = data.len().checked_div(frame).unwrap_or(0);
        let step = f64::from(src.freq) / f64::from(dst.freq);
        let sc = usize::from(src.channels);
        while (self.pos as usize) < frames {
            let i = self.pos as usize;
            for c in 0..usize::from(dst.channels) {
                let v = if dst.channels == 1 {
                    (0..sc).map(|k| src.sample(data, i * sc + k)).sum::<f32>() / sc as f32
                } else {
                    src.sample(data, i * sc + c.min(sc - 1))
                };
                put_sample(dst, v, &mut self.pcm);
            }
            self.pos += step;
        }
        self.pos -= frames as f64;
        &self.pcm
    }
}

/// One sample in the client's format, little-endian (what QEMU sends on x86).
fn put_sample(dst: &ClientFormat, v: f32, out: &mut Vec<u8>) {
    let v = f64::from(v.clamp(-1.0, 1.0));
    let bits = dst.bytes_per_sample() * 8;
    let signed = dst.sample % 2 == 1;
    let full = (1u64 << (bits - 1)) as f64;
    let s = (v * (full - 1.0)).round() as i64;
    let raw = if signed { s } else { s + full as i64 } as u64;
    out.extend_from_slice(&raw.to_le_bytes()[..dst.bytes_per_sample()]);
}

#[cfg(test)]
mod tests {
    use super::*;

    const S16_STEREO_48K: PcmFormat = PcmFormat::S16_STEREO_48K;

    fn pcm(frames: usize) -> Vec<u8> {
        (0..frames)
            .flat_map(|i| {
                let v = ((i as f32 * 0.1).sin() * 16000.0) as i16;
                [v.to_le_bytes(), (-v).to_le_bytes()].concat()
            })
            .collect()
    }

    fn payload(out: &[u8]) -> &[u8] {
        assert_eq!(&out[..4], &[255, 1, 0, 2]);
        let n = u32::from_be_bytes(out[4..8].try_into().unwrap()) as usize;
        assert_eq!(out.len(), 8 + n);
        &out[8..]
    }

    #[test]
    fn same_format_passes_through() {
        let data = pcm(480);
        let mut out = Vec::new();
        let dst = ClientFormat::new(3, 2, 48000).unwrap();
        Converter::default().data(&S16_STEREO_48K, &data, &dst, &mut out);
        assert_eq!(payload(&out), data.as_slice());
    }

    #[test]
    fn rate_channels_and_width_convert_without_drift() {
        // 48 kHz stereo → 24 kHz mono U8, over many chunks: exactly half the frames overall.
        let dst = ClientFormat::new(0, 1, 24000).unwrap();
        let mut conv = Converter::default();
        let mut total = 0;
        for _ in 0..10 {
            let mut out = Vec::new();
            conv.data(&S16_STEREO_48K, &pcm(441), &dst, &mut out);
            total += payload(&out).len();
        }
        assert_eq!(total, 4410 / 2);
        // Left and right are opposite: the mono mix is silence (U8 midpoint).
        let mut out = Vec::new();
        Converter::default().data(&S16_STEREO_48K, &pcm(100), &dst, &mut out);
        assert!(payload(&out).iter().all(|&b| (127..=129).contains(&b)));
        assert!(ClientFormat::new(6, 2, 44100).is_none());
        assert!(ClientFormat::new(3, 3, 44100).is_none());
        assert!(ClientFormat::new(3, 2, 1_000_000).is_none());
    }
}
