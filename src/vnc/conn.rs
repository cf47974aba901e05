//! One RFB connection: handshake (3.3, 3.7, 3.8), security, then the message loop that sends
//! framebuffer updates when the client asked for them and something changed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tracing::{debug, info, trace, warn};

use super::audio as vnc_audio;
use super::auth::{LoginLimiter, challenge, constant_time_eq, vnc_response};
use super::encode::{Zrle, raw, rect_header};
use super::keymap::{QNUM_SHIFT_L, XK_SHIFT_L, XK_SHIFT_R, keysym_to_qnum};
use super::proto::{ClientMsg, PixelFormat, ProtoError, decode, enc};
use super::scroll::{self, RowHash, RowHashes};
use super::tight::{self, Tight};
use super::{hextile, pseudo};
use crate::framebuffer::{Damage, Framebuffer, Rect};
use crate::qemu::audio::AudioEvent;
use crate::qemu::input::{InputSink, UiInfoError, ViewerInput};
use crate::qemu::source::Desktop;
use crate::tls::TlsIdentity;

/// Security types (RFC 6143 §7.2, rfbproto "VeNCrypt").
const SEC_NONE: u8 = 1;
const SEC_VNC: u8 = 2;
const SEC_VENCRYPT: u8 = 19;

/// VeNCrypt subtypes. "TLS*" are meant for anonymous TLS, which rustls does not implement: we
/// answer them with our certificate, which clients that do not verify it accept.
mod vencrypt {
    pub const TLS_NONE: u32 = 257;
    pub const TLS_VNC: u32 = 258;
    pub const TLS_PLAIN: u32 = 259;
    pub const X509_NONE: u32 = 260;
    pub const X509_VNC: u32 = 261;
    pub const X509_PLAIN: u32 = 262;
}

/// Longest user name or password accepted by Plain authentication.
const MAX_PLAIN_FIELD: u32 = 1024;

/// How long the screen must stay still before JPEG areas are resent losslessly.
const LOSSLESS_REFRESH: Duration = Duration::from_millis(150);

async fn next_sound(
    rx: &mut Option<tokio::sync::broadcast::Receiver<AudioEvent>>,
) -> Result<AudioEvent, tokio::sync::broadcast::error::RecvError> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Time a client has to finish the handshake (including typing a password into a dialog).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// What a non-shared (exclusive) ClientInit may do to the viewers already connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SharePolicy {
    /// Every viewer shares the desktop; the exclusive flag is ignored (the default: a VM desktop
    /// is often watched by several people).
    #[default]
    ForceShared,
    /// RFC 6143 behaviour: an exclusive client disconnects the others.
    AllowExclusive,
}

/// What every connection shares.
pub struct VncConfig {
    /// `None` only when the operator passed `--insecure-no-auth`.
    pub password: Option<String>,
    /// When set, VeNCrypt Plain logins must use this user name (else any name is accepted).
    pub username: Option<String>,
    pub desktop_name: String,
    pub limiter: LoginLimiter,
    /// Enables VeNCrypt (TLS) when set.
    pub tls: Option<TlsIdentity>,
    /// Offer only VeNCrypt: no password or desktop ever crosses the network in clear.
    pub require_tls: bool,
    pub share: SharePolicy,
    /// A client that has not finished the handshake by then is dropped (slow-loris guard).
    pub handshake_timeout: Duration,
    /// What was sent, across all connections (logs, tests, benchmarks).
    pub stats: SendStats,
    sessions: Sessions,
}

/// Rectangles sent by kind, across all connections.
#[derive(Debug, Default)]
pub struct SendStats {
    /// How long guest sound waited in this server before it was written.
    pub audio_wait: crate::qemu::audio::AudioWait,
    pub jpeg_rects: AtomicU64,
    pub lossless_refreshes: AtomicU64,
    pub copy_rects: AtomicU64,
    pub updates: AtomicU64,
}

impl VncConfig {
    pub fn new(password: Option<String>, desktop_name: impl Into<String>) -> Self {
        Self {
            password,
            username: None,
            desktop_name: desktop_name.into(),
            limiter: LoginLimiter::default(),
            tls: None,
            require_tls: false,
            share: SharePolicy::default(),
            handshake_timeout: HANDSHAKE_TIMEOUT,
            stats: SendStats::default(),
            sessions: Sessions::default(),
        }
    }
}

/// Numbers sessions so an exclusive client can end the ones that came before it.
struct Sessions {
    next: AtomicU64,
    /// Every session with an id below this value must end.
    evict_below: watch::Sender<u64>,
}

