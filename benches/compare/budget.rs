//! The sidecar inside the budget KubeVirt gives a hook sidecar on VMIs with dedicated CPUs:
//! 200m CPU and 64,000,000 bytes of memory. A real `vdi-sidecar bridge` runs in a cgroup (v1
//! `cpu` and `memory`, made here as root) while the guest animates full screen; viewers of
//! both servers at once; and 50 viewers without a cgroup to see what sharing saves.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::process::{Child, Command};

use crate::client::{self, Enc};
use crate::rdp;
use crate::stats::{self, Row, Table, median};
use crate::{Opts, Rig, alternate};

/// KubeVirt's sidecar resources for dedicated-CPU VMIs (requests = limits).
pub const MEMORY_LIMIT: u64 = 64_000_000;
pub const CPU_LIMIT: f64 = 0.2;

/// A cgroup (v1) of ours with a memory limit and a CPU quota, removed when dropped.
pub struct Cgroup {
    memory: PathBuf,
    cpu: PathBuf,
}

impl Cgroup {
    pub fn create(name: &str, memory: u64, cpus: f64) -> Result<Self> {
        let memory_dir = PathBuf::from("/sys/fs/cgroup/memory").join(name);
        let cpu_dir = PathBuf::from("/sys/fs/cgroup/cpu").join(name);
        for d in [&memory_dir, &cpu_dir] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let cg = Self {
            memory: memory_dir,
            cpu: cpu_dir,
        };
        let period = 100_000u64;
        cg.write_cpu("cpu.cfs_period_us", &period.to_string())?;
        cg.write_cpu(
            "cpu.cfs_quota_us",
            &((cpus * period as f64) as u64).to_string(),
        )?;
        cg.write_memory("memory.limit_in_bytes", &memory.to_string())?;
        // Swap would hide the limit: the limit on memory+swap is the same.
        let _ = cg.write_memory("memory.memsw.limit_in_bytes", &memory.to_string());
        Ok(cg)
    }

    fn write_memory(&self, file: &str, value: &str) -> Result<()> {
        std::fs::write(self.memory.join(file), value).with_context(|| format!("writing {file}"))
    }

    fn write_cpu(&self, file: &str, value: &str) -> Result<()> {
        std::fs::write(self.cpu.join(file), value).with_context(|| format!("writing {file}"))
    }

