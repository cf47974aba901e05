//! Fault injection: a fake QEMU (zbus, server side of the listener socketpair, as QEMU is) sends
//! malformed frames to our listener. Each is refused (error reply or log line), nothing panics,
//! nothing is allocated from attacker-chosen sizes, and the listener keeps working afterwards.

use std::os::fd::OwnedFd;
use std::time::Duration;

use vdi_sidecar::framebuffer::Framebuffer;
use vdi_sidecar::pixman::X8R8G8B8;
use vdi_sidecar::qemu::listener::listener_objects;
use vdi_sidecar::qemu::parked::ParkedFrames;
use vdi_sidecar::qemu::proxies::LISTENER_PATH;

#[zbus::proxy(
    interface = "org.qemu.Display1.Listener",
    default_path = "/org/qemu/Display1/Listener"
)]
trait FakeListener {
    fn scanout(&self, w: u32, h: u32, stride: u32, fmt: u32, data: &[u8]) -> zbus::Result<()>;
    #[allow(clippy::too_many_arguments)]
    fn update(
        &self,
        x: i32,
        y: i32,
        w: i32,
        h: i32,
        stride: u32,
        fmt: u32,
        data: &[u8],
    ) -> zbus::Result<()>;
    fn cursor_define(&self, w: i32, h: i32, hx: i32, hy: i32, data: &[u8]) -> zbus::Result<()>;
    fn mouse_set(&self, x: i32, y: i32, on: i32) -> zbus::Result<()>;
    #[zbus(name = "ScanoutDMABUF")]
    #[allow(clippy::too_many_arguments)]
    fn scanout_dmabuf(
        &self,
        fd: zbus::OwnedFd,
        w: u32,
        h: u32,
        stride: u32,
        fourcc: u32,
        modifier: u64,
        y0_top: bool,
    ) -> zbus::Result<()>;
    #[zbus(property)]
    fn interfaces(&self) -> zbus::Result<Vec<String>>;
}

#[zbus::proxy(
    interface = "org.qemu.Display1.Listener.Unix.Map",
    default_path = "/org/qemu/Display1/Listener"
)]
trait FakeMap {
    fn scanout_map(
        &self,
        fd: zbus::OwnedFd,
        offset: u32,
        w: u32,
        h: u32,
        stride: u32,
        fmt: u32,
    ) -> zbus::Result<()>;
    fn update_map(&self, x: i32, y: i32, w: i32, h: i32) -> zbus::Result<()>;
}

/// Our listener on one end of a socketpair, a fake QEMU (the auth server) on the other.
async fn pair(fb: &Framebuffer) -> (zbus::Connection, zbus::Connection) {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    // zbus' own socket here (the parked path is tested in `qemu::listener_socket`).
    let (listener, map, _) = listener_objects(0, fb.clone(), true, ParkedFrames::default());
    let guid = zbus::Guid::generate();
    let qemu = zbus::connection::Builder::unix_stream(theirs)
        .server(guid)
        .p2p()
        .build();
    let client = zbus::connection::Builder::unix_stream(ours)
        .p2p()
        .serve_at(LISTENER_PATH, listener)
        .serve_at(LISTENER_PATH, map)
        .build();
    let (qemu, client) = tokio::join!(qemu, client);
    (qemu.expect("fake qemu"), client.expect("listener"))
}

fn memfd(len: u64) -> OwnedFd {
    let fd = rustix::fs::memfd_create("surface", rustix::fs::MemfdFlags::CLOEXEC).expect("memfd");
    rustix::fs::ftruncate(&fd, len).expect("ftruncate");
    fd
}

fn px(w: u32, h: u32, v: u32) -> Vec<u8> {
    std::iter::repeat_n(v.to_ne_bytes(), (w * h) as usize)
        .flatten()
        .collect()
}

