//! First rough VNC comparison: our server (over QEMU's D-Bus display) against QEMU's own
//! in-process `-vnc` server, on the same VM in the same run, while the test guest animates full
//! screen. A measuring client asks for updates back to back (incremental requests, as viewers
//! do) and counts what arrives; rounds alternate between the servers and the table gives medians.
//!
//! Run: `cargo run --release --example vnc_fps [-- SECONDS_PER_WINDOW ROUNDS]` (needs QEMU 10 with
//! the D-Bus display and the guest from tests/guest/build.sh).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use vdi_sidecar::demo::{DemoConfig, run};
use vdi_sidecar::vnc::conn::VncConfig;

const WIDTH: u32 = 800;
const HEIGHT: u32 = 600;

#[derive(Clone, Copy)]
enum Enc {
    Zrle,
    Tight,
}

impl Enc {
    fn name(self) -> &'static str {
        match self {
            Enc::Zrle => "ZRLE",
            Enc::Tight => "Tight (lossless)",
        }
    }
    fn list(self) -> Vec<i32> {
        match self {
            Enc::Zrle => vec![16, -223, -250],
            Enc::Tight => vec![7, -223, -250], // compress level 6, no quality level: lossless
        }
    }
}

/// One window of measurement.
struct Sample {
    fps: f64,
    bytes_per_update: f64,
    /// Server CPU per update, ms (ours: this process; QEMU's: its process minus idle baseline).
    cpu_ms_per_update: f64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let secs: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(8);
    let rounds: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(3);

    let out = std::process::Command::new("tests/guest/build.sh")
        .output()
        .context("running tests/guest/build.sh (run from the repository root)")?;
    let guest = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .map(str::to_owned)
        .context("guest build printed nothing")?;

    let ours = free_port(5700)?;
    let theirs = free_port(5900)?;
    let stop = CancellationToken::new();
    let cfg = DemoConfig {
        kernel: format!("{guest}/vmlinuz").into(),
        initrd: format!("{guest}/initrd.gz").into(),
        qemu: "qemu-system-x86_64".into(),
        viewers: vdi_sidecar::viewers::Viewers {
            vnc: Some((
                SocketAddr::from(([127, 0, 0, 1], ours)),
                Arc::new(VncConfig::new(None, "bench")),
            )),
            rdp: None,
            web: None,
        },
        width: WIDTH,
        height: HEIGHT,
        extra_qemu_args: vec!["-vnc".into(), format!("127.0.0.1:{}", theirs - 5900)],
        guest_commands: vec!["animate 10000000".into()],
    };
    let demo = tokio::spawn(run(cfg, stop.clone()));
    let ours = SocketAddr::from(([127, 0, 0, 1], ours));
    let theirs = SocketAddr::from(([127, 0, 0, 1], theirs));
    // Wait until both servers show the animating guest at full size.
    let qemu_pid = wait_ready(ours, theirs).await?;
    eprintln!("guest animating; QEMU pid {qemu_pid}; {rounds} rounds of {secs} s per server");

    let window = Duration::from_secs(secs);
    let mut table = Vec::new();
    for enc in [Enc::Zrle, Enc::Tight] {
        let (mut us, mut them) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let idle = cpu_of(qemu_pid)?;
            tokio::time::sleep(window).await;
            let idle_per_s = (cpu_of(qemu_pid)? - idle) / window.as_secs_f64();
            us.push(measure(ours, enc, window, None, 0.0).await?);
            them.push(measure(theirs, enc, window, Some(qemu_pid), idle_per_s).await?);
        }
        table.push((enc, summarize(&us), summarize(&them)));
    }
    stop.cancel();
    let _ = demo.await;

    println!(
        "\nVNC, {WIDTH}x{HEIGHT} guest animating full screen (TCG), {rounds} x {secs} s windows, medians"
    );
    println!(
        "{:<18} {:<14} {:>8} {:>14} {:>16}",
        "encoding", "server", "fps", "KiB/update", "CPU ms/update"
    );
    for (enc, a, b) in &table {
        for (who, s) in [("vdi-sidecar", a), ("QEMU -vnc", b)] {
            println!(
                "{:<18} {:<14} {:>8.1} {:>14.1} {:>16.2}",
                enc.name(),
                who,
                s.fps,
                s.bytes_per_update / 1024.0,
                s.cpu_ms_per_update
            );
        }
        println!(
            "{:<18} {:<14} {:>8.2} {:>14.2} {:>16.2}",
            "",
            "ratio us/QEMU",
            a.fps / b.fps,
            a.bytes_per_update / b.bytes_per_update,
            a.cpu_ms_per_update / b.cpu_ms_per_update
        );
    }
    Ok(())
}

