//! The measuring RFB client. It speaks the same requests to both servers (security None,
//! 32 bpp little-endian, one encoding plus DesktopSize) and asks for updates back to back, as
//! viewers do. Measurements run in child processes (`compare client …`) so their CPU is theirs.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::Command;

use crate::stats;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Enc {
    Zrle,
    TightJpeg,
    /// Tight with noVNC's default settings (quality level 6, compression level 2).
    NoVnc,
    /// What noVNC >= 1.6 lists in a browser with WebCodecs: Open H.264 first, then its Tight.
    H264,
    Raw,
}

impl Enc {
    pub fn name(self) -> &'static str {
        match self {
            Enc::Zrle => "ZRLE",
            Enc::TightJpeg => "Tight+JPEG q8",
            Enc::NoVnc => "Tight+JPEG q6 (noVNC)",
            Enc::H264 => "Open H.264 + Tight (noVNC, WebCodecs)",
            Enc::Raw => "Raw",
        }
    }

    fn arg(self) -> &'static str {
        match self {
            Enc::Zrle => "zrle",
            Enc::TightJpeg => "tight",
            Enc::NoVnc => "novnc",
            Enc::H264 => "h264",
            Enc::Raw => "raw",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "zrle" => Enc::Zrle,
            "tight" => Enc::TightJpeg,
            "novnc" => Enc::NoVnc,
            "h264" => Enc::H264,
            "raw" => Enc::Raw,
            _ => bail!("unknown encoding {s}"),
        })
    }

    fn list(self) -> Vec<i32> {
        let mut v = match self {
            Enc::Zrle => vec![16],
            // Tight, JPEG quality level 8 (-32 + 8), compression level 6 (-256 + 6).
            Enc::TightJpeg => vec![7, -24, -250],
            // noVNC's defaults: quality 6 (-32 + 6), compression 2 (-256 + 2).
            Enc::NoVnc => vec![7, -26, -254],
            Enc::H264 => vec![50, 7, -26, -254],
            Enc::Raw => vec![0],
        };
        v.push(-223); // DesktopSize
        v
    }
}

/// One measured window of one server, with `viewers` clients at once.
#[derive(Debug, Default, Clone)]
pub struct Run {
    /// Updates received, summed over the viewers.
    pub updates: f64,
    pub bytes: f64,
    pub secs: f64,
    /// CPU seconds of our process in the window (only counted for our server).
    pub our_cpu: f64,
    /// CPU seconds QEMU spent above its no-client baseline.
    pub qemu_cpu: f64,
    pub our_rss_kib: f64,
    pub qemu_rss_kib: f64,
    pub mine: bool,
    pub viewers: usize,
    /// Updates per second each admitted viewer saw.
    pub per_viewer: Vec<f64>,
    /// Viewers the server turned away (over its memory limit) or never served a first screen.
    pub refused: usize,
    /// Updates that came as Open H.264, summed over the viewers.
    pub h264_updates: f64,
}

impl Run {
    /// Updates per second one viewer sees.
    pub fn fps(&self) -> f64 {
        self.updates / self.viewers.max(1) as f64 / self.secs.max(1e-9)
    }
    pub fn kib_per_update(&self) -> f64 {
        self.bytes / self.updates.max(1.0) / 1024.0
    }
    /// Server CPU seconds per 1000 updates: ours is our process plus what QEMU spends feeding
    /// it; QEMU's is what its process spends above the baseline with its client attached.
    pub fn cpu_per_1000(&self) -> f64 {
        let cpu = if self.mine {
            self.our_cpu + self.qemu_cpu
        } else {
            self.qemu_cpu
        };
        cpu.max(0.0) / self.updates.max(1.0) * 1000.0
    }
}

/// A server under measurement: where it listens, its process (0: this one), and whether it is
/// ours (its own CPU counts) or QEMU's.
#[derive(Clone, Copy)]
pub struct Server {
    pub addr: SocketAddr,
    pub pid: u32,
    pub mine: bool,
}

