//! Session recording (`--record-dir`) of the real binary and a real QEMU: a VNC session of the
//! animating test guest becomes an MP4 file that Debian's ffprobe reads with its duration and
//! whose last picture, extracted by ffmpeg, matches QMP's screendump of that moment (and not the
//! screen before it); a sidecar killed mid-session leaves a playable file; and the directory
//! stays within `--record-max-bytes` while sessions come and go (old recordings are removed).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::qemu::{Video, Vm};
use common::x11::{compare, metric_value};
use common::{Sidecar, free_addr, pids_with_cmdline, wait_until};
use tokio::net::TcpStream;

const PASSWORD: &str = "record-pass";

// One QEMU at a time on the 2 cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A sidecar recording into `<its dir>/rec`, and the guest on its bus at 640x480.
async fn start(max: &str) -> (Sidecar, Vm, std::net::SocketAddr, PathBuf) {
    let vnc = free_addr();
    let dir = tempfile::tempdir().expect("tempdir");
    let rec = dir.path().join("rec");
    let sc = Sidecar::start_in(
        dir,
        &[
            "--vnc",
            &vnc.to_string(),
            "--record-dir",
            rec.to_str().expect("utf-8 path"),
            "--record-max-bytes",
            max,
        ],
        &[("VDI_PASSWORD", PASSWORD)],
    );
    sc.define_vm("desk", "vm-rec").await;
    let addr = format!("unix:path={}", sc.bus_socket().display());
    let mut vm = Vm::start(sc.dir.path(), &addr, Video::StdVga);
    vm.wait_ready();
    vm.guest("display vbe");
    vm.guest("mode 640 480");
    vm.guest("fill 21");
    assert!(
        wait_until(Duration::from_secs(30), || sc
            .log()
            .contains("listener registered")),
        "no attach:\n{}",
        sc.log()
    );
    // Drawn after the attach, so our framebuffer has the VBE surface (QEMU may have handed over
    // the text-mode one first) before any session starts: one file per session here.
    vm.guest("fill 21");
    tokio::time::sleep(Duration::from_millis(500)).await;
    (sc, vm, vnc, rec)
}

async fn viewer(vnc: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(vnc).await.expect("connect");
    common::rfb::handshake(&mut s, "003.008", Some(PASSWORD), true)
        .await
        .expect("login");
    s
}

fn recordings(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.retain(|p| p.extension().is_some_and(|x| x == "mp4"));
    v.sort();
    v
}

