//! RDP rows: FreeRDP 3 under Xvfb against our RDP server, next to our VNC path in the same
//! scene. Frames and bytes are the server's own counters; latency is read off FreeRDP's window
//! (XTEST key in, one pixel polled with GetImage), so it includes FreeRDP's decoding and drawing.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use x11rb::connection::Connection;
use x11rb::protocol::xproto::{AtomEnum, ConnectionExt as _, ImageFormat, InputFocus, MapState};
use x11rb::protocol::xtest::ConnectionExt as _;

use crate::client::{self, Enc};
use crate::stats::{self, Row, Table, median};
use crate::{Opts, RDP_PASSWORD, Rig};

/// Kills the child when dropped.
pub struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub async fn rows(rig: &mut Rig, opts: &Opts, (w, h): (u32, u32), table: &mut Table) -> Result<()> {
    let size = &format!("{w}x{h}");
    let (display, _xvfb) = xvfb(w, h)?;
    let window = Duration::from_secs_f64(opts.secs);
    let modes: [(&str, &[&str]); 3] = [
        ("H.264 AVC420 over GFX (FreeRDP defaults)", &[]),
        ("RemoteFX (-gfx +rfx)", &["-gfx", "+rfx"]),
        ("lossless bitmaps (-gfx)", &["-gfx"]),
    ];
    let scenes: &[&str] = if opts.full {
        &["video", "scroll", "desktop"]
    } else {
        &["video"]
    };
    for &scene in scenes {
        // (KiB per frame, fps) of each mode in this scene, for the targets.
        let mut got = Vec::new();
        for (name, flags) in modes {
            let (mut rdp, mut vnc) = (Vec::new(), Vec::new());
            for _ in 0..opts.rounds {
                let (length, base) = rig
                    .start_scene(scene, window, 3, Duration::from_secs(15))
                    .await?;
                {
                    let _client = freerdp(rig.rdp, &display, w, h, flags)?;
                    wait_frames(rig_frames(rig), 2, Duration::from_secs(30)).await?;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    rdp.push(measure(rig, window, &base).await?);
                }
                vnc.push(
                    client::measure(
                        client::Server {
                            addr: rig.ours,
                            pid: rig.ours_pid,
                            mine: true,
                        },
                        Enc::Zrle,
                        window,
                        1,
                        rig.qemu_pid,
                        &base,
                    )
                    .await?,
                );
                rig.finish_scene(length).await?;
            }
            let med =
                |v: &[RdpRun], f: fn(&RdpRun) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
            let vmed = |f: fn(&client::Run) -> f64| median(&vnc.iter().map(f).collect::<Vec<_>>());
            let fps = med(&rdp, RdpRun::fps);
            let kib = med(&rdp, |r| r.bytes / r.frames.max(1.0) / 1024.0);
            table.rdp(
                Row::other(format!("fps, {scene}, {name}, {size}"), "fps", true),
                fps,
                vmed(client::Run::fps),
            );
            table.rdp(
                Row::other(
                    format!("KiB per frame, {scene}, {name}, {size}"),
                    "KiB",
                    false,
                ),
                kib,
                vmed(client::Run::kib_per_update),
            );
            table.rdp(
                Row::other(
                    format!("CPU per 1000 frames, {scene}, {name}, {size}"),
                    "s",
                    false,
                ),
                med(&rdp, |r| r.cpu().max(0.0) / r.frames.max(1.0) * 1000.0),
                vmed(client::Run::cpu_per_1000),
            );
            got.push((kib, fps));
        }
        if scene == "video" {
            let ((gfx_kib, gfx_fps), (rfx_kib, rfx_fps)) = (got[0], got[1]);
            table.target(
                format!("RDP GFX AVC420 <= 1/3 of RemoteFX's bytes per frame, video, {size}"),
                gfx_kib * 3.0 <= rfx_kib,
                format!(
                    "{gfx_kib:.1} vs {rfx_kib:.1} KiB ({:.2}x)",
                    gfx_kib / rfx_kib.max(1e-9)
                ),
            );
            table.target(
                format!("RDP GFX AVC420 fps >= RemoteFX's, video, {size}"),
                gfx_fps >= rfx_fps,
                format!("{gfx_fps:.1} vs {rfx_fps:.1} fps"),
            );
        }
    }

    shared_encoder_rows(rig, opts, (w, h), table).await?;

    // Latency: the guest idle on its test image, FreeRDP (defaults) against our VNC client.
    rig.guest.cmd("fill 2", "fill").await?;
    let rdp_ms = {
        let _client = freerdp(rig.rdp, &display, w, h, &[])?;
        wait_frames(rig_frames(rig), 1, Duration::from_secs(30)).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let display = display.clone();
        let (n, first) = (opts.samples, rig.keys);
        rig.keys += n;
        tokio::task::spawn_blocking(move || key_to_pixel(&display, n, first)).await??
    };
    let vnc_ms = client::latency(rig.ours, opts.samples, rig.keys, client::KEYBOX).await?;
    rig.keys += opts.samples;
    table.rdp(
        Row::other(
            format!("key-to-pixel median, H.264 (FreeRDP defaults), {size}"),
            "ms",
            false,
        ),
        median(&rdp_ms),
        median(&vnc_ms),
    );
    table.rdp(
        Row::other(
            format!("key-to-pixel p95, H.264 (FreeRDP defaults), {size}"),
            "ms",
            false,
        ),
        stats::p95(&rdp_ms),
        stats::p95(&vnc_ms),
    );
    Ok(())
}

