//! RDP input to guest input, exactly: scancodes become QEMU key numbers with the E0 flag kept,
//! Pause (sent as E1 Ctrl + NumLock) becomes Pause, Synchronize taps the lock keys whose state
//! differs from the guest's LEDs, Unicode characters go through the shared keysym translation,
//! and every mouse button and both wheels reach the guest.
//!
//! Both input paths arrive as typed [`Event`]s: fast-path PDUs (decoded here with every flag)
//! and the slow-path events ironrdp decodes. [`Translator`] is pure (events in, actions out) so
//! each rule is unit tested; [`drive`] applies the actions through the session's
//! [`ViewerInput`], which releases whatever is still held when the session ends.

use bytes::Bytes;
use ironrdp::pdu::input::fast_path::{
    FastPathInput, FastPathInputEvent, KeyboardFlags, SynchronizeFlags,
};
use ironrdp::pdu::input::mouse::PointerFlags;
use ironrdp::pdu::input::mouse_rel::PointerRelFlags;
use ironrdp::pdu::input::mouse_x::PointerXFlags;
use tokio::sync::mpsc;
use tracing::{debug, trace};

use crate::qemu::control::{ConsoleControl, led};
use crate::qemu::input::button;
use crate::session::input::{MAX_WHEEL_STEPS, ViewerInput};

/// Set-1 scancodes the translator treats specially.
mod scancode {
    pub const CTRL: u8 = 0x1d;
    pub const NUM_LOCK: u8 = 0x45;
    pub const CAPS_LOCK: u8 = 0x3a;
    pub const SCROLL_LOCK: u8 = 0x46;
}

/// QEMU's key number for Pause (`Q_KEY_CODE_PAUSE`).
pub const QNUM_PAUSE: u32 = 0xc6;

/// One wheel notch in RDP rotation units.
const WHEEL_DELTA: i32 = 120;

/// An input event in the session's terms, whichever path it came by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A set-1 scancode; `extended` is the E0 prefix, `extended1` the E1 prefix (Pause).
    Key {
        code: u8,
        extended: bool,
        extended1: bool,
        down: bool,
    },
    /// A UTF-16 code unit typed without a scancode.
    Unicode {
        ch: u16,
        down: bool,
    },
    /// The client's lock keys (`led::*` bits).
    Sync(u32),
    /// The pointer is at (x, y).
    Move {
        x: u16,
        y: u16,
    },
    Button {
        button: u32,
        down: bool,
    },
    /// Wheel rotation in RDP units (120 per notch); positive is up, or right.
    Wheel {
        horizontal: bool,
        units: i32,
    },
    Relative {
        dx: i16,
        dy: i16,
    },
}

/// What reaches the session's input task from the connection.
#[derive(Debug)]
pub enum Inbound {
    /// A whole fast-path input PDU, as framed by the transport.
    FastPath(Bytes),
    /// Events ironrdp decoded from slow-path Input Event PDUs.
    Event(Event),
}

