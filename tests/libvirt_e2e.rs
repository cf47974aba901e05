//! The whole control path for real: a domain goes through our hook (as virt-launcher sends it),
//! libvirt defines and starts it, QEMU joins the bus `vdi-sidecar serve` runs, and the sidecar
//! attaches to its display and receives frames.

mod common;

use std::time::Duration;

use common::libvirt::{ensure, virsh};
use common::{Sidecar, uds_channel, wait_until};
use vdi_sidecar::hook::proto::{plugins_v1alpha1 as plugins, v1alpha3};

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
    boots_through(false, Modules::Launcher).await;
}

/// The same through plugin mode's MutateDomain (KubeVirt ≥ 1.9).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libvirt_boots_the_plugin_mode_domain_and_qemu_joins_our_bus() {
    boots_through(true, Modules::Launcher).await;
}

/// A stock launcher: QEMU loads the D-Bus display from the pack the sidecar installed in the
/// shared directory (its `/proc/<pid>/maps` shows `ui-dbus.so` mapped from there, though the
/// system copy exists here too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libvirt_loads_the_display_modules_from_our_pack() {
    boots_through(false, Modules::Pack).await;
}

/// A launcher no pack matches: no D-Bus display in the domain, the VM still starts, and the log
/// and `/readyz` say which launcher was seen and which packs there are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libvirt_starts_the_vm_without_our_display_when_no_pack_matches() {
    boots_through(false, Modules::NoMatch).await;
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Modules {
    /// The launcher has the modules (no packs in the image).
    Launcher,
    /// A pack matching the VMI's launcher.
    Pack,
    /// Packs, none for the VMI's launcher.
    NoMatch,
}

const PACK: &str = "debian-e2e";
const PACK_LAUNCHER: &str = "example/virt-launcher:v0.0.0-e2e";

/// A pack of this machine's own QEMU modules (they match its QEMU build).
fn debian_pack(root: &std::path::Path) {
    let dir = root.join(PACK);
    std::fs::create_dir_all(dir.join("modules")).expect("pack dir");
    for m in vdi_sidecar::modules::REQUIRED {
        std::fs::copy(
            std::path::Path::new("/usr/lib/x86_64-linux-gnu/qemu").join(m),
            dir.join("modules").join(m),
        )
        .unwrap_or_else(|e| panic!("{m}: {e} (install qemu-system-modules-opengl)"));
    }
    let manifest = serde_json::json!({"qemu": "debian", "launchers": ["v0.0.0-e2e"]});
    std::fs::write(dir.join("pack.json"), manifest.to_string()).expect("pack.json");
}

