//! The RFB client the tests share: the handshake (3.3, 3.7, 3.8 with security None or VNC
//! authentication), client messages, and a decoder for what our server sends (Raw, ZRLE,
//! CopyRect and the pseudo-encodings the tests ask for) that keeps the client's own copy of the
//! screen.
#![allow(dead_code)]

use flate2::{Decompress, FlushDecompress};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use vdi_sidecar::vnc::auth::vnc_response;

/// What ServerInit said.
#[derive(Debug, Clone)]
pub struct ServerInit {
    pub width: u16,
    pub height: u16,
    pub name: String,
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// A failure reason (u32 length + text), bounded.
pub async fn read_reason<S: AsyncRead + Unpin>(s: &mut S) -> String {
    let n = s.read_u32().await.unwrap_or(0).min(1024);
    let mut r = vec![0u8; n as usize];
    let _ = s.read_exact(&mut r).await;
    String::from_utf8_lossy(&r).into_owned()
}

/// ServerInit after ClientInit.
pub async fn server_init<S: AsyncRead + Unpin>(s: &mut S) -> Result<ServerInit, String> {
    let width = s.read_u16().await.map_err(err)?;
    let height = s.read_u16().await.map_err(err)?;
    let mut pf = [0u8; 16];
    s.read_exact(&mut pf).await.map_err(err)?;
    let name_len = s.read_u32().await.map_err(err)?.min(1 << 16);
    let mut name = vec![0u8; name_len as usize];
    s.read_exact(&mut name).await.map_err(err)?;
    Ok(ServerInit {
        width,
        height,
        name: String::from_utf8_lossy(&name).into_owned(),
    })
}

/// The handshake in `version` ("003.003", "003.007", "003.008") up to ServerInit, with the first
/// security type the server offers (None or VNC authentication with `password`); `Err(reason)`
/// when the server refuses.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    version: &str,
    password: Option<&str>,
    shared: bool,
) -> Result<ServerInit, String> {
    let mut v = [0u8; 12];
    s.read_exact(&mut v).await.map_err(err)?;
    assert_eq!(&v, b"RFB 003.008\n");
    s.write_all(format!("RFB {version}\n").as_bytes())
        .await
        .map_err(err)?;
    let sec = if version == "003.003" {
        let t = s.read_u32().await.map_err(err)?;
        if t == 0 {
            return Err(read_reason(s).await);
        }
        u8::try_from(t).map_err(err)?
    } else {
        let n = s.read_u8().await.map_err(err)?;
        if n == 0 {
            return Err(read_reason(s).await);
        }
        let mut types = vec![0u8; n as usize];
        s.read_exact(&mut types).await.map_err(err)?;
        // VNC authentication when a password is given and it is offered (a server with TLS
        // offers VeNCrypt first, which this client does not speak).
        let pick = if password.is_some() && types.contains(&2) {
            2
        } else {
            types[0]
        };
        s.write_all(&[pick]).await.map_err(err)?;
        pick
    };
    if sec == 2 {
        let mut ch = [0u8; 16];
        s.read_exact(&mut ch).await.map_err(err)?;
        s.write_all(&vnc_response(password.unwrap_or(""), &ch))
            .await
            .map_err(err)?;
    }
    if sec == 2 || version == "003.008" {
        let result = s.read_u32().await.map_err(err)?;
        if result != 0 {
            return Err(if version == "003.008" {
                read_reason(s).await
            } else {
                "failed".into()
            });
        }
    }
    s.write_all(&[u8::from(shared)]).await.map_err(err)?;
    server_init(s).await
}

/// SetEncodings.
pub async fn set_encodings<S: AsyncWrite + Unpin>(s: &mut S, encs: &[i32]) {
    let mut m = vec![2, 0];
    m.extend((encs.len() as u16).to_be_bytes());
    for e in encs {
        m.extend(e.to_be_bytes());
    }
    s.write_all(&m).await.expect("SetEncodings");
}

/// FramebufferUpdateRequest.
pub async fn request<S: AsyncWrite + Unpin>(
    s: &mut S,
    incremental: bool,
    x: u16,
    y: u16,
    w: u16,
    h: u16,
) {
    let mut m = vec![3, u8::from(incremental)];
    for v in [x, y, w, h] {
        m.extend(v.to_be_bytes());
    }
    s.write_all(&m).await.expect("request");
}

