//! Input from viewers to the guest: keyboard by qnum, pointer absolute or relative (following
//! the console's `Mouse.IsAbsolute`), buttons and wheel. One task sends everything, in order,
//! without waiting for replies; each viewer's [`ViewerInput`] releases what it still holds when
//! the viewer goes away.

use std::collections::BTreeSet;

use tokio::sync::{mpsc, watch};
use tracing::{debug, trace};

use super::proxies::{ConsoleProxy, KeyboardProxy, MouseProxy};
use crate::framebuffer::Framebuffer;

/// QEMU's InputButton values (qapi/ui.json).
pub mod button {
    pub const LEFT: u32 = 0;
    pub const MIDDLE: u32 = 1;
    pub const RIGHT: u32 = 2;
    pub const WHEEL_UP: u32 = 3;
    pub const WHEEL_DOWN: u32 = 4;
    pub const SIDE: u32 = 5;
    pub const EXTRA: u32 = 6;
    pub const WHEEL_LEFT: u32 = 7;
    pub const WHEEL_RIGHT: u32 = 8;
    /// Values QEMU accepts.
    pub const COUNT: u32 = 9;
}

/// Keyboard lock LEDs in `Keyboard.Modifiers`.
pub mod led {
    pub const SCROLL: u32 = 1;
    pub const NUM: u32 = 2;
    pub const CAPS: u32 = 4;
}

/// Largest qnum QEMU maps (`qemu_input_key_number_to_qcode` table size).
const MAX_QNUM: u32 = 0xff;

/// The input objects of the console viewers control (set by the source on attach).
#[derive(Clone)]
pub struct ConsoleInput {
    pub console: ConsoleProxy<'static>,
    pub keyboard: KeyboardProxy<'static>,
    pub mouse: MouseProxy<'static>,
    pub fb: Framebuffer,
}

/// Why a resize request was not passed on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UiInfoError {
    #[error("no display attached")]
    Detached,
    #[error("the display device cannot change mode on request (e.g. std VGA)")]
    Unsupported,
    #[error("SetUIInfo failed: {0}")]
    Failed(String),
}

#[derive(Debug, Clone, Copy)]
enum Cmd {
    Key { qnum: u32, down: bool },
    Button { button: u32, down: bool },
    Pointer { x: u32, y: u32, dx: i32, dy: i32 },
}

/// Where viewers send input. Cheap to clone.
#[derive(Clone)]
pub struct InputSink {
    tx: mpsc::Sender<Cmd>,
    target: watch::Receiver<Option<ConsoleInput>>,
}

/// Creates the input path: the sink for viewers, the setter the source uses on attach/detach,
/// and the task that talks to QEMU (spawn it).
pub fn input_path() -> (
    InputSink,
    watch::Sender<Option<ConsoleInput>>,
    impl std::future::Future<Output = ()>,
) {
    // Bounded: a flood of pointer motion is dropped rather than queued without limit.
    let (tx, rx) = mpsc::channel(1024);
    let (target_tx, target_rx) = watch::channel(None);
    let task = run(rx, target_rx.clone());
    (
        InputSink {
            tx,
            target: target_rx,
        },
        target_tx,
        task,
    )
}

impl InputSink {
    /// Keyboard LED state (`led::*` bits), 0 while detached.
    pub fn leds(&self) -> u32 {
        let target = self.target.borrow().clone();
        target
            .and_then(|t| t.keyboard.cached_modifiers().ok().flatten())
            .unwrap_or(0)
    }

    /// Whether the guest pointer is absolute (tablet) or relative; `None` while detached.
    pub fn mouse_absolute(&self) -> Option<bool> {
        let target = self.target.borrow().clone();
        target.and_then(|t| t.mouse.cached_is_absolute().ok().flatten())
    }

    pub fn is_attached(&self) -> bool {
        self.target.borrow().is_some()
    }

    /// Asks the guest for a new mode (`Console.SetUIInfo`, as a monitor hot-plug would). The
    /// new size arrives later as a new surface.
    pub async fn set_ui_info(&self, width: u32, height: u32) -> Result<(), UiInfoError> {
        let target = self.target.borrow().clone();
        let t = target.ok_or(UiInfoError::Detached)?;
        let call = t.console.set_ui_info(0, 0, 0, 0, width, height);
        match tokio::time::timeout(std::time::Duration::from_secs(2), call).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(zbus::Error::MethodError(name, _, _)))
                if name.as_str() == "org.qemu.Display1.Error.Unsupported" =>
            {
                Err(UiInfoError::Unsupported)
            }
            Ok(Err(e)) => Err(UiInfoError::Failed(e.to_string())),
            Err(_) => Err(UiInfoError::Failed("no reply within 2 s".into())),
        }
    }

    /// A per-viewer handle that remembers what the viewer holds.
    pub fn viewer(&self) -> ViewerInput {
        ViewerInput {
            sink: self.clone(),
            keys: BTreeSet::new(),
            buttons: 0,
            last: None,
        }
    }
}

