//! The hook socket's gRPC calls from virt-launcher, past transport: any bytes as the protobuf
//! body of OnDefineDomain (v1alpha1/2/3), PreCloudInitIso (v1alpha2/3) and the Plugin API's
//! MutateDomain, handled by the real service (VMI JSON and its annotations, the domain rewrite,
//! the module-pack plan). Every call ends in a response or a gRPC status, never a panic.
// Built by cargo-fuzz (`--cfg fuzzing`) as a libFuzzer target; included by tests/fuzz_seeds.rs
// as a module whose `fuzz` replays the committed seeds in the ordinary test run.
#![cfg_attr(fuzzing, no_main)]

use std::sync::OnceLock;

use prost::Message;
use tokio_util::sync::CancellationToken;
use tonic::Request;
use vdi_sidecar::hook::domain::RewriteOptions;
use vdi_sidecar::hook::grpc::HookService;
use vdi_sidecar::hook::proto::{plugins_v1alpha1 as plugins, v1alpha1, v1alpha2, v1alpha3};
use vdi_sidecar::hook::vmi::VmiInfo;

fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|input: &[u8]| fuzz(input));

/// One input.
pub fn fuzz(input: &[u8]) {
    let Some((&pick, body)) = input.split_first() else {
        return;
    };
    let svc = HookService::new(
        RewriteOptions::new("unix:path=/var/run/kubevirt-hooks/vdi/bus"),
        CancellationToken::new(),
    );
    rt().block_on(async {
        match pick % 7 {
            0 => {
                if let Ok(m) = v1alpha1::OnDefineDomainParams::decode(body) {
                    use v1alpha1::callbacks_server::Callbacks;
                    let _ = svc.on_define_domain(Request::new(m)).await;
                }
            }
            1 => {
                if let Ok(m) = v1alpha2::OnDefineDomainParams::decode(body) {
                    use v1alpha2::callbacks_server::Callbacks;
                    let _ = svc.on_define_domain(Request::new(m)).await;
                }
            }
            2 => {
                if let Ok(m) = v1alpha3::OnDefineDomainParams::decode(body) {
                    use v1alpha3::callbacks_server::Callbacks;
                    let _ = svc.on_define_domain(Request::new(m)).await;
                }
            }
            3 => {
                if let Ok(m) = v1alpha2::PreCloudInitIsoParams::decode(body) {
                    use v1alpha2::callbacks_server::Callbacks;
                    let _ = svc.pre_cloud_init_iso(Request::new(m)).await;
                }
            }
            4 => {
                if let Ok(m) = v1alpha3::PreCloudInitIsoParams::decode(body) {
                    use v1alpha3::callbacks_server::Callbacks;
                    let _ = svc.pre_cloud_init_iso(Request::new(m)).await;
                }
            }
            5 => {
                if let Ok(m) = plugins::MutateDomainRequest::decode(body) {
                    use plugins::domain_hook_service_server::DomainHookService;
                    let _ = svc.mutate_domain(Request::new(m)).await;
                }
            }
            _ => {
                // The VMI JSON alone, and the options it yields.
                if let Ok(vmi) = VmiInfo::parse(body) {
                    let _ = vmi.apply(&RewriteOptions::new("unix:path=/x"));
                }
            }
        }
    });
}
