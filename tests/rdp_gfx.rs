//! RDP's graphics pipeline with H.264 (AVC420) against FreeRDP 3 and the real guest: the picture
//! while it is lossy (within a tolerance of QMP's screendump), exact after the lossless refresh
//! of a still screen, through an animation and a guest mode switch (ResetGraphics, a new
//! surface); a client whose pipeline refuses H.264 keeps the exact bitmap path; two H.264
//! clients share one encoding.

mod common;

use std::sync::Arc;

use common::qemu::Rig;
use common::rdp::{FreeRdp, config, serve};
use common::x11::Xvfb;
use vdi_sidecar::cgroup::Limits;
use vdi_sidecar::h264::encoder::memory_cost;
use vdi_sidecar::rdp::RdpConfig;
use vdi_sidecar::session::Desktop;
use vdi_sidecar::session::budget::{Budget, rdp_viewer_cost};
use vdi_sidecar::session::stats::Counters;

// One GUI test at a time: each runs QEMU under TCG plus FreeRDP on the 2 cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The test-image guest served over RDP with `cfg`; `body` gets an X display, the VM, a scratch
/// directory, the RDP port, the server's counters and the console's desktop.
async fn with_guest(
    cfg: RdpConfig,
    body: impl FnOnce(&Xvfb, &mut common::qemu::Vm, &std::path::Path, u16, &Counters, &Desktop)
    + Send
    + 'static,
) {
    with_guest_in(cfg, Budget::unlimited(), body).await;
}

/// [`with_guest`] with the desktop's memory budget.
async fn with_guest_in(
    cfg: RdpConfig,
    budget: Arc<Budget>,
    body: impl FnOnce(&Xvfb, &mut common::qemu::Vm, &std::path::Path, u16, &Counters, &Desktop)
    + Send
    + 'static,
) {
    let _serial = SERIAL.lock().await;
    let rig = Rig::start().await;
    let stats = Arc::clone(&cfg.stats);
    let mut desktop = Desktop::primary(&rig.consoles);
    desktop.budget = budget;
    let (port, stop) = serve(cfg, desktop.clone());
    let vm = rig.vm_with_test_image().await;
    let dir = rig.dir.path().to_owned();
    let vm = tokio::task::spawn_blocking(move || {
        let mut vm = vm;
        let x = Xvfb::start();
        body(&x, &mut vm, &dir, port, &stats, &desktop);
        vm
    })
    .await
    .expect("test body");
    drop(vm);
    stop.cancel();
    rig.stop().await;
}

/// The window against the screendump by `metric`; keeps both images when it does not match.
fn matches(
    x: &Xvfb,
    client: &FreeRdp,
    vm: &mut common::qemu::Vm,
    name: &str,
    metric: &str,
    accept: impl Fn(f64) -> bool,
) -> String {
    let (oracle, _, _) = vm.screendump_file(&format!("{name}.ppm"));
    let shot = vm.dir.join(format!("{name}.png"));
    let (ok, result) = client.wait_matches(x, &shot, &oracle, metric, accept);
    if !ok {
        let keep = std::env::temp_dir().join(format!("vdi-gfx-{name}.png"));
        let _ = std::fs::copy(&shot, &keep);
        let _ = std::fs::copy(&oracle, keep.with_extension("ppm"));
        eprintln!("kept {}", keep.display());
    }
    assert!(
        ok,
        "{name}: FreeRDP window vs screendump: {result}; log:\n{}",
        client.log_text()
    );
    eprintln!("{name}: {metric} {result}");
    result
}

fn exact(x: &Xvfb, client: &FreeRdp, vm: &mut common::qemu::Vm, name: &str) {
    matches(x, client, vm, name, "AE", |d| d == 0.0);
}

/// FreeRDP complained about none of our pictures (its codecs and the pipeline channel).
fn assert_decoded_everything(client: &FreeRdp) {
    let log = client.log_text();
    let bad: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("[WARN]") || l.contains("[ERROR]"))
        .filter(|l| l.contains("codec") || l.contains("rdpgfx") || l.contains("gdi"))
        .collect();
    assert!(
        bad.is_empty(),
        "FreeRDP could not use our pictures:\n{}",
        bad.join("\n")
    );
}

