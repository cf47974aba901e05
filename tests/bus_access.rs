//! The bus we start lets QEMU's uid (107) in and lets it own `org.qemu`, whatever uid we run
//! as, and keeps other uids out. Needs root (to act as other uids); CI runs as root.

use std::process::Command;

use vdi_sidecar::bus::{Bus, BusConfig};

fn as_uid(uid: u32, bus: &Bus, args: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            "dbus-send",
        ])
        .arg(format!("--bus={}", bus.address()))
        .args([
            "--print-reply",
            "--dest=org.freedesktop.DBus",
            "/org/freedesktop/DBus",
        ])
        .args(args)
        .output()
        .expect("setpriv dbus-send")
}

#[tokio::test]
async fn qemu_uid_connects_and_owns_org_qemu_other_uids_are_refused() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test acts as other uids and must run as root (the README's test command does)"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let bus = Bus::start(BusConfig::in_dir(dir.path().join("vdi")))
        .await
        .expect("bus");
    std::fs::set_permissions(
        dir.path().join("vdi"),
        std::fs::Permissions::from_mode(0o755),
    )
    .expect("chmod");

    let qemu = as_uid(107, &bus, &["org.freedesktop.DBus.GetId"]);
    assert!(
        qemu.status.success(),
        "uid 107 refused: {}",
        String::from_utf8_lossy(&qemu.stderr)
    );

    let own = as_uid(
        107,
        &bus,
        &[
            "org.freedesktop.DBus.RequestName",
            "string:org.qemu",
            "uint32:0",
        ],
    );
    let reply = String::from_utf8_lossy(&own.stdout);
    assert!(
        own.status.success(),
        "{}",
        String::from_utf8_lossy(&own.stderr)
    );
    // DBUS_REQUEST_NAME_REPLY_PRIMARY_OWNER = 1
    assert!(
        reply.contains("uint32 1"),
        "uid 107 could not own org.qemu: {reply}"
    );

    let nobody = as_uid(65534, &bus, &["org.freedesktop.DBus.GetId"]);
    assert!(!nobody.status.success(), "uid 65534 must be refused");

    bus.stop().await;
    assert!(!dir.path().join("vdi/bus").exists());
}
