//! vdi-sidecar against QEMU's own VNC server: one VM, one run, the same measuring client.
//!
//! The test guest boots once under TCG with both QEMU's in-process `-vnc` and `-display dbus` on
//! our bus. This process is "ours": it runs the display source and our VNC and RDP servers (the
//! same library code as `vdi-sidecar bridge`), so its CPU and RSS are our cost. Measuring clients
//! are child processes (this binary with `client …`), so their work is never counted as ours.
//! Rounds alternate between the servers and every row is a median.
//!
//! `cargo bench --bench compare` runs the full table; `cargo test` runs it as a smoke test
//! (small mode, one short round: the table must come out complete, nothing is timed).
//! Options after `--`: `--secs N` (window), `--rounds N`, `--samples N` (latency),
//! `--sizes 1280x800,1920x1080`, `--no-rdp`, `--memory-only`, `--audio-only`, `--budget-only`,
//! `--rdp-only`, `--browser-only`, `--h264-only` (RDP, browser and budget H.264 rows),
//! `--desktop-only` (key-to-pixel on the Debian desktop guest; the full run ends with it).

mod audio;
mod browser;
mod budget;
mod client;
mod guest;
mod rdp;
mod resets;
mod stats;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use vdi_sidecar::bus::{Bus, BusConfig};
use vdi_sidecar::qemu::source::{self, SourceOptions};
use vdi_sidecar::rdp::RdpConfig;
use vdi_sidecar::session::auth::Auth;
use vdi_sidecar::tls::{TlsIdentity, default_names};
use vdi_sidecar::viewers::Viewers;
use vdi_sidecar::vnc::VncConfig;

use client::{Enc, Run};
use guest::Guest;
use stats::{Row, Table, median, p95};

const RDP_PASSWORD: &str = "bench-pass1";

struct Opts {
    full: bool,
    secs: f64,
    rounds: usize,
    samples: usize,
    sizes: Vec<(u32, u32)>,
    rdp: bool,
    /// Only the memory rows (at the last size).
    memory_only: bool,
    audio_only: bool,
    budget_only: bool,
    latency_only: bool,
    rdp_only: bool,
    browser_only: bool,
    /// Only key-to-pixel on the desktop guest.
    desktop_only: bool,
    /// Every H.264 row: RDP modes, browser, budget.
    h264_only: bool,
}

impl Opts {
    fn parse(args: &[String]) -> Result<Self> {
        // `cargo bench` passes --bench; `cargo test` runs harness-less benches without it.
        let full = args.iter().any(|a| a == "--bench");
        let mut o = if full {
            Opts {
                full,
                secs: 6.0,
                rounds: 3,
                samples: 60,
                sizes: vec![(1280, 800), (1920, 1080)],
                rdp: true,
                memory_only: false,
                audio_only: false,
                budget_only: false,
                latency_only: false,
                rdp_only: false,
                browser_only: false,
                desktop_only: false,
                h264_only: false,
            }
        } else {
            Opts {
                full,
                secs: 1.0,
                rounds: 1,
                samples: 5,
                sizes: vec![(640, 480)],
                rdp: true,
                memory_only: false,
                audio_only: false,
                budget_only: false,
                latency_only: false,
                rdp_only: false,
                browser_only: false,
                desktop_only: false,
                h264_only: false,
            }
        };
        let mut it = args.iter().skip(1);
        while let Some(a) = it.next() {
            let mut val = || it.next().context("option needs a value");
            match a.as_str() {
                "--secs" => o.secs = val()?.parse()?,
                "--rounds" => o.rounds = val()?.parse()?,
                "--samples" => o.samples = val()?.parse()?,
                "--sizes" => {
                    o.sizes = val()?
                        .split(',')
                        .map(|s| {
                            let (w, h) = s.split_once('x').context("size is WxH")?;
                            Ok((w.parse()?, h.parse()?))
                        })
                        .collect::<Result<_>>()?
                }
                "--no-rdp" => o.rdp = false,
                "--memory-only" => o.memory_only = true,
                "--audio-only" => o.audio_only = true,
                "--budget-only" => o.budget_only = true,
                "--latency-only" => o.latency_only = true,
                "--rdp-only" => o.rdp_only = true,
                "--browser-only" => o.browser_only = true,
                "--desktop-only" => o.desktop_only = true,
                "--h264-only" => o.h264_only = true,
                _ => {} // --bench and libtest's own flags
            }
        }
        Ok(o)
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("client") {
        return client::child_main(&args[2..]);
    }
    let opts = Opts::parse(&args)?;
    // VDI_LOG=info (or any filter) shows what our servers log during the run.
    if let Ok(filter) = std::env::var("VDI_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .try_init();
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run(opts))
}

/// The display device of the benchmark VM.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Video {
    /// QEMU's std VGA: QEMU (and its VNC) finds changes by polling on its refresh timer.
    StdVga,
    /// virtio-gpu: the guest pushes updates (the fbdev emulation flushes them).
    VirtioGpu,
}

