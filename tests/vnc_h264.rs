//! Open H.264 (RFB encoding 50) against the real guest, with our RFB client listing H.264 before
//! ZRLE as noVNC lists it before Tight: while the guest plays video the updates are whole-screen
//! H.264 rectangles (the first resets the decoder and is an IDR; OpenH264 decodes them, the last
//! one within 30 dB of QMP's screendump); when the screen calms down the server goes back to
//! ZRLE on its own (incremental requests only) and the client's pixels end exactly the
//! screendump's. A small changing area (typing) never switches; `h264 = false` never does.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::qemu::{Rig, Vm};
use common::rfb::Client;
use vdi_sidecar::session::Desktop;
use vdi_sidecar::session::auth::Auth;
use vdi_sidecar::vnc::VncConfig;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const H264: i32 = 50;
const ZRLE: i32 = 16;
const DESKTOP_SIZE: i32 = -223;

async fn serve(rig: &Rig, h264: bool) -> (std::net::SocketAddr, Arc<VncConfig>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut cfg = VncConfig::new(Arc::new(Auth::open()), "vdi-h264");
    cfg.h264 = h264;
    let cfg = Arc::new(cfg);
    tokio::spawn(vdi_sidecar::vnc::server::run(
        listener,
        Arc::clone(&cfg),
        Desktop::primary(&rig.consoles),
        tokio_util::sync::CancellationToken::new(),
    ));
    (addr, cfg)
}

/// Incremental requests, one update at a time, until `done` (checked between updates) says so;
/// an update that does not come within 300 ms (nothing changed) is simply asked for again.
async fn follow(c: &mut Client, mut done: impl FnMut(&Client) -> bool, limit: Duration) {
    let deadline = Instant::now() + limit;
    let mut asked = false;
    while !done(c) {
        assert!(Instant::now() < deadline, "gave up after {limit:?}");
        if !asked {
            c.request(true).await;
            asked = true;
        }
        // Peek for the message type first, so a timeout never cuts an update in half.
        let mut b = [0u8; 1];
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(300), c.s.peek(&mut b)).await {
            r.expect("peek");
            tokio::time::timeout(Duration::from_secs(10), c.read_update())
                .await
                .expect("update");
            asked = false;
        }
    }
}

/// The guest in a background thread: `cmd` on its serial console; the VM comes back at the end.
fn guest(mut vm: Vm, cmd: &'static str) -> std::thread::JoinHandle<Vm> {
    std::thread::spawn(move || {
        vm.guest(cmd);
        vm
    })
}

/// Decodes every H.264 rectangle in order; the last picture as 0x00RRGGBB, cropped to w x h
/// (BT.709 full range, as the encoder's VUI says).
fn decode_all(rects: &[(u32, Vec<u8>)], w: usize, h: usize) -> Vec<u32> {
    use openh264::formats::YUVSource;
    let mut dec = openh264::decoder::Decoder::new().expect("decoder");
    let mut last = Vec::new();
    for (i, (_, data)) in rects.iter().enumerate() {
        let Some(pic) = dec
            .decode(data)
            .unwrap_or_else(|e| panic!("rect {i} does not decode: {e}"))
        else {
            continue;
        };
        let (ys, us, vs) = pic.strides();
        let (y, u, v) = (pic.y(), pic.u(), pic.v());
        last = (0..h * w)
            .map(|n| {
                let (px, py) = (n % w, n / w);
                let l = f64::from(y[py * ys + px]);
                let cb = f64::from(u[py / 2 * us + px / 2]) - 128.0;
                let cr = f64::from(v[py / 2 * vs + px / 2]) - 128.0;
                let c = |x: f64| x.round().clamp(0.0, 255.0) as u32;
                let r = c(l + 1.5748 * cr);
                let g = c(l - 0.1873 * cb - 0.4681 * cr);
                let b = c(l + 1.8556 * cb);
                r << 16 | g << 8 | b
            })
            .collect();
    }
    assert!(!last.is_empty(), "no picture decoded");
    last
}

fn psnr(a: &[u32], b: &[u32]) -> f64 {
    let mut se = 0f64;
    for (x, y) in a.iter().zip(b) {
        for s in [16, 8, 0] {
            let d = f64::from((x >> s) & 0xff) - f64::from((y >> s) & 0xff);
            se += d * d;
        }
    }
    let mse = se / (a.len() as f64 * 3.0);
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0 * 255.0 / mse).log10()
    }
}

