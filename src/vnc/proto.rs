//! RFB (RFC 6143 + the community extensions in rfbproto) client messages: a pure decoder with
//! explicit limits, and the server-side constants. No I/O here.

use crate::qemu::input::button;
use bytes::{Buf, BytesMut};

/// RFC 6143 §7.5 client message types.
pub mod msg {
    pub const SET_PIXEL_FORMAT: u8 = 0;
    pub const SET_ENCODINGS: u8 = 2;
    pub const UPDATE_REQUEST: u8 = 3;
    pub const KEY_EVENT: u8 = 4;
    pub const POINTER_EVENT: u8 = 5;
    pub const CLIENT_CUT_TEXT: u8 = 6;
    pub const ENABLE_CONTINUOUS_UPDATES: u8 = 150;
    pub const FENCE: u8 = 248;
    pub const SET_DESKTOP_SIZE: u8 = 251;
    pub const QEMU: u8 = 255;
    /// QEMU client message subtypes.
    pub const QEMU_EXT_KEY: u8 = 0;
    pub const QEMU_AUDIO: u8 = 1;
}

/// Encodings and pseudo-encodings (rfbproto §7.7, §7.8).
pub mod enc {
    pub const RAW: i32 = 0;
    pub const COPY_RECT: i32 = 1;
    pub const HEXTILE: i32 = 5;
    pub const TIGHT: i32 = 7;
    pub const ZRLE: i32 = 16;
    pub const CURSOR: i32 = -239;
    pub const DESKTOP_SIZE: i32 = -223;
    pub const LAST_RECT: i32 = -224;
    pub const POINTER_MOTION_CHANGE: i32 = -257;
    pub const QEMU_EXT_KEY: i32 = -258;
    pub const QEMU_AUDIO: i32 = -259;
    pub const LED_STATE: i32 = -261;
    pub const DESKTOP_NAME: i32 = -307;
    pub const EXTENDED_DESKTOP_SIZE: i32 = -308;
    pub const FENCE: i32 = -312;
    pub const CONTINUOUS_UPDATES: i32 = -313;
    pub const CURSOR_WITH_ALPHA: i32 = -314;
    /// Tight quality levels 0..9 are -32..-23, compression levels 0..9 are -256..-247.
    pub const QUALITY_0: i32 = -32;
    pub const QUALITY_9: i32 = -23;
    pub const COMPRESS_0: i32 = -256;
    pub const COMPRESS_9: i32 = -247;
    /// TurboVNC's fine-grained JPEG quality 0..100.
    pub const FINE_QUALITY_0: i32 = -512;
    pub const FINE_QUALITY_100: i32 = -412;
}

/// Largest ClientCutText [`decode`] buffers; a longer one is skipped (see
/// [`ClientMsg::CutTextSkipped`]). Sessions pass the operator's clipboard limit instead.
pub const MAX_CUT_TEXT: u32 = 1 << 20;
/// Largest SetEncodings list accepted (real clients send < 40).
pub const MAX_ENCODINGS: u16 = 1024;
/// Largest SetDesktopSize screen count accepted.
pub const MAX_SCREENS: u8 = 16;
/// Largest Fence payload (rfbproto: at most 64 bytes).
pub const MAX_FENCE_PAYLOAD: u8 = 64;

/// RFC 6143 §7.4 PIXEL_FORMAT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PixelFormat {
    pub bits_per_pixel: u8,
    pub depth: u8,
    pub big_endian: bool,
    pub true_colour: bool,
    pub red_max: u16,
    pub green_max: u16,
    pub blue_max: u16,
    pub red_shift: u8,
    pub green_shift: u8,
    pub blue_shift: u8,
}

impl PixelFormat {
    /// What we announce in ServerInit: 32 bpp, depth 24, little-endian, 0x00RRGGBB.
    pub const NATIVE: Self = Self {
        bits_per_pixel: 32,
        depth: 24,
        big_endian: false,
        true_colour: true,
        red_max: 255,
        green_max: 255,
        blue_max: 255,
        red_shift: 16,
        green_shift: 8,
        blue_shift: 0,
    };

