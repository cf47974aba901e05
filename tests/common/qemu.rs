//! The real-QEMU test harness: our bus, QEMU 10 with `-display dbus` running the test guest
//! (tests/guest), its serial console for commands and QMP for `screendump`, all killed by PID.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{Proc, wait_until};
use tokio_util::sync::CancellationToken;
use vdi_sidecar::bus::{Bus, BusConfig};
use vdi_sidecar::qemu::source::{self, Consoles, SourceOptions};

/// Builds (or reuses) the test guest; returns its directory (vmlinuz, initrd.gz).
pub fn guest() -> PathBuf {
    build_image("tests/guest/build.sh")
}

/// Builds (or reuses) the desktop guest (tests/guest/desktop/build.sh, as root); returns its
/// directory (vmlinuz, initrd.img, disk.raw).
pub fn desktop_guest() -> PathBuf {
    build_image("tests/guest/desktop/build.sh")
}

/// Runs a guest build script (it caches under target/); returns the directory it prints last.
fn build_image(script: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(script);
    let out = Command::new("bash")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .lines()
            .last()
            .expect("path"),
    )
}

/// Which guest QEMU boots.
#[derive(Clone, Copy, Debug)]
enum Boot {
    /// Our small busybox guest (tests/guest/build.sh).
    TestGuest,
    /// The Debian desktop (tests/guest/desktop/build.sh).
    Desktop,
}

/// A sound card on the D-Bus display, and the vdagent port the test guest's agent speaks on.
#[allow(unused_imports)] // each test binary uses what it needs
pub use vdi_sidecar::demo::{AUDIO_ARGS, VDAGENT_ARGS};

/// Which display device the VM gets.
#[derive(Clone, Copy, Debug)]
pub enum Video {
    /// std VGA (inline Scanout/Update frames).
    StdVga,
    /// virtio-gpu-pci (shared-memory ScanoutMap/UpdateMap frames).
    VirtioGpu,
}

pub struct Vm {
    pub proc: Proc,
    pub dir: PathBuf,
    serial: BufReader<UnixStream>,
    qmp: BufReader<UnixStream>,
}

impl Vm {
    /// Starts QEMU on the bus at `bus_address`, with its sockets in `dir`.
    pub fn start(dir: &Path, bus_address: &str, video: Video) -> Vm {
        Self::start_with(dir, bus_address, video, &[])
    }

    /// As [`Vm::start`], with extra QEMU arguments (devices).
    pub fn start_with(dir: &Path, bus_address: &str, video: Video, extra: &[&str]) -> Vm {
        Self::boot(dir, bus_address, video, extra, Boot::TestGuest)
    }

    /// The desktop guest (tests/guest/desktop) on virtio-gpu, with its sound card and vdagent
    /// port: Xfce, spice-vdagent and PulseAudio as a user meets them.
    pub fn start_desktop(dir: &Path, bus_address: &str) -> Vm {
        let mut extra = vec!["-device", "qemu-xhci"];
        extra.extend(["-device", "usb-tablet"]);
        extra.extend(AUDIO_ARGS);
        extra.extend(VDAGENT_ARGS);
        Self::boot(dir, bus_address, Video::VirtioGpu, &extra, Boot::Desktop)
    }

