//! Configuration from the command line and the environment: which listeners run, where the
//! password comes from, the TLS identity, and (for `serve`) where the hook and bus sockets go in
//! hook and plugin mode. Everything here is policy `main.rs` only wires up, so it is tested here.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, ValueEnum};
use tokio_util::sync::CancellationToken;

use crate::bus::BusConfig;
use crate::h264::record::RecordConfig;
use crate::hook;
use crate::hook::domain::RewriteOptions;
use crate::modules;
use crate::qemu::clipboard::{self, ClipboardSettings, Policy as ClipboardPolicy};
use crate::rdp::{Policy, RdpConfig, Security};
use crate::serve;
use crate::session::auth::{Auth, Credentials, generate_password};
use crate::session::budget::Budget;
use crate::tls::{TlsIdentity, default_names};
use crate::viewers::Viewers;
use crate::vnc::config::DEFAULT_FRAME_BYTES;
use crate::vnc::share::Groups;
use crate::vnc::{SharePolicy, VncConfig};
use crate::web::WebConfig;

/// How the domain is rewritten (shared by `serve` and `rewrite-domain`).
#[derive(Args, Debug, Clone)]
pub struct RewriteArgs {
    /// Remove KubeVirt's <graphics type='vnc'> (breaks `virtctl vnc`).
    #[arg(long, env = "VDI_DROP_VNC")]
    pub drop_vnc: bool,
    /// Leave audio out of the domain.
    #[arg(long, env = "VDI_NO_AUDIO")]
    pub no_audio: bool,
    /// Model of the <video> added when the domain has none.
    #[arg(long, env = "VDI_VIDEO_MODEL", default_value = "virtio",
          value_parser = clap::builder::PossibleValuesParser::new(hook::domain::VIDEO_MODELS))]
    pub video_model: String,
}

impl RewriteArgs {
    pub fn options(&self, bus_address: String) -> RewriteOptions {
        RewriteOptions {
            drop_vnc: self.drop_vnc,
            audio: !self.no_audio,
            video_model: self.video_model.clone(),
            ..RewriteOptions::new(bus_address)
        }
    }
}

