//! `vdi-sidecar serve --mode plugin`: KubeVirt ≥ 1.9's Plugin domain hook
//! (`kubevirt.hooks.plugins.v1alpha1.DomainHookService/MutateDomain`), driven the way
//! virt-launcher drives it: Boot, then MigrationTarget on what Boot produced, on domains in the
//! shapes KubeVirt sends (Go-marshalled, libvirtxml-marshalled, libvirt's own style); bad input
//! gets a gRPC error and the server keeps serving.

mod common;

use common::{Sidecar, uds_channel};
use tonic::Code;
use vdi_sidecar::hook::domain::{RewriteOptions, rewrite};
use vdi_sidecar::hook::proto::plugins_v1alpha1 as plugins;

const VMI: &str = r#"{"apiVersion":"kubevirt.io/v1","kind":"VirtualMachineInstance",
  "metadata":{"name":"vm-plugin","namespace":"default","annotations":{}},"spec":{}}"#;
const PLUGIN: &str = "vdi-test";
const BUS: &str = "unix:path=/var/run/kubevirt-plugin/vdi-test/vdi/bus";

fn request(domain: &[u8], context: &str) -> plugins::MutateDomainRequest {
    plugins::MutateDomainRequest {
        domain_type: "libvirt".into(),
        domain: domain.to_vec(),
        vmi: VMI.as_bytes().to_vec(),
        sidecar_context: Some(plugins::SidecarContext {
            invocation_context: context.into(),
        }),
    }
}

type Client =
    plugins::domain_hook_service_client::DomainHookServiceClient<tonic::transport::Channel>;

async fn mutate(
    c: &mut Client,
    req: plugins::MutateDomainRequest,
) -> Result<Vec<u8>, tonic::Status> {
    c.mutate_domain(req).await.map(|r| r.into_inner().domain)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutate_domain_for_boot_and_migration_target() {
    let sc = Sidecar::start(&["--mode", "plugin", "--plugin-name", PLUGIN], &[]);
    // The bus listens before the hook socket exists (KubeVirt waits only for the hook socket).
    assert!(sc.bus_socket().exists(), "no bus socket");
    let log = sc.log();
    assert!(log.contains("Plugin") && log.contains("hook.sock"), "{log}");
    assert!(
        log.contains(BUS),
        "the domain must name the bus as compute sees it:\n{log}"
    );

    let mut client = Client::new(uds_channel(&sc.socket()).await);
    let opts = RewriteOptions {
        bus_address: BUS.into(),
        drop_vnc: false,
        audio: true,
        video_model: "virtio".into(),
        display: true,
        qemu_env: Vec::new(),
        clipboard: true,
    };
    for file in [
        "kubevirt-basic.xml",
        "libvirtxml-marshalled.xml",
        "libvirt-style.xml",
    ] {
        let domain =
            std::fs::read_to_string(common::data_file(&format!("domains/{file}"))).expect("corpus");
        let want = rewrite(&domain, &opts).expect("rewrite").xml;
        let boot = mutate(&mut client, request(domain.as_bytes(), "Boot"))
            .await
            .unwrap_or_else(|e| panic!("{file}: Boot: {e}"));
        assert_eq!(String::from_utf8_lossy(&boot), want, "{file}: Boot");
        assert!(want.contains(&format!("address=\"{BUS}\"")), "{want}");
        // The migration target's hook sees the domain as booted: nothing changes.
        let target = mutate(&mut client, request(&boot, "MigrationTarget"))
            .await
            .unwrap_or_else(|e| panic!("{file}: MigrationTarget: {e}"));
        assert_eq!(target, boot, "{file}: MigrationTarget is not idempotent");
    }

    let domain = std::fs::read(common::data_file("domains/kubevirt-basic.xml")).expect("corpus");
    let mut wrong_type = request(&domain, "Boot");
    wrong_type.domain_type = "xen".into();
    let mut bad_vmi = request(&domain, "Boot");
    bad_vmi.vmi = b"{not json".to_vec();
    let bad = [
        wrong_type,
        request(b"<domain><devices>", "Boot"),
        request(b"\xff\xfe not xml", "Boot"),
        request(b"", "Boot"),
        bad_vmi,
        request(&vec![b'<'; 9 * 1024 * 1024], "Boot"),
    ];
    for (i, req) in bad.into_iter().enumerate() {
        let err = mutate(&mut client, req)
            .await
            .expect_err("bad input accepted");
        assert!(
            matches!(
                err.code(),
                Code::InvalidArgument | Code::OutOfRange | Code::ResourceExhausted
            ),
            "case {i}: {err:?}"
        );
    }
    // Still serving, and an unknown context gets the same idempotent rewrite.
    let again = mutate(&mut client, request(&domain, "SomethingNew"))
        .await
        .expect("alive after bad input");
    assert!(String::from_utf8_lossy(&again).contains(BUS));
    assert!(sc.log().contains("unknown invocation context"));
}

#[test]
fn plugin_mode_needs_a_valid_plugin_name() {
    for args in [
        vec!["serve", "--mode", "plugin"],
        vec!["serve", "--mode", "plugin", "--plugin-name", "Not_A_Name"],
    ] {
        let out = std::process::Command::new(common::BIN)
            .args(&args)
            .env("VDI_VNC", "none")
            .env("VDI_HTTP", "none")
            .env("VDI_RDP", "none")
            .output()
            .expect("run");
        assert!(!out.status.success(), "{args:?} started");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("plugin"), "{args:?}: {err}");
    }
}
