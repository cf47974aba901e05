//! `vdi-sidecar demo`: the whole display path on one machine, without Kubernetes. It starts our
//! bus, a local QEMU with the D-Bus display running a small guest (kernel + initrd, e.g. the
//! test guest from `tests/guest/build.sh`), attaches the display source and serves VNC.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::bus::{Bus, BusConfig};
use crate::qemu::clipboard::Policy;
use crate::qemu::source::{self, SourceOptions};
use crate::viewers::Viewers;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bus(#[from] crate::bus::Error),
    #[error("cannot start {0}")]
    Spawn(String, #[source] std::io::Error),
    #[error("cannot listen on {0}")]
    Listen(SocketAddr, #[source] std::io::Error),
    #[error("cannot create the demo directory")]
    Dir(#[source] std::io::Error),
}

pub struct DemoConfig {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub qemu: PathBuf,
    pub viewers: Viewers,
    /// Guest resolution (std VGA, set by the guest program).
    pub width: u32,
    pub height: u32,
    /// More QEMU arguments (e.g. `-vnc` to compare with QEMU's own server).
    pub extra_qemu_args: Vec<String>,
    /// Guest program commands sent after the test image is drawn (e.g. `animate 100000`).
    pub guest_commands: Vec<String>,
    /// A desktop disk image (tests/guest/desktop/build.sh) booted instead of the test program:
    /// virtio-gpu, root on the disk (writes go to a snapshot), no commands sent.
    pub disk: Option<PathBuf>,
}

/// QEMU arguments for a sound card whose audio goes to the D-Bus display (48 kHz stereo, what the
/// domain rewrite asks libvirt for). Shared with the tests and the benchmark.
/// QEMU arguments for the desktop image of `tests/guest/desktop/build.sh` (after `-kernel` and
/// `-initrd`): the memory, CPUs and GPU a desktop VM has, root on the disk, whose writes go to a
/// snapshot so every boot starts from the built image.
pub fn desktop_args(disk: &Path) -> Vec<String> {
    let mut args: Vec<String> = ["-m", "1536", "-smp", "2", "-vga", "none"]
        .into_iter()
        .chain(["-device", "virtio-gpu-pci", "-drive"])
        .map(String::from)
        .collect();
    args.push(format!(
        "file={},format=raw,if=virtio,snapshot=on",
        disk.display()
    ));
    args.extend(
        [
            "-append",
            "root=/dev/vda rw console=ttyS0 quiet systemd.show_status=0",
        ]
        .map(String::from),
    );
    args
}

pub const AUDIO_ARGS: &[&str] = &[
    "-audiodev",
    "dbus,id=snd0,out.frequency=48000",
    "-device",
    "intel-hda",
    "-device",
    "hda-duplex,audiodev=snd0",
];

/// A virtio-serial port named as spice-vdagent expects, on QEMU's vdagent chardev with the
/// clipboard on: what the domain rewrite's `qemu-vdagent` channel becomes.
pub const VDAGENT_ARGS: &[&str] = &[
    "-device",
    "virtio-serial-pci",
    "-chardev",
    "qemu-vdagent,id=vdagent,name=vdagent,clipboard=on,mouse=off",
    "-device",
    "virtserialport,chardev=vdagent,name=com.redhat.spice.0",
];

/// Runs the demo until `stop`.
pub async fn run(cfg: DemoConfig, stop: CancellationToken) -> Result<(), Error> {
    let dir = std::env::temp_dir().join(format!("vdi-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(Error::Dir)?;
    let bus = Bus::start(BusConfig::in_dir(dir.join("bus"))).await?;

    let (consoles, display) = source::spawn(
        bus.address().to_owned(),
        SourceOptions {
            clipboard: cfg.viewers.clipboard,
            ..SourceOptions::default()
        },
        stop.child_token(),
    );
    let at = cfg
        .viewers
        .start(&consoles, &stop)
        .await
        .map_err(|e| Error::Listen(e.addr, e.source))?;

    let serial = dir.join("serial.sock");
    let mut qemu = Command::new(&cfg.qemu);
    qemu.args(["-accel", "tcg", "-nodefaults", "-name", "vdi-demo"])
        .args(["-device", "qemu-xhci", "-device", "usb-tablet"])
        .arg("-kernel")
        .arg(&cfg.kernel)
        .arg("-initrd")
        .arg(&cfg.initrd);
    match &cfg.disk {
        // A real desktop needs the memory and the GPU a desktop VM has.
        Some(disk) => qemu.args(desktop_args(disk)),
        None => qemu
            .args(["-m", "256", "-vga", "std"])
            .args(["-append", "console=ttyS0 quiet"]),
    };
    let mut qemu = qemu
        // A sound card (its audio goes to the D-Bus display) and, unless the clipboard is off,
        // the vdagent port a guest agent would use: what the domain rewrite gives a real VM.
        .args(AUDIO_ARGS)
        .args(if cfg.viewers.clipboard.policy == Policy::Off {
            &[][..]
        } else {
            VDAGENT_ARGS
        })
        .arg("-display")
        .arg(format!("dbus,addr={},audiodev=snd0", bus.address()))
        .arg("-serial")
        .arg(format!("unix:{},server=on,wait=off", serial.display()))
        .args(&cfg.extra_qemu_args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Error::Spawn(cfg.qemu.display().to_string(), e))?;
    info!(pid = qemu.id(), "QEMU started");

    if let (Some(addr), Some((_, vnc))) = (at.vnc, &cfg.viewers.vnc) {
        let password = vnc.auth.secret().unwrap_or("(none: --insecure-no-auth)");
        println!("vdi-sidecar demo: the guest's desktop is served at");
        println!("  VNC   {addr}   password: {password}");
        println!("  e.g.  vncviewer {}::{}", addr.ip(), addr.port());
        if let (Some(web), Some((_, w, _))) = (at.web, &cfg.viewers.web) {
            let scheme = if w.tls.is_some() { "https" } else { "http" };
            println!("  Web   {scheme}://{web}/   (same password; the certificate is generated)");
        }
        if let (Some(rdp), Some((_, r))) = (at.rdp, &cfg.viewers.rdp) {
            let user = if r.auth.required() {
                r.auth.rdp_username()
            } else {
                "(any)"
            };
            println!("  RDP   {rdp}   user: {user}, same password");
            println!("  e.g.  xfreerdp3 /v:{rdp} /u:{user} /cert:ignore");
        }
        // VeNCrypt is offered with a generated certificate: say how clients come to trust it
        // (gtk-vnc clients refuse it otherwise, and rightly).
        if let Some(id) = &vnc.tls {
            let ca = dir.join("ca.pem");
            if std::fs::write(&ca, &id.trust_pem).is_ok() {
                let ca = ca.display();
                println!("  TLS   the certificate is generated for this run; its CA is {ca}");
                println!(
                    "        TigerVNC: vncviewer -X509CA={ca} {}::{}",
                    addr.ip(),
                    addr.port()
                );
                println!(
                    "        gtk-vnc (remote-viewer, gvncviewer): cp {ca} ~/.pki/CA/cacert.pem"
                );
            }
        }
        println!("Ctrl-C stops the demo (QEMU and the bus are stopped too).");
    }

    // Draw a known image once the guest is up; then keep the serial open for its output.
    let mut commands = vec![
        "display vbe".to_owned(),
        format!("mode {} {}", cfg.width, cfg.height),
        "fill 1".to_owned(),
    ];
    commands.extend(cfg.guest_commands.iter().cloned());
    if cfg.disk.is_some() {
        // The desktop's serial runs shell commands: it gets none of the test program's.
        commands.clear();
    }
    let drive = drive_guest(serial, commands);
    tokio::select! {
        () = stop.cancelled() => {}
        status = qemu.wait() => warn!(?status, "QEMU exited"),
        r = drive => if let Err(e) = r { warn!(error = %e, "cannot drive the guest") },
    }
    let _ = qemu.start_kill();
    let _ = qemu.wait().await;
    display.abort();
    bus.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Tells the guest program what to show, then echoes what it reports.
async fn drive_guest(serial: PathBuf, commands: Vec<String>) -> std::io::Result<()> {
    let mut stream = loop {
        match UnixStream::connect(&serial).await {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let (rd, mut wr) = stream.split();
    let mut lines = BufReader::new(rd).lines();
    while let Some(line) = lines.next_line().await? {
        if line.starts_with("VDI READY") {
            for c in &commands {
                wr.write_all(format!("{c}\n").as_bytes()).await?;
            }
            if commands.is_empty() {
                info!("guest ready");
            } else {
                info!("guest ready: drawing the test image; keys you type show as events");
            }
        } else if let Some(event) = line.strip_prefix("VDI ") {
            info!(guest = event.trim_end());
        }
    }
    Ok(())
}
