//! Pseudo-encodings and server messages against a synthetic framebuffer (no QEMU): cursor shape
//! (with and without alpha), desktop name, the layout after ExtendedDesktopSize is enabled,
//! fences, continuous updates, and LastRect framing.

mod common;

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vdi_sidecar::framebuffer::{Cursor, Framebuffer};
use vdi_sidecar::pixman::X8R8G8B8;
use vdi_sidecar::qemu::source::Consoles;
use vdi_sidecar::session::Desktop;
use vdi_sidecar::session::auth::Auth;
use vdi_sidecar::vnc::VncConfig;
use vdi_sidecar::vnc::proto::enc;

const W: u16 = 48;
const H: u16 = 32;

async fn server() -> (std::net::SocketAddr, Framebuffer, Consoles) {
    let (consoles, input_task) = Consoles::new();
    tokio::spawn(input_task);
    let fb = consoles.primary();
    let px: Vec<u8> = (0..u32::from(W) * u32::from(H))
        .flat_map(|i| (i * 77).to_ne_bytes())
        .collect();
    fb.scanout(W.into(), H.into(), u32::from(W) * 4, X8R8G8B8, &px)
        .expect("scanout");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(vdi_sidecar::vnc::server::run(
        listener,
        Arc::new(VncConfig::new(Arc::new(Auth::open()), "pseudo-desk")),
        Desktop::primary(&consoles),
        tokio_util::sync::CancellationToken::new(),
    ));
    (addr, fb, consoles)
}

/// Connects with security None (the server runs without a password here).
async fn connect(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let init = common::rfb::handshake(&mut s, "003.008", None, true)
        .await
        .expect("handshake");
    assert_eq!(
        (init.width, init.height, init.name.as_str()),
        (W, H, "pseudo-desk")
    );
    s
}

/// One server message, parsed for the encodings this test asks for.
#[derive(Debug, PartialEq)]
enum Msg {
    Update(Vec<(i32, u16, u16, u16, u16, Vec<u8>)>),
    Fence(u32, Vec<u8>),
    EndOfContinuousUpdates,
}

async fn next(s: &mut TcpStream) -> Msg {
    tokio::time::timeout(Duration::from_secs(10), read_msg(s))
        .await
        .expect("no message from the server")
}

async fn read_msg(s: &mut TcpStream) -> Msg {
    match s.read_u8().await.expect("type") {
        0 => {
            s.read_u8().await.expect("pad");
            let n = s.read_u16().await.expect("count");
            let mut rects = Vec::new();
            let mut i = 0;
            while n == u16::MAX || i < n {
                i += 1;
                let (x, y) = (
                    s.read_u16().await.expect("x"),
                    s.read_u16().await.expect("y"),
                );
                let (w, h) = (
                    s.read_u16().await.expect("w"),
                    s.read_u16().await.expect("h"),
                );
                let e = s.read_i32().await.expect("encoding");
                let (w_, h_) = (usize::from(w), usize::from(h));
                let len = match e {
                    enc::RAW => w_ * h_ * 4,
                    enc::CURSOR => w_ * h_ * 4 + w_.div_ceil(8) * h_,
                    enc::CURSOR_WITH_ALPHA => 4 + w_ * h_ * 4,
                    enc::EXTENDED_DESKTOP_SIZE => 4 + 16,
                    enc::DESKTOP_NAME => {
                        let l = s.read_u32().await.expect("name len") as usize;
                        let mut b = vec![0; l];
                        s.read_exact(&mut b).await.expect("name");
                        rects.push((e, x, y, w, h, b));
                        continue;
                    }
                    enc::LAST_RECT => {
                        rects.push((e, x, y, w, h, Vec::new()));
                        break;
                    }
                    other => panic!("unexpected encoding {other}"),
                };
                let mut b = vec![0; len];
                s.read_exact(&mut b).await.expect("rect data");
                rects.push((e, x, y, w, h, b));
            }
            Msg::Update(rects)
        }
        150 => Msg::EndOfContinuousUpdates,
        248 => {
            let mut pad = [0u8; 3];
            s.read_exact(&mut pad).await.expect("pad");
            let flags = s.read_u32().await.expect("flags");
            let len = s.read_u8().await.expect("len");
            let mut p = vec![0; len.into()];
            s.read_exact(&mut p).await.expect("payload");
            Msg::Fence(flags, p)
        }
        t => panic!("unexpected server message {t}"),
    }
}

async fn set_encodings(s: &mut TcpStream, list: &[i32]) {
    common::rfb::set_encodings(s, list).await;
}

async fn request(s: &mut TcpStream, incremental: bool) {
    common::rfb::request(s, incremental, 0, 0, W, H).await;
}

fn cursor() -> Cursor {
    Cursor {
        width: 4,
        height: 3,
        hot_x: 1,
        hot_y: 2,
        argb: vec![0x80_ff0000; 12],
    }
}

