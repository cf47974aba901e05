//! The display source against a real QEMU 10 running the test guest: our framebuffer must equal
//! QEMU's own `screendump` pixel for pixel, through the inline path (std VGA, including the
//! SeaBIOS/text-mode resize that comes without a Scanout), the shared-memory path (virtio-gpu),
//! across resolution changes, and across a QEMU restart on the same bus.

mod common;

use std::time::{Duration, Instant};

use common::qemu::{Rig, Video, Vm};
use vdi_sidecar::framebuffer::{Framebuffer, PathCounters};
use vdi_sidecar::qemu::source::SourceOptions;

/// Waits until our framebuffer equals QEMU's screendump (frames arrive at QEMU's refresh rate).
fn assert_matches_screendump(vm: &mut Vm, fb: &Framebuffer, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (w, h, px) = vm.screendump();
        let s = fb.snapshot();
        if (s.width, s.height) == (w, h) && s.pixels == px {
            return;
        }
        if Instant::now() > deadline {
            let diff = if (s.width, s.height) == (w, h) {
                s.pixels.iter().zip(&px).filter(|(a, b)| a != b).count()
            } else {
                usize::MAX
            };
            panic!(
                "{what}: framebuffer {}x{} (attached {}) != screendump {w}x{h}; {diff} pixels differ",
                s.width, s.height, s.attached
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Everything inline (no shared memory), whole frames held in QEMU until a viewer wants one.
async fn inline_rig_holding_frames() -> Rig {
    Rig::start_with(SourceOptions {
        shared_memory: false,
        hold_frames: Some(true),
        ..SourceOptions::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn std_vga_inline_path_text_mode_and_mode_switches() {
    // Without shared memory everything is inline, which is where QEMU 10.0 switches surfaces
    // without a Scanout.
    // Frames held in QEMU too, as under a sidecar budget: mode switches must still be right.
    let rig = inline_rig_holding_frames().await;
    let fb = rig.consoles.primary();
    let mut vm = rig.vm(Video::StdVga);
    let out = tokio::task::spawn_blocking(move || {
        // SeaBIOS and the kernel leave VGA text mode on: 720x400, reached with Updates only.
        vm.wait_ready();
        assert_matches_screendump(&mut vm, &fb, "text mode");
        assert_eq!(fb.size(), (720, 400));
        let c = fb.counters();
        assert!(
            PathCounters::get(&c.update) > 0,
            "text mode arrives as Updates"
        );
        assert!(
            PathCounters::get(&c.resized_without_scanout) > 0,
            "the 640x480 -> 720x400 switch comes without a Scanout"
        );
        assert_eq!(
            PathCounters::get(&c.scanout_map),
            0,
            "std VGA VRAM is not shareable"
        );
        vm.guest("display vbe");
        for (w, h, seed) in [(800, 600, 1), (1024, 768, 2), (640, 480, 3)] {
            vm.guest(&format!("mode {w} {h}"));
            vm.guest(&format!("fill {seed}"));
            assert_matches_screendump(&mut vm, &fb, &format!("{w}x{h}"));
            assert_eq!(fb.size(), (w, h));
        }
        vm.guest("rect 10 20 30 40 123456");
        assert_matches_screendump(&mut vm, &fb, "partial update");
        // QEMU calls Scanout/Update without waiting for a reply: the socket reads them into its
        // reused buffer instead of a message allocation each (qemu::parked).
        let c = fb.counters();
        assert!(
            PathCounters::get(&c.parked) >= PathCounters::get(&c.scanout),
            "{} of {} Scanouts and {} Updates parked",
            PathCounters::get(&c.parked),
            PathCounters::get(&c.scanout),
            PathCounters::get(&c.update)
        );
        vm
    })
    .await
    .expect("test body");
    drop(out);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn std_vga_with_shared_memory_listener() {
    // Text mode surfaces are memfd-backed (Map path); 32 bpp VBE modes share guest VRAM and
    // still come inline to a Map-capable listener.
    let rig = Rig::start().await;
    let fb = rig.consoles.primary();
    let mut vm = rig.vm(Video::StdVga);
    let out = tokio::task::spawn_blocking(move || {
        vm.wait_ready();
        assert_matches_screendump(&mut vm, &fb, "text mode via map");
        assert!(PathCounters::get(&fb.counters().scanout_map) > 0);
        vm.guest("display vbe");
        vm.guest("mode 1280 800");
        vm.guest("fill 4");
        assert_matches_screendump(&mut vm, &fb, "1280x800 inline");
        assert!(PathCounters::get(&fb.counters().scanout) > 0);
        vm
    })
    .await
    .expect("test body");
    drop(out);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtio_gpu_shared_memory_path() {
    let rig = Rig::start().await;
    let fb = rig.consoles.primary();
    let mut vm = rig.vm(Video::VirtioGpu);
    let out = tokio::task::spawn_blocking(move || {
        vm.wait_ready();
        let line = vm.guest("display fb");
        eprintln!("guest: {line}");
        vm.guest("fill 5");
        assert_matches_screendump(&mut vm, &fb, "virtio-gpu fill");
        vm.guest("rect 100 100 50 50 ff8000");
        assert_matches_screendump(&mut vm, &fb, "virtio-gpu rect");
        let c = fb.counters();
        assert!(
            PathCounters::get(&c.scanout_map) > 0,
            "virtio-gpu uses ScanoutMap"
        );
        assert!(PathCounters::get(&c.update_map) > 0, "and UpdateMap");
        vm
    })
    .await
    .expect("test body");
    drop(out);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reattaches_after_qemu_restart() {
    let rig = Rig::start().await;
    let fb = rig.consoles.primary();
    let mut vm = rig.vm(Video::StdVga);
    let fb2 = fb.clone();
    let vm = tokio::task::spawn_blocking(move || {
        vm.wait_ready();
        vm.guest("display vbe");
        vm.guest("mode 800 600");
        vm.guest("fill 11");
        assert_matches_screendump(&mut vm, &fb2, "first QEMU");
        vm
    })
    .await
    .expect("first");
    let gen_before = fb.snapshot().generation;
    drop(vm); // kills QEMU
    assert!(
        common::wait_until(Duration::from_secs(10), || !fb.is_attached()),
        "display not marked gone after QEMU exit"
    );
    let _ = std::fs::remove_file(rig.dir.path().join("serial.sock"));
    let _ = std::fs::remove_file(rig.dir.path().join("qmp.sock"));
    let mut vm = rig.vm(Video::StdVga);
    let fb2 = fb.clone();
    let vm = tokio::task::spawn_blocking(move || {
        vm.wait_ready();
        vm.guest("display vbe");
        vm.guest("mode 1024 768");
        vm.guest("fill 12");
        assert_matches_screendump(&mut vm, &fb2, "second QEMU");
        vm
    })
    .await
    .expect("second");
    assert!(fb.snapshot().generation > gen_before);
    drop(vm);
    rig.stop().await;
}

/// Linux input event types and codes the guest reports.
const EV_KEY: u32 = 1;
const EV_REL: u32 = 2;
const EV_ABS: u32 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_buttons_wheel_and_relative_pointer_reach_the_guest() {
    use vdi_sidecar::qemu::input::button;
    let rig = Rig::start().await;
    let desktop = vdi_sidecar::session::Desktop::primary(&rig.consoles);
    let control = desktop.control.clone();
    let mut vm = rig.vm(Video::StdVga);
    let mut vm = tokio::task::spawn_blocking(move || {
        vm.wait_ready();
        vm.guest("display vbe");
        vm.guest("mode 800 600");
        vm
    })
    .await
    .expect("boot");
    let mut viewer = desktop.viewer_input();
    // (qnum, Linux KEY_*) — plain and E0-extended keys, and the E1 Pause key.
    let keys = [
        (0x1e, 30),  // A
        (0x1c, 28),  // Enter
        (0xc8, 103), // Up
        (0xcb, 105), // Left
        (0xcd, 106), // Right
        (0xd0, 108), // Down
        (0x9d, 97),  // Right Ctrl
        (0xb8, 100), // Right Alt
        (0xd2, 110), // Insert
        (0xd3, 111), // Delete
        (0xc7, 102), // Home
        (0xcf, 107), // End
        (0xc6, 119), // Pause
        (0x54, 99),  // SysRq / PrintScreen
    ];
    for (qnum, code) in keys {
        viewer.key(qnum, true).await;
        viewer.key(qnum, false).await;
        vm = tokio::task::spawn_blocking(move || {
            vm.expect_event(EV_KEY, code, 1);
            vm.expect_event(EV_KEY, code, 0);
            vm
        })
        .await
        .expect("key");
    }
    // PS/2 mouse: relative motion from absolute viewer positions, buttons, wheel.
    // Paced like a person: the guest's PS/2 driver drops packets that arrive faster than an
    // emulated (TCG) CPU drains them.
    let pause = || tokio::time::sleep(Duration::from_millis(100));
    viewer.pointer(100, 100);
    viewer.pointer(110, 95);
    pause().await;
    for b in [button::LEFT, button::RIGHT, button::MIDDLE] {
        viewer.buttons(1 << b).await;
        pause().await;
        viewer.buttons(0).await;
        pause().await;
    }
    viewer.wheel(button::WHEEL_UP, 1).await;
    pause().await;
    viewer.wheel(button::WHEEL_DOWN, 1).await;
    vm = tokio::task::spawn_blocking(move || {
        vm.expect_event(EV_REL, 0, 10); // REL_X
        vm.expect_event(EV_REL, 1, -5); // REL_Y
        vm.expect_event(EV_KEY, 272, 1); // BTN_LEFT
        vm.expect_event(EV_KEY, 272, 0);
        vm.expect_event(EV_KEY, 273, 1); // BTN_RIGHT
        vm.expect_event(EV_KEY, 273, 0);
        vm.expect_event(EV_KEY, 274, 1); // BTN_MIDDLE
        vm.expect_event(EV_KEY, 274, 0);
        vm.expect_event(EV_REL, 8, 1); // REL_WHEEL up
        vm.expect_event(EV_REL, 8, -1); // and down
        vm
    })
    .await
    .expect("pointer");
    // Lock LEDs follow the guest keyboard (Keyboard.Modifiers): Caps Lock toggles them.
    use vdi_sidecar::qemu::control::led;
    assert_eq!(control.leds() & led::CAPS, 0);
    viewer.key(0x3a, true).await;
    viewer.key(0x3a, false).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while control.leds() & led::CAPS == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "Caps Lock LED never came on"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A viewer that disconnects with a key held releases it.
    viewer.key(0x2a, true).await; // Left Shift
    drop(viewer);
    vm = tokio::task::spawn_blocking(move || {
        vm.expect_event(EV_KEY, 42, 1);
        vm.expect_event(EV_KEY, 42, 0);
        vm
    })
    .await
    .expect("release on disconnect");
    drop(vm);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_pointer_with_a_tablet() {
    let rig = Rig::start().await;
    let desktop = vdi_sidecar::session::Desktop::primary(&rig.consoles);
    let fb = rig.consoles.primary();
    let mut vm = rig.vm_with(
        Video::StdVga,
        &["-device", "qemu-xhci", "-device", "usb-tablet"],
    );
    let mut vm = tokio::task::spawn_blocking(move || {
        vm.wait_ready();
        vm.guest("display vbe");
        vm.guest("mode 800 600");
        vm
    })
    .await
    .expect("boot");
    assert!(
        common::wait_until(Duration::from_secs(10), || fb.size() == (800, 600)),
        "mode not seen"
    );
    let mut viewer = desktop.viewer_input();
    // The tablet becomes QEMU's active pointer once the guest drives it; move until it does.
    let mut seen = None;
    for attempt in 0..20u32 {
        viewer.pointer(400 + attempt, 300);
        let (v, line) = tokio::task::spawn_blocking(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                vm.expect_line("EV ", Duration::from_secs(1))
            }));
            (vm, r.ok())
        })
        .await
        .expect("poll");
        vm = v;
        if let Some(line) = line.filter(|l| l.contains(&format!(" {EV_ABS} 0 "))) {
            seen = Some(line);
            break;
        }
    }
    let mice = vm.qmp_cmd(r#"{"execute":"query-mice"}"#);
    let line =
        seen.unwrap_or_else(|| panic!("no absolute X event from the tablet; query-mice: {mice}"));
    let value: i64 = line
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .expect("value");
    // 400 of 800 pixels is the middle of QEMU's 0..0x7fff axis.
    assert!(
        (value - 0x4000).abs() < 0x400,
        "ABS_X {value} not near the middle: {line}"
    );
    drop(vm);
    rig.stop().await;
}

/// The guest's `VDI OK scene video N frames T ms`: N.
fn frames_drawn(reply: &str) -> u64 {
    reply
        .split_whitespace()
        .nth(4)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("scene reply: {reply}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_frames_nobody_takes_wait_in_qemu_and_a_viewer_gets_them_all() {
    // std VGA at 32 bpp: every full-screen frame comes inline as a Scanout.
    let rig = inline_rig_holding_frames().await;
    let fb = rig.consoles.primary();
    let mut vm = rig.vm(Video::StdVga);
    let fb2 = fb.clone();
    let (vm, idle) = tokio::task::spawn_blocking(move || {
        vm.wait_ready();
        vm.guest("display vbe");
        vm.guest("mode 640 480");
        vm.guest("fill 1");
        assert_matches_screendump(&mut vm, &fb2, "640x480");
        let before = PathCounters::get(&fb2.counters().scanout);
        let drawn = frames_drawn(&vm.guest("scene video 4000"));
        let taken = PathCounters::get(&fb2.counters().scanout) - before;
        (vm, (drawn, taken))
    })
    .await
    .expect("idle scene");
    let (drawn, taken) = idle;
    // No viewer: at most one frame per 200 ms (plus the one let through first), however many
    // QEMU had to offer (it refreshes at ~33 Hz and drops the frames we did not take).
    assert!(drawn >= 40, "the guest drew only {drawn} frames");
    assert!(
        (2..=4000 / 200 + 3).contains(&taken),
        "{taken} Scanouts taken in with no viewer ({drawn} drawn)"
    );
    // A viewer that takes every frame at once: the frames flow at QEMU's rate again.
    let mut viewer = fb.viewer();
    let reader = tokio::spawn(async move {
        loop {
            viewer.changed().await;
            let _ = viewer.take_damage();
        }
    });
    let fb2 = fb.clone();
    let (vm, watched) = tokio::task::spawn_blocking(move || {
        let mut vm = vm;
        let before = PathCounters::get(&fb2.counters().scanout);
        let drawn = frames_drawn(&vm.guest("scene video 4000"));
        (
            vm,
            (drawn, PathCounters::get(&fb2.counters().scanout) - before),
        )
    })
    .await
    .expect("watched scene");
    reader.abort();
    let (drawn2, taken2) = watched;
    eprintln!("no viewer: {taken} of {drawn} frames taken in; a viewer: {taken2} of {drawn2}");
    assert!(
        taken2 >= 2 * taken && taken2 >= 30,
        "a viewer taking every frame got {taken2} Scanouts ({drawn2} drawn) vs {taken} without"
    );
    drop(vm);
    rig.stop().await;
}
