//! The clipboard with real clients under Xvfb, their X selection read and set with xclip:
//! TigerVNC (Extended Clipboard) and FreeRDP 3 (cliprdr), each both ways through the test guest's
//! vdagent, and the two together: a copy in one is pasted in the guest and then seen by the other.

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::qemu::{Rig, Vm};
use common::rdp::FreeRdp;
use common::x11::{TigerVnc, Xvfb};
use common::{Proc, wait_until};
use vdi_sidecar::session::Desktop;
use vdi_sidecar::session::auth::Auth;
use vdi_sidecar::vnc::VncConfig;

fn serve_vnc(rig: &Rig) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    tokio::spawn(vdi_sidecar::vnc::server::run(
        listener,
        Arc::new(VncConfig::new(Arc::new(Auth::open()), "vdi-clip")),
        Desktop::primary(&rig.consoles),
        tokio_util::sync::CancellationToken::new(),
    ));
    port
}

/// What the X CLIPBOARD selection holds (asked of whoever owns it: the viewer), or "" on error.
fn x_clipboard(x: &Xvfb) -> String {
    let out = Command::new("timeout")
        .args(["10", "xclip", "-o", "-selection", "clipboard"])
        .env("DISPLAY", &x.display)
        .output()
        .expect("xclip (install xclip)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until the X clipboard holds `want`.
fn wait_x_clipboard(x: &Xvfb, want: &str) -> String {
    let mut seen = String::new();
    wait_until(Duration::from_secs(30), || {
        seen = x_clipboard(x);
        if seen != want {
            std::thread::sleep(Duration::from_millis(300));
        }
        seen == want
    });
    seen
}

/// Owns the X CLIPBOARD selection with `text` (xclip in the foreground, killed by PID).
fn x_copy(x: &Xvfb, text: &str) -> Proc {
    let mut child = Command::new("xclip")
        .args(["-quiet", "-i", "-selection", "clipboard"])
        .env("DISPLAY", &x.display)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("xclip (install xclip)");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(text.as_bytes()).expect("xclip stdin");
    }
    Proc {
        child,
        name: "xclip",
    }
}

/// The guest pastes; its text (the agent prints newlines as `\n`).
fn guest_paste(vm: &mut Vm) -> String {
    vm.send_line("paste");
    let line = vm.expect_line("PASTE", Duration::from_secs(20));
    let rest = line.strip_prefix("VDI PASTE ").unwrap_or_default();
    rest.splitn(3, ' ')
        .nth(2)
        .unwrap_or_default()
        .replace("\\n", "\n")
}

fn guest_copy(vm: &mut Vm, text: &str) {
    vm.send_line(&format!("copy {}", text.replace('\n', "\\n")));
    vm.expect_line("OK copy", Duration::from_secs(20));
}

/// Waits until the guest pastes `want` (a viewer's copy reaches it with a grab first).
fn wait_guest_paste(vm: &mut Vm, want: &str) -> String {
    let mut got = String::new();
    for _ in 0..10 {
        got = guest_paste(vm);
        if got == want {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tigervnc_and_freerdp_copy_and_paste_with_the_guest_and_each_other() {
    let rig = Rig::start().await;
    let vnc = serve_vnc(&rig);
    let (rdp, _stop) = common::rdp::serve(common::rdp::config(), Desktop::primary(&rig.consoles));
    let vm = rig.vm_with_clipboard().await;
    let dir = rig.dir.path().to_owned();
    let vm = tokio::task::spawn_blocking(move || {
        let mut vm = vm;
        // TigerVNC on one X display, FreeRDP on another: each X server has its own clipboard.
        let xv = Xvfb::start();
        let args: Vec<String> = vec!["-SecurityTypes=None".into(), "-AutoSelect=0".into()];
        let tiger = TigerVnc::open(&xv, &dir, &args, &[], vnc, "vdi-clip");
        // vncviewer syncs the clipboard only while its window has the focus.
        xv.xdotool(&["windowfocus", "--sync", &tiger.window]);
        let xr = Xvfb::start();
        let free = FreeRdp::open(&xr, &dir, rdp, &["+clipboard"], &[]);
        xr.xdotool(&["windowfocus", "--sync", &free.window]);

        // Guest → both viewers (UTF-8, several lines).
        let text = "guest line 1\nGrüße — 日本語";
        guest_copy(&mut vm, text);
        assert_eq!(wait_x_clipboard(&xv, text), text, "TigerVNC's X clipboard");
        assert_eq!(wait_x_clipboard(&xr, text), text, "FreeRDP's X clipboard");

        // TigerVNC → guest, then FreeRDP sees it (through the guest's clipboard).
        let from_vnc = "from TigerVNC ✓\nsecond line";
        let owner = x_copy(&xv, from_vnc);
        assert_eq!(wait_guest_paste(&mut vm, from_vnc), from_vnc, "guest paste");
        drop(owner);
        // The guest copies what it pasted: FreeRDP's user sees TigerVNC's text.
        guest_copy(&mut vm, from_vnc);
        assert_eq!(
            wait_x_clipboard(&xr, from_vnc),
            from_vnc,
            "FreeRDP's X clipboard"
        );

        // FreeRDP → guest.
        let from_rdp = "from FreeRDP — ünïcödé\nline 2";
        let owner = x_copy(&xr, from_rdp);
        assert_eq!(wait_guest_paste(&mut vm, from_rdp), from_rdp, "guest paste");
        drop(owner);
        vm
    })
    .await
    .expect("clients");
    drop(vm);
    rig.stop().await;
}