/// The listeners viewers connect to, and how they log in.
#[derive(Args, Debug, Clone, Default)]
pub struct ViewerArgs {
    /// VNC listen address, or `none`.
    #[arg(long, env = "VDI_VNC")]
    pub vnc: Option<String>,
    /// RDP listen address, or `none`.
    #[arg(long, env = "VDI_RDP")]
    pub rdp: Option<String>,
    /// What a second RDP client that logs in does to the first: both share the desktop, the
    /// newcomer takes over (preempt), or the newcomer is refused (reject).
    #[arg(long, env = "VDI_RDP_POLICY", value_enum, default_value_t = Policy::Share)]
    pub rdp_policy: Policy,
    /// RDP security: NLA (CredSSP inside TLS), or TLS with the password in the Client Info PDU
    /// for clients without NLA. Plain RDP security is never offered.
    #[arg(long, env = "VDI_RDP_SECURITY", value_enum, default_value_t = Security::Nla)]
    pub rdp_security: Security,
    /// H.264 over RDP's graphics pipeline for clients that take it (mstsc, FreeRDP 3); `off`
    /// keeps every client on bitmaps (RemoteFX).
    #[arg(long, env = "VDI_RDP_H264", value_enum, default_value_t = Switch::On)]
    pub rdp_h264: Switch,
    /// Open H.264 (RFB encoding 50) for VNC clients that list it — noVNC in browsers with
    /// WebCodecs — while the screen changes like video; `off` keeps them on Tight.
    #[arg(long, env = "VDI_VNC_H264", value_enum, default_value_t = Switch::On)]
    pub vnc_h264: Switch,
    /// Web client (HTTPS + WebSocket + noVNC page) listen address, or `none`.
    #[arg(long, env = "VDI_HTTP")]
    pub http: Option<String>,
    /// Prometheus metrics in plain HTTP at `ADDR/metrics` (also on the web listener's
    /// `/metrics`), or `none`.
    #[arg(long, env = "VDI_METRICS")]
    pub metrics: Option<String>,
    /// Serve the web client over plain HTTP (e.g. behind a TLS-terminating ingress).
    #[arg(long, env = "VDI_HTTP_INSECURE")]
    pub http_insecure: bool,
    /// noVNC's package directory (`@novnc/novnc` from npm; `npm install` in web/ puts it in
    /// web/node_modules/@novnc/novnc).
    #[arg(
        long,
        env = "VDI_WEB_ROOT",
        default_value = "/usr/share/vdi-sidecar/novnc"
    )]
    pub web_root: PathBuf,
    /// File holding the viewers' password (first line). Otherwise $VDI_PASSWORD, otherwise a
    /// random password is generated and logged once at start-up.
    #[arg(long, env = "VDI_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,
    /// Let anyone reach the desktop without a password.
    #[arg(long, env = "VDI_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
    /// User name for RDP logins (default `vdi`) and VeNCrypt Plain logins (any name is accepted
    /// there when unset).
    #[arg(long, env = "VDI_USERNAME")]
    pub username: Option<String>,
    /// TLS certificate chain (PEM) for VeNCrypt; a self-signed one is generated when unset.
    #[arg(long, env = "VDI_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) matching --tls-cert.
    #[arg(long, env = "VDI_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Extra names (DNS or IP) for the generated certificate, e.g. the Service's name.
    #[arg(long = "tls-name", env = "VDI_TLS_NAMES", value_delimiter = ',')]
    pub tls_names: Vec<String>,
    /// Write the PEM clients should trust (the generated CA) to this file.
    #[arg(long, env = "VDI_TLS_TRUST_OUT")]
    pub tls_trust_out: Option<PathBuf>,
    /// Offer only VeNCrypt (TLS) to VNC clients: no plain VNC authentication.
    #[arg(long, env = "VDI_VNC_REQUIRE_TLS")]
    pub vnc_require_tls: bool,
    /// Let a client that asks for exclusive access disconnect the others (default: always share).
    #[arg(long, env = "VDI_VNC_ALLOW_EXCLUSIVE")]
    pub vnc_allow_exclusive: bool,
    /// Which way clipboard text may go between viewers and the guest: both, to-guest,
    /// from-guest or off (the guest needs spice-vdagent; the domain gets a qemu-vdagent channel).
    #[arg(long, env = "VDI_CLIPBOARD", default_value = "both")]
    pub clipboard: ClipboardPolicy,
    /// Largest clipboard text in bytes, either way; longer texts are refused whole (and logged).
    #[arg(long, env = "VDI_CLIPBOARD_LIMIT", default_value_t = clipboard::DEFAULT_LIMIT,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=16 << 20))]
    pub clipboard_limit: usize,
    /// Record every viewer session to a fragmented MP4 file in this directory (H.264 from the
    /// console's shared encoder; the file is named after the session's start, VM, protocol,
    /// peer and user). Off when unset.
    #[arg(long, env = "VDI_RECORD_DIR")]
    pub record_dir: Option<PathBuf>,
    /// Most bytes --record-dir may hold (suffix K, M or G: powers of 1024): the oldest finished
    /// recordings are removed first; a recording that would still pass it stops, with a warning.
    #[arg(long, env = "VDI_RECORD_MAX_BYTES", default_value = "1G", value_parser = parse_size)]
    pub record_max_bytes: u64,
}

/// A byte count with an optional K, M or G suffix (powers of 1024).
fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (digits, shift) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 10),
        Some('M') => (&t[..t.len() - 1], 20),
        Some('G') => (&t[..t.len() - 1], 30),
        _ => (t, 0),
    };
    let n: u64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a size (a number, optionally with K, M or G)"))?;
    let bytes = n
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))?;
    if bytes < 1 << 20 {
        return Err(format!("{text:?} is under 1M: too small for a recording"));
    }
    Ok(bytes)
}

