//! Guest sound over VNC (QEMU Audio pseudo-encoding) from the real guest: QEMU's D-Bus audio →
//! our listener → two viewers asking for different formats, both hearing the guest's 1 kHz tone
//! for its 2 s, while a third viewer that enabled audio never reads.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::qemu::{AUDIO_ARGS, Rig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vdi_sidecar::session::Desktop;
use vdi_sidecar::session::auth::Auth;
use vdi_sidecar::vnc::VncConfig;

/// Connects (no password), enables QEMU audio in `sample` format 0..5, `channels`, `freq`.
async fn audio_client(
    addr: std::net::SocketAddr,
    sample: u8,
    channels: u8,
    freq: u32,
) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    common::rfb::handshake(&mut s, "003.008", None, true)
        .await
        .expect("handshake");
    common::rfb::set_encodings(&mut s, &[0, -259]).await;
    // The server confirms with a pseudo-rectangle before we may send audio messages.
    let mut ack = [0u8; 16];
    s.read_exact(&mut ack).await.expect("ack");
    assert_eq!(&ack[..4], &[0, 0, 0, 1]);
    assert_eq!(
        i32::from_be_bytes(ack[12..16].try_into().expect("enc")),
        -259
    );
    let mut fmt = vec![255, 1, 0, 2, sample, channels];
    fmt.extend_from_slice(&freq.to_be_bytes());
    s.write_all(&fmt).await.expect("set format");
    s.write_all(&[255, 1, 0, 0]).await.expect("enable");
    let mut begin = [0u8; 4];
    s.read_exact(&mut begin).await.expect("begin");
    assert_eq!(begin, [255, 1, 0, 1]);
    s
}

/// Reads audio data messages for `window`; returns the PCM bytes.
async fn listen(mut s: TcpStream, window: Duration) -> Vec<u8> {
    let deadline = Instant::now() + window;
    let mut pcm = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut head = [0u8; 4];
        match tokio::time::timeout(left, s.read_exact(&mut head)).await {
            Ok(r) => r.expect("audio message"),
            Err(_) => return pcm,
        };
        assert_eq!(&head[..3], &[255, 1, 0], "{head:?}");
        if head[3] != 2 {
            continue;
        }
        let n = s.read_u32().await.expect("len") as usize;
        let start = pcm.len();
        pcm.resize(start + n, 0);
        s.read_exact(&mut pcm[start..]).await.expect("pcm");
    }
}

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
    let a = audio_client(addr, 3, 2, 48000).await;
    let b = audio_client(addr, 0, 1, 22050).await;
    let _stalled = audio_client(addr, 3, 2, 48000).await;
    let window = Duration::from_secs(6);
    let ha = tokio::spawn(listen(a, window));
    let hb = tokio::spawn(listen(b, window));
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
