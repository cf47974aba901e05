//! Guest sound over VNC (QEMU Audio pseudo-encoding -259), ours against QEMU's `-vnc …,audiodev`:
//! the latency from the guest being told to play to the first audible samples at a viewer (the
//! same guest and clock for both servers, so the difference is what our D-Bus hop and server
//! add), and the CPU one audio viewer costs each server per second of sound.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::stats::{self, Row, Table, median};
use crate::{Opts, Rig};

fn unix_micros() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0)
}

/// A measuring audio viewer in a child process; it prints `ready`, then `onset MICROS` when
/// sound starts after a silence.
struct Listener {
    child: Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Listener {
    async fn start(addr: SocketAddr) -> Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["client", "audio", &addr.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let out = child.stdout.take().context("stdout")?;
        let mut l = Self {
            child,
            lines: BufReader::new(out).lines(),
        };
        let first = l.next(Duration::from_secs(10)).await?;
        if first != "ready" {
            bail!("audio client: {first}");
        }
        Ok(l)
    }

    async fn next(&mut self, timeout: Duration) -> Result<String> {
        tokio::time::timeout(timeout, self.lines.next_line())
            .await
            .context("audio client timed out")??
            .context("audio client ended")
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Onset latency (ms) of `n` short tones at the viewer on `addr`.
async fn onsets(rig: &mut Rig, addr: SocketAddr, n: usize) -> Result<Vec<f64>> {
    let mut l = Listener::start(addr).await?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let t0 = unix_micros();
        rig.guest.send("tone 1000 150").await?;
        let line = l
            .next(Duration::from_secs(10))
            .await
            .with_context(|| format!("{addr}: tone {i} never heard"))?;
        let at: u128 = line
            .strip_prefix("onset ")
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("audio client: {line}"))?;
        out.push(at.saturating_sub(t0) as f64 / 1000.0);
        rig.guest.wait_for("tone", Duration::from_secs(10)).await?;
        // Silence long enough for the next onset to count, jittered.
        tokio::time::sleep(Duration::from_millis(400 + (i as u64 * 37) % 100)).await;
    }
    Ok(out)
}

/// CPU seconds (ours: this process; QEMU: its non-vCPU threads) while the guest plays `secs`.
async fn cpu_during_tone(rig: &mut Rig, secs: f64) -> Result<(f64, f64)> {
    let (a0, b0) = (stats::cpu_of(rig.ours_pid)?, stats::qemu_cpu(rig.qemu_pid)?);
    let ms = (secs * 1000.0) as u64;
    rig.guest
        .cmd(&format!("tone 1000 {ms}"), "tone")
        .await
        .context("tone")?;
    Ok((
        stats::cpu_of(rig.ours_pid)? - a0,
        stats::qemu_cpu(rig.qemu_pid)? - b0,
    ))
}

pub async fn rows(rig: &mut Rig, opts: &Opts, table: &mut Table) -> Result<()> {
    let (mut us, mut them) = (Vec::new(), Vec::new());
    for round in 0..opts.rounds {
        for mine in if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        } {
            let addr = if mine { rig.ours } else { rig.theirs };
            let got = onsets(rig, addr, opts.samples.max(3)).await?;
            if mine { &mut us } else { &mut them }.extend(got);
        }
    }
    table.pair_values(
        Row::other(
            "audio onset, guest play → viewer, S16 48 kHz".into(),
            "ms",
            false,
        ),
        median(&us),
        median(&them),
    );
    // Marginal CPU of one audio viewer: the same tone with and without one, per server.
    let secs = opts.secs.max(1.0) * 2.0;
    let (mut cost_us, mut cost_them) = (Vec::new(), Vec::new());
    for _ in 0..opts.rounds {
        let (idle_us, idle_them) = cpu_during_tone(rig, secs).await?;
        let l = Listener::start(rig.ours).await?;
        let (with_us, _) = cpu_during_tone(rig, secs).await?;
        drop(l);
        let l = Listener::start(rig.theirs).await?;
        let (_, with_them) = cpu_during_tone(rig, secs).await?;
        drop(l);
        cost_us.push((with_us - idle_us).max(0.0) * 1000.0 / secs);
        cost_them.push((with_them - idle_them).max(0.0) * 1000.0 / secs);
    }
    table.pair_values(
        Row::other(
            "audio CPU per second of sound, 1 viewer".into(),
            "ms",
            false,
        ),
        median(&cost_us),
        median(&cost_them),
    );
    if opts.rdp {
        sound_wait_rows(rig, opts, table).await?;
    }
    Ok(())
}