impl Default for Sessions {
    fn default() -> Self {
        Self {
            next: AtomicU64::new(1),
            evict_below: watch::Sender::new(0),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("i/o")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Proto(#[from] ProtoError),
    #[error("bad protocol version {0:?}")]
    BadVersion(String),
    #[error("client chose security type {0}, which was not offered")]
    BadSecurityType(u32),
    #[error("authentication failed")]
    AuthFailed,
    #[error("too many failed logins from this address")]
    RateLimited,
    #[error("handshake timed out")]
    Timeout,
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{0}")]
    Refused(&'static str),
    #[error("another viewer connected exclusively")]
    Evicted,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Version {
    V3_3,
    V3_7,
    V3_8,
}

fn parse_version(b: &[u8; 12]) -> Result<Version, ConnError> {
    let s = String::from_utf8_lossy(b).into_owned();
    let bad = || ConnError::BadVersion(s.clone());
    if &b[..4] != b"RFB " || b[7] != b'.' || b[11] != b'\n' {
        return Err(bad());
    }
    let num = |r: &[u8]| -> Option<u32> { std::str::from_utf8(r).ok()?.parse().ok() };
    let (major, minor) = (
        num(&b[4..7]).ok_or_else(bad)?,
        num(&b[8..11]).ok_or_else(bad)?,
    );
    // RFC 6143 §7.1.1: anything else newer than 3.8 is treated as 3.8, older (3.5, Apple's
    // 3.889 excepted) as 3.3.
    Ok(match (major, minor) {
        (3, 7) => Version::V3_7,
        (3, 8) => Version::V3_8,
        (3, 889) => Version::V3_3,
        (3, m) if m > 8 => Version::V3_8,
        (3, _) => Version::V3_3,
        (m, _) if m > 3 => Version::V3_8,
        _ => return Err(bad()),
    })
}

async fn send_failure<S: AsyncWrite + Unpin + ?Sized>(
    s: &mut S,
    reason: &str,
) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(4 + reason.len());
    out.extend_from_slice(&u32::try_from(reason.len()).unwrap_or(0).to_be_bytes());
    out.extend_from_slice(reason.as_bytes());
    s.write_all(&out).await
}

/// The byte stream after the handshake: plain TCP or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Inner authentication once the transport is settled.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Inner {
    None,
    Vnc,
    Plain,
}

/// Runs the handshake up to and including ClientInit; returns the stream to go on with and the
/// shared flag.
async fn handshake<S: Io + 'static>(
    mut s: S,
    cfg: &VncConfig,
    peer: SocketAddr,
) -> Result<(Box<dyn Io>, bool), ConnError> {
    s.write_all(b"RFB 003.008\n").await?;
    let mut v = [0u8; 12];
    s.read_exact(&mut v).await?;
    let version = parse_version(&v)?;
    debug!(?version, "client version");

    let mut offered = Vec::with_capacity(3);
    if cfg.tls.is_some() {
        offered.push(SEC_VENCRYPT);
    }
    if !cfg.require_tls {
        offered.push(if cfg.password.is_some() {
            SEC_VNC
        } else {
            SEC_NONE
        });
    }
    let limited = cfg.password.is_some() && !cfg.limiter.allowed(peer.ip());
    let chosen = if version == Version::V3_3 {
        // 3.3: the server decides (no VeNCrypt there); a failure is 0 followed by a reason.
        let pick = offered.iter().copied().find(|&t| t != SEC_VENCRYPT);
        let refusal = if limited {
            Some("too many failed logins; try again later")
        } else if pick.is_none() {
            Some("this server requires VeNCrypt (TLS); use an RFB 3.7 or newer client")
        } else {
            None
        };
        if let Some(reason) = refusal {
            s.write_all(&0u32.to_be_bytes()).await?;
            send_failure(&mut s, reason).await?;
            return Err(if limited {
                ConnError::RateLimited
            } else {
                ConnError::Refused("RFB 3.3 client but TLS is required")
            });
        }
        let pick = pick.unwrap_or(SEC_NONE);
        s.write_all(&u32::from(pick).to_be_bytes()).await?;
        pick
    } else {
        if limited {
            s.write_all(&[0]).await?;
            send_failure(&mut s, "too many failed logins; try again later").await?;
            return Err(ConnError::RateLimited);
        }
        let mut list = vec![offered.len() as u8];
        list.extend_from_slice(&offered);
        s.write_all(&list).await?;
        let mut c = [0u8; 1];
        s.read_exact(&mut c).await?;
        if !offered.contains(&c[0]) {
            if version == Version::V3_8 {
                s.write_all(&1u32.to_be_bytes()).await?;
                send_failure(&mut s, "security type not offered").await?;
            }
            return Err(ConnError::BadSecurityType(c[0].into()));
        }
        c[0]
    };

    let (mut s, inner): (Box<dyn Io>, Inner) = match chosen {
        SEC_VENCRYPT => vencrypt_transport(s, cfg).await?,
        SEC_VNC => (Box::new(s), Inner::Vnc),
        _ => (Box::new(s), Inner::None),
    };
    // A SecurityResult follows every type but None before 3.8.
    let send_result = version == Version::V3_8 || chosen != SEC_NONE;
    let outcome = match inner {
        Inner::None => Ok(()),
        Inner::Vnc => vnc_auth(&mut s, cfg).await?,
        Inner::Plain => plain_auth(&mut s, cfg).await?,
    };
    match outcome {
        Ok(()) => {
            if inner != Inner::None {
                cfg.limiter.succeeded(peer.ip());
            }
            if send_result {
                s.write_all(&0u32.to_be_bytes()).await?;
            }
        }
        Err(reason) => {
            cfg.limiter.failed(peer.ip());
            s.write_all(&1u32.to_be_bytes()).await?;
            if version == Version::V3_8 {
                send_failure(&mut s, reason).await?;
            }
            s.flush().await?;
            return Err(ConnError::AuthFailed);
        }
    }

    let mut shared = [0u8; 1];
    s.read_exact(&mut shared).await?;
    Ok((s, shared[0] != 0))
}

/// VeNCrypt 0.2 negotiation and the TLS handshake; returns the TLS stream and the inner
/// authentication the client picked.
async fn vencrypt_transport<S: Io + 'static>(
    mut s: S,
    cfg: &VncConfig,
) -> Result<(Box<dyn Io>, Inner), ConnError> {
    let Some(tls) = &cfg.tls else {
        return Err(ConnError::Refused("VeNCrypt without a TLS identity"));
    };
    s.write_all(&[0, 2]).await?;
    let mut v = [0u8; 2];
    s.read_exact(&mut v).await?;
    if v != [0, 2] {
        s.write_all(&[0xff]).await?;
        return Err(ConnError::Refused("unsupported VeNCrypt version"));
    }
    use vencrypt::*;
    let subtypes: &[u32] = if cfg.password.is_some() {
        &[X509_PLAIN, X509_VNC, TLS_PLAIN, TLS_VNC]
    } else {
        &[X509_NONE, TLS_NONE]
    };
    let mut out = vec![0, subtypes.len() as u8];
    for t in subtypes {
        out.extend_from_slice(&t.to_be_bytes());
    }
    s.write_all(&out).await?;
    let mut c = [0u8; 4];
    s.read_exact(&mut c).await?;
    let chosen = u32::from_be_bytes(c);
    if !subtypes.contains(&chosen) {
        s.write_all(&[0]).await?;
        return Err(ConnError::BadSecurityType(chosen));
    }
    s.write_all(&[1]).await?;
    let inner = match chosen {
        X509_VNC | TLS_VNC => Inner::Vnc,
        X509_PLAIN | TLS_PLAIN => Inner::Plain,
        _ => Inner::None,
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&tls.config_tls12));
    let tls_stream = acceptor
        .accept(s)
        .await
        .map_err(|e| ConnError::Tls(e.to_string()))?;
    debug!(subtype = chosen, "VeNCrypt TLS established");
    Ok((Box::new(tls_stream), inner))
}

