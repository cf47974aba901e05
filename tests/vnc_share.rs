//! Encode once, many viewers, without QEMU: a synthetic framebuffer animated behind the real
//! server and real sockets. Viewers in step share one encoding of each frame and every one of
//! them ends with exactly the framebuffer's pixels; a viewer that never reads or reads one byte
//! a second holds up no one and costs no frame-sized memory of its own; fifty viewers that
//! connect at once while the guest changes mode share their key frames.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::rfb::{self, Client};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use vdi_sidecar::framebuffer::Framebuffer;
use vdi_sidecar::pixman::X8R8G8B8;
use vdi_sidecar::qemu::source::Consoles;
use vdi_sidecar::session::Desktop;
use vdi_sidecar::session::auth::Auth;
use vdi_sidecar::session::budget::rss;
use vdi_sidecar::vnc::VncConfig;
use vdi_sidecar::vnc::proto::enc;

struct Server {
    addr: std::net::SocketAddr,
    fb: Framebuffer,
    cfg: Arc<VncConfig>,
    _consoles: Consoles,
}

async fn server(w: u32, h: u32) -> Server {
    let (consoles, input_task) = Consoles::new();
    tokio::spawn(input_task);
    let fb = consoles.primary();
    paint(&fb, w, h, 0);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let cfg = Arc::new(VncConfig::new(Arc::new(Auth::open()), "share"));
    tokio::spawn(vdi_sidecar::vnc::server::run(
        listener,
        Arc::clone(&cfg),
        Desktop::primary(&consoles),
        tokio_util::sync::CancellationToken::new(),
    ));
    Server {
        addr,
        fb,
        cfg,
        _consoles: consoles,
    }
}

/// Frame `t` of a scene with flat areas, text-like stripes and a moving noisy box (what a
/// desktop with a video window looks like to an encoder).
fn paint(fb: &Framebuffer, w: u32, h: u32, t: u32) {
    let mut px = Vec::with_capacity((w * h * 4) as usize);
    let bx = (t * 37) % w.saturating_sub(64).max(1);
    for y in 0..h {
        for x in 0..w {
            let v = if x >= bx && x < bx + 64 && y < 64 {
                (x.wrapping_mul(2_654_435_761) ^ (y * 40_503) ^ (t * 97)) & 0xff_ffff
            } else if y % 16 < 2 {
                0x303030 + (t % 8) * 0x010101
            } else {
                0xe0e0e0
            };
            px.extend_from_slice(&v.to_ne_bytes());
        }
    }
    fb.scanout(w, h, w * 4, X8R8G8B8, &px).expect("scanout");
}

/// Asks for incremental updates (what the shared chain serves) until the client's own copy of
/// the screen is exactly the framebuffer. An unanswered request means nothing changed since the
/// client's last update: its screen must then already be right.
async fn converge(c: &mut Client, fb: &Framebuffer, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if c.fb == fb.snapshot().pixels {
            return;
        }
        c.request(true).await;
        match tokio::time::timeout(Duration::from_secs(2), c.read_update()).await {
            Ok(()) => {}
            Err(_) => {
                let snap = fb.snapshot().pixels;
                let diff = c.fb.iter().zip(&snap).filter(|(a, b)| a != b).count();
                panic!("{what}: no update due, yet {diff} pixels differ");
            }
        }
        assert!(Instant::now() < deadline, "{what}: pixels never matched");
    }
}

