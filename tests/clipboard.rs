//! The clipboard end to end with real parts: QEMU with its qemu-vdagent chardev, the test guest's
//! own vdagent (tests/guest/vdi-guest.c: `copy`, `paste`), the sidecar's D-Bus clipboard peer and
//! our VNC server, driven byte by byte from an RFB client here (classic cut text and the Extended
//! Clipboard pseudo-encoding).

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::qemu::{Rig, Vm};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vdi_sidecar::qemu::clipboard::{ClipboardHub, Policy, QEMU_GUEST_MAX};
use vdi_sidecar::session::Desktop;
use vdi_sidecar::session::auth::Auth;
use vdi_sidecar::vnc::VncConfig;
use vdi_sidecar::vnc::clipboard::{EXTENDED_CLIPBOARD, flag};

struct Setup {
    rig: Rig,
    vm: Option<Vm>,
    vnc: SocketAddr,
    hub: ClipboardHub,
}

async fn setup(policy: Policy) -> Setup {
    common::init_test_log();
    let rig = Rig::start().await;
    let hub = rig.consoles.clipboard();
    hub.configure(policy, 1 << 20);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let vnc = listener.local_addr().expect("addr");
    tokio::spawn(vdi_sidecar::vnc::server::run(
        listener,
        Arc::new(VncConfig::new(Arc::new(Auth::open()), "clip")),
        Desktop::primary(&rig.consoles),
        tokio_util::sync::CancellationToken::new(),
    ));
    let vm = rig.vm_with_clipboard().await;
    Setup {
        rig,
        vm: Some(vm),
        vnc,
        hub,
    }
}

impl Setup {
    /// A guest command, answered by a line starting with `expect`.
    async fn guest(&mut self, cmd: &str, expect: &str) -> String {
        let mut vm = self.vm.take().expect("vm");
        let (cmd, expect) = (cmd.to_owned(), expect.to_owned());
        let (vm, line) = tokio::task::spawn_blocking(move || {
            vm.send_line(&cmd);
            let line = vm.expect_line(&expect, Duration::from_secs(20));
            (vm, line)
        })
        .await
        .expect("guest");
        self.vm = Some(vm);
        line
    }

    async fn qmp_status(&mut self) -> Duration {
        let mut vm = self.vm.take().expect("vm");
        let (vm, took) = tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            let r = vm.qmp_cmd(r#"{"execute":"query-status"}"#);
            assert!(r.contains("running"), "{r}");
            (vm, t.elapsed())
        })
        .await
        .expect("qmp");
        self.vm = Some(vm);
        took
    }

    async fn stop(mut self) {
        drop(self.vm.take());
        self.rig.stop().await;
    }
}

/// The text the guest pasted, from its `VDI PASTE <len> <fnv> <text>` line.
fn pasted(line: &str) -> (usize, String, String) {
    let rest = line.strip_prefix("VDI PASTE ").expect("a paste line");
    let mut it = rest.splitn(3, ' ');
    let len = it.next().and_then(|v| v.parse().ok()).expect("len");
    let hash = it.next().expect("hash").to_owned();
    let text = it.next().unwrap_or("").replace("\\n", "\n");
    (len, hash, text)
}

fn fnv1a(b: &[u8]) -> String {
    let mut h: u32 = 2_166_136_261;
    for &c in b {
        h ^= u32::from(c);
        h = h.wrapping_mul(16_777_619);
    }
    format!("{h:08x}")
}

/// What the guest's `copygen N` copies.
fn generated(n: usize) -> Vec<u8> {
    let mut t = Vec::new();
    let mut i = 0;
    while t.len() < n {
        t.extend(format!("line {i:06} abcdefghijklmnopqrstuvwxyz\n").bytes());
        i += 1;
    }
    t.truncate(n);
    t
}

