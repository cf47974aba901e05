//! A malformed or truncated graphics-pipeline (MS-RDPEGFX) PDU from a client ends that client
//! only. Two RDP clients written here on ironrdp's client state machine (TLS security, the
//! password in the Client Info PDU; no QEMU, no FreeRDP) against a synthetic, animated desktop:
//! a well-behaved one stays connected throughout, while hostile ones complete the whole
//! connection sequence, accept the server's "Microsoft::Windows::RDS::Graphics" dynamic channel
//! and answer its opening with (a) a CapabilitiesAdvertise cut short, (b) garbage. Each hostile
//! client must see the server close its connection within seconds (after the channel was
//! really opened: otherwise nothing was tested), and the well-behaved client keeps getting
//! frames afterwards (its own reads and the server's update counter), with no panic on the RDP
//! thread.

mod common;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use common::rdp::{PASSWORD, USER, config, serve};
use ironrdp::core::{AsAny, Encode, EncodeResult, WriteCursor, decode, encode_vec};
use ironrdp::pdu::gcc::KeyboardType;
use ironrdp::pdu::mcs::McsMessage;
use ironrdp::pdu::rdp::capability_sets::{BitmapCodecs, MajorPlatformType};
use ironrdp::pdu::rdp::client_info::{PerformanceFlags, TimezoneInfo};
use ironrdp::pdu::x224::X224;
use ironrdp::pdu::{Action, PduResult};
use ironrdp_connector::sspi::NetworkRequest;
use ironrdp_connector::{
    BitmapConfig, ClientConnector, Config, ConnectionResult, ConnectorError,
    ConnectorErrorExt as _, ConnectorResult, Credentials, DesktopSize, ServerName,
};
use ironrdp_dvc::{DrdynvcClient, DvcEncode, DvcMessage, DvcProcessor};
use ironrdp_egfx::pdu::{
    CapabilitiesAdvertisePdu, CapabilitiesV8Flags, CapabilitiesV107Flags, CapabilitySet, GfxPdu,
};
use ironrdp_svc::client_encode_svc_messages;
use ironrdp_tokio::{
    FramedWrite as _, NetworkClient, TokioFramed, connect_begin, connect_finalize, mark_as_upgraded,
};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use vdi_sidecar::framebuffer::Framebuffer;
use vdi_sidecar::pixman::X8R8G8B8;
use vdi_sidecar::qemu::source::Consoles;
use vdi_sidecar::rdp::Security;
use vdi_sidecar::session::Desktop;
use vdi_sidecar::session::stats::Counters;

