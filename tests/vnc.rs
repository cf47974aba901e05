//! The VNC server against a real QEMU guest: our own minimal RFB client (every handshake
//! version, Raw and ZRLE) and vncdotool see exactly the pixels QMP `screendump` shows; passwords
//! are enforced; QEMU extended key events reach the guest; hostile input closes only that client.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::qemu::{Rig, Vm};
use common::rfb::Client;
use common::x11::{TigerVnc, Xvfb, compare, vncpasswd};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vdi_sidecar::session::Desktop;
use vdi_sidecar::session::auth::{Auth, LoginLimiter};
use vdi_sidecar::vnc::VncConfig;

const PASSWORD: &str = "s3cret!x";

/// These tests each boot a guest and some measure this process (RSS) or wait on GUI clients:
/// run them one at a time so they do not skew each other on a 2-core machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn start_vnc(rig: &Rig, password: Option<&str>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    serve_vnc(rig, password, listener)
}

/// Some clients (gvnccapture) only take a display number: a port in 5900..=5999.
async fn start_vnc_on_display(rig: &Rig, password: Option<&str>) -> std::net::SocketAddr {
    for port in (5950..6000).chain(5900..5950) {
        if let Ok(l) = tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
            return serve_vnc(rig, password, l);
        }
    }
    panic!("no free port in 5900..6000");
}

fn serve_vnc(
    rig: &Rig,
    password: Option<&str>,
    listener: tokio::net::TcpListener,
) -> std::net::SocketAddr {
    let addr = listener.local_addr().expect("addr");
    let auth = match password {
        Some(p) => Auth::password(p),
        None => Auth::open(),
    }
    .with_limiter(LoginLimiter::new(3, Duration::from_secs(60)));
    let cfg = Arc::new(VncConfig::new(Arc::new(auth), "vdi-test"));
    tokio::spawn(vdi_sidecar::vnc::server::run(
        listener,
        cfg,
        Desktop::primary(&rig.consoles),
        tokio_util::sync::CancellationToken::new(),
    ));
    addr
}

/// Requests full updates until the client's pixels equal QEMU's screendump.
async fn converge(c: &mut Client, vm: Vm, what: &str) -> Vm {
    let mut vm = vm;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (v, shot) = tokio::task::spawn_blocking(move || {
            let mut vm = vm;
            let d = vm.screendump();
            (vm, d)
        })
        .await
        .expect("screendump");
        vm = v;
        c.request(false).await;
        tokio::time::timeout(Duration::from_secs(10), c.read_update())
            .await
            .expect("update");
        if (u32::from(c.width), u32::from(c.height)) == (shot.0, shot.1) && c.fb == shot.2 {
            return vm;
        }
        if Instant::now() > deadline {
            let diff = c.fb.iter().zip(&shot.2).filter(|(a, b)| a != b).count();
            panic!(
                "{what}: client {}x{} vs screendump {}x{}: {diff} pixels differ",
                c.width, c.height, shot.0, shot.1
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrolling_guest_is_sent_as_copyrect_and_stays_exact() {
    let _serial = SERIAL.lock().await;
    let rig = Rig::start().await;
    let addr = start_vnc(&rig, None).await;
    let vm = rig.vm_with_test_image().await;
    let mut c = Client::connect(addr, "003.008", None)
        .await
        .expect("connect");
    c.set_encodings(&[16, 1, -223]).await;
    let bytes_before = c.bytes;
    let mut vm = converge(&mut c, vm, "before scrolling").await;
    let full_frame = c.bytes - bytes_before;
    let bytes_before = c.bytes;
    for _ in 0..3 {
        vm = tokio::task::spawn_blocking(move || {
            let mut vm = vm;
            vm.guest("scroll 48");
            vm
        })
        .await
        .expect("scroll");
    }
    // Only incremental requests from here: every pixel the client has is built from CopyRects
    // and the rows that really are new.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (v, shot) = tokio::task::spawn_blocking(move || {
            let mut vm = vm;
            let d = vm.screendump();
            (vm, d)
        })
        .await
        .expect("screendump");
        vm = v;
        if c.fb == shot.2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the scrolled screen never matched"
        );
        c.request(true).await;
        tokio::time::timeout(Duration::from_secs(10), c.read_update())
            .await
            .expect("the screen differs but no update came");
    }
    assert!(c.copies > 0, "no CopyRect was sent for a scroll");
    let sent = c.bytes - bytes_before;
    // The image moved without being resent: far less than one full ZRLE frame of it.
    assert!(
        sent < full_frame / 2,
        "{sent} bytes for three scrolls, {full_frame} for a frame"
    );
    drop(vm);
    rig.stop().await;
}