    fn boot(dir: &Path, bus_address: &str, video: Video, extra: &[&str], boot: Boot) -> Vm {
        let serial = dir.join("serial.sock");
        let qmp = dir.join("qmp.sock");
        let mut cmd = Command::new("qemu-system-x86_64");
        // TCG by default: /dev/kvm exists on these machines but does not boot guests reliably.
        // VDI_TEST_ACCEL=kvm uses KVM where it works.
        let accel = std::env::var("VDI_TEST_ACCEL").unwrap_or_else(|_| "tcg".into());
        cmd.args([
            "-accel",
            accel.as_str(),
            "-m",
            "256",
            "-nodefaults",
            "-no-user-config",
        ])
        .args(["-name", "vdi-test-vm"]);
        match boot {
            Boot::TestGuest => {
                let g = guest();
                cmd.arg("-kernel")
                    .arg(g.join("vmlinuz"))
                    .arg("-initrd")
                    .arg(g.join("initrd.gz"))
                    .args(["-append", "console=ttyS0 quiet"]);
            }
            Boot::Desktop => {
                let g = desktop_guest();
                cmd.arg("-kernel")
                    .arg(g.join("vmlinuz"))
                    .arg("-initrd")
                    .arg(g.join("initrd.img"))
                    .args(vdi_sidecar::demo::desktop_args(&g.join("disk.raw")));
            }
        }
        cmd.arg("-display")
            .arg(if extra.iter().any(|a| a.starts_with("dbus,id=snd0")) {
                // A D-Bus audiodev is only exported when the display names it.
                format!("dbus,addr={bus_address},audiodev=snd0")
            } else {
                format!("dbus,addr={bus_address}")
            })
            .arg("-serial")
            .arg(format!("unix:{},server=on,wait=off", serial.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .args(extra)
            .stdin(Stdio::null());
        match (boot, video) {
            // The desktop's arguments name its GPU.
            (Boot::Desktop, _) => {}
            (Boot::TestGuest, Video::StdVga) => {
                cmd.args(["-vga", "std"]);
            }
            (Boot::TestGuest, Video::VirtioGpu) => {
                cmd.args(["-vga", "none", "-device", "virtio-gpu-pci"]);
            }
        }
        let child = cmd
            .spawn()
            .expect("qemu-system-x86_64 (install qemu-system-x86)");
        let proc = Proc {
            child,
            name: "qemu",
        };
        assert!(
            wait_until(Duration::from_secs(20), || serial.exists() && qmp.exists()),
            "QEMU did not create its sockets"
        );
        let serial = BufReader::new(UnixStream::connect(&serial).expect("serial"));
        let qmp = BufReader::new(UnixStream::connect(&qmp).expect("qmp"));
        let mut vm = Vm {
            proc,
            dir: dir.to_owned(),
            serial,
            qmp,
        };
        let mut greeting = String::new();
        vm.qmp.read_line(&mut greeting).expect("qmp greeting");
        vm.qmp_cmd(r#"{"execute":"qmp_capabilities"}"#);
        vm
    }

    /// Sends one QMP command and returns its reply line (events are skipped).
    pub fn qmp_cmd(&mut self, json: &str) -> String {
        let s = self.qmp.get_mut();
        s.write_all(json.as_bytes()).expect("qmp write");
        s.write_all(b"\n").expect("qmp write");
        loop {
            let mut line = String::new();
            self.qmp.read_line(&mut line).expect("qmp read");
            assert!(!line.is_empty(), "QMP closed");
            if line.contains("\"return\"") || line.contains("\"error\"") {
                return line;
            }
        }
    }

    /// Reads serial output until a line starting with `VDI <prefix>` (returned), or panics.
    pub fn expect_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let want = format!("VDI {prefix}");
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "guest did not print {want:?} within {timeout:?}"
            );
            self.serial
                .get_ref()
                .set_read_timeout(Some(left.max(Duration::from_millis(10))))
                .expect("timeout");
            let mut line = String::new();
            match self.serial.read_line(&mut line) {
                Ok(0) => panic!("serial closed while waiting for {want:?}"),
                Ok(_) => {
                    let line = line.trim_end().to_owned();
                    if line.starts_with("VDI ERR") {
                        panic!("guest error while waiting for {want:?}: {line}");
                    }
                    if line.starts_with(&want) {
                        return line;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("serial: {e}"),
            }
        }
    }

    /// Sends one line to the guest program without waiting for anything.
    pub fn send_line(&mut self, line: &str) {
        let s = self.serial.get_mut();
        s.write_all(line.as_bytes()).expect("serial write");
        s.write_all(b"\n").expect("serial write");
    }

    /// Sends a command to the guest program and waits for its `OK`.
    pub fn guest(&mut self, cmd: &str) -> String {
        let s = self.serial.get_mut();
        s.write_all(cmd.as_bytes()).expect("serial write");
        s.write_all(b"\n").expect("serial write");
        let op = cmd.split_whitespace().next().unwrap_or_default();
        self.expect_line(&format!("OK {op}"), Duration::from_secs(60))
    }

    /// Waits for the guest to report input event `type code value` (Linux input codes).
    pub fn expect_event(&mut self, ty: u32, code: u32, value: i32) -> String {
        let suffix = format!(" {ty} {code} {value}");
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut other = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || other.len() > 200 {
                panic!("guest never saw input event {suffix:?}; it saw {other:?}");
            }
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.expect_line("EV ", left)
            }));
            match r {
                Ok(line) if line.ends_with(&suffix) => return line,
                Ok(line) => other.push(line),
                Err(_) => panic!("guest never saw input event {suffix:?}; it saw {other:?}"),
            }
        }
    }

    pub fn wait_ready(&mut self) {
        self.expect_line("READY", Duration::from_secs(90));
    }

    /// Runs a shell command in the desktop guest's session; its output and exit status.
    pub fn shell(&mut self, cmd: &str) -> (String, i32) {
        self.send_line(cmd);
        let op = cmd.split_whitespace().next().unwrap_or_default().to_owned();
        let mut out = String::new();
        loop {
            let line = self.expect_line("", Duration::from_secs(60));
            if let Some(text) = line.strip_prefix("VDI OUT ") {
                out.push_str(text);
                out.push('\n');
            } else if let Some(rest) = line.strip_prefix(&format!("VDI OK {op} ")) {
                return (out, rest.trim().parse().unwrap_or(-1));
            }
        }
    }

    /// QMP `screendump` of console 0, as (width, height, 0x00RRGGBB pixels).
    pub fn screendump(&mut self) -> (u32, u32, Vec<u32>) {
        let file = self.dir.join("screendump.ppm");
        let _ = std::fs::remove_file(&file);
        let reply = self.qmp_cmd(&format!(
            r#"{{"execute":"screendump","arguments":{{"filename":"{}"}}}}"#,
            file.display()
        ));
        assert!(reply.contains("\"return\""), "screendump: {reply}");
        parse_ppm(&std::fs::read(&file).expect("screendump file"))
    }
}