    pub const SIZE: usize = 16;

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[
            self.bits_per_pixel,
            self.depth,
            u8::from(self.big_endian),
            u8::from(self.true_colour),
        ]);
        out.extend_from_slice(&self.red_max.to_be_bytes());
        out.extend_from_slice(&self.green_max.to_be_bytes());
        out.extend_from_slice(&self.blue_max.to_be_bytes());
        out.extend_from_slice(&[self.red_shift, self.green_shift, self.blue_shift, 0, 0, 0]);
    }

    fn decode(b: &[u8]) -> Self {
        Self {
            bits_per_pixel: b[0],
            depth: b[1],
            big_endian: b[2] != 0,
            true_colour: b[3] != 0,
            red_max: u16::from_be_bytes([b[4], b[5]]),
            green_max: u16::from_be_bytes([b[6], b[7]]),
            blue_max: u16::from_be_bytes([b[8], b[9]]),
            red_shift: b[10],
            green_shift: b[11],
            blue_shift: b[12],
        }
    }

    /// Bytes per pixel on the wire.
    pub fn bytes(&self) -> usize {
        usize::from(self.bits_per_pixel / 8)
    }

    /// Checks a client-chosen format: true colour, 8/16/32 bpp, channels inside the pixel.
    pub fn validate(&self) -> Result<(), ProtoError> {
        if !matches!(self.bits_per_pixel, 8 | 16 | 32) {
            return Err(ProtoError::BadPixelFormat(
                "bits-per-pixel must be 8, 16 or 32",
            ));
        }
        if !self.true_colour {
            return Err(ProtoError::BadPixelFormat("colour maps are not supported"));
        }
        let bits = u32::from(self.bits_per_pixel);
        for (max, shift) in [
            (self.red_max, self.red_shift),
            (self.green_max, self.green_shift),
            (self.blue_max, self.blue_shift),
        ] {
            let width = 16 - max.leading_zeros();
            if max == 0
                || u32::from(shift) + width > bits
                || !(u32::from(max) + 1).is_power_of_two()
            {
                return Err(ProtoError::BadPixelFormat(
                    "colour max/shift outside the pixel",
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Screen {
    pub id: u32,
    pub x: u16,
    pub y: u16,
    pub width: u16,
    pub height: u16,
    pub flags: u32,
}

/// A decoded client message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMsg {
    SetPixelFormat(PixelFormat),
    SetEncodings(Vec<i32>),
    UpdateRequest {
        incremental: bool,
        x: u16,
        y: u16,
        w: u16,
        h: u16,
    },
    Key {
        down: bool,
        keysym: u32,
    },
    Pointer {
        mask: u8,
        x: u16,
        y: u16,
    },
    /// Latin-1 text (rfbproto); kept raw.
    CutText(Vec<u8>),
    /// An Extended Clipboard message (negative length): flags and payload, kept raw.
    ExtendedCutText(Vec<u8>),
    /// Cut text longer than the limit: only its 8-byte header was consumed, and the caller
    /// must discard the next `len` bytes (never buffered).
    CutTextSkipped {
        len: u32,
        extended: bool,
    },
    QemuExtKey {
        down: bool,
        keysym: u32,
        keycode: u32,
    },
    QemuAudio {
        op: u16,
        /// For set-format: sample format, channels, frequency.
        format: Option<(u8, u8, u32)>,
    },
    EnableContinuousUpdates {
        enable: bool,
        x: u16,
        y: u16,
        w: u16,
        h: u16,
    },
    Fence {
        flags: u32,
        payload: Vec<u8>,
    },
    SetDesktopSize {
        width: u16,
        height: u16,
        screens: Vec<Screen>,
    },
}

/// Why a client's byte stream cannot be decoded; the connection is closed with this reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("unknown client message type {0}")]
    UnknownMessage(u8),
    #[error("unknown QEMU client message subtype {0}")]
    UnknownQemuMessage(u8),
    #[error("SetEncodings with {0} encodings (limit {MAX_ENCODINGS})")]
    TooManyEncodings(u16),
    #[error("SetDesktopSize with {0} screens (limit {MAX_SCREENS})")]
    TooManyScreens(u8),
    #[error("Fence payload of {0} bytes (limit {MAX_FENCE_PAYLOAD})")]
    FenceTooLong(u8),
    #[error("bad pixel format: {0}")]
    BadPixelFormat(&'static str),
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Decodes one message from the front of `buf`. `Ok(None)`: more bytes needed (nothing
/// consumed). Lengths are checked against the limits *before* waiting for the body, so a hostile
/// length never makes us buffer more than a limit's worth.
pub fn decode(buf: &mut BytesMut) -> Result<Option<ClientMsg>, ProtoError> {
    decode_with(buf, MAX_CUT_TEXT)
}

/// Cut text's length field: classic (Latin-1) when positive, Extended Clipboard when negative.
fn cut_text_length(field: u32) -> (u32, bool) {
    let signed = field as i32;
    if signed < 0 {
        (signed.unsigned_abs(), true)
    } else {
        (field, false)
    }
}

/// Largest Extended Clipboard message buffered for a text limit of `limit` bytes: zlib's worst
/// case growth of the text, its size field and the message's flags.
pub fn extended_cut_bound(limit: u32) -> u32 {
    limit.saturating_add(limit / 256).saturating_add(1024)
}

/// [`decode`] with cut text limited to `cut_limit` bytes (Extended Clipboard messages to
/// [`extended_cut_bound`] of it).
pub fn decode_with(buf: &mut BytesMut, cut_limit: u32) -> Result<Option<ClientMsg>, ProtoError> {
    let Some(&ty) = buf.first() else {
        return Ok(None);
    };
    let b = &buf[..];
    // Total length of the message, once enough of its header is there to know it.
    let need = match ty {
        msg::SET_PIXEL_FORMAT => Some(4 + PixelFormat::SIZE),
        msg::SET_ENCODINGS => {
            if b.len() < 4 {
                None
            } else {
                let n = be16(b, 2);
                if n > MAX_ENCODINGS {
                    return Err(ProtoError::TooManyEncodings(n));
                }
                Some(4 + 4 * usize::from(n))
            }
        }
        msg::UPDATE_REQUEST => Some(10),
        msg::KEY_EVENT => Some(8),
        msg::POINTER_EVENT => Some(6),
        msg::CLIENT_CUT_TEXT => {
            if b.len() < 8 {
                None
            } else {
                let (len, extended) = cut_text_length(be32(b, 4));
                let bound = if extended {
                    extended_cut_bound(cut_limit)
                } else {
                    cut_limit
                };
                if len > bound {
                    buf.advance(8);
                    return Ok(Some(ClientMsg::CutTextSkipped { len, extended }));
                }
                Some(8 + len as usize)
            }
        }
        msg::ENABLE_CONTINUOUS_UPDATES => Some(10),
        msg::FENCE => {
            if b.len() < 9 {
                None
            } else {
                let n = b[8];
                if n > MAX_FENCE_PAYLOAD {
                    return Err(ProtoError::FenceTooLong(n));
                }
                Some(9 + usize::from(n))
            }
        }
        msg::SET_DESKTOP_SIZE => {
            if b.len() < 8 {
                None
            } else {
                let n = b[6];
                if n > MAX_SCREENS {
                    return Err(ProtoError::TooManyScreens(n));
                }
                Some(8 + 16 * usize::from(n))
            }
        }
        msg::QEMU => {
            if b.len() < 2 {
                None
            } else {
                match b[1] {
                    msg::QEMU_EXT_KEY => Some(12),
                    msg::QEMU_AUDIO => {
                        if b.len() < 4 {
                            None
                        } else if be16(b, 2) == 2 {
                            Some(10) // set format: u8 fmt, u8 channels, u32 freq
                        } else {
                            Some(4)
                        }
                    }
                    other => return Err(ProtoError::UnknownQemuMessage(other)),
                }
            }
        }
        other => return Err(ProtoError::UnknownMessage(other)),
    };
    let Some(need) = need else {
        return Ok(None);
    };
    if buf.len() < need {
        buf.reserve(need - buf.len());
        return Ok(None);
    }
    let m = buf.split_to(need);
    let b = &m[..];
    let out = match ty {
        msg::SET_PIXEL_FORMAT => {
            let pf = PixelFormat::decode(&b[4..]);
            pf.validate()?;
            ClientMsg::SetPixelFormat(pf)
        }
        msg::SET_ENCODINGS => ClientMsg::SetEncodings(
            b[4..]
                .chunks_exact(4)
                .map(|c| i32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        msg::UPDATE_REQUEST => ClientMsg::UpdateRequest {
            incremental: b[1] != 0,
            x: be16(b, 2),
            y: be16(b, 4),
            w: be16(b, 6),
            h: be16(b, 8),
        },
        msg::KEY_EVENT => ClientMsg::Key {
            down: b[1] != 0,
            keysym: be32(b, 4),
        },
        msg::POINTER_EVENT => ClientMsg::Pointer {
            mask: b[1],
            x: be16(b, 2),
            y: be16(b, 4),
        },
        msg::CLIENT_CUT_TEXT => {
            if cut_text_length(be32(b, 4)).1 {
                ClientMsg::ExtendedCutText(b[8..].to_vec())
            } else {
                ClientMsg::CutText(b[8..].to_vec())
            }
        }
        msg::ENABLE_CONTINUOUS_UPDATES => ClientMsg::EnableContinuousUpdates {
            enable: b[1] != 0,
            x: be16(b, 2),
            y: be16(b, 4),
            w: be16(b, 6),
            h: be16(b, 8),
        },
        msg::FENCE => ClientMsg::Fence {
            flags: be32(b, 4),
            payload: b[9..].to_vec(),
        },
        msg::SET_DESKTOP_SIZE => ClientMsg::SetDesktopSize {
            width: be16(b, 2),
            height: be16(b, 4),
            screens: b[8..]
                .chunks_exact(16)
                .map(|s| Screen {
                    id: be32(s, 0),
                    x: be16(s, 4),
                    y: be16(s, 6),
                    width: be16(s, 8),
                    height: be16(s, 10),
                    flags: be32(s, 12),
                })
                .collect(),
        },
        _ => match b[1] {
            msg::QEMU_EXT_KEY => ClientMsg::QemuExtKey {
                down: be16(b, 2) != 0,
                keysym: be32(b, 4),
                keycode: be32(b, 8),
            },
            _ => {
                let op = be16(b, 2);
                let format = (op == 2).then(|| {
                    let mut r = &b[4..];
                    (r.get_u8(), r.get_u8(), r.get_u32())
                });
                ClientMsg::QemuAudio { op, format }
            }
        },
    };
    Ok(Some(out))
}

/// RFB button mask bits → QEMU buttons: bits 0-2 left/middle/right, 3-6 wheel up/down/left/right.
pub fn rfb_buttons(mask: u8) -> u32 {
    [
        button::LEFT,
        button::MIDDLE,
        button::RIGHT,
        button::WHEEL_UP,
        button::WHEEL_DOWN,
        button::WHEEL_LEFT,
        button::WHEEL_RIGHT,
    ]
    .iter()
    .enumerate()
    .filter(|(bit, _)| mask & (1 << bit) != 0)
    .fold(0, |held, (_, b)| held | 1 << b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfb_button_bits_map_to_qemu_buttons() {
        assert_eq!(rfb_buttons(0), 0);
        assert_eq!(rfb_buttons(0b001), 1 << button::LEFT);
        assert_eq!(rfb_buttons(0b010), 1 << button::MIDDLE);
        assert_eq!(rfb_buttons(0b100), 1 << button::RIGHT);
        assert_eq!(
            rfb_buttons(0b111_1000),
            1 << button::WHEEL_UP
                | 1 << button::WHEEL_DOWN
                | 1 << button::WHEEL_LEFT
                | 1 << button::WHEEL_RIGHT
        );
        assert_eq!(rfb_buttons(0x80), 0, "bit 7 is not a button");
    }

    use proptest::prelude::*;

    fn one(bytes: &[u8]) -> Result<Option<ClientMsg>, ProtoError> {
        let mut b = BytesMut::from(bytes);
        decode(&mut b)
    }

    #[test]
    fn decodes_each_message() {
        let mut pf = vec![0, 0, 0, 0];
        PixelFormat::NATIVE.encode(&mut pf);
        assert_eq!(
            one(&pf),
            Ok(Some(ClientMsg::SetPixelFormat(PixelFormat::NATIVE)))
        );
        assert_eq!(
            one(&[2, 0, 0, 2, 0, 0, 0, 16, 0xff, 0xff, 0xff, 0x21]),
            Ok(Some(ClientMsg::SetEncodings(vec![16, enc::DESKTOP_SIZE])))
        );
        assert_eq!(
            one(&[3, 1, 0, 1, 0, 2, 0, 3, 0, 4]),
            Ok(Some(ClientMsg::UpdateRequest {
                incremental: true,
                x: 1,
                y: 2,
                w: 3,
                h: 4
            }))
        );
        assert_eq!(
            one(&[4, 1, 0, 0, 0, 0, 0xff, 0x0d]),
            Ok(Some(ClientMsg::Key {
                down: true,
                keysym: 0xff0d
            }))
        );
        assert_eq!(
            one(&[5, 3, 0, 10, 0, 20]),
            Ok(Some(ClientMsg::Pointer {
                mask: 3,
                x: 10,
                y: 20
            }))
        );
        assert_eq!(
            one(&[6, 0, 0, 0, 0, 0, 0, 2, b'h', b'i']),
            Ok(Some(ClientMsg::CutText(b"hi".to_vec())))
        );
        assert_eq!(
            one(&[255, 0, 0, 1, 0, 0, 0, 0x61, 0, 0, 0, 0x1e]),
            Ok(Some(ClientMsg::QemuExtKey {
                down: true,
                keysym: 0x61,
                keycode: 0x1e
            }))
        );
        assert_eq!(
            one(&[248, 0, 0, 0, 0x80, 0, 0, 2, 1, 9]),
            Ok(Some(ClientMsg::Fence {
                flags: 0x8000_0002,
                payload: vec![9]
            }))
        );
        let mut sds = vec![251, 0, 0x04, 0, 0x03, 0, 1, 0];
        sds.extend([0, 0, 0, 7, 0, 0, 0, 0, 4, 0, 3, 0, 0, 0, 0, 0]);
        assert_eq!(
            one(&sds),
            Ok(Some(ClientMsg::SetDesktopSize {
                width: 1024,
                height: 768,
                screens: vec![Screen {
                    id: 7,
                    x: 0,
                    y: 0,
                    width: 1024,
                    height: 768,
                    flags: 0
                }]
            }))
        );
    }

    #[test]
    fn waits_for_whole_messages() {
        for partial in [
            &[3u8, 1, 0][..],
            &[2, 0, 0, 2, 0, 0, 0],
            &[6, 0, 0, 0, 0, 0, 0, 5, 1],
            &[255],
        ] {
            let mut b = BytesMut::from(partial);
            assert_eq!(decode(&mut b), Ok(None));
            assert_eq!(b.len(), partial.len(), "nothing consumed");
        }
    }

    #[test]
    fn rejects_hostile_lengths_before_buffering() {
        assert_eq!(
            one(&[2, 0, 0xff, 0xff]),
            Err(ProtoError::TooManyEncodings(0xffff))
        );
        // Cut text over the limit: the header is consumed, the body is left to be skipped.
        for (field, len, extended) in [
            ([0x7f, 0xff, 0xff, 0xff], 0x7fff_ffff, false),
            ([0x80, 0, 0, 0], 0x8000_0000, true),
            ([0xff, 0xe0, 0, 0], 0x20_0000, true),
        ] {
            let mut b = BytesMut::from(&[6, 0, 0, 0][..]);
            b.extend_from_slice(&field);
            b.extend_from_slice(b"next");
            assert_eq!(
                decode_with(&mut b, 1 << 20),
                Ok(Some(ClientMsg::CutTextSkipped { len, extended }))
            );
            assert_eq!(&b[..], b"next");
        }
        // An extended message within its bound is buffered whole.
        assert_eq!(
            one(&[6, 0, 0, 0, 0xff, 0xff, 0xff, 0xfc, 0x08, 0, 0, 0]),
            Ok(Some(ClientMsg::ExtendedCutText(vec![8, 0, 0, 0])))
        );
        assert_eq!(
            one(&[251, 0, 0, 1, 0, 1, 200, 0]),
            Err(ProtoError::TooManyScreens(200))
        );
        assert_eq!(one(&[42]), Err(ProtoError::UnknownMessage(42)));
        assert_eq!(one(&[255, 9]), Err(ProtoError::UnknownQemuMessage(9)));
    }

    #[test]
    fn rejects_bad_pixel_formats() {
        for (bpp, tc, max, shift) in [
            (24, 1, 255, 0),
            (32, 0, 255, 0),
            (16, 1, 255, 12),
            (8, 1, 0, 0),
            (32, 1, 254, 0),
        ] {
            let mut m = vec![0, 0, 0, 0, bpp, 24, 0, tc];
            for _ in 0..3 {
                m.extend((max as u16).to_be_bytes());
            }
            m.extend([shift, 0, 0, 0, 0, 0]);
            assert!(
                matches!(one(&m), Err(ProtoError::BadPixelFormat(_))),
                "{bpp} {tc} {max} {shift}"
            );
        }
    }

    proptest! {
        /// Cut text of any length, classic or extended: buffered whole only within the limit,
        /// otherwise only its header is consumed and the rest left to be skipped.
        #[test]
        fn cut_text_is_buffered_only_within_its_limit(
            len in any::<u32>(),
            limit in 0u32..(1 << 21),
            extended in any::<bool>(),
            body in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let n = len & 0x7fff_ffff;
            let field = if extended { (n as i32).wrapping_neg() as u32 } else { n };
            let mut b = BytesMut::from(&[6u8, 0, 0, 0][..]);
            b.extend_from_slice(&field.to_be_bytes());
            b.extend_from_slice(&body);
            let before = b.len();
            let bound = if extended && n != 0 { extended_cut_bound(limit) } else { limit };
            match decode_with(&mut b, limit) {
                Ok(Some(ClientMsg::CutTextSkipped { len: l, extended: e })) => {
                    prop_assert!(l > bound);
                    prop_assert_eq!((l, e), (n, extended && n != 0));
                    prop_assert_eq!(b.len(), before - 8);
                }
                Ok(Some(ClientMsg::CutText(t) | ClientMsg::ExtendedCutText(t))) => {
                    prop_assert!(t.len() as u32 <= bound);
                }
                Ok(None) => {
                    prop_assert!(n <= bound && (n as usize) > body.len());
                    prop_assert_eq!(b.len(), before);
                }
                other => prop_assert!(false, "{other:?}"),
            }
        }

        #[test]
        fn never_panics_and_never_overconsumes(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut b = BytesMut::from(&data[..]);
            for _ in 0..300 {
                let before = b.len();
                match decode(&mut b) {
                    Ok(Some(_)) => prop_assert!(b.len() < before),
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }
}