/// Typed events from one fast-path event, with every flag kept.
pub fn from_fast_path(event: &FastPathInputEvent, out: &mut Vec<Event>) {
    match *event {
        FastPathInputEvent::KeyboardEvent(flags, code) => out.push(Event::Key {
            code,
            extended: flags.contains(KeyboardFlags::EXTENDED),
            extended1: flags.contains(KeyboardFlags::EXTENDED1),
            down: !flags.contains(KeyboardFlags::RELEASE),
        }),
        FastPathInputEvent::UnicodeKeyboardEvent(flags, ch) => out.push(Event::Unicode {
            ch,
            down: !flags.contains(KeyboardFlags::RELEASE),
        }),
        FastPathInputEvent::SyncEvent(flags) => out.push(Event::Sync(sync_leds(flags))),
        FastPathInputEvent::MouseEvent(m) => {
            let f = m.flags;
            if f.intersects(PointerFlags::VERTICAL_WHEEL | PointerFlags::HORIZONTAL_WHEEL) {
                // Wheel events carry no position worth moving to (mstsc sends 0,0).
                out.push(Event::Wheel {
                    horizontal: f.contains(PointerFlags::HORIZONTAL_WHEEL),
                    units: wheel_units(f.bits()),
                });
                return;
            }
            out.push(Event::Move {
                x: m.x_position,
                y: m.y_position,
            });
            let down = f.contains(PointerFlags::DOWN);
            for (flag, b) in [
                (PointerFlags::LEFT_BUTTON, button::LEFT),
                (PointerFlags::RIGHT_BUTTON, button::RIGHT),
                (PointerFlags::MIDDLE_BUTTON_OR_WHEEL, button::MIDDLE),
            ] {
                if f.contains(flag) {
                    out.push(Event::Button { button: b, down });
                }
            }
        }
        FastPathInputEvent::MouseEventEx(m) => {
            out.push(Event::Move {
                x: m.x_position,
                y: m.y_position,
            });
            let down = m.flags.contains(PointerXFlags::DOWN);
            for (flag, b) in [
                (PointerXFlags::BUTTON1, button::SIDE),
                (PointerXFlags::BUTTON2, button::EXTRA),
            ] {
                if m.flags.contains(flag) {
                    out.push(Event::Button { button: b, down });
                }
            }
        }
        FastPathInputEvent::MouseEventRel(m) => {
            let f = m.flags;
            if f.contains(PointerRelFlags::MOVE) && (m.x_delta != 0 || m.y_delta != 0) {
                out.push(Event::Relative {
                    dx: m.x_delta,
                    dy: m.y_delta,
                });
            }
            let down = f.contains(PointerRelFlags::DOWN);
            for (flag, b) in [
                (PointerRelFlags::BUTTON1, button::LEFT),
                (PointerRelFlags::BUTTON2, button::RIGHT),
                (PointerRelFlags::BUTTON3, button::MIDDLE),
                (PointerRelFlags::XBUTTON1, button::SIDE),
                (PointerRelFlags::XBUTTON2, button::EXTRA),
            ] {
                if f.contains(flag) {
                    out.push(Event::Button { button: b, down });
                }
            }
        }
        FastPathInputEvent::QoeEvent(_) => {}
    }
}

/// Wheel rotation: 9-bit two's complement units in the low pointer-flag bits.
fn wheel_units(flags: u16) -> i32 {
    let raw = i32::from(flags & 0x1ff);
    if raw & 0x100 != 0 { raw - 0x200 } else { raw }
}

/// The LED bits a Synchronize event asks for.
pub fn sync_leds(flags: SynchronizeFlags) -> u32 {
    let mut leds = 0;
    if flags.contains(SynchronizeFlags::SCROLL_LOCK) {
        leds |= led::SCROLL;
    }
    if flags.contains(SynchronizeFlags::NUM_LOCK) {
        leds |= led::NUM;
    }
    if flags.contains(SynchronizeFlags::CAPS_LOCK) {
        leds |= led::CAPS;
    }
    leds
}

/// What the guest must be told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Key {
        qnum: u32,
        down: bool,
    },
    /// A character by X11 keysym (Unicode input), through the shared US-layout translation.
    Keysym {
        keysym: u32,
        down: bool,
    },
    /// The state of every button (bit n = `button::*` value n).
    Buttons(u32),
    /// One wheel notch (`button::WHEEL_*`): press and release.
    Wheel(u32),
    Absolute {
        x: u32,
        y: u32,
    },
    Relative {
        dx: i32,
        dy: i32,
    },
    /// Tap the lock keys whose state differs from the guest's LEDs (`led::*` bits wanted).
    SyncLocks(u32),
}

/// Per-session translation state.
#[derive(Debug, Default)]
pub struct Translator {
    buttons: u32,
    /// An E1-prefixed Ctrl went down: the next NumLock is Pause.
    pause_prefix: bool,
    /// Pause is held (its release comes as a NumLock release).
    pause_down: bool,
}

impl Translator {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn translate(&mut self, event: &Event, out: &mut Vec<Action>) {
        match *event {
            Event::Key {
                code,
                extended,
                extended1,
                down,
            } => self.key(code, extended, extended1, down, out),
            Event::Unicode { ch, down } => {
                if let Some(keysym) = unicode_keysym(ch) {
                    out.push(Action::Keysym { keysym, down });
                }
            }
            Event::Sync(leds) => out.push(Action::SyncLocks(leds)),
            Event::Move { x, y } => out.push(Action::Absolute {
                x: u32::from(x),
                y: u32::from(y),
            }),
            Event::Button { button, down } => self.button(button, down, out),
            Event::Wheel { horizontal, units } => wheel(units, horizontal, out),
            Event::Relative { dx, dy } => out.push(Action::Relative {
                dx: i32::from(dx),
                dy: i32::from(dy),
            }),
        }
    }

    fn button(&mut self, b: u32, down: bool, out: &mut Vec<Action>) {
        let bit = 1 << b;
        let mask = if down {
            self.buttons | bit
        } else {
            self.buttons & !bit
        };
        if mask != self.buttons {
            self.buttons = mask;
            out.push(Action::Buttons(mask));
        }
    }

