//! `vdi-sidecar serve`: the sidecar's life in the virt-launcher pod. Start the bus, then (last)
//! the hook socket; run until virt-launcher calls `Shutdown` or we get SIGTERM/SIGINT; then stop
//! everything and remove what we created.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::bus::{Bus, BusConfig};
use crate::hook::domain::RewriteOptions;
use crate::hook::grpc::{self, HookService};
use crate::qemu::source::{self, SourceOptions};
use crate::viewers::Viewers;

/// Where KubeVirt mounts the hook sockets directory in every sidecar.
pub const DEFAULT_HOOKS_DIR: &str = "/var/run/kubevirt-hooks";
/// Bus directory name inside the hooks directory: nested, so virt-launcher (which dials every
/// non-directory entry of a sidecar's directory) never dials the bus.
pub const BUS_SUBDIR: &str = "vdi";
/// How long in-flight hook calls may take to finish once we stop.
const GRPC_DRAIN: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bus(#[from] crate::bus::Error),
    #[error("cannot create hook socket {path:?}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("hook server failed")]
    Grpc(#[source] tonic::transport::Error),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The bus address QEMU must use, as the compute container sees our bus directory.
/// KubeVirt ≥ 1.6 mounts each sidecar's directory under its container name in compute
/// (`/var/run/kubevirt-hooks/<CONTAINER_NAME>/…`); older releases share one flat directory.
pub fn default_qemu_bus_address(container_name: Option<&str>) -> String {
    match container_name.filter(|n| !n.is_empty()) {
        Some(name) => format!("unix:path={DEFAULT_HOOKS_DIR}/{name}/{BUS_SUBDIR}/bus"),
        None => format!("unix:path={DEFAULT_HOOKS_DIR}/{BUS_SUBDIR}/bus"),
    }
}

/// Everything `serve` needs.
#[derive(Clone)]
pub struct ServeConfig {
    /// The VNC and web listeners, unless disabled.
    pub viewers: Viewers,
    pub hooks_dir: PathBuf,
    pub socket_name: String,
    pub bus: BusConfig,
    pub rewrite: RewriteOptions,
}

fn remove_stale(path: &Path) -> Result<(), Error> {
    match std::fs::remove_file(path) {
        Ok(()) => {
            warn!(path = %path.display(), "removed stale hook socket");
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::Socket {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Cancels `token` on SIGTERM or SIGINT.
pub fn cancel_on_signals(token: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received"),
            _ = int.recv() => info!("SIGINT received"),
            () = token.cancelled() => return,
        }
        token.cancel();
    });
    Ok(())
}

/// Runs the sidecar until `shutdown` is cancelled (by the `Shutdown` hook or a signal).
pub async fn run(cfg: ServeConfig, shutdown: CancellationToken) -> Result<(), Error> {
    let socket_path = cfg.hooks_dir.join(&cfg.socket_name);
    let socket_err = |source| Error::Socket {
        path: socket_path.clone(),
        source,
    };
    std::fs::create_dir_all(&cfg.hooks_dir).map_err(socket_err)?;
    remove_stale(&socket_path)?;

    // The bus must listen before virt-launcher can see our socket: it defines (and starts) the
    // domain right after collecting every hook socket, and QEMU connects to the bus at start.
    let bus = Bus::start(cfg.bus.clone()).await?;

    let listener = match UnixListener::bind(&socket_path) {
        Ok(l) => l,
        Err(e) => {
            bus.stop().await;
            return Err(socket_err(e));
        }
    };
    // virt-launcher runs as the same uid (107, or root for root VMIs) and group (fsGroup 107).
    if let Err(e) = std::fs::set_permissions(&socket_path, std::fs::Permissions::from_mode(0o660)) {
        warn!(error = %e, "cannot set hook socket permissions");
    }
    info!(
        socket = %socket_path.display(),
        qemu_bus_address = %cfg.rewrite.bus_address,
        "hook server listening"
    );

    // The display side: attach to QEMU on our bus whenever it is there.
    let (consoles, display) = source::spawn(
        bus.address().to_owned(),
        SourceOptions::default(),
        shutdown.child_token(),
    );
    if let Err(e) = cfg.viewers.start(&consoles, &shutdown).await {
        bus.stop().await;
        return Err(Error::Listen {
            addr: e.addr,
            source: e.source,
        });
    }

    let service = HookService::new(cfg.rewrite.clone(), shutdown.clone());
    let stop_grpc = shutdown.clone();
    let mut server = tokio::spawn(grpc::serve(listener, service, async move {
        stop_grpc.cancelled().await;
    }));

    let result = tokio::select! {
        () = shutdown.cancelled() => {
            match tokio::time::timeout(GRPC_DRAIN, &mut server).await {
                Ok(Ok(r)) => r.map_err(Error::Grpc),
                Ok(Err(e)) => { warn!(error = %e, "hook server task failed"); Ok(()) }
                Err(_) => { warn!("hook calls still open after {GRPC_DRAIN:?}; closing them"); server.abort(); Ok(()) }
            }
        }
        r = &mut server => match r {
            Ok(r) => r.map_err(Error::Grpc),
            Err(e) => { warn!(error = %e, "hook server task failed"); Ok(()) }
        },
    };

    info!("shutting down");
    display.abort();
    let _ = std::fs::remove_file(&socket_path);
    bus.stop().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_address_follows_kubevirt_layout() {
        assert_eq!(
            default_qemu_bus_address(Some("hook-sidecar-0")),
            "unix:path=/var/run/kubevirt-hooks/hook-sidecar-0/vdi/bus"
        );
        assert_eq!(
            default_qemu_bus_address(None),
            "unix:path=/var/run/kubevirt-hooks/vdi/bus"
        );
        assert_eq!(
            default_qemu_bus_address(Some("")),
            "unix:path=/var/run/kubevirt-hooks/vdi/bus"
        );
    }
}
