//! The real desktop guest (tests/guest/desktop: Debian, Xfce, spice-vdagent, PulseAudio on
//! virtio-gpu and an HDA card) through every path a user meets: a viewer's resize taken by the
//! guest's desktop, the desktop exact in TigerVNC and FreeRDP against QMP's screendump, the
//! desktop in noVNC (Chromium) equal to a screendump, the cursor the guest's X server defines,
//! the clipboard both ways through the real agent, and the desktop's own sound server reaching a
//! VNC audio viewer and FreeRDP.
//!
//! One boot for all of it (about 2 minutes under TCG): `./ci/test.sh --desktop`, or
//! `cargo test --test desktop -- --ignored` as root (the image is built with mmdebstrap).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::browser;
use common::pulse::{Pulse, SINK, pitch_run, samples};
use common::qemu::{Rig, Vm};
use common::rdp::{FreeRdp, config, serve};
use common::rfb::{self, Client};
use common::wait_until;
use common::x11::{TigerVnc, Xvfb};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vdi_sidecar::framebuffer::Framebuffer;
use vdi_sidecar::qemu::source::Consoles;
use vdi_sidecar::session::Desktop;
use vdi_sidecar::session::auth::Auth;
use vdi_sidecar::tls::{TlsIdentity, default_names};
use vdi_sidecar::viewers::Viewers;
use vdi_sidecar::vnc::VncConfig;
use vdi_sidecar::web::WebConfig;

/// The size the viewer asks for (the guest boots at 1280x800).
const W: u16 = 1024;
const H: u16 = 768;

fn serve_vnc(rig: &Rig) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr");
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    tokio::spawn(vdi_sidecar::vnc::server::run(
        listener,
        Arc::new(VncConfig::new(Arc::new(Auth::open()), "vdi-desktop")),
        Desktop::primary(&rig.consoles),
        tokio_util::sync::CancellationToken::new(),
    ));
    addr
}

/// Runs `f` on the blocking pool with the VM (serial and QMP are blocking sockets).
async fn on_vm<T: Send + 'static>(
    vm: Vm,
    f: impl FnOnce(&mut Vm) -> T + Send + 'static,
) -> (Vm, T) {
    tokio::task::spawn_blocking(move || {
        let mut vm = vm;
        let t = f(&mut vm);
        (vm, t)
    })
    .await
    .expect("blocking step")
}

/// ExtendedDesktopSize's SetDesktopSize with one screen of `w`x`h`.
async fn set_desktop_size(s: &mut TcpStream, w: u16, h: u16) {
    let mut m = vec![251, 0];
    m.extend_from_slice(&w.to_be_bytes());
    m.extend_from_slice(&h.to_be_bytes());
    m.extend_from_slice(&[1, 0]);
    m.extend_from_slice(&0u32.to_be_bytes());
    m.extend_from_slice(&[0, 0, 0, 0]);
    m.extend_from_slice(&w.to_be_bytes());
    m.extend_from_slice(&h.to_be_bytes());
    m.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&m).await.expect("SetDesktopSize");
}

/// A viewer's resize: SetDesktopSize → QEMU's SetUIInfo → virtio-gpu's preferred mode → the
/// guest's X server (RandR) takes it; our console and the viewer see the new size.
async fn resize_follows_the_viewer(addr: std::net::SocketAddr, fb: &Framebuffer, vm: Vm) -> Vm {
    let mut c = Client::connect(addr, "003.008", None)
        .await
        .expect("connect");
    c.set_encodings(&[16, -223, -308]).await;
    c.request(false).await;
    c.read_update().await;
    assert_eq!(
        (c.width, c.height),
        (1280, 800),
        "the desktop boots at 1280x800"
    );
    set_desktop_size(&mut c.s, W, H).await;
    let fb2 = fb.clone();
    let took = tokio::task::spawn_blocking(move || {
        wait_until(Duration::from_secs(60), || {
            std::thread::sleep(Duration::from_millis(200));
            fb2.size() == (u32::from(W), u32::from(H))
        })
    })
    .await
    .expect("wait");
    assert!(took, "the guest never took {W}x{H}: still {:?}", fb.size());
    // The viewer is told (ExtendedDesktopSize, then pixels at the new size).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while (c.width, c.height) != (W, H) {
        assert!(std::time::Instant::now() < deadline, "viewer never resized");
        c.request(true).await;
        tokio::time::timeout(Duration::from_secs(10), c.read_update())
            .await
            .expect("update");
    }
    let (vm, xrandr) = on_vm(vm, |vm| vm.shell("xrandr --current | head -n1")).await;
    assert!(
        xrandr.0.contains(&format!("current {W} x {H}")),
        "X in the guest: {xrandr:?}"
    );
    vm
}

