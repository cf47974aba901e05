//! PCM: the sample formats QEMU announces, the guest mixer's volume, and conversion between
//! formats, channel counts and rates. Shared by the audio listeners (`qemu/`) and every front end
//! that plays or records sound (VNC's QEMU audio messages, RDP's rdpsnd and AUDIO_INPUT).

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

    /// The format QEMU announces in an audio listener's `Init`.
    pub fn from_qemu_init(
        bits: u8,
        signed: bool,
        float: bool,
        freq: u32,
        channels: u8,
        big_endian: bool,
    ) -> Self {
        Self {
            bits,
            signed,
            float,
            freq,
            channels,
            big_endian,
        }
    }

    /// This format as a conversion target (integer little-endian PCM, 1 or 2 channels).
    pub fn as_target(&self) -> Option<ClientFormat> {
        if self.float || self.big_endian {
            return None;
        }
        let sample = match self.bits {
            8 => 0,
            16 => 2,
            32 => 4,
            _ => return None,
        } + u8::from(self.signed);
        ClientFormat::new(sample, self.channels, self.freq)
    }

    pub fn bytes_per_frame(&self) -> usize {
        usize::from(self.bits / 8) * usize::from(self.channels)
    }

    /// Whether we can handle this format (8/16/32-bit integer or 32-bit float, 1..8 channels).
    pub fn valid(&self) -> bool {
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

    pub fn is_unity(&self) -> bool {
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

/// What a viewer wants (VNC set-format, RDP wave formats): sample format 0..5 = U8, S8, U16, S16, U32, S32.
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

/// Converts PCM chunk by chunk; keeps the resampling phase between chunks so the stream stays
/// continuous.
#[derive(Default)]
pub struct Converter {
    pos: f64,
    pcm: Vec<u8>,
}

impl Converter {
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

    fn pcm(frames: usize) -> Vec<u8> {
        (0..frames)
            .flat_map(|i| {
                let v = ((i as f32 * 0.1).sin() * 16000.0) as i16;
                [v.to_le_bytes(), (-v).to_le_bytes()].concat()
            })
            .collect()
    }

    #[test]
    fn same_format_passes_through() {
        let data = pcm(480);
        let dst = ClientFormat::new(3, 2, 48000).unwrap();
        let mut conv = Converter::default();
        assert_eq!(
            conv.convert(&PcmFormat::S16_STEREO_48K, &data, &dst),
            data.as_slice()
        );
    }

    #[test]
    fn rate_channels_and_width_convert_without_drift() {
        // 48 kHz stereo → 24 kHz mono U8, over many chunks: exactly half the frames overall.
        let dst = ClientFormat::new(0, 1, 24000).unwrap();
        let mut conv = Converter::default();
        let mut total = 0;
        for _ in 0..10 {
            total += conv
                .convert(&PcmFormat::S16_STEREO_48K, &pcm(441), &dst)
                .len();
        }
        assert_eq!(total, 4410 / 2);
        // Left and right are opposite: the mono mix is silence (U8 midpoint).
        let mut conv = Converter::default();
        let out = conv.convert(&PcmFormat::S16_STEREO_48K, &pcm(100), &dst);
        assert!(out.iter().all(|&b| (127..=129).contains(&b)));
        assert!(ClientFormat::new(6, 2, 44100).is_none());
        assert!(ClientFormat::new(3, 3, 44100).is_none());
        assert!(ClientFormat::new(3, 2, 1_000_000).is_none());
    }

    #[test]
    fn integer_little_endian_formats_are_targets() {
        let s16 = PcmFormat::S16_STEREO_48K;
        assert_eq!(s16.as_target(), ClientFormat::new(3, 2, 48000));
        assert_eq!(
            PcmFormat {
                bits: 8,
                signed: false,
                ..s16
            }
            .as_target(),
            ClientFormat::new(0, 2, 48000)
        );
        assert_eq!(
            PcmFormat {
                big_endian: true,
                ..s16
            }
            .as_target(),
            None
        );
        assert_eq!(
            PcmFormat {
                bits: 32,
                float: true,
                ..s16
            }
            .as_target(),
            None
        );
    }
}