/// CPU of the sidecar (this process) with 1 and with `MANY` H.264 clients of the same video:
/// one shared encoding, so the second must stay near the first. FreeRDP's own decoding runs
/// in its processes and is not counted; on 2 cores it slows everything, so the rows also say
/// what each client got.
async fn shared_encoder_rows(
    rig: &mut Rig,
    opts: &Opts,
    (w, h): (u32, u32),
    table: &mut Table,
) -> Result<()> {
    const MANY: usize = 8;
    let size = &format!("{w}x{h}");
    let window = Duration::from_secs_f64(opts.secs);
    // Small client windows: FreeRDP scales nothing, but eight 1080p X windows cost the X
    // server more than our encoder.
    let mut runs: Vec<(usize, Vec<RdpRun>, Vec<f64>)> = Vec::new();
    for n in [1, MANY] {
        let (display, _xvfb) = xvfb(w, h)?;
        let mut v = Vec::new();
        let mut encode = Vec::new();
        for _ in 0..opts.rounds {
            let (length, base) = rig
                .start_scene(
                    "video",
                    window + Duration::from_secs(8),
                    3,
                    Duration::from_secs(30),
                )
                .await?;
            let clients = (0..n)
                .map(|_| freerdp(rig.rdp, &display, w, h, &["/gfx:AVC420"]))
                .collect::<Result<Vec<_>>>()?;
            wait_frames(rig_frames(rig), 2 * n as u64, Duration::from_secs(60)).await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let vs = rig.video.stats();
            let e0 = vs.encode_ns.load(Ordering::Relaxed);
            v.push(measure(rig, window, &base).await?);
            encode.push((vs.encode_ns.load(Ordering::Relaxed) - e0) as f64 / 1e9);
            drop(clients);
            rig.finish_scene(length).await?;
        }
        runs.push((n, v, encode));
    }
    let med =
        |v: &[RdpRun], f: &dyn Fn(&RdpRun) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
    let (one, many) = (&runs[0], &runs[1]);
    // The sidecar (this process) alone: QEMU's share does not depend on the viewers here.
    let ours = |v: &[RdpRun]| med(v, &|r| r.our_cpu.max(0.0) / r.secs);
    let with_qemu = |v: &[RdpRun]| med(v, &|r| r.cpu().max(0.0) / r.secs);
    table.rdp(
        Row::other(
            format!("sidecar CPU, video, H.264, {MANY} vs 1 clients, {size}"),
            "cores",
            false,
        ),
        ours(&many.1),
        ours(&one.1),
    );
    table.rdp(
        Row::other(
            format!("sidecar+QEMU CPU, video, H.264, {MANY} vs 1 clients, {size}"),
            "cores",
            false,
        ),
        with_qemu(&many.1),
        with_qemu(&one.1),
    );
    let ratio = ours(&many.1) / ours(&one.1).max(1e-9);
    table.target(
        format!("sidecar CPU with {MANY} H.264 clients <= 1.5x one, {size}"),
        ratio <= 1.5,
        format!(
            "{ratio:.2}x ({:.2} vs {:.2} cores; frames/s per client {:.1} vs {:.1})",
            ours(&many.1),
            ours(&one.1),
            med(&many.1, &|r| r.fps() / MANY as f64),
            med(&one.1, &RdpRun::fps),
        ),
    );
    table.rdp(
        Row::other(
            format!("frames/s per client, video, H.264, {MANY} vs 1 clients, {size}"),
            "fps",
            true,
        ),
        med(&many.1, &|r| r.frames / r.secs / MANY as f64),
        med(&one.1, &|r| r.frames / r.secs),
    );
    table.rdp(
        Row::other(
            format!("encoder CPU per second, H.264, {MANY} vs 1 clients, {size}"),
            "s",
            false,
        ),
        median(&many.2) / opts.secs,
        median(&one.2) / opts.secs,
    );
    Ok(())
}