impl ViewerArgs {
    /// Where sessions are recorded, checked to be writable (a bad directory fails at start-up).
    pub fn recording(&self) -> anyhow::Result<Option<RecordConfig>> {
        let Some(dir) = &self.record_dir else {
            return Ok(None);
        };
        let cfg = RecordConfig {
            dir: dir.clone(),
            max_bytes: self.record_max_bytes,
        };
        cfg.prepare().with_context(|| {
            format!("--record-dir {} is not a writable directory", dir.display())
        })?;
        tracing::info!(dir = %dir.display(), max_bytes = cfg.max_bytes, "sessions are recorded");
        Ok(Some(cfg))
    }

    pub fn clipboard(&self) -> ClipboardSettings {
        ClipboardSettings {
            policy: self.clipboard,
            limit: self.clipboard_limit,
        }
    }
}

/// Where the viewers' password came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordSource {
    /// `--insecure-no-auth`: no password at all.
    None,
    File(PathBuf),
    Environment,
    /// Made up for this run (logged once so the operator can use it).
    Generated,
}

/// The password by precedence: opt-out, then the file, then `$VDI_PASSWORD` (`env`), then a
/// generated one.
pub fn password(
    insecure_no_auth: bool,
    file: Option<&Path>,
    env: Option<String>,
) -> anyhow::Result<(Option<String>, PasswordSource)> {
    if insecure_no_auth {
        return Ok((None, PasswordSource::None));
    }
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the password file {}", path.display()))?;
        let line = text.lines().next().unwrap_or_default().to_owned();
        anyhow::ensure!(
            !line.is_empty(),
            "the password file {} is empty",
            path.display()
        );
        return Ok((Some(line), PasswordSource::File(path.to_owned())));
    }
    if let Some(p) = env.filter(|p| !p.is_empty()) {
        return Ok((Some(p), PasswordSource::Environment));
    }
    Ok((Some(generate_password()), PasswordSource::Generated))
}

/// A listen address, or `None` for `none`.
fn listen_addr(flag: &str, value: &str) -> anyhow::Result<Option<SocketAddr>> {
    if value == "none" {
        return Ok(None);
    }
    Ok(Some(value.parse().with_context(|| {
        format!("bad --{flag} address {value:?}")
    })?))
}

/// The TLS identity: the operator's files, or a certificate generated for this run; the PEM
/// clients should trust is written to `trust_out` when given.
pub fn tls_identity(args: &ViewerArgs) -> anyhow::Result<TlsIdentity> {
    let id = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => TlsIdentity::load(cert, key)?,
        _ => {
            let id = TlsIdentity::generate(&default_names(&args.tls_names))?;
            tracing::info!(
                "no --tls-cert given: generated a CA and a server certificate for this run"
            );
            id
        }
    };
    if let Some(path) = &args.tls_trust_out {
        std::fs::write(path, &id.trust_pem)
            .with_context(|| format!("writing {}", path.display()))?;
        tracing::info!(path = %path.display(), "certificate for clients to trust written");
    }
    tracing::info!(fingerprint = %id.fingerprint, "TLS identity ready");
    Ok(id)
}