/// A client that keeps its own copy of the screen, as a viewer does.
pub struct Client {
    pub s: TcpStream,
    pub width: u16,
    pub height: u16,
    pub fb: Vec<u32>,
    pub z: Decompress,
    /// (reason, status) of the last ExtendedDesktopSize rectangle.
    pub last_eds: Option<(u16, u16)>,
    /// QEMU Pointer Motion Change: the pointer mode last announced.
    pub absolute: Option<bool>,
    /// QEMU LED state last announced.
    pub leds: Option<u8>,
    /// CopyRect rectangles received.
    pub copies: usize,
    /// Pixel data received (Raw and ZRLE payloads).
    pub bytes: usize,
    /// Open H.264 rectangles received, in order: (flags, Annex B bytes).
    pub h264: Vec<(u32, Vec<u8>)>,
    /// The encoding of each pixel rectangle received, in order.
    pub encodings: Vec<i32>,
}

impl Client {
    /// Handshake with `version` ("003.003", "003.007", "003.008"); `Err(reason)` on refusal.
    pub async fn connect(
        addr: std::net::SocketAddr,
        version: &str,
        password: Option<&str>,
    ) -> Result<Client, String> {
        let mut s = TcpStream::connect(addr).await.map_err(err)?;
        let init = handshake(&mut s, version, password, true).await?;
        let (width, height) = (init.width, init.height);
        Ok(Client {
            s,
            width,
            height,
            fb: vec![0; width as usize * height as usize],
            z: Decompress::new(true),
            last_eds: None,
            absolute: None,
            leds: None,
            copies: 0,
            bytes: 0,
            h264: Vec::new(),
            encodings: Vec::new(),
        })
    }

    pub async fn set_encodings(&mut self, encs: &[i32]) {
        set_encodings(&mut self.s, encs).await;
    }

    pub async fn request(&mut self, incremental: bool) {
        request(&mut self.s, incremental, 0, 0, self.width, self.height).await;
    }

    /// Reads one FramebufferUpdate into `fb`.
    pub async fn read_update(&mut self) {
        let t = self.s.read_u8().await.expect("message type");
        assert_eq!(t, 0, "expected FramebufferUpdate");
        self.s.read_u8().await.expect("pad");
        let n = self.s.read_u16().await.expect("count");
        for _ in 0..n {
            let x = self.s.read_u16().await.expect("x") as usize;
            let y = self.s.read_u16().await.expect("y") as usize;
            let w = self.s.read_u16().await.expect("w") as usize;
            let h = self.s.read_u16().await.expect("h") as usize;
            let enc = self.s.read_i32().await.expect("enc");
            if enc >= 0 {
                self.encodings.push(enc);
            }
            match enc {
                50 => {
                    // Open H.264: the whole screen; kept for the test to decode.
                    let len = self.s.read_u32().await.expect("len") as usize;
                    let flags = self.s.read_u32().await.expect("flags");
                    let mut data = vec![0u8; len];
                    self.s.read_exact(&mut data).await.expect("h264");
                    self.bytes += len;
                    self.h264.push((flags, data));
                }
                0 => {
                    let mut data = vec![0u8; w * h * 4];
                    self.s.read_exact(&mut data).await.expect("raw");
                    for (i, p) in data.chunks_exact(4).enumerate() {
                        self.fb[(y + i / w) * self.width as usize + x + i % w] =
                            u32::from_le_bytes([p[0], p[1], p[2], 0]);
                    }
                }
                16 => {
                    let len = self.s.read_u32().await.expect("len") as usize;
                    self.bytes += len;
                    let mut data = vec![0u8; len];
                    self.s.read_exact(&mut data).await.expect("zrle");
                    let mut raw = Vec::with_capacity(w * h * 4 + 4096);
                    self.z
                        .decompress_vec(&data, &mut raw, FlushDecompress::Sync)
                        .expect("inflate");
                    self.zrle_tiles(&raw, x, y, w, h);
                }
                1 => {
                    let sx = self.s.read_u16().await.expect("src x") as usize;
                    let sy = self.s.read_u16().await.expect("src y") as usize;
                    let stride = self.width as usize;
                    let src: Vec<u32> = (0..h)
                        .flat_map(|r| {
                            let at = (sy + r) * stride + sx;
                            self.fb[at..at + w].to_vec()
                        })
                        .collect();
                    for (r, row) in src.chunks_exact(w).enumerate() {
                        let at = (y + r) * stride + x;
                        self.fb[at..at + w].copy_from_slice(row);
                    }
                    self.copies += 1;
                }
                -258 => {} // QEMU extended key events confirmed
                -257 => self.absolute = Some(x == 1),
                -261 => self.leds = Some(self.s.read_u8().await.expect("led state")),
                -223 | -308 => {
                    if enc == -308 {
                        self.last_eds = Some((x as u16, y as u16));
                        let mut hdr = [0u8; 4];
                        self.s.read_exact(&mut hdr).await.expect("eds");
                        let mut screens = vec![0u8; 16 * hdr[0] as usize];
                        self.s.read_exact(&mut screens).await.expect("screens");
                    }
                    self.width = w as u16;
                    self.height = h as u16;
                    self.fb = vec![0; w * h];
                }
                other => panic!("unexpected encoding {other}"),
            }
        }
    }

