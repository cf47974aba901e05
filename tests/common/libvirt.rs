//! A real libvirt daemon for the tests: the running one, or one started here (with virtlogd,
//! which starting a domain needs) and killed by PID when the guard drops.
#![allow(dead_code)]

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use super::{Proc, wait_until};

pub const URI: &str = "qemu:///system";

pub fn virsh(args: &[&str]) -> Output {
    Command::new("virsh")
        .args(["-c", URI])
        .args(args)
        .output()
        .expect("virsh (install libvirt-clients)")
}

pub struct Daemons {
    _procs: Vec<Proc>,
}

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

/// Makes sure libvirtd (and virtlogd) answer.
pub fn ensure() -> Daemons {
    let mut procs = Vec::new();
    if !std::path::Path::new("/run/libvirt/virtlogd-sock").exists() {
        procs.push(spawn("virtlogd"));
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
    Daemons { _procs: procs }
}
