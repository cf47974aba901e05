//! The web client: probes, the page, WebSocket edge cases byte by byte (no QEMU), and a real
//! headless Chromium running noVNC against the real guest (exact canvas pixels, a typed key, a
//! wrong password).

mod common;

use common::browser;
use common::ws::frame;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::qemu::Rig;
use vdi_sidecar::pixman::X8R8G8B8;
use vdi_sidecar::qemu::source::Consoles;
use vdi_sidecar::session::auth::Auth;
use vdi_sidecar::tls::{TlsIdentity, default_names};
use vdi_sidecar::viewers::Viewers;
use vdi_sidecar::vnc::VncConfig;
use vdi_sidecar::web::WebConfig;

const PASSWORD: &str = "web-pass";

/// The web listener as `serve` wires it (the VNC server behind its WebSocket).
async fn start_with(consoles: &Consoles, cfg: WebConfig) -> (SocketAddr, Arc<VncConfig>) {
    let vnc = Arc::new(VncConfig::new(
        Arc::new(Auth::password(PASSWORD)),
        "web-desk",
    ));
    let viewers = Viewers {
        web: Some(("127.0.0.1:0".parse().expect("addr"), cfg, Arc::clone(&vnc))),
        ..Viewers::default()
    };
    let at = viewers
        .start(consoles, &tokio_util::sync::CancellationToken::new())
        .await
        .expect("listen");
    (at.web.expect("web address"), vnc)
}

async fn start(consoles: &Consoles, tls: bool) -> SocketAddr {
    let cfg = WebConfig {
        novnc: Some(browser::novnc()),
        tls: tls.then(|| TlsIdentity::generate(&default_names(&[])).expect("certificate")),
    };
    start_with(consoles, cfg).await.0
}

/// A blocking HTTP/1.1 GET; returns (status, headers+body).
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, out)
}

/// Opens a WebSocket on `path` by hand; returns the stream and the response head.
fn ws_open(addr: SocketAddr, path: &str, protocol: Option<&str>) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let proto = protocol
        .map(|p| format!("Sec-WebSocket-Protocol: {p}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{proto}\r\n"
    )
    .expect("handshake");
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).expect("response head");
        head.push(b[0]);
    }
    (s, String::from_utf8_lossy(&head).into_owned())
}

/// Reads one server frame: (opcode, payload); `None` when the connection closed.
fn read_frame(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).ok()?;
    let mut len = u64::from(h[1] & 0x7f);
    if len == 126 {
        let mut b = [0u8; 2];
        s.read_exact(&mut b).ok()?;
        len = u16::from_be_bytes(b).into();
    } else if len == 127 {
        let mut b = [0u8; 8];
        s.read_exact(&mut b).ok()?;
        len = u64::from_be_bytes(b);
    }
    let mut p = vec![0u8; usize::try_from(len).ok()?];
    s.read_exact(&mut p).ok()?;
    Some((h[0] & 0x0f, p))
}