async fn connect(addr: SocketAddr, extended: bool) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    common::rfb::handshake(&mut s, "003.008", None, true)
        .await
        .expect("handshake");
    let mut encs = vec![16];
    if extended {
        encs.push(EXTENDED_CLIPBOARD);
    }
    common::rfb::set_encodings(&mut s, &encs).await;
    s
}

/// The next ServerCutText: its signed length and body.
async fn cut(s: &mut TcpStream, within: Duration) -> Option<(i32, Vec<u8>)> {
    let read = async {
        let t = s.read_u8().await.expect("message type");
        assert_eq!(
            t, 3,
            "only cut text is expected (no updates were asked for)"
        );
        let mut pad = [0; 3];
        s.read_exact(&mut pad).await.expect("pad");
        let len = s.read_i32().await.expect("length");
        let mut body = vec![0; len.unsigned_abs() as usize];
        s.read_exact(&mut body).await.expect("body");
        (len, body)
    };
    tokio::time::timeout(within, read).await.ok()
}

/// The next extended message's flags and the rest.
async fn ext(s: &mut TcpStream) -> (u32, Vec<u8>) {
    let (len, body) = cut(s, Duration::from_secs(15))
        .await
        .expect("an extended clipboard message");
    assert!(len < 0, "an extended message");
    let flags = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    (flags, body[4..].to_vec())
}

async fn send_ext(s: &mut TcpStream, flags: u32, payload: &[u8]) {
    let mut m = vec![6, 0, 0, 0];
    m.extend((-(4 + payload.len() as i32)).to_be_bytes());
    m.extend(flags.to_be_bytes());
    m.extend(payload);
    s.write_all(&m).await.expect("ClientCutText");
}

async fn send_classic(s: &mut TcpStream, latin1: &[u8]) {
    let mut m = vec![6, 0, 0, 0];
    m.extend((latin1.len() as u32).to_be_bytes());
    m.extend(latin1);
    s.write_all(&m).await.expect("ClientCutText");
}

fn zlib_text(wire: &[u8]) -> Vec<u8> {
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    z.write_all(&(wire.len() as u32).to_be_bytes())
        .expect("zlib");
    z.write_all(wire).expect("zlib");
    z.finish().expect("zlib")
}

fn unzlib_text(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::ZlibDecoder::new(payload)
        .read_to_end(&mut out)
        .expect("inflate");
    let size = u32::from_be_bytes([out[0], out[1], out[2], out[3]]) as usize;
    assert_eq!(size, out.len() - 4, "the size field matches");
    out[4..].to_vec()
}

/// An extended client's handshake: our caps come first; it answers with its own.
async fn extended_client(addr: SocketAddr) -> TcpStream {
    let mut s = connect(addr, true).await;
    let (flags, sizes) = ext(&mut s).await;
    assert_eq!(
        flags & (flag::CAPS | flag::TEXT | flag::NOTIFY | flag::PROVIDE | flag::REQUEST),
        flag::CAPS | flag::TEXT | flag::NOTIFY | flag::PROVIDE | flag::REQUEST,
        "server caps"
    );
    assert_eq!(sizes, (1u32 << 20).to_be_bytes(), "text limit advertised");
    let caps = flag::CAPS | flag::TEXT | flag::REQUEST | flag::PEEK | flag::NOTIFY | flag::PROVIDE;
    send_ext(&mut s, caps, &0u32.to_be_bytes()).await;
    s
}

/// Guest copy → notify → request → provide, as noVNC and TigerVNC do it.
async fn fetch_guest_copy(s: &mut TcpStream) -> Vec<u8> {
    let (flags, _) = ext(s).await;
    assert_eq!(
        flags,
        flag::NOTIFY | flag::TEXT,
        "the guest's copy is announced"
    );
    send_ext(s, flag::REQUEST | flag::TEXT, &[]).await;
    let (flags, payload) = ext(s).await;
    assert_eq!(flags, flag::PROVIDE | flag::TEXT);
    unzlib_text(&payload)
}

