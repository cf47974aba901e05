//! `vdi-sidecar serve` driven the way virt-launcher drives a hook sidecar: over its Unix socket
//! with a gRPC client, through Info, OnDefineDomain (all versions), bad input, and Shutdown.

mod common;

use std::time::{Duration, Instant};

use common::{Sidecar, pids_with_cmdline, uds_channel, wait_until};
use tonic::Code;
use vdi_sidecar::hook::domain::{RewriteOptions, rewrite};
use vdi_sidecar::hook::proto::{info, v1alpha1, v1alpha2, v1alpha3};

const VMI: &str = r#"{"apiVersion":"kubevirt.io/v1","kind":"VirtualMachineInstance",
  "metadata":{"name":"vm-basic","namespace":"default","annotations":{}},"spec":{}}"#;

fn domain() -> String {
    std::fs::read_to_string(common::data_file("domains/kubevirt-basic.xml")).expect("corpus")
}

fn expected(address: &str) -> String {
    rewrite(
        &domain(),
        &RewriteOptions {
            bus_address: address.into(),
            drop_vnc: false,
            audio: true,
            video_model: "virtio".into(),
            display: true,
            qemu_env: Vec::new(),
            clipboard: true,
        },
    )
    .expect("rewrite")
    .xml
}

fn daemon_pids(sc: &Sidecar) -> Vec<u32> {
    pids_with_cmdline(
        &sc.hooks_dir()
            .join("vdi/dbus-daemon.conf")
            .display()
            .to_string(),
    )
}