#[tokio::test]
async fn malformed_frames_are_refused_and_the_listener_survives() {
    let fb = Framebuffer::new();
    let (qemu, _client) = pair(&fb).await;
    let l = FakeListenerProxy::new(&qemu, "org.qemu")
        .await
        .expect("proxy");
    let m = FakeMapProxy::new(&qemu, "org.qemu")
        .await
        .expect("map proxy");

    // QEMU reads this once: we advertise shared memory.
    assert_eq!(
        l.interfaces().await.expect("Interfaces"),
        ["org.qemu.Display1.Listener.Unix.Map"]
    );

    l.scanout(4, 4, 16, X8R8G8B8, &px(4, 4, 0x0000_00ff))
        .await
        .expect("good scanout");
    let good = fb.snapshot();

    // Inline frames: all refused without a change (the reply is empty either way; QEMU
    // ignores it), none allocates from the claimed size.
    let bad_scanouts: &[(u32, u32, u32, u32, usize)] = &[
        (0, 0, 0, X8R8G8B8, 0),                      // empty
        (100_000, 100_000, 400_000, X8R8G8B8, 16),   // huge dimensions
        (8192, 8192, 32768, X8R8G8B8, 64),           // over the pixel budget
        (4, 4, 8, X8R8G8B8, 64),                     // stride < width
        (4, 4, 16, X8R8G8B8, 10),                    // short data
        (4, 4, 16, 0x1234_5678, 64),                 // bad format
        (u32::MAX, u32::MAX, u32::MAX, X8R8G8B8, 4), // overflow bait
    ];
    for &(w, h, stride, fmt, len) in bad_scanouts {
        l.scanout(w, h, stride, fmt, &vec![0u8; len])
            .await
            .expect("reply");
    }
    for (x, y, w, h) in [
        (-1, 0, 1, 1),
        (0, 0, -5, 1),
        (i32::MAX, 0, 2, 1),
        (0, 0, 9000, 9000),
    ] {
        l.update(x, y, w, h, 4, X8R8G8B8, &[0; 4])
            .await
            .expect("reply");
    }
    l.cursor_define(100_000, 1, 0, 0, &[0; 16])
        .await
        .expect("reply");
    l.cursor_define(2, 2, 0, 0, &[0; 3]).await.expect("reply");
    assert_eq!(
        fb.snapshot().pixels,
        good.pixels,
        "a refused frame changed pixels"
    );

    // DMABUF is refused with an error reply.
    let err = l
        .scanout_dmabuf(zbus::OwnedFd::from(memfd(64)), 4, 4, 16, 0, 0, true)
        .await
        .expect_err("dmabuf must be refused");
    assert!(
        err.to_string().contains("DMABUF") || err.to_string().contains("NotSupported"),
        "{err}"
    );

    // Shared memory: fds too small for the surface, not memfds, overflowing offsets.
    let pipe = std::io::pipe().expect("pipe").0;
    for (fd, offset, w, h, stride) in [
        (memfd(16), 0, 4, 4, 16),           // 16 bytes for 64
        (memfd(4096), 4040, 4, 4, 16),      // offset pushes past the end
        (OwnedFd::from(pipe), 0, 4, 4, 16), // not a file
        (memfd(64), u32::MAX, 4, 4, 16),    // offset overflow
        (memfd(64), 0, 4, 4, 8),            // stride < row
        (memfd(64), 0, 0, 4, 16),           // empty
    ] {
        let r = m
            .scanout_map(zbus::OwnedFd::from(fd), offset, w, h, stride, X8R8G8B8)
            .await;
        assert!(r.is_err(), "ScanoutMap {offset} {w}x{h}/{stride} accepted");
    }
    // UpdateMap without a valid map, or outside it: ignored.
    m.update_map(0, 0, 4, 4).await.expect("reply");

    // Still working: a valid map and update go through.
    let fd = memfd(64);
    rustix::io::pwrite(&fd, &px(4, 4, 0x00ab_cdef), 0).expect("pwrite");
    m.scanout_map(zbus::OwnedFd::from(fd), 0, 4, 4, 16, X8R8G8B8)
        .await
        .expect("good map");
    m.update_map(1, 1, 2, 2).await.expect("update");
    m.update_map(3, 3, 5, 5)
        .await
        .expect("reply to out-of-map update");
    assert!(fb.snapshot().pixels.iter().all(|&p| p == 0x00ab_cdef));
    tokio::time::timeout(
        Duration::from_secs(5),
        l.scanout(2, 2, 8, X8R8G8B8, &px(2, 2, 7)),
    )
    .await
    .expect("listener still answers")
    .expect("scanout");
    assert_eq!(fb.size(), (2, 2));

    // A valid cursor and pointer position reach the model.
    let argb: Vec<u8> = [0x80ff_0000u32, 0xff00_ff00, 0x0000_00ff, 0xffff_ffff]
        .iter()
        .flat_map(|p| p.to_ne_bytes())
        .collect();
    l.cursor_define(2, 2, 1, 5, &argb).await.expect("cursor");
    l.mouse_set(10, 20, 1).await.expect("mouse set");
    let (cursor, serial, pointer) = fb.cursor();
    let cursor = cursor.expect("cursor kept");
    assert_eq!(
        (cursor.width, cursor.height, cursor.hot_x, cursor.hot_y),
        (2, 2, 1, 1)
    );
    assert_eq!(
        cursor.argb,
        [0x80ff_0000, 0xff00_ff00, 0x0000_00ff, 0xffff_ffff]
    );
    assert_eq!(serial, 1);
    assert_eq!((pointer.x, pointer.y, pointer.visible), (10, 20, true));
}

