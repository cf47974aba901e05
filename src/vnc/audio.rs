//! QEMU Audio pseudo-encoding (-259): guest PCM converted to the format, channel count and rate
//! the client asked for with set-format (QEMU's VNC server does the same conversions).

use super::encode::rect_header;
use super::proto::enc;
use tokio::sync::broadcast;

use crate::pcm::{ClientFormat, Converter, PcmFormat};
use crate::qemu::audio::{AudioEvent, AudioHub};

/// Server → client QEMU message type and its audio submessage.
const QEMU_MSG: u8 = 255;
const AUDIO: u8 = 1;
const OP_END: u16 = 0;
const OP_BEGIN: u16 = 1;
const OP_DATA: u16 = 2;

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

/// Appends one audio data message carrying `data` (in `src`) converted to `dst`.
pub fn data(
    conv: &mut Converter,
    src: &PcmFormat,
    pcm: &[u8],
    dst: &ClientFormat,
    out: &mut Vec<u8>,
) {
    let converted = conv.convert(src, pcm, dst);
    out.extend_from_slice(&[QEMU_MSG, AUDIO]);
    out.extend_from_slice(&OP_DATA.to_be_bytes());
    out.extend_from_slice(&u32::try_from(converted.len()).unwrap_or(0).to_be_bytes());
    out.extend_from_slice(converted);
}

/// One client's guest sound: on after its enable message, in the format it set.
#[derive(Default)]
pub struct Sound {
    rx: Option<broadcast::Receiver<AudioEvent>>,
    converter: Converter,
    format: ClientFormat,
}

impl Sound {
    pub fn is_on(&self) -> bool {
        self.rx.is_some()
    }

    pub fn stop(&mut self) {
        self.rx = None;
    }

    /// A QEMU audio client message (0 enable, 1 disable, 2 set-format); replies go to `out`.
    pub fn message(
        &mut self,
        op: u16,
        format: Option<(u8, u8, u32)>,
        hub: &AudioHub,
        out: &mut Vec<u8>,
    ) -> Result<(), &'static str> {
        match (op, format) {
            (0, _) => {
                if self.rx.is_none() {
                    self.rx = Some(hub.subscribe());
                    self.converter = Converter::default();
                    begin(out);
                }
            }
            (1, _) => {
                if self.rx.take().is_some() {
                    end(out);
                }
            }
            (2, Some((sample, channels, freq))) => {
                self.format =
                    ClientFormat::new(sample, channels, freq).ok_or("unsupported audio format")?;
            }
            _ => return Err("unknown QEMU audio operation"),
        }
        Ok(())
    }

    /// The next guest sound event (pending forever while off).
    pub async fn recv(&mut self) -> Result<AudioEvent, broadcast::error::RecvError> {
        match &mut self.rx {
            Some(rx) => rx.recv().await,
            None => std::future::pending().await,
        }
    }

    /// A data message with `pcm` (in `src`) in the client's format.
    pub fn pcm(&mut self, src: &PcmFormat, pcm: &[u8], out: &mut Vec<u8>) {
        data(&mut self.converter, src, pcm, &self.format, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_message_frames_the_converted_samples() {
        let pcm: Vec<u8> = (0..480u32).flat_map(|i| (i as i16).to_le_bytes()).collect();
        let dst = ClientFormat::new(3, 2, 48000).unwrap();
        let mut out = Vec::new();
        data(
            &mut Converter::default(),
            &PcmFormat::S16_STEREO_48K,
            &pcm,
            &dst,
            &mut out,
        );
        assert_eq!(&out[..4], &[255, 1, 0, 2]);
        assert_eq!(
            u32::from_be_bytes(out[4..8].try_into().unwrap()) as usize,
            pcm.len()
        );
        assert_eq!(&out[8..], pcm.as_slice());
    }
}
