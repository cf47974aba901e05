//! The RDP microphone (MS-RDPEAI, the `AUDIO_INPUT` dynamic channel), server side: version,
//! formats, open, then the client's captured PCM goes to the guest's [`MicHub`]. Pure message
//! handling: bytes of one channel message in, messages to send back out.

use tracing::{debug, info, warn};

use crate::pcm::PcmFormat;
use crate::qemu::audio_in::MicHub;

pub const CHANNEL_NAME: &str = "AUDIO_INPUT";

const MSG_VERSION: u8 = 0x01;
const MSG_FORMATS: u8 = 0x02;
const MSG_OPEN: u8 = 0x03;
const MSG_OPEN_REPLY: u8 = 0x04;
const MSG_INCOMING_DATA: u8 = 0x05;
const MSG_DATA: u8 = 0x06;
const MSG_FORMAT_CHANGE: u8 = 0x07;
const WAVE_FORMAT_PCM: u16 = 1;
/// Frames per captured packet we ask for: 20 ms at 48 kHz keeps the added delay small.
const FRAMES_PER_PACKET: u32 = 960;
/// Formats a client may list (FreeRDP refuses more than 1000).
const MAX_FORMATS: u32 = 64;

/// One AUDIO_FORMAT (a WAVEFORMATEX without its extra bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaveFormat {
    pub tag: u16,
    pub channels: u16,
    pub rate: u32,
    pub bits: u16,
}

impl WaveFormat {
    const fn pcm(rate: u32, channels: u16) -> Self {
        Self {
            tag: WAVE_FORMAT_PCM,
            channels,
            rate,
            bits: 16,
        }
    }

    fn block_align(&self) -> u16 {
        self.channels.saturating_mul(self.bits / 8)
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.tag.to_le_bytes());
        out.extend_from_slice(&self.channels.to_le_bytes());
        out.extend_from_slice(&self.rate.to_le_bytes());
        out.extend_from_slice(&(self.rate * u32::from(self.block_align())).to_le_bytes());
        out.extend_from_slice(&self.block_align().to_le_bytes());
        out.extend_from_slice(&self.bits.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes()); // cbSize
    }

    /// Reads one AUDIO_FORMAT, skipping its extra bytes.
    fn decode(r: &mut Reader<'_>) -> Result<Self, InputError> {
        let tag = r.u16()?;
        let channels = r.u16()?;
        let rate = r.u32()?;
        let _avg = r.u32()?;
        let _align = r.u16()?;
        let bits = r.u16()?;
        let extra = r.u16()?;
        r.skip(usize::from(extra))?;
        Ok(Self {
            tag,
            channels,
            rate,
            bits,
        })
    }

    /// The PCM format we can convert from, if this is one.
    fn as_pcm(&self) -> Option<PcmFormat> {
        let f = PcmFormat {
            bits: u8::try_from(self.bits).ok()?,
            signed: self.bits != 8,
            float: false,
            freq: self.rate,
            channels: u8::try_from(self.channels).ok()?,
            big_endian: false,
        };
        (self.tag == WAVE_FORMAT_PCM
            && matches!(f.bits, 8 | 16)
            && (1..=2).contains(&f.channels)
            && (8000..=96_000).contains(&f.freq))
        .then_some(f)
    }
}

