//! VNC security negotiation byte by byte, without QEMU (a synthetic framebuffer): VeNCrypt with
//! a real TLS handshake (rustls client trusting the server's generated certificate), Plain and
//! VNC authentication inside it, TLS-only mode, the share policy and the handshake deadline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use vdi_sidecar::pixman::X8R8G8B8;
use vdi_sidecar::qemu::source::Consoles;
use vdi_sidecar::session::Desktop;
use vdi_sidecar::session::auth::Auth;
use vdi_sidecar::tls::{TlsIdentity, default_names};
use vdi_sidecar::vnc::auth::vnc_response;
use vdi_sidecar::vnc::{SharePolicy, VncConfig};

const PASSWORD: &str = "tls-pass";
const USER: &str = "viewer";

struct Server {
    addr: SocketAddr,
    cert_pem: String,
    _consoles: Consoles,
}

async fn server(tune: impl FnOnce(&mut VncConfig)) -> Server {
    let (consoles, input_task) = Consoles::new();
    tokio::spawn(input_task);
    let fb = consoles.primary();
    let px: Vec<u8> = (0..32u32 * 16).flat_map(|i| i.to_ne_bytes()).collect();
    fb.scanout(32, 16, 128, X8R8G8B8, &px).expect("scanout");
    let id = TlsIdentity::generate(&default_names(&[])).expect("certificate");
    let cert_pem = id.trust_pem.clone();
    let mut cfg = VncConfig::new(Arc::new(Auth::user_password(USER, PASSWORD)), "secure-desk");
    cfg.tls = Some(id);
    tune(&mut cfg);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(vdi_sidecar::vnc::server::run(
        listener,
        Arc::new(cfg),
        Desktop::primary(&consoles),
        tokio_util::sync::CancellationToken::new(),
    ));
    Server {
        addr,
        cert_pem,
        _consoles: consoles,
    }
}

async fn read_n<S: AsyncRead + Unpin>(s: &mut S, n: usize) -> Vec<u8> {
    let mut b = vec![0; n];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut b))
        .await
        .expect("server stalled")
        .expect("read");
    b
}

async fn read_u32<S: AsyncRead + Unpin>(s: &mut S) -> u32 {
    u32::from_be_bytes(read_n(s, 4).await.try_into().expect("4 bytes"))
}

async fn reason<S: AsyncRead + Unpin>(s: &mut S) -> String {
    let n = read_u32(s).await as usize;
    String::from_utf8(read_n(s, n).await).expect("utf-8 reason")
}

/// Version exchange; returns the offered security types (3.7/3.8).
async fn hello(s: &mut TcpStream, version: &str) -> Vec<u8> {
    assert_eq!(read_n(s, 12).await, b"RFB 003.008\n");
    s.write_all(format!("RFB {version}\n").as_bytes())
        .await
        .expect("version");
    let n = read_n(s, 1).await[0] as usize;
    read_n(s, n).await
}

/// Picks VeNCrypt, checks the subtypes, chooses `subtype`; returns after the server's accept.
async fn vencrypt(s: &mut TcpStream, subtype: u32) -> Vec<u32> {
    s.write_all(&[19]).await.expect("choose");
    assert_eq!(read_n(s, 2).await, [0, 2]);
    s.write_all(&[0, 2]).await.expect("version");
    let ack = read_n(s, 2).await;
    assert_eq!(ack[0], 0, "version refused");
    let subtypes: Vec<u32> = {
        let mut v = Vec::new();
        for _ in 0..ack[1] {
            v.push(read_u32(s).await);
        }
        v
    };
    s.write_all(&subtype.to_be_bytes()).await.expect("subtype");
    subtypes
}

async fn tls(
    s: TcpStream,
    cert_pem: &str,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, std::io::Error> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(cert_pem.as_bytes()) {
        roots.add(c.expect("pem")).expect("root");
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = ServerName::try_from("127.0.0.1").expect("name");
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, s)
        .await
}

async fn plain<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, user: &str, pass: &str) -> u32 {
    let mut m = Vec::new();
    m.extend_from_slice(&(user.len() as u32).to_be_bytes());
    m.extend_from_slice(&(pass.len() as u32).to_be_bytes());
    m.extend_from_slice(user.as_bytes());
    m.extend_from_slice(pass.as_bytes());
    s.write_all(&m).await.expect("plain");
    s.flush().await.expect("flush");
    read_u32(s).await
}

