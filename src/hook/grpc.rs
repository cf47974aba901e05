//! gRPC glue: the Info service and the three Callbacks versions over one Unix socket, all
//! calling the same pure rewrite.

use std::future::Future;
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{info, info_span, warn};

use super::authority::AuthorityFix;
use super::domain::{MAX_INPUT_BYTES, RewriteOptions, rewrite_bytes};
use super::proto::{info as pinfo, plugins_v1alpha1 as plugins, v1alpha1, v1alpha2, v1alpha3};
use super::vmi::VmiInfo;
use crate::health::Health;
use crate::modules::{Modules, Plan};

/// Hook points we subscribe to (names from kubevirt pkg/hooks/info/info.go).
pub const HOOK_POINTS: &[&str] = &["OnDefineDomain", "Shutdown"];
/// Callbacks versions we serve, in virt-launcher's order of preference.
pub const VERSIONS: &[&str] = &["v1alpha3", "v1alpha2", "v1alpha1"];

/// Room for a domain and a VMI at the limit plus protobuf framing, so that oversized input gets
/// our own error message rather than a transport one.
const MAX_MESSAGE_BYTES: usize = 2 * MAX_INPUT_BYTES + 64 * 1024;

/// State shared by every service: the operator's rewrite options and the process shutdown.
#[derive(Clone)]
pub struct HookService {
    base: Arc<RewriteOptions>,
    shutdown: CancellationToken,
    health: Health,
    modules: Arc<Modules>,
}

impl HookService {
    /// `shutdown` is cancelled when virt-launcher calls v1alpha3 `Shutdown`.
    pub fn new(base: RewriteOptions, shutdown: CancellationToken) -> Self {
        Self {
            base: Arc::new(base),
            shutdown,
            health: Health::default(),
            modules: Arc::new(Modules::launcher()),
        }
    }

    /// QEMU's D-Bus display modules come from these packs (default: the launcher's own).
    pub fn with_modules(mut self, modules: Arc<Modules>) -> Self {
        self.modules = modules;
        self
    }

    /// Reports each rewrite to `health` (what QEMU should then have).
    pub fn with_health(mut self, health: Health) -> Self {
        self.health = health;
        self
    }

    async fn define(
        &self,
        version: &'static str,
        domain: Vec<u8>,
        vmi: Vec<u8>,
    ) -> Result<Vec<u8>, Status> {
        let base = Arc::clone(&self.base);
        let health = self.health.clone();
        let modules = Arc::clone(&self.modules);
        tokio::task::spawn_blocking(move || {
            define_blocking(&base, &modules, version, &domain, &vmi, &health)
        })
        .await
        .map_err(|e| Status::internal(format!("rewrite task failed: {e}")))?
    }
}

fn define_blocking(
    base: &RewriteOptions,
    modules: &Modules,
    version: &'static str,
    domain: &[u8],
    vmi: &[u8],
    health: &Health,
) -> Result<Vec<u8>, Status> {
    let vmi = VmiInfo::parse(vmi).map_err(|e| {
        warn!(version, error = %e, "domain rejected: bad VMI");
        Status::invalid_argument(e.to_string())
    })?;
    let _span = info_span!("define", vm = %vmi.name, version).entered();
    if !vmi.name.is_empty() {
        let (namespace, name) = vmi.name.split_once('/').unwrap_or(("", &vmi.name));
        crate::metrics::global().set_vm(namespace, name, true);
    }
    let mut opts = vmi.apply(base);
    let no_display = match modules.plan(vmi.launcher.as_deref()) {
        Plan::Launcher => None,
        Plan::Env(env) => {
            opts.qemu_env = env;
            None
        }
        Plan::NoDisplay(why) => {
            warn!(launcher = vmi.launcher.as_deref().unwrap_or(""), "{why}");
            opts.display = false;
            Some(why)
        }
    };
    match rewrite_bytes(domain, &opts) {
        Ok(out) => {
            let s = &out.summary;
            info!(
                removed_graphics = s.removed_graphics,
                removed_audio = s.removed_audio,
                kept_graphics = s.kept_graphics,
                added_video = s.added_video,
                audio = s.added_audio,
                audio_skipped = s.audio_skipped.unwrap_or(""),
                bus = %opts.bus_address,
                qemu_env = s.qemu_env,
                display = !s.display_left_out,
                "domain rewritten"
            );
            match no_display {
                Some(why) => health.display_left_out(why),
                None => health.domain_defined(s.added_audio),
            }
            Ok(out.xml.into_bytes())
        }
        Err(e) => {
            warn!(error = %e, "domain rejected");
            Err(Status::invalid_argument(e.to_string()))
        }
    }
}

#[tonic::async_trait]
impl pinfo::info_server::Info for HookService {
    async fn info(
        &self,
        _req: Request<pinfo::InfoParams>,
    ) -> Result<Response<pinfo::InfoResult>, Status> {
        info!("Info called by virt-launcher");
        Ok(Response::new(pinfo::InfoResult {
            name: super::HOOK_NAME.to_owned(),
            hook_points: HOOK_POINTS
                .iter()
                .map(|name| pinfo::HookPoint {
                    name: (*name).to_owned(),
                    priority: 0,
                })
                .collect(),
            versions: VERSIONS.iter().map(|v| (*v).to_owned()).collect(),
        }))
    }
}