    fn key(
        &mut self,
        code: u8,
        extended: bool,
        extended1: bool,
        down: bool,
        out: &mut Vec<Action>,
    ) {
        // Pause has no make/break code of its own: clients send E1 1D 45 (E1-flagged Ctrl, then
        // NumLock) and the release the same way.
        if extended1 {
            if code == scancode::CTRL {
                self.pause_prefix = down;
            }
            return;
        }
        if code == scancode::NUM_LOCK && !extended {
            if down && self.pause_prefix {
                self.pause_prefix = false;
                self.pause_down = true;
                out.push(Action::Key {
                    qnum: QNUM_PAUSE,
                    down: true,
                });
                return;
            }
            if !down && self.pause_down {
                self.pause_down = false;
                out.push(Action::Key {
                    qnum: QNUM_PAUSE,
                    down: false,
                });
                return;
            }
        }
        self.pause_prefix = false;
        let qnum = if extended {
            u32::from(code & 0x7f) | 0x80
        } else {
            u32::from(code)
        };
        out.push(Action::Key { qnum, down });
    }
}

/// The X11 keysym of a UTF-16 code unit (Latin-1 is the keysym itself; controls have their own).
fn unicode_keysym(ch: u16) -> Option<u32> {
    let cp = u32::from(ch);
    Some(match cp {
        0x20..=0x7e | 0xa0..=0xff => cp,
        0x08 => 0xff08, // BackSpace
        0x09 => 0xff09, // Tab
        0x0d => 0xff0d, // Return
        0x1b => 0xff1b, // Escape
        // Surrogate halves are not characters on their own.
        0xd800..=0xdfff => return None,
        _ => 0x0100_0000 | cp,
    })
}

/// Wheel rotation in units, 120 per notch; positive is away from the user (up) or to the right.
fn wheel(units: i32, horizontal: bool, out: &mut Vec<Action>) {
    if units == 0 {
        return;
    }
    let max = i32::try_from(MAX_WHEEL_STEPS).unwrap_or(10);
    let steps = ((units.saturating_abs() + WHEEL_DELTA / 2) / WHEEL_DELTA).clamp(1, max);
    let b = match (horizontal, units > 0) {
        (false, true) => button::WHEEL_UP,
        (false, false) => button::WHEEL_DOWN,
        (true, true) => button::WHEEL_RIGHT,
        (true, false) => button::WHEEL_LEFT,
    };
    for _ in 0..steps {
        out.push(Action::Wheel(b));
    }
}

/// Lock keys (scancode, LED bit) tapped to bring the guest in line with a Synchronize event.
const LOCKS: [(u8, u32); 3] = [
    (scancode::CAPS_LOCK, led::CAPS),
    (scancode::NUM_LOCK, led::NUM),
    (scancode::SCROLL_LOCK, led::SCROLL),
];

/// Applies one session's input to the guest until the channel closes; everything still held is
/// released when it does.
pub async fn drive(
    mut input: ViewerInput,
    control: ConsoleControl,
    mut rx: mpsc::Receiver<Inbound>,
) {
    let mut translator = Translator::new();
    let mut events = Vec::new();
    let mut actions = Vec::new();
    while let Some(inbound) = rx.recv().await {
        events.clear();
        match inbound {
            Inbound::FastPath(pdu) => match ironrdp::core::decode::<FastPathInput>(&pdu) {
                Ok(decoded) => {
                    for e in decoded.input_events() {
                        from_fast_path(e, &mut events);
                    }
                }
                Err(e) => debug!(error = %e, "undecodable fast-path input dropped"),
            },
            Inbound::Event(e) => events.push(e),
        }
        actions.clear();
        for e in &events {
            translator.translate(e, &mut actions);
        }
        for action in &actions {
            apply(&control, &mut input, *action).await;
        }
    }
    trace!("RDP input ended");
}