/// VNC authentication (DES challenge-response). The outer error is I/O; the inner one a
/// failure reason for the client.
async fn vnc_auth(
    s: &mut Box<dyn Io>,
    cfg: &VncConfig,
) -> Result<Result<(), &'static str>, ConnError> {
    let password = cfg.password.as_deref().unwrap_or_default();
    let ch = challenge();
    s.write_all(&ch).await?;
    s.flush().await?;
    let mut resp = [0u8; 16];
    s.read_exact(&mut resp).await?;
    Ok(if constant_time_eq(&resp, &vnc_response(password, &ch)) {
        Ok(())
    } else {
        Err("authentication failed")
    })
}

/// VeNCrypt Plain: user name and password in clear, which is why it is only offered inside TLS.
async fn plain_auth(
    s: &mut Box<dyn Io>,
    cfg: &VncConfig,
) -> Result<Result<(), &'static str>, ConnError> {
    s.flush().await?;
    let mut lens = [0u8; 8];
    s.read_exact(&mut lens).await?;
    let ulen = u32::from_be_bytes([lens[0], lens[1], lens[2], lens[3]]);
    let plen = u32::from_be_bytes([lens[4], lens[5], lens[6], lens[7]]);
    if ulen > MAX_PLAIN_FIELD || plen > MAX_PLAIN_FIELD {
        return Ok(Err("user name or password too long"));
    }
    let mut buf = vec![0u8; (ulen + plen) as usize];
    s.read_exact(&mut buf).await?;
    let (user, pass) = buf.split_at(ulen as usize);
    let user_ok = cfg
        .username
        .as_deref()
        .is_none_or(|u| constant_time_eq(u.as_bytes(), user));
    let pass_ok = constant_time_eq(cfg.password.as_deref().unwrap_or_default().as_bytes(), pass);
    Ok(if user_ok && pass_ok {
        Ok(())
    } else {
        Err("authentication failed")
    })
}

/// The pixel encoding used for updates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Encoding {
    #[default]
    Raw,
    Hextile,
    Zrle,
    Tight,
}

/// What the client asked for with SetEncodings.
#[derive(Default, Debug)]
struct ClientCaps {
    encoding: Encoding,
    copy_rect: bool,
    desktop_size: bool,
    ext_desktop_size: bool,
    qemu_ext_key: bool,
    qemu_audio: bool,
    last_rect: bool,
    cursor: bool,
    cursor_alpha: bool,
    pointer_motion: bool,
    led_state: bool,
    desktop_name: bool,
    fence: bool,
    continuous_updates: bool,
    compress: Option<u32>,
    /// JPEG quality level 0–9 (Tight only uses JPEG when the client sent one).
    quality: Option<u8>,
    /// Fine-grained JPEG quality 0–100 (TurboVNC style); wins over `quality`.
    fine_quality: Option<u8>,
}

impl ClientCaps {
    fn from_list(list: &[i32]) -> Self {
        let mut c = Self::default();
        let mut preferred: Option<Encoding> = None;
        for &e in list {
            let encoding = match e {
                enc::RAW => Some(Encoding::Raw),
                enc::HEXTILE => Some(Encoding::Hextile),
                enc::ZRLE => Some(Encoding::Zrle),
                enc::TIGHT => Some(Encoding::Tight),
                _ => None,
            };
            if e == enc::COPY_RECT {
                c.copy_rect = true;
            }
            if preferred.is_none() {
                preferred = encoding;
            }
            match e {
                enc::DESKTOP_SIZE => c.desktop_size = true,
                enc::EXTENDED_DESKTOP_SIZE => c.ext_desktop_size = true,
                enc::QEMU_EXT_KEY => c.qemu_ext_key = true,
                enc::QEMU_AUDIO => c.qemu_audio = true,
                enc::LAST_RECT => c.last_rect = true,
                enc::CURSOR => c.cursor = true,
                enc::CURSOR_WITH_ALPHA => c.cursor_alpha = true,
                enc::POINTER_MOTION_CHANGE => c.pointer_motion = true,
                enc::LED_STATE => c.led_state = true,
                enc::DESKTOP_NAME => c.desktop_name = true,
                enc::FENCE => c.fence = true,
                enc::CONTINUOUS_UPDATES => c.continuous_updates = true,
                enc::COMPRESS_0..=enc::COMPRESS_9 => {
                    c.compress = u32::try_from(e - enc::COMPRESS_0).ok();
                }
                enc::QUALITY_0..=enc::QUALITY_9 => {
                    c.quality = u8::try_from(e - enc::QUALITY_0).ok();
                }
                enc::FINE_QUALITY_0..=enc::FINE_QUALITY_100 => {
                    c.fine_quality = u8::try_from(e - enc::FINE_QUALITY_0).ok();
                }
                _ => {}
            }
        }
        // The client's order decides; Raw is always allowed.
        c.encoding = preferred.unwrap_or_default();
        c
    }
}

/// Per-connection encoder state. The zlib streams live as long as the connection: the client's
/// inflaters follow them, so they are created once and never replaced.
#[derive(Default)]
struct Encoders {
    zrle: Option<Zrle>,
    tight: Option<Tight>,
    pixels: Vec<u32>,
    parts: Vec<(Rect, Source)>,
    split: Vec<(Rect, Source)>,
    band: Band,
    /// What the viewer's screen shows, row by row (for CopyRect).
    rows: RowHashes,
    /// Areas last sent as JPEG, resent losslessly once the screen is still.
    lossy: Vec<Rect>,
}