pub struct RdpRun {
    pub frames: f64,
    pub bytes: f64,
    pub secs: f64,
    /// CPU seconds of the sidecar in the window.
    pub our_cpu: f64,
    /// CPU seconds QEMU spent above its no-client baseline.
    pub qemu_cpu: f64,
}

impl RdpRun {
    /// Frames per second, summed over the clients.
    pub fn fps(&self) -> f64 {
        self.frames / self.secs.max(1e-9)
    }

    /// The sidecar and what QEMU spends feeding it (each never below 0: QEMU's baseline is a
    /// separate window and can exceed what it spent in this one).
    pub fn cpu(&self) -> f64 {
        self.our_cpu.max(0.0) + self.qemu_cpu.max(0.0)
    }
}

async fn measure(rig: &Rig, window: Duration, base: &stats::Baseline) -> Result<RdpRun> {
    let s = &rig.rdp_cfg.stats;
    let (f0, b0) = (
        s.updates.load(Ordering::Relaxed),
        s.bytes_out.load(Ordering::Relaxed),
    );
    let (c0, q0) = (stats::cpu_of(0)?, stats::qemu_cpu(rig.qemu_pid)?);
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let secs = t0.elapsed().as_secs_f64();
    Ok(RdpRun {
        frames: (s.updates.load(Ordering::Relaxed) - f0) as f64,
        bytes: (s.bytes_out.load(Ordering::Relaxed) - b0) as f64,
        secs,
        our_cpu: stats::cpu_of(0)? - c0,
        qemu_cpu: stats::qemu_cpu(rig.qemu_pid)? - q0 - base.qemu_cpu_per_s * secs,
    })
}