#[tokio::test]
async fn cursor_name_layout_fence_and_continuous_updates() {
    let (addr, fb, _consoles) = server().await;
    fb.set_cursor(cursor());
    let mut s = connect(addr).await;
    set_encodings(
        &mut s,
        &[
            enc::RAW,
            enc::CURSOR_WITH_ALPHA,
            enc::CURSOR,
            enc::DESKTOP_NAME,
            enc::EXTENDED_DESKTOP_SIZE,
            enc::FENCE,
            enc::CONTINUOUS_UPDATES,
            enc::LAST_RECT,
        ],
    )
    .await;
    // Both extensions are confirmed as the rfbproto asks: a fence request, then EndOfCU.
    assert_eq!(next(&mut s).await, Msg::Fence(1 << 31, Vec::new()));
    assert_eq!(next(&mut s).await, Msg::EndOfContinuousUpdates);

    // A client fence request is echoed with the request bit cleared (flags we honour kept).
    let mut f = vec![248, 0, 0, 0];
    f.extend_from_slice(&((1u32 << 31) | 0b101).to_be_bytes());
    f.extend_from_slice(&[3, 7, 8, 9]);
    s.write_all(&f).await.expect("fence");
    assert_eq!(next(&mut s).await, Msg::Fence(0b101, vec![7, 8, 9]));

    // The first update carries the alpha cursor (preferred over the plain one), the layout, the
    // desktop name, then the pixels.
    request(&mut s, false).await;
    let Msg::Update(rects) = next(&mut s).await else {
        panic!("expected an update");
    };
    let kinds: Vec<i32> = rects.iter().map(|r| r.0).collect();
    assert_eq!(
        kinds,
        [
            enc::CURSOR_WITH_ALPHA,
            enc::EXTENDED_DESKTOP_SIZE,
            enc::DESKTOP_NAME,
            enc::RAW
        ]
    );
    let (_, hx, hy, cw, ch, data) = &rects[0];
    assert_eq!((*hx, *hy, *cw, *ch), (1, 2, 4, 3));
    assert_eq!(&data[..4], &enc::RAW.to_be_bytes());
    // Premultiplied B, G, R, A: half-transparent red.
    assert_eq!(&data[4..8], &[0, 0, 0x80, 0x80]);
    assert_eq!(rects[2].5, b"pseudo-desk");

    // Nothing changed: an incremental request waits. A new cursor shape answers it alone.
    request(&mut s, true).await;
    let mut c = cursor();
    c.argb = vec![0xff_00ff00; 12];
    fb.set_cursor(c);
    let Msg::Update(rects) = next(&mut s).await else {
        panic!("expected an update");
    };
    assert_eq!(rects.len(), 1);
    assert_eq!(&rects[0].5[4..8], &[0, 0xff, 0, 0xff]);

    // Continuous updates: damage arrives without any request, until disabled.
    let mut cu = vec![150, 1, 0, 0, 0, 0];
    cu.extend_from_slice(&W.to_be_bytes());
    cu.extend_from_slice(&H.to_be_bytes());
    s.write_all(&cu).await.expect("enable CU");
    for round in 0..3u32 {
        let px: Vec<u8> = (0..8 * 4)
            .flat_map(|_| (0x10 * round).to_ne_bytes())
            .collect();
        fb.update(2, 3, 8, 4, 32, X8R8G8B8, &px, false)
            .expect("update");
        loop {
            let Msg::Update(rects) = next(&mut s).await else {
                panic!("expected an update");
            };
            // The first push may still be the full surface owed after enabling.
            if rects.iter().any(|r| (r.1, r.2, r.3, r.4) == (2, 3, 8, 4)) {
                break;
            }
        }
    }
    let mut off = vec![150, 0, 0, 0, 0, 0];
    off.extend_from_slice(&W.to_be_bytes());
    off.extend_from_slice(&H.to_be_bytes());
    s.write_all(&off).await.expect("disable CU");
    assert_eq!(next(&mut s).await, Msg::EndOfContinuousUpdates);
    fb.update(0, 0, 1, 1, 4, X8R8G8B8, &[1, 2, 3, 0], false)
        .expect("update");
    let mut b = [0u8; 1];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), s.read(&mut b))
            .await
            .is_err(),
        "update sent after continuous updates were disabled and nothing was requested"
    );
}

#[tokio::test]
async fn plain_cursor_in_the_clients_pixel_format_and_hidden_pointer() {
    let (addr, fb, _consoles) = server().await;
    fb.set_cursor(cursor());
    let mut s = connect(addr).await;
    set_encodings(&mut s, &[enc::RAW, enc::CURSOR]).await;
    request(&mut s, false).await;
    let Msg::Update(rects) = next(&mut s).await else {
        panic!("expected an update");
    };
    assert_eq!(rects[0].0, enc::CURSOR);
    let data = &rects[0].5;
    // 12 native pixels (alpha dropped), then a 1-byte-per-row mask: 0x80 alpha counts as opaque.
    assert_eq!(&data[..4], &[0, 0, 0xff, 0]);
    assert_eq!(&data[48..], &[0xf0, 0xf0, 0xf0]);
    // The guest hides its pointer: an empty shape follows.
    request(&mut s, true).await;
    fb.set_pointer(vdi_sidecar::framebuffer::Pointer {
        x: 1,
        y: 1,
        visible: false,
    });
    let Msg::Update(rects) = next(&mut s).await else {
        panic!("expected an update");
    };
    assert_eq!(rects.len(), 1);
    assert_eq!((rects[0].0, rects[0].3, rects[0].4), (enc::CURSOR, 0, 0));
}