/// How to start the benchmark VM (again).
struct QemuCfg {
    kernel_dir: PathBuf,
    dir: PathBuf,
    bus_address: String,
    vnc_display: u16,
}

impl QemuCfg {
    /// QEMU with both its own `-vnc` and `-display dbus` on our bus, and the guest's serial.
    async fn start(&self, video: Video) -> Result<(tokio::process::Child, Guest)> {
        let display: &[&str] = match video {
            Video::StdVga => &["-vga", "std"],
            Video::VirtioGpu => &["-vga", "none", "-device", "virtio-gpu-pci"],
        };
        let mut boot: Vec<String> = ["-m", "256"]
            .iter()
            .chain(display)
            .map(|a| a.to_string())
            .collect();
        boot.push("-kernel".into());
        boot.push(self.kernel_dir.join("vmlinuz").display().to_string());
        boot.push("-initrd".into());
        boot.push(self.kernel_dir.join("initrd.gz").display().to_string());
        boot.extend(["-append".to_string(), "console=ttyS0 quiet".to_string()]);
        self.spawn(&format!("{video:?}"), &boot).await
    }

    /// The same on the Debian desktop image (tests/guest/desktop/build.sh) in `image`.
    async fn start_desktop(&self, image: &Path) -> Result<(tokio::process::Child, Guest)> {
        let mut boot: Vec<String> = vec!["-kernel".into()];
        boot.push(image.join("vmlinuz").display().to_string());
        boot.push("-initrd".into());
        boot.push(image.join("initrd.img").display().to_string());
        boot.extend(vdi_sidecar::demo::desktop_args(&image.join("disk.raw")));
        self.spawn("desktop", &boot).await
    }

