//! The domain rewrite over the corpus in tests/data: golden output, idempotence, and that
//! nothing outside graphics/audio/video changes.

use std::path::PathBuf;

use quick_xml::Reader;
use quick_xml::events::Event;
use vdi_sidecar::hook::domain::{RewriteOptions, rewrite};

const BUS: &str = "unix:path=/var/run/kubevirt-hooks/hook-sidecar-0/vdi/bus";

fn opts() -> RewriteOptions {
    RewriteOptions::new(BUS)
}

/// A stock launcher's options: the module pack's environment goes into `<qemu:commandline>`.
fn with_pack() -> RewriteOptions {
    RewriteOptions {
        qemu_env: vec![
            ("QEMU_MODULE_DIR".into(), PACK_MODULES.into()),
            ("LD_LIBRARY_PATH".into(), PACK_LIBS.into()),
        ],
        ..opts()
    }
}

const PACK_MODULES: &str = "/var/run/kubevirt-hooks/hook-sidecar-0/vdi/qemu-modules/p/modules";
const PACK_LIBS: &str = "/var/run/kubevirt-hooks/hook-sidecar-0/vdi/qemu-modules/p/lib";

fn corpus() -> Vec<(String, String)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/domains");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("corpus dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "xml"))
        .collect();
    files.sort();
    assert!(files.len() >= 6, "corpus too small: {files:?}");
    files
        .into_iter()
        .map(|p| {
            let name = p.file_name().expect("name").to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).expect("read"))
        })
        .collect()
}

/// Raw text of every event outside `<devices>`' graphics/audio/video children, whitespace-only
/// text dropped: what must be identical before and after the rewrite.
fn untouched_events(xml: &str) -> Vec<String> {
    let mut reader = Reader::from_str(xml);
    let mut out = Vec::new();
    let mut path: Vec<String> = Vec::new();
    let mut skip_depth: Option<usize> = None;
    loop {
        let start = reader.buffer_position() as usize;
        let ev = reader.read_event().expect("well-formed");
        let end = reader.buffer_position() as usize;
        let raw = xml[start..end].to_owned();
        match &ev {
            Event::Eof => break,
            Event::Start(e) | Event::Empty(e) => {
                let name = e.name().into_inner().to_owned();
                let in_devices = path.len() == 2 && path[1] == "devices";
                let ours = matches!(name.as_str(), "graphics" | "audio" | "video")
                    || (name == "channel"
                        && e.try_get_attribute("type")
                            .ok()
                            .flatten()
                            .is_some_and(|a| &*a.value == "qemu-vdagent"));
                if skip_depth.is_none() && in_devices && ours {
                    if matches!(ev, Event::Start(_)) {
                        skip_depth = Some(path.len());
                    }
                } else if skip_depth.is_none() {
                    out.push(raw);
                }
                if matches!(ev, Event::Start(_)) {
                    path.push(name);
                }
            }
            Event::End(_) => {
                path.pop();
                if skip_depth == Some(path.len()) {
                    skip_depth = None;
                } else if skip_depth.is_none() {
                    out.push(raw);
                }
            }
            Event::Text(t) if AsRef::<str>::as_ref(t).trim().is_empty() => {}
            _ => {
                if skip_depth.is_none() {
                    out.push(raw);
                }
            }
        }
    }
    out
}

fn count(xml: &str, needle: &str) -> usize {
    xml.matches(needle).count()
}