/// ClientInit (shared) → ServerInit; returns the desktop name.
async fn init<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, shared: bool) -> String {
    s.write_all(&[u8::from(shared)]).await.expect("client init");
    s.flush().await.expect("flush");
    let head = read_n(s, 24).await;
    let n = u32::from_be_bytes(head[20..24].try_into().expect("len")) as usize;
    String::from_utf8(read_n(s, n).await).expect("name")
}

async fn closed<S: AsyncRead + Unpin>(s: &mut S) -> bool {
    let mut b = [0u8; 256];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn vencrypt_plain_and_vnc_inside_tls_with_the_generated_certificate() {
    let srv = server(|_| {}).await;

    // Offered: VeNCrypt first, classic VNC authentication for clients without TLS.
    let mut s = TcpStream::connect(srv.addr).await.expect("connect");
    assert_eq!(hello(&mut s, "003.008").await, [19, 2]);
    let subtypes = vencrypt(&mut s, 262).await;
    assert_eq!(
        subtypes,
        [262, 261, 259, 258],
        "X509Plain, X509Vnc, TLSPlain, TLSVnc"
    );
    assert_eq!(read_n(&mut s, 1).await, [1]);
    let mut t = tls(s, &srv.cert_pem).await.expect("TLS handshake");
    assert_eq!(plain(&mut t, USER, PASSWORD).await, 0);
    assert_eq!(init(&mut t, true).await, "secure-desk");

    // Wrong password, then wrong user name: refused with a reason, inside TLS.
    for (user, pass) in [(USER, "nope"), ("intruder", PASSWORD)] {
        let mut s = TcpStream::connect(srv.addr).await.expect("connect");
        hello(&mut s, "003.008").await;
        vencrypt(&mut s, 262).await;
        assert_eq!(read_n(&mut s, 1).await, [1]);
        let mut t = tls(s, &srv.cert_pem).await.expect("TLS handshake");
        assert_eq!(plain(&mut t, user, pass).await, 1);
        assert_eq!(reason(&mut t).await, "authentication failed");
        assert!(closed(&mut t).await);
    }

    // X509Vnc: DES challenge-response inside TLS.
    let mut s = TcpStream::connect(srv.addr).await.expect("connect");
    hello(&mut s, "003.008").await;
    vencrypt(&mut s, 261).await;
    assert_eq!(read_n(&mut s, 1).await, [1]);
    let mut t = tls(s, &srv.cert_pem).await.expect("TLS handshake");
    let ch: [u8; 16] = read_n(&mut t, 16).await.try_into().expect("challenge");
    t.write_all(&vnc_response(PASSWORD, &ch))
        .await
        .expect("response");
    t.flush().await.expect("flush");
    assert_eq!(read_u32(&mut t).await, 0);
    assert_eq!(init(&mut t, true).await, "secure-desk");

    // A subtype that was not offered (X509None while a password is set): refused, closed.
    let mut s = TcpStream::connect(srv.addr).await.expect("connect");
    hello(&mut s, "003.008").await;
    vencrypt(&mut s, 260).await;
    assert_eq!(read_n(&mut s, 1).await, [0]);
    assert!(closed(&mut s).await);

    // A VeNCrypt version other than 0.2 is refused.
    let mut s = TcpStream::connect(srv.addr).await.expect("connect");
    hello(&mut s, "003.008").await;
    s.write_all(&[19]).await.expect("choose");
    assert_eq!(read_n(&mut s, 2).await, [0, 2]);
    s.write_all(&[0, 1]).await.expect("version");
    assert_eq!(read_n(&mut s, 1).await, [0xff]);
    assert!(closed(&mut s).await);

    // A client that does not trust the certificate cannot get in (nothing leaks before TLS).
    let mut s = TcpStream::connect(srv.addr).await.expect("connect");
    hello(&mut s, "003.008").await;
    vencrypt(&mut s, 262).await;
    assert_eq!(read_n(&mut s, 1).await, [1]);
    let other = TlsIdentity::generate(&["127.0.0.1".to_owned()]).expect("other cert");
    assert!(tls(s, &other.trust_pem).await.is_err());
}

#[tokio::test]
async fn tls_only_mode_refuses_clear_text_clients() {
    let srv = server(|c| c.require_tls = true).await;
    let mut s = TcpStream::connect(srv.addr).await.expect("connect");
    assert_eq!(hello(&mut s, "003.008").await, [19]);

    // RFB 3.3 has no VeNCrypt: the failure carries the reason.
    let mut s = TcpStream::connect(srv.addr).await.expect("connect");
    assert_eq!(read_n(&mut s, 12).await, b"RFB 003.008\n");
    s.write_all(b"RFB 003.003\n").await.expect("version");
    assert_eq!(read_u32(&mut s).await, 0);
    assert!(reason(&mut s).await.contains("requires VeNCrypt"));

    // Choosing VNC authentication anyway: not offered.
    let mut s = TcpStream::connect(srv.addr).await.expect("connect");
    hello(&mut s, "003.008").await;
    s.write_all(&[2]).await.expect("choose");
    assert_eq!(read_u32(&mut s).await, 1);
    assert_eq!(reason(&mut s).await, "security type not offered");
}

#[tokio::test]
async fn without_a_password_tls_still_encrypts() {
    let srv = server(|c| c.auth = Arc::new(Auth::open())).await;
    let mut s = TcpStream::connect(srv.addr).await.expect("connect");
    assert_eq!(hello(&mut s, "003.008").await, [19, 1]);
    assert_eq!(vencrypt(&mut s, 260).await, [260, 257]);
    assert_eq!(read_n(&mut s, 1).await, [1]);
    let mut t = tls(s, &srv.cert_pem).await.expect("TLS handshake");
    assert_eq!(read_u32(&mut t).await, 0);
    assert_eq!(init(&mut t, true).await, "secure-desk");
}

/// Logs in over TLS with Plain and sends ClientInit.
async fn viewer(srv: &Server, shared: bool) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut s = TcpStream::connect(srv.addr).await.expect("connect");
    hello(&mut s, "003.008").await;
    vencrypt(&mut s, 262).await;
    assert_eq!(read_n(&mut s, 1).await, [1]);
    let mut t = tls(s, &srv.cert_pem).await.expect("TLS handshake");
    assert_eq!(plain(&mut t, USER, PASSWORD).await, 0);
    init(&mut t, shared).await;
    t
}