/// What we offer, best first: no resampling when the guest captures at 48 kHz.
const OFFERED: [WaveFormat; 4] = [
    WaveFormat::pcm(48_000, 2),
    WaveFormat::pcm(44_100, 2),
    WaveFormat::pcm(48_000, 1),
    WaveFormat::pcm(22_050, 2),
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InputError {
    #[error("AUDIO_INPUT message truncated")]
    Truncated,
    #[error("AUDIO_INPUT message {0:#04x} unknown")]
    Unknown(u8),
    #[error("AUDIO_INPUT client listed {0} formats")]
    TooManyFormats(u32),
    #[error("AUDIO_INPUT format index {0} out of range")]
    BadIndex(u32),
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], InputError> {
        if self.0.len() < n {
            return Err(InputError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn skip(&mut self, n: usize) -> Result<(), InputError> {
        self.take(n).map(|_| ())
    }
    fn u16(&mut self) -> Result<u16, InputError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, InputError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// The server side of one client's AUDIO_INPUT channel.
pub struct AudioInput {
    mic: MicHub,
    /// This client among the guest's microphone sources.
    id: u64,
    /// The client's formats, in its order (indices refer to this list).
    client_formats: Vec<WaveFormat>,
    /// The format the client is sending in now.
    current: Option<PcmFormat>,
    pub bytes_in: u64,
}

impl AudioInput {
    pub fn new(mic: MicHub) -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Self {
            mic,
            id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            client_formats: Vec::new(),
            current: None,
            bytes_in: 0,
        }
    }

    /// The channel is open: we speak first, with our version.
    pub fn opened(&mut self) -> Vec<u8> {
        let mut v = vec![MSG_VERSION];
        v.extend_from_slice(&1u32.to_le_bytes());
        v
    }

    /// One message from the client; returns the messages to answer with.
    pub fn on_message(&mut self, msg: &[u8]) -> Result<Vec<Vec<u8>>, InputError> {
        let mut r = Reader(msg);
        let id = r.take(1)?[0];
        match id {
            MSG_VERSION => {
                let version = r.u32()?;
                debug!(version, "AUDIO_INPUT client version");
                let mut f = vec![MSG_FORMATS];
                f.extend_from_slice(&(OFFERED.len() as u32).to_le_bytes());
                f.extend_from_slice(&0u32.to_le_bytes()); // cbSizeFormatsPacket, fixed below
                for w in OFFERED {
                    w.encode(&mut f);
                }
                let size = f.len() as u32;
                f[5..9].copy_from_slice(&size.to_le_bytes());
                Ok(vec![f])
            }
            MSG_FORMATS => {
                let n = r.u32()?;
                let _size = r.u32()?;
                if n > MAX_FORMATS {
                    return Err(InputError::TooManyFormats(n));
                }
                self.client_formats = (0..n)
                    .map(|_| WaveFormat::decode(&mut r))
                    .collect::<Result<_, _>>()?;
                // The best of ours that the client kept, by our preference.
                let pick = OFFERED.iter().find_map(|o| {
                    self.client_formats
                        .iter()
                        .position(|c| c == o && c.as_pcm().is_some())
                });
                let Some(index) = pick else {
                    warn!(formats = ?self.client_formats, "RDP microphone: no PCM format in common");
                    return Ok(Vec::new());
                };
                let chosen = self.client_formats[index];
                info!(?chosen, "RDP microphone: opening");
                let mut open = vec![MSG_OPEN];
                open.extend_from_slice(&FRAMES_PER_PACKET.to_le_bytes());
                open.extend_from_slice(&(index as u32).to_le_bytes());
                chosen.encode(&mut open);
                Ok(vec![open])
            }
            MSG_OPEN_REPLY => {
                let result = r.u32()?;
                if result != 0 {
                    warn!(
                        result = format!("{result:#x}"),
                        "RDP microphone: client could not open it"
                    );
                }
                Ok(Vec::new())
            }
            MSG_FORMAT_CHANGE => {
                let index = r.u32()?;
                let f = self
                    .client_formats
                    .get(index as usize)
                    .ok_or(InputError::BadIndex(index))?;
                self.current = f.as_pcm();
                if self.current.is_none() {
                    warn!(format = ?f, "RDP microphone: client switched to a format we cannot use");
                }
                Ok(Vec::new())
            }
            MSG_INCOMING_DATA => Ok(Vec::new()),
            MSG_DATA => {
                let data = r.0;
                self.bytes_in += data.len() as u64;
                if let Some(f) = self.current
                    && data.len().is_multiple_of(f.bytes_per_frame())
                {
                    self.mic.push(self.id, &f, data);
                }
                Ok(Vec::new())
            }
            other => Err(InputError::Unknown(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_formats(list: &[WaveFormat]) -> Vec<u8> {
        let mut m = vec![MSG_FORMATS];
        m.extend_from_slice(&(list.len() as u32).to_le_bytes());
        m.extend_from_slice(&0u32.to_le_bytes());
        for f in list {
            f.encode(&mut m);
        }
        m
    }

    #[test]
    fn negotiates_the_best_common_pcm_format() {
        let mut ai = AudioInput::new(MicHub::default());
        assert_eq!(ai.opened(), [1, 1, 0, 0, 0]);
        let out = ai.on_message(&[MSG_VERSION, 2, 0, 0, 0]).expect("version");
        assert_eq!(out[0][0], MSG_FORMATS);
        assert_eq!(out[0][1..5], [4, 0, 0, 0]);
        assert_eq!(
            u32::from_le_bytes(out[0][5..9].try_into().unwrap()) as usize,
            out[0].len()
        );
        let mut r = Reader(&out[0][9..]);
        assert_eq!(WaveFormat::decode(&mut r), Ok(OFFERED[0]));

        // The client kept 22.05 kHz and 44.1 kHz (in its own order); we open 44.1 kHz.
        let mine = client_formats(&[OFFERED[3], OFFERED[1]]);
        let out = ai.on_message(&mine).expect("formats");
        assert_eq!(out[0][0], MSG_OPEN);
        assert_eq!(out[0][1..5], FRAMES_PER_PACKET.to_le_bytes());
        assert_eq!(
            out[0][5..9],
            1u32.to_le_bytes(),
            "index in the client's list"
        );
        let mut r = Reader(&out[0][9..]);
        assert_eq!(WaveFormat::decode(&mut r), Ok(OFFERED[1]));
        assert!(ai.on_message(&[MSG_FORMAT_CHANGE, 1, 0, 0, 0]).is_ok());
        assert_eq!(ai.current.map(|f| f.freq), Some(44_100));
        assert!(ai.on_message(&[MSG_OPEN_REPLY, 0, 0, 0, 0]).is_ok());
        assert!(ai.on_message(&[MSG_INCOMING_DATA]).is_ok());
        assert!(ai.on_message(&[MSG_DATA, 0, 0, 0, 0]).is_ok());
        assert_eq!(ai.bytes_in, 4);
    }

    #[test]
    fn hostile_messages_are_errors_not_panics() {
        let mut ai = AudioInput::new(MicHub::default());
        assert_eq!(ai.on_message(&[]), Err(InputError::Truncated));
        assert_eq!(ai.on_message(&[0x42]), Err(InputError::Unknown(0x42)));
        assert_eq!(
            ai.on_message(&[MSG_FORMATS, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]),
            Err(InputError::TooManyFormats(u32::MAX))
        );
        assert_eq!(
            ai.on_message(&[MSG_FORMATS, 2, 0, 0, 0, 0, 0, 0, 0, 1, 0]),
            Err(InputError::Truncated)
        );
        assert_eq!(
            ai.on_message(&[MSG_FORMAT_CHANGE, 9, 0, 0, 0]),
            Err(InputError::BadIndex(9))
        );
        // A format with a huge extra-bytes count is cut short, not read past.
        let mut m = client_formats(&[OFFERED[0]]);
        let n = m.len();
        m[n - 2..].copy_from_slice(&u16::MAX.to_le_bytes());
        assert_eq!(ai.on_message(&m), Err(InputError::Truncated));
        // No format in common: nothing opened.
        let alaw = WaveFormat {
            tag: 6,
            bits: 8,
            ..OFFERED[0]
        };
        assert_eq!(ai.on_message(&client_formats(&[alaw])), Ok(Vec::new()));
        for len in 0..64 {
            let junk: Vec<u8> = (0..len).map(|i| (i * 37 + 3) as u8).collect();
            let _ = ai.on_message(&junk);
        }
    }
}