/// One viewer's input state. Dropping it releases every key and button it still holds.
pub struct ViewerInput {
    sink: InputSink,
    keys: BTreeSet<u32>,
    buttons: u32,
    last: Option<(u32, u32)>,
}

impl ViewerInput {
    /// A key by qnum (QEMU's XT-based numbering: `0x80 | code` for E0-prefixed keys).
    pub async fn key(&mut self, qnum: u32, down: bool) {
        if qnum == 0 || qnum > MAX_QNUM {
            trace!(qnum, "unmapped key dropped");
            return;
        }
        if down {
            self.keys.insert(qnum);
        } else if !self.keys.remove(&qnum) {
            return; // release of a key this viewer never pressed
        }
        let _ = self.sink.tx.send(Cmd::Key { qnum, down }).await;
    }

    /// Sets the state of every button from a bit mask (bit n = `button::*` value n), as RFB
    /// and RDP report them; wheel bits send a press and release.
    pub async fn buttons(&mut self, mask: u32) {
        let mask = mask & ((1 << button::COUNT) - 1);
        let changed = mask ^ self.buttons;
        for b in 0..button::COUNT {
            if changed & (1 << b) == 0 {
                continue;
            }
            let down = mask & (1 << b) != 0;
            let _ = self.sink.tx.send(Cmd::Button { button: b, down }).await;
        }
        self.buttons = mask;
    }

    /// One wheel step (`button::WHEEL_*`): press and release.
    pub async fn wheel(&mut self, b: u32) {
        if !matches!(
            b,
            button::WHEEL_UP | button::WHEEL_DOWN | button::WHEEL_LEFT | button::WHEEL_RIGHT
        ) {
            return;
        }
        for down in [true, false] {
            let _ = self.sink.tx.send(Cmd::Button { button: b, down }).await;
        }
    }

    /// The pointer is at `(x, y)` in framebuffer pixels. Motion is dropped when the queue is full.
    pub fn pointer(&mut self, x: u32, y: u32) {
        let (dx, dy) = match self.last {
            Some((lx, ly)) => (delta(x, lx), delta(y, ly)),
            None => (0, 0),
        };
        self.last = Some((x, y));
        if self
            .sink
            .tx
            .try_send(Cmd::Pointer { x, y, dx, dy })
            .is_err()
        {
            trace!("pointer motion dropped: input queue full");
        }
    }

    /// Relative motion (a client that grabbed the pointer sends deltas).
    pub fn relative(&mut self, dx: i32, dy: i32) {
        let (x, y) = self.last.unwrap_or((0, 0));
        if self
            .sink
            .tx
            .try_send(Cmd::Pointer { x, y, dx, dy })
            .is_err()
        {
            trace!("pointer motion dropped: input queue full");
        }
    }

    /// Releases everything held (also done on drop).
    pub fn release_all(&mut self) {
        for qnum in std::mem::take(&mut self.keys) {
            let _ = self.sink.tx.try_send(Cmd::Key { qnum, down: false });
        }
        for b in 0..button::COUNT {
            if self.buttons & (1 << b) != 0 {
                let _ = self.sink.tx.try_send(Cmd::Button {
                    button: b,
                    down: false,
                });
            }
        }
        self.buttons = 0;
    }
}

impl Drop for ViewerInput {
    fn drop(&mut self) {
        self.release_all();
    }
}

fn delta(now: u32, before: u32) -> i32 {
    let d = i64::from(now) - i64::from(before);
    i32::try_from(d).unwrap_or(if d < 0 { i32::MIN } else { i32::MAX })
}

async fn run(mut rx: mpsc::Receiver<Cmd>, target: watch::Receiver<Option<ConsoleInput>>) {
    while let Some(cmd) = rx.recv().await {
        let Some(t) = target.borrow().clone() else {
            trace!(?cmd, "input dropped: no display attached");
            continue;
        };
        let result = match cmd {
            Cmd::Key { qnum, down } => {
                let method = if down { "Press" } else { "Release" };
                t.keyboard.inner().call_noreply(method, &(qnum,)).await
            }
            Cmd::Button { button, down } => {
                let method = if down { "Press" } else { "Release" };
                t.mouse.inner().call_noreply(method, &(button,)).await
            }
            Cmd::Pointer { x, y, dx, dy } => {
                let absolute = t.mouse.cached_is_absolute().ok().flatten().unwrap_or(false);
                if absolute {
                    let (w, h) = t.fb.size();
                    if w == 0 || h == 0 {
                        continue;
                    }
                    let (x, y) = (x.min(w - 1), y.min(h - 1));
                    t.mouse
                        .inner()
                        .call_noreply("SetAbsPosition", &(x, y))
                        .await
                } else if dx != 0 || dy != 0 {
                    t.mouse.inner().call_noreply("RelMotion", &(dx, dy)).await
                } else {
                    Ok(())
                }
            }
        };
        if let Err(e) = result {
            debug!(error = %e, "input call failed");
        }
    }
}