/// Our bus, the display source on it, and room for a QEMU.
pub struct Rig {
    pub dir: tempfile::TempDir,
    pub bus: Option<Bus>,
    pub consoles: Consoles,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Rig {
    pub async fn start() -> Rig {
        Self::start_with(SourceOptions::default()).await
    }

    pub async fn start_with(opts: SourceOptions) -> Rig {
        let dir = tempfile::tempdir().expect("tempdir");
        let bus = Bus::start(BusConfig::in_dir(dir.path().join("vdi")))
            .await
            .expect("bus");
        let (consoles, input_task) = Consoles::new();
        tokio::spawn(input_task);
        let stop = CancellationToken::new();
        let conn = source::connect_bus(bus.address(), &stop)
            .await
            .expect("connect");
        let task = tokio::spawn({
            let (c, s) = (consoles.clone(), stop.clone());
            async move {
                if let Err(e) = source::run(conn, c, opts, s).await {
                    panic!("source failed: {e}");
                }
            }
        });
        Rig {
            dir,
            bus: Some(bus),
            consoles,
            stop,
            task,
        }
    }

    pub fn vm(&self, video: Video) -> Vm {
        self.vm_with(video, &[])
    }

    pub fn vm_with(&self, video: Video, extra: &[&str]) -> Vm {
        let bus = self.bus.as_ref().expect("bus");
        Vm::start_with(self.dir.path(), bus.address(), video, extra)
    }

    /// A std-VGA guest showing the 800x600 test image (gradients, bars, noise), already in our
    /// framebuffer exactly as QMP `screendump` shows it.
    pub async fn vm_with_test_image(&self) -> Vm {
        self.vm_with_test_image_and(&[]).await
    }

    /// [`Rig::vm_with_test_image`] with more QEMU arguments (e.g. a USB tablet).
    pub async fn vm_with_test_image_and(&self, extra: &[&str]) -> Vm {
        let mut vm = self.vm_with(Video::StdVga, extra);
        let fb = self.consoles.primary();
        tokio::task::spawn_blocking(move || {
            vm.wait_ready();
            vm.guest("display vbe");
            vm.guest("mode 800 600");
            vm.guest("fill 21");
            assert!(wait_until(Duration::from_secs(20), || {
                let (w, h, px) = vm.screendump();
                let s = fb.snapshot();
                (s.width, s.height) == (w, h) && s.pixels == px
            }));
            vm
        })
        .await
        .expect("guest")
    }

    /// A std-VGA guest whose clipboard agent is connected to QEMU, with our peer registered
    /// (our registration resets the agent: QEMU closes its port, the agent announces itself
    /// again).
    pub async fn vm_with_clipboard(&self) -> Vm {
        let mut vm = self.vm_with(Video::StdVga, VDAGENT_ARGS);
        let hub = self.consoles.clipboard();
        tokio::task::spawn_blocking(move || {
            vm.wait_ready();
            assert!(wait_until(Duration::from_secs(30), || hub.is_attached()));
            vm.expect_line("CLIP CAPS", Duration::from_secs(30));
            std::thread::sleep(Duration::from_millis(300));
            vm
        })
        .await
        .expect("guest")
    }

    pub async fn stop(mut self) {
        self.stop.cancel();
        let _ = self.task.await;
        if let Some(b) = self.bus.take() {
            b.stop().await;
        }
    }
}

impl Vm {
    /// Takes a screendump and keeps it as `name` in the VM's directory (an oracle file for image
    /// comparisons with ImageMagick); returns its path and size.
    pub fn screendump_file(&mut self, name: &str) -> (PathBuf, u32, u32) {
        let (w, h, _) = self.screendump();
        let path = self.dir.join(name);
        std::fs::copy(self.dir.join("screendump.ppm"), &path).expect("keep screendump");
        (path, w, h)
    }
}

/// Parses a binary PPM (P6, maxval 255) as QEMU writes it.
pub fn parse_ppm(data: &[u8]) -> (u32, u32, Vec<u32>) {
    let mut r = std::io::Cursor::new(data);
    let mut fields = Vec::new();
    let mut tok = Vec::new();
    let mut b = [0u8; 1];
    while fields.len() < 4 {
        r.read_exact(&mut b).expect("ppm header");
        if b[0].is_ascii_whitespace() {
            if !tok.is_empty() {
                fields.push(String::from_utf8(std::mem::take(&mut tok)).expect("ascii"));
            }
        } else {
            tok.push(b[0]);
        }
    }
    assert_eq!(fields[0], "P6");
    let w: u32 = fields[1].parse().expect("w");
    let h: u32 = fields[2].parse().expect("h");
    let start = r.position() as usize;
    let px = data[start..]
        .chunks_exact(3)
        .map(|p| (u32::from(p[0]) << 16) | (u32::from(p[1]) << 8) | u32::from(p[2]))
        .collect::<Vec<_>>();
    assert_eq!(px.len(), (w * h) as usize, "ppm size");
    (w, h, px)
}