fn free_port(from: u16) -> Result<u16> {
    (from..from + 100)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .context("no free port")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn summarize(s: &[Sample]) -> Sample {
    Sample {
        fps: median(s.iter().map(|x| x.fps).collect()),
        bytes_per_update: median(s.iter().map(|x| x.bytes_per_update).collect()),
        cpu_ms_per_update: median(s.iter().map(|x| x.cpu_ms_per_update).collect()),
    }
}

/// CPU seconds (user + system) used so far by `pid` (0: this process).
fn cpu_of(pid: u32) -> Result<f64> {
    let path = if pid == 0 {
        "/proc/self/stat".to_owned()
    } else {
        format!("/proc/{pid}/stat")
    };
    let stat = std::fs::read_to_string(&path).with_context(|| path.clone())?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    Ok(ticks / 100.0)
}

fn qemu_pid() -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let cmd = String::from_utf8_lossy(&cmd);
        (cmd.contains("qemu-system") && cmd.contains("vdi-demo")).then_some(pid)
    })
}

async fn wait_ready(ours: SocketAddr, theirs: SocketAddr) -> Result<u32> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if Instant::now() > deadline {
            bail!("the guest never came up on both servers");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (Ok(a), Ok(b)) = (
            measure(ours, Enc::Zrle, Duration::from_millis(500), None, 0.0).await,
            measure(theirs, Enc::Zrle, Duration::from_millis(500), None, 0.0).await,
        ) else {
            continue;
        };
        if a.fps > 2.0 && b.fps > 2.0 {
            return qemu_pid().context("QEMU process not found");
        }
    }
}

/// Connects (security None), asks for updates back to back for `window`, counts them.
async fn measure(
    addr: SocketAddr,
    enc: Enc,
    window: Duration,
    qemu: Option<u32>,
    qemu_idle_per_s: f64,
) -> Result<Sample> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let mut v = [0u8; 12];
    s.read_exact(&mut v).await?;
    s.write_all(b"RFB 003.008\n").await?;
    let n = s.read_u8().await?;
    let mut types = vec![0; n.into()];
    s.read_exact(&mut types).await?;
    if !types.contains(&1) {
        bail!("{addr}: security None not offered");
    }
    s.write_all(&[1]).await?;
    if s.read_u32().await? != 0 {
        bail!("{addr}: refused");
    }
    s.write_all(&[1]).await?;
    let mut init = [0u8; 24];
    s.read_exact(&mut init).await?;
    let (w, h) = (
        u16::from_be_bytes([init[0], init[1]]),
        u16::from_be_bytes([init[2], init[3]]),
    );
    let name_len = u32::from_be_bytes([init[20], init[21], init[22], init[23]]);
    let mut name = vec![0; name_len as usize];
    s.read_exact(&mut name).await?;
    // 32 bpp, depth 24, little-endian, red at 16: both servers' native format.
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
    let request = |inc: u8| {
        let mut r = vec![3, inc, 0, 0, 0, 0];
        r.extend_from_slice(&w.to_be_bytes());
        r.extend_from_slice(&h.to_be_bytes());
        r
    };
    s.write_all(&request(0)).await?;
    // The first (full) update is not counted.
    let mut reader = Reader::new(s);
    reader.update().await?;
    let cpu0 = (cpu_of(0)?, qemu.map(cpu_of).transpose()?);
    let start = Instant::now();
    let (mut updates, mut bytes) = (0u64, 0u64);
    while start.elapsed() < window {
        reader.s.write_all(&request(1)).await?;
        let remaining = window.saturating_sub(start.elapsed());
        match tokio::time::timeout(remaining, reader.update()).await {
            Ok(r) => {
                bytes += r?;
                updates += 1;
            }
            Err(_) => break,
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = match (qemu, cpu0.1) {
        (Some(pid), Some(q0)) => cpu_of(pid)? - q0 - qemu_idle_per_s * secs,
        _ => cpu_of(0)? - cpu0.0,
    };
    let per = updates.max(1) as f64;
    Ok(Sample {
        fps: updates as f64 / secs,
        bytes_per_update: bytes as f64 / per,
        cpu_ms_per_update: cpu.max(0.0) * 1000.0 / per,
    })
}

/// Reads FramebufferUpdates, skipping their payload by each encoding's framing.
struct Reader {
    s: TcpStream,
}

impl Reader {
    fn new(s: TcpStream) -> Self {
        Self { s }
    }

    /// One update; returns its size in bytes.
    async fn update(&mut self) -> Result<u64> {
        let t = self.s.read_u8().await?;
        if t != 0 {
            bail!("unexpected server message {t}");
        }
        self.s.read_u8().await?;
        let n = self.s.read_u16().await?;
        let mut total = 4u64;
        for _ in 0..n {
            let mut hdr = [0u8; 12];
            self.s.read_exact(&mut hdr).await?;
            total += 12;
            let w = usize::from(u16::from_be_bytes([hdr[4], hdr[5]]));
            let h = usize::from(u16::from_be_bytes([hdr[6], hdr[7]]));
            let e = i32::from_be_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
            total += match e {
                0 => self.skip(w * h * 4).await?,
                16 => {
                    let len = self.s.read_u32().await? as usize;
                    4 + self.skip(len).await?
                }
                7 => self.tight(w, h).await?,
                -223 | -224 => 0,
                other => bail!("unexpected encoding {other}"),
            };
        }
        Ok(total)
    }

    async fn skip(&mut self, n: usize) -> Result<u64> {
        let mut buf = vec![0u8; n];
        self.s.read_exact(&mut buf).await?;
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