/// What this client has been told besides pixels, so changes are sent once.
#[derive(Default)]
struct Told {
    cursor: Option<(u64, bool)>,
    leds: Option<u32>,
    absolute: Option<bool>,
    /// ExtendedDesktopSize owed after SetEncodings enabled it (clients learn the layout).
    layout: bool,
    /// DesktopName owed after SetEncodings enabled it.
    name: bool,
}

/// Serves one accepted connection to the end.
pub async fn serve<S: Io + 'static>(
    s: S,
    peer: SocketAddr,
    cfg: Arc<VncConfig>,
    desktop: Desktop,
) -> Result<(), ConnError> {
    let Desktop {
        fb, input, audio, ..
    } = desktop;
    let (mut s, shared) =
        match tokio::time::timeout(cfg.handshake_timeout, handshake(s, &cfg, peer)).await {
            Ok(r) => r?,
            Err(_) => return Err(ConnError::Timeout),
        };
    let id = cfg.sessions.next.fetch_add(1, Ordering::Relaxed);
    let mut evict = cfg.sessions.evict_below.subscribe();
    if !shared && cfg.share == SharePolicy::AllowExclusive {
        info!("exclusive client: disconnecting the other viewers");
        cfg.sessions.evict_below.send_replace(id);
    }
    info!(shared, "VNC client authenticated");

    let mut viewer = fb.viewer();
    let mut keys = input.viewer();
    // ServerInit (§7.3.2). Before QEMU attaches the surface is empty: announce a placeholder.
    let (mut width, mut height) = match fb.size() {
        (0, _) | (_, 0) => (640, 480),
        size => size,
    };
    let mut out = Vec::with_capacity(64 * 1024);
    out.extend_from_slice(&(width as u16).to_be_bytes());
    out.extend_from_slice(&(height as u16).to_be_bytes());
    PixelFormat::NATIVE.encode(&mut out);
    out.extend_from_slice(
        &u32::try_from(cfg.desktop_name.len())
            .unwrap_or(0)
            .to_be_bytes(),
    );
    out.extend_from_slice(cfg.desktop_name.as_bytes());
    s.write_all(&out).await?;

    let mut pf = PixelFormat::NATIVE;
    let mut caps = ClientCaps::default();
    let mut encoders = Encoders::default();
    encoders.rows.reset(height);
    let mut told = Told::default();
    let mut inbuf = BytesMut::with_capacity(4096);
    // An update request the client is waiting on: (incremental, region).
    let mut pending: Option<(bool, Rect)> = None;
    // Continuous updates: the region to keep sending without requests.
    let mut continuous: Option<Rect> = None;
    let mut force_full = false;
    // When to resend JPEG areas losslessly (the screen has been still since).
    let mut refresh_at: Option<tokio::time::Instant> = None;
    let mut shift_held = false;
    // Guest sound, while the client has it enabled.
    let mut sound: Option<tokio::sync::broadcast::Receiver<AudioEvent>> = None;
    let mut sound_format = vnc_audio::ClientFormat::default();
    let mut converter = vnc_audio::Converter::default();
    // LED and pointer-mode changes come without damage: look at them now and then, only while
    // the client wants them and is waiting for an update.
    let mut poll = tokio::time::interval(Duration::from_millis(250));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);

    loop {
        // Answer a pending request (or feed continuous updates) once there is something to send.
        let target = match (pending, continuous) {
            (Some((inc, r)), _) => Some((inc && !force_full, r)),
            (None, Some(r)) => Some((!force_full, r)),
            (None, None) => None,
        };
        if let Some((incremental, region)) = target {
            out.clear();
            let damage = viewer.take_damage();
            let resized = damage.width != 0
                && damage.height != 0
                && (damage.width, damage.height) != (width, height);
            if resized && (caps.desktop_size || caps.ext_desktop_size) {
                (width, height) = (damage.width, damage.height);
                // The size change goes alone; the client asks again for the new surface.
                pseudo::update_header(&mut out, 1);
                if caps.ext_desktop_size {
                    pseudo::extended_desktop_size(&mut out, 0, 0, width, height);
                } else {
                    pseudo::desktop_size(&mut out, width, height);
                }
                told.layout = false;
                encoders.rows.reset(height);
                s.write_all(&out).await?;
                pending = None;
                force_full = true;
                continue;
            }
            let full = !incremental || damage.new_surface;
            let mut extras = Vec::new();
            let n_extras = write_extras(
                &mut extras,
                &caps,
                &mut told,
                &fb,
                &input,
                &pf,
                &cfg,
                (width, height),
            );
            let mut rects = update_rects(&damage, full, region, width, height);
            // Nothing changed since the JPEG went out: now send those areas losslessly.
            let refresh =
                rects.is_empty() && refresh_at.is_some_and(|t| t <= tokio::time::Instant::now());
            let mut saved_quality = None;
            if refresh {
                refresh_at = None;
                rects = std::mem::take(&mut encoders.lossy);
                merge_overlaps(&mut rects);
                saved_quality = encoders.tight.as_mut().map(|t| t.set_jpeg(None));
            } else if full {
                encoders.lossy.clear();
            }
            if !rects.is_empty() || n_extras > 0 || (pending.is_some() && !incremental) {
                let extras = (&extras[..], n_extras);
                let mut parts = std::mem::take(&mut encoders.parts);
                plan_update(
                    &mut parts,
                    &rects,
                    !full,
                    &caps,
                    &fb,
                    &mut encoders.rows,
                    &mut encoders.band,
                    width,
                );
                let lossy_before = encoders.lossy.len();
                write_update(&mut out, &parts, extras, &fb, &pf, &caps, &mut encoders);
                let st = &cfg.stats;
                st.updates.fetch_add(1, Ordering::Relaxed);
                st.jpeg_rects.fetch_add(
                    (encoders.lossy.len() - lossy_before) as u64,
                    Ordering::Relaxed,
                );
                let copies = parts
                    .iter()
                    .filter(|p| matches!(p.1, Source::CopyFrom(_)))
                    .count();
                st.copy_rects.fetch_add(copies as u64, Ordering::Relaxed);
                if refresh {
                    st.lossless_refreshes.fetch_add(1, Ordering::Relaxed);
                }
                encoders.parts = parts;
                if let (Some(t), Some(q)) = (encoders.tight.as_mut(), saved_quality) {
                    t.set_jpeg(q);
                }
                if !refresh && !encoders.lossy.is_empty() {
                    cap_rects(&mut encoders.lossy);
                    refresh_at = Some(tokio::time::Instant::now() + LOSSLESS_REFRESH);
                }
                s.write_all(&out).await?;
                pending = None;
                force_full = false;
            }
        }

        let waiting = pending.is_some() || continuous.is_some();
        tokio::select! {
            n = s.read_buf(&mut inbuf) => {
                if n? == 0 {
                    debug!("client closed the connection");
                    return Ok(());
                }
                while let Some(msg) = decode(&mut inbuf)? {
                    trace!(?msg, "client message");
                    out.clear();
                    match msg {
                        ClientMsg::SetPixelFormat(p) => {
                            pf = p;
                            // Cached colour bytes are in the old format: resend everything.
                            force_full = true;
                        }
                        ClientMsg::SetEncodings(list) => {
                            let before = std::mem::take(&mut caps);
                            caps = ClientCaps::from_list(&list);
                            encoders.configure(&caps);
                            debug!(?caps, "encodings set");
                            if caps.qemu_ext_key && !before.qemu_ext_key {
                                // Clients only send scancodes once the server confirms with
                                // a pseudo-rectangle (rfbproto "QEMU Extended Key Event").
                                pseudo::update_header(&mut out, 1);
                                pseudo::qemu_ext_key_ack(&mut out);
                            }
                            if caps.qemu_audio && !before.qemu_audio {
                                pseudo::update_header(&mut out, 1);
                                vnc_audio::ack(&mut out);
                            }
                            if caps.fence && !before.fence {
                                pseudo::server_fence(&mut out, pseudo::FENCE_REQUEST, &[]);
                            }
                            if caps.continuous_updates && !before.continuous_updates {
                                pseudo::end_of_continuous_updates(&mut out);
                            }
                            told.layout = caps.ext_desktop_size && !before.ext_desktop_size;
                            told.name = caps.desktop_name;
                            told.cursor = None;
                            told.leds = None;
                            told.absolute = None;
                        }
                        ClientMsg::UpdateRequest { incremental, x, y, w, h } => {
                            let r = Rect { x: x.into(), y: y.into(), w: w.into(), h: h.into() };
                            // While continuous updates run, incremental requests are redundant.
                            if continuous.is_none() || !incremental {
                                pending = Some(match pending {
                                    // A non-incremental request wins over an incremental one.
                                    Some((inc, _)) => (inc && incremental, r),
                                    None => (incremental, r),
                                });
                            }
                        }
                        ClientMsg::QemuExtKey { down, keycode, .. } => {
                            keys.key(keycode, down).await;
                        }
                        ClientMsg::Key { down, keysym } => {
                            keysym_key(&mut keys, &mut shift_held, keysym, down).await;
                        }
                        ClientMsg::Pointer { mask, x, y } => {
                            if caps.pointer_motion && told.absolute == Some(false) {
                                // Relative mode: coordinates are deltas biased by 0x7FFF.
                                keys.relative(i32::from(x) - 0x7fff, i32::from(y) - 0x7fff);
                                buttons(&mut keys, mask).await;
                            } else {
                                keys.pointer(x.into(), y.into());
                                buttons(&mut keys, mask).await;
                            }
                        }
                        ClientMsg::SetDesktopSize { width: w, height: h, screens } => {
                            let status = desktop_size_status(&input, w, h, screens.len()).await;
                            info!(w, h, status, "client asked for a new desktop size");
                            if caps.ext_desktop_size {
                                pseudo::update_header(&mut out, 1);
                                pseudo::extended_desktop_size(&mut out, 1, status, width, height);
                            }
                        }
                        ClientMsg::Fence { flags, payload } => {
                            if flags & pseudo::FENCE_REQUEST != 0 {
                                // Messages are handled in order and each reply is written
                                // before the next is read: every ordering flag already holds.
                                let keep = flags
                                    & (pseudo::FENCE_BLOCK_BEFORE
                                        | pseudo::FENCE_BLOCK_AFTER
                                        | pseudo::FENCE_SYNC_NEXT);
                                pseudo::server_fence(&mut out, keep, &payload);
                            }
                        }
                        ClientMsg::EnableContinuousUpdates { enable, x, y, w, h } => {
                            if !caps.continuous_updates {
                                return Err(ConnError::Refused(
                                    "EnableContinuousUpdates without the pseudo-encoding",
                                ));
                            }
                            if enable {
                                continuous =
                                    Some(Rect { x: x.into(), y: y.into(), w: w.into(), h: h.into() });
                            } else {
                                continuous = None;
                                pseudo::end_of_continuous_updates(&mut out);
                            }
                        }
                        ClientMsg::QemuAudio { op, format } => {
                            if !caps.qemu_audio {
                                return Err(ConnError::Refused(
                                    "QEMU audio message without the pseudo-encoding",
                                ));
                            }
                            match (op, format) {
                                (0, _) => {
                                    if sound.is_none() {
                                        sound = Some(audio.subscribe());
                                        converter = vnc_audio::Converter::default();
                                        vnc_audio::begin(&mut out);
                                    }
                                }
                                (1, _) => {
                                    if sound.take().is_some() {
                                        vnc_audio::end(&mut out);
                                    }
                                }
                                (2, Some((sample, channels, freq))) => {
                                    sound_format = vnc_audio::ClientFormat::new(
                                        sample, channels, freq,
                                    )
                                    .ok_or(ConnError::Refused("unsupported audio format"))?;
                                }
                                _ => return Err(ConnError::Refused("unknown QEMU audio operation")),
                            }
                        }
                        ClientMsg::CutText(_) => {}
                    }
                    if !out.is_empty() {
                        s.write_all(&out).await?;
                    }
                }
            }
            () = viewer.changed(), if waiting => {}
            () = sleep_until_opt(refresh_at), if waiting && refresh_at.is_some() => {}
            ev = next_sound(&mut sound), if sound.is_some() => {
                use tokio::sync::broadcast::error::RecvError;
                match ev {
                    Ok(AudioEvent::Pcm(format, data, since)) => {
                        out.clear();
                        converter.data(&format, &data, &sound_format, &mut out);
                        s.write_all(&out).await?;
                        cfg.stats.audio_wait.record(since);
                    }
                    Ok(AudioEvent::Started(_) | AudioEvent::Stopped) => {}
                    // A viewer that cannot keep up loses audio rather than delaying anyone.
                    Err(RecvError::Lagged(n)) => debug!(chunks = n, "audio dropped: viewer too slow"),
                    Err(RecvError::Closed) => sound = None,
                }
            }
            _ = poll.tick(), if waiting && (caps.led_state || caps.pointer_motion) => {}
            r = evict.changed() => {
                if r.is_ok() && *evict.borrow() > id {
                    return Err(ConnError::Evicted);
                }
            }
        }
    }
}

