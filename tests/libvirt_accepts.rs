//! Every rewritten corpus domain validates against libvirt's schema (`virt-xml-validate`) and is
//! defined by a real libvirt daemon, which keeps our dbus graphics and audio.

mod common;

use std::process::Command;

use common::libvirt::{ensure, virsh};
use vdi_sidecar::hook::domain::{RewriteOptions, rewrite};

fn domain_name(xml: &str) -> String {
    let start = xml.find("<name>").expect("name") + "<name>".len();
    let end = xml[start..].find('<').expect("name end") + start;
    xml[start..end].to_owned()
}

#[test]
fn libvirt_validates_and_defines_every_rewritten_domain() {
    let _daemons = ensure();
    let out_dir = tempfile::tempdir().expect("tempdir");
    let opts = RewriteOptions {
        bus_address: "unix:path=/var/run/kubevirt-hooks/hook-sidecar-0/vdi/bus".into(),
        drop_vnc: false,
        audio: true,
        video_model: "virtio".into(),
        display: true,
        qemu_env: Vec::new(),
        clipboard: true,
    };
    let dir = common::data_file("domains");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).expect("corpus") {
        let path = entry.expect("entry").path();
        let xml = std::fs::read_to_string(&path).expect("read");
        for (variant, o) in [
            ("default", opts.clone()),
            (
                "drop-vnc",
                RewriteOptions {
                    drop_vnc: true,
                    ..opts.clone()
                },
            ),
            (
                // A stock launcher: the module pack's environment in <qemu:commandline>.
                "pack",
                RewriteOptions {
                    qemu_env: vec![
                        (
                            "QEMU_MODULE_DIR".into(),
                            "/var/run/vdi/qemu-modules/p/modules".into(),
                        ),
                        (
                            "LD_LIBRARY_PATH".into(),
                            "/var/run/vdi/qemu-modules/p/lib".into(),
                        ),
                    ],
                    ..opts.clone()
                },
            ),
        ] {
            let out = rewrite(&xml, &o).expect("rewrite").xml;
            let file = out_dir.path().join(format!(
                "{variant}-{}",
                path.file_name().expect("f").to_string_lossy()
            ));
            std::fs::write(&file, &out).expect("write");

            let v = Command::new("virt-xml-validate")
                .arg(&file)
                .arg("domain")
                .output()
                .expect("virt-xml-validate");
            assert!(
                v.status.success(),
                "{file:?} fails libvirt's schema:\n{}{}",
                String::from_utf8_lossy(&v.stdout),
                String::from_utf8_lossy(&v.stderr)
            );

            let name = domain_name(&out);
            let _ = virsh(&["undefine", &name]);
            let d = virsh(&["define", file.to_str().expect("path")]);
            assert!(
                d.status.success(),
                "libvirt refused {file:?}: {}",
                String::from_utf8_lossy(&d.stderr)
            );
            let dump = virsh(&["dumpxml", "--inactive", &name]);
            let _ = virsh(&["undefine", &name]);
            let dump = String::from_utf8_lossy(&dump.stdout).into_owned();
            if variant == "pack" {
                assert!(
                    dump.contains(
                        "<qemu:env name='QEMU_MODULE_DIR' value='/var/run/vdi/qemu-modules/p/modules'/>"
                    ) && dump.contains("<qemu:env name='LD_LIBRARY_PATH'"),
                    "{name}: module environment lost:\n{dump}"
                );
            }
            assert!(
                dump.contains(
                    "<graphics type='dbus' address='unix:path=/var/run/kubevirt-hooks/hook-sidecar-0/vdi/bus'"
                ),
                "{name}: dbus graphics lost:\n{dump}"
            );
            // Audio (fixed at 48 kHz stereo s16) exactly when there is a sound card.
            let sound = xml.contains("<sound");
            assert_eq!(
                dump.contains("<audio id='1' type='dbus'>")
                    && dump.contains("<settings frequency='48000' channels='2' format='s16'/>"),
                sound,
                "{name}: audio (sound card: {sound}):\n{dump}"
            );
            assert_eq!(
                dump.matches("<audio id='1'/>").count(),
                usize::from(sound),
                "{name}: audio link"
            );
            // The clipboard channel, as libvirt keeps it (ours, or the domain's own).
            assert_eq!(
                dump.matches("<channel type='qemu-vdagent'>").count(),
                1,
                "{name}: vdagent channel:\n{dump}"
            );
            assert!(
                dump.contains("<target type='virtio' name='com.redhat.spice.0'"),
                "{name}: vdagent port name:\n{dump}"
            );
            if !xml.contains("qemu-vdagent") {
                assert!(
                    dump.contains("<clipboard copypaste='yes'/>")
                        && dump.contains("<mouse mode='server'/>"),
                    "{name}: clipboard settings:\n{dump}"
                );
            }
            n += 1;
        }
    }
    assert!(n >= 14, "only {n} domains checked");
}
