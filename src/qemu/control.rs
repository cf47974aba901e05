//! Console control, apart from input: the keyboard LEDs and pointer mode the guest reports, and
//! asking the guest for a new mode (`Console.SetUIInfo`, as a monitor hot-plug would). Viewers
//! read these to tell their clients; none of it goes through the input queue.

use std::time::Duration;

use tokio::sync::watch;

use super::proxies::{ConsoleProxy, KeyboardProxy, MouseProxy};
use crate::framebuffer::Framebuffer;

/// Keyboard lock LEDs in `Keyboard.Modifiers`.
pub mod led {
    pub const SCROLL: u32 = 1;
    pub const NUM: u32 = 2;
    pub const CAPS: u32 = 4;
}

/// How long QEMU may take to answer SetUIInfo.
const UI_INFO_TIMEOUT: Duration = Duration::from_secs(2);

/// The objects of the console viewers control, set by the source on attach (`None` while QEMU is
/// away). The keyboard and mouse proxies cache their properties, so reading LEDs and the pointer
/// mode costs no round trip.
#[derive(Clone)]
pub struct ConsoleProxies {
    pub console: ConsoleProxy<'static>,
    pub keyboard: KeyboardProxy<'static>,
    pub mouse: MouseProxy<'static>,
    /// The console's surface: absolute pointer positions are clamped to it.
    pub fb: Framebuffer,
}

/// Why a resize request was not passed on.
#[derive(Debug, thiserror::Error)]
pub enum UiInfoError {
    #[error("no display attached")]
    Detached,
    #[error("the display device cannot change mode on request (e.g. std VGA)")]
    Unsupported,
    #[error("SetUIInfo failed: {0}")]
    Failed(zbus::Error),
    #[error("SetUIInfo: no reply within {UI_INFO_TIMEOUT:?}")]
    Timeout,
}

/// Read-mostly handle on the attached console; cheap to clone.
#[derive(Clone)]
pub struct ConsoleControl {
    target: watch::Receiver<Option<ConsoleProxies>>,
}

impl ConsoleControl {
    pub fn new(target: watch::Receiver<Option<ConsoleProxies>>) -> Self {
        Self { target }
    }

    fn current(&self) -> Option<ConsoleProxies> {
        self.target.borrow().clone()
    }

    /// Keyboard LED state (`led::*` bits), 0 while detached.
    pub fn leds(&self) -> u32 {
        self.current()
            .and_then(|t| t.keyboard.cached_modifiers().ok().flatten())
            .unwrap_or(0)
    }

    /// Whether the guest pointer is absolute (tablet) or relative; `None` while detached.
    pub fn mouse_absolute(&self) -> Option<bool> {
        self.current()
            .and_then(|t| t.mouse.cached_is_absolute().ok().flatten())
    }

    pub fn is_attached(&self) -> bool {
        self.target.borrow().is_some()
    }

    /// Asks the guest for a new mode. The new size arrives later as a new surface.
    pub async fn set_ui_info(&self, width: u32, height: u32) -> Result<(), UiInfoError> {
        let t = self.current().ok_or(UiInfoError::Detached)?;
        let call = t.console.set_ui_info(0, 0, 0, 0, width, height);
        match tokio::time::timeout(UI_INFO_TIMEOUT, call).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(zbus::Error::MethodError(name, _, _)))
                if name.as_str() == "org.qemu.Display1.Error.Unsupported" =>
            {
                Err(UiInfoError::Unsupported)
            }
            Ok(Err(e)) => Err(UiInfoError::Failed(e)),
            Err(_) => Err(UiInfoError::Timeout),
        }
    }
}