const W: u16 = 256;
const H: u16 = 160;
/// Side of the square the animation repaints.
const SQUARE: usize = 16;
/// Time for a whole connection sequence.
const CONNECT: Duration = Duration::from_secs(20);
/// How long a hostile client waits for the server to close it.
const HOSTILE_WAIT: Duration = Duration::from_secs(20);
/// What counts as "within seconds" for that close.
const CLOSED_WITHIN: Duration = Duration::from_secs(5);
/// Time for the well-behaved client to get more frames.
const SERVED: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_graphics_pdu_ends_that_client_only() {
    let panics = rdp_thread_panics();
    let (consoles, task) = Consoles::new();
    tokio::spawn(task);
    let fb = consoles.primary();
    let (w, h) = (u32::from(W), u32::from(H));
    fb.scanout(w, h, w * 4, X8R8G8B8, &vec![0x30; (w * h * 4) as usize])
        .expect("scanout");
    let mut cfg = config();
    cfg.security = Security::Tls;
    // The graphics pipeline is offered (it is by default): its channel is what is attacked.
    cfg.h264 = true;
    let stats = Arc::clone(&cfg.stats);
    let (port, stop) = serve(cfg, Desktop::primary(&consoles));
    animate(fb, stop.clone());

    let mut good = within(
        CONNECT,
        "the well-behaved client's connection",
        Client::connect(port, DrdynvcClient::new()),
    )
    .await;
    let frames = AtomicU64::new(0);
    let done = CancellationToken::new();
    let good_reads = keep_reading(&mut good, &frames, &done);
    let checks = async {
        wait_for("the well-behaved client got no frame", || {
            frames.load(Ordering::Relaxed) > 0
        })
        .await;
        for (name, bytes) in [
            (
                "truncated CapabilitiesAdvertise",
                truncated_capabilities_advertise(),
            ),
            ("garbage", garbage()),
        ] {
            let (opened, closed) = hostile(port, bytes).await;
            assert!(
                opened,
                "{name}: the server never opened the graphics channel (nothing was sent)"
            );
            let took = closed.unwrap_or_else(|| {
                panic!("{name}: the server kept the hostile client for {HOSTILE_WAIT:?}")
            });
            eprintln!("{name}: hostile client disconnected {took:?} after login");
            assert!(took < CLOSED_WITHIN, "{name}: closed only after {took:?}");
            let seen = frames.load(Ordering::Relaxed);
            let updates = Counters::get(&stats.updates);
            wait_for(
                &format!("{name}: the well-behaved client is no longer served"),
                || {
                    frames.load(Ordering::Relaxed) >= seen + 5
                        && Counters::get(&stats.updates) >= updates + 5
                },
            )
            .await;
        }
        done.cancel();
    };
    tokio::join!(good_reads, checks);
    assert_eq!(panics.load(Ordering::Relaxed), 0, "the RDP thread panicked");
    stop.cancel();
}

/// A client whose graphics channel answers its opening with `bytes`, read until the server
/// closes the connection or [`HOSTILE_WAIT`] passes. Returns whether the server opened the
/// channel, and how long after the login it closed the connection.
async fn hostile(port: u16, bytes: Vec<u8>) -> (bool, Option<Duration>) {
    let opened = Arc::new(AtomicBool::new(false));
    let gfx = HostileGfx {
        bytes,
        opened: Arc::clone(&opened),
    };
    let mut client = within(
        CONNECT,
        "the hostile client's connection",
        Client::connect(port, DrdynvcClient::new().with_dynamic_channel(gfx)),
    )
    .await;
    let start = Instant::now();
    let closed = loop {
        let left = HOSTILE_WAIT.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, client.next()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                eprintln!("hostile client: {e}");
                break Some(start.elapsed());
            }
            Err(_) => break None,
        }
    };
    (opened.load(Ordering::SeqCst), closed)
}

/// A CapabilitiesAdvertise whose header announces two capability sets' worth of bytes, cut
/// two bytes short: the second set's flags end early.
fn truncated_capabilities_advertise() -> Vec<u8> {
    let advertise = GfxPdu::CapabilitiesAdvertise(CapabilitiesAdvertisePdu::from_typed(&[
        CapabilitySet::V10_7 {
            flags: CapabilitiesV107Flags::empty(),
        },
        CapabilitySet::V8 {
            flags: CapabilitiesV8Flags::empty(),
        },
    ]));
    let mut pdu = encode_vec(&advertise).expect("CapabilitiesAdvertise");
    pdu.truncate(pdu.len() - 2);
    pdu
}

/// Pseudo-random bytes (fixed seed): no RDPGFX command id, no sensible length.
fn garbage() -> Vec<u8> {
    let mut rng = 0x1234_5677_u32;
    (0..64)
        .map(|_| {
            rng ^= rng << 13;
            rng ^= rng >> 17;
            rng ^= rng << 5;
            rng as u8
        })
        .collect()
}

/// The graphics channel of a hostile client: it sends its bytes as soon as the server opens it.
struct HostileGfx {
    bytes: Vec<u8>,
    opened: Arc<AtomicBool>,
}

impl AsAny for HostileGfx {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

impl DvcProcessor for HostileGfx {
    fn channel_name(&self) -> &str {
        ironrdp_egfx::CHANNEL_NAME
    }