impl ViewerArgs {
    /// The VNC, RDP and web listeners; `defaults` apply when `--vnc`/`--rdp`/`--http` are not
    /// given. `env_password` is `$VDI_PASSWORD`. All listeners share one [`Auth`], so one
    /// failed-login limit covers every protocol.
    pub fn viewers(
        &self,
        [vnc_default, rdp_default, http_default]: [&str; 3],
        name: &str,
        env_password: Option<String>,
    ) -> anyhow::Result<Viewers> {
        let vnc_addr = listen_addr("vnc", self.vnc.as_deref().unwrap_or(vnc_default))?;
        let rdp_addr = listen_addr("rdp", self.rdp.as_deref().unwrap_or(rdp_default))?;
        let http_addr = listen_addr("http", self.http.as_deref().unwrap_or(http_default))?;
        let metrics = listen_addr("metrics", self.metrics.as_deref().unwrap_or("none"))?;
        if vnc_addr.is_none() && rdp_addr.is_none() && http_addr.is_none() {
            return Ok(Viewers {
                clipboard: self.clipboard(),
                metrics,
                ..Viewers::default()
            });
        }
        let (password, source) = password(
            self.insecure_no_auth,
            self.password_file.as_deref(),
            env_password,
        )?;
        match (&source, &password) {
            (PasswordSource::None, _) => {
                tracing::warn!("--insecure-no-auth: viewers connect without a password");
            }
            (PasswordSource::Generated, Some(p)) => tracing::info!(
                password = %p,
                "no password given: generated one for this run (set VDI_PASSWORD or --password-file to choose it)"
            ),
            _ => {}
        }
        let auth = Arc::new(Auth::new(password.map(|password| Credentials {
            username: self.username.clone(),
            password,
        })));
        let tls = tls_identity(self)?;
        let budget = Budget::detect();
        // One set of shared encodings for the console, whichever listener a viewer comes by.
        let groups = Groups::new(
            budget.limits.workers(),
            budget.frame_bytes(DEFAULT_FRAME_BYTES),
        );
        let share = if self.vnc_allow_exclusive {
            SharePolicy::AllowExclusive
        } else {
            SharePolicy::ForceShared
        };
        let vnc = vnc_addr.map(|addr| {
            let mut cfg = VncConfig::new(Arc::clone(&auth), name);
            cfg.tls = Some(tls.clone());
            cfg.require_tls = self.vnc_require_tls;
            cfg.share = share;
            cfg.groups = Arc::clone(&groups);
            cfg.h264 = self.vnc_h264 == Switch::On;
            (addr, Arc::new(cfg))
        });
        let web = http_addr.map(|addr| {
            // noVNC speaks VNC authentication; the TLS is the page's HTTPS around it.
            let mut vnc = VncConfig::new(Arc::clone(&auth), name);
            vnc.protocol = crate::metrics::Protocol::Web;
            vnc.share = share;
            vnc.groups = Arc::clone(&groups);
            vnc.h264 = self.vnc_h264 == Switch::On;
            let web = WebConfig {
                novnc: Some(self.web_root.clone()),
                tls: (!self.http_insecure).then(|| tls.clone()),
            };
            (addr, web, Arc::new(vnc))
        });
        let rdp = rdp_addr.map(|addr| {
            let mut cfg = RdpConfig::new(tls.clone(), Arc::clone(&auth));
            cfg.policy = self.rdp_policy;
            cfg.h264 = self.rdp_h264 == Switch::On;
            if auth.required() {
                cfg.security = self.rdp_security;
            } else if self.rdp_security == Security::Nla {
                tracing::warn!("--insecure-no-auth: RDP offers TLS without NLA");
            }
            (addr, Arc::new(cfg))
        });
        Ok(Viewers {
            vnc,
            rdp,
            web,
            metrics,
            budget: Some(budget),
            record: self.recording()?,
            clipboard: self.clipboard(),
        })
    }
}

/// A feature switched on or off on the command line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    #[default]
    On,
    Off,
}

