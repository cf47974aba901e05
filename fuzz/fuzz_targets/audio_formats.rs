//! Audio format negotiation from both untrusted ends: the PCM format QEMU announces in a
//! listener's `Init` (and its `SetVolume` bytes), the format a VNC client sets, the conversion
//! between any accepted pair, and the RDP client's AUDIO_INPUT channel messages (version,
//! formats, open reply, format change, data) feeding the guest's microphone.
// Built by cargo-fuzz (`--cfg fuzzing`) as a libFuzzer target; included by tests/fuzz_seeds.rs
// as a module whose `fuzz` replays the committed seeds in the ordinary test run.
#![cfg_attr(fuzzing, no_main)]

use vdi_sidecar::pcm::{ClientFormat, Converter, PcmFormat, Volume};
use vdi_sidecar::qemu::audio_in::MicHub;
use vdi_sidecar::rdp::audio_input::AudioInput;

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|input: &[u8]| fuzz(input));

/// One input.
pub fn fuzz(input: &[u8]) {
    if input.len() < 16 {
        return;
    }
    let (h, rest) = input.split_at(16);
    let freq = u32::from_le_bytes([h[2], h[3], h[4], 0]);
    let src = PcmFormat::from_qemu_init(
        h[0],
        h[1] & 1 != 0,
        h[1] & 2 != 0,
        freq,
        h[5],
        h[1] & 4 != 0,
    );
    let dst_freq = u32::from_le_bytes([h[8], h[9], h[10], 0]);
    let dst = ClientFormat::new(h[6], h[7], dst_freq);
    if src.valid() {
        let mut pcm = rest.to_vec();
        src.apply_volume(
            &mut pcm,
            Volume::from_qemu(h[11] & 1 != 0, &h[12..12 + usize::from(h[11] >> 6)]),
        );
        let _ = src.as_target();
        if let Some(dst) = dst {
            let mut conv = Converter::default();
            let out = conv.convert(&src, &pcm, &dst);
            // Resampling bounds the output: at most 192k/4k times the input, plus a frame.
            assert!(
                out.len() <= pcm.len() * 48 * 4 + 64,
                "{} from {}",
                out.len(),
                pcm.len()
            );
        }
    }
    // The same bytes as AUDIO_INPUT messages, split at a length byte each.
    let mic = MicHub::default();
    let mut client = AudioInput::new(mic);
    let _ = client.opened();
    let mut msgs = rest;
    while let Some((&len, tail)) = msgs.split_first() {
        let n = usize::from(len).min(tail.len());
        let (msg, next) = tail.split_at(n);
        if client.on_message(msg).is_err() {
            break;
        }
        msgs = next;
    }
}