/// Screenshots of `window` against fresh screendumps until one matches exactly (the panel's
/// clock may tick between a screendump and the screenshot).
fn exact_window(
    vm: &mut Vm,
    name: &str,
    check: impl Fn(&std::path::Path, &std::path::Path) -> (bool, String),
) {
    let mut last = String::new();
    for attempt in 0..3 {
        let (oracle, w, h) = vm.screendump_file(&format!("{name}-{attempt}.ppm"));
        assert_eq!((w, h), (u32::from(W), u32::from(H)));
        let shot = vm.dir.join(format!("{name}-{attempt}.png"));
        let (ok, result) = check(&shot, &oracle);
        if ok {
            eprintln!("{name}: AE {result}");
            return;
        }
        last = result;
    }
    panic!("{name}: the window never matched the screendump exactly: {last}");
}

/// The cursor the guest's X server draws (virtio-gpu's cursor plane → CursorDefine) reaches a
/// viewer as a Cursor pseudo-rectangle with opaque pixels.
async fn cursor_shape_reaches_the_viewer(addr: std::net::SocketAddr) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let init = rfb::handshake(&mut s, "003.008", None, true)
        .await
        .expect("handshake");
    rfb::set_encodings(&mut s, &[0, -239]).await;
    // Move the pointer over the desktop so the X server (re)defines its cursor.
    for (x, y) in [(300u16, 300u16), (500, 400), (520, 410)] {
        let mut m = vec![5, 0];
        m.extend_from_slice(&x.to_be_bytes());
        m.extend_from_slice(&y.to_be_bytes());
        s.write_all(&m).await.expect("pointer");
    }
    rfb::request(&mut s, false, 0, 0, init.width, init.height).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "no cursor shape within 30 s"
        );
        let t = s.read_u8().await.expect("message");
        assert_eq!(t, 0, "only updates were asked for");
        s.read_u8().await.expect("pad");
        let n = s.read_u16().await.expect("count");
        for _ in 0..n {
            let mut hdr = [0u8; 12];
            s.read_exact(&mut hdr).await.expect("rect");
            let w = usize::from(u16::from_be_bytes([hdr[4], hdr[5]]));
            let h = usize::from(u16::from_be_bytes([hdr[6], hdr[7]]));
            match i32::from_be_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) {
                0 => {
                    let mut px = vec![0u8; w * h * 4];
                    s.read_exact(&mut px).await.expect("raw");
                }
                -239 => {
                    let mut px = vec![0u8; w * h * 4];
                    s.read_exact(&mut px).await.expect("cursor pixels");
                    let mut mask = vec![0u8; w.div_ceil(8) * h];
                    s.read_exact(&mut mask).await.expect("cursor mask");
                    let opaque: u32 = mask.iter().map(|b| b.count_ones()).sum();
                    if w > 0 && h > 0 && opaque > 20 {
                        eprintln!("cursor {w}x{h}, {opaque} opaque pixels");
                        return;
                    }
                }
                other => panic!("unexpected encoding {other}"),
            }
        }
        rfb::request(&mut s, true, 0, 0, init.width, init.height).await;
    }
}

/// The next ServerCutText's text within `within`, skipping nothing else (no updates asked).
async fn server_cut_text(s: &mut TcpStream, within: Duration) -> Option<String> {
    let read = async {
        let t = s.read_u8().await.expect("message");
        assert_eq!(t, 3, "only cut text is expected");
        let mut pad = [0u8; 3];
        s.read_exact(&mut pad).await.expect("pad");
        let len = s.read_u32().await.expect("len") as usize;
        assert!(len < 1 << 20, "cut text of {len} bytes");
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).await.expect("text");
        String::from_utf8_lossy(&body).into_owned()
    };
    tokio::time::timeout(within, read).await.ok()
}

