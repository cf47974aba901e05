//! Command-line wiring only; the work lives in the library modules.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;
use vdi_sidecar::bus::BusConfig;
use vdi_sidecar::hook::domain::{RewriteOptions, rewrite_bytes};
use vdi_sidecar::hook::vmi::VmiInfo;
use vdi_sidecar::qemu::source::{self, SourceOptions};
use vdi_sidecar::rdp::{Policy, RdpConfig, Security};
use vdi_sidecar::vnc::conn::VncConfig;
use vdi_sidecar::{hook, serve, vnc};

#[derive(Parser)]
#[command(name = "vdi-sidecar", version, about)]
struct Cli {
    /// Print what this program offers as libvirt's RDP helper (JSON) and exit.
    #[arg(long)]
    print_capabilities: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run as the KubeVirt hook sidecar: bus + hook server (+ display servers).
    Serve(ServeArgs),
    /// Rewrite a domain offline: domain XML on stdin, result on stdout.
    RewriteDomain(RewriteDomainArgs),
    /// Attach to QEMU's D-Bus display on an existing bus (plain QEMU or libvirt, no Kubernetes).
    Bridge(BridgeArgs),
    /// Start a bus, a local QEMU running a small guest, and serve its desktop (see README).
    Demo(DemoArgs),
}

#[derive(Args)]
struct DemoArgs {
    /// Guest kernel (e.g. target/vdi-guest/vmlinuz from tests/guest/build.sh).
    #[arg(long)]
    kernel: PathBuf,
    /// Guest initrd (e.g. target/vdi-guest/initrd.gz).
    #[arg(long)]
    initrd: PathBuf,
    /// QEMU binary (10.0+ with the D-Bus display module).
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// Guest resolution, WIDTHxHEIGHT.
    #[arg(long, default_value = "1024x768")]
    size: String,
    #[command(flatten)]
    viewers: ViewerArgs,
}

#[derive(Args)]
struct BridgeArgs {
    /// D-Bus address of the bus QEMU's `-display dbus,addr=` joined.
    #[arg(long, env = "VDI_DBUS_ADDRESS")]
    dbus_address: String,
    /// Take every frame inline instead of through shared memory.
    #[arg(long, env = "VDI_NO_SHARED_MEMORY")]
    no_shared_memory: bool,
    #[command(flatten)]
    viewers: ViewerArgs,
}

#[derive(Args)]
struct RewriteArgs {
    /// Remove KubeVirt's <graphics type='vnc'> (breaks `virtctl vnc`).
    #[arg(long, env = "VDI_DROP_VNC")]
    drop_vnc: bool,
    /// Leave audio out of the domain.
    #[arg(long, env = "VDI_NO_AUDIO")]
    no_audio: bool,
    /// Model of the <video> added when the domain has none.
    #[arg(long, env = "VDI_VIDEO_MODEL", default_value = "virtio",
          value_parser = clap::builder::PossibleValuesParser::new(hook::domain::VIDEO_MODELS))]
    video_model: String,
}

impl RewriteArgs {
    fn options(&self, bus_address: String) -> RewriteOptions {
        RewriteOptions {
            bus_address,
            drop_vnc: self.drop_vnc,
            audio: !self.no_audio,
            video_model: self.video_model.clone(),
        }
    }
}