#[test]
fn matches_golden_output() {
    let expected_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/expected");
    for (name, xml) in corpus() {
        let out = rewrite(&xml, &opts()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let golden = std::fs::read_to_string(expected_dir.join(&name)).expect("golden file");
        assert_eq!(
            out.xml, golden,
            "{name}: output differs from tests/data/expected"
        );
    }
}

#[test]
fn is_idempotent() {
    for (name, xml) in corpus() {
        for o in [
            opts(),
            RewriteOptions {
                drop_vnc: true,
                ..opts()
            },
            RewriteOptions {
                audio: false,
                ..opts()
            },
            RewriteOptions {
                clipboard: false,
                ..opts()
            },
            with_pack(),
        ] {
            let once = rewrite(&xml, &o).expect("first").xml;
            let twice = rewrite(&once, &o).expect("second").xml;
            assert_eq!(once, twice, "{name} with {o:?} is not idempotent");
        }
    }
}

#[test]
fn leaves_everything_else_byte_for_byte() {
    for (name, xml) in corpus() {
        let out = rewrite(&xml, &opts()).expect("rewrite").xml;
        assert_eq!(
            untouched_events(&xml),
            untouched_events(&out),
            "{name}: something outside graphics/audio/video changed"
        );
        // Kept verbatim: namespace declaration, prefixed elements, comments, escaped text.
        for piece in ["xmlns:qemu=", "<qemu:commandline>", "<!--", "a &amp; b"] {
            assert_eq!(count(&xml, piece), count(&out, piece), "{name}: {piece}");
        }
    }
}

#[test]
fn module_env_joins_any_commandline_once_and_keeps_what_was_there() {
    let mut with_existing = 0;
    for (name, xml) in corpus() {
        let out = rewrite(&xml, &with_pack()).expect("rewrite");
        with_existing += usize::from(xml.contains("<qemu:commandline>"));
        assert_eq!(out.summary.qemu_env, 2, "{name}");
        for (env, value) in [
            ("QEMU_MODULE_DIR", PACK_MODULES),
            ("LD_LIBRARY_PATH", PACK_LIBS),
        ] {
            assert_eq!(
                count(
                    &out.xml,
                    &format!("<qemu:env name=\"{env}\" value=\"{value}\">")
                ),
                1,
                "{name}: {}",
                out.xml
            );
        }
        assert_eq!(count(&out.xml, "<qemu:commandline>"), 1, "{name}");
        assert_eq!(
            count(
                &out.xml,
                "xmlns:qemu=\"http://libvirt.org/schemas/domain/qemu/1.0\""
            ),
            1,
            "{name}"
        );
        // The operator's (or KubeVirt's) own entries stay.
        assert_eq!(
            count(&xml, "<qemu:env name=\"VDI_TEST\" value=\"a &amp; b\">"),
            count(&out.xml, "<qemu:env name=\"VDI_TEST\" value=\"a &amp; b\">"),
            "{name}"
        );
        assert_eq!(count(&out.xml, "<graphics type=\"dbus\""), 1, "{name}");
    }
    // Both cases are in the corpus: a commandline to join, and none (one is made).
    assert!(with_existing > 0 && with_existing < corpus().len());
}

#[test]
fn exactly_one_dbus_graphics_linked_to_one_dbus_audio() {
    for (name, xml) in corpus() {
        let out = rewrite(&xml, &opts()).expect("rewrite").xml;
        assert_eq!(count(&out, "<graphics type=\"dbus\""), 1, "{name}");
        assert_eq!(count(&out, &format!("address=\"{BUS}\"")), 1, "{name}");
        // Audio only where there is a sound card to carry.
        let audio = usize::from(xml.contains("<sound"));
        assert_eq!(
            count(&out, "<audio id=\"1\"></audio>"),
            audio,
            "{name}: link in graphics"
        );
        assert_eq!(
            count(&out, "<audio id=\"1\" type=\"dbus\">"),
            audio,
            "{name}"
        );
        assert_eq!(
            count(
                &out,
                "<settings frequency=\"48000\" channels=\"2\" format=\"s16\">"
            ),
            audio,
            "{name}: fixed 48 kHz stereo s16 output"
        );
        assert_eq!(
            count(&out, "<audio "),
            2 * audio,
            "{name}: other <audio> left"
        );
        assert_eq!(count(&out, "<video>"), 1, "{name}: exactly one video");
        // KubeVirt's VNC stays by default.
        assert_eq!(
            count(&xml, "<graphics type=\"vnc\"") + count(&xml, "<graphics type='vnc'"),
            count(&out, "<graphics type=\"vnc\"") + count(&out, "<graphics type='vnc'"),
            "{name}"
        );
    }
}

#[test]
fn drop_vnc_and_no_audio_options() {
    for (name, xml) in corpus() {
        let o = RewriteOptions {
            drop_vnc: true,
            audio: false,
            ..opts()
        };
        let out = rewrite(&xml, &o).expect("rewrite").xml;
        assert!(
            !out.contains("type=\"vnc\"") && !out.contains("type='vnc'"),
            "{name}"
        );
        assert!(
            !out.contains("<audio"),
            "{name}: audio left with audio=false"
        );
        assert_eq!(count(&out, "<graphics type=\"dbus\""), 1, "{name}");
    }
}

#[test]
fn adds_video_only_when_missing() {
    let (_, xml) = corpus()
        .into_iter()
        .find(|(n, _)| n == "no-graphics-no-video.xml")
        .expect("file");
    let o = RewriteOptions {
        video_model: "bochs".into(),
        ..opts()
    };
    let out = rewrite(&xml, &o).expect("rewrite");
    assert!(out.summary.added_video);
    assert!(
        out.xml
            .contains("<model type=\"bochs\" heads=\"1\"></model>")
    );
    let (_, basic) = corpus()
        .into_iter()
        .find(|(n, _)| n == "kubevirt-basic.xml")
        .expect("file");
    let out = rewrite(&basic, &o).expect("rewrite");
    assert!(!out.summary.added_video);
    assert!(!out.xml.contains("bochs"));
}

#[test]
fn one_clipboard_channel_unless_the_domain_has_an_agent_channel() {
    let channel = "<channel type=\"qemu-vdagent\">";
    for (name, xml) in corpus() {
        let out = rewrite(&xml, &opts()).expect("rewrite");
        let own = xml.contains("type='qemu-vdagent'") || xml.contains("type='spicevmc'");
        assert_eq!(out.summary.added_clipboard, !own, "{name}");
        assert_eq!(count(&out.xml, channel), usize::from(!own), "{name}");
        if own {
            // The operator's channel stays as it was (here: copy and paste off).
            assert!(out.xml.contains("<clipboard copypaste='no'/>"), "{name}");
        } else {
            assert!(
                out.xml
                    .contains("<clipboard copypaste=\"yes\"></clipboard>")
                    && out.xml.contains("<mouse mode=\"server\"></mouse>")
                    && out.xml.contains("name=\"com.redhat.spice.0\""),
                "{name}"
            );
        }
        let off = rewrite(
            &xml,
            &RewriteOptions {
                clipboard: false,
                ..opts()
            },
        )
        .expect("rewrite");
        assert_eq!(count(&off.xml, channel), 0, "{name}");
        assert!(!off.summary.added_clipboard, "{name}");
    }
}