/// Waits until the server has sent `n` more frames (the first is the full frame after login).
pub async fn wait_frames(
    frames: impl Fn() -> Result<u64>,
    n: u64,
    timeout: Duration,
) -> Result<()> {
    let f0 = frames()?;
    let deadline = Instant::now() + timeout;
    while frames()? < f0 + n {
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(freerdp_log()).unwrap_or_default();
            bail!("FreeRDP never received frames:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// The in-process RDP server's frame counter.
fn rig_frames(rig: &Rig) -> impl Fn() -> Result<u64> + '_ {
    || Ok(rig.rdp_cfg.stats.updates.load(Ordering::Relaxed))
}

pub fn freerdp(
    server: std::net::SocketAddr,
    display: &str,
    w: u32,
    h: u32,
    flags: &[&str],
) -> Result<Killed> {
    Ok(Killed(
        Command::new("xfreerdp3")
            .arg(format!("/v:{server}"))
            .args(["/u:vdi", &format!("/p:{RDP_PASSWORD}"), "/cert:ignore"])
            .arg(format!("/size:{w}x{h}"))
            .args(["/title:vdi-bench", "/log-level:WARN"])
            .args(flags)
            .env("DISPLAY", display)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(freerdp_log())?)
            .spawn()
            .context("xfreerdp3 (install freerdp3-x11 from bookworm-backports)")?,
    ))
}

fn freerdp_log() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("vdi-bench-freerdp-{}.log", std::process::id()))
}

pub fn xvfb(w: u32, h: u32) -> Result<(String, Killed)> {
    let n = (90..140)
        .find(|n| !std::path::Path::new(&format!("/tmp/.X11-unix/X{n}")).exists())
        .context("no free X display")?;
    let display = format!(":{n}");
    let child = Command::new("Xvfb")
        .args([
            &display,
            "-screen",
            "0",
            &format!("{w}x{h}x24"),
            "-nolisten",
            "tcp",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("Xvfb")?;
    let xvfb = Killed(child);
    let sock = format!("/tmp/.X11-unix/X{n}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::path::Path::new(&sock).exists() {
        if Instant::now() > deadline {
            bail!("Xvfb did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((display, xvfb))
}

/// Presses `a` / `b` in turn through XTEST into FreeRDP's window and polls the pixel in the
/// middle of the guest's key box until its colour changes.
fn key_to_pixel(display: &str, n: usize, first: usize) -> Result<Vec<f64>> {
    let (conn, screen) = x11rb::connect(Some(display))?;
    let root = conn.setup().roots[screen].root;
    let (win, x, y) = find_window(&conn, root)?;
    conn.set_input_focus(InputFocus::POINTER_ROOT, win, x11rb::CURRENT_TIME)?;
    conn.flush()?;
    let pixel = |conn: &x11rb::rust_connection::RustConnection| -> Result<Vec<u8>> {
        Ok(conn
            .get_image(ImageFormat::Z_PIXMAP, root, x + 32, y + 32, 1, 1, !0)?
            .reply()?
            .data)
    };
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        std::thread::sleep(Duration::from_millis(200 + (i as u64 * 37) % 60));
        let before = pixel(&conn)?;
        // X keycodes of `a` and `b` (evdev codes + 8).
        let code = if (first + i).is_multiple_of(2) {
            38
        } else {
            56
        };
        let t0 = Instant::now();
        conn.xtest_fake_input(2, code, 0, root, 0, 0, 0)?;
        conn.xtest_fake_input(3, code, 0, root, 0, 0, 0)?;
        conn.flush()?;
        loop {
            if pixel(&conn)? != before {
                out.push(t0.elapsed().as_secs_f64() * 1000.0);
                break;
            }
            if t0.elapsed() > Duration::from_secs(5) {
                bail!("FreeRDP never showed the key's pixels");
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }
    Ok(out)
}

fn find_window(
    conn: &x11rb::rust_connection::RustConnection,
    root: u32,
) -> Result<(u32, i16, i16)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for w in conn.query_tree(root)?.reply()?.children {
            if conn.get_window_attributes(w)?.reply()?.map_state != MapState::VIEWABLE {
                continue;
            }
            let name = conn
                .get_property(false, w, AtomEnum::WM_NAME, AtomEnum::ANY, 0, 256)?
                .reply()?;
            if String::from_utf8_lossy(&name.value).contains("vdi-bench") {
                let t = conn.translate_coordinates(w, root, 0, 0)?.reply()?;
                return Ok((w, t.dst_x, t.dst_y));
            }
        }
        if Instant::now() > deadline {
            bail!("no FreeRDP window");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
