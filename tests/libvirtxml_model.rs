//! Plugin mode's domain goes through KubeVirt's libvirtxml round trip (Unmarshal → Marshal, at
//! libvirtxml v1.12002.0), which silently drops whatever that version does not model. Every
//! element and attribute our rewrite emits must therefore be in that version's structs, listed
//! in tests/data/libvirtxml-v1.12002.0-model.json (no Go toolchain or module download needed).

use quick_xml::Reader;
use quick_xml::events::{BytesStart, Event};
use serde_json::Value;
use vdi_sidecar::hook::domain::{RewriteOptions, rewrite};

fn model() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/libvirtxml-v1.12002.0-model.json"
    ))
    .expect("model");
    serde_json::from_str(&text).expect("json")
}

fn attrs(e: &BytesStart) -> Vec<(String, String)> {
    e.attributes()
        .filter(|a| {
            a.as_ref()
                .is_ok_and(|a| !a.key.into_inner().starts_with("xmlns"))
        })
        .map(|a| {
            let a = a.expect("attribute");
            (
                a.key.into_inner().to_owned(),
                a.normalized_value(quick_xml::XmlVersion::Implicit1_0)
                    .expect("value")
                    .into_owned(),
            )
        })
        .collect()
}

/// Checks every element under (and including) a top-level device we emit against the model;
/// returns how many elements were checked.
fn check(xml: &str, model: &Value) -> Result<usize, String> {
    let mut r = Reader::from_str(xml);
    // Each open element and its model node (None: not inside a device we check).
    let mut stack: Vec<(String, Option<Value>)> = Vec::new();
    let mut checked = 0;
    loop {
        let (e, empty) = match r.read_event().map_err(|e| e.to_string())? {
            Event::Start(e) => (e.into_owned(), false),
            Event::Empty(e) => (e.into_owned(), true),
            Event::End(_) => {
                stack.pop();
                continue;
            }
            Event::Eof => return Ok(checked),
            _ => continue,
        };
        let name = e.name().into_inner().to_owned();
        // libvirtxml models by local name in libvirt's namespaces (`qemu:env` is `env`).
        let local = name.rsplit(':').next().unwrap_or(&name).to_owned();
        let a = attrs(&e);
        let ty = a.iter().find(|(k, _)| k == "type").map(|(_, v)| v.as_str());
        let parent_is_devices = stack.last().is_some_and(|(n, _)| n == "devices");
        let parent_is_domain = stack.len() == 1;
        let node = match stack.last() {
            Some((_, Some(parent))) => Some(
                parent["children"]
                    .get(&local)
                    .cloned()
                    .ok_or_else(|| format!("<{name}> is not modelled under its parent"))?,
            ),
            _ if parent_is_devices => match (name.as_str(), ty) {
                ("graphics", Some("dbus")) => Some(model["graphics[type=dbus]"].clone()),
                ("audio", Some("dbus")) => Some(model["audio[type=dbus]"].clone()),
                ("video", _) => Some(model["video"].clone()),
                ("channel", Some("qemu-vdagent")) => {
                    Some(model["channel[type=qemu-vdagent]"].clone())
                }
                _ => None,
            },
            _ if parent_is_domain && local == "commandline" => {
                Some(model["qemu:commandline"].clone())
            }
            _ => None,
        };
        if let Some(n) = &node {
            checked += 1;
            for (k, _) in &a {
                let known = n["attrs"]
                    .as_array()
                    .is_some_and(|l| l.iter().any(|x| x == k.as_str()));
                if !known {
                    return Err(format!(
                        "<{name} {k}=…> is not modelled: libvirtxml drops it"
                    ));
                }
            }
        }
        if !empty {
            stack.push((name, node));
        }
    }
}

#[test]
fn everything_we_emit_survives_kubevirts_libvirtxml_round_trip() {
    let model = model();
    let opts = RewriteOptions {
        bus_address: "unix:path=/var/run/kubevirt-plugin/vdi-sidecar/vdi/bus".into(),
        drop_vnc: false,
        audio: true,
        video_model: "virtio".into(),
        display: true,
        // A module pack's environment (stock launcher), so qemu:commandline is checked too.
        qemu_env: vec![
            (
                "QEMU_MODULE_DIR".into(),
                "/var/run/kubevirt-plugin/vdi-sidecar/vdi/qemu-modules/p/modules".into(),
            ),
            (
                "LD_LIBRARY_PATH".into(),
                "/var/run/kubevirt-plugin/vdi-sidecar/vdi/qemu-modules/p/lib".into(),
            ),
        ],
        clipboard: true,
    };
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/domains");
    let mut total = 0;
    for entry in std::fs::read_dir(dir).expect("corpus") {
        let path = entry.expect("entry").path();
        let xml = std::fs::read_to_string(&path).expect("read");
        let out = rewrite(&xml, &opts).expect("rewrite").xml;
        total += check(&out, &model).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
    // graphics + its audio link + audio + output + settings + commandline + its env, at least
    // once.
    assert!(total >= 8, "nothing was checked ({total})");
}

#[test]
fn the_check_catches_what_libvirtxml_would_drop() {
    let model = model();
    let bad = [
        "<domain><devices><graphics type='dbus' address='x' gl-extra='1'/></devices></domain>",
        "<domain><devices><audio id='1' type='dbus'><output><buffer/></output></audio></devices></domain>",
        "<domain><devices><audio id='1' type='dbus'><output><settings rate='1'/></output></audio></devices></domain>",
        "<domain xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><devices/><qemu:commandline><qemu:env name='A' value='b' extra='1'/></qemu:commandline></domain>",
    ];
    for xml in bad {
        assert!(check(xml, &model).is_err(), "{xml}");
    }
    let good = "<domain><devices><graphics type='dbus' address='x' p2p='no'><gl enable='no'/>\
                <audio id='1'/></graphics><audio id='1' type='dbus'><output fixedSettings='yes'>\
                <settings frequency='48000'/></output></audio></devices></domain>";
    assert_eq!(check(good, &model), Ok(6));
}
