//! The RDP server against FreeRDP 3 and the real guest: NLA (right and wrong password, TLS-only
//! refused unless chosen), the desktop exactly as QMP `screendump` shows it before and after a
//! guest mode switch in each client mode, keys and every mouse button reaching the guest with the
//! right codes, two clients at once, a client's resize reaching the guest, and hostile bytes.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::qemu::{Rig, Video};
use common::rdp::{FreeRdp, PASSWORD, USER, auth_only, config, serve};
use common::x11::Xvfb;
use vdi_sidecar::qemu::source::Consoles;
use vdi_sidecar::rdp::framing::{ntstatus, ts_request_status};
use vdi_sidecar::rdp::{Policy, Security};
use vdi_sidecar::session::Desktop;
use vdi_sidecar::session::auth::{Auth, LoginLimiter};
use vdi_sidecar::vnc::VncConfig;

// One GUI test at a time: each runs QEMU under TCG plus FreeRDP on the 2 cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const EV_KEY: u32 = 1;
const EV_REL: u32 = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nla_accepts_the_password_and_refuses_others() {
    let (consoles, task) = Consoles::new();
    tokio::spawn(task);
    let (port, stop) = serve(config(), Desktop::primary(&consoles));
    tokio::task::spawn_blocking(move || {
        let (ok, log) = auth_only(port, USER, PASSWORD, &[]);
        assert!(ok, "right password refused:\n{log}");
        let (ok, log) = auth_only(port, USER, "wrong-pass", &[]);
        assert!(!ok, "wrong password accepted:\n{log}");
        assert!(log.contains("exit status 0"), "{log}");
        let (ok, log) = auth_only(port, "someone", PASSWORD, &[]);
        assert!(!ok, "wrong user accepted:\n{log}");
        // A client that offers only TLS security is turned away: NLA is required.
        let (ok, log) = auth_only(port, USER, PASSWORD, &["/sec:tls"]);
        assert!(!ok, "TLS-only client accepted by an NLA server:\n{log}");
    })
    .await
    .expect("auth");
    stop.cancel();

    // TLS security only when the operator chooses it; the password is still checked.
    let mut cfg = config();
    cfg.security = Security::Tls;
    let (port, stop) = serve(cfg, Desktop::primary(&consoles));
    tokio::task::spawn_blocking(move || {
        let (ok, log) = auth_only(port, USER, PASSWORD, &["/sec:tls"]);
        assert!(ok, "TLS security with the right password refused:\n{log}");
        let (ok, log) = auth_only(port, USER, PASSWORD, &["/sec:nla"]);
        assert!(!ok, "NLA offered by a TLS-only server:\n{log}");
    })
    .await
    .expect("tls");
    stop.cancel();
}

/// The test-image guest served over RDP, one GUI test at a time: `body` gets an X display, the
/// VM, a scratch directory and the RDP port; clients it opens close before the display does.
async fn with_test_guest(
    what: &str,
    body: impl FnOnce(&Xvfb, &mut common::qemu::Vm, &std::path::Path, u16) + Send + 'static,
) {
    let _serial = SERIAL.lock().await;
    let rig = Rig::start().await;
    let (port, stop) = serve(config(), Desktop::primary(&rig.consoles));
    let vm = rig.vm_with_test_image().await;
    let dir = rig.dir.path().to_owned();
    let vm = tokio::task::spawn_blocking(move || {
        let mut vm = vm;
        let x = Xvfb::start();
        body(&x, &mut vm, &dir, port);
        vm
    })
    .await
    .expect(what);
    drop(vm);
    stop.cancel();
    rig.stop().await;
}