/// Reads binary frames until `n` RFB bytes arrived.
fn read_rfb(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut got = Vec::new();
    while got.len() < n {
        let (op, p) = read_frame(s).expect("frame");
        assert_eq!(op, 2, "binary frames only");
        got.extend_from_slice(&p);
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_page_and_websocket_edge_cases() {
    let (consoles, input_task) = Consoles::new();
    tokio::spawn(input_task);
    let addr = start(&consoles, false).await;
    let fb = consoles.primary();

    tokio::task::spawn_blocking(move || {
        assert_eq!(get(addr, "/healthz").0, 200);
        let (code, body) = get(addr, "/readyz");
        assert_eq!(code, 503, "ready before QEMU attached: {body}");
        let px: Vec<u8> = (0..16u32 * 8).flat_map(|i| i.to_ne_bytes()).collect();
        fb.scanout(16, 8, 64, X8R8G8B8, &px).expect("scanout");
        assert_eq!(get(addr, "/readyz").0, 200);
        let (code, page) = get(addr, "/");
        assert_eq!(code, 200);
        assert!(page.contains("app.js"), "{page}");
        assert_eq!(get(addr, "/novnc/core/rfb.js").0, 200);

        // With and without the "binary" subprotocol; the RFB greeting arrives in binary frames.
        for proto in [Some("binary"), None] {
            let (mut s, head) = ws_open(addr, "/websockify", proto);
            assert!(head.starts_with("HTTP/1.1 101"), "{head}");
            assert_eq!(
                head.to_ascii_lowercase()
                    .contains("sec-websocket-protocol: binary"),
                proto.is_some(),
                "{head}"
            );
            assert_eq!(read_rfb(&mut s, 12), b"RFB 003.008\n");
        }

        // The version split over a fragmented message (and a ping in between) still works.
        let (mut s, _) = ws_open(addr, "/", None);
        assert_eq!(read_rfb(&mut s, 12), b"RFB 003.008\n");
        s.write_all(&frame(false, 2, b"RFB 003")).expect("fragment");
        s.write_all(&frame(true, 9, b"hi")).expect("ping");
        s.write_all(&frame(true, 0, b".008\n"))
            .expect("continuation");
        let (op, pong) = read_frame(&mut s).expect("pong");
        assert_eq!((op, pong.as_slice()), (10, &b"hi"[..]));
        assert_eq!(
            read_rfb(&mut s, 2),
            [1, 2],
            "security types after the fragments"
        );

        // A text frame: closed with 1003 (unsupported data).
        let (mut s, _) = ws_open(addr, "/websockify", None);
        read_rfb(&mut s, 12);
        s.write_all(&frame(true, 1, b"RFB 003.008\n"))
            .expect("text");
        let close = loop {
            match read_frame(&mut s) {
                Some((8, p)) => break p,
                Some(_) => continue,
                None => panic!("no close frame for a text frame"),
            }
        };
        assert_eq!(&close[..2], &1003u16.to_be_bytes());

        // An oversized frame (a 1 TiB length): the connection ends, nothing is allocated.
        let (mut s, _) = ws_open(addr, "/websockify", None);
        read_rfb(&mut s, 12);
        let mut huge = vec![0x82, 0x80 | 127];
        huge.extend_from_slice(&(1u64 << 40).to_be_bytes());
        huge.extend_from_slice(&[1, 2, 3, 4]);
        s.write_all(&huge).expect("huge header");
        let ended = loop {
            match read_frame(&mut s) {
                Some((8, _)) | None => break true,
                Some(_) => continue,
            }
        };
        assert!(ended);

        // Abrupt closes mid-handshake, then a good client is still served.
        for _ in 0..5 {
            let (s, _) = ws_open(addr, "/websockify", Some("binary"));
            drop(s);
        }
        let (mut s, _) = ws_open(addr, "/websockify", Some("binary"));
        assert_eq!(read_rfb(&mut s, 12), b"RFB 003.008\n");
        assert_eq!(get(addr, "/healthz").0, 200);
    })
    .await
    .expect("edge cases");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_viewers_are_capped_and_slots_come_back() {
    let (consoles, input_task) = Consoles::new();
    tokio::spawn(input_task);
    let addr = start(&consoles, false).await;
    tokio::task::spawn_blocking(move || {
        let max = vdi_sidecar::web::MAX_VIEWERS;
        let mut open = Vec::new();
        for _ in 0..max {
            let (mut s, head) = ws_open(addr, "/websockify", Some("binary"));
            assert!(head.starts_with("HTTP/1.1 101"), "{head}");
            assert_eq!(read_rfb(&mut s, 12), b"RFB 003.008\n");
            open.push(s);
        }
        // One more is refused with a status, not left hanging; probes still answer.
        let (_s, head) = ws_open(addr, "/websockify", Some("binary"));
        assert!(head.starts_with("HTTP/1.1 503"), "{head}");
        assert_eq!(get(addr, "/healthz").0, 200);
        // A viewer leaves: its slot is free again.
        drop(open.pop());
        let ok = common::wait_until(Duration::from_secs(10), || {
            let (mut s, head) = ws_open(addr, "/websockify", Some("binary"));
            head.starts_with("HTTP/1.1 101") && read_rfb(&mut s, 12) == b"RFB 003.008\n"
        });
        assert!(ok, "the freed slot was never given back");
    })
    .await
    .expect("cap");
}

#[tokio::test]
async fn without_novnc_the_page_says_how_to_get_it() {
    let (consoles, input_task) = Consoles::new();
    tokio::spawn(input_task);
    let missing = tempfile::tempdir().expect("tempdir");
    let addr = start_with(
        &consoles,
        WebConfig {
            novnc: Some(missing.path().to_owned()),
            tls: None,
        },
    )
    .await
    .0;
    let (code, body) = tokio::task::spawn_blocking(move || get(addr, "/"))
        .await
        .expect("get");
    assert_eq!(code, 503);
    assert!(body.contains("npm install"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_with_novnc_shows_the_guest_exactly_and_types_into_it() {
    let rig = Rig::start().await;
    let addr = start(&rig.consoles, true).await;
    let vm = rig.vm_with_test_image().await;
    let dir = rig.dir.path().to_owned();
    let vm = tokio::task::spawn_blocking(move || {
        let mut vm = vm;
        browser::write_oracle(&mut vm, &dir);
        let url = format!("https://127.0.0.1:{}/", addr.port());

        let seen = browser::check(&url, PASSWORD, "view", &dir);
        assert!(
            seen.contains("\"differing_pixels\":0"),
            "canvas differs: {seen}"
        );
        vm.expect_event(1, 30, 1);
        vm.expect_event(1, 30, 0);
        // Keep the screenshot where CI keeps artifacts.
        let artifacts = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/artifacts");
        let _ = std::fs::create_dir_all(&artifacts);
        let _ = std::fs::copy(dir.join("web-client.png"), artifacts.join("web-client.png"));

        let refused = browser::check(&url, "wrong-pw", "badpass", &dir);
        assert!(refused.contains("Authentication failed"), "{refused}");
        vm
    })
    .await
    .expect("browser");
    drop(vm);
    rig.stop().await;
}

/// Video in the guest: noVNC negotiates Open H.264 when this Chromium decodes it (WebCodecs;
/// then the viewer gets H.264 pictures from the shared stream) — otherwise the test says so and
/// checks the Tight fallback — and either way, once the video ends, the canvas equals the
/// screendump exactly (back to Tight, lossless refresh).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_with_novnc_gets_video_as_h264_and_ends_exact() {
    let rig = Rig::start().await;
    let cfg = WebConfig {
        novnc: Some(browser::novnc()),
        tls: Some(TlsIdentity::generate(&default_names(&[])).expect("certificate")),
    };
    let (addr, vnc) = start_with(&rig.consoles, cfg).await;
    let vm = rig.vm_with_test_image().await;
    let dir = rig.dir.path().to_owned();
    let url = format!("https://127.0.0.1:{}/", addr.port());
    let page = {
        let dir = dir.clone();
        std::thread::spawn(move || browser::check(&url, PASSWORD, "video", &dir))
    };
    let vm = tokio::task::spawn_blocking(move || {
        let mut vm = vm;
        assert!(
            common::wait_until(Duration::from_secs(60), || dir.join("connected").exists()),
            "the page never connected"
        );
        vm.guest("scene video 5000");
        browser::write_oracle(&mut vm, &dir);
        vm
    })
    .await
    .expect("guest");
    let seen = page.join().expect("page");
    let stats = &vnc.stats;
    let get = vdi_sidecar::session::stats::Counters::get;
    let (h264, jpeg) = (get(&stats.h264_frames), get(&stats.jpeg_rects));
    eprintln!("page: {seen}; H.264 pictures {h264}, JPEG rectangles {jpeg}");
    assert!(
        seen.contains("\"differing_pixels\":0"),
        "canvas differs: {seen}"
    );
    if seen.contains("\"h264\":true") {
        assert!(
            h264 >= 10,
            "H.264 decodable here, yet {h264} pictures went out"
        );
        assert!(
            seen.contains("\"video_problems\":[]"),
            "the browser's decoder complained: {seen}"
        );
    } else {
        eprintln!("this Chromium cannot decode H.264 (WebCodecs): checked the Tight fallback");
        assert_eq!(h264, 0, "H.264 sent to a browser that did not ask for it");
        assert!(jpeg > 0, "the video went out as Tight JPEG");
    }
    drop(vm);
    rig.stop().await;
}

/// The page's clipboard box with noVNC's Extended Clipboard: text the guest copies (its own
/// vdagent, see tests/clipboard.rs) shows in the page, and text pasted with the page's button
/// reaches the guest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_with_novnc_copies_and_pastes_through_the_guest_agent() {
    let rig = Rig::start().await;
    let addr = start(&rig.consoles, true).await;
    let mut vm = rig.vm_with_clipboard().await;
    let dir = rig.dir.path().to_owned();
    let vm = tokio::task::spawn_blocking(move || {
        vm.send_line("copy from the guest: Grüße ✓");
        vm.expect_line("OK copy", Duration::from_secs(20));
        std::fs::write(dir.join("clip-in.txt"), "from the guest: Grüße ✓").expect("write");
        std::fs::write(dir.join("clip-out.txt"), "from the browser\nzwei ✓").expect("write");
        let url = format!("https://127.0.0.1:{}/", addr.port());
        let d = dir.clone();
        let page = std::thread::spawn(move || browser::check(&url, PASSWORD, "clipboard", &d));
        // The page's paste reaches the guest while the page is still connected.
        vm.expect_line("CLIP GRAB", Duration::from_secs(60));
        vm.send_line("paste");
        let line = vm.expect_line("PASTE", Duration::from_secs(20));
        std::fs::write(dir.join("clip-done"), "").expect("write");
        let seen = page.join().expect("browser thread");
        assert!(
            seen.contains("\"received\":\"from the guest: Grüße ✓\""),
            "the page did not show the guest's copy: {seen}"
        );
        assert!(line.ends_with("from the browser\\nzwei ✓"), "{line}");
        vm
    })
    .await
    .expect("browser");
    drop(vm);
    rig.stop().await;
}
