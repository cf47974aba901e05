//! `/metrics` of the real binary while a VNC, an RDP (FreeRDP) and a browser viewer are connected
//! to a real QEMU and one login fails: the counters move as they should, and the text passes the
//! OpenMetrics parser of Prometheus' own Python client.

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::qemu::{Video, Vm};
use common::rdp::{FreeRdp, PASSWORD, USER};
use common::rfb::Client;
use common::x11::Xvfb;
use common::{Sidecar, free_addr, wait_until};

/// The samples of an exposition, by `name{labels}` as written.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

/// Parses with `prometheus_client.openmetrics.parser` (python3-prometheus-client); its error
/// when the text is not valid OpenMetrics.
fn openmetrics_check(text: &str) -> Result<(), String> {
    let mut child = Command::new("python3")
        .args([
            "-c",
            "import sys\nfrom prometheus_client.openmetrics.parser import text_string_to_metric_families as p\n\
             fams = list(p(sys.stdin.read()))\nprint(len(fams))",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("python3: {e}"))?;
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn scrape(addr: &str) -> (String, String) {
    let resp = common::http_get(addr, "/metrics");
    let (head, body) = resp.split_once("\r\n\r\n").expect("HTTP response");
    (head.to_owned(), body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_viewers_of_every_protocol_and_parse_as_openmetrics() {
    let (vnc, rdp, web, metrics) = (free_addr(), free_addr(), free_addr(), free_addr());
    let (vnc_s, rdp_s, web_s, metrics_s) = (
        vnc.to_string(),
        rdp.to_string(),
        web.to_string(),
        metrics.to_string(),
    );
    let sc = Sidecar::start(
        &[
            "--vnc",
            &vnc_s,
            "--rdp",
            &rdp_s,
            "--http",
            &web_s,
            "--http-insecure",
            "--metrics",
            &metrics_s,
            "--username",
            USER,
        ],
        &[("VDI_PASSWORD", PASSWORD)],
    );
    // The hook names the VM; QEMU joins the bus.
    sc.define_vm("desk", "vm-metrics").await;
    let addr = format!("unix:path={}", sc.bus_socket().display());
    let mut vm = Vm::start(sc.dir.path(), &addr, Video::StdVga);
    vm.wait_ready();
    assert!(
        wait_until(Duration::from_secs(30), || sc
            .log()
            .contains("listener registered")),
        "no attach:\n{}",
        sc.log()
    );

    let l = r#"namespace="desk",vm="vm-metrics""#;
    let (head, before) = scrape(&metrics_s);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    let s0 = samples(&before);
    assert_eq!(
        s0.get(&format!("vdi_qemu_attached{{{l}}}")),
        Some(&1.0),
        "{before}"
    );
    assert_eq!(
        s0.get(&format!("vdi_qemu_attaches_total{{{l}}}")),
        Some(&1.0)
    );
    for p in ["vnc", "rdp", "web"] {
        assert_eq!(
            s0.get(&format!("vdi_viewers{{{l},protocol=\"{p}\"}}")),
            Some(&0.0)
        );
    }

    // One failed login, then a viewer of each protocol.
    let refused = Client::connect(vnc, "003.008", Some("wrong")).await;
    assert!(refused.is_err());
    let mut v = Client::connect(vnc, "003.008", Some(PASSWORD))
        .await
        .expect("VNC login");
    v.set_encodings(&[16]).await;
    v.request(false).await;
    v.read_update().await;
    let bridge = common::ws::bridge(web).await;
    let mut b = Client::connect(bridge, "003.008", Some(PASSWORD))
        .await
        .expect("browser login");
    b.set_encodings(&[16]).await;
    b.request(false).await;
    b.read_update().await;
    let x = Xvfb::start();
    let _freerdp = FreeRdp::open(&x, sc.dir.path(), rdp.port(), &[], &[]);
    assert!(
        wait_until(Duration::from_secs(30), || sc
            .log()
            .contains("RDP client logged in")),
        "{}",
        sc.log()
    );

    let (_, during) = scrape(&metrics_s);
    let s1 = samples(&during);
    let at = |k: String| s1.get(&k).copied().unwrap_or(-1.0);
    for p in ["vnc", "rdp", "web"] {
        assert_eq!(
            at(format!("vdi_viewers{{{l},protocol=\"{p}\"}}")),
            1.0,
            "{p}:\n{during}"
        );
        assert_eq!(
            at(format!("vdi_sessions_total{{{l},protocol=\"{p}\"}}")),
            1.0,
            "{p}"
        );
        let sent = at(format!("vdi_sent_bytes_total{{{l},protocol=\"{p}\"}}"));
        assert!(sent > 100.0, "{p} sent {sent}:\n{during}");
        assert!(
            at(format!("vdi_updates_total{{{l},protocol=\"{p}\"}}")) >= 1.0,
            "{p}"
        );
        assert!(
            at(format!(
                "vdi_logins_total{{{l},protocol=\"{p}\",outcome=\"ok\"}}"
            )) >= 1.0,
            "{p}"
        );
    }
    assert_eq!(
        at(format!(
            "vdi_logins_total{{{l},protocol=\"vnc\",outcome=\"failed\"}}"
        )),
        1.0
    );
    assert_eq!(
        at(format!(
            "vdi_logins_total{{{l},protocol=\"rdp\",outcome=\"failed\"}}"
        )),
        0.0
    );
    // std VGA's surface is shared memory when QEMU can map it, inline otherwise.
    let frames = at(format!("vdi_qemu_frames_total{{{l},path=\"inline\"}}"))
        + at(format!("vdi_qemu_frames_total{{{l},path=\"shm\"}}"));
    assert!(frames >= 1.0, "{during}");
    assert!(at(format!("vdi_encode_seconds_count{{{l}}}")) >= 1.0);
    assert!(
        at(format!(
            "vdi_update_write_seconds_count{{{l},protocol=\"web\"}}"
        )) >= 1.0
    );
    assert!(at(format!("process_resident_memory_bytes{{{l}}}")) > 1e6);
    assert!(at(format!("vdi_runtime_tasks{{{l}}}")) >= 1.0);
    openmetrics_check(&during).unwrap_or_else(|e| panic!("not OpenMetrics: {e}\n{during}"));

    // The web listener serves the same; a viewer that leaves is no longer counted.
    drop(v);
    assert!(
        wait_until(Duration::from_secs(10), || {
            let s = samples(&scrape(&web_s).1);
            s.get(&format!("vdi_viewers{{{l},protocol=\"vnc\"}}")) == Some(&0.0)
        }),
        "the VNC viewer is still counted"
    );
    drop(b);
    drop(vm);
    assert!(wait_until(Duration::from_secs(15), || {
        samples(&scrape(&metrics_s).1).get(&format!("vdi_qemu_attached{{{l}}}")) == Some(&0.0)
    }));
}
