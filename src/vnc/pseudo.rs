//! Pseudo-rectangles and the small server messages that carry no pixels of the desktop:
//! desktop size, cursor shape, LED state, pointer mode, desktop name, fences.

use super::encode::{put_pixel, rect_header};
use super::proto::{PixelFormat, enc};
use crate::framebuffer::Cursor;

/// Largest cursor we forward (QEMU's are 64x64 at most; bigger ones are hostile or broken).
pub const MAX_CURSOR_SIDE: u32 = 256;

/// Server→client message types beyond the FramebufferUpdate (0).
const END_OF_CONTINUOUS_UPDATES: u8 = 150;
const SERVER_FENCE: u8 = 248;

/// Fence flags (rfbproto "ServerFence").
pub const FENCE_BLOCK_BEFORE: u32 = 1;
pub const FENCE_BLOCK_AFTER: u32 = 1 << 1;
pub const FENCE_SYNC_NEXT: u32 = 1 << 2;
pub const FENCE_REQUEST: u32 = 1 << 31;

pub fn desktop_size(out: &mut Vec<u8>, width: u32, height: u32) {
    rect_header(out, 0, 0, width as u16, height as u16, enc::DESKTOP_SIZE);
}

/// An ExtendedDesktopSize rectangle (rfbproto): x = reason, y = status, one screen.
pub fn extended_desktop_size(out: &mut Vec<u8>, reason: u16, status: u16, width: u32, height: u32) {
    let (w, h) = (width as u16, height as u16);
    rect_header(out, reason, status, w, h, enc::EXTENDED_DESKTOP_SIZE);
    out.extend_from_slice(&[1, 0, 0, 0]);
    out.extend_from_slice(&0u32.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&w.to_be_bytes());
    out.extend_from_slice(&h.to_be_bytes());
    out.extend_from_slice(&0u32.to_be_bytes());
}

/// The rich Cursor pseudo-rectangle: pixels in the client's format plus a 1-bit mask (opaque
/// where alpha ≥ 50 %). `None` hides the cursor (a 0x0 shape).
pub fn cursor(out: &mut Vec<u8>, pf: &PixelFormat, c: Option<&Cursor>) {
    let Some(c) = c.filter(|c| fits(c)) else {
        rect_header(out, 0, 0, 0, 0, enc::CURSOR);
        return;
    };
    rect_header(
        out,
        c.hot_x as u16,
        c.hot_y as u16,
        c.width as u16,
        c.height as u16,
        enc::CURSOR,
    );
    for &p in &c.argb {
        put_pixel(pf, p & 0x00ff_ffff, out);
    }
    let row_bytes = (c.width as usize).div_ceil(8);
    for row in c.argb.chunks_exact(c.width as usize) {
        let start = out.len();
        out.resize(start + row_bytes, 0);
        for (x, &p) in row.iter().enumerate() {
            if p >> 24 >= 0x80 {
                out[start + x / 8] |= 0x80 >> (x % 8);
            }
        }
    }
}

/// Cursor with alpha: Raw 32-bit pixels, premultiplied, bytes B, G, R, A (the format TigerVNC
/// and QEMU use on the wire).
pub fn cursor_with_alpha(out: &mut Vec<u8>, c: Option<&Cursor>) {
    let Some(c) = c.filter(|c| fits(c)) else {
        rect_header(out, 0, 0, 0, 0, enc::CURSOR_WITH_ALPHA);
        out.extend_from_slice(&enc::RAW.to_be_bytes());
        return;
    };
    rect_header(
        out,
        c.hot_x as u16,
        c.hot_y as u16,
        c.width as u16,
        c.height as u16,
        enc::CURSOR_WITH_ALPHA,
    );
    out.extend_from_slice(&enc::RAW.to_be_bytes());
    out.reserve(c.argb.len() * 4);
    for &p in &c.argb {
        let a = p >> 24;
        let pre = |shift: u32| (((p >> shift) & 0xff) * a / 255) as u8;
        out.extend_from_slice(&[pre(0), pre(8), pre(16), a as u8]);
    }
}

