//! First RDP figures: FreeRDP 3 (`xfreerdp3` under Xvfb) connected to our RDP server while the
//! test guest animates full screen, once per client mode (FreeRDP's defaults = RemoteFX, and
//! `-gfx` = uncompressed surface bits). The server counts what it sends; rounds alternate between
//! modes and the table gives medians. QEMU has no RDP server of its own to compare with; compare
//! with `vnc_fps` for the same guest.
//!
//! Run: `cargo run --release --example rdp_fps [-- SECONDS_PER_WINDOW ROUNDS]` (needs QEMU 10 with
//! the D-Bus display, Xvfb, freerdp3-x11 and the guest from tests/guest/build.sh).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;
use vdi_sidecar::demo::{DemoConfig, run};
use vdi_sidecar::rdp::{RdpConfig, RdpStats};
use vdi_sidecar::tls::{TlsIdentity, default_names};

const WIDTH: u32 = 800;
const HEIGHT: u32 = 600;
const PASSWORD: &str = "bench-pass1";

struct Sample {
    fps: f64,
    bytes_per_frame: f64,
    cpu_ms_per_frame: f64,
}

/// Kills the child (by PID) when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let secs: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(6);
    let rounds: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(3);

    let out = Command::new("tests/guest/build.sh")
        .output()
        .context("running tests/guest/build.sh (run from the repository root)")?;
    let guest = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .map(str::to_owned)
        .context("guest build printed nothing")?;

    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let tls = TlsIdentity::generate(&default_names(&[]))?;
    let rdp = RdpConfig::new(tls, Some(("vdi".into(), PASSWORD.into())));
    let stats = Arc::clone(&rdp.stats);
    let stop = CancellationToken::new();
    let cfg = DemoConfig {
        kernel: format!("{guest}/vmlinuz").into(),
        initrd: format!("{guest}/initrd.gz").into(),
        qemu: "qemu-system-x86_64".into(),
        viewers: vdi_sidecar::viewers::Viewers {
            vnc: None,
            rdp: Some((SocketAddr::from(([127, 0, 0, 1], port)), Arc::new(rdp))),
            web: None,
        },
        width: WIDTH,
        height: HEIGHT,
        extra_qemu_args: Vec::new(),
        guest_commands: vec!["animate 10000000".into()],
    };
    let demo = tokio::spawn(run(cfg, stop.clone()));

    let display = ":77";
    let _xvfb = Killed(
        Command::new("Xvfb")
            .args([display, "-screen", "0", "1280x1024x24", "-nolisten", "tcp"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("Xvfb")?,
    );
    tokio::time::sleep(Duration::from_secs(20)).await; // boot under TCG, animation starts

    let modes: [(&str, &[&str]); 2] = [
        ("RemoteFX (defaults)", &[]),
        ("surface bits (-gfx)", &["-gfx"]),
    ];
    let mut results: Vec<Vec<Sample>> = modes.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        for (i, (_, flags)) in modes.iter().enumerate() {
            let _client = Killed(
                Command::new("xfreerdp3")
                    .arg(format!("/v:127.0.0.1:{port}"))
                    .args(["/u:vdi", &format!("/p:{PASSWORD}"), "/cert:ignore"])
                    .args(*flags)
                    .env("DISPLAY", display)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("xfreerdp3")?,
            );
            tokio::time::sleep(Duration::from_secs(4)).await; // log in, first full frame
            results[i].push(measure(&stats, Duration::from_secs(secs)).await?);
        }
    }
    stop.cancel();
    let _ = demo.await;

    println!(
        "\nRDP, {WIDTH}x{HEIGHT} guest animating full screen (TCG), FreeRDP 3 client, {rounds} x {secs} s windows, medians"
    );
    println!(
        "{:<22} {:>8} {:>14} {:>16}",
        "client mode", "fps", "KiB/frame", "CPU ms/frame"
    );
    for ((name, _), samples) in modes.iter().zip(&results) {
        let med = |f: fn(&Sample) -> f64| median(samples.iter().map(f).collect());
        println!(
            "{:<22} {:>8.1} {:>14.1} {:>16.2}",
            name,
            med(|s| s.fps),
            med(|s| s.bytes_per_frame) / 1024.0,
            med(|s| s.cpu_ms_per_frame)
        );
    }
    Ok(())
}

async fn measure(stats: &RdpStats, window: Duration) -> Result<Sample> {
    let (f0, b0, c0) = (
        stats.frames.load(Ordering::Relaxed),
        stats.bytes_out.load(Ordering::Relaxed),
        cpu_self()?,
    );
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let frames = (stats.frames.load(Ordering::Relaxed) - f0) as f64;
    let bytes = (stats.bytes_out.load(Ordering::Relaxed) - b0) as f64;
    let cpu = cpu_self()? - c0;
    let frames_nz = frames.max(1.0);
    Ok(Sample {
        fps: frames / t0.elapsed().as_secs_f64(),
        bytes_per_frame: bytes / frames_nz,
        cpu_ms_per_frame: cpu * 1000.0 / frames_nz,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// CPU seconds (user + system) this process has used.
fn cpu_self() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    Ok(ticks / 100.0)
}