async fn boots_through(plugin: bool, modules: Modules) {
    let _daemons = ensure();
    let guest = common::qemu::guest();
    let dir = tempfile::tempdir().expect("tempdir");
    let bus = dir.path().join("hooks/vdi/bus");
    let uid = libvirt_qemu_uid().to_string();
    let address = format!("unix:path={}", bus.display());
    let packs = dir.path().join("packs");
    let packs_arg = packs.display().to_string();
    let http = format!(
        "127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port()
    );
    let mut args = vec![
        "--qemu-bus-address",
        &address,
        "--bus-allow-uid",
        &uid,
        "--qemu-modules-dir",
        &packs_arg,
        "--http",
        &http,
        "--http-insecure",
    ];
    if modules != Modules::Launcher {
        debian_pack(&packs);
    }
    if plugin {
        args.extend(["--mode", "plugin", "--plugin-name", "vdi-e2e"]);
    }
    let sc = Sidecar::start_in(dir, &args, &[]);
    let name = format!("vdi-e2e-{}-{plugin}-{modules:?}", std::process::id());
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
    let launcher = match modules {
        Modules::NoMatch => "example/virt-launcher:v0.0.0-other",
        _ => PACK_LAUNCHER,
    };
    let vmi = serde_json::json!({
        "metadata": {"name": "e2e", "namespace": "default"},
        "status": {"launcherContainerImageVersion": launcher},
    })
    .to_string()
    .into_bytes();
    let channel = uds_channel(&sc.socket()).await;
    let rewritten = if plugin {
        plugins::domain_hook_service_client::DomainHookServiceClient::new(channel)
            .mutate_domain(plugins::MutateDomainRequest {
                domain_type: "libvirt".into(),
                domain: domain.into_bytes(),
                vmi,
                sidecar_context: Some(plugins::SidecarContext {
                    invocation_context: "Boot".into(),
                }),
            })
            .await
            .expect("MutateDomain")
            .into_inner()
            .domain
    } else {
        v1alpha3::callbacks_client::CallbacksClient::new(channel)
            .on_define_domain(v1alpha3::OnDefineDomainParams {
                domain_xml: domain.into_bytes(),
                vmi,
            })
            .await
            .expect("OnDefineDomain")
            .into_inner()
            .domain_xml
    };
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
    if modules == Modules::NoMatch {
        let state = String::from_utf8_lossy(&virsh(&["domstate", &name]).stdout).into_owned();
        let dump = String::from_utf8_lossy(&virsh(&["dumpxml", &name]).stdout).into_owned();
        cleanup();
        assert!(state.contains("running"), "{state}");
        assert!(!dump.contains("type='dbus'"), "{dump}");
        assert!(dump.contains("<graphics type='vnc'"), "{dump}");
        let log = sc.log();
        assert!(
            log.lines().any(|l| l.contains("WARN")
                && l.contains(
                    "no QEMU module pack matches the launcher example/virt-launcher:v0.0.0-other"
                )
                && l.contains(PACK)),
            "no warning naming the launcher and the packs:\n{log}"
        );
        let readyz = common::http_get(&http, "/readyz");
        assert!(
            readyz.contains("no D-Bus display") && readyz.contains("v0.0.0-other"),
            "{readyz}"
        );
        return;
    }
    // Which ui-dbus.so QEMU mapped.
    let pid = std::fs::read_to_string(format!("/run/libvirt/qemu/{name}.pid")).unwrap_or_default();
    let maps_of_qemu =
        || std::fs::read_to_string(format!("/proc/{}/maps", pid.trim())).unwrap_or_default();
    let attached = wait_until(Duration::from_secs(60), || {
        let log = sc.log();
        log.contains("listener registered")
            && (log.contains("Scanout") || log.contains("ScanoutMap"))
    });
    let dump = String::from_utf8_lossy(&virsh(&["dumpxml", &name]).stdout).into_owned();
    let maps = maps_of_qemu();
    cleanup();
    let ui_dbus: Vec<&str> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| p.ends_with("/ui-dbus.so"))
        .collect();
    let ours = sc
        .dir
        .path()
        .join("hooks/vdi/qemu-modules")
        .join(PACK)
        .join("modules/ui-dbus.so");
    match modules {
        Modules::Pack => {
            assert!(
                ui_dbus.iter().all(|p| std::path::Path::new(p) == ours) && !ui_dbus.is_empty(),
                "QEMU mapped {ui_dbus:?}, not {ours:?}"
            );
            assert!(
                dump.contains(&format!(
                    "<qemu:env name='QEMU_MODULE_DIR' value='{}'/>",
                    ours.parent().expect("modules dir").display()
                )),
                "{dump}"
            );
        }
        _ => {
            assert!(
                !ui_dbus.is_empty() && ui_dbus.iter().all(|p| p.starts_with("/usr/")),
                "{ui_dbus:?}"
            );
            assert!(!dump.contains("QEMU_MODULE_DIR"), "{dump}");
        }
    }
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

/// `examples/libvirt/run.sh` as a user runs it: libvirt starts its own bus for a plain domain,
/// `vdi-sidecar bridge` attaches to it, a VNC client sees the firmware screen, and stopping the
/// script removes the domain.
#[test]
fn the_plain_libvirt_example_runs_and_cleans_up() {
    let _daemons = ensure();
    let name = format!("vdi-example-{}", std::process::id());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let dir = tempfile::tempdir().expect("tempdir");
    let log_path = dir.path().join("run.log");
    let log = std::fs::File::create(&log_path).expect("log");
    let child = std::process::Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/libvirt/run.sh"
    ))
    .env("VDI_SIDECAR", common::BIN)
    .env("VDI_NAME", &name)
    .env("VDI_PASSWORD", "example-pw")
    .env(
        "VDI_BRIDGE_ARGS",
        format!("--vnc 127.0.0.1:{port} --rdp none --http none"),
    )
    .env("VDI_LOG", "info")
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::null())
    .stderr(log)
    .spawn()
    .expect("run.sh");
    let mut script = common::Proc {
        child,
        name: "run.sh",
    };
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let png = dir.path().join("screen.png");
    let shown = wait_until(Duration::from_secs(60), || {
        std::process::Command::new("vncdotool")
            .args(["-s", &format!("127.0.0.1::{port}"), "-p", "example-pw"])
            .arg("capture")
            .arg(&png)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
            && std::fs::metadata(&png).is_ok_and(|m| m.len() > 0)
    });
    let attached = read_log();
    script.signal("TERM");
    let status = script.wait_timeout(Duration::from_secs(30));
    let gone = !virsh(&["dominfo", &name]).status.success();
    if !gone {
        let _ = virsh(&["destroy", &name]);
        let _ = virsh(&["undefine", &name]);
    }
    assert!(shown, "no VNC picture from the example:\n{attached}");
    assert!(
        attached.contains("audio listener registered"),
        "libvirt's QEMU exported no audio (is <audio id> inside <graphics>?):\n{attached}"
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "run.sh: {status:?}\n{}",
        read_log()
    );
    assert!(gone, "run.sh left the domain {name} defined");
}
