//! X11 keysyms to QEMU key numbers: plain RFB KeyEvents from clients that do not send QEMU
//! extended key events, and RDP Unicode key events. The table is generated (tools/gen-keymap.py)
//! for a US layout; keys it cannot reach (AltGr levels, non-US characters) are dropped with a
//! trace line.

#[rustfmt::skip]
#[path = "keymap_us.rs"]
mod keymap_us;

/// Left and right Shift's QEMU key numbers.
pub const QNUM_SHIFT_L: u32 = 0x2a;
pub const QNUM_SHIFT_R: u32 = 0x36;

pub const XK_SHIFT_L: u32 = 0xffe1;
pub const XK_SHIFT_R: u32 = 0xffe2;

/// The key producing `keysym` on a US layout, and whether Shift must be held for it.
pub fn keysym_to_qnum(keysym: u32) -> Option<(u32, bool)> {
    let t = keymap_us::KEYSYM_TO_QNUM;
    t.binary_search_by_key(&keysym, |e| e.0)
        .ok()
        .map(|i| (u32::from(t[i].1), t[i].2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_keys() {
        assert_eq!(keysym_to_qnum(u32::from(b'a')), Some((0x1e, false)));
        assert_eq!(keysym_to_qnum(u32::from(b'A')), Some((0x1e, true)));
        assert_eq!(keysym_to_qnum(u32::from(b'!')), Some((0x02, true)));
        assert_eq!(keysym_to_qnum(0xff0d), Some((0x1c, false))); // Return
        assert_eq!(keysym_to_qnum(0xff52), Some((0xc8, false))); // Up
        assert_eq!(keysym_to_qnum(0xffe4), Some((0x9d, false))); // Control_R
        assert_eq!(keysym_to_qnum(0xff63), Some((0xd2, false))); // Insert
        assert_eq!(keysym_to_qnum(0xffff), Some((0xd3, false))); // Delete
        assert_eq!(keysym_to_qnum(0xffbe), Some((0x3b, false))); // F1
        assert_eq!(keysym_to_qnum(XK_SHIFT_L), Some((QNUM_SHIFT_L, false)));
        assert_eq!(keysym_to_qnum(0x20ac), None); // EuroSign: not on a US layout
    }

    #[test]
    fn table_is_sorted_and_unique() {
        let t = keymap_us::KEYSYM_TO_QNUM;
        assert!(t.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(t.len() > 150);
    }
}