#[derive(Args)]
struct ViewerArgs {
    /// VNC listen address, or `none`.
    #[arg(long, env = "VDI_VNC")]
    vnc: Option<String>,
    /// RDP listen address, or `none`.
    #[arg(long, env = "VDI_RDP")]
    rdp: Option<String>,
    /// What a second RDP client that logs in does to the first: both share the desktop, the
    /// newcomer takes over (preempt), or the newcomer is refused (reject).
    #[arg(long, env = "VDI_RDP_POLICY", value_enum, default_value_t = Policy::Share)]
    rdp_policy: Policy,
    /// RDP security: NLA (CredSSP inside TLS), or TLS with the password in the Client Info PDU
    /// for clients without NLA. Plain RDP security is never offered.
    #[arg(long, env = "VDI_RDP_SECURITY", value_enum, default_value_t = Security::Nla)]
    rdp_security: Security,
    /// Web client (HTTPS + WebSocket + noVNC page) listen address, or `none`.
    #[arg(long, env = "VDI_HTTP")]
    http: Option<String>,
    /// Serve the web client over plain HTTP (e.g. behind a TLS-terminating ingress).
    #[arg(long, env = "VDI_HTTP_INSECURE")]
    http_insecure: bool,
    /// noVNC's package directory (`@novnc/novnc` from npm; `npm install` in web/ puts it in
    /// web/node_modules/@novnc/novnc).
    #[arg(
        long,
        env = "VDI_WEB_ROOT",
        default_value = "/usr/share/vdi-sidecar/novnc"
    )]
    web_root: PathBuf,
    /// File holding the viewers' password (first line). Otherwise $VDI_PASSWORD, otherwise a
    /// random password is generated and logged once at start-up.
    #[arg(long, env = "VDI_PASSWORD_FILE")]
    password_file: Option<PathBuf>,
    /// Let anyone reach the desktop without a password.
    #[arg(long, env = "VDI_INSECURE_NO_AUTH")]
    insecure_no_auth: bool,
    /// User name for RDP logins (default `vdi`) and VeNCrypt Plain logins (any name is accepted
    /// there when unset).
    #[arg(long, env = "VDI_USERNAME")]
    username: Option<String>,
    /// TLS certificate chain (PEM) for VeNCrypt; a self-signed one is generated when unset.
    #[arg(long, env = "VDI_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) matching --tls-cert.
    #[arg(long, env = "VDI_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Extra names (DNS or IP) for the generated certificate, e.g. the Service's name.
    #[arg(long = "tls-name", env = "VDI_TLS_NAMES", value_delimiter = ',')]
    tls_names: Vec<String>,
    /// Write the PEM clients should trust (the generated CA) to this file.
    #[arg(long, env = "VDI_TLS_TRUST_OUT")]
    tls_trust_out: Option<PathBuf>,
    /// Offer only VeNCrypt (TLS) to VNC clients: no plain VNC authentication.
    #[arg(long, env = "VDI_VNC_REQUIRE_TLS")]
    vnc_require_tls: bool,
    /// Let a client that asks for exclusive access disconnect the others (default: always share).
    #[arg(long, env = "VDI_VNC_ALLOW_EXCLUSIVE")]
    vnc_allow_exclusive: bool,
}

