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
/// Plugin mode (KubeVirt ≥ 1.9, gate `Plugins`): the `kubevirt-plugin-sockets` volume, shared
/// with compute; our container sees only `<name>/` of it (subPath), compute sees all of it.
pub const PLUGIN_SOCKETS_DIR: &str = "/var/run/kubevirt-plugin";
/// The domain hook socket the Plugin CR's `sidecar.socketPath` names.
pub const PLUGIN_SOCKET_NAME: &str = "hook.sock";
/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// Which KubeVirt API we serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Legacy hook sidecar: Info + Callbacks (OnDefineDomain, Shutdown).
    #[default]
    Hook,
    /// Plugin domain hook: DomainHookService.MutateDomain.
    Plugin,
}

/// Checks a Plugin CR name (a DNS-1123 subdomain, as Kubernetes names are) and that the sockets
/// under its directory fit in `sun_path`.
pub fn plugin_dir(name: &str) -> Result<PathBuf, String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !ok {
        return Err(format!(
            "plugin name {name:?} is not a Kubernetes object name (lowercase letters, digits, '-', '.')"
        ));
    }
    let dir = Path::new(PLUGIN_SOCKETS_DIR).join(name);
    let longest = dir.join(BUS_SUBDIR).join("bus");
    if longest.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(format!(
            "{} is too long for a Unix socket",
            longest.display()
        ));
    }
    Ok(dir)
}
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
    pub mode: Mode,
    /// QEMU's display modules (the launcher's own, or a pack of the image).
    pub modules: std::sync::Arc<crate::modules::Modules>,
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

/// Binds the hook socket at `path` so that it is never seen there before it listens: bound at a
/// temporary name in the same directory, given its mode, then renamed (atomic on one filesystem).
fn bind_hook_socket(path: &Path) -> std::io::Result<UnixListener> {
    let tmp = path.with_extension("binding");
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    // virt-launcher runs as the same uid (107, or root for root VMIs) and group (fsGroup 107).
    if let Err(e) = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o660)) {
        warn!(error = %e, "cannot set hook socket permissions");
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
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

    // The display side: attach to QEMU on our bus whenever it is there.
    let (consoles, display) = source::spawn(
        bus.address().to_owned(),
        SourceOptions {
            clipboard: cfg.viewers.clipboard,
            ..SourceOptions::default()
        },
        shutdown.child_token(),
    );
    if let Err(e) = cfg.viewers.start(&consoles, &shutdown).await {
        display.abort();
        bus.stop().await;
        return Err(Error::Listen {
            addr: e.addr,
            source: e.source,
        });
    }

    // The hook socket appears only once everything behind it works (virt-launcher calls it as soon
    // as it sees the file, and a failed call fails the VMI): bound and listening under a temporary
    // name, then renamed into place.
    let listener = match bind_hook_socket(&socket_path) {
        Ok(l) => l,
        Err(e) => {
            display.abort();
            bus.stop().await;
            return Err(socket_err(e));
        }
    };
    info!(
        socket = %socket_path.display(),
        mode = ?cfg.mode,
        qemu_bus_address = %cfg.rewrite.bus_address,
        "hook server listening"
    );

    let service = HookService::new(cfg.rewrite.clone(), shutdown.clone())
        .with_health(consoles.health())
        .with_modules(std::sync::Arc::clone(&cfg.modules));
    if cfg.mode == Mode::Hook {
        // The hazard of hook mode on KubeVirt >= 1.9 cannot be seen from in here at start-up (the
        // plugin sockets volume is not mounted in hook sidecars); its effects are, once QEMU
        // attaches or fails to: see `Health`. Check it periodically so the log says it too.
        let health = consoles.health();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            loop {
                tokio::select! {
                    _ = tick.tick() => { health.warnings(); }
                    () = stop.cancelled() => return,
                }
            }
        });
    }
    let stop_grpc = shutdown.clone();
    let stopped = async move { stop_grpc.cancelled().await };
    let mut server = match cfg.mode {
        Mode::Hook => tokio::spawn(grpc::serve(listener, service, stopped)),
        Mode::Plugin => tokio::spawn(grpc::serve_plugin(listener, service, stopped)),
    };

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
    fn plugin_names_and_socket_lengths_are_checked() {
        assert_eq!(
            plugin_dir("vdi-sidecar").unwrap(),
            Path::new("/var/run/kubevirt-plugin/vdi-sidecar")
        );
        for bad in ["", "Vdi", "-vdi", "vdi-", "vdi/../x", "vdi sidecar"] {
            assert!(plugin_dir(bad).is_err(), "{bad:?}");
        }
        // 63 characters is a valid name, and its bus path still fits in sun_path.
        assert!(plugin_dir(&"a".repeat(63)).is_ok());
        assert!(plugin_dir(&"a".repeat(64)).is_err());
    }

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

    #[tokio::test]
    async fn the_hook_socket_appears_listening_and_with_its_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vdi-sidecar.sock");
        // A leftover of a crash between bind and rename does not stop the next start.
        std::fs::write(path.with_extension("binding"), b"stale").expect("write");
        let listener = bind_hook_socket(&path).expect("bind");
        assert!(!path.with_extension("binding").exists());
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o660);
        let (client, accepted) =
            tokio::join!(tokio::net::UnixStream::connect(&path), listener.accept());
        assert!(client.is_ok() && accepted.is_ok());
    }
}