fn dir_bytes(dir: &Path) -> u64 {
    recordings(dir)
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// `ffprobe`'s view of `file`: (codec, width, height, duration in seconds, frames).
fn probe(file: &Path) -> Result<(String, u32, u32, f64, u64), String> {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-count_frames", "-select_streams", "v:0"])
        .args([
            "-show_entries",
            "stream=codec_name,width,height,nb_read_frames:format=duration",
            "-of",
            "default=noprint_wrappers=1",
        ])
        .arg(file)
        .output()
        .map_err(|e| format!("ffprobe (install ffmpeg): {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() || !err.trim().is_empty() {
        return Err(format!("ffprobe {}: {text}{err}", file.display()));
    }
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .map(str::to_owned)
            .ok_or_else(|| format!("no {k} in {text}"))
    };
    let num = |k: &str| -> Result<f64, String> {
        field(k)?.parse().map_err(|e| format!("{k}: {e} in {text}"))
    };
    Ok((
        field("codec_name")?,
        num("width")? as u32,
        num("height")? as u32,
        num("duration")?,
        num("nb_read_frames")? as u64,
    ))
}

/// The last picture of `file` as a PNG (ffmpeg decodes every frame, keeping the last).
fn last_frame(file: &Path, png: &Path) {
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-i"])
        .arg(file)
        .args(["-update", "1", "-fps_mode", "passthrough"])
        .arg(png)
        .output()
        .expect("ffmpeg");
    assert!(
        out.status.success() && png.exists(),
        "ffmpeg: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn psnr(a: &Path, b: &Path) -> f64 {
    let r = compare(a, b, "PSNR");
    metric_value(&r).unwrap_or_else(|| panic!("compare: {r}"))
}

/// Our dbus-daemon, which a killed sidecar cannot stop.
fn kill_bus(sc: &Sidecar) {
    for pid in pids_with_cmdline(&sc.dir.path().display().to_string()) {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_session_plays_back_the_screen_even_after_the_sidecar_is_killed() {
    let _serial = SERIAL.lock().await;
    let (mut sc, mut vm, vnc, rec) = start("64M").await;

    // Session 1: the guest animates, the viewer leaves: a finished file.
    let a = viewer(vnc).await;
    assert!(wait_until(Duration::from_secs(10), || !recordings(&rec).is_empty()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    vm.guest("animate 40");
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(a);
    assert!(
        wait_until(Duration::from_secs(10), || sc
            .log()
            .contains("recording ended")),
        "{}",
        sc.log()
    );
    let first = recordings(&rec);
    assert_eq!(first.len(), 1, "{first:?}\n{}", sc.log());
    let name = first[0]
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    assert!(
        name.contains("desk-vm-rec_vnc_127.0.0.1-"),
        "the file says whose session it was: {name}"
    );
    let (codec, w, h, secs, frames) = probe(&first[0]).expect("session 1 plays");
    assert_eq!((codec.as_str(), w, h), ("h264", 640, 480));
    assert!(
        (2.0..30.0).contains(&secs) && frames >= 3,
        "session 1: {secs} s, {frames} frames"
    );

    // Session 2: a new screen, still for a while, then the sidecar dies mid-session.
    let before = vm.screendump_file("before.ppm").0;
    let b = viewer(vnc).await;
    assert!(wait_until(Duration::from_secs(10), || recordings(&rec)
        .len()
        == 2));
    tokio::time::sleep(Duration::from_millis(500)).await;
    vm.guest("animate 10");
    // Flat areas and sharp edges (a desktop's windows), which H.264 keeps within 30 dB;
    // the noise of `fill` would not be a fair test of "the same picture".
    vm.guest("solid 204080");
    vm.guest("rect 100 100 200 150 ffa000");
    vm.guest("rect 400 300 120 80 00c040");
    let (now, _, _) = vm.screendump_file("now.ppm");
    // Longer than the recorder's flush of a still picture.
    tokio::time::sleep(Duration::from_secs(3)).await;
    sc.proc.signal("KILL");
    assert!(sc.proc.wait_timeout(Duration::from_secs(5)).is_some());
    kill_bus(&sc);
    drop(b);
    let second = recordings(&rec)
        .into_iter()
        .find(|p| !first.contains(p))
        .expect("second recording");
    let (_, _, _, secs, frames) = probe(&second).expect("a killed sidecar leaves a playable file");
    assert!(
        secs >= 1.0 && frames >= 2,
        "session 2: {secs} s, {frames} frames"
    );
    let png = sc.dir.path().join("last.png");
    last_frame(&second, &png);
    let (match_now, match_before) = (psnr(&png, &now), psnr(&png, &before));
    if match_now < 30.0 {
        let keep = std::env::temp_dir();
        let _ = std::fs::copy(&png, keep.join("vdi-record-last.png"));
        let _ = std::fs::copy(&now, keep.join("vdi-record-now.ppm"));
        let _ = std::fs::copy(&second, keep.join("vdi-record.mp4"));
        eprintln!("kept {}/vdi-record-*", keep.display());
    }
    eprintln!(
        "last picture vs screendump: {match_now:.1} dB (vs the screen before: {match_before:.1} dB)"
    );
    assert!(
        match_now >= 30.0 && match_now > match_before + 10.0,
        "the recording ends on the screen of that moment: {match_now:.1} dB, before {match_before:.1} dB"
    );
    drop(vm);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recordings_stay_within_the_size_bound() {
    let _serial = SERIAL.lock().await;
    let max: u64 = 1 << 20;
    let (sc, mut vm, vnc, rec) = start("1M").await;
    let mut peak = 0;
    // Sessions one after another, each with enough video to pass the bound together.
    for round in 0..4 {
        let v = viewer(vnc).await;
        let watch = {
            let rec = rec.clone();
            std::thread::spawn(move || {
                let mut peak = 0;
                for _ in 0..400 {
                    peak = peak.max(dir_bytes(&rec));
                    std::thread::sleep(Duration::from_millis(10));
                }
                peak
            })
        };
        vm.guest("scene video 3000");
        peak = peak.max(watch.join().expect("watch"));
        drop(v);
        assert!(wait_until(Duration::from_secs(10), || sc
            .log()
            .matches("recording ended")
            .count()
            > round));
        peak = peak.max(dir_bytes(&rec));
    }
    let log = sc.log();
    eprintln!(
        "peak {peak} bytes in the directory, {} files left",
        recordings(&rec).len()
    );
    assert!(peak <= max, "the directory held {peak} bytes, over {max}");
    assert!(
        log.contains("old recording removed") || log.contains("would pass --record-max-bytes"),
        "the bound was reached and acted on:\n{log}"
    );
    assert!(!recordings(&rec).is_empty(), "the newest recording stays");
}
