//! What a client asked for with SetEncodings: the pixel encoding it prefers (its order decides)
//! and the pseudo-encodings it understands.

use super::proto::enc;

/// The pixel encoding used for updates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Encoding {
    #[default]
    Raw,
    Hextile,
    Zrle,
    Tight,
}

/// What the client asked for with SetEncodings.
#[derive(Default, Debug)]
pub struct ClientCaps {
    pub encoding: Encoding,
    pub copy_rect: bool,
    pub desktop_size: bool,
    pub ext_desktop_size: bool,
    pub qemu_ext_key: bool,
    pub qemu_audio: bool,
    pub last_rect: bool,
    pub cursor: bool,
    pub cursor_alpha: bool,
    pub pointer_motion: bool,
    pub led_state: bool,
    pub desktop_name: bool,
    pub fence: bool,
    pub continuous_updates: bool,
    /// Extended Clipboard (UTF-8 cut text, notify/request/provide).
    pub ext_clipboard: bool,
    /// Open H.264 (noVNC with WebCodecs).
    pub h264: bool,
    pub compress: Option<u32>,
    /// JPEG quality level 0–9 (Tight only uses JPEG when the client sent one).
    pub quality: Option<u8>,
    /// Fine-grained JPEG quality 0–100 (TurboVNC style); wins over `quality`.
    pub fine_quality: Option<u8>,
}

impl ClientCaps {
    pub fn from_list(list: &[i32]) -> Self {
        let mut c = Self::default();
        let mut preferred: Option<Encoding> = None;
        for &e in list {
            let encoding = match e {
                enc::RAW => Some(Encoding::Raw),
                enc::HEXTILE => Some(Encoding::Hextile),
                enc::ZRLE => Some(Encoding::Zrle),
                enc::TIGHT => Some(Encoding::Tight),
                _ => None,
            };
            if e == enc::COPY_RECT {
                c.copy_rect = true;
            }
            if preferred.is_none() {
                preferred = encoding;
            }
            match e {
                enc::DESKTOP_SIZE => c.desktop_size = true,
                enc::EXTENDED_DESKTOP_SIZE => c.ext_desktop_size = true,
                enc::QEMU_EXT_KEY => c.qemu_ext_key = true,
                enc::QEMU_AUDIO => c.qemu_audio = true,
                enc::LAST_RECT => c.last_rect = true,
                enc::CURSOR => c.cursor = true,
                enc::CURSOR_WITH_ALPHA => c.cursor_alpha = true,
                enc::POINTER_MOTION_CHANGE => c.pointer_motion = true,
                enc::LED_STATE => c.led_state = true,
                enc::DESKTOP_NAME => c.desktop_name = true,
                enc::FENCE => c.fence = true,
                enc::CONTINUOUS_UPDATES => c.continuous_updates = true,
                super::clipboard::EXTENDED_CLIPBOARD => c.ext_clipboard = true,
                super::h264::ENCODING => c.h264 = true,
                enc::COMPRESS_0..=enc::COMPRESS_9 => {
                    c.compress = u32::try_from(e - enc::COMPRESS_0).ok();
                }
                enc::QUALITY_0..=enc::QUALITY_9 => {
                    c.quality = u8::try_from(e - enc::QUALITY_0).ok();
                }
                enc::FINE_QUALITY_0..=enc::FINE_QUALITY_100 => {
                    c.fine_quality = u8::try_from(e - enc::FINE_QUALITY_0).ok();
                }
                _ => {}
            }
        }
        // The client's order decides; Raw is always allowed.
        c.encoding = preferred.unwrap_or_default();
        c
    }
}
