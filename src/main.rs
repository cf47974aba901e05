//! Command-line wiring only: the flags live in `vdi_sidecar::config`, the work in the library.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use vdi_sidecar::config::{RewriteArgs, ServeArgs, ViewerArgs, run_until_signal};
use vdi_sidecar::hook::domain::rewrite_bytes;
use vdi_sidecar::hook::vmi::VmiInfo;
use vdi_sidecar::qemu::source::{self, SourceOptions};
use vdi_sidecar::{hook, serve};

#[derive(Parser)]
#[command(name = "vdi-sidecar", version, about)]
struct Cli {
    /// Print what this program offers as libvirt's RDP helper (JSON) and exit.
    #[arg(long)]
    print_capabilities: bool,
    /// Log lines as text (the default; coloured only on a terminal) or JSON, one object per line
    /// (for log pipelines; the session audit events are target `audit`).
    #[arg(long, env = "VDI_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
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
    /// Guest resolution, WIDTHxHEIGHT (the test program's; a desktop follows its viewer).
    #[arg(long, default_value = "1024x768")]
    size: String,
    /// Boot this desktop disk image instead (target/desktop-guest/disk.raw from
    /// tests/guest/desktop/build.sh, with its --kernel vmlinuz and --initrd initrd.img).
    #[arg(long)]
    disk: Option<PathBuf>,
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

/// Listeners of `bridge` and `demo`: local only unless asked otherwise.
const LOCAL: [&str; 3] = ["127.0.0.1:5900", "127.0.0.1:3389", "127.0.0.1:6080"];

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("VDI_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        // `kubectl logs` is not a terminal: no colour codes there.
        LogFormat::Text => fmt.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => fmt.json().flatten_event(true).init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.print_capabilities {
        println!("{}", vdi_sidecar::rdp::capabilities_json());
        return ExitCode::SUCCESS;
    }
    init_tracing(cli.log_format);
    let result = match cli.command {
        Some(Command::Serve(args)) => run_serve(&args),
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

fn run_serve(args: &ServeArgs) -> anyhow::Result<()> {
    let cfg = args.config(env("CONTAINER_NAME").as_deref(), env("VDI_PASSWORD"))?;
    run_until_signal(|stop| async move { Ok(serve::run(cfg, stop).await?) })
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
    let viewers = args
        .viewers
        .viewers(LOCAL, "vdi-sidecar", env("VDI_PASSWORD"))?;
    let opts = SourceOptions {
        shared_memory: !args.no_shared_memory,
        clipboard: viewers.clipboard,
        ..SourceOptions::default()
    };
    run_until_signal(|stop| async move {
        let (consoles, task) = source::spawn(args.dbus_address, opts, stop.clone());
        viewers.start(&consoles, &stop).await?;
        stop.cancelled().await;
        let _ = task.await;
        Ok(())
    })
}

fn run_demo(args: DemoArgs) -> anyhow::Result<()> {
    let (width, height) = args
        .size
        .split_once('x')
        .and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?)))
        .context("--size must be WIDTHxHEIGHT")?;
    let cfg = vdi_sidecar::demo::DemoConfig {
        viewers: args
            .viewers
            .viewers(LOCAL, "vdi-sidecar demo", env("VDI_PASSWORD"))?,
        kernel: args.kernel,
        initrd: args.initrd,
        qemu: args.qemu,
        width,
        height,
        extra_qemu_args: Vec::new(),
        guest_commands: Vec::new(),
        disk: args.disk,
    };
    run_until_signal(|stop| async move { Ok(vdi_sidecar::demo::run(cfg, stop).await?) })
}