impl Encoders {
    fn configure(&mut self, caps: &ClientCaps) {
        let level = caps.compress.unwrap_or(6);
        if caps.encoding == Encoding::Zrle && self.zrle.is_none() {
            self.zrle = Some(Zrle::new(level));
        }
        if caps.encoding == Encoding::Tight {
            let tight = self.tight.get_or_insert_with(|| Tight::new(level, None));
            // JPEG is allowed only while the client sends a quality level.
            tight.set_quality(caps.quality, caps.fine_quality);
        }
    }
}

/// Cursor, LED, pointer-mode, layout and name pseudo-rectangles that changed since last told;
/// returns how many were written.
#[allow(clippy::too_many_arguments)]
fn write_extras(
    out: &mut Vec<u8>,
    caps: &ClientCaps,
    told: &mut Told,
    fb: &Framebuffer,
    input: &InputSink,
    pf: &PixelFormat,
    cfg: &VncConfig,
    (width, height): (u32, u32),
) -> usize {
    let mut n = 0;
    if caps.cursor || caps.cursor_alpha {
        let (shape, serial, pointer) = fb.cursor();
        let now = (serial, pointer.visible);
        if shape.is_some() && told.cursor != Some(now) {
            let shown = shape.as_deref().filter(|_| now.1);
            if caps.cursor_alpha {
                pseudo::cursor_with_alpha(out, shown);
            } else {
                pseudo::cursor(out, pf, shown);
            }
            told.cursor = Some(now);
            n += 1;
        }
    }
    if caps.led_state {
        let leds = input.leds();
        if told.leds != Some(leds) && input.is_attached() {
            pseudo::led_state(out, leds);
            told.leds = Some(leds);
            n += 1;
        }
    }
    if caps.pointer_motion
        && let Some(absolute) = input.mouse_absolute()
        && told.absolute != Some(absolute)
    {
        pseudo::pointer_motion(out, absolute);
        told.absolute = Some(absolute);
        n += 1;
    }
    if told.layout {
        pseudo::extended_desktop_size(out, 0, 0, width, height);
        told.layout = false;
        n += 1;
    }
    if told.name {
        pseudo::desktop_name(out, &cfg.desktop_name);
        told.name = false;
        n += 1;
    }
    n
}