/// Copy in the guest (xclip owns the X CLIPBOARD) → spice-vdagent → QEMU's vdagent → our
/// clipboard → ServerCutText; and ClientCutText → the guest's X clipboard.
async fn clipboard_both_ways(addr: std::net::SocketAddr, vm: Vm) -> Vm {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    rfb::handshake(&mut s, "003.008", None, true)
        .await
        .expect("handshake");
    rfb::set_encodings(&mut s, &[0]).await;
    let (vm, (_, rc)) = on_vm(vm, |vm| {
        vm.shell("printf 'copied in the guest' | xclip -i -selection clipboard >/dev/null 2>&1")
    })
    .await;
    assert_eq!(rc, 0);
    let got = server_cut_text(&mut s, Duration::from_secs(30)).await;
    assert_eq!(got.as_deref(), Some("copied in the guest"));

    let text = b"pasted from the viewer";
    let mut m = vec![6, 0, 0, 0];
    m.extend_from_slice(&(text.len() as u32).to_be_bytes());
    m.extend_from_slice(text);
    s.write_all(&m).await.expect("ClientCutText");
    let (vm, seen) = on_vm(vm, |vm| {
        let mut seen = String::new();
        wait_until(Duration::from_secs(30), || {
            seen = vm.shell("timeout 5 xclip -o -selection clipboard").0;
            seen.trim_end() == "pasted from the viewer"
        });
        seen
    })
    .await;
    assert_eq!(seen.trim_end(), "pasted from the viewer");
    vm
}

/// PulseAudio in the guest plays a 440 Hz sine (speaker-test through its ALSA plugin) on the
/// HDA card; QEMU's D-Bus audio → our listener → a VNC audio viewer hears 440 Hz.
async fn desktop_sound_reaches_a_viewer(addr: std::net::SocketAddr, vm: Vm) -> Vm {
    let a = rfb::audio_client(addr, 3, 2, 48000).await;
    let listen = tokio::spawn(rfb::listen_audio(a, Duration::from_secs(12)));
    let (vm, _) = on_vm(vm, |vm| {
        vm.shell("timeout 4 speaker-test -D pulse -t sine -f 440 -c 2 >/dev/null 2>&1")
    })
    .await;
    let pcm = listen.await.expect("listener");
    let left: Vec<f32> = pcm
        .chunks_exact(4)
        .map(|f| f32::from(i16::from_le_bytes([f[0], f[1]])) / 32768.0)
        .collect();
    let (hz, secs) = common::tone(&left, 48000);
    assert!((hz - 440.0).abs() < 10.0, "heard {hz:.1} Hz");
    assert!(secs > 1.0, "heard only {secs:.2} s");
    eprintln!("sound: {hz:.1} Hz for {secs:.2} s");
    vm
}

/// noVNC in Chromium, over our HTTPS listener with a password, shows the desktop exactly: the
/// page's canvas equals a screendump taken just before (again, up to three times, since the
/// panel's clock may tick in between).
async fn the_browser_shows_the_desktop(consoles: &Consoles, vm: Vm) -> Vm {
    const PASSWORD: &str = "desk-web-pass";
    let vnc = Arc::new(VncConfig::new(
        Arc::new(Auth::password(PASSWORD)),
        "vdi-desktop",
    ));
    let web = WebConfig {
        novnc: Some(browser::novnc()),
        tls: Some(TlsIdentity::generate(&default_names(&[])).expect("certificate")),
    };
    let viewers = Viewers {
        web: Some(("127.0.0.1:0".parse().expect("addr"), web, vnc)),
        ..Viewers::default()
    };
    let at = viewers
        .start(consoles, &tokio_util::sync::CancellationToken::new())
        .await
        .expect("web listener");
    let url = format!("https://127.0.0.1:{}/", at.web.expect("web address").port());
    let (vm, ()) = on_vm(vm, move |vm| {
        let dir = vm.dir.clone();
        let mut seen = String::new();
        for _ in 0..3 {
            assert_eq!(
                browser::write_oracle(vm, &dir),
                (u32::from(W), u32::from(H))
            );
            seen = browser::check(&url, PASSWORD, "view", &dir);
            if seen.contains("\"differing_pixels\":0") {
                eprintln!("browser: canvas equals the screendump");
                return;
            }
        }
        panic!("the browser never showed the desktop exactly: {seen}");
    })
    .await;
    vm
}