    async fn spawn(&self, tag: &str, boot: &[String]) -> Result<(tokio::process::Child, Guest)> {
        let serial = self.dir.join(format!("serial-{tag}.sock"));
        let _ = std::fs::remove_file(&serial);
        let qemu = Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-nodefaults", "-name", "vdi-bench"])
            .args(boot)
            .args(["-device", "qemu-xhci", "-device", "usb-tablet"])
            .args(vdi_sidecar::demo::AUDIO_ARGS)
            .arg("-display")
            .arg(format!("dbus,addr={},audiodev=snd0", self.bus_address))
            .args([
                "-vnc",
                &format!("127.0.0.1:{},audiodev=snd0", self.vnc_display),
            ])
            .arg("-serial")
            .arg(format!("unix:{},server=on,wait=off", serial.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("qemu-system-x86_64 (install QEMU 10 from bookworm-backports)")?;
        let guest = Guest::connect(&serial).await?;
        Ok((qemu, guest))
    }
}

/// Everything the run needs: the bus, QEMU, the guest's serial, our servers.
struct Rig {
    guest: Guest,
    qemu_pid: u32,
    /// Our VNC server and its process (0: this one).
    ours: SocketAddr,
    ours_pid: u32,
    bus_address: String,
    theirs: SocketAddr,
    rdp: SocketAddr,
    rdp_cfg: Arc<RdpConfig>,
    vnc_cfg: Arc<VncConfig>,
    /// The console's shared H.264 stream (encoder counters).
    video: vdi_sidecar::h264::Video,
    /// Our in-process server's console model (frames for the resets rows).
    fb: vdi_sidecar::framebuffer::Framebuffer,
    qemu: tokio::process::Child,
    qemu_cfg: QemuCfg,
    /// Key presses so far (they alternate between two keys, see `client::latency`).
    keys: usize,
}

async fn run(opts: Opts) -> Result<()> {
    let kernel_dir = build_guest()?;
    let dir = tempfile::tempdir()?;
    let stop = CancellationToken::new();
    let bus = Bus::start(BusConfig::in_dir(dir.path().join("bus"))).await?;
    let (consoles, display) = source::spawn(
        bus.address().to_owned(),
        SourceOptions::default(),
        stop.child_token(),
    );
    let tls = TlsIdentity::generate(&default_names(&[]))?;
    let rdp_cfg = Arc::new(RdpConfig::new(
        tls,
        Arc::new(Auth::user_password("vdi", RDP_PASSWORD)),
    ));
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let vnc_cfg = Arc::new(VncConfig::new(Arc::new(Auth::open()), "bench"));
    let viewers = Viewers {
        vnc: Some((loopback, Arc::clone(&vnc_cfg))),
        rdp: opts.rdp.then(|| (loopback, Arc::clone(&rdp_cfg))),
        web: None,
        budget: None,
        ..Viewers::default()
    };
    let at = viewers.start(&consoles, &stop).await?;
    let ours = at.vnc.context("our VNC server")?;
    let rdp = at.rdp.unwrap_or(loopback);
    let video = at.video.clone().context("the H.264 stream")?;

    let qemu_vnc = free_vnc_display()?;
    let qemu_cfg = QemuCfg {
        kernel_dir: kernel_dir.clone(),
        dir: dir.path().to_owned(),
        bus_address: bus.address().to_owned(),
        vnc_display: qemu_vnc,
    };
    let (qemu, guest) = qemu_cfg.start(Video::StdVga).await?;
    let qemu_pid = qemu.id().context("QEMU pid")?;
    let mut rig = Rig {
        guest,
        qemu_pid,
        ours,
        ours_pid: 0,
        bus_address: bus.address().to_owned(),
        theirs: SocketAddr::from(([127, 0, 0, 1], 5900 + qemu_vnc)),
        rdp,
        rdp_cfg,
        vnc_cfg,
        video,
        fb: consoles.primary(),
        keys: 0,
        qemu,
        qemu_cfg,
    };
    let mut table = Table::default();
    let measured = measure_all(&mut rig, &opts, &mut table).await;
    stop.cancel();
    let _ = rig.qemu.start_kill();
    let _ = rig.qemu.wait().await;
    display.abort();
    bus.stop().await;
    let mode = if opts.full {
        "full"
    } else {
        "smoke mode: tiny windows, no conclusions"
    };
    // What was measured is printed even when a later row failed.
    table.print(&format!("{}; {mode}", machine_facts()));
    measured?;
    table.check_complete()?;
    Ok(())
}

impl Rig {
    /// Stops QEMU and boots the VM again on virtio-gpu: the test guest, or the desktop image
    /// in `desktop`.
    async fn reboot(&mut self, desktop: Option<&Path>) -> Result<()> {
        let _ = self.qemu.start_kill();
        let _ = self.qemu.wait().await;
        let (qemu, guest) = match desktop {
            None => self.qemu_cfg.start(Video::VirtioGpu).await?,
            Some(image) => self.qemu_cfg.start_desktop(image).await?,
        };
        self.qemu_pid = qemu.id().context("QEMU pid")?;
        self.qemu = qemu;
        self.guest = guest;
        Ok(())
    }

    /// Starts `scene` for long enough to cover `windows` measuring windows plus `slack`, then
    /// measures QEMU's baseline (no client) while it runs. Returns the scene's length.
    async fn start_scene(
        &mut self,
        scene: &str,
        window: Duration,
        windows: u32,
        slack: Duration,
    ) -> Result<(Duration, stats::Baseline)> {
        let length = window * windows + slack;
        self.guest
            .send(&format!("scene {scene} {}", length.as_millis()))
            .await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let base = stats::baseline(self.qemu_pid, window).await?;
        Ok((length, base))
    }

    /// Waits for the scene started by [`Rig::start_scene`] to end.
    async fn finish_scene(&mut self, length: Duration) -> Result<()> {
        let done = self
            .guest
            .wait_for("scene", length + Duration::from_secs(30))
            .await?;
        if std::env::var_os("VDI_BENCH_DEBUG").is_some() {
            eprintln!("{done}");
        }
        Ok(())
    }
}

async fn measure_all(rig: &mut Rig, opts: &Opts, table: &mut Table) -> Result<()> {
    rig.guest.wait_ready(Duration::from_secs(120)).await?;
    rig.guest.cmd("display vbe", "display").await?;
    let window = Duration::from_secs_f64(opts.secs);
    let last = *opts.sizes.last().context("no sizes")?;
    if opts.audio_only {
        audio::rows(rig, opts, table).await?;
        return Ok(());
    }
    if opts.rdp_only {
        show_test_image(rig, last.0, last.1).await?;
        rdp::rows(rig, opts, last, table).await?;
        return Ok(());
    }
    if opts.h264_only {
        show_test_image(rig, last.0, last.1).await?;
        // VDI_BENCH_QUICK: only the budget rows.
        if std::env::var_os("VDI_BENCH_QUICK").is_none() {
            rdp::rows(rig, opts, last, table).await?;
            browser::rows(rig, opts, last, table).await?;
        }
        budget::h264_rows(rig, opts, last, table).await?;
        return Ok(());
    }
    if opts.browser_only {
        show_test_image(rig, last.0, last.1).await?;
        browser::rows(rig, opts, last, table).await?;
        return Ok(());
    }
    if opts.memory_only {
        show_test_image(rig, last.0, last.1).await?;
        memory_rows(rig, opts, last, table).await?;
        return Ok(());
    }
    if opts.budget_only {
        show_test_image(rig, last.0, last.1).await?;
        budget::rows(rig, opts, last, table).await?;
        if opts.rdp {
            budget::h264_rows(rig, opts, last, table).await?;
        }
        if std::env::var_os("VDI_BENCH_QUICK").is_none() {
            many_viewers(rig, opts, table).await?;
        }
        return Ok(());
    }
    if opts.desktop_only {
        return desktop_latency(rig, opts, table).await;
    }
    if opts.latency_only {
        for &(w, h) in &opts.sizes {
            show_test_image(rig, w, h).await?;
            latency_rows(rig, opts, (w, h), table).await?;
        }
        virtio_latency(rig, opts, table).await?;
        return Ok(());
    }
    for &(w, h) in &opts.sizes {
        show_test_image(rig, w, h).await?;
        let size = format!("{w}x{h}");
        // Frame rate, bytes and CPU while the guest animates flat out, per encoding.
        for enc in [Enc::Zrle, Enc::TightJpeg, Enc::Raw] {
            let (us, them) = alternate(rig, opts, "video", window, enc, 1).await?;
            table.pair(Row::fps(&size, enc), &us, &them, |r| r.fps());
            table.pair(Row::cpu(&size, enc), &us, &them, |r| r.cpu_per_1000());
            if enc != Enc::Raw {
                table.pair(Row::bytes(&size, enc, "video"), &us, &them, |r| {
                    r.kib_per_update()
                });
            }
        }
        // Bytes per update, lossless, for the other scenes.
        for scene in ["desktop", "scroll"] {
            let (us, them) = alternate(rig, opts, scene, window, Enc::Zrle, 1).await?;
            table.pair(Row::bytes(&size, Enc::Zrle, scene), &us, &them, |r| {
                r.kib_per_update()
            });
        }
        // Key-to-pixel latency with the guest idle.
        show_test_image(rig, w, h).await?;
        latency_rows(rig, opts, (w, h), table).await?;
        if (w, h) == last {
            memory_rows(rig, opts, (w, h), table).await?;
            budget::rows(rig, opts, (w, h), table).await?;
            if opts.rdp {
                budget::h264_rows(rig, opts, (w, h), table).await?;
            }
            let fb = rig.fb.clone();
            resets::rows(rig, opts, &fb, table).await?;
            browser::rows(rig, opts, (w, h), table).await?;
            if opts.rdp {
                rdp::rows(rig, opts, (w, h), table).await?;
            }
            audio::rows(rig, opts, table).await?;
        }
    }
    many_viewers(rig, opts, table).await?;
    virtio_latency(rig, opts, table).await?;
    // The desktop image takes minutes to build and to boot: not in the smoke run.
    if opts.full {
        desktop_latency(rig, opts, table).await?;
    }
    Ok(())
}

/// Key-to-pixel on std VGA at `size`: both servers wait for QEMU's 30 ms refresh timer, so the
/// samples spread over a timer period and the median of a few dozen moves by ~1.5 ms between
/// runs; the bootstrap interval of the ratio says how much of a difference is real.
async fn latency_rows(
    rig: &mut Rig,
    opts: &Opts,
    (w, h): (u32, u32),
    table: &mut Table,
) -> Result<()> {
    let size = format!("{w}x{h}");
    let (us, them) = latency_pair(rig, opts, client::KEYBOX).await?;
    latency_table(
        table,
        &size,
        &us,
        &them,
        format!("key-to-pixel median ours/QEMU <= 1.0 on std VGA, {size}"),
        1.0,
    );
    Ok(())
}

/// Key-to-pixel with the VM rebooted on virtio-gpu: the guest pushes its updates, which reach
/// us over D-Bus at once, while QEMU's own VNC sends them on its refresh timer.
async fn virtio_latency(rig: &mut Rig, opts: &Opts, table: &mut Table) -> Result<()> {
    rig.reboot(None).await?;
    rig.guest.wait_ready(Duration::from_secs(120)).await?;
    rig.guest.cmd("display fb", "display").await?;
    rig.guest.cmd("keybox on", "keybox").await?;
    rig.guest.cmd("fill 1", "fill").await?;
    let (w, h) = rig.fb.size();
    for addr in [rig.ours, rig.theirs] {
        client::wait_size(addr, w, h, Duration::from_secs(60)).await?;
    }
    let (us, them) = latency_pair(rig, opts, client::KEYBOX).await?;
    let size = format!("{w}x{h}, virtio-gpu");
    let target = "key-to-pixel median ours/QEMU <= 0.7 on virtio-gpu".into();
    latency_table(table, &size, &us, &them, target, 0.7);
    Ok(())
}

/// Key-to-pixel on the Debian desktop guest (tests/guest/desktop: Xorg on virtio-gpu flushes
/// damage at once, where our small guest's fbdev emulation defers it 50 ms): a terminal at the
/// top left echoes the keys, whose pixels both servers must deliver. Reboots the VM on it.
async fn desktop_latency(rig: &mut Rig, opts: &Opts, table: &mut Table) -> Result<()> {
    let image = build_image("tests/guest/desktop/build.sh")
        .context("the desktop guest (root and mmdebstrap)")?;
    rig.reboot(Some(&image)).await?;
    rig.guest.wait_ready(Duration::from_secs(600)).await?;
    // setsid and no shared output: the serial command returns while the terminal runs.
    rig.guest
        .cmd(
            "setsid xfce4-terminal --disable-server --hide-menubar --hide-toolbar \
             --geometry=60x16+0+40 -x cat </dev/null >/dev/null 2>&1 &",
            "setsid",
        )
        .await?;
    rig.guest
        .cmd(
            // Focused, and drawn once: the first glyphs of a new terminal take seconds to
            // come under TCG (font loading), which no server should be measured by.
            "xdotool search --sync --class xfce4-terminal windowactivate --sync type warm && sleep 3",
            "xdotool",
        )
        .await?;
    let (w, h) = rig.fb.size();
    for addr in [rig.ours, rig.theirs] {
        client::wait_size(addr, w, h, Duration::from_secs(60)).await?;
    }
    // The terminal's area, clear of the panel's clock (top right).
    let watch = client::Region {
        x: 0,
        y: 30,
        w: (w / 2) as u16,
        h: (h / 2) as u16,
    };
    let (us, them) = latency_pair(rig, opts, watch).await?;
    let size = format!("{w}x{h}, Xfce desktop on virtio-gpu");
    let target = "key-to-pixel median ours/QEMU <= 0.7 on the desktop (virtio-gpu)".into();
    latency_table(table, &size, &us, &them, target, 0.7);
    Ok(())
}

/// 50 viewers at 1024x768 (3 at 640x480 in smoke mode).
async fn many_viewers(rig: &mut Rig, opts: &Opts, table: &mut Table) -> Result<()> {
    let size = if opts.full { (1024, 768) } else { (640, 480) };
    show_test_image(rig, size.0, size.1).await?;
    budget::fifty(rig, opts, size, table).await
}

async fn show_test_image(rig: &mut Rig, w: u32, h: u32) -> Result<()> {
    rig.guest.cmd(&format!("mode {w} {h}"), "mode").await?;
    rig.guest.cmd("keybox on", "keybox").await?;
    rig.guest.cmd("fill 1", "fill").await?;
    // Both servers show the new mode before anything is measured.
    for addr in [rig.ours, rig.theirs] {
        client::wait_size(addr, w, h, Duration::from_secs(30)).await?;
    }
    Ok(())
}

/// Runs `scene` in the guest and, while it runs, measures `rounds` windows per server,
/// alternating which goes first, plus a window with no client (QEMU's baseline CPU).
async fn alternate(
    rig: &mut Rig,
    opts: &Opts,
    scene: &str,
    window: Duration,
    enc: Enc,
    viewers: usize,
) -> Result<(Vec<Run>, Vec<Run>)> {
    let (mut us, mut them) = (Vec::new(), Vec::new());
    for round in 0..opts.rounds {
        let (length, base) = rig
            .start_scene(scene, window, 3, Duration::from_secs(6))
            .await?;
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for mine in order {
            let addr = if mine { rig.ours } else { rig.theirs };
            let runs = client::measure(
                client::Server {
                    addr,
                    pid: if mine { rig.ours_pid } else { rig.qemu_pid },
                    mine,
                },
                enc,
                window,
                viewers,
                rig.qemu_pid,
                &base,
            )
            .await?;
            if std::env::var_os("VDI_BENCH_DEBUG").is_some() {
                eprintln!("{scene} {enc:?} mine={mine}: {runs:?}");
            }
            if mine { &mut us } else { &mut them }.push(runs);
        }
        rig.finish_scene(length).await?;
    }
    Ok((us, them))
}

/// The median and p95 rows of a key-to-pixel pair at `size`, and the target that the median
/// ratio ours/QEMU is at most `bound` (with its 95 % bootstrap interval).
fn latency_table(
    table: &mut Table,
    size: &str,
    us: &[f64],
    them: &[f64],
    target: String,
    bound: f64,
) {
    table.pair_values(Row::latency(size, "median"), median(us), median(them));
    table.pair_values(Row::latency(size, "p95"), p95(us), p95(them));
    let ratio = median(us) / median(them).max(1e-9);
    let (lo, hi) = stats::ratio_interval(us, them);
    table.target(
        target,
        ratio <= bound,
        format!(
            "{ratio:.2} (95% {lo:.2}-{hi:.2}, n={}+{})",
            us.len(),
            them.len()
        ),
    );
}

async fn latency_pair(
    rig: &mut Rig,
    opts: &Opts,
    watch: client::Region,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let (mut us, mut them) = (Vec::new(), Vec::new());
    // Halves, alternating, so drift in the machine's load hits both servers alike.
    let half = opts.samples.div_ceil(2);
    for round in 0..2 {
        for mine in if round == 0 {
            [true, false]
        } else {
            [false, true]
        } {
            let addr = if mine { rig.ours } else { rig.theirs };
            let got = client::latency(addr, half, rig.keys, watch).await?;
            rig.keys += half;
            if mine { &mut us } else { &mut them }.extend(got);
        }
    }
    if us.is_empty() || them.is_empty() {
        bail!("no latency samples");
    }
    Ok((us, them))
}

/// Memory of the real product: a `vdi-sidecar bridge` process on the same bus (QEMU serves both
/// listeners), idle and with 1 and 4 viewers at the largest size while the guest animates, next
/// to what QEMU's RSS grows by with as many viewers of its own.
async fn memory_rows(
    rig: &mut Rig,
    opts: &Opts,
    (w, h): (u32, u32),
    table: &mut Table,
) -> Result<()> {
    let size = &format!("{w}x{h}");
    let (mut bridge, addr) = budget::bridge(rig, None).await?;
    let pid = bridge.id().context("bridge pid")?;
    client::wait_size(addr, w, h, Duration::from_secs(30)).await?;
    let saved = (rig.ours, rig.ours_pid);
    (rig.ours, rig.ours_pid) = (addr, pid);
    let result = async {
        let window = Duration::from_secs_f64(opts.secs);
        let one = Opts {
            rounds: 1,
            sizes: Vec::new(),
            ..*opts
        };
        // Idle: attached, no viewer, a still screen for a few seconds (the size probe's viewer
        // and its frame just left; buffers kept only while frames flow are let go by then).
        tokio::time::sleep(Duration::from_secs(3)).await;
        let idle = stats::rss_kib(pid)? as f64 / 1024.0;
        // VDI_BENCH_SMAPS=FILE: where the idle RSS is, mapping by mapping.
        if let Some(to) = std::env::var_os("VDI_BENCH_SMAPS") {
            std::fs::copy(format!("/proc/{pid}/smaps"), to)?;
        }
        table.memory(size, 0, idle, 0.0);
        table.target(
            "idle sidecar RSS <= 20 MiB".into(),
            idle <= 20.0,
            format!("{idle:.1} MiB"),
        );
        for viewers in [1usize, 4] {
            let before_q = stats::rss_kib(rig.qemu_pid)?;
            let (us, them) = alternate(rig, &one, "video", window, Enc::Zrle, viewers).await?;
            let ours = us.iter().map(|r| r.our_rss_kib).fold(0.0, f64::max) / 1024.0;
            let qemu_growth = (them.iter().map(|r| r.qemu_rss_kib).fold(0.0, f64::max)
                - before_q as f64)
                / 1024.0;
            table.memory(size, viewers, ours, qemu_growth);
            if viewers == 4 {
                table.target(
                    format!("RSS with 4 viewers at {size} (no cgroup) <= 64 MiB"),
                    ours <= 64.0,
                    format!("{ours:.1} MiB"),
                );
            }
        }
        anyhow::Ok(())
    }
    .await;
    (rig.ours, rig.ours_pid) = saved;
    let _ = bridge.start_kill();
    let _ = bridge.wait().await;
    result
}

fn build_guest() -> Result<PathBuf> {
    build_image("tests/guest/build.sh")
}

/// Runs one of the guest build scripts (cached under target/); returns the directory it prints.
fn build_image(script: &str) -> Result<PathBuf> {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = std::process::Command::new(format!("{root}/{script}"))
        .output()
        .context(script.to_owned())?;
    if !out.status.success() {
        bail!(
            "guest build failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let dir = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .map(str::to_owned)
        .context("guest build printed nothing")?;
    Ok(dir.into())
}

/// A VNC display number whose port (5900 + n) is free.
fn free_vnc_display() -> Result<u16> {
    (50..99)
        .find(|n| std::net::TcpListener::bind(("127.0.0.1", 5900 + n)).is_ok())
        .context("no free VNC display")
}

fn machine_facts() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_default();
    let qemu = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .unwrap_or_default();
    format!("{cores} cores ({cpu}), guest under TCG (no KVM), {qemu}")
}