/// Checks the window against screendump: exactly, or for RemoteFX (lossy; the test image's noise
/// band is its worst case, measured 28.9 dB) PSNR ≥ 25 dB.
fn assert_window_matches(
    x: &Xvfb,
    client: &FreeRdp,
    vm: &mut common::qemu::Vm,
    name: &str,
    exact: bool,
) {
    let dir = vm.dir.clone();
    let (oracle, _, _) = vm.screendump_file(&format!("{name}.ppm"));
    let shot = dir.join(format!("{name}.png"));
    let (ok, result) = if exact {
        client.wait_matches(x, &shot, &oracle, "AE", |d| d == 0.0)
    } else {
        client.wait_matches(x, &shot, &oracle, "PSNR", |d| d >= 25.0)
    };
    if !ok {
        let keep = std::env::temp_dir().join(format!("vdi-rdp-{name}.png"));
        let _ = std::fs::copy(&shot, &keep);
        let _ = std::fs::copy(&oracle, keep.with_extension("ppm"));
        eprintln!("kept {}", keep.display());
    }
    assert!(
        ok,
        "{name}: FreeRDP window differs from screendump ({result}); log:\n{}",
        client.log_text()
    );
    eprintln!("{name}: {result}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freerdp_shows_the_guest_in_each_mode_and_follows_mode_switches() {
    with_test_guest("modes", |x, vm, dir, port| {
        // (client flags, name, lossless?)
        let modes: [(&[&str], &str, bool); 4] = [
            (&[], "default", false),
            (&["-gfx"], "nogfx", true),
            (&["/gfx"], "gfx", true),
            (&["-gfx", "+rfx"], "rfx", false),
        ];
        let mut size = 800;
        for (flags, name, exact) in modes {
            let client = FreeRdp::open(x, dir, port, flags, &[]);
            assert_window_matches(x, &client, vm, name, exact);
            // A guest mode switch: the client is resized and sees the new screen.
            size = if size == 800 { 1024 } else { 800 };
            let h = size * 3 / 4;
            vm.guest(&format!("mode {size} {h}"));
            vm.guest("fill 33");
            assert_window_matches(x, &client, vm, &format!("{name}-{size}"), exact);
            eprintln!("{name}: {}", negotiated(&client.log_text()));
        }
    })
    .await;
}

/// The codec lines FreeRDP logged, for the record.
fn negotiated(log: &str) -> String {
    log.lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("codec") || l.contains("remotefx") || l.contains("gfx")
        })
        .take(5)
        .collect::<Vec<_>>()
        .join(" | ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_every_mouse_button_reach_the_guest() {
    with_test_guest("input", |x, vm, dir, port| {
        let client = FreeRdp::open(x, dir, port, &["-gfx"], &[]);
        assert_window_matches(x, &client, vm, "input", true);
        let w = client.window.clone();
        let out = x.xdotool(&["windowfocus", "--sync", &w]);
        assert!(out.status.success(), "focus: {out:?}");
        // Extended keys keep their E0 prefix (arrows are not keypad keys), Pause and
        // PrintScreen arrive as themselves.
        let keys = [
            ("Up", 103),
            ("Left", 105),
            ("Control_R", 97),
            ("Insert", 110),
            ("Delete", 111),
            ("Home", 102),
            ("End", 107),
            ("KP_8", 72),
            ("Pause", 119),
            ("Print", 99),
            ("a", 30),
        ];
        for (key, code) in keys {
            let out = x.xdotool(&["key", "--window", &w, key]);
            assert!(out.status.success(), "xdotool key {key}: {out:?}");
            vm.expect_event(EV_KEY, code, 1);
            vm.expect_event(EV_KEY, code, 0);
        }
        // Buttons: left, middle, right (BTN_LEFT/MIDDLE/RIGHT), then both wheels.
        let out = x.xdotool(&["mousemove", "--window", &w, "200", "150"]);
        assert!(out.status.success(), "mousemove: {out:?}");
        // Press, wait for the guest to see it, then release: the guest's PS/2 mouse driver (this
        // VM has no tablet) loses a whole click whose packets arrive faster than an emulated CPU
        // drains them (seen once in CI as a middle click that never arrived; a person's click
        // is never that fast).
        for (button, code) in [("1", 272), ("2", 274), ("3", 273)] {
            for (action, value) in [("mousedown", 1), ("mouseup", 0)] {
                let out = x.xdotool(&[action, "--window", &w, button]);
                assert!(out.status.success(), "{action} {button}: {out:?}");
                vm.expect_event(EV_KEY, code, value);
            }
        }
        // X buttons 4/5 scroll vertically, 6/7 horizontally (REL_WHEEL 8, REL_HWHEEL 6).
        for (button, code, value) in [("4", 8, 1), ("5", 8, -1), ("6", 6, -1), ("7", 6, 1)] {
            let out = x.xdotool(&["click", "--window", &w, button]);
            assert!(out.status.success(), "click {button}: {out:?}");
            vm.expect_event(EV_REL, code, value);
        }
        // A key held when the client goes away is released in the guest.
        let out = x.xdotool(&["keydown", "--window", &w, "Shift_L"]);
        assert!(out.status.success(), "keydown: {out:?}");
        vm.expect_event(EV_KEY, 42, 1);
        drop(client);
        vm.expect_event(EV_KEY, 42, 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_at_once_both_get_updates() {
    with_test_guest("two clients", |x, vm, dir, port| {
        // FreeRDP's defaults (RemoteFX) next to a lossless client: two encoders at once.
        let first = FreeRdp::open(x, dir, port, &[], &[]);
        let second = FreeRdp::open(x, dir, port, &["-gfx"], &[&first.window]);
        assert_window_matches(x, &first, vm, "first", false);
        assert_window_matches(x, &second, vm, "second", true);
        vm.guest("fill 77");
        assert_window_matches(x, &first, vm, "first-after", false);
        assert_window_matches(x, &second, vm, "second-after", true);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_resize_asks_the_guest_for_a_new_mode() {
    let _serial = SERIAL.lock().await;
    let rig = Rig::start().await;
    let (port, stop) = serve(config(), Desktop::primary(&rig.consoles));
    let mut vm = rig.vm(Video::VirtioGpu);
    let dir = rig.dir.path().to_owned();
    let vm = tokio::task::spawn_blocking(move || {
        vm.wait_ready();
        vm.guest("display fb");
        let x = Xvfb::start();
        let client = FreeRdp::open(&x, &dir, port, &["/dynamic-resolution"], &[]);
        let w = client.window.clone();
        // The window is resized as a user would: Display Control sends the new layout, we
        // pass it to Console.SetUIInfo, and virtio-gpu offers the guest that mode.
        let deadline = Instant::now() + Duration::from_secs(40);
        let mut mode = String::new();
        while !mode.contains("1000x700") {
            assert!(
                Instant::now() < deadline,
                "guest never offered 1000x700 (last {mode:?}); log:\n{}",
                client.log_text()
            );
            let _ = x.xdotool(&["windowsize", &w, "1000", "700"]);
            std::thread::sleep(Duration::from_secs(2));
            mode = vm.guest("drmmode");
        }
        vm
    })
    .await
    .expect("resize");
    drop(vm);
    stop.cancel();
    rig.stop().await;
}

/// Counts panics on the RDP server's thread (tokio would swallow them into the task's result).
fn watch_rdp_panics() -> &'static AtomicUsize {
    static PANICS: AtomicUsize = AtomicUsize::new(0);
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name() == Some("rdp") {
                PANICS.fetch_add(1, Ordering::Relaxed);
            }
            previous(info);
        }));
    });
    &PANICS
}

/// Sends `bytes` on a fresh connection and returns how long the server took to close it.
fn hostile(port: u16, bytes: &[u8]) -> Duration {
    let start = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let _ = s.write_all(bytes);
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return start.elapsed(),
            Ok(_) => continue,
            // Closed with our bytes unread.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return start.elapsed(),
            Err(e) => panic!("server kept a hostile connection open: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bytes_are_closed_quickly_and_disturb_no_one() {
    let panics = watch_rdp_panics();
    let (consoles, task) = Consoles::new();
    tokio::spawn(task);
    let mut cfg = config();
    cfg.handshake_timeout = Duration::from_secs(3);
    let (port, stop) = serve(cfg, Desktop::primary(&consoles));
    let dir = tempfile::tempdir().expect("tempdir");
    tokio::task::spawn_blocking(move || {
        // A connected client, which must stay connected throughout.
        let x = Xvfb::start();
        let client = FreeRdp::open(&x, dir.path(), port, &[], &[]);
        // Garbage instead of a Connection Request, a truncated and a lying TPKT, a Connection
        // Request asking for plain RDP security only, then nothing at all (the deadline).
        let cr_rdp_only = [3, 0, 0, 19, 14, 0xe0, 0, 0, 0, 0, 0, 1, 0, 8, 0, 0, 0, 0, 0];
        let mut rng = 0x9e37_79b9_u32;
        let mut random = vec![0u8; 4096];
        for b in &mut random {
            rng ^= rng << 13;
            rng ^= rng >> 17;
            rng ^= rng << 5;
            *b = rng as u8;
        }
        // A Connection Request for TLS + NLA followed at once by bytes that are not a TLS hello.
        let mut cr_then_garbage = cr_rdp_only.to_vec();
        cr_then_garbage[15] = 3;
        cr_then_garbage.extend_from_slice(&random[..512]);
        let cases: [(&str, &[u8]); 7] = [
            ("connection request, then not TLS", &cr_then_garbage),
            ("random", &random),
            ("truncated", &[3, 0, 0]),
            ("short tpkt", &[3, 0, 0, 2, 0, 0, 0]),
            ("huge tpkt", &[3, 0, 0xff, 0xff, 0xe0, 0, 0]),
            ("plain rdp only", &cr_rdp_only),
            ("silent", &[]),
        ];
        for (name, bytes) in cases {
            let took = hostile(port, bytes);
            eprintln!("{name}: closed after {took:?}");
            assert!(took < Duration::from_secs(8), "{name}: {took:?}");
        }
        let out = x.xdotool(&["getwindowname", &client.window]);
        assert!(
            out.status.success(),
            "the connected client went away; log:\n{}",
            client.log_text()
        );
        let (ok, log) = auth_only(port, USER, PASSWORD, &[]);
        assert!(ok, "a good client after the hostile ones:\n{log}");
        assert_eq!(panics.load(Ordering::Relaxed), 0, "the RDP thread panicked");
    })
    .await
    .expect("hostile");
    stop.cancel();
}

#[test]
fn prints_capabilities_for_libvirt() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vdi-sidecar"))
        .arg("--print-capabilities")
        .output()
        .expect("run");
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["type"], "qemu-rdp");
    let features = v["features"].as_array().expect("features");
    assert!(features.iter().any(|f| f == "dbus-address"), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preempt_and_reject_policies_with_real_clients() {
    let (consoles, task) = Consoles::new();
    tokio::spawn(task);
    let dir = tempfile::tempdir().expect("tempdir");
    for policy in [Policy::Preempt, Policy::Reject] {
        let mut cfg = config();
        cfg.policy = policy;
        let (port, stop) = serve(cfg, Desktop::primary(&consoles));
        let path = dir.path().to_owned();
        tokio::task::spawn_blocking(move || {
            let x = Xvfb::start();
            let first = FreeRdp::open(&x, &path, port, &["-gfx"], &[]);
            if policy == Policy::Preempt {
                // The newcomer takes over; the first client loses its session.
                let second = FreeRdp::open(&x, &path, port, &["-gfx"], &[&first.window]);
                let closed = common::wait_until(Duration::from_secs(20), || {
                    !x.xdotool(&["getwindowname", &first.window])
                        .status
                        .success()
                });
                assert!(closed, "preempt: the first client is still connected");
                std::thread::sleep(Duration::from_secs(2));
                assert!(
                    x.xdotool(&["getwindowname", &second.window])
                        .status
                        .success(),
                    "preempt: the newcomer was disconnected too; log:\n{}",
                    second.log_text()
                );
            } else {
                // The newcomer logs in and is disconnected at once; the first stays.
                let out = std::process::Command::new("timeout")
                    .args(["30", "xfreerdp3"])
                    .arg(format!("/v:127.0.0.1:{port}"))
                    .arg(format!("/u:{USER}"))
                    .arg(format!("/p:{PASSWORD}"))
                    .args(["/cert:ignore", "-gfx"])
                    .env("DISPLAY", &x.display)
                    .output()
                    .expect("xfreerdp3");
                assert_ne!(out.status.code(), Some(124), "reject: the newcomer stayed");
                assert!(
                    x.xdotool(&["getwindowname", &first.window])
                        .status
                        .success(),
                    "reject: the first client was disconnected; log:\n{}",
                    first.log_text()
                );
            }
        })
        .await
        .expect("policy");
        stop.cancel();
    }
}

/// A real X.224 negotiation (asking for `protocols`) and TLS handshake.
async fn tls_after_negotiation(
    port: u16,
    protocols: u8,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let cr = [
        3, 0, 0, 19, 14, 0xe0, 0, 0, 0, 0, 0, 1, 0, 8, 0, protocols, 0, 0, 0,
    ];
    tcp.write_all(&cr).await.expect("connection request");
    let mut head = [0u8; 4];
    tcp.read_exact(&mut head).await.expect("connection confirm");
    let mut rest = vec![0u8; usize::from(u16::from_be_bytes([head[2], head[3]])) - 4];
    tcp.read_exact(&mut rest).await.expect("connection confirm");
    assert_eq!(rest.get(7), Some(&2), "not an RDP_NEG_RSP: {rest:?}");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    common::rdp::tls_trusting_anything()
        .connect(name, tcp)
        .await
        .expect("TLS handshake")
}

/// A real X.224 negotiation and TLS handshake, then `garbage` where CredSSP or MCS should be;
/// returns how long the server took to close.
async fn garbage_after_tls(port: u16, protocols: u8, garbage: &[u8]) -> Duration {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = tls_after_negotiation(port, protocols).await;
    let start = Instant::now();
    let _ = tls.write_all(garbage).await;
    let _ = tls.flush().await;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return start.elapsed(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("server kept a connection with garbage after TLS open"),
        }
    }
}

/// One raw CredSSP login attempt (NLA, HYBRID_EX): a TSRequest (version 6) whose NTLM token is
/// junk. Returns the errorCode of the server's answer (`None`: no errorCode, or it just closed).
async fn credssp_attempt(port: u16) -> Option<u32> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = tls_after_negotiation(port, 0x0b).await;
    let token = b"not an NTLM negotiate message";
    // TSRequest ::= SEQUENCE { [0] version INTEGER, [1] negoTokens SEQUENCE OF SEQUENCE {
    //   [0] negoToken OCTET STRING } }
    let octets = [&[0x04, token.len() as u8][..], token].concat();
    let nego_data = [
        &[0x30, octets.len() as u8 + 2, 0xa0, octets.len() as u8][..],
        &octets,
    ]
    .concat();
    let nego_tokens = [
        &[0xa1, nego_data.len() as u8 + 2, 0x30, nego_data.len() as u8][..],
        &nego_data,
    ]
    .concat();
    let body = [&[0xa0, 3, 0x02, 1, 6][..], &nego_tokens].concat();
    let request = [&[0x30, body.len() as u8][..], &body].concat();
    tls.write_all(&request).await.expect("TSRequest");
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => reply.extend_from_slice(&buf[..n]),
            Err(_) => panic!("server neither answered nor closed a bad CredSSP login"),
        }
    }
    ts_request_status(&reply).and_then(|(_, error)| error)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_credssp_failures_hit_the_login_limit_vnc_shares() {
    let (consoles, task) = Consoles::new();
    tokio::spawn(task);
    let cfg = config();
    let auth = Arc::clone(&cfg.auth);
    let (port, stop) = serve(cfg, Desktop::primary(&consoles));
    // Five bad logins: each answered with a CredSSP error.
    for attempt in 1..=5 {
        let error = credssp_attempt(port).await;
        assert!(
            error.is_some_and(|e| e != ntstatus::ACCOUNT_LOCKED_OUT),
            "attempt {attempt}: {error:x?}"
        );
    }
    // The sixth is turned away before ironrdp sees it, as a locked account.
    assert_eq!(
        credssp_attempt(port).await,
        Some(ntstatus::ACCOUNT_LOCKED_OUT)
    );
    // FreeRDP with the right password too, and a VNC client of the same sidecar: one limit.
    let (ok, log) = tokio::task::spawn_blocking(move || auth_only(port, USER, PASSWORD, &[]))
        .await
        .expect("auth");
    assert!(!ok, "a limited address logged in over RDP:\n{log}");
    let vnc = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let vnc_addr = vnc.local_addr().expect("addr");
    tokio::spawn(vdi_sidecar::vnc::server::run(
        vnc,
        Arc::new(VncConfig::new(Arc::clone(&auth), "shared")),
        Desktop::primary(&consoles),
        stop.clone(),
    ));
    let mut s = tokio::net::TcpStream::connect(vnc_addr)
        .await
        .expect("connect");
    let refused = common::rfb::handshake(&mut s, "003.008", Some(PASSWORD), true).await;
    assert_eq!(
        refused.err().as_deref(),
        Some("too many failed logins; try again later")
    );
    // Another address is not affected.
    assert!(auth.allowed("127.0.0.2".parse().expect("ip")));
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_the_memory_limit_is_told_no_memory() {
    let (consoles, task) = Consoles::new();
    tokio::spawn(task);
    let mut limits = vdi_sidecar::cgroup::Limits::none();
    limits.memory = Some(vdi_sidecar::session::budget::rss() / 2);
    let mut desktop = Desktop::primary(&consoles);
    desktop.budget = vdi_sidecar::session::budget::Budget::new(limits);
    let (port, stop) = serve(config(), desktop);
    assert_eq!(credssp_attempt(port).await, Some(ntstatus::NO_MEMORY));
    let (ok, log) = tokio::task::spawn_blocking(move || auth_only(port, USER, PASSWORD, &[]))
        .await
        .expect("auth");
    assert!(!ok, "admitted over the limit:\n{log}");
    assert!(
        log.contains("NO_MEMORY"),
        "FreeRDP was not told why:\n{log}"
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freerdp_failing_nla_five_times_is_turned_away_until_the_window_passes() {
    let (consoles, task) = Consoles::new();
    tokio::spawn(task);
    let mut cfg = config();
    let window = Duration::from_secs(6);
    cfg.auth =
        Arc::new(Auth::user_password(USER, PASSWORD).with_limiter(LoginLimiter::new(5, window)));
    let (port, stop) = serve(cfg, Desktop::primary(&consoles));
    tokio::task::spawn_blocking(move || {
        for attempt in 1..=5 {
            let (ok, log) = auth_only(port, USER, "wrong-pass", &[]);
            assert!(
                !ok,
                "attempt {attempt}: a wrong password was accepted:\n{log}"
            );
        }
        let (ok, log) = auth_only(port, USER, PASSWORD, &[]);
        assert!(!ok, "the right password after five failures got in:\n{log}");
        assert!(
            log.contains("LOCKED_OUT") || log.contains("locked out"),
            "FreeRDP was not told the account is locked out:\n{log}"
        );
        std::thread::sleep(window);
        let (ok, log) = auth_only(port, USER, PASSWORD, &[]);
        assert!(ok, "still refused after the window:\n{log}");
    })
    .await
    .expect("auth");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_after_tls_are_closed() {
    let panics = watch_rdp_panics();
    let (consoles, task) = Consoles::new();
    tokio::spawn(task);
    let mut random = vec![0u8; 4096];
    let mut rng = 0x1234_5677_u32;
    for b in &mut random {
        rng ^= rng << 13;
        rng ^= rng >> 17;
        rng ^= rng << 5;
        *b = rng as u8;
    }
    // NLA: garbage instead of CredSSP; a DER header claiming 16 MiB; TLS security: garbage
    // instead of MCS Connect Initial.
    let (port, stop) = serve(config(), Desktop::primary(&consoles));
    for (name, bytes) in [
        ("random", &random[..]),
        ("huge DER", &[0x30, 0x84, 1, 0, 0, 0][..]),
    ] {
        let took = garbage_after_tls(port, 0x0b, bytes).await;
        eprintln!("NLA, {name}: closed after {took:?}");
        assert!(took < Duration::from_secs(5), "{name}: {took:?}");
    }
    stop.cancel();
    let mut cfg = config();
    cfg.security = Security::Tls;
    let (port, stop) = serve(cfg, Desktop::primary(&consoles));
    let took = garbage_after_tls(port, 0x01, &random).await;
    eprintln!("TLS, random: closed after {took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    // And the server still serves.
    tokio::task::spawn_blocking(move || {
        let (ok, log) = auth_only(port, USER, PASSWORD, &["/sec:tls"]);
        assert!(ok, "{log}");
    })
    .await
    .expect("auth");
    assert_eq!(panics.load(Ordering::Relaxed), 0, "the RDP thread panicked");
    stop.cancel();
}