    fn start(&mut self, _channel_id: u32) -> PduResult<Vec<DvcMessage>> {
        self.opened.store(true, Ordering::SeqCst);
        let message: DvcMessage = Box::new(Raw(std::mem::take(&mut self.bytes)));
        Ok(vec![message])
    }

    fn process(&mut self, _channel_id: u32, _payload: &[u8]) -> PduResult<Vec<DvcMessage>> {
        Ok(Vec::new())
    }
}

/// Bytes sent as they are, as one message of a dynamic channel.
struct Raw(Vec<u8>);

impl Encode for Raw {
    fn encode(&self, dst: &mut WriteCursor<'_>) -> EncodeResult<()> {
        ironrdp::core::ensure_size!(in: dst, size: self.0.len());
        dst.write_slice(&self.0);
        Ok(())
    }

    fn name(&self) -> &'static str {
        "hostile RDPGFX bytes"
    }

    fn size(&self) -> usize {
        self.0.len()
    }
}

impl DvcEncode for Raw {}

/// An RDP client in the active phase: it answers the server's dynamic-channel traffic with its
/// `drdynvc` processor and otherwise only reads.
struct Client {
    framed: TokioFramed<tokio_rustls::client::TlsStream<TcpStream>>,
    connection: ConnectionResult,
    drdynvc: u16,
}

impl Client {
    /// X.224 negotiation (TLS security only), the TLS handshake, then the connection sequence up
    /// to the active phase with [`USER`] / [`PASSWORD`] in the Client Info PDU.
    async fn connect(port: u16, drdynvc: DrdynvcClient) -> Client {
        let tcp = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let client_addr = tcp.local_addr().expect("local address");
        let mut framed = TokioFramed::new(tcp);
        let mut connector =
            ClientConnector::new(client_config(), client_addr).with_static_channel(drdynvc);
        let upgrade = connect_begin(&mut framed, &mut connector)
            .await
            .expect("X.224 negotiation");
        let (tcp, leftover) = framed.into_inner();
        assert!(leftover.is_empty(), "bytes before the TLS handshake");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let tls = common::rdp::tls_trusting_anything()
            .connect(name, tcp)
            .await
            .expect("TLS handshake");
        let upgraded = mark_as_upgraded(upgrade, &mut connector);
        let mut framed = TokioFramed::new(tls);
        // TLS security: no CredSSP, so neither the network client nor the server's public key
        // (CredSSP's channel binding) is used.
        let connection = connect_finalize(
            upgraded,
            connector,
            &mut framed,
            &mut NoNetwork,
            ServerName::new("localhost"),
            Vec::new(),
            None,
        )
        .await
        .expect("RDP connection sequence");
        let drdynvc = connection
            .static_channels
            .get_channel_id_by_type::<DrdynvcClient>()
            .expect("the server gave drdynvc a channel");
        Client {
            framed,
            connection,
            drdynvc,
        }
    }

    /// Reads one PDU and answers it if it is dynamic-channel traffic. `Ok(true)`: a fast-path
    /// update (a frame); `Err`: the server closed the connection.
    async fn next(&mut self) -> io::Result<bool> {
        let (action, frame) = self.framed.read_pdu().await.map_err(ended)?;
        if action == Action::FastPath {
            return Ok(true);
        }
        let replies = match decode::<X224<McsMessage<'_>>>(&frame[..]) {
            Ok(X224(McsMessage::SendDataIndication(data))) if data.channel_id == self.drdynvc => {
                self.connection
                    .static_channels
                    .get_by_channel_id_mut(self.drdynvc)
                    .expect("the drdynvc channel")
                    .process(&data.user_data)
                    .expect("the server's dynamic-channel PDU")
            }
            _ => return Ok(false),
        };
        if !replies.is_empty() {
            let bytes =
                client_encode_svc_messages(replies, self.drdynvc, self.connection.user_channel_id)
                    .expect("encode the dynamic-channel replies");
            self.framed.write_all(&bytes).await.map_err(ended)?;
        }
        Ok(false)
    }
}

