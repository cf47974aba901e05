//! The display source against a real QEMU 10 running the test guest: our framebuffer must equal
//! QEMU's own `screendump` pixel for pixel, through the inline path (std VGA, including the
//! SeaBIOS/text-mode resize that comes without a Scanout), the shared-memory path (virtio-gpu),
//! across resolution changes, and across a QEMU restart on the same bus.

mod common;

use std::time::{Duration, Instant};

use common::qemu::{Video, Vm};
use tokio_util::sync::CancellationToken;
use vdi_sidecar::bus::{Bus, BusConfig};
use vdi_sidecar::framebuffer::{Framebuffer, PathCounters};
use vdi_sidecar::qemu::source::{self, Consoles, SourceOptions};

struct Rig {
    dir: tempfile::TempDir,
    bus: Option<Bus>,
    consoles: Consoles,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Rig {
    async fn start() -> Rig {
        Self::start_with(SourceOptions::default()).await
    }

    async fn start_with(opts: SourceOptions) -> Rig {
        let dir = tempfile::tempdir().expect("tempdir");
        let bus = Bus::start(BusConfig {
            dir: dir.path().join("vdi"),
            program: "dbus-daemon".into(),
            extra_uids: vec![],
        })
        .await
        .expect("bus");
        let consoles = Consoles::default();
        let stop = CancellationToken::new();
        let conn = source::connect_bus(bus.address(), &stop)
            .await
            .expect("connect");
        let task = tokio::spawn({
            let (c, s) = (consoles.clone(), stop.clone());
            async move {
                if let Err(e) = source::run(conn, c, opts, s).await {
                    panic!("source failed: {e}");
                }
            }
        });
        Rig {
            dir,
            bus: Some(bus),
            consoles,
            stop,
            task,
        }
    }

    fn vm(&self, video: Video) -> Vm {
        let bus = self.bus.as_ref().expect("bus");
        Vm::start(self.dir.path(), bus.address(), video)
    }

    async fn stop(mut self) {
        self.stop.cancel();
        let _ = self.task.await;
        if let Some(b) = self.bus.take() {
            b.stop().await;
        }
    }
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn std_vga_inline_path_text_mode_and_mode_switches() {
    // Without shared memory everything is inline, which is where QEMU 10.0 switches surfaces
    // without a Scanout.
    let rig = Rig::start_with(SourceOptions {
        shared_memory: false,
    })
    .await;
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