/// Which KubeVirt API `serve` speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Legacy hook sidecar (annotation `hooks.kubevirt.io/hookSidecars`, gate `Sidecar`).
    Hook,
    /// KubeVirt ≥ 1.9 Plugin domain hook (gate `Plugins`, a Plugin CR; needs --plugin-name).
    Plugin,
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub viewers: ViewerArgs,
    /// Which KubeVirt API to serve.
    #[arg(long, env = "VDI_MODE", value_enum, default_value = "hook")]
    pub mode: ModeArg,
    /// The Plugin CR's name (plugin mode): sockets go to /var/run/kubevirt-plugin/<name>/.
    #[arg(long, env = "VDI_PLUGIN_NAME")]
    pub plugin_name: Option<String>,
    /// Directory where virt-launcher looks for the hook socket
    /// [default: /var/run/kubevirt-hooks; plugin mode: /var/run/kubevirt-plugin/<plugin-name>].
    #[arg(long, env = "VDI_HOOKS_DIR")]
    pub hooks_dir: Option<PathBuf>,
    /// Directory for the bus socket [default: <hooks-dir>/vdi].
    #[arg(long, env = "VDI_BUS_DIR")]
    pub bus_dir: Option<PathBuf>,
    /// Bus address written into the domain, as the compute container sees it
    /// [default: unix:path=/var/run/kubevirt-hooks/$CONTAINER_NAME/vdi/bus, or without
    /// $CONTAINER_NAME when it is unset; plugin mode:
    /// unix:path=/var/run/kubevirt-plugin/<plugin-name>/vdi/bus].
    #[arg(long, env = "VDI_QEMU_BUS_ADDRESS")]
    pub qemu_bus_address: Option<String>,
    /// Hook socket file name [default: vdi-sidecar.sock; plugin mode: hook.sock].
    #[arg(long, env = "VDI_SOCKET_NAME")]
    pub socket_name: Option<String>,
    /// dbus-daemon binary.
    #[arg(long, env = "VDI_DBUS_DAEMON", default_value = "dbus-daemon")]
    pub dbus_daemon: PathBuf,
    /// Extra uids allowed on the bus (root, 107 and our own uid always are).
    #[arg(
        long = "bus-allow-uid",
        env = "VDI_BUS_ALLOW_UIDS",
        value_delimiter = ','
    )]
    pub bus_allow_uids: Vec<u32>,
    #[command(flatten)]
    pub rewrite: RewriteArgs,
    /// Where QEMU's D-Bus display modules come from: `auto` (the image's pack matching the
    /// launcher, or the launcher's own when the image has none), `none` (the launcher has them:
    /// a custom launcher image), or a pack's name.
    #[arg(long, env = "VDI_QEMU_MODULES", default_value = "auto")]
    pub qemu_modules: String,
    /// The image's module packs.
    #[arg(long, env = "VDI_QEMU_MODULES_DIR", default_value = modules::DEFAULT_PACKS_DIR)]
    pub qemu_modules_dir: PathBuf,
}

/// Where `serve` puts its sockets and what bus address it writes into the domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServePaths {
    pub mode: serve::Mode,
    pub hooks_dir: PathBuf,
    pub socket_name: String,
    pub bus_dir: PathBuf,
    pub qemu_bus_address: String,
}

impl ServeArgs {
    /// Resolves the mode's defaults; `container_name` is `$CONTAINER_NAME` (KubeVirt ≥ 1.6
    /// mounts each sidecar's directory under it in compute).
    pub fn paths(&self, container_name: Option<&str>) -> anyhow::Result<ServePaths> {
        let (mode, hooks_dir, socket_name, default_address) = match self.mode {
            ModeArg::Hook => (
                serve::Mode::Hook,
                self.hooks_dir
                    .clone()
                    .unwrap_or_else(|| serve::DEFAULT_HOOKS_DIR.into()),
                hook::SOCKET_NAME.to_owned(),
                serve::default_qemu_bus_address(container_name),
            ),
            ModeArg::Plugin => {
                let name = self
                    .plugin_name
                    .as_deref()
                    .context("--mode plugin needs --plugin-name (the Plugin CR's name)")?;
                // compute mounts the whole volume at the same path, so our path is QEMU's too.
                let dir = serve::plugin_dir(name).map_err(anyhow::Error::msg)?;
                let address = format!(
                    "unix:path={}",
                    dir.join(serve::BUS_SUBDIR).join("bus").display()
                );
                (
                    serve::Mode::Plugin,
                    self.hooks_dir.clone().unwrap_or(dir),
                    serve::PLUGIN_SOCKET_NAME.to_owned(),
                    address,
                )
            }
        };
        Ok(ServePaths {
            mode,
            bus_dir: self
                .bus_dir
                .clone()
                .unwrap_or_else(|| hooks_dir.join(serve::BUS_SUBDIR)),
            hooks_dir,
            socket_name: self.socket_name.clone().unwrap_or(socket_name),
            qemu_bus_address: self.qemu_bus_address.clone().unwrap_or(default_address),
        })
    }

