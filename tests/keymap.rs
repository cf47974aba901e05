//! The keysym table in src/session/keymap_us.rs is what tools/gen-keymap.py generates from QEMU's
//! en-us keymap and X11's keysymdef.h (both Debian packages): nothing typed by hand, nothing stale.

#[test]
fn generated_keymap_is_current() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new("python3")
        .arg(root.join("tools/gen-keymap.py"))
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "gen-keymap.py failed (install qemu-system-data and x11proto-dev): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let committed = std::fs::read(root.join("src/session/keymap_us.rs")).expect("keymap_us.rs");
    assert!(
        out.stdout == committed,
        "src/session/keymap_us.rs is stale: run tools/gen-keymap.py > src/session/keymap_us.rs"
    );
}