fn is_idr(data: &[u8]) -> bool {
    data.windows(4)
        .any(|w| w[..3] == [0, 0, 1] && w[3] & 0x1f == 5)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn video_goes_out_as_h264_and_a_calm_screen_ends_exact_over_zrle() {
    let _serial = SERIAL.lock().await;
    let rig = Rig::start().await;
    let (addr, cfg) = serve(&rig, true).await;
    let mut vm = rig.vm_with_test_image().await;
    let mut c = Client::connect(addr, "003.008", None)
        .await
        .expect("connect");
    c.set_encodings(&[H264, ZRLE, DESKTOP_SIZE]).await;
    c.request(false).await;
    c.read_update().await;
    assert!(c.h264.is_empty(), "a still screen starts on ZRLE");

    // Typing-sized changes: never H.264.
    for i in 0..12 {
        vm.guest(&format!(
            "rect {} 40 16 16 {:06x}",
            40 + i * 20,
            0x10_2030 * (i + 1)
        ));
        c.request(true).await;
        tokio::time::timeout(Duration::from_secs(10), c.read_update())
            .await
            .expect("update");
    }
    assert!(c.h264.is_empty(), "small changes stay on ZRLE");

    // Video: H.264 within a few updates.
    let scene = guest(vm, "scene video 4000");
    follow(&mut c, |c| c.h264.len() >= 10, Duration::from_secs(30)).await;
    let scene_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let vm = {
        let done = Arc::clone(&scene_done);
        let waiter = std::thread::spawn(move || {
            let vm = scene.join().expect("scene");
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            vm
        });
        follow(
            &mut c,
            |_| scene_done.load(std::sync::atomic::Ordering::SeqCst),
            Duration::from_secs(60),
        )
        .await;
        waiter.join().expect("waiter")
    };
    let during = c.h264.len();
    let first = &c.h264[0];
    assert_eq!(
        first.0 & 1,
        1,
        "the first H.264 rectangle resets the decoder"
    );
    assert!(is_idr(&first.1), "and is a key frame");

    // Calm: back to ZRLE by itself, and exact.
    let mut vm = vm;
    let shot = tokio::task::spawn_blocking(move || {
        let s = vm.screendump();
        (vm, s)
    });
    let (vm, (w, h, px)) = shot.await.expect("screendump");
    let n_before = c.encodings.len();
    follow(
        &mut c,
        |c| c.encodings[n_before..].contains(&ZRLE) && c.fb == px,
        Duration::from_secs(15),
    )
    .await;
    let after: Vec<i32> = c.encodings[n_before..].to_vec();
    let last_zrle = after.iter().rposition(|&e| e == ZRLE).expect("ZRLE");
    assert!(
        !after[last_zrle..].contains(&H264),
        "nothing H.264 after the return: {after:?}"
    );
    let decoded = decode_all(&c.h264, w as usize, h as usize);
    let db = psnr(&decoded, &px);
    let stats = &cfg.stats;
    eprintln!(
        "{during} H.264 rectangles ({} bytes), last one vs screendump {db:.1} dB, then exact over ZRLE",
        c.h264.iter().map(|r| r.1.len()).sum::<usize>()
    );
    assert!(db >= 30.0, "the last H.264 picture: {db:.1} dB");
    assert_eq!(
        vdi_sidecar::session::stats::Counters::get(&stats.h264_frames),
        c.h264.len() as u64
    );
    drop(vm);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switched_off_the_same_video_stays_on_zrle() {
    let _serial = SERIAL.lock().await;
    let rig = Rig::start().await;
    let (addr, _) = serve(&rig, false).await;
    let vm = rig.vm_with_test_image().await;
    let mut c = Client::connect(addr, "003.008", None)
        .await
        .expect("connect");
    c.set_encodings(&[H264, ZRLE, DESKTOP_SIZE]).await;
    c.request(false).await;
    c.read_update().await;
    let scene = guest(vm, "scene video 2000");
    let t = Instant::now();
    follow(
        &mut c,
        |_| t.elapsed() > Duration::from_secs(3),
        Duration::from_secs(30),
    )
    .await;
    let vm = scene.join().expect("scene");
    assert!(
        c.encodings.len() > 10,
        "updates came: {}",
        c.encodings.len()
    );
    assert!(c.h264.is_empty(), "--vnc-h264 off");
    drop(vm);
    rig.stop().await;
}
