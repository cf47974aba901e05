//! What every viewer of a console shares, whatever its protocol: the [`Desktop`] handle (the
//! console's framebuffer, input, console control, sound, microphone and health), credentials and
//! the one failed-login limiter ([`auth`]), the input translator ([`input`]) and per-viewer
//! counters ([`stats`]). Front ends (vnc/, rdp/, web/) build on this and never on each other.

pub mod audit;
pub mod auth;
pub mod budget;
pub mod input;
pub mod keymap;
pub mod stats;

use std::sync::Arc;

use crate::framebuffer::Framebuffer;
use crate::h264::Video;
use crate::health::Health;
use crate::qemu::audio::AudioHub;
use crate::qemu::audio_in::MicHub;
use crate::qemu::clipboard::ClipboardHub;
use crate::qemu::control::ConsoleControl;
use crate::qemu::input::InputSink;
use crate::qemu::source::Consoles;

/// One viewer connection's handles on the VM. Cheap to clone; every handle outlives QEMU
/// restarts (the source re-attaches behind it).
#[derive(Clone)]
pub struct Desktop {
    pub fb: Framebuffer,
    /// Where this viewer's [`input::ViewerInput`] sends keys and pointer.
    pub input: InputSink,
    /// LEDs, pointer mode and resize requests.
    pub control: ConsoleControl,
    pub audio: AudioHub,
    /// The guest's microphone, for viewers that record.
    pub mic: MicHub,
    /// The VM's clipboard (one per VM, shared by every viewer of every protocol).
    pub clipboard: ClipboardHub,
    pub health: Health,
    /// Memory and CPU limits: whether another viewer fits.
    pub budget: Arc<budget::Budget>,
    /// The console's shared H.264 stream (idle until a viewer subscribes).
    pub video: Video,
    /// Records sessions (`--record-dir`), if set.
    pub recorder: Option<crate::h264::record::Recorder>,
}

impl Desktop {
    /// The primary console of `consoles`: what viewers see by default.
    pub fn primary(consoles: &Consoles) -> Self {
        Self {
            fb: consoles.primary(),
            input: consoles.input(),
            control: consoles.control(),
            audio: consoles.audio(),
            mic: consoles.mic(),
            clipboard: consoles.clipboard(),
            health: consoles.health(),
            budget: budget::Budget::unlimited(),
            video: Video::new(consoles.primary(), crate::h264::MAX_FPS),
            recorder: None,
        }
    }

    /// A new input state for one viewer (released when it is dropped).
    pub fn viewer_input(&self) -> input::ViewerInput {
        input::ViewerInput::new(self.input.clone())
    }
}