#[tokio::test]
async fn exclusive_clients_evict_others_only_when_the_policy_allows() {
    // Default: always shared, an exclusive request changes nothing.
    let srv = server(|_| {}).await;
    let mut first = viewer(&srv, true).await;
    let _second = viewer(&srv, false).await;
    first
        .write_all(&[3, 0, 0, 0, 0, 0, 0, 32, 0, 16])
        .await
        .expect("request");
    first.flush().await.expect("flush");
    assert_eq!(
        read_n(&mut first, 4).await[0],
        0,
        "first viewer still served"
    );

    let srv = server(|c| c.share = SharePolicy::AllowExclusive).await;
    let mut first = viewer(&srv, true).await;
    let mut exclusive = viewer(&srv, false).await;
    assert!(
        closed(&mut first).await,
        "the earlier viewer was not disconnected"
    );
    exclusive
        .write_all(&[3, 0, 0, 0, 0, 0, 0, 32, 0, 16])
        .await
        .expect("request");
    exclusive.flush().await.expect("flush");
    assert_eq!(read_n(&mut exclusive, 4).await[0], 0);
}

#[tokio::test]
async fn a_stalled_handshake_is_dropped_and_does_not_block_others() {
    let srv = server(|c| c.handshake_timeout = Duration::from_secs(2)).await;
    // Slow loris: connects, reads the version, never answers.
    let mut stalled = Vec::new();
    for _ in 0..10 {
        let mut s = TcpStream::connect(srv.addr).await.expect("connect");
        assert_eq!(read_n(&mut s, 12).await, b"RFB 003.008\n");
        stalled.push(s);
    }
    // Others get in meanwhile.
    let _ok = viewer(&srv, true).await;
    let started = std::time::Instant::now();
    for s in &mut stalled {
        assert!(closed(s).await, "stalled handshake kept open");
    }
    assert!(started.elapsed() < Duration::from_secs(8));
}
