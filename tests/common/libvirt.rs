//! A real libvirt daemon for the tests: the running one, or one started here (with virtlogd,
//! which starting a domain needs) and killed by PID when the guard drops.
#![allow(dead_code)]

use std::os::unix::net::UnixStream;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use super::{Proc, wait_until};

pub const URI: &str = "qemu:///system";
const VIRTLOGD: &str = "/run/libvirt/virtlogd-sock";

pub fn virsh(args: &[&str]) -> Output {
    Command::new("virsh")
        .args(["-c", URI])
        .args(args)
        .output()
        .expect("virsh (install libvirt-clients)")
}

/// The daemons this test process started, shared by its tests (which run in parallel) and
/// stopped when the last of them lets go.
pub struct Daemons(Option<Arc<Vec<Proc>>>);

impl Drop for Daemons {
    /// The last one out stops the daemons while holding the lock, so a test that starts just
    /// then waits until they are gone instead of taking a dying libvirtd for a running one.
    fn drop(&mut self) {
        let _shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        drop(self.0.take());
    }
}

static SHARED: Mutex<Weak<Vec<Proc>>> = Mutex::new(Weak::new());

fn spawn(program: &'static str) -> Proc {
    let child = Command::new(program)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e} (install libvirt-daemon-system)"));
    Proc {
        child,
        name: program,
    }
}

/// A daemon answers on its socket; a file left by one that was killed does not count.
fn answers(socket: &str) -> bool {
    UnixStream::connect(socket).is_ok()
}

/// Makes sure libvirtd and virtlogd (which starting a domain needs) answer.
pub fn ensure() -> Daemons {
    let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(running) = shared.upgrade() {
        return Daemons(Some(running));
    }
    let mut procs = Vec::new();
    if !answers(VIRTLOGD) {
        // A killed virtlogd leaves its socket file behind; clear it for the new one.
        let _ = std::fs::remove_file(VIRTLOGD);
        procs.push(spawn("virtlogd"));
        assert!(
            wait_until(Duration::from_secs(30), || answers(VIRTLOGD)),
            "virtlogd did not come up"
        );
    }
    if !virsh(&["version"]).status.success() {
        procs.push(spawn("libvirtd"));
        assert!(
            wait_until(Duration::from_secs(30), || virsh(&["version"])
                .status
                .success()),
            "libvirtd did not come up"
        );
    }
    let running = Arc::new(procs);
    *shared = Arc::downgrade(&running);
    Daemons(Some(running))
}