fn fits(c: &Cursor) -> bool {
    c.width > 0
        && c.height > 0
        && c.width <= MAX_CURSOR_SIDE
        && c.height <= MAX_CURSOR_SIDE
        && c.argb.len() == (c.width * c.height) as usize
        && c.hot_x < c.width
        && c.hot_y < c.height
}

/// QEMU LED state: bit 0 Scroll, 1 Num, 2 Caps Lock.
pub fn led_state(out: &mut Vec<u8>, leds: u32) {
    rect_header(out, 0, 0, 0, 0, enc::LED_STATE);
    out.push((leds & 7) as u8);
}

/// QEMU Pointer Motion Change: x = 1 when the guest pointer is absolute, 0 when relative.
pub fn pointer_motion(out: &mut Vec<u8>, absolute: bool) {
    rect_header(
        out,
        u16::from(absolute),
        0,
        0,
        0,
        enc::POINTER_MOTION_CHANGE,
    );
}

pub fn desktop_name(out: &mut Vec<u8>, name: &str) {
    rect_header(out, 0, 0, 0, 0, enc::DESKTOP_NAME);
    out.extend_from_slice(&u32::try_from(name.len()).unwrap_or(0).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
}

pub fn last_rect(out: &mut Vec<u8>) {
    rect_header(out, 0, 0, 0, 0, enc::LAST_RECT);
}

/// The confirmation clients wait for before sending QEMU extended key events.
pub fn qemu_ext_key_ack(out: &mut Vec<u8>) {
    rect_header(out, 0, 0, 0, 0, enc::QEMU_EXT_KEY);
}

pub fn server_fence(out: &mut Vec<u8>, flags: u32, payload: &[u8]) {
    out.extend_from_slice(&[SERVER_FENCE, 0, 0, 0]);
    out.extend_from_slice(&flags.to_be_bytes());
    out.push(payload.len().min(64) as u8);
    out.extend_from_slice(&payload[..payload.len().min(64)]);
}

pub fn end_of_continuous_updates(out: &mut Vec<u8>) {
    out.push(END_OF_CONTINUOUS_UPDATES);
}

/// A FramebufferUpdate header; `count` 0xFFFF means "until LastRect".
pub fn update_header(out: &mut Vec<u8>, count: u16) {
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&count.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arrow() -> Cursor {
        Cursor {
            width: 10,
            height: 2,
            hot_x: 1,
            hot_y: 1,
            argb: (0..20)
                .map(|i| if i % 3 == 0 { 0xff_ff0000 } else { 0x40_00ff00 })
                .collect(),
        }
    }

    #[test]
    fn cursor_has_pixels_then_a_padded_mask() {
        let mut out = Vec::new();
        cursor(&mut out, &PixelFormat::NATIVE, Some(&arrow()));
        assert_eq!(out.len(), 12 + 20 * 4 + 2 * 2);
        // Row 0: pixels 0, 3, 6, 9 opaque.
        assert_eq!(&out[12 + 80..12 + 82], &[0b1001_0010, 0b0100_0000]);
        out.clear();
        cursor(&mut out, &PixelFormat::NATIVE, None);
        assert_eq!(out.len(), 12);
    }

    #[test]
    fn alpha_cursor_is_premultiplied_bgra() {
        let mut out = Vec::new();
        cursor_with_alpha(&mut out, Some(&arrow()));
        assert_eq!(out.len(), 12 + 4 + 80);
        assert_eq!(&out[16..20], &[0, 0, 0xff, 0xff]);
        assert_eq!(&out[20..24], &[0, 0x40, 0, 0x40]);
        // Hostile shapes are hidden, not forwarded.
        let mut bad = arrow();
        bad.argb.pop();
        out.clear();
        cursor_with_alpha(&mut out, Some(&bad));
        assert_eq!(out.len(), 16);
    }
}
