//! What an RDP client sends that our code parses before or beside ironrdp: the inbound framer
//! (TPKT, CredSSP DER, fast-path input) over a stream cut anywhere, the watcher of CredSSP
//! output and its TSRequest reader, the output framer, the dynamic-channel tap (drdynvc and the
//! AUDIO_INPUT channel inside MCS Send Data Requests), fast-path input decoding and translation,
//! and clipboard text from the client.
// Built by cargo-fuzz (`--cfg fuzzing`) as a libFuzzer target; included by tests/fuzz_seeds.rs
// as a module whose `fuzz` replays the committed seeds in the ordinary test run.
#![cfg_attr(fuzzing, no_main)]

use ironrdp::cliprdr::pdu::ClipboardFormatId;
use ironrdp::pdu::input::fast_path::FastPathInput;
use vdi_sidecar::qemu::audio_in::MicHub;
use vdi_sidecar::rdp::dvc_tap::DvcTap;
use vdi_sidecar::rdp::framing::{
    CredsspWatch, OutFrames, Pdu, TpktProgress, next_pdu, tpkt_len, ts_request_status,
};
use vdi_sidecar::rdp::input::{Translator, from_fast_path};

/// Frames `data` fed `chunk` bytes at a time, as the transport does; returns the PDUs.
fn frame(data: &[u8], chunk: usize) -> (Vec<Pdu>, bool) {
    let mut buf: Vec<u8> = Vec::new();
    let mut pdus = Vec::new();
    let mut mcs = false;
    for piece in data.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            match next_pdu(&buf, mcs) {
                Ok(Some(pdu)) => {
                    let n = pdu.size();
                    assert!(n > 0, "an empty PDU");
                    if buf.len() < n {
                        break; // its header is known, the rest is still coming
                    }
                    mcs |= matches!(pdu, Pdu::Tpkt(_));
                    pdus.push(pdu);
                    buf.drain(..n);
                }
                Ok(None) => break,
                Err(_) => return (pdus, true),
            }
        }
    }
    (pdus, false)
}

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|input: &[u8]| fuzz(input));

/// One input.
pub fn fuzz(input: &[u8]) {
    let Some((&knobs, data)) = input.split_first() else {
        return;
    };
    let chunk = usize::from(knobs) + 1;
    let (whole, whole_err) = frame(data, data.len());
    let (cut, cut_err) = frame(data, chunk);
    assert_eq!(
        (&whole, whole_err),
        (&cut, cut_err),
        "framing depends on how bytes arrive"
    );

    // Each framed PDU through what consumes it.
    let mut tap = DvcTap::new(MicHub::default());
    let mut translator = Translator::new();
    let mut at = 0usize;
    for pdu in &whole {
        let bytes = &data[at..at + pdu.size()];
        at += pdu.size();
        match pdu {
            Pdu::Tpkt(_) => {
                assert_eq!(tpkt_len(bytes), Some(bytes.len()));
                let _ = tap.inbound(bytes);
            }
            Pdu::Der(_) => {
                let _ = ts_request_status(bytes);
            }
            Pdu::FastPathInput(_) => {
                if let Ok(fp) = ironrdp::core::decode::<FastPathInput>(bytes) {
                    let mut events = Vec::new();
                    for e in fp.input_events() {
                        from_fast_path(e, &mut events);
                    }
                    let mut actions = Vec::new();
                    for e in &events {
                        translator.translate(e, &mut actions);
                    }
                }
            }
        }
    }
    // Tapped audio input waits in bounded output only.
    assert!(tap.out.len() <= data.len() * 64 + 4096);

    // The same bytes as server output: the CredSSP watcher and the output framer.
    let mut watch = CredsspWatch::default();
    let mut out = OutFrames::default();
    out.active = knobs & 1 == 1;
    let mut progress = TpktProgress::default();
    for piece in data.chunks(chunk) {
        let _ = watch.advance(piece);
        out.advance(piece);
        progress.advance(piece);
        let _ = progress.remaining();
    }
    let _ = vdi_sidecar::rdp::clipboard::decode(ClipboardFormatId::CF_UNICODETEXT, data);
    let _ = vdi_sidecar::rdp::clipboard::decode(ClipboardFormatId::CF_TEXT, data);
}
