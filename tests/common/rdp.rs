//! FreeRDP 3 (`xfreerdp3`) as the RDP client: authentication-only runs, and windows under Xvfb.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use super::x11::Xvfb;
use super::{Proc, wait_until};
use vdi_sidecar::rdp::RdpConfig;
use vdi_sidecar::session::Desktop;
use vdi_sidecar::session::auth::Auth;
use vdi_sidecar::tls::{TlsIdentity, default_names};

pub const USER: &str = "vdi";
pub const PASSWORD: &str = "Rdp-pass1";

/// Starts our RDP server for `desktop` on a free loopback port.
pub fn serve(cfg: RdpConfig, desktop: Desktop) -> (u16, tokio_util::sync::CancellationToken) {
    super::init_test_log();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    let stop = tokio_util::sync::CancellationToken::new();
    vdi_sidecar::rdp::spawn(listener, Arc::new(cfg), desktop, stop.clone()).expect("rdp");
    (port, stop)
}

/// NLA with [`USER`] / [`PASSWORD`] and a generated certificate.
pub fn config() -> RdpConfig {
    let tls = TlsIdentity::generate(&default_names(&[])).expect("certificate");
    RdpConfig::new(tls, Arc::new(Auth::user_password(USER, PASSWORD)))
}

/// `xfreerdp3 +auth-only`: connection, TLS, NLA and licensing, no window. Returns whether it
/// reported success (`Authentication only, exit status 1`) and its log.
pub fn auth_only(port: u16, user: &str, pass: &str, extra: &[&str]) -> (bool, String) {
    let out = Command::new("timeout")
        .args(["30", "xfreerdp3"])
        .arg(format!("/v:127.0.0.1:{port}"))
        .arg(format!("/u:{user}"))
        .arg(format!("/p:{pass}"))
        .args(["/cert:ignore", "+auth-only", "/log-level:INFO"])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("xfreerdp3 (install freerdp3-x11)");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (log.contains("Authentication only, exit status 1"), log)
}

/// An `xfreerdp3` window showing the remote desktop.
pub struct FreeRdp {
    _proc: Proc,
    pub window: String,
    pub log: PathBuf,
}

impl FreeRdp {
    /// Connects with NLA and waits for a desktop window not in `taken`.
    pub fn open(x: &Xvfb, dir: &Path, port: u16, extra: &[&str], taken: &[&str]) -> FreeRdp {
        let n = taken.len();
        let log = dir.join(format!("xfreerdp-{port}-{n}-{}.log", extra.join("").len()));
        let child = Command::new("xfreerdp3")
            .arg(format!("/v:127.0.0.1:{port}"))
            .arg(format!("/u:{USER}"))
            .arg(format!("/p:{PASSWORD}"))
            .args(["/cert:ignore", "/log-level:INFO"])
            .args(extra)
            .env("DISPLAY", &x.display)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("xfreerdp3 (install freerdp3-x11)");
        let proc = Proc {
            child,
            name: "xfreerdp3",
        };
        let title = format!("FreeRDP: 127.0.0.1:{port}");
        let mut window = String::new();
        let found = wait_until(Duration::from_secs(30), || {
            std::thread::sleep(Duration::from_millis(200));
            let out = x.xdotool(&["search", "--name", &title]);
            window = String::from_utf8_lossy(&out.stdout)
                .lines()
                .find(|w| !taken.contains(w))
                .unwrap_or_default()
                .to_owned();
            !window.is_empty()
        });
        assert!(
            found,
            "no FreeRDP window; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        FreeRdp {
            _proc: proc,
            window,
            log,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until a screenshot of the window matches `oracle` by `accept`; returns the last
    /// comparison result.
    pub fn wait_matches(
        &self,
        x: &Xvfb,
        shot: &Path,
        oracle: &Path,
        metric: &str,
        accept: impl Fn(f64) -> bool,
    ) -> (bool, String) {
        let timeout = Duration::from_secs(30);
        super::x11::window_matches(x, &self.window, shot, oracle, metric, timeout, accept)
    }
}

/// A TLS connector that accepts the server's generated certificate (and any other): the
/// hand-written clients of the hostile tests only need a TLS channel.
pub fn tls_trusting_anything() -> tokio_rustls::TlsConnector {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyCert))
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Accepts the server's generated certificate (and any other).
#[derive(Debug)]
struct AnyCert;

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