async fn apply(control: &ConsoleControl, input: &mut ViewerInput, action: Action) {
    match action {
        Action::Key { qnum, down } => input.key(qnum, down).await,
        Action::Keysym { keysym, down } => input.keysym(keysym, down).await,
        Action::Buttons(mask) => input.buttons(mask).await,
        Action::Wheel(b) => input.wheel(b, 1).await,
        Action::Absolute { x, y } => input.pointer(x, y),
        Action::Relative { dx, dy } => input.relative(dx, dy),
        Action::SyncLocks(wanted) => {
            let have = control.leds();
            for (code, bit) in LOCKS {
                if (have ^ wanted) & bit != 0 {
                    input.tap(u32::from(code)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ironrdp::pdu::input::{MousePdu, MouseRelPdu, MouseXPdu};

    /// Fast-path events through the typed events and the translator.
    fn run(events: &[FastPathInputEvent]) -> Vec<Action> {
        let mut typed = Vec::new();
        for e in events {
            from_fast_path(e, &mut typed);
        }
        let mut t = Translator::new();
        let mut out = Vec::new();
        for e in &typed {
            t.translate(e, &mut out);
        }
        out
    }

    fn key(code: u8, flags: KeyboardFlags) -> FastPathInputEvent {
        FastPathInputEvent::KeyboardEvent(flags, code)
    }

    fn k(qnum: u32, down: bool) -> Action {
        Action::Key { qnum, down }
    }

    fn mouse(flags: PointerFlags, x: u16, y: u16) -> FastPathInputEvent {
        FastPathInputEvent::MouseEvent(MousePdu {
            flags,
            number_of_wheel_rotation_units: 0,
            x_position: x,
            y_position: y,
        })
    }

    #[test]
    fn extended_keys_keep_the_e0_bit() {
        let up = KeyboardFlags::RELEASE;
        let e0 = KeyboardFlags::EXTENDED;
        let got = run(&[
            key(0x48, e0),                     // Up arrow
            key(0x48, e0 | up),                //
            key(0x48, KeyboardFlags::empty()), // keypad 8
            key(0x1d, e0),                     // right Ctrl
            key(0x52, e0),                     // Insert
            key(0x37, e0),                     // PrintScreen
        ]);
        assert_eq!(
            got,
            [
                k(0xc8, true),
                k(0xc8, false),
                k(0x48, true),
                k(0x9d, true),
                k(0xd2, true),
                k(0xb7, true)
            ]
        );
    }

    #[test]
    fn pause_from_e1_ctrl_numlock() {
        let e1 = KeyboardFlags::EXTENDED1;
        let up = KeyboardFlags::RELEASE;
        let got = run(&[
            key(0x1d, e1),
            key(0x45, KeyboardFlags::empty()),
            key(0x1d, e1 | up),
            key(0x45, up),
            // A real NumLock afterwards is NumLock.
            key(0x45, KeyboardFlags::empty()),
            key(0x45, up),
        ]);
        assert_eq!(
            got,
            [
                k(QNUM_PAUSE, true),
                k(QNUM_PAUSE, false),
                k(0x45, true),
                k(0x45, false)
            ]
        );
    }

    #[test]
    fn every_button_and_both_wheels() {
        let d = PointerFlags::DOWN;
        let got = run(&[
            mouse(PointerFlags::MOVE, 10, 20),
            mouse(PointerFlags::LEFT_BUTTON | d, 11, 21),
            mouse(PointerFlags::MIDDLE_BUTTON_OR_WHEEL | d, 11, 21),
            mouse(PointerFlags::LEFT_BUTTON, 11, 21),
            mouse(PointerFlags::MIDDLE_BUTTON_OR_WHEEL, 11, 21),
            mouse(PointerFlags::RIGHT_BUTTON | d, 11, 21),
            mouse(PointerFlags::RIGHT_BUTTON, 11, 21),
            // FreeRDP's encodings: up +120, down -120, left -120 (horizontal), right +120.
            mouse(PointerFlags::from_bits_retain(0x0200 | 0x0078), 0, 0),
            mouse(
                PointerFlags::from_bits_retain(0x0200 | 0x0100 | 0x0088),
                0,
                0,
            ),
            mouse(
                PointerFlags::from_bits_retain(0x0400 | 0x0100 | 0x0088),
                0,
                0,
            ),
            mouse(PointerFlags::from_bits_retain(0x0400 | 0x0078), 0, 0),
            mouse(PointerFlags::from_bits_retain(0x0200 | 0x00f0), 0, 0), // two notches
        ]);
        let abs = |x, y| Action::Absolute { x, y };
        assert_eq!(
            got,
            [
                abs(10, 20),
                abs(11, 21),
                Action::Buttons(1 << button::LEFT),
                abs(11, 21),
                Action::Buttons(1 << button::LEFT | 1 << button::MIDDLE),
                abs(11, 21),
                Action::Buttons(1 << button::MIDDLE),
                abs(11, 21),
                Action::Buttons(0),
                abs(11, 21),
                Action::Buttons(1 << button::RIGHT),
                abs(11, 21),
                Action::Buttons(0),
                Action::Wheel(button::WHEEL_UP),
                Action::Wheel(button::WHEEL_DOWN),
                Action::Wheel(button::WHEEL_LEFT),
                Action::Wheel(button::WHEEL_RIGHT),
                Action::Wheel(button::WHEEL_UP),
                Action::Wheel(button::WHEEL_UP),
            ]
        );
    }

    #[test]
    fn hostile_wheel_is_bounded() {
        // -256 units, the largest magnitude 9 bits hold.
        let got = run(&[mouse(PointerFlags::from_bits_retain(0x0200 | 0x0100), 0, 0)]);
        assert_eq!(got, vec![Action::Wheel(button::WHEEL_DOWN); 2]);
        let got = run(&[mouse(PointerFlags::from_bits_retain(0x0200), 0, 0)]);
        assert!(got.is_empty());
    }

    #[test]
    fn extra_buttons_and_relative_motion() {
        let got = run(&[
            FastPathInputEvent::MouseEventEx(MouseXPdu {
                flags: PointerXFlags::BUTTON1 | PointerXFlags::DOWN,
                x_position: 5,
                y_position: 6,
            }),
            FastPathInputEvent::MouseEventEx(MouseXPdu {
                flags: PointerXFlags::BUTTON2 | PointerXFlags::DOWN,
                x_position: 5,
                y_position: 6,
            }),
            FastPathInputEvent::MouseEventRel(MouseRelPdu {
                flags: PointerRelFlags::MOVE,
                x_delta: -3,
                y_delta: 4,
            }),
            FastPathInputEvent::MouseEventRel(MouseRelPdu {
                flags: PointerRelFlags::BUTTON3 | PointerRelFlags::DOWN,
                x_delta: 0,
                y_delta: 0,
            }),
        ]);
        let side = 1 << button::SIDE;
        let extra = 1 << button::EXTRA;
        assert_eq!(
            got,
            [
                Action::Absolute { x: 5, y: 6 },
                Action::Buttons(side),
                Action::Absolute { x: 5, y: 6 },
                Action::Buttons(side | extra),
                Action::Relative { dx: -3, dy: 4 },
                Action::Buttons(side | extra | 1 << button::MIDDLE),
            ]
        );
    }

    #[test]
    fn unicode_becomes_keysyms() {
        let down = KeyboardFlags::empty();
        let up = KeyboardFlags::RELEASE;
        let got = run(&[
            FastPathInputEvent::UnicodeKeyboardEvent(down, u16::from(b'A')),
            FastPathInputEvent::UnicodeKeyboardEvent(up, u16::from(b'A')),
            FastPathInputEvent::UnicodeKeyboardEvent(down, 0x0d),
            FastPathInputEvent::UnicodeKeyboardEvent(down, 0x20ac),
            FastPathInputEvent::UnicodeKeyboardEvent(down, 0xd83d), // a lone surrogate
        ]);
        let ks = |keysym, down| Action::Keysym { keysym, down };
        assert_eq!(
            got,
            [
                ks(0x41, true),
                ks(0x41, false),
                ks(0xff0d, true),
                ks(0x0100_20ac, true)
            ]
        );
    }

    #[test]
    fn synchronize_names_the_wanted_leds() {
        let got = run(&[FastPathInputEvent::SyncEvent(
            SynchronizeFlags::NUM_LOCK | SynchronizeFlags::CAPS_LOCK,
        )]);
        assert_eq!(got, [Action::SyncLocks(led::NUM | led::CAPS)]);
    }

    #[test]
    fn decodes_fast_path_input_with_every_flag() {
        // Two events: E1-flagged Ctrl (Pause prefix), then a middle-button press at 7,9.
        let pdu = [
            0x08, 11, // header: 2 events, length 11
            0x04, 0x1d, // scancode event, flags EXTENDED1
            0x20, 0x00, 0xc0, 7, 0, 9, 0, // mouse event, flags DOWN|MIDDLE
        ];
        let input: FastPathInput = ironrdp::core::decode(&pdu).expect("decodes");
        let mut events = Vec::new();
        for e in input.input_events() {
            from_fast_path(e, &mut events);
        }
        assert_eq!(
            events,
            [
                Event::Key {
                    code: 0x1d,
                    extended: false,
                    extended1: true,
                    down: true
                },
                Event::Move { x: 7, y: 9 },
                Event::Button {
                    button: button::MIDDLE,
                    down: true
                }
            ]
        );
    }
}
