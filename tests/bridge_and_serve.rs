//! The binary's display side against a real QEMU: `serve` attaches to QEMU on the bus it runs,
//! `bridge` to QEMU on a bus someone else runs; both exit cleanly on SIGTERM.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::qemu::{Video, Vm};
use common::{BIN, Proc, Sidecar, wait_until};

#[test]
fn serve_attaches_to_qemu_on_its_bus() {
    let mut sc = Sidecar::start(&[], &[]);
    let addr = format!("unix:path={}", sc.bus_socket().display());
    let mut vm = Vm::start(sc.dir.path(), &addr, Video::StdVga);
    vm.wait_ready();
    assert!(
        wait_until(Duration::from_secs(20), || sc
            .log()
            .contains("listener registered")),
        "serve did not attach:\n{}",
        sc.log()
    );
    drop(vm);
    assert!(
        wait_until(Duration::from_secs(10), || sc
            .log()
            .contains("display detached")),
        "serve did not notice QEMU leaving:\n{}",
        sc.log()
    );
    sc.proc.signal("TERM");
    let status = sc.proc.wait_timeout(Duration::from_secs(5)).expect("exit");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_attaches_to_an_existing_bus() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bus =
        vdi_sidecar::bus::Bus::start(vdi_sidecar::bus::BusConfig::in_dir(dir.path().join("bus")))
            .await
            .expect("bus");
    let log_path = dir.path().join("bridge.log");
    let child = Command::new(BIN)
        .args([
            "bridge",
            "--vnc",
            "none",
            "--http",
            "none",
            "--rdp",
            "none",
            "--dbus-address",
            bus.address(),
        ])
        .env("VDI_LOG", "info")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log_path).expect("log"))
        .spawn()
        .expect("bridge");
    let mut bridge = Proc {
        child,
        name: "bridge",
    };
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    // Started before QEMU: it waits for org.qemu to appear.
    let addr = bus.address().to_owned();
    let path = dir.path().to_owned();
    let vm = tokio::task::spawn_blocking(move || {
        let mut vm = Vm::start(&path, &addr, Video::StdVga);
        vm.wait_ready();
        vm
    })
    .await
    .expect("vm");
    assert!(
        wait_until(Duration::from_secs(20), || log()
            .contains("listener registered")),
        "bridge did not attach:\n{}",
        log()
    );
    bridge.signal("TERM");
    let status = bridge.wait_timeout(Duration::from_secs(5)).expect("exit");
    assert!(status.success(), "{status:?}");
    drop(vm);
    bus.stop().await;
}
