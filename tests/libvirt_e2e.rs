//! The whole control path for real: a domain goes through our hook (as virt-launcher sends it),
//! libvirt defines and starts it, QEMU joins the bus `vdi-sidecar serve` runs, and the sidecar
//! attaches to its display and receives frames.

mod common;

use std::time::Duration;

use common::libvirt::{ensure, virsh};
use common::{Sidecar, uds_channel, wait_until};
use vdi_sidecar::hook::proto::v1alpha3;

/// libvirt's QEMU user on Debian; our bus admits it by uid.
fn libvirt_qemu_uid() -> u32 {
    let out = std::process::Command::new("id")
        .args(["-u", "libvirt-qemu"])
        .output()
        .expect("id");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("libvirt-qemu uid (install libvirt-daemon-system)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libvirt_boots_the_rewritten_domain_and_qemu_joins_our_bus() {
    let _daemons = ensure();
    let guest = common::qemu::guest();
    let dir = tempfile::tempdir().expect("tempdir");
    let bus = dir.path().join("hooks/vdi/bus");
    let uid = libvirt_qemu_uid().to_string();
    let sc = Sidecar::start_in(
        dir,
        &[
            "--qemu-bus-address",
            &format!("unix:path={}", bus.display()),
            "--bus-allow-uid",
            &uid,
        ],
        &[],
    );
    let name = format!("vdi-e2e-{}", std::process::id());
    // A KubeVirt-like domain for the test guest, with KubeVirt's own VNC graphics kept.
    let domain = format!(
        r#"<domain type="qemu">
	<name>{name}</name>
	<memory unit="MiB">256</memory>
	<vcpu>1</vcpu>
	<os>
		<type arch="x86_64" machine="pc">hvm</type>
		<kernel>{k}</kernel>
		<initrd>{i}</initrd>
		<cmdline>console=ttyS0 quiet</cmdline>
	</os>
	<devices>
		<video>
			<model type="vga" heads="1"></model>
		</video>
		<graphics type="vnc">
			<listen type="socket"></listen>
		</graphics>
		<input type="tablet" bus="usb"></input>
		<sound model="ich9"></sound>
	</devices>
</domain>
"#,
        k = guest.join("vmlinuz").display(),
        i = guest.join("initrd.gz").display(),
    );
    let rewritten =
        v1alpha3::callbacks_client::CallbacksClient::new(uds_channel(&sc.socket()).await)
            .on_define_domain(v1alpha3::OnDefineDomainParams {
                domain_xml: domain.into_bytes(),
                vmi: br#"{"metadata":{"name":"e2e","namespace":"default"}}"#.to_vec(),
            })
            .await
            .expect("OnDefineDomain")
            .into_inner()
            .domain_xml;
    let xml_path = sc.dir.path().join("domain.xml");
    std::fs::write(&xml_path, &rewritten).expect("write domain");

    let _ = virsh(&["destroy", &name]);
    let _ = virsh(&["undefine", &name]);
    let def = virsh(&["define", xml_path.to_str().expect("path")]);
    assert!(
        def.status.success(),
        "define: {}",
        String::from_utf8_lossy(&def.stderr)
    );
    let start = virsh(&["start", &name]);
    let cleanup = || {
        let _ = virsh(&["destroy", &name]);
        let _ = virsh(&["undefine", &name]);
    };
    if !start.status.success() {
        cleanup();
        panic!("start: {}", String::from_utf8_lossy(&start.stderr));
    }
    let attached = wait_until(Duration::from_secs(60), || {
        let log = sc.log();
        log.contains("listener registered")
            && (log.contains("Scanout") || log.contains("ScanoutMap"))
    });
    let dump = String::from_utf8_lossy(&virsh(&["dumpxml", &name]).stdout).into_owned();
    cleanup();
    assert!(
        attached,
        "sidecar never attached to libvirt's QEMU:\n{}",
        sc.log()
    );
    assert!(dump.contains("<graphics type='dbus'"), "{dump}");
    assert!(
        dump.contains("<graphics type='vnc'"),
        "KubeVirt's VNC was dropped: {dump}"
    );
    assert!(dump.contains("<audio id='1' type='dbus'>"), "{dump}");
    assert!(
        dump.contains("<settings frequency='48000' channels='2' format='s16'/>"),
        "{dump}"
    );
    // libvirt linked the audiodev to the display: QEMU exported /Audio and we listen to it.
    assert!(
        sc.log().contains("audio listener registered"),
        "no guest audio through libvirt:\n{}",
        sc.log()
    );
}
