//! Guest sound over RDP (rdpsnd) from the real guest: QEMU's D-Bus audio → our listener → FreeRDP
//! 3 negotiates PCM 48 kHz s16 stereo and is sent the guest's 2 s tone. (FreeRDP's ALSA backend
//! cannot play into a file here: it insists on a mixer, and these machines have no sound card;
//! the waves' content is the VNC path's converter, checked by frequency in tests/vnc_audio.rs.)

mod common;

use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::Proc;
use common::qemu::{AUDIO_ARGS, Rig, Video};
use common::rdp::{PASSWORD, USER, config, serve};
use common::x11::Xvfb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freerdp_negotiates_sound_and_gets_the_guest_tone() {
    let rig = Rig::start().await;
    let cfg = config();
    let stats = std::sync::Arc::clone(&cfg.stats);
    let (port, stop) = serve(cfg, rig.consoles.desktop());
    let mut vm = rig.vm_with(Video::StdVga, AUDIO_ARGS);
    let log = rig.dir.path().join("xfreerdp-audio.log");
    let audio = |s: &vdi_sidecar::rdp::RdpStats| s.audio_bytes.load(Ordering::Relaxed);
    let (vm, before, after, log_text) = tokio::task::spawn_blocking(move || {
        vm.wait_ready();
        let x = Xvfb::start();
        // FreeRDP's `fake` sound backend accepts every format and discards the waves: what it
        // shows is that rdpsnd was negotiated and the waves flowed to this client.
        let child = Command::new("xfreerdp3")
            .arg(format!("/v:127.0.0.1:{port}"))
            .arg(format!("/u:{USER}"))
            .arg(format!("/p:{PASSWORD}"))
            .args(["/cert:ignore", "-gfx", "/sound:sys:fake", "/log-level:INFO"])
            .env("DISPLAY", &x.display)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("xfreerdp3");
        let client = Proc {
            child,
            name: "xfreerdp3",
        };
        // Logged in and the sound channel negotiated before the guest plays.
        std::thread::sleep(Duration::from_secs(6));
        let before = audio(&stats);
        let line = vm.guest("tone 1000 2000");
        assert!(line.contains("OK tone"), "{line}");
        std::thread::sleep(Duration::from_secs(3));
        let after = audio(&stats);
        drop(client);
        let log_text = std::fs::read_to_string(&log).unwrap_or_default();
        (vm, before, after, log_text)
    })
    .await
    .expect("play");
    // 2 s of 48 kHz s16 stereo = 384,000 bytes (the guest's tone; QEMU adds a little silence).
    let sent = after - before;
    assert!(
        (370_000..=460_000).contains(&sent),
        "{sent} bytes of PCM sent for a 2 s tone; log:\n{log_text}"
    );
    eprintln!("rdpsnd: {sent} bytes of 48 kHz s16 stereo for the 2 s tone");
    drop(vm);
    stop.cancel();
    rig.stop().await;
}