    /// The whole `serve` configuration.
    pub fn config(
        &self,
        container_name: Option<&str>,
        env_password: Option<String>,
    ) -> anyhow::Result<serve::ServeConfig> {
        let paths = self.paths(container_name)?;
        let viewers = self.viewers.viewers(
            ["0.0.0.0:5900", "0.0.0.0:3389", "0.0.0.0:6080"],
            "vdi-sidecar",
            env_password,
        )?;
        let packs = modules::scan(&self.qemu_modules_dir)?;
        let setting: modules::Setting = self.qemu_modules.parse().unwrap_or(modules::Setting::Auto);
        tracing::info!(
            dir = %self.qemu_modules_dir.display(),
            packs = ?packs.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            setting = ?setting,
            "QEMU module packs"
        );
        let compute_root = modules::compute_dir(&paths.qemu_bus_address)
            .context("the QEMU bus address is not unix:path=…")?
            .join(modules::SHARED_SUBDIR);
        let modules = modules::Modules {
            setting,
            packs,
            local_root: paths.bus_dir.join(modules::SHARED_SUBDIR),
            compute_root,
        };
        Ok(serve::ServeConfig {
            modules: Arc::new(modules),
            viewers,
            bus: BusConfig {
                dir: paths.bus_dir,
                program: self.dbus_daemon.clone(),
                extra_uids: self.bus_allow_uids.clone(),
            },
            hooks_dir: paths.hooks_dir,
            socket_name: paths.socket_name,
            rewrite: RewriteOptions {
                // `--clipboard off` leaves the guest without the agent's port as well.
                clipboard: self.viewers.clipboard != ClipboardPolicy::Off,
                ..self.rewrite.options(paths.qemu_bus_address)
            },
            mode: paths.mode,
        })
    }
}

