//! One viewer's input, whatever its protocol: keys by qnum or by keysym (US layout, with Shift
//! pressed around a character that needs it when the viewer does not hold Shift itself), the
//! button state as a mask (only changes are sent), wheel steps, absolute and relative motion.
//! It remembers what the viewer holds and releases all of it when the viewer goes away, so a
//! client that disconnects mid-drag or mid-chord never leaves a key stuck in the guest.

use std::collections::BTreeSet;

use tracing::trace;

use super::keymap::{QNUM_SHIFT_L, QNUM_SHIFT_R, keysym_to_qnum};
use crate::qemu::input::{Cmd, InputSink, MAX_QNUM, button};

/// Most wheel steps one event may ask for: more is a broken or hostile client.
pub const MAX_WHEEL_STEPS: u32 = 10;

/// One viewer's input state. Dropping it releases every key and button it still holds.
pub struct ViewerInput {
    sink: InputSink,
    keys: BTreeSet<u32>,
    buttons: u32,
    last: Option<(u32, u32)>,
}

impl ViewerInput {
    pub fn new(sink: InputSink) -> Self {
        Self {
            sink,
            keys: BTreeSet::new(),
            buttons: 0,
            last: None,
        }
    }

    /// Whether this viewer holds a Shift key.
    fn shift_held(&self) -> bool {
        self.keys.contains(&QNUM_SHIFT_L) || self.keys.contains(&QNUM_SHIFT_R)
    }

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
        self.sink.send(Cmd::Key { qnum, down }).await;
    }

    /// A key by X11 keysym through the US layout. A character that needs Shift gets a Shift
    /// press and release around its press when the viewer is not holding Shift itself.
    pub async fn keysym(&mut self, keysym: u32, down: bool) {
        let Some((qnum, needs_shift)) = keysym_to_qnum(keysym) else {
            trace!(keysym, "keysym not on a US layout; dropped");
            return;
        };
        if down && needs_shift && !self.shift_held() {
            self.key(QNUM_SHIFT_L, true).await;
            self.key(qnum, true).await;
            self.key(QNUM_SHIFT_L, false).await;
        } else {
            self.key(qnum, down).await;
        }
    }

    /// A press and release (lock keys brought in line with the client's state).
    pub async fn tap(&mut self, qnum: u32) {
        self.key(qnum, true).await;
        self.key(qnum, false).await;
    }

    /// Sets every button from a mask (bit n = `button::*` value n); only changes are sent.
    pub async fn buttons(&mut self, mask: u32) {
        let mask = mask & ((1 << button::COUNT) - 1);
        let changed = mask ^ self.buttons;
        for b in 0..button::COUNT {
            if changed & (1 << b) != 0 {
                let down = mask & (1 << b) != 0;
                self.sink.send(Cmd::Button { button: b, down }).await;
            }
        }
        self.buttons = mask;
    }

    /// `steps` wheel notches (`button::WHEEL_*`), each a press and a release; at most
    /// [`MAX_WHEEL_STEPS`].
    pub async fn wheel(&mut self, b: u32, steps: u32) {
        if !matches!(
            b,
            button::WHEEL_UP | button::WHEEL_DOWN | button::WHEEL_LEFT | button::WHEEL_RIGHT
        ) {
            return;
        }
        for _ in 0..steps.min(MAX_WHEEL_STEPS) {
            for down in [true, false] {
                self.sink.send(Cmd::Button { button: b, down }).await;
            }
        }
    }

    /// The pointer is at `(x, y)` in framebuffer pixels. Motion is dropped when the queue is
    /// full: the next position supersedes it.
    pub fn pointer(&mut self, x: u32, y: u32) {
        let (dx, dy) = match self.last {
            Some((lx, ly)) => (delta(x, lx), delta(y, ly)),
            None => (0, 0),
        };
        self.last = Some((x, y));
        if !self.sink.try_send(Cmd::Pointer { x, y, dx, dy }) {
            trace!("pointer motion dropped: input queue full");
        }
    }

    /// Relative motion (a client that grabbed the pointer sends deltas).
    pub fn relative(&mut self, dx: i32, dy: i32) {
        let (x, y) = self.last.unwrap_or((0, 0));
        if !self.sink.try_send(Cmd::Pointer { x, y, dx, dy }) {
            trace!("pointer motion dropped: input queue full");
        }
    }

    /// Releases everything held (also done on drop).
    pub fn release_all(&mut self) {
        for qnum in std::mem::take(&mut self.keys) {
            self.sink.try_send(Cmd::Key { qnum, down: false });
        }
        for b in 0..button::COUNT {
            if self.buttons & (1 << b) != 0 {
                self.sink.try_send(Cmd::Button {
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    fn viewer() -> (ViewerInput, mpsc::Receiver<Cmd>) {
        let (tx, rx) = mpsc::channel(64);
        (ViewerInput::new(InputSink::from_sender(tx)), rx)
    }

    fn drain(rx: &mut mpsc::Receiver<Cmd>) -> Vec<Cmd> {
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    fn k(qnum: u32, down: bool) -> Cmd {
        Cmd::Key { qnum, down }
    }

    #[tokio::test]
    async fn shift_is_synthesised_only_when_not_held() {
        let (mut v, mut rx) = viewer();
        v.keysym(u32::from(b'A'), true).await;
        v.keysym(u32::from(b'A'), false).await;
        assert_eq!(
            drain(&mut rx),
            [k(0x2a, true), k(0x1e, true), k(0x2a, false), k(0x1e, false)]
        );
        // The viewer holds right Shift itself: 'A' is just the key.
        v.key(QNUM_SHIFT_R, true).await;
        v.keysym(u32::from(b'A'), true).await;
        v.keysym(u32::from(b'A'), false).await;
        v.key(QNUM_SHIFT_R, false).await;
        assert_eq!(
            drain(&mut rx),
            [k(0x36, true), k(0x1e, true), k(0x1e, false), k(0x36, false)]
        );
        // Not on a US layout: nothing.
        v.keysym(0x20ac, true).await;
        assert!(drain(&mut rx).is_empty());
    }

    #[tokio::test]
    async fn releases_only_what_was_pressed_and_everything_on_leave() {
        let (mut v, mut rx) = viewer();
        v.key(0x1e, false).await; // never pressed
        v.key(0x1e, true).await;
        v.key(0x1d, true).await;
        v.buttons(1 << button::LEFT | 1 << button::RIGHT).await;
        v.buttons(1 << button::RIGHT).await;
        let _ = drain(&mut rx);
        drop(v);
        let mut left = drain(&mut rx);
        left.sort_by_key(|c| format!("{c:?}"));
        assert_eq!(
            left,
            [
                Cmd::Button {
                    button: button::RIGHT,
                    down: false
                },
                k(0x1d, false),
                k(0x1e, false)
            ]
        );
    }

    #[tokio::test]
    async fn wheel_steps_are_bounded_and_motion_carries_deltas() {
        let (mut v, mut rx) = viewer();
        v.wheel(button::WHEEL_DOWN, 1000).await;
        assert_eq!(drain(&mut rx).len(), 2 * MAX_WHEEL_STEPS as usize);
        v.wheel(button::LEFT, 1).await; // not a wheel
        assert!(drain(&mut rx).is_empty());
        v.pointer(10, 10);
        v.pointer(7, 12);
        assert_eq!(
            drain(&mut rx),
            [
                Cmd::Pointer {
                    x: 10,
                    y: 10,
                    dx: 0,
                    dy: 0
                },
                Cmd::Pointer {
                    x: 7,
                    y: 12,
                    dx: -3,
                    dy: 2
                }
            ]
        );
    }
}
