//! Guest sound over VNC (QEMU Audio pseudo-encoding) from the real guest: QEMU's D-Bus audio →
//! our listener → two viewers asking for different formats, both hearing the guest's 1 kHz tone
//! for its 2 s, while a third viewer that enabled audio never reads.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::qemu::{AUDIO_ARGS, Rig};
use common::rfb;
use vdi_sidecar::session::Desktop;
use vdi_sidecar::session::auth::Auth;
use vdi_sidecar::vnc::VncConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_viewers_hear_the_guest_tone_in_their_own_formats() {
    let rig = Rig::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(vdi_sidecar::vnc::server::run(
        listener,
        Arc::new(VncConfig::new(Arc::new(Auth::open()), "audio")),
        Desktop::primary(&rig.consoles),
        tokio_util::sync::CancellationToken::new(),
    ));
    let mut vm = rig.vm_with(common::qemu::Video::StdVga, AUDIO_ARGS);
    let vm_ready = tokio::task::spawn_blocking(move || {
        vm.wait_ready();
        vm
    });
    let mut vm = vm_ready.await.expect("boot");

    // S16 stereo at QEMU's rate, U8 mono at 22.05 kHz (resampled and mixed), and one stalled.
    let a = rfb::audio_client(addr, 3, 2, 48000).await;
    let b = rfb::audio_client(addr, 0, 1, 22050).await;
    let _stalled = rfb::audio_client(addr, 3, 2, 48000).await;
    let window = Duration::from_secs(6);
    let ha = tokio::spawn(rfb::listen_audio(a, window));
    let hb = tokio::spawn(rfb::listen_audio(b, window));
    let vm = tokio::task::spawn_blocking(move || {
        let line = vm.guest("tone 1000 2000");
        assert!(line.contains("OK tone"), "{line}");
        vm
    })
    .await
    .expect("tone");
    let pa = ha.await.expect("viewer a");
    let pb = hb.await.expect("viewer b");

    let left: Vec<f32> = pa
        .chunks_exact(4)
        .map(|f| f32::from(i16::from_le_bytes([f[0], f[1]])) / 32768.0)
        .collect();
    let (hz, secs) = common::tone(&left, 48000);
    assert!((hz - 1000.0).abs() < 10.0, "viewer a heard {hz:.1} Hz");
    assert!((secs - 2.0).abs() < 0.2, "viewer a heard {secs:.2} s");
    let mono: Vec<f32> = pb.iter().map(|&v| (f32::from(v) - 128.0) / 128.0).collect();
    let (hz, secs) = common::tone(&mono, 22050);
    assert!((hz - 1000.0).abs() < 10.0, "viewer b heard {hz:.1} Hz");
    assert!((secs - 2.0).abs() < 0.2, "viewer b heard {secs:.2} s");
    drop(vm);
    rig.stop().await;
}