/// How long guest sound waits inside our server between QEMU's `Write` and the client's
/// socket: RDP (40 ms waves, Opus, FreeRDP) next to our VNC (each chunk as it comes).
async fn sound_wait_rows(rig: &mut Rig, opts: &Opts, table: &mut Table) -> Result<()> {
    let (display, _xvfb) = crate::rdp::xvfb(640, 480)?;
    {
        let _client = crate::rdp::freerdp(rig.rdp, &display, 640, 480, &["/sound:sys:fake"])?;
        // Logged in and the sound channel negotiated.
        tokio::time::sleep(Duration::from_secs(6)).await;
        for _ in 0..opts.rounds {
            rig.guest.cmd("tone 1000 2000", "tone").await?;
        }
    }
    let (rdp_mean, rdp_max, waves) = rig.rdp_cfg.stats.audio_wait.summary();
    let (vnc_mean, vnc_max, chunks) = rig.vnc_cfg.stats.audio_wait.summary();
    if waves == 0 || chunks == 0 {
        bail!("no sound measured (RDP waves {waves}, VNC chunks {chunks})");
    }
    table.rdp(
        Row::other(
            "sound waiting in our server, mean (Opus)".into(),
            "ms",
            false,
        ),
        rdp_mean,
        vnc_mean,
    );
    table.rdp(
        Row::other(
            "sound waiting in our server, max (Opus)".into(),
            "ms",
            false,
        ),
        rdp_max,
        vnc_max,
    );
    Ok(())
}

/// `compare client audio ADDR`: enables QEMU audio (S16 stereo 48 kHz) and reports onsets.
pub async fn child(addr: SocketAddr) -> Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    let mut b = [0u8; 12];
    s.read_exact(&mut b).await?;
    s.write_all(b"RFB 003.008\n").await?;
    let n = s.read_u8().await?;
    let mut types = vec![0u8; usize::from(n)];
    s.read_exact(&mut types).await?;
    if !types.contains(&1) {
        bail!("{addr}: no security type None");
    }
    s.write_all(&[1]).await?;
    if s.read_u32().await? != 0 {
        bail!("{addr}: security refused");
    }
    s.write_all(&[1]).await?;
    let mut init = [0u8; 24];
    s.read_exact(&mut init).await?;
    let name_len = u32::from_be_bytes([init[20], init[21], init[22], init[23]]);
    let mut name = vec![0; name_len.min(4096) as usize];
    s.read_exact(&mut name).await?;
    let mut m = vec![2, 0, 0, 2];
    m.extend_from_slice(&0i32.to_be_bytes());
    m.extend_from_slice(&(-259i32).to_be_bytes());
    s.write_all(&m).await?;
    // The server acknowledges with a one-rectangle update carrying the pseudo-encoding.
    let mut ack = [0u8; 16];
    s.read_exact(&mut ack).await?;
    if i32::from_be_bytes([ack[12], ack[13], ack[14], ack[15]]) != -259 {
        bail!("{addr}: no audio acknowledgement: {ack:?}");
    }
    let mut fmt = vec![255, 1, 0, 2, 3, 2];
    fmt.extend_from_slice(&48_000u32.to_be_bytes());
    s.write_all(&fmt).await?;
    s.write_all(&[255, 1, 0, 0]).await?;
    println!("ready");
    let mut last_loud: Option<Instant> = None;
    let mut pcm = Vec::new();
    loop {
        match s.read_u8().await? {
            255 => {
                let mut h = [0u8; 3];
                s.read_exact(&mut h).await?;
                if h != [1, 0, 2] {
                    continue; // begin / end
                }
                let len = s.read_u32().await? as usize;
                pcm.resize(len.min(1 << 22), 0);
                s.read_exact(&mut pcm).await?;
                let loud = pcm
                    .chunks_exact(2)
                    .any(|b| i16::from_le_bytes([b[0], b[1]]).unsigned_abs() > 3000);
                if loud {
                    if last_loud.is_none_or(|t| t.elapsed() > Duration::from_millis(250)) {
                        println!("onset {}", unix_micros());
                    }
                    last_loud = Some(Instant::now());
                }
            }
            2 => {} // bell
            3 => {
                let mut h = [0u8; 7];
                s.read_exact(&mut h).await?;
                let n = u32::from_be_bytes([h[3], h[4], h[5], h[6]]);
                tokio::io::copy(&mut (&mut s).take(u64::from(n)), &mut tokio::io::sink()).await?;
            }
            other => bail!("{addr}: unexpected message {other}"),
        }
    }
}
