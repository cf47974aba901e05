//! Hostile VNC clients, without QEMU: a synthetic framebuffer behind the real server. Each bad
//! client is closed (with a reason where RFB has one) or its message ignored; a well-behaved
//! viewer connected all along keeps being served.

mod common;

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vdi_sidecar::pixman::X8R8G8B8;
use vdi_sidecar::qemu::source::Consoles;
use vdi_sidecar::session::Desktop;
use vdi_sidecar::session::auth::{Auth, LoginLimiter};
use vdi_sidecar::vnc::VncConfig;

const PASSWORD: &str = "hostile1";

async fn server() -> (std::net::SocketAddr, Consoles) {
    let (consoles, input_task) = Consoles::new();
    tokio::spawn(input_task);
    let fb = consoles.primary();
    let px: Vec<u8> = (0..64u32 * 48)
        .flat_map(|i| (i.wrapping_mul(2_654_435_761) & 0xff_ffff).to_ne_bytes())
        .collect();
    fb.scanout(64, 48, 256, X8R8G8B8, &px).expect("scanout");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let auth = Auth::password(PASSWORD).with_limiter(LoginLimiter::new(4, Duration::from_secs(60)));
    let cfg = VncConfig::new(Arc::new(auth), "hostile");
    let cfg = Arc::new(cfg);
    tokio::spawn(vdi_sidecar::vnc::server::run(
        listener,
        cfg,
        Desktop::primary(&consoles),
        tokio_util::sync::CancellationToken::new(),
    ));
    (addr, consoles)
}

/// Completes the 3.8 handshake with `password`; returns the stream after ServerInit.
async fn login(addr: std::net::SocketAddr, password: &str) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    common::rfb::handshake(&mut s, "003.008", Some(password), true).await?;
    Ok(s)
}

/// True when the server closed the connection (EOF or reset) within 5 s.
async fn closed(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue, // drain whatever was sent before the close
            Err(_) => return false,
        }
    }
}

/// Requests a full update and reads it (Raw); returns the number of rectangles.
async fn full_update(s: &mut TcpStream, x: u16, y: u16, w: u16, h: u16) -> u16 {
    let mut m = vec![3, 0];
    for v in [x, y, w, h] {
        m.extend(v.to_be_bytes());
    }
    s.write_all(&m).await.expect("request");
    let t = s.read_u8().await.expect("type");
    assert_eq!(t, 0);
    s.read_u8().await.expect("pad");
    let n = s.read_u16().await.expect("n");
    for _ in 0..n {
        let mut hdr = [0u8; 12];
        s.read_exact(&mut hdr).await.expect("rect");
        let (rw, rh) = (
            u16::from_be_bytes([hdr[4], hdr[5]]),
            u16::from_be_bytes([hdr[6], hdr[7]]),
        );
        let mut px = vec![0u8; rw as usize * rh as usize * 4];
        s.read_exact(&mut px).await.expect("pixels");
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_are_closed_and_a_good_viewer_is_unaffected() {
    let (addr, _consoles) = server().await;
    let mut good = login(addr, PASSWORD).await.expect("good viewer");
    assert_eq!(full_update(&mut good, 0, 0, 64, 48).await, 1);

    // Bad version strings.
    for version in [
        &b"HTTP/1.1 200\n"[..12],
        b"RFB 002.000\n",
        b"RFB 00x.008\n",
        b"\0\0\0\0\0\0\0\0\0\0\0\0",
    ] {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let mut v = [0u8; 12];
        s.read_exact(&mut v).await.expect("version");
        s.write_all(version).await.expect("write");
        assert!(closed(&mut s).await, "bad version {version:?} not closed");
    }
    // Security type that was not offered: 3.8 failure with a reason.
    {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let mut v = [0u8; 12];
        s.read_exact(&mut v).await.expect("version");
        s.write_all(b"RFB 003.008\n").await.expect("write");
        let mut types = [0u8; 2];
        s.read_exact(&mut types).await.expect("types");
        s.write_all(&[1]).await.expect("choose None");
        assert_eq!(s.read_u32().await.expect("result"), 1);
        let len = s.read_u32().await.expect("reason len");
        let mut r = vec![0; len as usize];
        s.read_exact(&mut r).await.expect("reason");
        assert!(String::from_utf8_lossy(&r).contains("not offered"));
    }
    // Messages that break framing or limits close the connection.
    let bad_messages: &[&[u8]] = &[
        &[42],               // unknown message type
        &[2, 0, 0xff, 0xff], // 65,535 encodings
        &[
            0, 0, 0, 0, 24, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0,
        ], // 24 bpp
        &[
            0, 0, 0, 0, 32, 24, 0, 0, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0,
        ], // colour map
        &[251, 0, 0, 1, 0, 1, 200, 0], // 200 screens
        &[255, 77],          // unknown QEMU message
    ];
    for m in bad_messages {
        let mut s = login(addr, PASSWORD).await.expect("login");
        s.write_all(m).await.expect("write");
        assert!(
            closed(&mut s).await,
            "message {m:?} did not close the connection"
        );
    }
    // Harmless oddities are ignored: empty and out-of-range update requests get empty updates,
    // a truncated message followed by a close is just a disconnect.
    {
        let mut s = login(addr, PASSWORD).await.expect("login");
        s.write_all(&[2, 0, 0, 1, 0, 0, 0, 0])
            .await
            .expect("raw only");
        assert_eq!(full_update(&mut s, 0, 0, 0, 0).await, 0);
        assert_eq!(full_update(&mut s, 60000, 60000, 100, 100).await, 0);
        assert_eq!(
            full_update(&mut s, 60, 40, 100, 100).await,
            1,
            "clipped to the surface"
        );
        s.write_all(&[3, 0, 0]).await.expect("truncated");
    }
    // Cut text over the clipboard limit (here 16 MiB + 1, the limit is 1 MiB) is skipped as it
    // arrives, never buffered, and the connection goes on; so does an Extended Clipboard
    // message too short for its flags (length -1), which is refused with a log line.
    {
        let mut s = login(addr, PASSWORD).await.expect("login");
        let len: u32 = (16 << 20) + 1;
        let mut m = vec![6, 0, 0, 0];
        m.extend(len.to_be_bytes());
        s.write_all(&m).await.expect("header");
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..16 {
            s.write_all(&chunk).await.expect("body");
        }
        s.write_all(b"x").await.expect("last byte");
        s.write_all(&[6, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x42])
            .await
            .expect("short extended");
        s.write_all(&[2, 0, 0, 1, 0, 0, 0, 0])
            .await
            .expect("raw only");
        assert_eq!(
            full_update(&mut s, 0, 0, 64, 48).await,
            1,
            "still served after the skipped cut text"
        );
    }
    // Wrong passwords in a loop: refused, then turned away before authenticating.
    let mut reasons = Vec::new();
    for _ in 0..6 {
        reasons.push(login(addr, "wrong!!!").await.expect_err("must fail"));
    }
    assert!(reasons[0].contains("authentication failed"), "{reasons:?}");
    assert!(
        reasons
            .last()
            .expect("last")
            .contains("too many failed logins"),
        "{reasons:?}"
    );

    // The good viewer was never disturbed.
    assert_eq!(full_update(&mut good, 0, 0, 64, 48).await, 1);
}
