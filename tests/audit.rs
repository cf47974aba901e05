//! The session audit log of the real binary with `--log-format json`: every line is a JSON object;
//! failed logins (VNC and FreeRDP) and every session's start and end are `audit` events with all
//! their fields, and a session ended by a client reset, by preemption (an exclusive VNC viewer)
//! and by the sidecar's shutdown each says so.

mod common;

use std::time::Duration;

use common::rdp::{PASSWORD, USER};
use common::{Sidecar, free_addr, wait_until};
use serde_json::Value;
use tokio::net::TcpStream;

/// Every line as JSON (a line that is not JSON fails the test).
fn lines(sc: &Sidecar) -> Vec<Value> {
    sc.log()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn audit_events(sc: &Sidecar, event: &str) -> Vec<Value> {
    lines(sc)
        .into_iter()
        .filter(|v| v["target"] == "audit" && v["event"] == event)
        .collect()
}

async fn login(
    vnc: std::net::SocketAddr,
    password: &str,
    shared: bool,
) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect(vnc).await.map_err(|e| e.to_string())?;
    common::rfb::handshake(&mut s, "003.008", Some(password), shared).await?;
    Ok(s)
}

fn ends_with_reason(sc: &Sidecar, reason: &str) -> bool {
    audit_events(sc, "session_end")
        .iter()
        .any(|v| v["reason"] == reason)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_lines_are_json_with_every_field_and_each_end_has_its_reason() {
    let (vnc, rdp) = (free_addr(), free_addr());
    let (vnc_s, rdp_s) = (vnc.to_string(), rdp.to_string());
    let mut sc = Sidecar::start(
        &[
            "--log-format",
            "json",
            "--vnc",
            &vnc_s,
            "--rdp",
            &rdp_s,
            "--vnc-allow-exclusive",
            "--username",
            USER,
        ],
        &[("VDI_PASSWORD", PASSWORD)],
    );
    sc.define_vm("desk", "vm-audit").await;

    // Failed logins, one per protocol.
    assert!(login(vnc, "wrong", true).await.is_err());
    let (ok, log) = common::rdp::auth_only(rdp.port(), USER, "wrong-password", &[]);
    assert!(!ok, "{log}");
    assert!(
        wait_until(Duration::from_secs(10), || audit_events(
            &sc,
            "login_refused"
        )
        .len()
            >= 2),
        "{}",
        sc.log()
    );
    for (v, protocol) in audit_events(&sc, "login_refused")
        .iter()
        .zip(["vnc", "rdp"])
    {
        assert_eq!(v["protocol"], protocol, "{v}");
        assert_eq!(v["outcome"], "failed", "{v}");
        assert_eq!(v["vm"], "desk/vm-audit", "{v}");
        assert!(
            v["peer"]
                .as_str()
                .is_some_and(|p| p.starts_with("127.0.0.1:")),
            "{v}"
        );
        assert!(v["at"].as_str().is_some_and(|t| t.contains('T')), "{v}");
    }
    assert_eq!(audit_events(&sc, "login_refused")[1]["user"], USER);

    // A viewer that resets its connection.
    let a = login(vnc, PASSWORD, true).await.expect("login");
    assert!(wait_until(Duration::from_secs(5), || !audit_events(
        &sc,
        "session_start"
    )
    .is_empty()));
    a.set_zero_linger().expect("linger");
    drop(a);
    assert!(
        wait_until(Duration::from_secs(10), || ends_with_reason(
            &sc,
            "client reset"
        )),
        "{}",
        sc.log()
    );

    // A shared viewer preempted by an exclusive one, which stays until the sidecar stops.
    let _b = login(vnc, PASSWORD, true).await.expect("login");
    let _c = login(vnc, PASSWORD, false).await.expect("exclusive login");
    assert!(
        wait_until(Duration::from_secs(10), || ends_with_reason(
            &sc,
            "preempted by an exclusive viewer"
        )),
        "{}",
        sc.log()
    );
    sc.proc.signal("TERM");
    assert!(sc.proc.wait_timeout(Duration::from_secs(10)).is_some());
    assert!(ends_with_reason(&sc, "sidecar shutdown"), "{}", sc.log());

    let starts = audit_events(&sc, "session_start");
    let ends = audit_events(&sc, "session_end");
    assert_eq!((starts.len(), ends.len()), (3, 3), "{}", sc.log());
    for v in &starts {
        for field in [
            "vm",
            "protocol",
            "peer",
            "user",
            "shared",
            "start",
            "timestamp",
        ] {
            assert!(!v[field].is_null(), "{field} missing: {v}");
        }
    }
    for v in &ends {
        for field in [
            "vm",
            "protocol",
            "peer",
            "user",
            "shared",
            "start",
            "end",
            "duration_secs",
            "bytes_out",
            "bytes_in",
            "reason",
        ] {
            assert!(!v[field].is_null(), "{field} missing: {v}");
        }
        assert_eq!(v["vm"], "desk/vm-audit");
        assert!(v["bytes_out"].as_u64().is_some_and(|b| b > 0), "{v}");
        assert!(v["end"].as_str() >= v["start"].as_str(), "{v}");
    }
    let exclusive: Vec<_> = starts.iter().map(|v| v["shared"].as_bool()).collect();
    assert_eq!(exclusive, [Some(true), Some(true), Some(false)]);
}