/// An I/O error that means the peer closed the connection (anything else is this client's
/// own failure, e.g. a PDU it cannot frame, and must not pass for a disconnection).
fn ended(e: io::Error) -> io::Error {
    use io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    assert!(
        matches!(
            e.kind(),
            UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
        ),
        "not a closed connection: {e}"
    );
    e
}

/// Reads (counting frames) until `done`; the server dropping this client fails the test.
async fn keep_reading(client: &mut Client, frames: &AtomicU64, done: &CancellationToken) {
    loop {
        tokio::select! {
            () = done.cancelled() => return,
            got = client.next() => {
                if got.expect("the server dropped the well-behaved client") {
                    frames.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

fn client_config() -> Config {
    Config {
        desktop_size: DesktopSize {
            width: W,
            height: H,
        },
        desktop_scale_factor: 0,
        enable_tls: true,
        enable_credssp: false,
        credentials: Credentials::UsernamePassword {
            username: USER.to_owned(),
            password: PASSWORD.to_owned(),
        },
        domain: None,
        client_build: 0,
        client_name: "gfx-hostile".to_owned(),
        keyboard_type: KeyboardType::IbmEnhanced,
        keyboard_subtype: 0,
        keyboard_functional_keys_count: 12,
        keyboard_layout: 0x409,
        ime_file_name: String::new(),
        // No bitmap codec: uncompressed surface bits, cheap for both sides.
        bitmap: Some(BitmapConfig {
            lossy_compression: false,
            color_depth: 32,
            codecs: BitmapCodecs(Vec::new()),
        }),
        dig_product_id: String::new(),
        client_dir: "C:\\Windows\\System32\\mstscax.dll".to_owned(),
        alternate_shell: String::new(),
        work_dir: String::new(),
        platform: MajorPlatformType::UNIX,
        hardware_id: None,
        request_data: None,
        autologon: true,
        enable_audio_playback: false,
        performance_flags: PerformanceFlags::default(),
        license_cache: None,
        timezone_info: TimezoneInfo::default(),
        compression_type: None,
        enable_server_pointer: false,
        pointer_software_rendering: true,
        multitransport_flags: None,
    }
}

/// CredSSP's network requests (Kerberos): never made with TLS security.
struct NoNetwork;

impl NetworkClient for NoNetwork {
    fn send(&mut self, _: &NetworkRequest) -> impl Future<Output = ConnectorResult<Vec<u8>>> {
        std::future::ready(Err(ConnectorError::general(
            "no network requests with TLS security",
        )))
    }
}

/// Repaints a square in a new colour every 40 ms until `stop`: damage, so frames keep coming.
fn animate(fb: Framebuffer, stop: CancellationToken) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(40));
        let mut n: u32 = 0;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            n = n.wrapping_add(1);
            let colour = n.wrapping_mul(2_654_435_761) & 0x00ff_ffff;
            let square = colour.to_ne_bytes().repeat(SQUARE * SQUARE);
            let side = SQUARE as i32;
            fb.update(
                8,
                8,
                side,
                side,
                SQUARE as u32 * 4,
                X8R8G8B8,
                &square,
                false,
            )
            .expect("update");
        }
    });
}

/// Panics on the server's "rdp" thread (a session's task panicking would not end the test).
fn rdp_thread_panics() -> &'static AtomicUsize {
    static PANICS: AtomicUsize = AtomicUsize::new(0);
    static HOOK: Once = Once::new();
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

async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: not done within {limit:?}"))
}

/// Polls `cond` until it holds; fails with `what` after [`SERVED`].
async fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + SERVED;
    while !cond() {
        assert!(Instant::now() < deadline, "{what} (waited {SERVED:?})");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
