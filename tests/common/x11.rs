//! GUI clients under Xvfb: the X server, TigerVNC's `vncviewer` with its window found, and
//! ImageMagick comparisons. Everything is killed by PID.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use super::{Proc, wait_until};

/// An X server for GUI clients, killed by PID when dropped.
pub struct Xvfb {
    _proc: Proc,
    pub display: String,
}

impl Xvfb {
    pub fn start() -> Xvfb {
        for n in 90..140 {
            if Path::new(&format!("/tmp/.X{n}-lock")).exists() {
                continue;
            }
            let child = Command::new("Xvfb")
                .args([
                    &format!(":{n}"),
                    "-screen",
                    "0",
                    "1280x1024x24",
                    "-nolisten",
                    "tcp",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("Xvfb (install xvfb)");
            let p = Proc {
                child,
                name: "Xvfb",
            };
            let sock = format!("/tmp/.X11-unix/X{n}");
            if wait_until(Duration::from_secs(10), || Path::new(&sock).exists()) {
                return Xvfb {
                    _proc: p,
                    display: format!(":{n}"),
                };
            }
        }
        panic!("no X display could be started");
    }

    pub fn xdotool(&self, args: &[&str]) -> Output {
        Command::new("xdotool")
            .args(args)
            .env("DISPLAY", &self.display)
            .output()
            .expect("xdotool (install xdotool)")
    }

    /// Saves window `id` as an image; false when the window cannot be captured (yet).
    pub fn screenshot(&self, window: &str, to: &Path) -> bool {
        Command::new("/usr/bin/import")
            .args(["-window", window])
            .arg(to)
            .env("DISPLAY", &self.display)
            .status()
            .is_ok_and(|s| s.success())
    }
}

/// TigerVNC's viewer with its desktop window on screen.
pub struct TigerVnc {
    _viewer: Proc,
    pub window: String,
    pub log: PathBuf,
}

impl TigerVnc {
    /// Starts `vncviewer args… 127.0.0.1::port` and waits for a window titled `title`. A second
    /// attempt is made if the first never shows one; the panic message carries both logs.
    pub fn open(
        x: &Xvfb,
        dir: &Path,
        args: &[String],
        env: &[(&str, &str)],
        port: u16,
        title: &str,
    ) -> TigerVnc {
        let mut why = String::new();
        for attempt in 0..2 {
            let log = dir.join(format!("vncviewer-{attempt}.log"));
            let viewer = Command::new("vncviewer")
                .args(args)
                .arg(format!("127.0.0.1::{port}"))
                .env("DISPLAY", &x.display)
                .envs(env.iter().copied())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).expect("log file"))
                .spawn()
                .expect("vncviewer (install tigervnc-viewer)");
            let viewer = Proc {
                child: viewer,
                name: "vncviewer",
            };
            let mut window = String::new();
            let found = wait_until(Duration::from_secs(30), || {
                std::thread::sleep(Duration::from_millis(200));
                window = String::from_utf8_lossy(&x.xdotool(&["search", "--name", title]).stdout)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                !window.is_empty()
            });
            if found {
                return TigerVnc {
                    _viewer: viewer,
                    window,
                    log,
                };
            }
            // Say why: the windows that did open (an error dialog?) and the viewer's log.
            let names = x.xdotool(&["search", "--name", ".", "getwindowname", "%@"]);
            why += &format!(
                "\nattempt {attempt}: windows {:?}; vncviewer log:\n{}",
                String::from_utf8_lossy(&names.stdout),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        panic!("TigerVNC window {title:?} never appeared:{why}");
    }

    /// Waits until a screenshot of the window matches `oracle` by `accept`; returns the last
    /// comparison result.
    pub fn wait_matches(
        &self,
        x: &Xvfb,
        shot: &Path,
        oracle: &Path,
        metric: &str,
        accept: impl Fn(f64) -> bool,
    ) -> (bool, String) {
        window_matches(
            x,
            &self.window,
            shot,
            oracle,
            metric,
            Duration::from_secs(20),
            accept,
        )
    }
}

/// Waits up to `timeout` until a screenshot of `window` compared with `oracle` by `metric` is
/// accepted; returns whether it was and the last comparison result.
pub fn window_matches(
    x: &Xvfb,
    window: &str,
    shot: &Path,
    oracle: &Path,
    metric: &str,
    timeout: Duration,
    accept: impl Fn(f64) -> bool,
) -> (bool, String) {
    let mut last = String::new();
    let ok = wait_until(timeout, || {
        last = if x.screenshot(window, shot) {
            compare(shot, oracle, metric)
        } else {
            "no screenshot".into()
        };
        metric_value(&last).is_some_and(&accept)
    });
    (ok, last)
}

/// ImageMagick `compare -metric M a b`: what it prints (AE: differing pixels; PSNR: dB).
pub fn compare(a: &Path, b: &Path, metric: &str) -> String {
    let cmp = Command::new("/usr/bin/compare")
        .args(["-metric", metric])
        .arg(a)
        .arg(b)
        .arg("null:")
        .output()
        .expect("/usr/bin/compare (install imagemagick)");
    String::from_utf8_lossy(&cmp.stderr).trim().to_owned()
}

/// The number `compare` printed first ("inf" for identical images under PSNR).
pub fn metric_value(s: &str) -> Option<f64> {
    let first = s.split_whitespace().next()?;
    if first == "inf" {
        return Some(f64::INFINITY);
    }
    first.parse().ok()
}

/// Writes a TigerVNC password file for `password` (`vncpasswd -f`).
pub fn vncpasswd(password: &str, path: &Path) {
    use std::io::Write;
    let mut p = Command::new("vncpasswd")
        .arg("-f")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("vncpasswd (install tigervnc-tools)");
    p.stdin
        .take()
        .expect("stdin")
        .write_all(format!("{password}\n").as_bytes())
        .expect("write");
    let out = p.wait_with_output().expect("vncpasswd");
    std::fs::write(path, out.stdout).expect("passwd file");
}
