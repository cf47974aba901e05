//! RFB client messages as a byte stream, cut as it arrives: the decoder never panics, never
//! consumes bytes it did not decode, and a message it decodes is the same whichever way the
//! stream was cut. Extended Clipboard bodies go through their own decoder.
// Built by cargo-fuzz (`--cfg fuzzing`) as a libFuzzer target; included by tests/fuzz_seeds.rs
// as a module whose `fuzz` replays the committed seeds in the ordinary test run.
#![cfg_attr(fuzzing, no_main)]

use bytes::BytesMut;
use vdi_sidecar::vnc::clipboard::decode_extended;
use vdi_sidecar::vnc::proto::{ClientMsg, decode_with, extended_cut_bound};

/// Decodes `data` fed in pieces of `chunk` bytes; stops at the first error.
fn decode_all(data: &[u8], chunk: usize, limit: u32) -> (Vec<ClientMsg>, bool) {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut skip = 0usize;
    for piece in data.chunks(chunk.max(1)) {
        let mut piece = piece;
        // Skipped cut text is discarded as it arrives, never buffered (what the session does).
        let n = skip.min(piece.len());
        skip -= n;
        piece = &piece[n..];
        buf.extend_from_slice(piece);
        loop {
            let before = buf.len();
            match decode_with(&mut buf, limit) {
                Ok(Some(msg)) => {
                    assert!(buf.len() < before, "a message consumed nothing");
                    if let ClientMsg::CutTextSkipped { len, .. } = msg {
                        let len = len as usize;
                        let now = len.min(buf.len());
                        let _ = buf.split_to(now);
                        skip += len - now;
                    }
                    out.push(msg);
                }
                Ok(None) => {
                    assert_eq!(buf.len(), before, "Ok(None) consumed bytes");
                    break;
                }
                Err(_) => return (out, true),
            }
        }
        // Bounded buffering: what waits is part of one message no longer than the limits allow.
        let bound = extended_cut_bound(limit) as usize + 8 + 4 * 65_536;
        assert!(buf.len() < bound, "{} bytes buffered", buf.len());
    }
    (out, false)
}

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|input: &[u8]| fuzz(input));

/// One input.
pub fn fuzz(input: &[u8]) {
    let Some((&knobs, data)) = input.split_first() else {
        return;
    };
    let limit = [16u32, 1024, 1 << 20][usize::from(knobs % 3)];
    let chunk = usize::from(knobs >> 2) + 1;
    let (whole, whole_err) = decode_all(data, data.len(), limit);
    let (cut, cut_err) = decode_all(data, chunk, limit);
    assert_eq!(whole_err, cut_err);
    assert_eq!(format!("{whole:?}"), format!("{cut:?}"));
    for msg in &whole {
        match msg {
            ClientMsg::ExtendedCutText(body) => {
                let _ = decode_extended(body, limit as usize);
            }
            ClientMsg::SetPixelFormat(pf) => {
                if pf.validate().is_ok() {
                    assert!(matches!(pf.bytes(), 1 | 2 | 4));
                }
            }
            _ => {}
        }
    }
}