/// A plain RFB key event (an X11 keysym): mapped through the US layout table. A character that
/// needs Shift gets a Shift press around it when the viewer is not holding Shift itself.
async fn keysym_key(keys: &mut ViewerInput, shift_held: &mut bool, keysym: u32, down: bool) {
    if keysym == XK_SHIFT_L || keysym == XK_SHIFT_R {
        *shift_held = down;
    }
    let Some((qnum, needs_shift)) = keysym_to_qnum(keysym) else {
        trace!(keysym, "keysym not on a US layout; dropped");
        return;
    };
    if down && needs_shift && !*shift_held {
        keys.key(QNUM_SHIFT_L, true).await;
        keys.key(qnum, true).await;
        keys.key(QNUM_SHIFT_L, false).await;
    } else {
        keys.key(qnum, down).await;
    }
}

/// RFB button mask bits → QEMU buttons: bits 0-2 left/middle/right, 3-6 wheel up/down/left/right.
async fn buttons(keys: &mut ViewerInput, mask: u8) {
    use crate::qemu::input::button;
    let mut held = 0u32;
    for (bit, b) in [
        (0, button::LEFT),
        (1, button::MIDDLE),
        (2, button::RIGHT),
        (3, button::WHEEL_UP),
        (4, button::WHEEL_DOWN),
        (5, button::WHEEL_LEFT),
        (6, button::WHEEL_RIGHT),
    ] {
        if mask & (1 << bit) != 0 {
            held |= 1 << b;
        }
    }
    keys.buttons(held).await;
}

/// SetDesktopSize → `Console.SetUIInfo`; the RFB status: 0 done (the new mode follows as a
/// resize), 1 prohibited (the device cannot change mode on request), 2 out of resources,
/// 3 invalid layout.
async fn desktop_size_status(input: &InputSink, w: u16, h: u16, screens: usize) -> u16 {
    if w == 0 || h == 0 || screens == 0 || u32::from(w) > crate::framebuffer::MAX_WIDTH {
        return 3;
    }
    match input.set_ui_info(w.into(), h.into()).await {
        Ok(()) => 0,
        Err(UiInfoError::Unsupported) => 1,
        Err(UiInfoError::Detached | UiInfoError::Failed(_)) => 2,
    }
}