/// Boots the guest and draws a known image at 800x600.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_see_the_guest_exactly_and_passwords_are_enforced() {
    let _serial = SERIAL.lock().await;
    let rig = Rig::start().await;
    let addr = start_vnc(&rig, Some(PASSWORD)).await;
    let vm = rig.vm_with_test_image().await;
    let (vm, (sw, sh, shot)) = tokio::task::spawn_blocking(move || {
        let mut vm = vm;
        let d = vm.screendump();
        (vm, d)
    })
    .await
    .expect("screendump");

    for version in ["003.003", "003.007", "003.008"] {
        for encodings in [&[0][..], &[16, -223]] {
            let mut c = Client::connect(addr, version, Some(PASSWORD))
                .await
                .expect("connect");
            assert_eq!((u32::from(c.width), u32::from(c.height)), (sw, sh));
            c.set_encodings(encodings).await;
            c.request(false).await;
            tokio::time::timeout(Duration::from_secs(10), c.read_update())
                .await
                .expect("update in time");
            let diff = c.fb.iter().zip(&shot).filter(|(a, b)| a != b).count();
            assert!(
                c.fb.len() == shot.len() && diff == 0,
                "RFB {version} encodings {encodings:?}: {diff} pixels differ from screendump"
            );
        }
    }

    // Wrong password: refused with a reason in 3.8, a bare failure in 3.3/3.7.
    let err = Client::connect(addr, "003.008", Some("wrong"))
        .await
        .err()
        .expect("must fail");
    assert!(err.contains("authentication failed"), "{err}");
    assert!(Client::connect(addr, "003.003", None).await.is_err());
    // After repeated failures this address is turned away before authenticating.
    let _ = Client::connect(addr, "003.007", Some("wrong")).await;
    let err = Client::connect(addr, "003.008", Some(PASSWORD))
        .await
        .err()
        .expect("rate limited");
    assert!(err.contains("too many failed logins"), "{err}");

    drop(vm);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_updates_resize_and_qemu_extended_keys() {
    let _serial = SERIAL.lock().await;
    let rig = Rig::start().await;
    let addr = start_vnc(&rig, None).await;
    let vm = rig.vm_with_test_image().await;
    let mut c = Client::connect(addr, "003.008", None)
        .await
        .expect("no-auth connect");
    c.set_encodings(&[16, -223, -308, -258, -257, -261]).await;
    // The server confirms QEMU extended key events with a pseudo-rectangle first.
    c.read_update().await;
    c.request(false).await;
    c.read_update().await;
    // The first update also tells the pointer mode (PS/2 mouse: relative) and the LEDs.
    assert_eq!(c.absolute, Some(false), "pointer mode");
    assert_eq!(c.leds, Some(0), "LED state");

    // A partial change arrives as an incremental update.
    let vm = tokio::task::spawn_blocking(move || {
        let mut vm = vm;
        vm.guest("rect 100 100 40 30 00ff00");
        vm
    })
    .await
    .expect("rect");
    // The guest's drawing reaches QEMU's next refresh (30 ms) and then us: poll incrementally.
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.fb[110 * 800 + 110] != 0x00ff00 {
        assert!(Instant::now() < deadline, "the rectangle never arrived");
        c.request(true).await;
        tokio::time::timeout(Duration::from_secs(10), c.read_update())
            .await
            .expect("incremental");
    }

    // A mode switch reaches the client as DesktopSize, then the new pixels.
    let vm = tokio::task::spawn_blocking(move || {
        let mut vm = vm;
        vm.guest("mode 1024 768");
        vm.guest("fill 5");
        vm
    })
    .await
    .expect("mode");
    let deadline = Instant::now() + Duration::from_secs(20);
    while (c.width, c.height) != (1024, 768) {
        assert!(Instant::now() < deadline, "no DesktopSize");
        c.request(true).await;
        tokio::time::timeout(Duration::from_secs(10), c.read_update())
            .await
            .expect("update");
    }
    let mut vm = converge(&mut c, vm, "after resize").await;

    // SetDesktopSize goes to Console.SetUIInfo; std VGA cannot change mode on request, so the
    // client is told "prohibited" (status 1) and the size stays.
    let mut sds = vec![251, 0];
    sds.extend(1280u16.to_be_bytes());
    sds.extend(800u16.to_be_bytes());
    sds.extend([1, 0]);
    sds.extend([0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 3, 32, 0, 0, 0, 0]);
    c.s.write_all(&sds).await.expect("SetDesktopSize");
    tokio::time::timeout(Duration::from_secs(10), c.read_update())
        .await
        .expect("ExtendedDesktopSize reply");
    assert_eq!(
        c.last_eds,
        Some((1, 1)),
        "reason 1 (client request), status 1 (prohibited)"
    );
    assert_eq!((c.width, c.height), (1024, 768));

    // Caps Lock typed through the viewer: the guest's console lights the LED, QEMU's keyboard
    // reports it, and the client is told (LED state bit 2) without asking for pixels.
    for down in [1u16, 0] {
        let mut m = vec![255, 0];
        m.extend(down.to_be_bytes());
        m.extend(0xffe5u32.to_be_bytes());
        m.extend(0x3au32.to_be_bytes());
        c.s.write_all(&m).await.expect("caps lock");
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while c.leds != Some(4) {
        assert!(
            Instant::now() < deadline,
            "Caps Lock LED never reported: {:?}",
            c.leds
        );
        c.request(true).await;
        tokio::time::timeout(Duration::from_secs(10), c.read_update())
            .await
            .expect("LED update");
    }
    vm = tokio::task::spawn_blocking(move || {
        vm.expect_event(1, 58, 1);
        vm.expect_event(1, 58, 0);
        vm
    })
    .await
    .expect("caps lock events");

    // QEMU extended key event: Right Ctrl (qnum 0x9d) → KEY_RIGHTCTRL.
    for down in [1u16, 0] {
        let mut m = vec![255, 0];
        m.extend(down.to_be_bytes());
        m.extend(0xffe4u32.to_be_bytes());
        m.extend(0x9du32.to_be_bytes());
        c.s.write_all(&m).await.expect("ext key");
    }
    vm = tokio::task::spawn_blocking(move || {
        vm.expect_event(1, 97, 1);
        vm.expect_event(1, 97, 0);
        vm
    })
    .await
    .expect("key");

    // A hostile client is closed; the first one keeps working.
    let mut bad = Client::connect(addr, "003.008", None)
        .await
        .expect("connect");
    bad.s.write_all(&[2, 0, 0xff, 0xff]).await.expect("write");
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), bad.s.read(&mut buf))
        .await
        .expect("closed in time");
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "server kept a hostile client open"
    );
    c.request(false).await;
    tokio::time::timeout(Duration::from_secs(10), c.read_update())
        .await
        .expect("still served");
    drop(vm);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vncdotool_captures_the_guest_exactly() {
    let _serial = SERIAL.lock().await;
    let rig = Rig::start().await;
    let addr = start_vnc(&rig, Some(PASSWORD)).await;
    let vm = rig.vm_with_test_image().await;
    let dir = rig.dir.path().to_owned();
    let vm = tokio::task::spawn_blocking(move || {
        let mut vm = vm;
        let (oracle, w, h) = vm.screendump_file("oracle.ppm");
        let png = dir.join("vncdotool.png");
        let out = std::process::Command::new("vncdotool")
            .args([
                "-s",
                &format!("127.0.0.1::{}", addr.port()),
                "-p",
                PASSWORD,
                "capture",
            ])
            .arg(&png)
            .output()
            .expect("vncdotool (pip install vncdotool)");
        assert!(
            out.status.success(),
            "vncdotool: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // ImageMagick's compare prints the number of differing pixels (AE) on stderr.
        let cmp = std::process::Command::new("/usr/bin/compare")
            .args(["-metric", "AE"])
            .arg(&png)
            .arg(&oracle)
            .arg("null:")
            .output()
            .expect("/usr/bin/compare (install imagemagick)");
        let ae = String::from_utf8_lossy(&cmp.stderr).trim().to_owned();
        assert_eq!(
            ae.split_whitespace().next(),
            Some("0"),
            "vncdotool capture differs from screendump ({w}x{h}): {ae}"
        );
        // Wrong password: vncdotool fails instead of hanging.
        let bad = std::process::Command::new("timeout")
            .args([
                "20",
                "vncdotool",
                "-s",
                &format!("127.0.0.1::{}", addr.port()),
                "-p",
                "nope",
                "capture",
            ])
            .arg(dir.join("bad.png"))
            .output()
            .expect("vncdotool");
        assert!(
            !bad.status.success() && bad.status.code() != Some(124),
            "wrong password: {:?}",
            bad.status
        );
        // Plain keysym key events (vncdotool sends no scancodes) go through the US layout
        // table; an upper-case letter gets Shift around it.
        let keys = std::process::Command::new("vncdotool")
            .args(["-s", &format!("127.0.0.1::{}", addr.port()), "-p", PASSWORD])
            .args([
                "key", "up", "key", "ins", "key", "a", "key", "A", "key", "bsp",
            ])
            .output()
            .expect("vncdotool");
        assert!(
            keys.status.success(),
            "vncdotool keys: {}",
            String::from_utf8_lossy(&keys.stderr)
        );
        for (code, value) in [
            (103, 1),
            (103, 0),
            (110, 1),
            (110, 0),
            (30, 1),
            (30, 0),
            (42, 1),
            (30, 1),
            (42, 0),
            (30, 0),
            (14, 1),
            (14, 0),
        ] {
            vm.expect_event(1, code, value);
        }
        vm
    })
    .await
    .expect("vncdotool");
    drop(vm);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vncdotool_clicks_land_where_they_should() {
    let _serial = SERIAL.lock().await;
    let rig = Rig::start().await;
    let addr = start_vnc(&rig, Some(PASSWORD)).await;
    let vm = rig
        .vm_with_test_image_and(&["-device", "qemu-xhci", "-device", "usb-tablet"])
        .await;
    let vm = tokio::task::spawn_blocking(move || {
        let mut vm = vm;
        let server = format!("127.0.0.1::{}", addr.port());
        let vncdo = |args: &[&str]| {
            let out = std::process::Command::new("vncdotool")
                .args(["-s", &server, "-p", PASSWORD])
                .args(args)
                .output()
                .expect("vncdotool");
            assert!(out.status.success(), "vncdotool {args:?}: {out:?}");
        };
        let next_event = |vm: &mut Vm| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                vm.expect_line("EV ", Duration::from_secs(1))
            }))
            .ok()
        };
        // QEMU switches to the tablet once the guest has opened it: move until it reports.
        let mut active = false;
        for attempt in 0..20 {
            vncdo(&["move", &(100 + attempt).to_string(), "100"]);
            if next_event(&mut vm).is_some_and(|l| l.contains(" 3 0 ")) {
                active = true;
                break;
            }
        }
        assert!(active, "the tablet never reported absolute motion");
        vncdo(&["move", "600", "150", "pause", "0.2", "click", "1"]);
        // The last absolute position before the button press is where the click lands.
        let (mut x, mut y) = (None, None);
        loop {
            let line = next_event(&mut vm).expect("no button press reached the guest");
            let v = || line.rsplit(' ').next().and_then(|v| v.parse::<i64>().ok());
            if line.contains(" 3 0 ") {
                x = v();
            } else if line.contains(" 3 1 ") {
                y = v();
            } else if line.ends_with(" 1 272 1") {
                break;
            }
        }
        // QEMU scales 0..width-1 to its 0..0x7fff tablet axis.
        let (ex, ey) = (600 * 0x7fff / 799, 150 * 0x7fff / 599);
        let (x, y) = (x.expect("no ABS_X"), y.expect("no ABS_Y"));
        assert!(
            (x - ex).abs() < 0x100 && (y - ey).abs() < 0x100,
            "click at ({x}, {y}), expected near ({ex}, {ey})"
        );
        vm.expect_event(1, 272, 0);
        vm
    })
    .await
    .expect("vncdotool clicks");
    drop(vm);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gvnccapture_captures_the_guest_exactly() {
    let _serial = SERIAL.lock().await;
    let rig = Rig::start().await;
    let addr = start_vnc_on_display(&rig, Some(PASSWORD)).await;
    let vm = rig.vm_with_test_image().await;
    let dir = rig.dir.path().to_owned();
    let vm = tokio::task::spawn_blocking(move || {
        let mut vm = vm;
        let (oracle, _, _) = vm.screendump_file("oracle-g.ppm");
        let png = dir.join("gvnc.png");
        // gvnccapture asks for the password on its terminal: answer it in a pty.
        let out = std::process::Command::new("python3")
            .arg(common::data_file("../tools/with-password.py"))
            .arg("gvnccapture")
            .arg(format!("127.0.0.1:{}", addr.port() - 5900))
            .arg(&png)
            .env("VNC_PASSWORD", PASSWORD)
            .output()
            .expect("gvnccapture (install gvncviewer)");
        assert!(
            out.status.success(),
            "gvnccapture: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ae = compare(&png, &oracle, "AE");
        assert_eq!(
            ae.split_whitespace().next(),
            Some("0"),
            "gvnccapture differs from screendump: {ae}"
        );
        vm
    })
    .await
    .expect("gvnccapture");
    drop(vm);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tigervnc_shows_the_guest_exactly_and_types_into_it() {
    let _serial = SERIAL.lock().await;
    let rig = Rig::start().await;
    let addr = start_vnc(&rig, Some(PASSWORD)).await;
    let vm = rig.vm_with_test_image().await;
    let dir = rig.dir.path().to_owned();
    let vm = tokio::task::spawn_blocking(move || {
        let mut vm = vm;
        let x = Xvfb::start();
        let pwfile = dir.join("passwd");
        vncpasswd(PASSWORD, &pwfile);
        let args = [
            format!("-passwd={}", pwfile.display()),
            "-AutoSelect=0".into(),
            "-PreferredEncoding=ZRLE".into(),
            "-FullColor=1".into(),
        ];
        let v = TigerVnc::open(&x, &dir, &args, &[], addr.port(), "vdi-test");
        let window = v.window.clone();
        let xdo = |args: &[&str]| x.xdotool(args);
        // The window shows the remote desktop 1:1: compare a screenshot with QEMU's screendump.
        let (oracle, _, _) = vm.screendump_file("oracle-t.ppm");
        let (same, ae) = v.wait_matches(&x, &dir.join("tigervnc.png"), &oracle, "AE", |d| d == 0.0);
        assert!(same, "TigerVNC window differs from screendump: {ae}");
        // Keys typed into the viewer reach the guest as the right scancodes.
        let out = xdo(&[
            "windowfocus",
            "--sync",
            &window,
            "key",
            "Up",
            "Insert",
            "Pause",
            "a",
            "Delete",
        ]);
        assert!(
            out.status.success(),
            "xdotool: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for code in [103, 110, 119, 30, 111] {
            vm.expect_event(1, code, 1);
            vm.expect_event(1, code, 0);
        }
        vm
    })
    .await
    .expect("tigervnc");
    drop(vm);
    rig.stop().await;
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_viewers_one_stalled_while_the_guest_animates() {
    let _serial = SERIAL.lock().await;
    let rig = Rig::start().await;
    let addr = start_vnc(&rig, Some(PASSWORD)).await;
    let vm = rig.vm_with_test_image().await;
    let rss_before = rss_kib();

    // The stalled viewer: asks for updates, never reads a byte.
    let mut stalled = Client::connect(addr, "003.008", Some(PASSWORD))
        .await
        .expect("stalled");
    stalled.set_encodings(&[0]).await; // Raw: the most bytes it could be owed
    for _ in 0..50 {
        stalled.request(false).await;
    }

    let duration = Duration::from_secs(30);
    let mut viewers = Vec::new();
    for _ in 0..19 {
        let mut c = Client::connect(addr, "003.008", Some(PASSWORD))
            .await
            .expect("viewer");
        c.set_encodings(&[16, -223]).await;
        viewers.push(tokio::spawn(async move {
            let start = Instant::now();
            let mut updates = 0u32;
            c.request(false).await;
            c.read_update().await;
            // The guest animates for the whole time, so every request is answered soon.
            while start.elapsed() < duration {
                c.request(true).await;
                match tokio::time::timeout(Duration::from_secs(20), c.read_update()).await {
                    Ok(()) => updates += 1,
                    Err(_) => break,
                }
            }
            updates
        }));
    }
    // Animate for longer than the viewers watch.
    let vm = tokio::task::spawn_blocking(move || {
        let mut vm = vm;
        // About 70 frames/s in the guest: longer than the viewers watch.
        let line = vm.guest("animate 3000");
        eprintln!("guest: {line}");
        vm
    });
    let mut counts = Vec::new();
    for v in viewers {
        counts.push(v.await.expect("viewer task"));
    }
    let vm = vm.await.expect("animate");
    let rss_after = rss_kib();
    // Every live viewer kept getting frames while one never read.
    assert!(
        counts.iter().all(|&n| n >= 5),
        "updates per viewer: {counts:?}"
    );
    // Memory stays bounded: the stalled viewer is owed at most one update, not a queue.
    let grown_mib = rss_after.saturating_sub(rss_before) / 1024;
    assert!(
        grown_mib < 256,
        "RSS grew by {grown_mib} MiB with 20 viewers (counts {counts:?})"
    );
    eprintln!("20 viewers: updates per live viewer {counts:?}; RSS +{grown_mib} MiB");
    drop(stalled);
    drop(vm);
    rig.stop().await;
}
