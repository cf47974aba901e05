//! The real browser: Debian Chromium driven by playwright-core (`web/browser-check.mjs`) against
//! our web listener serving noVNC, and the screendump oracle it compares its canvas with.

use std::path::{Path, PathBuf};

use super::qemu::Vm;

pub fn web_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("web")
}

/// The noVNC that `npm install` in `web/` put there.
pub fn novnc() -> PathBuf {
    web_dir().join("node_modules/@novnc/novnc")
}

/// Runs web/browser-check.mjs (`mode`: view, video, badpass, clipboard); returns its JSON line.
pub fn check(url: &str, password: &str, mode: &str, out: &Path) -> String {
    let o = std::process::Command::new("node")
        .current_dir(web_dir())
        .arg("browser-check.mjs")
        .args([url, password, mode])
        .arg(out)
        .output()
        .expect("node (install nodejs; npm install in web/)");
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "browser check failed: {stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    stdout
}

/// A screendump as the page's oracle: `dir/oracle.rgba` ("W H" line, then RGBA), written
/// under another name and renamed so a waiting page never reads half of it.
pub fn write_oracle(vm: &mut Vm, dir: &Path) -> (u32, u32) {
    let (w, h, px) = vm.screendump();
    let mut oracle = format!("{w} {h}\n").into_bytes();
    for p in px {
        oracle.extend_from_slice(&[(p >> 16) as u8, (p >> 8) as u8, p as u8, 255]);
    }
    let tmp = dir.join("oracle.tmp");
    std::fs::write(&tmp, oracle).expect("oracle");
    std::fs::rename(&tmp, dir.join("oracle.rgba")).expect("oracle");
    (w, h)
}
