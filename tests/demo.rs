//! `vdi-sidecar demo`: bus + QEMU + guest + VNC on one machine. A real client (vncdotool) gets the
//! guest's drawing with the password; SIGTERM stops everything.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{BIN, Proc, pids_with_cmdline, wait_until};

#[test]
fn demo_serves_the_guest_over_vnc_and_stops_cleanly() {
    let guest = common::qemu::guest();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut child = Command::new(BIN)
        .args(["demo", "--kernel"])
        .arg(guest.join("vmlinuz"))
        .arg("--initrd")
        .arg(guest.join("initrd.gz"))
        .args([
            "--vnc",
            &format!("127.0.0.1:{port}"),
            "--http",
            "127.0.0.1:0",
            "--rdp",
            "127.0.0.1:0",
        ])
        .env("VDI_PASSWORD", "demo-pw1")
        .env("VDI_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("demo");
    let stdout = child.stdout.take().expect("stdout");
    let mut demo = Proc {
        child,
        name: "demo",
    };
    let mut lines = BufReader::new(stdout).lines();
    let announce = lines.next().expect("first line").expect("read");
    assert!(announce.contains("desktop is served"), "{announce}");
    let vnc_line = lines.next().expect("vnc line").expect("read");
    assert!(
        vnc_line.contains(&format!("127.0.0.1:{port}")) && vnc_line.contains("demo-pw1"),
        "{vnc_line}"
    );
    // The web client's URL follows, with the port the system chose.
    let _example = lines.next().expect("example line").expect("read");
    let web_line = lines.next().expect("web line").expect("read");
    let url = web_line
        .split_whitespace()
        .find(|w| w.starts_with("https://127.0.0.1:"))
        .unwrap_or_else(|| panic!("no web URL: {web_line}"));
    let web_port: u16 = url
        .trim_start_matches("https://127.0.0.1:")
        .trim_end_matches('/')
        .parse()
        .expect("web port");
    assert_ne!(web_port, 0, "{web_line}");
    // RDP follows, with its user name; FreeRDP logs in with NLA.
    let rdp_line = lines.next().expect("rdp line").expect("read");
    let rdp = rdp_line
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no RDP address: {rdp_line}"))
        .to_owned();
    assert!(rdp_line.contains("user: vdi"), "{rdp_line}");
    let _rdp_example = lines.next().expect("rdp example").expect("read");
    // How clients trust the generated certificate: the CA is written and named.
    let tls_line = lines.next().expect("tls line").expect("read");
    let ca = tls_line
        .split_whitespace()
        .last()
        .unwrap_or_else(|| panic!("no CA path: {tls_line}"))
        .to_owned();
    let pem = std::fs::read_to_string(&ca).unwrap_or_default();
    assert!(pem.contains("BEGIN CERTIFICATE"), "{tls_line}: {pem}");
    let tiger = lines.next().expect("tigervnc line").expect("read");
    assert!(tiger.contains(&format!("-X509CA={ca}")), "{tiger}");
    let rdp_port: u16 = rdp
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("rdp port");
    let (ok, log) = common::rdp::auth_only(rdp_port, "vdi", "demo-pw1", &[]);
    assert!(ok, "FreeRDP could not log in to the demo:\n{log}");

    let dir = tempfile::tempdir().expect("tempdir");
    let png = dir.path().join("demo.png");
    // The guest boots (TCG, a few seconds) and draws its test image: wait for many colours.
    let drawn = wait_until(Duration::from_secs(90), || {
        let ok = Command::new("vncdotool")
            .args([
                "-s",
                &format!("127.0.0.1::{port}"),
                "-p",
                "demo-pw1",
                "capture",
            ])
            .arg(&png)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return false;
        }
        let colours = Command::new("/usr/bin/identify")
            .args(["-format", "%w %h %k"])
            .arg(&png)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let f: Vec<u64> = colours
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        f.len() == 3 && f[0] == 1024 && f[1] == 768 && f[2] > 1000
    });
    assert!(
        drawn,
        "the demo never showed the guest's test image at 1024x768"
    );

    demo.signal("TERM");
    let status = demo
        .wait_timeout(Duration::from_secs(10))
        .expect("demo exits");
    assert!(status.success(), "{status:?}");
    assert!(
        wait_until(Duration::from_secs(5), || pids_with_cmdline("vdi-demo")
            .is_empty()),
        "QEMU left behind"
    );
}
