//! The guest side of input: one ordered queue of QEMU-level commands (key by qnum, button,
//! pointer) and the task that sends them to the console's `Keyboard` and `Mouse` without waiting
//! for replies. What a viewer's protocol means by a key or a click is translated above this, in
//! the session layer; this module only carries commands to QEMU.

use tokio::sync::{mpsc, watch};
use tracing::{debug, trace};

use super::control::{ConsoleControl, ConsoleProxies};

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

/// Largest qnum QEMU maps (`qemu_input_key_number_to_qcode` table size).
pub const MAX_QNUM: u32 = 0xff;

/// Commands queued for QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmd {
    Key {
        qnum: u32,
        down: bool,
    },
    Button {
        button: u32,
        down: bool,
    },
    /// Where the pointer is (used when the guest pointer is absolute) and how far it moved since
    /// the last command (used when it is relative).
    Pointer {
        x: u32,
        y: u32,
        dx: i32,
        dy: i32,
    },
}

/// Where viewers send input. Cheap to clone.
#[derive(Clone)]
pub struct InputSink {
    tx: mpsc::Sender<Cmd>,
}

/// Commands queued at most; beyond that pointer motion is dropped and keys wait.
const QUEUE: usize = 1024;

/// Creates the input path: the sink for viewers, the console control that reads the same
/// target, the setter the source uses on attach/detach, and the task that talks to QEMU (spawn
/// it).
pub fn input_path() -> (
    InputSink,
    ConsoleControl,
    watch::Sender<Option<ConsoleProxies>>,
    impl std::future::Future<Output = ()>,
) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let (target_tx, target_rx) = watch::channel(None);
    let task = run(rx, target_rx.clone());
    (
        InputSink { tx },
        ConsoleControl::new(target_rx),
        target_tx,
        task,
    )
}

impl InputSink {
    /// A sink whose commands go to `tx` instead of QEMU (tests).
    pub fn from_sender(tx: mpsc::Sender<Cmd>) -> Self {
        Self { tx }
    }

    /// Queues a command, waiting while the queue is full (keys and buttons must not be lost).
    pub async fn send(&self, cmd: Cmd) {
        let _ = self.tx.send(cmd).await;
    }

    /// Queues a command unless the queue is full (motion, and releases from `Drop`).
    pub fn try_send(&self, cmd: Cmd) -> bool {
        self.tx.try_send(cmd).is_ok()
    }
}

async fn run(mut rx: mpsc::Receiver<Cmd>, target: watch::Receiver<Option<ConsoleProxies>>) {
    while let Some(cmd) = rx.recv().await {
        let Some(t) = target.borrow().clone() else {
            trace!(?cmd, "input dropped: no display attached");
            continue;
        };
        let result = match cmd {
            Cmd::Key { qnum, down: true } => t.keyboard.press(qnum).await,
            Cmd::Key { qnum, down: false } => t.keyboard.release(qnum).await,
            Cmd::Button { button, down: true } => t.mouse.press(button).await,
            Cmd::Button {
                button,
                down: false,
            } => t.mouse.release(button).await,
            Cmd::Pointer { x, y, dx, dy } => {
                let absolute = t.mouse.cached_is_absolute().ok().flatten().unwrap_or(false);
                if absolute {
                    let (w, h) = t.fb.size();
                    if w == 0 || h == 0 {
                        continue;
                    }
                    t.mouse.set_abs_position(x.min(w - 1), y.min(h - 1)).await
                } else if dx != 0 || dy != 0 {
                    t.mouse.rel_motion(dx, dy).await
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