/// The rectangles to send: the damage inside the requested region (all of it when `full`).
fn update_rects(damage: &Damage, full: bool, region: Rect, width: u32, height: u32) -> Vec<Rect> {
    let clip = |r: Rect| -> Option<Rect> {
        let x0 = r.x.max(region.x);
        let y0 = r.y.max(region.y);
        let x1 = (r.x + r.w)
            .min(region.x.saturating_add(region.w))
            .min(width);
        let y1 = (r.y + r.h)
            .min(region.y.saturating_add(region.h))
            .min(height);
        (x1 > x0 && y1 > y0).then(|| Rect {
            x: x0,
            y: y0,
            w: x1 - x0,
            h: y1 - y0,
        })
    };
    if full {
        return clip(Rect::full(width, height)).into_iter().collect();
    }
    let mut rects: Vec<Rect> = damage.rects.iter().filter_map(|r| clip(*r)).collect();
    // Many small rects cost more in headers than one bounding box: merge past a threshold.
    if rects.len() > 32 {
        let bb = rects.iter().skip(1).fold(rects[0], |a, r| bounding(&a, r));
        rects = vec![bb];
    }
    merge_overlaps(&mut rects);
    rects
}

/// Most rects remembered for the lossless refresh: under endless animation the list would
/// otherwise grow with every frame.
const MAX_LOSSY_RECTS: usize = 64;

/// Keeps a remembered region bounded: merge overlaps, and past the limit keep only the bounding
/// box (refreshing a bit more than needed beats unbounded memory).
fn cap_rects(rects: &mut Vec<Rect>) {
    if rects.len() <= MAX_LOSSY_RECTS {
        return;
    }
    merge_overlaps(rects);
    if rects.len() > MAX_LOSSY_RECTS {
        let bb = rects.iter().skip(1).fold(rects[0], |a, r| bounding(&a, r));
        *rects = vec![bb];
    }
}

fn bounding(a: &Rect, b: &Rect) -> Rect {
    let (x0, y0) = (a.x.min(b.x), a.y.min(b.y));
    let x1 = (a.x + a.w).max(b.x + b.w);
    let y1 = (a.y + a.h).max(b.y + b.h);
    Rect {
        x: x0,
        y: y0,
        w: x1 - x0,
        h: y1 - y0,
    }
}

/// Damage from several guest frames overlaps (often the same full-screen rect many times):
/// replace overlapping rects by their bounding box until none overlap, so no pixel is sent twice.
fn merge_overlaps(rects: &mut Vec<Rect>) {
    let overlaps = |a: &Rect, b: &Rect| {
        a.x < b.x + b.w && b.x < a.x + a.w && a.y < b.y + b.h && b.y < a.y + a.h
    };
    'again: loop {
        for i in 0..rects.len() {
            for j in i + 1..rects.len() {
                if overlaps(&rects[i], &rects[j]) {
                    let merged = bounding(&rects[i], &rects[j]);
                    rects.swap_remove(j);
                    rects[i] = merged;
                    continue 'again;
                }
            }
        }
        return;
    }
}

/// Where a rectangle's content comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// Read from the framebuffer when encoding.
    Framebuffer,
    /// From the band snapshot (`Band`), whose rows were hashed.
    Band,
    /// CopyRect from row `src_y` of the viewer's own screen.
    CopyFrom(u32),
}

/// A full-width band of damage read once, so the rows hashed are exactly the rows sent.
#[derive(Default)]
struct Band {
    rect: Rect,
    pixels: Vec<u32>,
    hashes: Vec<RowHash>,
}

/// Decides what to send for `rects`: scrolled rows as CopyRects (when the client takes them and
/// asked incrementally), the rest as pixels. Keeps the viewer's row hashes current.
#[allow(clippy::too_many_arguments)]
fn plan_update(
    parts: &mut Vec<(Rect, Source)>,
    rects: &[Rect],
    incremental: bool,
    caps: &ClientCaps,
    fb: &Framebuffer,
    rows: &mut RowHashes,
    band: &mut Band,
    width: u32,
) {
    parts.clear();
    if !caps.copy_rect {
        parts.extend(rects.iter().map(|r| (*r, Source::Framebuffer)));
        return;
    }
    if let [r] = rects
        && r.x == 0
        && r.w == width
        && fb.read_rect(*r, &mut band.pixels) == *r
    {
        band.rect = *r;
        band.hashes.clear();
        band.hashes.extend(
            band.pixels
                .chunks_exact(width as usize)
                .map(scroll::row_hash),
        );
        let moves = if incremental {
            rows.find_moves(r.y, &band.hashes)
        } else {
            Vec::new()
        };
        let mut copied = vec![false; r.h as usize];
        for m in &moves {
            parts.push((
                Rect {
                    x: 0,
                    y: m.dst_y,
                    w: width,
                    h: m.rows,
                },
                Source::CopyFrom(m.src_y),
            ));
            copied[(m.dst_y - r.y) as usize..(m.dst_y - r.y + m.rows) as usize].fill(true);
        }
        // The rows not copied, as full-width runs of pixels from the snapshot.
        let mut y = 0;
        while y < r.h {
            if copied[y as usize] {
                y += 1;
                continue;
            }
            let start = y;
            while y < r.h && !copied[y as usize] {
                y += 1;
            }
            parts.push((
                Rect {
                    x: 0,
                    y: r.y + start,
                    w: width,
                    h: y - start,
                },
                Source::Band,
            ));
        }
        rows.record(r.y, &band.hashes);
        return;
    }
    for r in rects {
        rows.forget(r);
        parts.push((*r, Source::Framebuffer));
    }
}