    fn zrle_tiles(&mut self, raw: &[u8], x: usize, y: usize, w: usize, h: usize) {
        let mut r = raw;
        let stride = self.width as usize;
        let cp = |r: &mut &[u8]| {
            let v = u32::from_le_bytes([r[0], r[1], r[2], 0]);
            *r = &r[3..];
            v
        };
        for ty in (0..h).step_by(64) {
            for tx in (0..w).step_by(64) {
                let (tw, th) = (64.min(w - tx), 64.min(h - ty));
                let sub = r[0];
                r = &r[1..];
                let mut set = |xx: usize, yy: usize, v: u32| {
                    self.fb[(y + ty + yy) * stride + x + tx + xx] = v
                };
                match sub {
                    0 => (0..th).for_each(|yy| (0..tw).for_each(|xx| set(xx, yy, cp(&mut r)))),
                    1 => {
                        let c = cp(&mut r);
                        (0..th).for_each(|yy| (0..tw).for_each(|xx| set(xx, yy, c)));
                    }
                    n @ 2..=16 => {
                        let pal: Vec<u32> = (0..n).map(|_| cp(&mut r)).collect();
                        let bits = match n {
                            2 => 1,
                            3 | 4 => 2,
                            _ => 4,
                        };
                        for yy in 0..th {
                            for xx in 0..tw {
                                let bit = xx * bits;
                                let idx = (r[bit / 8] >> (8 - bits - bit % 8)) & ((1 << bits) - 1);
                                set(xx, yy, pal[idx as usize]);
                            }
                            r = &r[(tw * bits).div_ceil(8)..];
                        }
                    }
                    128 | 130..=255 => {
                        // Plain RLE (128) or palette RLE (130+: 128 + palette size).
                        let pal: Vec<u32> =
                            (0..sub.saturating_sub(128)).map(|_| cp(&mut r)).collect();
                        let mut i = 0;
                        while i < tw * th {
                            let (c, long) = if sub == 128 {
                                (cp(&mut r), true)
                            } else {
                                let b = r[0];
                                r = &r[1..];
                                (pal[usize::from(b & 127)], b & 128 != 0)
                            };
                            let mut len = 1;
                            if long {
                                loop {
                                    let b = r[0];
                                    r = &r[1..];
                                    len += usize::from(b);
                                    if b != 255 {
                                        break;
                                    }
                                }
                            }
                            for k in i..i + len {
                                set(k % tw, k / tw, c);
                            }
                            i += len;
                        }
                    }
                    other => panic!("subencoding {other} is not ZRLE"),
                }
            }
        }
    }
}

/// Connects (no password), enables QEMU audio in `sample` format 0..5, `channels`, `freq`.
pub async fn audio_client(
    addr: std::net::SocketAddr,
    sample: u8,
    channels: u8,
    freq: u32,
) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    handshake(&mut s, "003.008", None, true)
        .await
        .expect("handshake");
    set_encodings(&mut s, &[0, -259]).await;
    // The server confirms with a pseudo-rectangle before we may send audio messages.
    let mut ack = [0u8; 16];
    s.read_exact(&mut ack).await.expect("ack");
    assert_eq!(&ack[..4], &[0, 0, 0, 1]);
    assert_eq!(
        i32::from_be_bytes(ack[12..16].try_into().expect("enc")),
        -259
    );
    let mut fmt = vec![255, 1, 0, 2, sample, channels];
    fmt.extend_from_slice(&freq.to_be_bytes());
    s.write_all(&fmt).await.expect("set format");
    s.write_all(&[255, 1, 0, 0]).await.expect("enable");
    let mut begin = [0u8; 4];
    s.read_exact(&mut begin).await.expect("begin");
    assert_eq!(begin, [255, 1, 0, 1]);
    s
}

/// Reads audio data messages for `window`; returns the PCM bytes.
pub async fn listen_audio(mut s: TcpStream, window: std::time::Duration) -> Vec<u8> {
    let deadline = std::time::Instant::now() + window;
    let mut pcm = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let mut head = [0u8; 4];
        match tokio::time::timeout(left, s.read_exact(&mut head)).await {
            Ok(r) => r.expect("audio message"),
            Err(_) => return pcm,
        };
        assert_eq!(&head[..3], &[255, 1, 0], "{head:?}");
        if head[3] != 2 {
            continue;
        }
        let n = s.read_u32().await.expect("len") as usize;
        let start = pcm.len();
        pcm.resize(start + n, 0);
        s.read_exact(&mut pcm[start..]).await.expect("pcm");
    }
}