#[zbus::proxy(
    interface = "org.qemu.Display1.AudioOutListener",
    default_path = "/org/qemu/Display1/AudioOutListener"
)]
trait FakeAudioOut {
    #[allow(clippy::too_many_arguments)]
    fn init(
        &self,
        id: u64,
        bits: u8,
        is_signed: bool,
        is_float: bool,
        freq: u32,
        nchannels: u8,
        bytes_per_frame: u32,
        bytes_per_second: u32,
        be: bool,
    ) -> zbus::Result<()>;
    fn set_enabled(&self, id: u64, enabled: bool) -> zbus::Result<()>;
    fn set_volume(&self, id: u64, mute: bool, volume: &[u8]) -> zbus::Result<()>;
    fn write(&self, id: u64, data: &[u8]) -> zbus::Result<()>;
}

/// The guest's mixer reaches viewers: QEMU's D-Bus backend leaves volume to the listener, so
/// SetVolume must scale what Write delivers (per channel), and mute must silence it.
#[tokio::test]
async fn guest_volume_and_mute_are_applied_to_the_sound() {
    use vdi_sidecar::qemu::audio::{AudioEvent, AudioHub, AudioOutListener, OUT_LISTENER_PATH};
    let hub = AudioHub::default();
    let mut rx = hub.subscribe();
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let qemu = zbus::connection::Builder::unix_stream(theirs)
        .server(zbus::Guid::generate())
        .p2p()
        .build();
    let client = zbus::connection::Builder::unix_stream(ours)
        .p2p()
        .serve_at(OUT_LISTENER_PATH, AudioOutListener::new(hub.clone()))
        .build();
    let (qemu, _client) = tokio::join!(qemu, client);
    let qemu = qemu.expect("fake qemu");
    let out = FakeAudioOutProxy::new(&qemu, "org.qemu")
        .await
        .expect("proxy");
    out.init(1, 16, true, false, 48000, 2, 4, 192_000, false)
        .await
        .expect("init");
    out.set_enabled(1, true).await.expect("enable");
    let frame: Vec<u8> = [16000i16, -16000]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let mut next_pcm = async || loop {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Ok(AudioEvent::Pcm(_, data, _))) => {
                return [
                    i16::from_le_bytes([data[0], data[1]]),
                    i16::from_le_bytes([data[2], data[3]]),
                ];
            }
            Ok(Ok(_)) => continue,
            other => panic!("no PCM: {other:?}"),
        }
    };
    out.write(1, &frame).await.expect("write");
    assert_eq!(
        next_pcm().await,
        [16000, -16000],
        "full volume passes through"
    );
    out.set_volume(1, false, &[51, 255]).await.expect("volume");
    out.write(1, &frame).await.expect("write");
    let [l, r] = next_pcm().await;
    assert!((3150..=3250).contains(&l), "left at 20 %: {l}");
    assert_eq!(r, -16000, "right untouched");
    out.set_volume(1, true, &[255, 255]).await.expect("mute");
    out.write(1, &frame).await.expect("write");
    assert_eq!(next_pcm().await, [0, 0], "muted");
    // A malformed volume (no bytes) is full volume on both sides, not a panic.
    out.set_volume(1, false, &[]).await.expect("empty volume");
    out.write(1, &frame).await.expect("write");
    assert_eq!(next_pcm().await, [16000, -16000]);
}