/// Runs `viewers` child clients against `server` for `window` and measures the server side.
pub async fn measure(
    server: Server,
    enc: Enc,
    window: Duration,
    viewers: usize,
    qemu_pid: u32,
    base: &stats::Baseline,
) -> Result<Run> {
    let Server {
        addr,
        pid: our_pid,
        mine,
    } = server;
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for _ in 0..viewers {
        let mut c = Command::new(&exe)
            .args(["client", "stream", &addr.to_string(), enc.arg()])
            .arg(window.as_secs_f64().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let out = BufReader::new(c.stdout.take().context("stdout")?).lines();
        children.push((c, out));
    }
    let mut refused = 0;
    let first_by = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut admitted = Vec::with_capacity(children.len());
    for (mut c, mut out) in children {
        // A viewer not served its first screen within a minute counts as turned away (a
        // starved viewer is a result, not a broken run).
        let Ok(line) = tokio::time::timeout_at(first_by, out.next_line()).await else {
            refused += 1;
            let _ = c.start_kill();
            continue;
        };
        let line = line?.unwrap_or_default();
        if line.starts_with("refused") {
            refused += 1;
            let _ = c.wait().await;
            continue;
        }
        if line != "ready" {
            bail!("client: {line}");
        }
        admitted.push((c, out));
    }
    let mut children = admitted;
    if children.is_empty() {
        bail!("{addr}: all {viewers} viewers were refused");
    }
    let (cpu0, q0) = (stats::cpu_of(our_pid)?, stats::qemu_cpu(qemu_pid)?);
    let t0 = Instant::now();
    for (c, _) in &mut children {
        c.stdin
            .as_mut()
            .context("stdin")?
            .write_all(b"go\n")
            .await?;
    }
    let mut run = Run {
        mine,
        viewers: children.len(),
        refused,
        ..Run::default()
    };
    // Sample memory while the clients run.
    let sampler = async {
        let (mut ours, mut qemu) = (0u64, 0u64);
        loop {
            ours = ours.max(stats::rss_kib(our_pid).unwrap_or(0));
            qemu = qemu.max(stats::rss_kib(qemu_pid).unwrap_or(0));
            tokio::time::sleep(Duration::from_millis(100)).await;
            if t0.elapsed() > window {
                return (ours, qemu);
            }
        }
    };
    let (ours_rss, qemu_rss) = sampler.await;
    for (mut c, mut out) in children {
        let line = tokio::time::timeout(window + Duration::from_secs(30), out.next_line())
            .await
            .context("client never reported")??
            .unwrap_or_default();
        let f: Vec<f64> = line
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        if f.len() != 4 {
            bail!("client: {line}");
        }
        run.updates += f[0];
        run.h264_updates += f[3];
        run.bytes += f[1];
        run.secs = run.secs.max(f[2]);
        run.per_viewer.push(f[0] / f[2].max(1e-9));
        let _ = c.wait().await;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    run.our_cpu = stats::cpu_of(our_pid)? - cpu0;
    run.qemu_cpu = stats::qemu_cpu(qemu_pid)? - q0 - base.qemu_cpu_per_s * elapsed;
    run.our_rss_kib = ours_rss as f64;
    run.qemu_rss_kib = qemu_rss as f64;
    Ok(run)
}

/// Key-to-pixel latency samples (ms) from a child client. `first` numbers the first key press
/// across the whole run: presses alternate between two keys, so every press changes the box
/// (QEMU's server compares pixels and would send nothing for a repaint in the same colour).
/// Where a key's pixels are looked for.
#[derive(Clone, Copy, Debug)]
pub struct Region {
    pub x: u16,
    pub y: u16,
    pub w: u16,
    pub h: u16,
}

/// The test guest's key box (`keybox on`) at the top left.
pub const KEYBOX: Region = Region {
    x: 0,
    y: 0,
    w: 64,
    h: 64,
};

impl Region {
    fn arg(self) -> String {
        format!("{},{},{},{}", self.x, self.y, self.w, self.h)
    }

    fn parse(s: &str) -> Result<Self> {
        let v: Vec<u16> = s
            .split(',')
            .map(str::parse)
            .collect::<std::result::Result<_, _>>()?;
        match v[..] {
            [x, y, w, h] => Ok(Self { x, y, w, h }),
            _ => bail!("region is X,Y,W,H: {s}"),
        }
    }
}

pub async fn latency(
    addr: SocketAddr,
    samples: usize,
    first: usize,
    watch: Region,
) -> Result<Vec<f64>> {
    let exe = std::env::current_exe()?;
    let out = Command::new(&exe)
        .args(["client", "latency", &addr.to_string(), &samples.to_string()])
        .arg(first.to_string())
        .arg(watch.arg())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await?;
    if !out.status.success() {
        bail!(
            "latency client: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect())
}

/// Waits until `addr` announces a `w`x`h` desktop.
pub async fn wait_size(addr: SocketAddr, w: u32, h: u32, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Ok(c)) =
            tokio::time::timeout(Duration::from_secs(5), Rfb::connect(addr, Enc::Raw)).await
            && (u32::from(c.w), u32::from(c.h)) == (w, h)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{addr} never showed {w}x{h}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// `compare client stream ADDR ENC SECS` / `compare client latency ADDR N FIRST X,Y,W,H`.
pub fn child_main(args: &[String]) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let addr: SocketAddr = args.get(1).context("address")?.parse()?;
    match args.first().map(String::as_str) {
        Some("stream") => {
            let enc = Enc::parse(args.get(2).context("encoding")?)?;
            let secs: f64 = args.get(3).context("seconds")?.parse()?;
            rt.block_on(stream(addr, enc, Duration::from_secs_f64(secs)))
        }
        Some("latency") => {
            let n: usize = args.get(2).context("samples")?.parse()?;
            let first: usize = args.get(3).context("first key")?.parse()?;
            let watch = Region::parse(args.get(4).context("region")?)?;
            let got = rt.block_on(key_to_pixel(addr, n, first, watch))?;
            let s: Vec<String> = got.iter().map(|v| format!("{v:.2}")).collect();
            println!("{}", s.join(" "));
            Ok(())
        }
        Some("audio") => rt.block_on(crate::audio::child(addr)),
        _ => bail!("client stream|latency|audio …"),
    }
}

async fn stream(addr: SocketAddr, enc: Enc, window: Duration) -> Result<()> {
    let mut c = match Rfb::connect(addr, enc).await {
        Ok(c) => c,
        Err(e) if e.downcast_ref::<Refused>().is_some() => {
            println!("{e}");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    c.request(false).await?;
    c.update().await?;
    println!("ready");
    let mut go = String::new();
    // Nothing else runs on this client's thread while it waits for the start signal.
    std::io::stdin().read_line(&mut go)?;
    let start = Instant::now();
    let (mut updates, mut bytes, mut h264) = (0u64, 0u64, 0u64);
    while start.elapsed() < window {
        c.request(true).await?;
        let remaining = window.saturating_sub(start.elapsed());
        match tokio::time::timeout(remaining, c.update()).await {
            Ok(u) => {
                let u = u?;
                bytes += u.bytes;
                h264 += u64::from(u.h264);
                updates += 1;
            }
            Err(_) => break,
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!("{updates} {bytes} {secs} {h264}");
    Ok(())
}

/// Presses `a` / `b` in turn (the guest paints its top-left 64x64 box in a colour derived from
/// the key) and times until an update touching that box has arrived in full.
async fn key_to_pixel(addr: SocketAddr, n: usize, first: usize, watch: Region) -> Result<Vec<f64>> {
    let mut c = Rfb::connect(addr, Enc::Zrle).await?;
    c.request(false).await?;
    c.update().await?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        // Quiet first: nothing else may be changing when the key goes down (a few seconds at
        // most: a screen that never settles is measured anyway).
        for _ in 0..20 {
            c.request(true).await?;
            match tokio::time::timeout(Duration::from_millis(300), c.update()).await {
                Ok(u) => {
                    u?;
                }
                Err(_) => break,
            }
        }
        // The incremental request from the quiet loop is still outstanding (or the last
        // update answered it: ask again, harmlessly).
        c.request(true).await?;
        let key: u32 = if (first + i).is_multiple_of(2) {
            0x61
        } else {
            0x62
        };
        let t0 = Instant::now();
        c.key(key, true).await?;
        c.key(key, false).await?;
        loop {
            let u = tokio::time::timeout(Duration::from_secs(5), c.update())
                .await
                .with_context(|| format!("{addr}: the pixels of key {i} never came"))??;
            if u.touches(watch) {
                out.push(t0.elapsed().as_secs_f64() * 1000.0);
                break;
            }
            c.request(true).await?;
        }
        // Jitter so the samples do not lock onto a server's refresh timer.
        tokio::time::sleep(Duration::from_millis(20 + (i as u64 * 37) % 60)).await;
    }
    Ok(out)
}

pub struct Update {
    pub bytes: u64,
    rects: Vec<(u16, u16, u16, u16)>,
    /// Whether a rectangle came as Open H.264.
    pub h264: bool,
}

impl Update {
    fn touches(&self, r: Region) -> bool {
        let Region { x, y, w, h } = r;
        self.rects
            .iter()
            .any(|&(rx, ry, rw, rh)| rx < x + w && x < rx + rw && ry < y + h && y < ry + rh)
    }
}

/// The server turned the viewer away, for this reason.
#[derive(Debug, thiserror::Error)]
#[error("refused: {0}")]
pub struct Refused(pub String);

/// A minimal RFB 3.8 client that reads every update in full and keeps its framing honest.
pub struct Rfb {
    s: TcpStream,
    pub w: u16,
    pub h: u16,
}

impl Rfb {
    pub async fn connect(addr: SocketAddr, enc: Enc) -> Result<Self> {
        let mut s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let mut v = [0u8; 12];
        s.read_exact(&mut v).await?;
        s.write_all(b"RFB 003.008\n").await?;
        let n = s.read_u8().await?;
        if n == 0 {
            // A refusal (the sidecar over its memory limit): its reason follows.
            let len = s.read_u32().await?.min(4096);
            let mut reason = vec![0; len as usize];
            s.read_exact(&mut reason).await?;
            return Err(Refused(String::from_utf8_lossy(&reason).into_owned()).into());
        }
        let mut types = vec![0; n.into()];
        s.read_exact(&mut types).await?;
        if !types.contains(&1) {
            bail!("{addr}: security None not offered");
        }
        s.write_all(&[1]).await?;
        if s.read_u32().await? != 0 {
            bail!("{addr}: refused");
        }
        s.write_all(&[1]).await?; // shared
        let mut init = [0u8; 24];
        s.read_exact(&mut init).await?;
        let w = u16::from_be_bytes([init[0], init[1]]);
        let h = u16::from_be_bytes([init[2], init[3]]);
        let name_len = u32::from_be_bytes([init[20], init[21], init[22], init[23]]);
        if name_len > 4096 {
            bail!("{addr}: desktop name of {name_len} bytes");
        }
        let mut name = vec![0; name_len as usize];
        s.read_exact(&mut name).await?;
        // 32 bpp, depth 24, little-endian, true colour, red at 16: both servers' native format.
        s.write_all(&[
            0, 0, 0, 0, 32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0,
        ])
        .await?;
        let list = enc.list();
        let mut m = vec![2, 0];
        m.extend_from_slice(&(list.len() as u16).to_be_bytes());
        for e in &list {
            m.extend_from_slice(&e.to_be_bytes());
        }
        s.write_all(&m).await?;
        Ok(Self { s, w, h })
    }

    pub async fn request(&mut self, incremental: bool) -> Result<()> {
        let mut r = vec![3, u8::from(incremental), 0, 0, 0, 0];
        r.extend_from_slice(&self.w.to_be_bytes());
        r.extend_from_slice(&self.h.to_be_bytes());
        self.s.write_all(&r).await?;
        Ok(())
    }

    async fn key(&mut self, keysym: u32, down: bool) -> Result<()> {
        let mut m = vec![4, u8::from(down), 0, 0];
        m.extend_from_slice(&keysym.to_be_bytes());
        self.s.write_all(&m).await?;
        Ok(())
    }

    /// Reads the next FramebufferUpdate (skipping bells and cut text).
    pub async fn update(&mut self) -> Result<Update> {
        loop {
            match self.s.read_u8().await? {
                0 => break,
                2 => continue, // Bell
                3 => {
                    let mut hdr = [0u8; 7];
                    self.s.read_exact(&mut hdr).await?;
                    let len = u32::from_be_bytes([hdr[3], hdr[4], hdr[5], hdr[6]]);
                    self.skip(len as usize).await?;
                }
                t => bail!("unexpected server message {t}"),
            }
        }
        self.s.read_u8().await?;
        let n = self.s.read_u16().await?;
        let mut u = Update {
            bytes: 4,
            rects: Vec::with_capacity(n.into()),
            h264: false,
        };
        for _ in 0..n {
            let mut hdr = [0u8; 12];
            self.s.read_exact(&mut hdr).await?;
            u.bytes += 12;
            let x = u16::from_be_bytes([hdr[0], hdr[1]]);
            let y = u16::from_be_bytes([hdr[2], hdr[3]]);
            let w = u16::from_be_bytes([hdr[4], hdr[5]]);
            let h = u16::from_be_bytes([hdr[6], hdr[7]]);
            let e = i32::from_be_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
            let (wu, hu) = (usize::from(w), usize::from(h));
            u.bytes += match e {
                0 => self.skip(wu * hu * 4).await?,
                16 => {
                    let len = self.s.read_u32().await? as usize;
                    4 + self.skip(len).await?
                }
                7 => self.tight(wu, hu).await?,
                // Open H.264: length, flags, then the Annex B bytes.
                50 => {
                    u.h264 = true;
                    let len = self.s.read_u32().await? as usize;
                    let _flags = self.s.read_u32().await?;
                    8 + self.skip(len).await?
                }
                -223 => {
                    (self.w, self.h) = (w, h);
                    0
                }
                other => bail!("unexpected encoding {other}"),
            };
            if e != -223 {
                u.rects.push((x, y, w, h));
            }
        }
        Ok(u)
    }

    async fn skip(&mut self, n: usize) -> Result<u64> {
        let mut left = n;
        let mut buf = [0u8; 64 * 1024];
        while left > 0 {
            let k = left.min(buf.len());
            self.s.read_exact(&mut buf[..k]).await?;
            left -= k;
        }
        Ok(n as u64)
    }

    async fn compact_len(&mut self) -> Result<(usize, u64)> {
        let mut n = 0usize;
        for i in 0..3 {
            let b = self.s.read_u8().await?;
            n |= usize::from(if i == 2 { b } else { b & 0x7f }) << (7 * i);
            if b & 0x80 == 0 || i == 2 {
                return Ok((n, i as u64 + 1));
            }
        }
        Ok((n, 3))
    }

    /// Tight framing for 24-bit TPIXELs (rfbproto "Tight Encoding").
    async fn tight(&mut self, w: usize, h: usize) -> Result<u64> {
        let ctl = self.s.read_u8().await?;
        let mut total = 1;
        match ctl >> 4 {
            8 => return Ok(total + self.skip(3).await?),
            9 => {
                let (len, n) = self.compact_len().await?;
                return Ok(total + n + self.skip(len).await?);
            }
            k if k > 9 => bail!("unsupported Tight control {ctl:#x}"),
            _ => {}
        }
        let mut raw = w * h * 3;
        if ctl & 0x40 != 0 {
            let filter = self.s.read_u8().await?;
            total += 1;
            if filter == 1 {
                let colours = usize::from(self.s.read_u8().await?) + 1;
                total += 1 + self.skip(colours * 3).await?;
                raw = if colours == 2 {
                    w.div_ceil(8) * h
                } else {
                    w * h
                };
            }
        }
        if raw < 12 {
            return Ok(total + self.skip(raw).await?);
        }
        let (len, n) = self.compact_len().await?;
        Ok(total + n + self.skip(len).await?)
    }
}