async fn info_ok(sc: &Sidecar) -> info::InfoResult {
    let started = Instant::now();
    let mut client = info::info_client::InfoClient::new(uds_channel(&sc.socket()).await);
    let res = tokio::time::timeout(Duration::from_secs(1), client.info(info::InfoParams {}))
        .await
        .expect("Info must answer within 1 s")
        .expect("Info ok")
        .into_inner();
    assert!(started.elapsed() < Duration::from_secs(1));
    res
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_info_and_every_callbacks_version_then_exits_on_shutdown() {
    let mut sc = Sidecar::start(&[], &[("CONTAINER_NAME", "hook-sidecar-0")]);
    // The bus listens before the hook socket exists.
    assert!(
        sc.bus_socket().exists(),
        "bus socket must exist once the hook socket does"
    );
    assert_eq!(daemon_pids(&sc).len(), 1, "one dbus-daemon");

    let res = info_ok(&sc).await;
    assert_eq!(res.name, "vdi-sidecar");
    assert_eq!(res.versions, ["v1alpha3", "v1alpha2", "v1alpha1"]);
    let points: Vec<_> = res.hook_points.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(points, ["OnDefineDomain", "Shutdown"]);

    let want = expected("unix:path=/var/run/kubevirt-hooks/hook-sidecar-0/vdi/bus");
    let ch = uds_channel(&sc.socket()).await;
    let out1 = v1alpha1::callbacks_client::CallbacksClient::new(ch.clone())
        .on_define_domain(v1alpha1::OnDefineDomainParams {
            domain_xml: domain().into_bytes(),
            vmi: VMI.as_bytes().to_vec(),
        })
        .await
        .expect("v1alpha1")
        .into_inner()
        .domain_xml;
    assert_eq!(String::from_utf8(out1).expect("utf8"), want);

    let out2 = v1alpha2::callbacks_client::CallbacksClient::new(ch.clone())
        .on_define_domain(v1alpha2::OnDefineDomainParams {
            domain_xml: domain().into_bytes(),
            vmi: VMI.as_bytes().to_vec(),
        })
        .await
        .expect("v1alpha2")
        .into_inner()
        .domain_xml;
    assert_eq!(String::from_utf8(out2).expect("utf8"), want);

    let mut v3 = v1alpha3::callbacks_client::CallbacksClient::new(ch.clone());
    let out3 = v3
        .on_define_domain(v1alpha3::OnDefineDomainParams {
            domain_xml: domain().into_bytes(),
            vmi: VMI.as_bytes().to_vec(),
        })
        .await
        .expect("v1alpha3")
        .into_inner()
        .domain_xml;
    assert_eq!(String::from_utf8(out3.clone()).expect("utf8"), want);

    // KubeVirt's second and third defines feed the read-back back in: same result.
    let again = v3
        .on_define_domain(v1alpha3::OnDefineDomainParams {
            domain_xml: out3,
            vmi: VMI.as_bytes().to_vec(),
        })
        .await
        .expect("second define")
        .into_inner()
        .domain_xml;
    assert_eq!(String::from_utf8(again).expect("utf8"), want);

    // Per-VM annotation overrides reach the rewrite.
    let vmi_no_audio = r#"{"metadata":{"name":"x","annotations":{"vdi.kubevirt.io/audio":"false","vdi.kubevirt.io/drop-vnc":"true"}}}"#;
    let out = v3
        .on_define_domain(v1alpha3::OnDefineDomainParams {
            domain_xml: domain().into_bytes(),
            vmi: vmi_no_audio.as_bytes().to_vec(),
        })
        .await
        .expect("annotated define")
        .into_inner()
        .domain_xml;
    let out = String::from_utf8(out).expect("utf8");
    assert!(
        !out.contains("<audio") && !out.contains("type=\"vnc\""),
        "{out}"
    );

    // Shutdown: exits 0 within 5 s and leaves no dbus-daemon or sockets behind.
    v3.shutdown(v1alpha3::ShutdownParams {})
        .await
        .expect("Shutdown");
    drop(v3);
    drop(ch);
    let status = sc
        .proc
        .wait_timeout(Duration::from_secs(5))
        .expect("exit within 5 s");
    assert!(status.success(), "exit status {status:?}");
    assert!(
        wait_until(Duration::from_secs(2), || daemon_pids(&sc).is_empty()),
        "dbus-daemon left behind: {:?}",
        daemon_pids(&sc)
    );
    assert!(!sc.socket().exists(), "hook socket left behind");
    assert!(!sc.bus_socket().exists(), "bus socket left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors_and_server_survives() {
    let sc = Sidecar::start(&[], &[]);
    let mut v3 = v1alpha3::callbacks_client::CallbacksClient::new(uds_channel(&sc.socket()).await)
        .max_encoding_message_size(64 * 1024 * 1024);
    let cases: Vec<(&str, Vec<u8>, Vec<u8>, &str)> = vec![
        ("not xml", b"hello".to_vec(), VMI.into(), "malformed"),
        (
            "truncated",
            b"<domain><devices>".to_vec(),
            VMI.into(),
            "malformed",
        ),
        (
            "wrong root",
            b"<network/>".to_vec(),
            VMI.into(),
            "root element is <network>",
        ),
        (
            "no devices",
            b"<domain><name>x</name></domain>".to_vec(),
            VMI.into(),
            "no <devices>",
        ),
        ("not utf-8", vec![0xff, 0xfe, 0x3c], VMI.into(), "not UTF-8"),
        (
            "bad vmi",
            domain().into_bytes(),
            b"{not json".to_vec(),
            "VMI is not valid JSON",
        ),
        (
            "bad annotation",
            domain().into_bytes(),
            br#"{"metadata":{"annotations":{"vdi.kubevirt.io/video":"evil"}}}"#.to_vec(),
            "vdi.kubevirt.io/video",
        ),
        (
            "oversized",
            vec![b' '; 16 * 1024 * 1024 + 1],
            VMI.into(),
            "more than the 16777216-byte limit",
        ),
    ];
    for (what, domain_xml, vmi, msg) in cases {
        let err = v3
            .on_define_domain(v1alpha3::OnDefineDomainParams { domain_xml, vmi })
            .await
            .expect_err(what);
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        assert!(err.message().contains(msg), "{what}: {:?}", err.message());
    }
    // Still serving.
    info_ok(&sc).await;
    let ok = v3
        .on_define_domain(v1alpha3::OnDefineDomainParams {
            domain_xml: domain().into_bytes(),
            vmi: Vec::new(),
        })
        .await;
    assert!(ok.is_ok(), "{ok:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_cleanly() {
    let mut sc = Sidecar::start(&[], &[]);
    info_ok(&sc).await;
    assert_eq!(daemon_pids(&sc).len(), 1);
    sc.proc.signal("TERM");
    let status = sc
        .proc
        .wait_timeout(Duration::from_secs(5))
        .expect("exit within 5 s");
    assert!(status.success(), "exit status {status:?}");
    assert!(wait_until(Duration::from_secs(2), || daemon_pids(&sc).is_empty()));
    assert!(!sc.socket().exists() && !sc.bus_socket().exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaces_stale_socket_and_restarts_a_dead_bus() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hooks = dir.path().join("hooks");
    std::fs::create_dir_all(hooks.join("vdi")).expect("mkdir");
    // Left over from a crashed earlier run.
    std::fs::write(hooks.join("vdi-sidecar.sock"), b"stale").expect("stale socket");
    std::fs::write(hooks.join("vdi/bus"), b"stale").expect("stale bus");
    let sc = Sidecar::start_in(dir, &[], &[]);
    info_ok(&sc).await;

    let first = daemon_pids(&sc);
    assert_eq!(first.len(), 1);
    std::process::Command::new("kill")
        .args(["-KILL", &first[0].to_string()])
        .status()
        .expect("kill");
    assert!(
        wait_until(Duration::from_secs(10), || {
            let now = daemon_pids(&sc);
            now.len() == 1 && now[0] != first[0] && sc.bus_socket().exists()
        }),
        "dbus-daemon was not restarted"
    );
    // The restarted bus answers.
    let out = std::process::Command::new("dbus-send")
        .arg(format!("--bus=unix:path={}", sc.bus_socket().display()))
        .args([
            "--print-reply",
            "--dest=org.freedesktop.DBus",
            "/org/freedesktop/DBus",
        ])
        .arg("org.freedesktop.DBus.GetId")
        .output()
        .expect("dbus-send");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn custom_bus_layout_is_written_into_the_domain() {
    // The seed's PVC layout: bus on a volume mounted at /vdi here and /var/run/vdi in compute.
    let dir = tempfile::tempdir().expect("tempdir");
    let bus_dir = dir.path().join("pvc");
    let sc = Sidecar::start(
        &[
            "--bus-dir",
            bus_dir.to_str().expect("path"),
            "--qemu-bus-address",
            "unix:path=/var/run/vdi/bus",
        ],
        &[],
    );
    assert!(bus_dir.join("bus").exists());
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let out = rt.block_on(async {
        v1alpha3::callbacks_client::CallbacksClient::new(uds_channel(&sc.socket()).await)
            .on_define_domain(v1alpha3::OnDefineDomainParams {
                domain_xml: domain().into_bytes(),
                vmi: Vec::new(),
            })
            .await
            .expect("define")
            .into_inner()
            .domain_xml
    });
    assert_eq!(
        String::from_utf8(out).expect("utf8"),
        expected("unix:path=/var/run/vdi/bus")
    );
}

/// grpcio (gRPC C-core), as `grpc.insecure_channel("unix:/path")` dials: its `:authority` is the
/// socket path, percent-encoded. Info and OnDefineDomain (v1alpha1, raw protobuf) must answer.
const GRPCIO_CLIENT: &str = r#"
import sys, grpc
sock, domain = sys.argv[1], open(sys.argv[2], 'rb').read()
ch = grpc.insecure_channel('unix:' + sock)
info = ch.unary_unary('/kubevirt.hooks.info.Info/Info')(b'', timeout=5)
assert b'vdi-sidecar' in info and b'OnDefineDomain' in info, info
# OnDefineDomainParams { bytes domainXML = 1; bytes vmi = 2; }
def field(n, b):
    out, v = bytes([n << 3 | 2]), len(b)
    while v >= 0x80:
        out += bytes([v & 0x7f | 0x80]); v >>= 7
    return out + bytes([v]) + b
req = field(1, domain) + field(2, b'{"metadata":{"name":"vm-grpcio"}}')
out = ch.unary_unary('/kubevirt.hooks.v1alpha1.Callbacks/OnDefineDomain')(req, timeout=5)
assert b"type='dbus'" in out or b'type="dbus"' in out, out[:200]
print('grpcio ok')
"#;

#[test]
fn a_grpc_client_sending_the_socket_path_as_authority_is_answered() {
    let sc = Sidecar::start(&[], &[]);
    let script = tempfile::NamedTempFile::new().expect("script");
    std::fs::write(script.path(), GRPCIO_CLIENT).expect("write");
    let out = std::process::Command::new("python3")
        .arg(script.path())
        .arg(sc.socket())
        .arg(common::data_file("domains/kubevirt-basic.xml"))
        .output()
        .expect("python3 (install grpcio: ci/install-deps.sh)");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("grpcio ok"),
        "grpcio client failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A sidecar that cannot serve its desktop (port taken) must fail before virt-launcher sees its
/// hook socket: a socket left behind without a server makes virt-launcher's call fail the VMI
/// with "connection refused" instead of a clear exit of the sidecar container.
#[test]
fn a_busy_viewer_port_fails_the_start_before_the_hook_socket_appears() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let hooks = dir.path().join("hooks");
    let out = std::process::Command::new(common::BIN)
        .args(["serve", "--vnc", &addr, "--insecure-no-auth", "--hooks-dir"])
        .arg(&hooks)
        .env_remove("CONTAINER_NAME")
        .env("VDI_HTTP", "none")
        .env("VDI_RDP", "none")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&addr),
        "the error names the address:\n{stderr}"
    );
    assert!(
        !hooks.join("vdi-sidecar.sock").exists(),
        "socket left behind"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&hooks)
        .expect("hooks dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("sock"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