#[tonic::async_trait]
impl v1alpha1::callbacks_server::Callbacks for HookService {
    async fn on_define_domain(
        &self,
        req: Request<v1alpha1::OnDefineDomainParams>,
    ) -> Result<Response<v1alpha1::OnDefineDomainResult>, Status> {
        let p = req.into_inner();
        let domain_xml = self.define("v1alpha1", p.domain_xml, p.vmi).await?;
        Ok(Response::new(v1alpha1::OnDefineDomainResult { domain_xml }))
    }
}

#[tonic::async_trait]
impl v1alpha2::callbacks_server::Callbacks for HookService {
    async fn on_define_domain(
        &self,
        req: Request<v1alpha2::OnDefineDomainParams>,
    ) -> Result<Response<v1alpha2::OnDefineDomainResult>, Status> {
        let p = req.into_inner();
        let domain_xml = self.define("v1alpha2", p.domain_xml, p.vmi).await?;
        Ok(Response::new(v1alpha2::OnDefineDomainResult { domain_xml }))
    }

    /// Not subscribed; answered unchanged in case a launcher calls it anyway.
    async fn pre_cloud_init_iso(
        &self,
        req: Request<v1alpha2::PreCloudInitIsoParams>,
    ) -> Result<Response<v1alpha2::PreCloudInitIsoResult>, Status> {
        let p = req.into_inner();
        Ok(Response::new(v1alpha2::PreCloudInitIsoResult {
            cloud_init_no_cloud_source: p.cloud_init_no_cloud_source,
            cloud_init_data: p.cloud_init_data,
        }))
    }
}

#[tonic::async_trait]
impl v1alpha3::callbacks_server::Callbacks for HookService {
    async fn on_define_domain(
        &self,
        req: Request<v1alpha3::OnDefineDomainParams>,
    ) -> Result<Response<v1alpha3::OnDefineDomainResult>, Status> {
        let p = req.into_inner();
        let domain_xml = self.define("v1alpha3", p.domain_xml, p.vmi).await?;
        Ok(Response::new(v1alpha3::OnDefineDomainResult { domain_xml }))
    }

    /// Not subscribed; answered unchanged in case a launcher calls it anyway.
    async fn pre_cloud_init_iso(
        &self,
        req: Request<v1alpha3::PreCloudInitIsoParams>,
    ) -> Result<Response<v1alpha3::PreCloudInitIsoResult>, Status> {
        let p = req.into_inner();
        Ok(Response::new(v1alpha3::PreCloudInitIsoResult {
            cloud_init_no_cloud_source: p.cloud_init_no_cloud_source,
            cloud_init_data: p.cloud_init_data,
        }))
    }

    async fn shutdown(
        &self,
        _req: Request<v1alpha3::ShutdownParams>,
    ) -> Result<Response<v1alpha3::ShutdownResult>, Status> {
        info!("Shutdown called by virt-launcher");
        self.shutdown.cancel();
        Ok(Response::new(v1alpha3::ShutdownResult {}))
    }
}

/// Invocation contexts KubeVirt's plugin pipeline uses (virtwrap/plugins); the rewrite is the
/// same for both and idempotent, so a migration target gets the domain the source booted with.
pub const PLUGIN_CONTEXTS: &[&str] = &["Boot", "MigrationTarget"];

#[tonic::async_trait]
impl plugins::domain_hook_service_server::DomainHookService for HookService {
    async fn mutate_domain(
        &self,
        req: Request<plugins::MutateDomainRequest>,
    ) -> Result<Response<plugins::MutateDomainResponse>, Status> {
        let p = req.into_inner();
        if p.domain_type != "libvirt" {
            warn!(domain_type = %p.domain_type, "MutateDomain rejected");
            return Err(Status::invalid_argument(format!(
                "domain_type {:?}: only \"libvirt\" domains can be mutated",
                p.domain_type
            )));
        }
        let context = p
            .sidecar_context
            .map(|c| c.invocation_context)
            .unwrap_or_default();
        if !PLUGIN_CONTEXTS.contains(&context.as_str()) {
            // A context KubeVirt adds later gets the same idempotent rewrite; say so.
            warn!(%context, "MutateDomain: unknown invocation context, rewriting as for Boot");
        }
        info!(%context, "MutateDomain called by virt-launcher");
        let domain = self.define("plugin/v1alpha1", p.domain, p.vmi).await?;
        Ok(Response::new(plugins::MutateDomainResponse { domain }))
    }
}

/// Serves the Plugin API's domain hook on `listener` until `signal` completes (plugin mode:
/// there is no Info or Shutdown call; the pod's termination stops us).
pub async fn serve_plugin(
    listener: UnixListener,
    service: HookService,
    signal: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .concurrency_limit_per_connection(8)
        .add_service(
            plugins::domain_hook_service_server::DomainHookServiceServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(incoming(listener), signal)
        .await
}

/// The connections on the hook socket, each behind the `:authority` rewrite (see
/// [`super::authority`]).
fn incoming(
    listener: UnixListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<AuthorityFix<tokio::net::UnixStream>>> {
    UnixListenerStream::new(listener).map(|r| r.map(AuthorityFix::new))
}

/// Serves every hook service on `listener` until `signal` completes, then finishes in-flight
/// calls (so the `Shutdown` reply still reaches virt-launcher).
pub async fn serve(
    listener: UnixListener,
    service: HookService,
    signal: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .concurrency_limit_per_connection(8)
        .add_service(
            pinfo::info_server::InfoServer::new(service.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            v1alpha1::callbacks_server::CallbacksServer::new(service.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            v1alpha2::callbacks_server::CallbacksServer::new(service.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            v1alpha3::callbacks_server::CallbacksServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(incoming(listener), signal)
        .await
}
