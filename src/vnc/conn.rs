//! One RFB connection: handshake (3.3, 3.7, 3.8), security, then the message loop that sends
//! framebuffer updates when the client asked for them and something changed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, info, trace, warn};

use super::auth::{LoginLimiter, challenge, constant_time_eq, vnc_response};
use super::encode::{Zrle, raw, rect_header};
use super::keymap::{QNUM_SHIFT_L, XK_SHIFT_L, XK_SHIFT_R, keysym_to_qnum};
use super::proto::{ClientMsg, PixelFormat, ProtoError, decode, enc};
use crate::framebuffer::{Damage, Framebuffer, Rect};
use crate::qemu::input::{InputSink, UiInfoError, ViewerInput};

/// Security types (RFC 6143 §7.2).
const SEC_NONE: u8 = 1;
const SEC_VNC: u8 = 2;

/// Time a client has to finish the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// What every connection shares.
pub struct VncConfig {
    /// `None` only when the operator passed `--insecure-no-auth`.
    pub password: Option<String>,
    pub desktop_name: String,
    pub limiter: LoginLimiter,
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
    BadSecurityType(u8),
    #[error("authentication failed")]
    AuthFailed,
    #[error("too many failed logins from this address")]
    RateLimited,
    #[error("handshake timed out")]
    Timeout,
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

async fn send_failure<S: AsyncWrite + Unpin>(s: &mut S, reason: &str) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(4 + reason.len());
    out.extend_from_slice(&u32::try_from(reason.len()).unwrap_or(0).to_be_bytes());
    out.extend_from_slice(reason.as_bytes());
    s.write_all(&out).await
}

/// Runs the handshake up to and including ClientInit; returns the shared flag.
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    cfg: &VncConfig,
    peer: SocketAddr,
) -> Result<bool, ConnError> {
    s.write_all(b"RFB 003.008\n").await?;
    let mut v = [0u8; 12];
    s.read_exact(&mut v).await?;
    let version = parse_version(&v)?;
    debug!(?version, "client version");

    let offered = if cfg.password.is_some() {
        SEC_VNC
    } else {
        SEC_NONE
    };
    let limited = cfg.password.is_some() && !cfg.limiter.allowed(peer.ip());
    let chosen = if version == Version::V3_3 {
        // 3.3: the server decides; a failure is 0 followed by a reason.
        if limited {
            s.write_all(&0u32.to_be_bytes()).await?;
            send_failure(s, "too many failed logins; try again later").await?;
            return Err(ConnError::RateLimited);
        }
        s.write_all(&u32::from(offered).to_be_bytes()).await?;
        offered
    } else {
        if limited {
            s.write_all(&[0]).await?;
            send_failure(s, "too many failed logins; try again later").await?;
            return Err(ConnError::RateLimited);
        }
        s.write_all(&[1, offered]).await?;
        let mut c = [0u8; 1];
        s.read_exact(&mut c).await?;
        if c[0] != offered {
            if version == Version::V3_8 {
                s.write_all(&1u32.to_be_bytes()).await?;
                send_failure(s, "security type not offered").await?;
            }
            return Err(ConnError::BadSecurityType(c[0]));
        }
        c[0]
    };

    if chosen == SEC_VNC {
        let password = cfg.password.as_deref().unwrap_or_default();
        let ch = challenge();
        s.write_all(&ch).await?;
        let mut resp = [0u8; 16];
        s.read_exact(&mut resp).await?;
        if !constant_time_eq(&resp, &vnc_response(password, &ch)) {
            cfg.limiter.failed(peer.ip());
            s.write_all(&1u32.to_be_bytes()).await?;
            if version == Version::V3_8 {
                send_failure(s, "authentication failed").await?;
            }
            return Err(ConnError::AuthFailed);
        }
        cfg.limiter.succeeded(peer.ip());
        s.write_all(&0u32.to_be_bytes()).await?;
    } else if version == Version::V3_8 {
        // SecurityResult follows None only in 3.8.
        s.write_all(&0u32.to_be_bytes()).await?;
    }

    let mut shared = [0u8; 1];
    s.read_exact(&mut shared).await?;
    Ok(shared[0] != 0)
}