impl ViewerArgs {
    fn password(&self) -> anyhow::Result<Option<String>> {
        if self.insecure_no_auth {
            tracing::warn!("--insecure-no-auth: viewers connect without a password");
            return Ok(None);
        }
        if let Some(path) = &self.password_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the password file {path:?}"))?;
            let line = text.lines().next().unwrap_or_default().to_owned();
            anyhow::ensure!(!line.is_empty(), "the password file {path:?} is empty");
            return Ok(Some(line));
        }
        if let Ok(p) = std::env::var("VDI_PASSWORD")
            && !p.is_empty()
        {
            return Ok(Some(p));
        }
        let p = vnc::auth::generate_password();
        tracing::info!(password = %p, "no password given: generated one for this run (set VDI_PASSWORD or --password-file to choose it)");
        Ok(Some(p))
    }

    /// The VNC, RDP and web listeners; the defaults apply when `--vnc`/`--rdp`/`--http` are not
    /// given.
    fn viewers(
        &self,
        [vnc_default, rdp_default, http_default]: [&str; 3],
        name: &str,
    ) -> anyhow::Result<vdi_sidecar::viewers::Viewers> {
        let parse = |flag: &str, value: &str| -> anyhow::Result<Option<SocketAddr>> {
            if value == "none" {
                return Ok(None);
            }
            Ok(Some(value.parse().with_context(|| {
                format!("bad --{flag} address {value:?}")
            })?))
        };
        let vnc_addr = parse("vnc", self.vnc.as_deref().unwrap_or(vnc_default))?;
        let rdp_addr = parse("rdp", self.rdp.as_deref().unwrap_or(rdp_default))?;
        let http_addr = parse("http", self.http.as_deref().unwrap_or(http_default))?;
        if vnc_addr.is_none() && rdp_addr.is_none() && http_addr.is_none() {
            return Ok(Default::default());
        }
        let password = self.password()?;
        let tls = self.tls()?;
        let vnc = vnc_addr.map(|addr| {
            let mut cfg = VncConfig::new(password.clone(), name);
            cfg.username = self.username.clone();
            cfg.tls = Some(tls.clone());
            cfg.require_tls = self.vnc_require_tls;
            if self.vnc_allow_exclusive {
                cfg.share = vnc::conn::SharePolicy::AllowExclusive;
            }
            (addr, Arc::new(cfg))
        });
        let web = http_addr.map(|addr| {
            // noVNC speaks VNC authentication; the TLS is the page's HTTPS around it.
            let mut cfg = VncConfig::new(password.clone(), name);
            if self.vnc_allow_exclusive {
                cfg.share = vnc::conn::SharePolicy::AllowExclusive;
            }
            let web = vdi_sidecar::web::WebConfig {
                novnc: Some(self.web_root.clone()),
                tls: (!self.http_insecure).then(|| tls.clone()),
                vnc: Arc::new(cfg),
            };
            (addr, web)
        });
        let rdp = match rdp_addr {
            Some(addr) => {
                let user = self.username.clone().unwrap_or_else(|| "vdi".to_owned());
                let mut cfg = RdpConfig::new(tls.clone(), password.clone().map(|p| (user, p)));
                cfg.policy = self.rdp_policy;
                if cfg.credentials.is_some() {
                    cfg.security = self.rdp_security;
                } else if self.rdp_security == Security::Nla {
                    tracing::warn!("--insecure-no-auth: RDP offers TLS without NLA");
                }
                Some((addr, Arc::new(cfg)))
            }
            None => None,
        };
        Ok(vdi_sidecar::viewers::Viewers { vnc, rdp, web })
    }

    /// The TLS identity: the operator's files, or a certificate generated for this run.
    fn tls(&self) -> anyhow::Result<vdi_sidecar::tls::TlsIdentity> {
        use vdi_sidecar::tls::{TlsIdentity, default_names};
        let id = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => TlsIdentity::load(cert, key)?,
            _ => {
                let id = TlsIdentity::generate(&default_names(&self.tls_names))?;
                tracing::info!(
                    "no --tls-cert given: generated a CA and a server certificate for this run"
                );
                id
            }
        };
        if let Some(path) = &self.tls_trust_out {
            std::fs::write(path, &id.trust_pem)
                .with_context(|| format!("writing {}", path.display()))?;
            tracing::info!(path = %path.display(), "certificate for clients to trust written");
        }
        tracing::info!(fingerprint = %id.fingerprint, "TLS identity ready");
        Ok(id)
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    /// Legacy hook sidecar (annotation `hooks.kubevirt.io/hookSidecars`, gate `Sidecar`).
    Hook,
    /// KubeVirt ≥ 1.9 Plugin domain hook (gate `Plugins`, a Plugin CR; needs --plugin-name).
    Plugin,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    viewers: ViewerArgs,
    /// Which KubeVirt API to serve.
    #[arg(long, env = "VDI_MODE", value_enum, default_value = "hook")]
    mode: ModeArg,
    /// The Plugin CR's name (plugin mode): sockets go to /var/run/kubevirt-plugin/<name>/.
    #[arg(long, env = "VDI_PLUGIN_NAME")]
    plugin_name: Option<String>,
    /// Directory where virt-launcher looks for the hook socket
    /// [default: /var/run/kubevirt-hooks; plugin mode: /var/run/kubevirt-plugin/<plugin-name>].
    #[arg(long, env = "VDI_HOOKS_DIR")]
    hooks_dir: Option<PathBuf>,
    /// Directory for the bus socket [default: <hooks-dir>/vdi].
    #[arg(long, env = "VDI_BUS_DIR")]
    bus_dir: Option<PathBuf>,
    /// Bus address written into the domain, as the compute container sees it
    /// [default: unix:path=/var/run/kubevirt-hooks/$CONTAINER_NAME/vdi/bus, or without
    /// $CONTAINER_NAME when it is unset; plugin mode:
    /// unix:path=/var/run/kubevirt-plugin/<plugin-name>/vdi/bus].
    #[arg(long, env = "VDI_QEMU_BUS_ADDRESS")]
    qemu_bus_address: Option<String>,
    /// Hook socket file name [default: vdi-sidecar.sock; plugin mode: hook.sock].
    #[arg(long, env = "VDI_SOCKET_NAME")]
    socket_name: Option<String>,
    /// dbus-daemon binary.
    #[arg(long, env = "VDI_DBUS_DAEMON", default_value = "dbus-daemon")]
    dbus_daemon: PathBuf,
    /// Extra uids allowed on the bus (root, 107 and our own uid always are).
    #[arg(
        long = "bus-allow-uid",
        env = "VDI_BUS_ALLOW_UIDS",
        value_delimiter = ','
    )]
    bus_allow_uids: Vec<u32>,
    #[command(flatten)]
    rewrite: RewriteArgs,
}

