//! What a client is told besides pixels — cursor shape and visibility, keyboard LEDs, pointer
//! mode, screen layout, desktop name — as pseudo-rectangles at the head of an update, each sent
//! once per change and only to clients that asked for it with SetEncodings.

use super::caps::ClientCaps;
use super::proto::PixelFormat;
use super::pseudo;
use tracing::debug;

use crate::qemu::control::{ConsoleControl, UiInfoError};
use crate::session::Desktop;

/// What this client has been told besides pixels, so changes are sent once.
#[derive(Default)]
pub struct Told {
    pub cursor: Option<(u64, bool)>,
    pub leds: Option<u32>,
    pub absolute: Option<bool>,
    /// ExtendedDesktopSize owed after SetEncodings enabled it (clients learn the layout).
    pub layout: bool,
    /// DesktopName owed after SetEncodings enabled it.
    pub name: bool,
}

impl Told {
    /// After SetEncodings changed `before` into `caps`: confirms what needs confirming (into
    /// `out`) and owes the client everything it can now be told.
    pub fn after_set_encodings(before: &ClientCaps, caps: &ClientCaps, out: &mut Vec<u8>) -> Self {
        if caps.qemu_ext_key && !before.qemu_ext_key {
            // Clients only send scancodes once the server confirms with a pseudo-rectangle
            // (rfbproto "QEMU Extended Key Event").
            pseudo::update_header(out, 1);
            pseudo::qemu_ext_key_ack(out);
        }
        if caps.qemu_audio && !before.qemu_audio {
            pseudo::update_header(out, 1);
            super::audio::ack(out);
        }
        if caps.fence && !before.fence {
            pseudo::server_fence(out, pseudo::FENCE_REQUEST, &[]);
        }
        if caps.continuous_updates && !before.continuous_updates {
            pseudo::end_of_continuous_updates(out);
        }
        Told {
            layout: caps.ext_desktop_size && !before.ext_desktop_size,
            name: caps.desktop_name,
            ..Told::default()
        }
    }

    /// Cursor, LED, pointer-mode, layout and name pseudo-rectangles that changed since last
    /// told; returns how many were written.
    pub fn write(
        &mut self,
        caps: &ClientCaps,
        desktop: &Desktop,
        pf: &PixelFormat,
        (width, height): (u32, u32),
        desktop_name: &str,
        out: &mut Vec<u8>,
    ) -> usize {
        let told = self;
        let control = &desktop.control;
        let mut n = 0;
        if caps.cursor || caps.cursor_alpha {
            let (shape, serial, pointer) = desktop.fb.cursor();
            let now = (serial, pointer.visible);
            if shape.is_some() && told.cursor != Some(now) {
                let shown = shape.as_deref().filter(|_| now.1);
                if caps.cursor_alpha {
                    pseudo::cursor_with_alpha(out, shown);
                } else {
                    pseudo::cursor(out, pf, shown);
                }
                told.cursor = Some(now);
                n += 1;
            }
        }
        if caps.led_state {
            let leds = control.leds();
            if told.leds != Some(leds) && control.is_attached() {
                pseudo::led_state(out, leds);
                told.leds = Some(leds);
                n += 1;
            }
        }
        if caps.pointer_motion
            && let Some(absolute) = control.mouse_absolute()
            && told.absolute != Some(absolute)
        {
            pseudo::pointer_motion(out, absolute);
            told.absolute = Some(absolute);
            n += 1;
        }
        if told.layout {
            pseudo::extended_desktop_size(out, 0, 0, width, height);
            told.layout = false;
            n += 1;
        }
        if told.name {
            pseudo::desktop_name(out, desktop_name);
            told.name = false;
            n += 1;
        }
        n
    }
}

/// SetDesktopSize → `Console.SetUIInfo`; the RFB status: 0 done (the new mode follows as a
/// resize), 1 prohibited (the device cannot change mode on request), 2 out of resources,
/// 3 invalid layout.
pub async fn resize_status(control: &ConsoleControl, w: u16, h: u16, screens: usize) -> u16 {
    if w == 0 || h == 0 || screens == 0 || u32::from(w) > crate::framebuffer::MAX_WIDTH {
        return 3;
    }
    match control.set_ui_info(w.into(), h.into()).await {
        Ok(()) => 0,
        Err(UiInfoError::Unsupported) => 1,
        Err(e) => {
            debug!(error = %e, "resize not passed on");
            2
        }
    }
}