/// What the client asked for with SetEncodings.
#[derive(Default)]
struct ClientCaps {
    zrle: bool,
    desktop_size: bool,
    ext_desktop_size: bool,
    qemu_ext_key: bool,
    last_rect: bool,
    compress: Option<u32>,
}

impl ClientCaps {
    fn from_list(list: &[i32]) -> Self {
        let mut c = Self::default();
        let mut preferred: Option<i32> = None;
        for &e in list {
            match e {
                enc::RAW | enc::ZRLE if preferred.is_none() => preferred = Some(e),
                enc::DESKTOP_SIZE => c.desktop_size = true,
                enc::EXTENDED_DESKTOP_SIZE => c.ext_desktop_size = true,
                enc::QEMU_EXT_KEY => c.qemu_ext_key = true,
                enc::LAST_RECT => c.last_rect = true,
                enc::COMPRESS_0..=enc::COMPRESS_9 => {
                    c.compress = u32::try_from(e - enc::COMPRESS_0).ok();
                }
                _ => {}
            }
        }
        // The client's order decides; Raw is always allowed.
        c.zrle = preferred == Some(enc::ZRLE);
        c
    }
}

/// Serves one accepted connection to the end.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    peer: SocketAddr,
    cfg: Arc<VncConfig>,
    fb: Framebuffer,
    input: InputSink,
) -> Result<(), ConnError> {
    let shared = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut s, &cfg, peer)).await
    {
        Ok(r) => r?,
        Err(_) => return Err(ConnError::Timeout),
    };
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
    let mut zrle = Zrle::default();
    let mut inbuf = BytesMut::with_capacity(4096);
    // An update request the client is waiting on: (incremental, region).
    let mut pending: Option<(bool, Rect)> = None;
    let mut pixels = Vec::new();
    let mut shift_held = false;

    loop {
        // Answer a pending request as soon as there is something to send.
        if let Some((incremental, region)) = pending {
            let damage = viewer.take_damage();
            let full = !incremental || damage.new_surface;
            if full || !damage.rects.is_empty() {
                out.clear();
                let resized = damage.width != 0
                    && damage.height != 0
                    && (damage.width, damage.height) != (width, height);
                if resized && (caps.desktop_size || caps.ext_desktop_size) {
                    (width, height) = (damage.width, damage.height);
                    write_resize(&mut out, &caps, width, height);
                    // After a resize the client asks again; its old region is void.
                    s.write_all(&out).await?;
                    pending = None;
                    continue;
                }
                let rects = update_rects(&damage, full, region, width, height);
                write_update(&mut out, &rects, &fb, &pf, &caps, &mut zrle, &mut pixels);
                s.write_all(&out).await?;
                pending = None;
            }
        }

        tokio::select! {
            n = s.read_buf(&mut inbuf) => {
                if n? == 0 {
                    debug!("client closed the connection");
                    return Ok(());
                }
                while let Some(msg) = decode(&mut inbuf)? {
                    trace!(?msg, "client message");
                    match msg {
                        ClientMsg::SetPixelFormat(p) => pf = p,
                        ClientMsg::SetEncodings(list) => {
                            caps = ClientCaps::from_list(&list);
                            if let Some(level) = caps.compress {
                                zrle = Zrle::new(level);
                            }
                            debug!(zrle = caps.zrle, desktop_size = caps.desktop_size,
                                   qemu_ext_key = caps.qemu_ext_key, "encodings set");
                            if caps.qemu_ext_key {
                                // Clients only send scancodes once the server confirms with
                                // a pseudo-rectangle (rfbproto "QEMU Extended Key Event").
                                let mut ack = vec![0, 0, 0, 1];
                                rect_header(&mut ack, 0, 0, 0, 0, enc::QEMU_EXT_KEY);
                                s.write_all(&ack).await?;
                            }
                        }
                        ClientMsg::UpdateRequest { incremental, x, y, w, h } => {
                            let r = Rect { x: x.into(), y: y.into(), w: w.into(), h: h.into() };
                            pending = Some(match pending {
                                // A non-incremental request wins over an incremental one.
                                Some((inc, _)) => (inc && incremental, r),
                                None => (incremental, r),
                            });
                        }
                        ClientMsg::QemuExtKey { down, keycode, .. } => {
                            keys.key(keycode, down).await;
                        }
                        ClientMsg::Key { down, keysym } => {
                            keysym_key(&mut keys, &mut shift_held, keysym, down).await;
                        }
                        ClientMsg::Pointer { mask, x, y } => pointer(&mut keys, mask, x, y).await,
                        ClientMsg::SetDesktopSize { width: w, height: h, screens } => {
                            let status = desktop_size_status(&input, w, h, screens.len()).await;
                            info!(w, h, status, "client asked for a new desktop size");
                            if caps.ext_desktop_size {
                                let mut reply = vec![0, 0, 0, 1];
                                eds_rect(&mut reply, 1, status, width, height);
                                s.write_all(&reply).await?;
                            }
                        }
                        ClientMsg::CutText(_) | ClientMsg::Fence { .. }
                        | ClientMsg::EnableContinuousUpdates { .. }
                        | ClientMsg::QemuAudio { .. } => {}
                    }
                }
            }
            () = viewer.changed(), if pending.is_some() => {}
        }
    }
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
async fn pointer(keys: &mut ViewerInput, mask: u8, x: u16, y: u16) {
    use crate::qemu::input::button;
    keys.pointer(x.into(), y.into());
    let mut held = 0u32;
    for (bit, b) in [(0, button::LEFT), (1, button::MIDDLE), (2, button::RIGHT)] {
        if mask & (1 << bit) != 0 {
            held |= 1 << b;
        }
    }
    for (bit, b) in [
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

fn write_resize(out: &mut Vec<u8>, caps: &ClientCaps, width: u32, height: u32) {
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&1u16.to_be_bytes());
    if caps.ext_desktop_size {
        eds_rect(out, 0, 0, width, height); // reason 0: the server changed size
    } else {
        rect_header(out, 0, 0, width as u16, height as u16, enc::DESKTOP_SIZE);
    }
}

/// An ExtendedDesktopSize rectangle (rfbproto §7.8.2): x = reason, y = status, one screen.
fn eds_rect(out: &mut Vec<u8>, reason: u16, status: u16, width: u32, height: u32) {
    let (w, h) = (width as u16, height as u16);
    rect_header(out, reason, status, w, h, enc::EXTENDED_DESKTOP_SIZE);
    out.extend_from_slice(&[1, 0, 0, 0]);
    out.extend_from_slice(&0u32.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&w.to_be_bytes());
    out.extend_from_slice(&h.to_be_bytes());
    out.extend_from_slice(&0u32.to_be_bytes());
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
        let bb = rects.iter().fold(rects[0], |a, r| {
            let x0 = a.x.min(r.x);
            let y0 = a.y.min(r.y);
            let x1 = (a.x + a.w).max(r.x + r.w);
            let y1 = (a.y + a.h).max(r.y + r.h);
            Rect {
                x: x0,
                y: y0,
                w: x1 - x0,
                h: y1 - y0,
            }
        });
        rects = vec![bb];
    }
    rects
}

fn write_update(
    out: &mut Vec<u8>,
    rects: &[Rect],
    fb: &Framebuffer,
    pf: &PixelFormat,
    caps: &ClientCaps,
    zrle: &mut Zrle,
    pixels: &mut Vec<u32>,
) {
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&u16::try_from(rects.len()).unwrap_or(u16::MAX).to_be_bytes());
    for r in rects {
        let got = fb.read_rect(*r, pixels);
        let (x, y, w, h) = (got.x as u16, got.y as u16, got.w as u16, got.h as u16);
        if caps.zrle {
            rect_header(out, x, y, w, h, enc::ZRLE);
            zrle.encode(pf, got.w as usize, got.h as usize, pixels, out);
        } else {
            rect_header(out, x, y, w, h, enc::RAW);
            raw(pf, pixels, out);
        }
    }
    if out.len() > 64 * 1024 * 1024 {
        warn!(bytes = out.len(), "very large update");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