fn write_update(
    out: &mut Vec<u8>,
    parts: &[(Rect, Source)],
    (extras, n_extras): (&[u8], usize),
    fb: &Framebuffer,
    pf: &PixelFormat,
    caps: &ClientCaps,
    encoders: &mut Encoders,
) {
    // Tight splits rectangles; with LastRect the count need not be known in advance.
    encoders.split.clear();
    for &(r, source) in parts {
        if caps.encoding == Encoding::Tight && !matches!(source, Source::CopyFrom(_)) {
            let mut pieces = Vec::new();
            tight::split(r, &mut pieces);
            encoders
                .split
                .extend(pieces.into_iter().map(|p| (p, source)));
        } else {
            encoders.split.push((r, source));
        }
    }
    let count = encoders.split.len() + n_extras;
    let use_last_rect = caps.last_rect && count >= usize::from(u16::MAX);
    let header = if use_last_rect {
        u16::MAX
    } else {
        u16::try_from(count).unwrap_or(u16::MAX)
    };
    pseudo::update_header(out, header);
    out.extend_from_slice(extras);
    let Encoders {
        zrle,
        tight,
        pixels,
        split,
        band,
        lossy,
        ..
    } = encoders;
    for (i, &(r, source)) in split.iter().enumerate() {
        if !use_last_rect && i + n_extras >= usize::from(u16::MAX) {
            break;
        }
        let (got, px): (Rect, &[u32]) = match source {
            Source::CopyFrom(src_y) => {
                rect_header(out, 0, r.y as u16, r.w as u16, r.h as u16, enc::COPY_RECT);
                out.extend_from_slice(&0u16.to_be_bytes());
                out.extend_from_slice(&(src_y as u16).to_be_bytes());
                continue;
            }
            Source::Framebuffer => (fb.read_rect(r, pixels), pixels.as_slice()),
            Source::Band => {
                let bw = band.rect.w as usize;
                let row0 = (r.y - band.rect.y) as usize;
                if r.x == band.rect.x && r.w == band.rect.w {
                    // Whole rows of the snapshot: encode them in place, no copy.
                    (r, &band.pixels[row0 * bw..(row0 + r.h as usize) * bw])
                } else {
                    // A piece of the band (Tight splits wide bands): gather its rows.
                    pixels.clear();
                    for row in row0..row0 + r.h as usize {
                        let start = row * bw + (r.x - band.rect.x) as usize;
                        pixels.extend_from_slice(&band.pixels[start..start + r.w as usize]);
                    }
                    (r, pixels.as_slice())
                }
            }
        };
        let (x, y, w, h) = (got.x as u16, got.y as u16, got.w as u16, got.h as u16);
        let (gw, gh) = (got.w as usize, got.h as usize);
        match (caps.encoding, &mut *zrle, &mut *tight) {
            (Encoding::Zrle, Some(z), _) => {
                rect_header(out, x, y, w, h, enc::ZRLE);
                z.encode(pf, gw, gh, px, out);
            }
            (Encoding::Tight, _, Some(t)) => {
                rect_header(out, x, y, w, h, enc::TIGHT);
                if t.encode(pf, gw, gh, px, out) {
                    lossy.push(got);
                }
            }
            (Encoding::Hextile, _, _) => {
                rect_header(out, x, y, w, h, enc::HEXTILE);
                hextile::encode(pf, gw, gh, px, out);
            }
            _ => {
                rect_header(out, x, y, w, h, enc::RAW);
                raw(pf, px, out);
            }
        }
    }
    if use_last_rect {
        pseudo::last_rect(out);
    }
    if out.len() > 64 * 1024 * 1024 {
        warn!(bytes = out.len(), "very large update");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_damage_is_sent_once() {
        let r = |x, y, w, h| Rect { x, y, w, h };
        let damage = Damage {
            width: 100,
            height: 100,
            new_surface: false,
            attached: true,
            rects: vec![
                r(0, 0, 100, 100),
                r(0, 0, 100, 100),
                r(10, 10, 5, 5),
                r(0, 0, 100, 100),
            ],
        };
        assert_eq!(
            update_rects(&damage, false, r(0, 0, 100, 100), 100, 100),
            [r(0, 0, 100, 100)]
        );
        let mut v = vec![
            r(0, 0, 10, 10),
            r(5, 5, 10, 10),
            r(50, 50, 2, 2),
            r(14, 14, 2, 2),
        ];
        merge_overlaps(&mut v);
        assert_eq!(v, [r(0, 0, 16, 16), r(50, 50, 2, 2)]);
    }

    #[test]
    fn remembered_lossy_areas_stay_bounded() {
        let r = |x, y, w, h| Rect { x, y, w, h };
        // Endless animation: the same full-screen rect every frame collapses to one.
        let mut v = vec![r(0, 0, 800, 600); 10_000];
        cap_rects(&mut v);
        assert_eq!(v, [r(0, 0, 800, 600)]);
        // Many disjoint small rects past the limit become their bounding box.
        let mut v: Vec<Rect> = (0..100).map(|i| r(i * 10, 0, 5, 5)).collect();
        cap_rects(&mut v);
        assert_eq!(v, [r(0, 0, 995, 5)]);
        // Under the limit nothing changes.
        let mut v = vec![r(0, 0, 5, 5), r(10, 0, 5, 5)];
        cap_rects(&mut v);
        assert_eq!(v.len(), 2);
    }

    #[test]
    fn versions() {
        let v = |s: &[u8; 12]| parse_version(s).ok();
        assert_eq!(v(b"RFB 003.003\n"), Some(Version::V3_3));
        assert_eq!(v(b"RFB 003.005\n"), Some(Version::V3_3));
        assert_eq!(v(b"RFB 003.007\n"), Some(Version::V3_7));
        assert_eq!(v(b"RFB 003.008\n"), Some(Version::V3_8));
        assert_eq!(v(b"RFB 003.889\n"), Some(Version::V3_3));
        assert_eq!(v(b"RFB 004.001\n"), Some(Version::V3_8));
        assert_eq!(v(b"RFB 002.000\n"), None);
        assert_eq!(v(b"HTTP/1.1 200"), None);
        assert_eq!(v(b"RFB 00x.008\n"), None);
    }
}
