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

/// The hook-mode hazard on KubeVirt ≥ 1.9 (a Plugin CR makes KubeVirt rebuild a hook's domain and
/// drop `<audio type='dbus'>`), reproduced by its effect: the hook added audio for a VMI with a
/// sound card, but the QEMU that joins has none. The log and `/readyz` must say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hook_mode_reports_audio_that_kubevirt_dropped() {
    use vdi_sidecar::hook::proto::v1alpha3;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let http = format!("127.0.0.1:{port}");
    let sc = Sidecar::start(&["--http", &http, "--http-insecure"], &[]);
    let domain = std::fs::read(common::data_file("domains/kubevirt-basic.xml")).expect("corpus");
    let rewritten =
        v1alpha3::callbacks_client::CallbacksClient::new(common::uds_channel(&sc.socket()).await)
            .on_define_domain(v1alpha3::OnDefineDomainParams {
                domain_xml: domain,
                vmi: br#"{"metadata":{"name":"vm","namespace":"default"}}"#.to_vec(),
            })
            .await
            .expect("OnDefineDomain")
            .into_inner()
            .domain_xml;
    assert!(String::from_utf8_lossy(&rewritten).contains("<audio id=\"1\" type=\"dbus\">"));
    // QEMU as KubeVirt would start it after dropping our audio: display on our bus, no audiodev.
    let addr = format!("unix:path={}", sc.bus_socket().display());
    let mut vm = Vm::start(sc.dir.path(), &addr, Video::StdVga);
    vm.wait_ready();
    assert!(
        wait_until(Duration::from_secs(30), || sc
            .log()
            .contains("the running QEMU has no D-Bus audio")),
        "no warning in the log:\n{}",
        sc.log()
    );
    let readyz = common::http_get(&http, "/readyz");
    assert!(readyz.starts_with("HTTP/1.1 200"), "{readyz}");
    assert!(
        readyz.contains("warning: no guest audio") && readyz.contains("--mode plugin"),
        "{readyz}"
    );
}