#[derive(Args)]
struct RewriteDomainArgs {
    /// VirtualMachineInstance JSON (for vdi.kubevirt.io/* annotations).
    #[arg(long)]
    vmi: Option<PathBuf>,
    /// Bus address to write into the domain.
    #[arg(long, default_value_t = serve::default_qemu_bus_address(None))]
    bus_address: String,
    #[command(flatten)]
    rewrite: RewriteArgs,
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VDI_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.print_capabilities {
        println!("{}", vdi_sidecar::rdp::capabilities_json());
        return ExitCode::SUCCESS;
    }
    init_tracing();
    let result = match cli.command {
        Some(Command::Serve(args)) => run_serve(args),
        Some(Command::RewriteDomain(args)) => run_rewrite(&args),
        Some(Command::Bridge(args)) => run_bridge(args),
        Some(Command::Demo(args)) => run_demo(args),
        None => {
            let _ = <Cli as clap::CommandFactory>::command().print_help();
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vdi-sidecar: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    let (mode, hooks_dir, socket_name, default_address) = match args.mode {
        ModeArg::Hook => {
            let container = std::env::var("CONTAINER_NAME").ok();
            (
                serve::Mode::Hook,
                args.hooks_dir
                    .unwrap_or_else(|| serve::DEFAULT_HOOKS_DIR.into()),
                args.socket_name
                    .unwrap_or_else(|| hook::SOCKET_NAME.to_owned()),
                serve::default_qemu_bus_address(container.as_deref()),
            )
        }
        ModeArg::Plugin => {
            let name = args
                .plugin_name
                .context("--mode plugin needs --plugin-name (the Plugin CR's name)")?;
            // compute mounts the whole volume at the same path, so our path is QEMU's too.
            let dir = serve::plugin_dir(&name).map_err(anyhow::Error::msg)?;
            let address = format!(
                "unix:path={}",
                dir.join(serve::BUS_SUBDIR).join("bus").display()
            );
            (
                serve::Mode::Plugin,
                args.hooks_dir.unwrap_or(dir),
                args.socket_name
                    .unwrap_or_else(|| serve::PLUGIN_SOCKET_NAME.to_owned()),
                address,
            )
        }
    };
    let qemu_bus_address = args.qemu_bus_address.unwrap_or(default_address);
    let viewers = args.viewers.viewers(
        ["0.0.0.0:5900", "0.0.0.0:3389", "0.0.0.0:6080"],
        "vdi-sidecar",
    )?;
    let cfg = serve::ServeConfig {
        viewers,
        bus: BusConfig {
            dir: args
                .bus_dir
                .unwrap_or_else(|| hooks_dir.join(serve::BUS_SUBDIR)),
            program: args.dbus_daemon,
            extra_uids: args.bus_allow_uids,
        },
        hooks_dir,
        socket_name,
        rewrite: args.rewrite.options(qemu_bus_address),
        mode,
    };
    let rt = tokio::runtime::Runtime::new().context("cannot start the runtime")?;
    rt.block_on(async {
        let shutdown = CancellationToken::new();
        serve::cancel_on_signals(shutdown.clone()).context("cannot install signal handlers")?;
        serve::run(cfg, shutdown).await?;
        Ok(())
    })
}

fn run_rewrite(args: &RewriteDomainArgs) -> anyhow::Result<()> {
    let mut xml = Vec::new();
    std::io::stdin()
        .take(u64::try_from(hook::domain::MAX_INPUT_BYTES)? + 1)
        .read_to_end(&mut xml)
        .context("cannot read the domain from stdin")?;
    let vmi = match &args.vmi {
        Some(path) => std::fs::read(path).with_context(|| format!("cannot read {path:?}"))?,
        None => Vec::new(),
    };
    let info = VmiInfo::parse(&vmi)?;
    let opts = info.apply(&args.rewrite.options(args.bus_address.clone()));
    let out = rewrite_bytes(&xml, &opts)?;
    std::io::stdout().write_all(out.xml.as_bytes())?;
    Ok(())
}

fn run_bridge(args: BridgeArgs) -> anyhow::Result<()> {
    let viewers = args.viewers.viewers(
        ["127.0.0.1:5900", "127.0.0.1:3389", "127.0.0.1:6080"],
        "vdi-sidecar",
    )?;
    let rt = tokio::runtime::Runtime::new().context("cannot start the runtime")?;
    rt.block_on(async {
        let stop = CancellationToken::new();
        serve::cancel_on_signals(stop.clone()).context("cannot install signal handlers")?;
        let opts = SourceOptions {
            shared_memory: !args.no_shared_memory,
        };
        let (consoles, task) = source::spawn(args.dbus_address, opts, stop.clone());
        viewers.start(&consoles, &stop).await?;
        stop.cancelled().await;
        let _ = task.await;
        Ok(())
    })
}

fn run_demo(args: DemoArgs) -> anyhow::Result<()> {
    let (w, h) = args
        .size
        .split_once('x')
        .and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?)))
        .context("--size must be WIDTHxHEIGHT")?;
    let cfg = vdi_sidecar::demo::DemoConfig {
        viewers: args.viewers.viewers(
            ["127.0.0.1:5900", "127.0.0.1:3389", "127.0.0.1:6080"],
            "vdi-sidecar demo",
        )?,
        kernel: args.kernel,
        initrd: args.initrd,
        qemu: args.qemu,
        width: w,
        height: h,
        extra_qemu_args: Vec::new(),
        guest_commands: Vec::new(),
    };
    let rt = tokio::runtime::Runtime::new().context("cannot start the runtime")?;
    rt.block_on(async {
        let stop = CancellationToken::new();
        serve::cancel_on_signals(stop.clone()).context("cannot install signal handlers")?;
        vdi_sidecar::demo::run(cfg, stop).await?;
        Ok(())
    })
}
