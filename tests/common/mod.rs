//! Helpers shared by the integration tests: running our binary, a tonic client over a Unix
//! socket (as virt-launcher dials us), and process bookkeeping by PID.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic::transport::{Channel, Endpoint, Uri};

pub const BIN: &str = env!("CARGO_BIN_EXE_vdi-sidecar");

pub fn data_file(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(rel)
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process killed (SIGKILL, by PID) when dropped, so a failing test leaves nothing behind.
pub struct Proc {
    pub child: Child,
    pub name: &'static str,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{sig} {} failed", self.pid());
    }
}

impl Drop for Proc {
    /// SIGTERM first so the process can stop what it started (our dbus-daemon), then SIGKILL.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.pid().to_string()])
                .status();
            if self.wait_timeout(Duration::from_secs(5)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// PIDs of processes whose command line contains `needle`.
pub fn pids_with_cmdline(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            // zombies have an empty cmdline; they are gone for our purposes
            if cmd.contains(needle) {
                pids.push(pid);
            }
        }
    }
    pids
}

/// A loopback address with a port free now (for listeners the binary binds itself).
pub fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
}

/// A `vdi-sidecar serve` in a temporary hooks directory.
pub struct Sidecar {
    pub proc: Proc,
    pub dir: tempfile::TempDir,
    /// `vdi-sidecar.sock`, or `hook.sock` in plugin mode.
    pub socket_name: &'static str,
}

impl Sidecar {
    pub fn hooks_dir(&self) -> PathBuf {
        self.dir.path().join("hooks")
    }
    pub fn socket(&self) -> PathBuf {
        self.hooks_dir().join(self.socket_name)
    }
    pub fn bus_socket(&self) -> PathBuf {
        self.hooks_dir().join("vdi/bus")
    }

    /// Calls OnDefineDomain (v1alpha3) like virt-launcher for VMI `namespace/name` with the
    /// basic KubeVirt domain: this names the VM in logs, metrics and recordings.
    pub async fn define_vm(&self, namespace: &str, name: &str) {
        use vdi_sidecar::hook::proto::v1alpha3;
        let domain = std::fs::read(data_file("domains/kubevirt-basic.xml")).expect("corpus");
        let vmi = format!(r#"{{"metadata":{{"name":"{name}","namespace":"{namespace}"}}}}"#);
        v1alpha3::callbacks_client::CallbacksClient::new(uds_channel(&self.socket()).await)
            .on_define_domain(v1alpha3::OnDefineDomainParams {
                domain_xml: domain,
                vmi: vmi.into_bytes(),
            })
            .await
            .expect("OnDefineDomain");
    }

    /// Everything the sidecar logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sidecar.log")).unwrap_or_default()
    }

    /// Starts `serve` and waits for the hook socket.
    pub fn start(extra_args: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(dir, extra_args, env)
    }

    pub fn start_in(dir: tempfile::TempDir, extra_args: &[&str], env: &[(&str, &str)]) -> Self {
        // QEMU (uid 107) must be able to reach the bus socket inside it.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let hooks = dir.path().join("hooks");
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .arg("--hooks-dir")
            .arg(&hooks)
            .args(extra_args)
            .env_remove("CONTAINER_NAME")
            .env("VDI_LOG", "debug,h2=info,hyper=info,tower=info")
            // Tests run in parallel: no fixed VNC port unless a test asks for one.
            .env("VDI_VNC", "none")
            .env("VDI_HTTP", "none")
            .env("VDI_RDP", "none")
            .stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let log = std::fs::File::create(dir.path().join("sidecar.log")).expect("log file");
        cmd.stderr(log);
        let child = cmd.spawn().expect("spawn vdi-sidecar");
        let mut sc = Sidecar {
            proc: Proc {
                child,
                name: "vdi-sidecar",
            },
            dir,
            socket_name: if extra_args.contains(&"plugin") {
                "hook.sock"
            } else {
                "vdi-sidecar.sock"
            },
        };
        let sock = sc.socket();
        let is_socket = |p: &Path| {
            use std::os::unix::fs::FileTypeExt;
            std::fs::metadata(p).is_ok_and(|m| m.file_type().is_socket())
        };
        let up = wait_until(Duration::from_secs(15), || {
            is_socket(&sock) || matches!(sc.proc.child.try_wait(), Ok(Some(_)))
        });
        assert!(
            up && is_socket(&sock),
            "hook socket {sock:?} did not appear"
        );
        sc
    }
}

/// A plain HTTP/1.1 GET (the insecure web listener): status line, headers and body.
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

/// A gRPC channel over a Unix socket, the way virt-launcher dials hook sidecars.
pub async fn uds_channel(path: &Path) -> Channel {
    let path = path.to_owned();
    Endpoint::try_from("http://localhost")
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let s = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
        .expect("connect to hook socket")
}
pub mod browser;
pub mod libvirt;
pub mod pulse;
pub mod qemu;
pub mod rdp;
pub mod rfb;
pub mod ws;
pub mod x11;

/// Logs of the code under test on stderr, filtered by `VDI_TEST_LOG` (off when unset).
pub fn init_test_log() {
    if let Ok(filter) = std::env::var("VDI_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .try_init();
    }
}

/// (dominant frequency by zero crossings, seconds of sound) of mono samples at `rate`.
pub fn tone(samples: &[f32], rate: u32) -> (f64, f64) {
    let loud: Vec<usize> = (0..samples.len())
        .filter(|&i| samples[i].abs() > 0.1)
        .collect();
    let (first, last) = (
        *loud.first().expect("no sound"),
        *loud.last().expect("no sound"),
    );
    let crossings = (first + 1..=last)
        .filter(|&i| (samples[i - 1] < 0.0) != (samples[i] < 0.0))
        .count();
    let seconds = (last - first) as f64 / f64::from(rate);
    (crossings as f64 / 2.0 / seconds, seconds)
}