/// Runs `work` on a new multi-threaded runtime until it finishes; SIGTERM and SIGINT cancel the
/// token it is given. What `serve`, `bridge` and `demo` share.
pub fn run_until_signal<F, Fut>(work: F) -> anyhow::Result<()>
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let rt = tokio::runtime::Runtime::new().context("cannot start the runtime")?;
    rt.block_on(async {
        let stop = CancellationToken::new();
        serve::cancel_on_signals(stop.clone()).context("cannot install signal handlers")?;
        work(stop).await
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn serve_args(args: &[&str]) -> ServeArgs {
        Cli::try_parse_from(std::iter::once("serve").chain(args.iter().copied()))
            .expect("parses")
            .serve
    }

    #[test]
    fn password_precedence() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("pw");
        std::fs::write(&file, "from-file\nsecond line\n").expect("write");
        let env = || Some("from-env".to_owned());
        assert_eq!(
            password(true, Some(&file), env()).unwrap(),
            (None, PasswordSource::None)
        );
        assert_eq!(
            password(false, Some(&file), env()).unwrap(),
            (Some("from-file".into()), PasswordSource::File(file.clone()))
        );
        assert_eq!(
            password(false, None, env()).unwrap(),
            (Some("from-env".into()), PasswordSource::Environment)
        );
        let (generated, source) = password(false, None, Some(String::new())).unwrap();
        assert_eq!(source, PasswordSource::Generated);
        assert_eq!(generated.map(|p| p.len()), Some(8));
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").expect("write");
        assert!(password(false, Some(&empty), env()).is_err());
        assert!(password(false, Some(&dir.path().join("missing")), env()).is_err());
    }

    #[test]
    fn hook_mode_paths_follow_the_container_name() {
        let p = serve_args(&[]).paths(Some("hook-sidecar-0")).unwrap();
        assert_eq!(p.mode, serve::Mode::Hook);
        assert_eq!(p.hooks_dir, Path::new("/var/run/kubevirt-hooks"));
        assert_eq!(p.socket_name, "vdi-sidecar.sock");
        assert_eq!(p.bus_dir, Path::new("/var/run/kubevirt-hooks/vdi"));
        assert_eq!(
            p.qemu_bus_address,
            "unix:path=/var/run/kubevirt-hooks/hook-sidecar-0/vdi/bus"
        );
        let p = serve_args(&["--hooks-dir", "/tmp/h", "--socket-name", "x.sock"])
            .paths(None)
            .unwrap();
        assert_eq!(p.bus_dir, Path::new("/tmp/h/vdi"));
        assert_eq!(p.socket_name, "x.sock");
        assert_eq!(
            p.qemu_bus_address,
            "unix:path=/var/run/kubevirt-hooks/vdi/bus"
        );
    }

    #[test]
    fn plugin_mode_needs_a_valid_name_and_shares_its_path_with_compute() {
        assert!(serve_args(&["--mode", "plugin"]).paths(None).is_err());
        assert!(
            serve_args(&["--mode", "plugin", "--plugin-name", "Bad_Name"])
                .paths(None)
                .is_err()
        );
        let p = serve_args(&["--mode", "plugin", "--plugin-name", "vdi-sidecar"])
            .paths(Some("ignored"))
            .unwrap();
        assert_eq!(p.mode, serve::Mode::Plugin);
        assert_eq!(
            p.hooks_dir,
            Path::new("/var/run/kubevirt-plugin/vdi-sidecar")
        );
        assert_eq!(p.socket_name, "hook.sock");
        assert_eq!(
            p.qemu_bus_address,
            "unix:path=/var/run/kubevirt-plugin/vdi-sidecar/vdi/bus"
        );
    }

    #[test]
    fn every_listener_shares_one_auth_and_none_disables() {
        let args = ViewerArgs {
            username: Some("alice".into()),
            ..ViewerArgs::default()
        };
        let v = args
            .viewers(
                ["127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"],
                "t",
                Some("pw".into()),
            )
            .unwrap();
        let (vnc, rdp, web) = (v.vnc.unwrap().1, v.rdp.unwrap().1, v.web.unwrap().2);
        assert!(Arc::ptr_eq(&vnc.auth, &rdp.auth) && Arc::ptr_eq(&vnc.auth, &web.auth));
        assert!(
            Arc::ptr_eq(&vnc.groups, &web.groups),
            "VNC and web viewers share encodings"
        );
        assert_eq!(rdp.auth.rdp_username(), "alice");
        assert_eq!(rdp.security, Security::Nla);
        let none = ViewerArgs::default()
            .viewers(["none", "none", "none"], "t", None)
            .unwrap();
        assert!(none.vnc.is_none() && none.rdp.is_none() && none.web.is_none());
        assert!(
            ViewerArgs {
                vnc: Some("not an address".into()),
                ..ViewerArgs::default()
            }
            .viewers(["none", "none", "none"], "t", None)
            .is_err()
        );
        let open = ViewerArgs {
            insecure_no_auth: true,
            ..ViewerArgs::default()
        }
        .viewers(["none", "127.0.0.1:0", "none"], "t", None)
        .unwrap();
        assert_eq!(open.rdp.unwrap().1.security, Security::Tls);
    }

    #[test]
    fn rdp_h264_is_on_unless_switched_off() {
        let rdp = |args: ViewerArgs| {
            args.viewers(["none", "127.0.0.1:0", "none"], "t", Some("pw".into()))
                .unwrap()
                .rdp
                .unwrap()
                .1
        };
        assert!(rdp(ViewerArgs::default()).h264);
        let off = ViewerArgs {
            rdp_h264: Switch::Off,
            ..ViewerArgs::default()
        };
        assert!(!rdp(off).h264);
    }

    #[test]
    fn record_sizes_take_suffixes_and_refuse_nonsense() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert_eq!(parse_size("2048K"), Ok(2 << 20));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert!(parse_size("512K").is_err(), "under 1M");
        assert!(parse_size("lots").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("99999999999G").is_err(), "overflow");
    }

    #[test]
    fn a_record_dir_that_cannot_be_written_fails_at_start_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("plain-file");
        std::fs::write(&file, b"x").expect("write");
        let args = ViewerArgs {
            record_dir: Some(file.join("sub")),
            record_max_bytes: 1 << 30,
            ..ViewerArgs::default()
        };
        assert!(args.recording().is_err());
        let ok = ViewerArgs {
            record_dir: Some(dir.path().join("new")),
            record_max_bytes: 1 << 30,
            ..ViewerArgs::default()
        };
        let cfg = ok.recording().expect("writable").expect("on");
        assert!(cfg.dir.is_dir());
    }
}