    fn read(&self, file: &str) -> u64 {
        std::fs::read_to_string(self.memory.join(file))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// `program` with `args`, to run inside the cgroup (it joins before it allocates anything:
    /// `sh` moves itself in, then execs the program in place).
    pub fn command(&self, program: &str, args: &[String]) -> Command {
        let script = format!(
            "echo $$ > {}/cgroup.procs && echo $$ > {}/cgroup.procs && exec \"$@\"",
            self.memory.display(),
            self.cpu.display()
        );
        let mut c = Command::new("sh");
        c.args(["-c", &script, "sh", program]).args(args);
        c
    }

    /// Peak memory since the last reset, in bytes.
    pub fn peak(&self) -> u64 {
        self.read("memory.max_usage_in_bytes")
    }

    pub fn reset_peak(&self) {
        let _ = self.write_memory("memory.max_usage_in_bytes", "0");
    }

    /// Times the limit was hit (the kernel reclaimed, or failed to charge).
    pub fn limit_hits(&self) -> u64 {
        self.read("memory.failcnt")
    }

    /// Processes the OOM killer killed in the cgroup.
    pub fn oom_kills(&self) -> u64 {
        std::fs::read_to_string(self.memory.join("memory.oom_control"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
            })
            .unwrap_or(0)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Empty once its processes are gone (kill_on_drop); rmdir may need a moment.
        for _ in 0..50 {
            let a = std::fs::remove_dir(&self.memory);
            let b = std::fs::remove_dir(&self.cpu);
            if (a.is_ok() || !self.memory.exists()) && (b.is_ok() || !self.cpu.exists()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A `vdi-sidecar bridge` on the rig's bus, listening for VNC on a free port, with the
/// allocator settings the sidecar image runs it with (see Containerfile).
pub async fn bridge(rig: &Rig, cgroup: Option<&Cgroup>) -> Result<(Child, SocketAddr)> {
    let port = free_port()?;
    let rdp = ["--rdp", "none"].map(String::from);
    let child = bridge_with(rig, cgroup, port, &rdp)?;
    Ok((child, SocketAddr::from(([127, 0, 0, 1], port))))
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The bridge with VNC on `port` and `extra` arguments.
fn bridge_with(rig: &Rig, cgroup: Option<&Cgroup>, port: u16, extra: &[String]) -> Result<Child> {
    let mut args: Vec<String> = [
        "bridge",
        "--dbus-address",
        &rig.bus_address,
        "--vnc",
        &format!("127.0.0.1:{port}"),
        "--http",
        "none",
        "--insecure-no-auth",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend_from_slice(extra);
    let exe = env!("CARGO_BIN_EXE_vdi-sidecar");
    let mut cmd = match cgroup {
        Some(cg) => cg.command(exe, &args),
        None => {
            let mut c = Command::new(exe);
            c.args(&args);
            c
        }
    };
    // VDI_BENCH_DEBUG=1: the bridge's log goes to /tmp/vdi-bench-bridge-<port>.log.
    let stderr = match std::env::var_os("VDI_BENCH_DEBUG") {
        Some(_) => Stdio::from(std::fs::File::create(format!(
            "/tmp/vdi-bench-bridge-{port}.log"
        ))?),
        None => Stdio::null(),
    };
    cmd
        // VDI_BENCH_LOG=debug (with VDI_BENCH_DEBUG=1): every Scanout and shared frame logged.
        .env(
            "VDI_LOG",
            std::env::var("VDI_BENCH_LOG").unwrap_or("warn".into()),
        )
        .env("MALLOC_ARENA_MAX", "2")
        .env(
            "MALLOC_MMAP_THRESHOLD_",
            std::env::var("VDI_BENCH_MMAP").unwrap_or("131072".into()),
        )
        .env(
            "MALLOC_TRIM_THRESHOLD_",
            std::env::var("VDI_BENCH_TRIM").unwrap_or("131072".into()),
        )
        // VDI_BENCH_GLIBC_TUNABLES: e.g. glibc.malloc.hugetlb=1 (THP for malloc's mmaps).
        .envs(std::env::var("VDI_BENCH_GLIBC_TUNABLES").map(|t| ("GLIBC_TUNABLES", t)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .context("vdi-sidecar bridge")
}

/// The bridge's own pid (under `sh -c … exec` it is the same process).
fn pid_of(child: &Child) -> Result<u32> {
    child.id().context("bridge pid")
}

/// Rows for the sidecar under 200m / 64M: per-viewer updates/s, peak memory and limit hits
/// for 1, 4 and 16 viewers of a full-screen animation, Tight+JPEG (noVNC) and ZRLE
/// (gtk-vnc), next to QEMU's own VNC with as many viewers (QEMU is not in the cgroup).
pub async fn rows(rig: &mut Rig, opts: &Opts, size: (u32, u32), table: &mut Table) -> Result<()> {
    let name = format!("vdi-bench-{}", std::process::id());
    let cg = match Cgroup::create(&name, MEMORY_LIMIT, CPU_LIMIT) {
        Ok(cg) => cg,
        Err(e) => {
            table.note(format!(
                "budget rows skipped: cannot make a cgroup ({e:#}); run as root on cgroup v1"
            ));
            return Ok(());
        }
    };
    let (mut child, addr) = bridge(rig, Some(&cg)).await?;
    let pid = pid_of(&child)?;
    client::wait_size(addr, size.0, size.1, Duration::from_secs(60)).await?;
    let saved = (rig.ours, rig.ours_pid);
    (rig.ours, rig.ours_pid) = (addr, pid);
    let viewer_counts: &[usize] = match (opts.full, std::env::var_os("VDI_BENCH_QUICK")) {
        (true, Some(_)) => &[1, 4],
        (true, None) => &[1, 4, 16],
        (false, _) => &[1, 2],
    };
    let sz = format!("{}x{}", size.0, size.1);
    let result = async {
        let window = Duration::from_secs_f64(opts.secs);
        // Tight as noVNC asks for it by default (the browser viewer a KubeVirt user gets), and
        // ZRLE as gtk-vnc does. VDI_BENCH_QUICK=1: Tight only, for trying settings.
        let quick = std::env::var_os("VDI_BENCH_QUICK").is_some();
        let encodings: &[Enc] = if quick {
            &[Enc::NoVnc]
        } else {
            &[Enc::NoVnc, Enc::Zrle]
        };
        for &enc in encodings {
            for &viewers in viewer_counts {
                cg.reset_peak();
                let hits0 = cg.limit_hits();
                if std::env::var_os("VDI_BENCH_DEBUG").is_some() {
                    eprintln!("budget row: {} x{viewers}", enc.name());
                }
                let label = |what: &str| {
                    format!(
                        "{what}, {}, {viewers} viewer(s), {sz}, 200m/64M",
                        enc.name()
                    )
                };
                let (us, them) = match alternate(rig, opts, "video", window, enc, viewers).await {
                    Ok(runs) => runs,
                    // An OOM kill is a result (a failed target), not a broken bench: report it
                    // and keep the rest of the table.
                    Err(e) if child.try_wait()?.is_some() => {
                        table.target(
                            label("never OOM-killed"),
                            false,
                            format!(
                                "the bridge died in this row ({e:#}; OOM kills: {})",
                                cg.oom_kills()
                            ),
                        );
                        table.note("budget rows stopped: the bridge died (see the targets)".into());
                        return anyhow::Ok(());
                    }
                    Err(e) => return Err(e),
                };
                let alive = child.try_wait()?.is_none();
                let min = |runs: &[client::Run]| {
                    median(
                        &runs
                            .iter()
                            .map(|r| r.per_viewer.iter().copied().fold(f64::INFINITY, f64::min))
                            .collect::<Vec<_>>(),
                    )
                };
                table.budget(
                    Row::other(label("updates/s per viewer, slowest"), "fps", true),
                    min(&us),
                    min(&them),
                );
                let peak = cg.peak() as f64 / 1e6;
                let hits = (cg.limit_hits() - hits0) as f64;
                table.budget_single(
                    Row::other(label("peak memory (limit 64 MB)"), "MB", false),
                    peak,
                );
                table.budget_single(Row::other(label("memory limit hits"), "", false), hits);
                let refused = us.iter().map(|r| r.refused).max().unwrap_or(0);
                table.budget_single(
                    Row::other(label("viewers refused or not served"), "", false),
                    refused as f64,
                );
                table.target(
                    label("never OOM-killed"),
                    alive && cg.oom_kills() == 0,
                    format!("alive: {alive}, OOM kills: {}", cg.oom_kills()),
                );
                if viewers == 4 {
                    table.target(
                        label("peak memory < 64 MB"),
                        peak < 64.0,
                        format!("{peak:.1} MB"),
                    );
                    if enc == Enc::NoVnc {
                        let slowest = min(&us);
                        table.target(
                            label("every viewer >= 10 updates/s"),
                            slowest >= 10.0 && refused == 0,
                            format!("{slowest:.1} updates/s, {refused} refused"),
                        );
                    }
                }
                if !alive {
                    table.note("budget rows stopped: the bridge died (see the targets)".into());
                    return anyhow::Ok(());
                }
            }
        }
        anyhow::Ok(())
    }
    .await;
    (rig.ours, rig.ours_pid) = saved;
    let _ = child.start_kill();
    let _ = child.wait().await;
    result
}

/// 50 viewers (no cgroup): how CPU grows with viewers when they share encodings, per-viewer
/// updates/s and RSS, next to QEMU's own VNC with as many.
pub async fn fifty(rig: &mut Rig, opts: &Opts, size: (u32, u32), table: &mut Table) -> Result<()> {
    let (mut child, addr) = bridge(rig, None).await?;
    let pid = pid_of(&child)?;
    client::wait_size(addr, size.0, size.1, Duration::from_secs(60)).await?;
    let saved = (rig.ours, rig.ours_pid);
    (rig.ours, rig.ours_pid) = (addr, pid);
    let many = if opts.full { 50 } else { 3 };
    let sz = format!("{}x{}", size.0, size.1);
    let result = async {
        let window = Duration::from_secs_f64(opts.secs);
        let one = Opts {
            rounds: 1,
            sizes: Vec::new(),
            ..*opts
        };
        let (us1, them1) = alternate(rig, &one, "video", window, Enc::Zrle, 1).await?;
        let (us, them) = alternate(rig, &one, "video", window, Enc::Zrle, many).await?;
        let cpu = |r: &client::Run| {
            if r.mine {
                r.our_cpu + r.qemu_cpu
            } else {
                r.qemu_cpu
            }
            .max(1e-3)
                / r.secs.max(1e-3)
        };
        let ratio = |a: &[client::Run], b: &[client::Run]| {
            median(&a.iter().map(cpu).collect::<Vec<_>>())
                / median(&b.iter().map(cpu).collect::<Vec<_>>())
        };
        let label = |what: &str| format!("{what}, ZRLE, {many} viewers, {sz}");
        let ours_ratio = ratio(&us, &us1);
        table.budget(
            Row::other(
                label(&format!("CPU of {many} viewers / CPU of 1")),
                "x",
                false,
            ),
            ours_ratio,
            ratio(&them, &them1),
        );
        let spread = |runs: &[client::Run], f: fn(&[f64]) -> f64| {
            median(&runs.iter().map(|r| f(&r.per_viewer)).collect::<Vec<_>>())
        };
        let lowest = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
        table.budget(
            Row::other(label("updates/s per viewer, slowest"), "fps", true),
            spread(&us, lowest),
            spread(&them, lowest),
        );
        table.budget(
            Row::other(label("updates/s per viewer, median"), "fps", true),
            spread(&us, median),
            spread(&them, median),
        );
        let rss = us.iter().map(|r| r.our_rss_kib).fold(0.0, f64::max) / 1024.0;
        table.budget_single(Row::other(label("RSS"), "MiB", false), rss);
        if opts.full {
            let slowest = spread(&us, lowest);
            table.target(
                label("every viewer >= 5 updates/s"),
                slowest >= 5.0,
                format!("{slowest:.1}"),
            );
            table.target(label("RSS < 256 MiB"), rss < 256.0, format!("{rss:.1} MiB"));
            table.target(
                label("CPU(50) <= 5 x CPU(1)"),
                ours_ratio <= 5.0,
                format!("{ours_ratio:.2} x"),
            );
        }
        anyhow::Ok(())
    }
    .await;
    (rig.ours, rig.ours_pid) = saved;
    let _ = child.start_kill();
    let _ = child.wait().await;
    result
}

/// H.264 under the budget: one `vdi-sidecar bridge` in the 200m/64M cgroup serving RDP clients
/// the shared AVC420 stream (FreeRDP, outside the cgroup) and noVNC-like viewers Open H.264,
/// while the guest plays full-screen video. The bar: one RDP viewer >= 10 fps.
pub async fn h264_rows(
    rig: &mut Rig,
    opts: &Opts,
    (w, h): (u32, u32),
    table: &mut Table,
) -> Result<()> {
    let name = format!("vdi-bench-h264-{}", std::process::id());
    let cg = match Cgroup::create(&name, MEMORY_LIMIT, CPU_LIMIT) {
        Ok(cg) => cg,
        Err(e) => {
            table.note(format!(
                "H.264 budget rows skipped: cannot make a cgroup ({e:#}); run as root on cgroup v1"
            ));
            return Ok(());
        }
    };
    let (vnc_port, rdp_port, metrics_port) = (free_port()?, free_port()?, free_port()?);
    // No password (the measuring VNC clients log in with None), so RDP runs TLS security.
    let extra = [
        "--rdp".into(),
        format!("127.0.0.1:{rdp_port}"),
        "--rdp-security".into(),
        "tls".into(),
        "--metrics".into(),
        format!("127.0.0.1:{metrics_port}"),
    ];
    let mut child = bridge_with(rig, Some(&cg), vnc_port, &extra)?;
    let pid = pid_of(&child)?;
    let vnc = SocketAddr::from(([127, 0, 0, 1], vnc_port));
    let rdp_addr = SocketAddr::from(([127, 0, 0, 1], rdp_port));
    let metrics = SocketAddr::from(([127, 0, 0, 1], metrics_port));
    client::wait_size(vnc, w, h, Duration::from_secs(60)).await?;
    let saved = (rig.ours, rig.ours_pid);
    (rig.ours, rig.ours_pid) = (vnc, pid);
    let sz = format!("{w}x{h}");
    let window = Duration::from_secs_f64(opts.secs);
    let result = async {
        let (display, _xvfb) = rdp::xvfb(w, h)?;
        let counts: &[usize] = if opts.full { &[1, 4] } else { &[1] };
        for &n in counts {
            let label =
                |what: &str| format!("{what}, RDP GFX H.264, {n} viewer(s), video, {sz}, 200m/64M");
            cg.reset_peak();
            let hits0 = cg.limit_hits();
            let (mut fps, mut kib, mut cores) = (Vec::new(), Vec::new(), Vec::new());
            // H.264 pictures the shared encoder made while measured: none when the encoder
            // does not fit the memory limit (the clients then get bitmaps).
            let mut pictures = 0;
            for _ in 0..opts.rounds {
                let (length, _base) = rig
                    .start_scene("video", window, 2, Duration::from_secs(25))
                    .await?;
                let clients = (0..n)
                    .map(|_| rdp::freerdp(rdp_addr, &display, w, h, &["/gfx:AVC420", "/sec:tls"]))
                    .collect::<Result<Vec<_>>>()?;
                let run = async {
                    let frames = || Ok(scrape(metrics)?.0);
                    rdp::wait_frames(frames, 2 * n as u64, Duration::from_secs(60)).await?;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let ((f0, b0, p0), c0) = (scrape(metrics)?, stats::cpu_of(pid)?);
                    let t0 = std::time::Instant::now();
                    tokio::time::sleep(window).await;
                    let ((f1, b1, p1), c1) = (scrape(metrics)?, stats::cpu_of(pid)?);
                    pictures += p1 - p0;
                    anyhow::Ok((f1 - f0, b1 - b0, c1 - c0, t0.elapsed().as_secs_f64()))
                };
                let got = run.await;
                drop(clients);
                rig.finish_scene(length).await?;
                match got {
                    Ok((frames, bytes, cpu, secs)) => {
                        let frames = frames as f64;
                        fps.push(frames / secs / n as f64);
                        kib.push(bytes as f64 / frames.max(1.0) / 1024.0);
                        cores.push(cpu / secs);
                    }
                    // The bridge died (a failed target, reported below), or its endpoint did
                    // not answer: the row says so instead of losing the whole table.
                    Err(e) => {
                        table.note(format!("H.264 budget row with {n} viewer(s): {e:#}"));
                        break;
                    }
                }
                if child.try_wait()?.is_some() {
                    break;
                }
            }
            let alive = child.try_wait()?.is_none();
            let fps = median(&fps);
            table.budget_single(Row::other(label("frames/s per viewer"), "fps", true), fps);
            table.budget_single(
                Row::other(label("KiB per frame"), "KiB", false),
                median(&kib),
            );
            table.budget_single(
                Row::other(label("sidecar CPU"), "cores", false),
                median(&cores),
            );
            table.budget_single(
                Row::other(label("peak memory (limit 64 MB)"), "MB", false),
                cg.peak() as f64 / 1e6,
            );
            table.budget_single(
                Row::other(label("memory limit hits"), "", false),
                (cg.limit_hits() - hits0) as f64,
            );
            table.budget_single(
                Row::other(label("H.264 pictures encoded"), "", false),
                pictures as f64,
            );
            table.target(
                label("never OOM-killed"),
                alive && cg.oom_kills() == 0,
                format!("alive: {alive}, OOM kills: {}", cg.oom_kills()),
            );
            if n == 1 {
                table.target(
                    label(">= 10 fps as H.264"),
                    fps >= 10.0 && pictures > 0,
                    format!("{fps:.1} fps, {pictures} H.264 pictures"),
                );
            }
            if !alive {
                table.note("H.264 budget rows stopped: the bridge died (see the targets)".into());
                return anyhow::Ok(());
            }
        }
        // The browser: Open H.264 for noVNC viewers, from the same shared stream.
        for &n in counts {
            let (us, them) = alternate(rig, opts, "video", window, Enc::H264, n).await?;
            let slowest = |runs: &[client::Run]| {
                median(
                    &runs
                        .iter()
                        .map(|r| r.per_viewer.iter().copied().fold(f64::INFINITY, f64::min))
                        .collect::<Vec<_>>(),
                )
            };
            let label = |what: &str| {
                format!(
                    "{what}, {}, {n} viewer(s), {sz}, 200m/64M",
                    Enc::H264.name()
                )
            };
            table.budget(
                Row::other(label("updates/s per viewer, slowest"), "fps", true),
                slowest(&us),
                slowest(&them),
            );
            let share = median(
                &us.iter()
                    .map(|r| 100.0 * r.h264_updates / r.updates.max(1.0))
                    .collect::<Vec<_>>(),
            );
            table.budget_single(
                Row::other(label("share of updates as H.264"), "%", false),
                share,
            );
        }
        anyhow::Ok(())
    }
    .await;
    (rig.ours, rig.ours_pid) = saved;
    let _ = child.start_kill();
    let _ = child.wait().await;
    result
}

/// RDP frames and bytes sent, from the bridge's Prometheus endpoint (a second try after a
/// failed one: the bridge is starved for CPU in its cgroup).
/// RDP updates and bytes sent, and the shared stream's H.264 pictures, from `/metrics`.
fn scrape(at: SocketAddr) -> Result<(u64, u64, u64)> {
    scrape_once(at).or_else(|_| {
        std::thread::sleep(Duration::from_millis(200));
        scrape_once(at)
    })
}

fn scrape_once(at: SocketAddr) -> Result<(u64, u64, u64)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(at)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let sample = |name: &str, rdp: bool| -> u64 {
        text.lines()
            .filter(|l| l.starts_with(name) && (!rdp || l.contains("protocol=\"rdp\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    Ok((
        sample("vdi_updates_total{", true),
        sample("vdi_sent_bytes_total{", true),
        sample("vdi_h264_frames_total{", false),
    ))
}
