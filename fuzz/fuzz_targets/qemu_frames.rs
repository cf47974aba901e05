//! Frames from QEMU, which is as untrusted as a viewer: raw D-Bus method-call bytes through the
//! listener socket's header parser and the parked-frame body reader (the inline path), then the
//! framebuffer's size, stride and format checks on what they yield (and on fields taken
//! straight from the input), pixman conversion, and reads of the result. Allocations stay in
//! proportion to the input (libFuzzer's -malloc_limit_mb catches any that do not).
// Built by cargo-fuzz (`--cfg fuzzing`) as a libFuzzer target; included by tests/fuzz_seeds.rs
// as a module whose `fuzz` replays the committed seeds in the ordinary test run.
#![cfg_attr(fuzzing, no_main)]

use vdi_sidecar::framebuffer::{Framebuffer, Rect};
use vdi_sidecar::pixman::Format;
use vdi_sidecar::qemu::listener_socket::{Call, scanout_size};
use vdi_sidecar::qemu::parked::{Frame, ParkedFrames};

fn apply(fb: &Framebuffer, frame: &Frame<'_>, whole: bool) {
    match *frame {
        Frame::Scanout {
            width,
            height,
            stride,
            format,
            data,
        } => {
            let _ = fb.scanout(width, height, stride, format, data);
        }
        Frame::Update {
            x,
            y,
            width,
            height,
            stride,
            format,
            data,
        } => {
            let _ = fb.update(x, y, width, height, stride, format, data, whole);
        }
    }
}

fn word(b: &[u8], i: usize) -> u32 {
    b.get(i * 4..i * 4 + 4)
        .map_or(0, |w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
}

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|input: &[u8]| fuzz(input));

/// One input.
pub fn fuzz(input: &[u8]) {
    let fb = Framebuffer::new();
    let parked = ParkedFrames::with_limit(2);
    // 1. As a D-Bus message on the listener socket.
    let _ = scanout_size(input);
    if let Some(call) = Call::parse(input) {
        if let Some(kind) = call.inline_frame() {
            if call.total_len <= input.len() {
                let token = parked.park(
                    kind,
                    call.big_endian,
                    call.body_at,
                    call.total_len,
                    input.to_vec(),
                );
                if let Some(p) = parked.take(token) {
                    if let Some(frame) = p.frame() {
                        apply(&fb, &frame, false);
                    }
                }
            }
        }
    }
    // 2. The same bytes as fields and pixels: a Scanout, then Updates (packed and as a
    //    shared-memory map), some beyond the surface.
    if input.len() >= 40 {
        let (head, data) = input.split_at(40);
        let fmt = word(head, 4);
        let _ = Format::from_code(fmt);
        let _ = fb.scanout(
            word(head, 0) & 0xfff,
            word(head, 1) & 0xfff,
            word(head, 2),
            fmt,
            data,
        );
        let _ = fb.scanout(word(head, 0), word(head, 1), word(head, 2), fmt, data);
        for (i, whole) in [(5usize, false), (7, true)] {
            let _ = fb.update(
                word(head, i) as i32,
                word(head, i + 1) as i32,
                (word(head, 9) & 0xff) as i32,
                (word(head, 9) >> 8 & 0xff) as i32,
                word(head, 2),
                fmt,
                data,
                whole,
            );
        }
        let _ = fb.resize_hint(word(head, 3) & 0x3fff, word(head, 3) >> 18);
    }
    let (w, h) = fb.size();
    assert!(u64::from(w) * u64::from(h) <= vdi_sidecar::framebuffer::MAX_PIXELS);
    let mut out = Vec::new();
    let got = fb.read_rect(
        Rect {
            x: 1,
            y: 1,
            w: w + 5,
            h: 3,
        },
        &mut out,
    );
    assert_eq!(out.len(), got.w as usize * got.h as usize);
    let snap = fb.snapshot();
    assert_eq!(
        snap.pixels.len(),
        snap.width as usize * snap.height as usize
    );
}