fn get(c: &std::sync::atomic::AtomicU64) -> u64 {
    Counters::get(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freerdp_avc420_is_exact_once_still_through_animation_and_mode_switch() {
    with_guest(config(), |x, vm, dir, port, stats, _| {
        let client = FreeRdp::open(x, dir, port, &["/gfx:AVC420"], &[]);
        vm.guest("fill 5");
        exact(x, &client, vm, "avc420-still");
        assert!(get(&stats.h264_frames) > 0, "no H.264 picture was sent");
        assert!(get(&stats.h264_key_frames) >= 1);
        assert!(
            get(&stats.lossless_refreshes) >= 1,
            "exact without a lossless refresh?"
        );
        let before = get(&stats.h264_frames);
        vm.guest("animate 30");
        vm.guest("fill 6");
        exact(x, &client, vm, "avc420-after-animation");
        assert!(
            get(&stats.h264_frames) > before + 5,
            "the animation went out as H.264 pictures"
        );
        // A guest mode switch: ResetGraphics and a new surface, the window follows.
        vm.guest("mode 1024 768");
        vm.guest("fill 8");
        exact(x, &client, vm, "avc420-1024");
        assert_decoded_everything(&client);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lossy_picture_is_close_and_two_clients_share_one_encoding() {
    let mut cfg = config();
    // No lossless refresh: what the client shows is the H.264 picture itself.
    cfg.h264_lossless_after = None;
    with_guest(cfg, |x, vm, dir, port, stats, desktop| {
        let a = FreeRdp::open(x, dir, port, &["/gfx:AVC420"], &[]);
        let b = FreeRdp::open(x, dir, port, &["/gfx:AVC420"], &[a.window.as_str()]);
        // Flat colours and hard edges, as on a desktop: close, but not exact (H.264).
        vm.guest("solid 204060");
        vm.guest("rect 40 40 300 120 f0f0f0");
        vm.guest("rect 60 60 200 8 101010");
        vm.guest("rect 400 300 200 200 c03020");
        let psnr = |d: f64| (30.0..f64::INFINITY).contains(&d);
        matches(x, &a, vm, "avc420-lossy-a", "PSNR", psnr);
        matches(x, &b, vm, "avc420-lossy-b", "PSNR", psnr);
        assert_eq!(get(&stats.lossless_refreshes), 0);
        let video = desktop.video.stats();
        let encoded = get(&video.frames);
        let sent = get(&stats.h264_frames);
        eprintln!("encoded {encoded} pictures, sent {sent} to two clients");
        // Every picture is encoded once and sent to both (give or take the pictures before
        // the second client joined and those one dropped while behind).
        assert!(sent > encoded, "sent {sent}, encoded {encoded}");
        assert!(sent <= 2 * encoded);
        assert_eq!(get(&video.encoders_made), 1, "one encoder for both");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_without_h264_keeps_exact_bitmaps() {
    with_guest(config(), |x, vm, dir, port, stats, _| {
        let client = FreeRdp::open(x, dir, port, &["/gfx:AVC420:off,AVC444:off"], &[]);
        vm.guest("fill 3");
        exact(x, &client, vm, "gfx-no-avc");
        assert_eq!(
            get(&stats.h264_frames),
            0,
            "H.264 sent to a client that refused it"
        );
    })
    .await;
}

/// A memory budget as a cgroup v2 of `limit` bytes using `used` would give (its control files
/// in `dir`).
fn budget_of(dir: &std::path::Path, limit: u64, used: u64) -> Arc<Budget> {
    std::fs::write(dir.join("memory.max"), limit.to_string()).expect("memory.max");
    std::fs::write(dir.join("memory.current"), used.to_string()).expect("memory.current");
    let mountinfo = format!(
        "30 25 0:26 / {} rw,nosuid - cgroup2 cgroup2 rw\n",
        dir.display()
    );
    let limits = Limits::from_files("0::/\n", &mountinfo, |p| std::fs::read_to_string(p).ok());
    assert_eq!(limits.memory, Some(limit), "the fake cgroup was not read");
    assert_eq!(limits.memory_usage(), Some(used));
    Budget::new(limits)
}

/// A sidecar whose memory limit holds one more viewer but not the console's H.264 encoder (as
/// a 64 MB sidecar cannot hold a 1080p one): an AVC420 client is served exact bitmaps instead,
/// no encoder starts, and the viewer is not refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h264_that_does_not_fit_the_memory_limit_leaves_bitmaps() {
    let cgroup = tempfile::tempdir().expect("tempdir");
    let limit = 64_000_000;
    // The budget keeps limit/8 free; the guest shows 800x600.
    let headroom = limit / 8;
    let used = limit - headroom - memory_cost(800, 600) + (1 << 20);
    assert!(
        used + rdp_viewer_cost(800, 600) + headroom <= limit,
        "the viewer fits"
    );
    let budget = budget_of(cgroup.path(), limit, used);
    let check = Arc::clone(&budget);
    with_guest_in(config(), budget, move |x, vm, dir, port, stats, desktop| {
        let client = FreeRdp::open(x, dir, port, &["/gfx:AVC420"], &[]);
        vm.guest("fill 3");
        exact(x, &client, vm, "gfx-over-budget");
        assert_eq!(get(&stats.h264_frames), 0, "H.264 sent over the budget");
        assert_eq!(
            get(&desktop.video.stats().encoders_made),
            0,
            "an encoder was started"
        );
        assert_eq!(check.refused(), 0, "the viewer was refused");
    })
    .await;
}