/// Client copy → notify → our request → provide.
async fn client_copy(s: &mut TcpStream, text_lf: &str) {
    send_ext(s, flag::NOTIFY | flag::TEXT, &[]).await;
    let (flags, _) = ext(s).await;
    assert_eq!(
        flags,
        flag::REQUEST | flag::TEXT,
        "the server asks for the text"
    );
    let mut wire = text_lf.replace('\n', "\r\n").into_bytes();
    wire.push(0);
    send_ext(s, flag::PROVIDE | flag::TEXT, &zlib_text(&wire)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn utf8_text_crosses_both_ways_with_an_extended_clipboard_client() {
    let mut t = setup(Policy::Both).await;
    let mut s = extended_client(t.vnc).await;

    // Guest → viewer: UTF-8, CRLF and NUL on the wire.
    t.guest("copy Grüße — 日本語\\nzweite Zeile", "OK copy")
        .await;
    let wire = fetch_guest_copy(&mut s).await;
    assert_eq!(
        String::from_utf8(wire).expect("utf-8"),
        "Grüße — 日本語\r\nzweite Zeile\0"
    );

    // Viewer → guest.
    client_copy(&mut s, "from the viewer\nÄ line 2 ✓").await;
    t.guest("", "CLIP GRAB").await;
    let line = t.guest("paste", "PASTE").await;
    let (len, _, text) = pasted(&line);
    assert_eq!(text, "from the viewer\nÄ line 2 ✓");
    assert_eq!(len, "from the viewer\nÄ line 2 ✓".len());

    // A viewer that leaves releases its copy in the guest.
    drop(s);
    t.guest("", "CLIP RELEASE").await;
    assert!(t.hub.counters().to_guest >= 1 && t.hub.counters().from_guest >= 1);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_classic_client_gets_latin1_text_and_nothing_it_cannot_show() {
    let mut t = setup(Policy::Both).await;
    let mut s = connect(t.vnc, false).await;

    t.guest("copy café au lait\\n2", "OK copy").await;
    let (len, body) = cut(&mut s, Duration::from_secs(15))
        .await
        .expect("classic cut text");
    assert!(len > 0);
    assert_eq!(body, b"caf\xe9 au lait\n2");

    // Outside Latin-1: a classic client cannot be given this text, so it gets nothing (the
    // sidecar logs why) rather than a different text.
    t.guest("copy 日本語", "OK copy").await;
    assert!(cut(&mut s, Duration::from_secs(3)).await.is_none());

    // Latin-1 from the client arrives as UTF-8 in the guest.
    send_classic(&mut s, b"na\xefve\n2").await;
    t.guest("", "CLIP GRAB").await;
    let line = t.guest("paste", "PASTE").await;
    assert_eq!(pasted(&line).2, "naïve\n2");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mebibyte_crosses_and_text_over_the_limit_is_refused_whole() {
    let mut t = setup(Policy::Both).await;
    let mut s = extended_client(t.vnc).await;

    // Guest → viewer: 1 MiB (the limit) arrives whole.
    t.guest("copygen 1048576", "OK copy").await;
    let wire = fetch_guest_copy(&mut s).await;
    let want = generated(1 << 20);
    let mut lf = String::from_utf8(wire)
        .expect("utf-8")
        .replace("\r\n", "\n");
    assert_eq!(lf.pop(), Some('\0'));
    assert_eq!(lf.as_bytes(), &want[..]);

    // Over the limit (1 MiB + 1): refused, the client told the clipboard is empty.
    t.guest("copygen 1048577", "OK copy").await;
    let (flags, _) = ext(&mut s).await;
    assert_eq!(flags, flag::NOTIFY | flag::TEXT);
    send_ext(&mut s, flag::REQUEST | flag::TEXT, &[]).await;
    let (flags, _) = ext(&mut s).await;
    assert_eq!(flags, flag::NOTIFY, "nothing, rather than a cut-off text");

    // Viewer → guest: the most QEMU's agent channel carries (1 MiB - 28) arrives whole...
    let text = String::from_utf8(generated(QEMU_GUEST_MAX)).expect("ascii");
    client_copy(&mut s, &text).await;
    t.guest("", "CLIP GRAB").await;
    let line = t.guest("paste", "PASTE").await;
    let (len, hash, _) = pasted(&line);
    assert_eq!((len, hash), (QEMU_GUEST_MAX, fnv1a(text.as_bytes())));
    // ... and one byte more is refused here (QEMU would drop it with a line in its own log):
    // no request for the text, the guest keeps the previous one.
    let refused = t.hub.counters().refused;
    let more = String::from_utf8(generated(QEMU_GUEST_MAX + 1)).expect("ascii");
    let mut wire = more.replace('\n', "\r\n").into_bytes();
    wire.push(0);
    send_ext(&mut s, flag::PROVIDE | flag::TEXT, &zlib_text(&wire)).await;
    assert!(common::wait_until(Duration::from_secs(10), || t
        .hub
        .counters()
        .refused
        > refused));
    let line = t.guest("paste", "PASTE").await;
    assert_eq!(pasted(&line).0, QEMU_GUEST_MAX);

    // A classic ClientCutText over the limit is skipped without being buffered, and the
    // connection goes on: the next one reaches the guest.
    let mut c = connect(t.vnc, false).await;
    send_classic(&mut c, &vec![b'x'; (1 << 20) + 1]).await;
    send_classic(&mut c, b"after the big one").await;
    t.guest("", "CLIP GRAB").await;
    let line = t.guest("paste", "PASTE").await;
    assert_eq!(pasted(&line).2, "after the big one");
    assert!(t.hub.counters().refused >= 2);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_sends_its_text_does_not_hold_the_guest() {
    let mut t = setup(Policy::Both).await;
    let mut s = extended_client(t.vnc).await;
    // It announces a copy and never answers our request.
    send_ext(&mut s, flag::NOTIFY | flag::TEXT, &[]).await;
    let (flags, _) = ext(&mut s).await;
    assert_eq!(flags, flag::REQUEST | flag::TEXT);
    t.guest("", "CLIP GRAB").await;
    let start = Instant::now();
    t.guest("paste", "PASTE-TIMEOUT").await;
    assert!(start.elapsed() < Duration::from_secs(12));
    // QEMU's main loop waited for us at most our bound: QMP answers at once.
    assert!(t.qmp_status().await < Duration::from_secs(2));
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_from_guest_refuses_viewer_copies_and_to_guest_hides_guest_copies() {
    let mut t = setup(Policy::FromGuest).await;
    let mut s = extended_client(t.vnc).await;
    t.guest("copy secret out", "OK copy").await;
    assert_eq!(fetch_guest_copy(&mut s).await, b"secret out\0");
    // The viewer's copy is not taken: no request comes, the guest is never offered it (its
    // agent still owns the clipboard, so QEMU answers its paste with nothing), and it counts.
    send_ext(&mut s, flag::NOTIFY | flag::TEXT, &[]).await;
    assert!(cut(&mut s, Duration::from_secs(2)).await.is_none());
    let line = t.guest("paste", "PASTE").await;
    assert_eq!(pasted(&line).0, 0, "{line}");
    assert!(t.hub.counters().refused >= 1);
    t.stop().await;

    let mut t = setup(Policy::ToGuest).await;
    let mut s = extended_client(t.vnc).await;
    t.guest("copy stays inside", "OK copy").await;
    let (flags, _) = ext(&mut s).await;
    assert_eq!(flags, flag::NOTIFY, "the guest's copy is not offered");
    send_ext(&mut s, flag::REQUEST | flag::TEXT, &[]).await;
    let (flags, _) = ext(&mut s).await;
    assert_eq!(flags, flag::NOTIFY, "and not given when asked");
    client_copy(&mut s, "in is fine").await;
    t.guest("", "CLIP GRAB").await;
    let line = t.guest("paste", "PASTE").await;
    assert_eq!(pasted(&line).2, "in is fine");
    t.stop().await;
}
