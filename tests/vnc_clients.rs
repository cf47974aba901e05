//! TigerVNC against the real guest, once per encoding and security type: Hextile over VNC
//! authentication, Tight (lossless) over VeNCrypt X509Vnc, Tight with JPEG over VeNCrypt
//! X509Plain. Each window must show QMP `screendump`'s pixels: exactly when lossless; with JPEG
//! close at first, then exactly once the still screen is refreshed losslessly.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use common::qemu::Rig;
use common::x11::{TigerVnc, Xvfb, vncpasswd};
use vdi_sidecar::session::Desktop;
use vdi_sidecar::session::auth::Auth;
use vdi_sidecar::tls::{TlsIdentity, default_names};
use vdi_sidecar::vnc::VncConfig;

const PASSWORD: &str = "s3cret!x";
const USER: &str = "viewer";

fn serve(rig: &Rig, cfg: Arc<VncConfig>) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr");
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    tokio::spawn(vdi_sidecar::vnc::server::run(
        listener,
        cfg,
        Desktop::primary(&rig.consoles),
        tokio_util::sync::CancellationToken::new(),
    ));
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tigervnc_hextile_tight_and_jpeg_over_vnc_auth_and_vencrypt() {
    let rig = Rig::start().await;
    let id = TlsIdentity::generate(&default_names(&[])).expect("certificate");
    let dir = rig.dir.path().to_owned();
    let ca = dir.join("vnc-cert.pem");
    std::fs::write(&ca, &id.trust_pem).expect("cert file");
    let mut cfg = VncConfig::new(Arc::new(Auth::user_password(USER, PASSWORD)), "vdi-clients");
    cfg.tls = Some(id);
    let cfg = Arc::new(cfg);
    let stats = Arc::clone(&cfg);
    let addr = serve(&rig, cfg);
    let vm = rig.vm_with_test_image().await;

    let vm = tokio::task::spawn_blocking(move || {
        let mut vm = vm;
        let x = Xvfb::start();
        let (oracle, _, _) = vm.screendump_file("oracle.ppm");
        let pw = dir.join("passwd");
        vncpasswd(PASSWORD, &pw);
        let common = |enc: &str| -> Vec<String> {
            vec![
                "-AutoSelect=0".into(),
                format!("-PreferredEncoding={enc}"),
                "-FullColor=1".into(),
                format!("-X509CA={}", ca.display()),
            ]
        };

        // Hextile over classic VNC authentication: exact.
        let mut args = common("Hextile");
        args.extend([
            "-SecurityTypes=VncAuth".into(),
            format!("-passwd={}", pw.display()),
        ]);
        let v = TigerVnc::open(&x, &dir, &args, &[], addr.port(), "vdi-clients");
        let (same, ae) = v.wait_matches(&x, &dir.join("hextile.png"), &oracle, "AE", |d| d == 0.0);
        assert!(same, "Hextile window differs from screendump: {ae}");
        drop(v);

        // Tight without JPEG over VeNCrypt X509Vnc (certificate verified against our CA): exact.
        let mut args = common("Tight");
        args.extend([
            "-SecurityTypes=X509Vnc".into(),
            format!("-passwd={}", pw.display()),
            "-NoJPEG=1".into(),
            "-CompressLevel=6".into(),
        ]);
        let v = TigerVnc::open(&x, &dir, &args, &[], addr.port(), "vdi-clients");
        let (same, ae) = v.wait_matches(&x, &dir.join("tight.png"), &oracle, "AE", |d| d == 0.0);
        assert!(
            same,
            "Tight (lossless) window differs from screendump: {ae}"
        );
        drop(v);

        // Tight with JPEG (quality level 6) over VeNCrypt X509Plain: JPEG goes out while the
        // screen changes, then the still screen is resent losslessly, so the window ends exact.
        let mut args = common("Tight");
        args.extend([
            "-SecurityTypes=X509Plain".into(),
            "-NoJPEG=0".into(),
            "-QualityLevel=6".into(),
        ]);
        let env = [("VNC_USERNAME", USER), ("VNC_PASSWORD", PASSWORD)];
        let jpeg_before = stats.stats.jpeg_rects.load(Ordering::Relaxed);
        let v = TigerVnc::open(&x, &dir, &args, &env, addr.port(), "vdi-clients");
        let shot = dir.join("jpeg.png");
        let (close, psnr) = v.wait_matches(&x, &shot, &oracle, "PSNR", |db| db >= 30.0);
        assert!(
            close,
            "Tight+JPEG window not within 30 dB PSNR of screendump: {psnr}"
        );
        let (same, ae) = v.wait_matches(&x, &shot, &oracle, "AE", |d| d == 0.0);
        assert!(same, "no lossless refresh after JPEG: {ae}");
        let jpeg = stats.stats.jpeg_rects.load(Ordering::Relaxed) - jpeg_before;
        let refreshes = stats.stats.lossless_refreshes.load(Ordering::Relaxed);
        assert!(
            jpeg > 0 && refreshes > 0,
            "JPEG rects {jpeg}, lossless refreshes {refreshes}"
        );
        drop(v);
        vm
    })
    .await
    .expect("tigervnc");
    drop(vm);
    rig.stop().await;
}
