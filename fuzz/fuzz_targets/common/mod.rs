//! What several targets set up the same way.

use vdi_sidecar::pixman::X8R8G8B8;
use vdi_sidecar::qemu::source::Consoles;
use vdi_sidecar::session::Desktop;

/// A desktop showing a `w`x`h` frame of varied pixels, no QEMU behind it; call inside a runtime
/// (the input task is spawned on it).
pub fn desktop_with_frame(w: u32, h: u32) -> Desktop {
    let (consoles, input) = Consoles::new();
    tokio::spawn(input);
    let px: Vec<u8> = (0..w * h)
        .flat_map(|i| i.wrapping_mul(2_654_435_761).to_ne_bytes())
        .collect();
    consoles
        .primary()
        .scanout(w, h, w * 4, X8R8G8B8, &px)
        .expect("scanout");
    Desktop::primary(&consoles)
}