/// The desktop's sound over RDP: FreeRDP plays rdpsnd through a private PulseAudio into a null
/// sink that we record, while the guest's PulseAudio plays a 440 Hz sine.
async fn desktop_sound_reaches_freerdp(rdp_port: u16, vm: Vm) -> Vm {
    let (vm, (pcm, log)) = on_vm(vm, move |vm| {
        let x = Xvfb::start();
        let pulse = Pulse::start(440);
        let log = vm.dir.join("xfreerdp-sound.log");
        let client = pulse.freerdp(
            rdp_port,
            &x,
            &[&format!("/sound:sys:pulse,dev:{SINK}")],
            &log,
        );
        // Logged in and the sound channel negotiated before the guest plays.
        std::thread::sleep(Duration::from_secs(8));
        let raw = vm.dir.join("desktop-rdp-sound.raw");
        let mut rec = pulse.record(&raw);
        std::thread::sleep(Duration::from_millis(500));
        // Longer than what is measured: FreeRDP's PulseAudio backend drops the first waves
        // while its stream opens.
        vm.shell("timeout 5 speaker-test -D pulse -t sine -f 440 -c 1 >/dev/null 2>&1");
        std::thread::sleep(Duration::from_secs(1));
        rec.signal("INT");
        rec.wait_timeout(Duration::from_secs(5));
        drop(client);
        (
            samples(&std::fs::read(&raw).unwrap_or_default()),
            std::fs::read_to_string(&log).unwrap_or_default(),
        )
    })
    .await;
    let loudest = pcm.iter().fold(0f32, |m, v| m.max(v.abs()));
    let (hz, secs) = common::tone(pitch_run(&pcm, 440), 48000);
    eprintln!("rdp sound: {hz:.1} Hz for {secs:.2} s (peak {loudest:.2})");
    assert!(
        (hz - 440.0).abs() < 10.0 && secs > 1.0,
        "FreeRDP played {hz:.1} Hz for {secs:.2} s (peak {loudest:.2}); client log:\n{log}"
    );
    vm
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots the Debian desktop guest (2 min under TCG): ./ci/test.sh --desktop"]
async fn a_real_desktop_through_every_path() {
    let rig = Rig::start().await;
    let addr = serve_vnc(&rig);
    let (rdp_port, rdp_stop) = serve(config(), Desktop::primary(&rig.consoles));
    let fb = rig.consoles.primary();
    let bus = rig.bus.as_ref().expect("bus").address().to_owned();
    let dir = rig.dir.path().to_owned();
    let t0 = std::time::Instant::now();
    let (vm, ()) = on_vm(Vm::start_desktop(&dir, &bus), |vm| {
        vm.expect_line("READY", Duration::from_secs(600));
    })
    .await;
    eprintln!(
        "desktop ready {:.0} s after QEMU started",
        t0.elapsed().as_secs_f64()
    );

    let vm = resize_follows_the_viewer(addr, &fb, vm).await;

    let port = addr.port();
    let (vm, ()) = on_vm(vm, move |vm| {
        let x = Xvfb::start();
        let dir = vm.dir.clone();
        let args: Vec<String> = [
            "-AutoSelect=0",
            "-PreferredEncoding=ZRLE",
            "-FullColor=1",
            "-SecurityTypes=None",
            "-RemoteResize=0",
        ]
        .map(String::from)
        .to_vec();
        let tiger = TigerVnc::open(&x, &dir, &args, &[], port, "vdi-desktop");
        exact_window(vm, "tigervnc", |shot, oracle| {
            tiger.wait_matches(&x, shot, oracle, "AE", |d| d == 0.0)
        });
        drop(tiger);
        // FreeRDP's defaults: the graphics pipeline with H.264, exact after the lossless refresh.
        let freerdp = FreeRdp::open(&x, &dir, rdp_port, &[], &[]);
        exact_window(vm, "freerdp", |shot, oracle| {
            freerdp.wait_matches(&x, shot, oracle, "AE", |d| d == 0.0)
        });
    })
    .await;
    let vm = the_browser_shows_the_desktop(&rig.consoles, vm).await;

    cursor_shape_reaches_the_viewer(addr).await;
    let vm = clipboard_both_ways(addr, vm).await;
    let vm = desktop_sound_reaches_a_viewer(addr, vm).await;
    let vm = desktop_sound_reaches_freerdp(rdp_port, vm).await;
    drop(vm);
    rdp_stop.cancel();
    rig.stop().await;
}