/// Requests and reads updates until `until`, or until the server has nothing more to send.
async fn watch(c: &mut Client, until: Instant) -> usize {
    let mut n = 0;
    while Instant::now() < until {
        c.request(true).await;
        match tokio::time::timeout(Duration::from_secs(2), c.read_update()).await {
            Ok(()) => n += 1,
            Err(_) => break, // the animation ended; the request stays pending
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewers_share_one_encoding_and_all_end_exact() {
    let srv = server(320, 240).await;
    let mut fast = Vec::new();
    for _ in 0..3 {
        let mut c = Client::connect(srv.addr, "003.008", None)
            .await
            .expect("connect");
        c.set_encodings(&[enc::ZRLE, enc::COPY_RECT]).await;
        c.request(false).await;
        c.read_update().await;
        fast.push(c);
    }
    let mut slow = Client::connect(srv.addr, "003.008", None)
        .await
        .expect("connect");
    slow.set_encodings(&[enc::ZRLE, enc::COPY_RECT]).await;
    let mut raw = Client::connect(srv.addr, "003.008", None)
        .await
        .expect("connect");
    raw.set_encodings(&[enc::RAW]).await;
    // The guest animates; the fast viewers keep asking, the slow one asks now and then.
    let fb = srv.fb.clone();
    let animate = tokio::spawn(async move {
        for t in 1..60 {
            paint(&fb, 320, 240, t);
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
    });
    let slow_task = tokio::spawn(async move {
        for _ in 0..3 {
            slow.request(true).await;
            slow.read_update().await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        slow
    });
    let until = Instant::now() + Duration::from_millis(800);
    let fast = futures_util::future::join_all(fast.into_iter().map(|mut c| async move {
        let n = watch(&mut c, until).await;
        (c, n)
    }))
    .await;
    let mut slow = slow_task.await.expect("slow viewer");
    animate.await.expect("animation");
    let mut fast_updates = 0;
    let mut fast = fast;
    for (i, (c, n)) in fast.iter_mut().enumerate() {
        fast_updates += *n;
        // A request may still be pending from the watching loop: its answer comes first.
        converge(c, &srv.fb, &format!("fast viewer {i}")).await;
    }
    converge(&mut slow, &srv.fb, "slow viewer").await;
    raw.request(false).await;
    raw.read_update().await;
    converge(&mut raw, &srv.fb, "Raw viewer").await;
    let g = srv.cfg.groups.stats();
    let sent = srv.cfg.stats.updates.load(Ordering::Relaxed);
    eprintln!("{fast_updates} fast updates, {sent} sent in all, groups: {g:?}");
    assert!(
        sent as f64 > 2.0 * g.encoded as f64,
        "three viewers in step should share most frames: {sent} sent, {} encoded",
        g.encoded
    );
}

/// A viewer that only counts: ZRLE updates read and thrown away, rectangle by rectangle.
async fn counting_viewer(addr: std::net::SocketAddr, until: Instant) -> u64 {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    rfb::handshake(&mut s, "003.008", None, true)
        .await
        .expect("handshake");
    rfb::set_encodings(&mut s, &[enc::ZRLE]).await;
    let mut updates = 0;
    let mut incremental = false;
    let mut skip = vec![0u8; 64 * 1024];
    while Instant::now() < until {
        rfb::request(&mut s, incremental, 0, 0, 1920, 1080).await;
        incremental = true;
        assert_eq!(s.read_u8().await.expect("type"), 0);
        s.read_u8().await.expect("pad");
        let n = s.read_u16().await.expect("count");
        for _ in 0..n {
            let mut hdr = [0u8; 12];
            s.read_exact(&mut hdr).await.expect("rect");
            let e = i32::from_be_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
            assert_eq!(e, enc::ZRLE);
            let mut left = s.read_u32().await.expect("len") as usize;
            while left > 0 {
                let k = left.min(skip.len());
                s.read_exact(&mut skip[..k]).await.expect("zrle");
                left -= k;
            }
        }
        updates += 1;
    }
    updates
}

/// Full-screen noise at 1080p: the worst case for ZRLE (a frame is megabytes). `buf` is reused
/// so the test's own allocations do not show as the server's.
fn noise(fb: &Framebuffer, t: u32, buf: &mut Vec<u8>) {
    let (w, h) = (1920u32, 1080u32);
    buf.clear();
    buf.extend(
        (0..w * h).flat_map(|i| ((i ^ t).wrapping_mul(2_654_435_761) & 0xff_ffff).to_ne_bytes()),
    );
    fb.scanout(w, h, w * 4, X8R8G8B8, buf).expect("scanout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_and_trickling_viewers_hold_up_no_one_and_cost_no_frames() {
    let srv = server(64, 64).await;
    let mut buf = Vec::with_capacity(1920 * 1080 * 4);
    noise(&srv.fb, 0, &mut buf);
    let before = rss();
    // One viewer asks and never reads; one reads a byte a second; one leaves mid-update.
    let mut stalled = TcpStream::connect(srv.addr).await.expect("connect");
    rfb::handshake(&mut stalled, "003.008", None, true)
        .await
        .expect("handshake");
    rfb::set_encodings(&mut stalled, &[enc::ZRLE]).await;
    rfb::request(&mut stalled, false, 0, 0, 1920, 1080).await;
    let mut trickle = TcpStream::connect(srv.addr).await.expect("connect");
    rfb::handshake(&mut trickle, "003.008", None, true)
        .await
        .expect("handshake");
    rfb::set_encodings(&mut trickle, &[enc::ZRLE]).await;
    rfb::request(&mut trickle, false, 0, 0, 1920, 1080).await;
    let trickler = tokio::spawn(async move {
        let mut b = [0u8; 1];
        for _ in 0..6 {
            if trickle.read_exact(&mut b).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let mut leaver = TcpStream::connect(srv.addr).await.expect("connect");
    rfb::handshake(&mut leaver, "003.008", None, true)
        .await
        .expect("handshake");
    rfb::set_encodings(&mut leaver, &[enc::ZRLE]).await;
    rfb::request(&mut leaver, false, 0, 0, 1920, 1080).await;
    let mut part = [0u8; 1000];
    leaver
        .read_exact(&mut part)
        .await
        .expect("part of an update");
    drop(leaver);
    // Meanwhile the guest animates and three viewers watch.
    let fb = srv.fb.clone();
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let watch = Arc::clone(&peak);
    let animate = tokio::spawn(async move {
        let until = Instant::now() + Duration::from_secs(5);
        let mut t = 1;
        while Instant::now() < until {
            noise(&fb, t, &mut buf);
            t += 1;
            watch.fetch_max(rss(), Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let until = Instant::now() + Duration::from_secs(5);
    let counts =
        futures_util::future::join_all((0..3).map(|_| counting_viewer(srv.addr, until))).await;
    animate.await.expect("animate");
    trickler.await.expect("trickle");
    let grown = peak.load(Ordering::Relaxed).saturating_sub(before) as f64 / (1 << 20) as f64;
    eprintln!("updates per watching viewer in 5 s: {counts:?}; RSS grew {grown:.1} MiB");
    for n in &counts {
        assert!(*n >= 5, "a watching viewer was held up: {counts:?}");
    }
    // Each frame here is ~6 MB of ZRLE; the old per-viewer design needed ~40 MB per viewer.
    assert!(
        grown < 64.0,
        "RSS grew {grown:.1} MiB with 6 viewers of 1080p noise"
    );
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_viewers_connecting_during_a_mode_change_share_key_frames() {
    let srv = server(800, 600).await;
    let fb = srv.fb.clone();
    let flip = tokio::spawn(async move {
        for i in 0..10u32 {
            let (w, h) = if i % 2 == 0 { (1024, 768) } else { (800, 600) };
            paint(&fb, w, h, i);
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    });
    let viewers = futures_util::future::join_all((0..50).map(|_| async {
        let mut s = TcpStream::connect(srv.addr).await.expect("connect");
        let init = rfb::handshake(&mut s, "003.008", None, true)
            .await
            .expect("handshake");
        rfb::set_encodings(&mut s, &[enc::ZRLE, enc::DESKTOP_SIZE]).await;
        let (mut w, mut h) = (init.width, init.height);
        // Updates until one carries pixels (size changes come alone first).
        loop {
            rfb::request(&mut s, false, 0, 0, w, h).await;
            assert_eq!(s.read_u8().await.expect("type"), 0);
            s.read_u8().await.expect("pad");
            let n = s.read_u16().await.expect("count");
            let mut pixels = false;
            for _ in 0..n {
                let mut hdr = [0u8; 12];
                s.read_exact(&mut hdr).await.expect("rect");
                let e = i32::from_be_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
                if e == enc::ZRLE {
                    let len = s.read_u32().await.expect("len") as usize;
                    let mut data = vec![0; len];
                    s.read_exact(&mut data).await.expect("zrle");
                    pixels = true;
                } else if e == enc::DESKTOP_SIZE {
                    (w, h) = (
                        u16::from_be_bytes([hdr[4], hdr[5]]),
                        u16::from_be_bytes([hdr[6], hdr[7]]),
                    );
                }
            }
            if pixels {
                return s;
            }
        }
    }))
    .await;
    flip.await.expect("flip");
    let g = srv.cfg.groups.stats();
    eprintln!("50 viewers: {g:?}");
    assert_eq!(viewers.len(), 50);
    assert!(
        g.keys >= 1 && g.keys < 25,
        "key frames should be shared, not one per viewer: {g:?}"
    );
    // And the server is fine: a new viewer gets the exact picture.
    let mut c = Client::connect(srv.addr, "003.008", None)
        .await
        .expect("connect");
    c.set_encodings(&[enc::ZRLE, enc::DESKTOP_SIZE]).await;
    converge(&mut c, &srv.fb, "viewer after the storm").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewers_over_the_memory_limit_are_told_why() {
    use vdi_sidecar::cgroup::Limits;
    use vdi_sidecar::session::budget::Budget;
    use vdi_sidecar::viewers::Viewers;
    use vdi_sidecar::web::WebConfig;
    let (consoles, input_task) = Consoles::new();
    tokio::spawn(input_task);
    paint(&consoles.primary(), 320, 240, 0);
    // A limit this process is already over: nobody fits.
    let mut limits = Limits::none();
    limits.memory = Some(rss() / 2);
    let budget = Budget::new(limits);
    let auth = Arc::new(Auth::open());
    let loopback: std::net::SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let viewers = Viewers {
        vnc: Some((
            loopback,
            Arc::new(VncConfig::new(Arc::clone(&auth), "full")),
        )),
        web: Some((
            loopback,
            WebConfig {
                novnc: None,
                tls: None,
            },
            Arc::new(VncConfig::new(Arc::clone(&auth), "full")),
        )),
        rdp: None,
        budget: Some(Arc::clone(&budget)),
        ..Viewers::default()
    };
    let at = viewers
        .start(&consoles, &tokio_util::sync::CancellationToken::new())
        .await
        .expect("listen");
    // VNC: the reason comes where the security types would (RFB 3.8 and 3.3).
    for version in ["003.008", "003.003"] {
        let mut s = TcpStream::connect(at.vnc.expect("vnc"))
            .await
            .expect("connect");
        let refused = rfb::handshake(&mut s, version, None, true).await;
        let reason = refused.err().unwrap_or_default();
        assert!(reason.contains("memory limit"), "{version}: {reason:?}");
    }
    // The browser: HTTP 503 with the reason, before the WebSocket.
    let web = at.web.expect("web");
    let body = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(web).expect("connect");
        s.write_all(
            b"GET /websockify HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .expect("request");
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf) {
            out.extend_from_slice(&buf[..n]);
            if n == 0 || out.windows(12).any(|w| w == b"memory limit") {
                break;
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
    .expect("http");
    assert!(
        body.starts_with("HTTP/1.1 503") && body.contains("memory limit"),
        "{body}"
    );
    assert!(budget.refused() >= 2);
}
