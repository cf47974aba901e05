//! The RFB handshake (3.3, 3.7, 3.8) up to ClientInit: version, security types, VeNCrypt (TLS
//! with VNC or Plain authentication inside), VNC authentication, and the shared failed-login
//! limit. Failures carry the reason RFB lets us send.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use super::auth::{challenge, vnc_response};
use super::config::VncConfig;
use super::proto::ProtoError;
use crate::metrics::Login;
use crate::net::Io;
use crate::session::audit;
use crate::session::auth::{RATE_LIMITED, constant_time_eq};
use crate::session::budget::Refused;

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

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("i/o")]
    Io(#[from] std::io::Error),
    #[error("protocol")]
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
    #[error("TLS handshake")]
    Tls(#[source] std::io::Error),
    #[error("{0}")]
    Refused(&'static str),
    #[error("another viewer connected exclusively")]
    Evicted,
    #[error(transparent)]
    OverBudget(Refused),
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

/// Inner authentication once the transport is settled.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Inner {
    None,
    Vnc,
    Plain,
}

/// Runs the handshake up to and including ClientInit; returns the stream to go on with, the
/// shared flag and the user name (VeNCrypt Plain has one).
/// `over_budget`: the viewer cannot be admitted; it is told why instead of the security types.
pub async fn handshake<S: Io + 'static>(
    mut s: S,
    cfg: &VncConfig,
    peer: SocketAddr,
    over_budget: Option<Refused>,
) -> Result<(Box<dyn Io>, bool, Option<String>), ConnError> {
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
        offered.push(if cfg.auth.required() {
            SEC_VNC
        } else {
            SEC_NONE
        });
    }
    let limited = !cfg.auth.allowed(peer.ip());
    // Refusals before authentication: the reason goes where the security types would.
    let early: Option<(String, ConnError)> = match over_budget {
        Some(r) => Some((r.to_string(), ConnError::OverBudget(r))),
        None if limited => Some((RATE_LIMITED.to_owned(), ConnError::RateLimited)),
        None => None,
    };
    if let Some((_, e)) = &early {
        let why = match e {
            ConnError::OverBudget(_) => Login::OverBudget,
            _ => Login::Limited,
        };
        audit::login(cfg.protocol, peer, None, why);
    }
    let chosen = if version == Version::V3_3 {
        // 3.3: the server decides (no VeNCrypt there); a failure is 0 followed by a reason.
        let pick = offered.iter().copied().find(|&t| t != SEC_VENCRYPT);
        let refusal = early.or_else(|| {
            pick.is_none().then(|| {
                (
                    "this server requires VeNCrypt (TLS); use an RFB 3.7 or newer client"
                        .to_owned(),
                    ConnError::Refused("RFB 3.3 client but TLS is required"),
                )
            })
        });
        if let Some((reason, err)) = refusal {
            s.write_all(&0u32.to_be_bytes()).await?;
            send_failure(&mut s, &reason).await?;
            return Err(err);
        }
        let pick = pick.unwrap_or(SEC_NONE);
        s.write_all(&u32::from(pick).to_be_bytes()).await?;
        pick
    } else {
        if let Some((reason, err)) = early {
            s.write_all(&[0]).await?;
            send_failure(&mut s, &reason).await?;
            return Err(err);
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
        Inner::None => Ok(None),
        Inner::Vnc => vnc_auth(&mut s, cfg).await?.map(|()| None),
        Inner::Plain => plain_auth(&mut s, cfg).await?,
    };
    let user = match outcome {
        Ok(user) => {
            if inner != Inner::None {
                cfg.auth.succeeded(peer.ip());
            }
            audit::login(cfg.protocol, peer, user.as_deref(), Login::Ok);
            if send_result {
                s.write_all(&0u32.to_be_bytes()).await?;
            }
            user
        }
        Err(reason) => {
            cfg.auth.failed(peer.ip());
            audit::login(cfg.protocol, peer, None, Login::Failed);
            s.write_all(&1u32.to_be_bytes()).await?;
            if version == Version::V3_8 {
                send_failure(&mut s, reason).await?;
            }
            s.flush().await?;
            return Err(ConnError::AuthFailed);
        }
    };

    let mut shared = [0u8; 1];
    s.read_exact(&mut shared).await?;
    Ok((s, shared[0] != 0, user))
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
    let subtypes: &[u32] = if cfg.auth.required() {
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
    let tls_stream = acceptor.accept(s).await.map_err(ConnError::Tls)?;
    debug!(subtype = chosen, "VeNCrypt TLS established");
    Ok((Box::new(tls_stream), inner))
}

/// VNC authentication (DES challenge-response). The outer error is I/O; the inner one a
/// failure reason for the client.
async fn vnc_auth(
    s: &mut Box<dyn Io>,
    cfg: &VncConfig,
) -> Result<Result<(), &'static str>, ConnError> {
    let password = cfg.auth.secret().unwrap_or_default();
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
) -> Result<Result<Option<String>, &'static str>, ConnError> {
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
    Ok(if cfg.auth.check(Some(user), pass) {
        Ok(Some(String::from_utf8_lossy(user).into_owned()))
    } else {
        Err("authentication failed")
    })
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
