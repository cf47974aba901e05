//! Any bytes as the libvirt domain KubeVirt hands us. When the rewrite succeeds its output is
//! well-formed XML and rewriting it again changes nothing (idempotence is what makes a repeated
//! OnDefineDomain, or hook plus plugin, safe).
// Built by cargo-fuzz (`--cfg fuzzing`) as a libFuzzer target; included by tests/fuzz_seeds.rs
// as a module whose `fuzz` replays the committed seeds in the ordinary test run.
#![cfg_attr(fuzzing, no_main)]

use quick_xml::events::Event;
use vdi_sidecar::hook::domain::{RewriteOptions, rewrite_bytes};

fn well_formed(xml: &str) -> Result<(), String> {
    let mut r = quick_xml::Reader::from_str(xml);
    r.config_mut().check_end_names = true;
    let mut depth = 0i64;
    loop {
        match r.read_event() {
            Ok(Event::Start(_)) => depth += 1,
            Ok(Event::End(_)) => depth -= 1,
            Ok(Event::Eof) => break,
            Ok(_) => {}
            Err(e) => return Err(format!("{e} at {}", r.buffer_position())),
        }
        if depth < 0 {
            return Err("more end tags than start tags".into());
        }
    }
    if depth != 0 {
        return Err(format!("{depth} unclosed elements"));
    }
    Ok(())
}

/// `xml` without whitespace that touches a tag's `<` or `>`.
fn between_tags_trimmed(xml: &str) -> String {
    let mut out = String::with_capacity(xml.len());
    let mut pending = String::new();
    for c in xml.chars() {
        if c.is_whitespace() {
            pending.push(c);
            continue;
        }
        if !(c == '<' || out.ends_with('>')) {
            out.push_str(&pending);
        }
        pending.clear();
        out.push(c);
    }
    out
}

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|input: &[u8]| fuzz(input));

/// One input.
pub fn fuzz(input: &[u8]) {
    let Some((&knobs, xml)) = input.split_first() else {
        return;
    };
    let mut opts = RewriteOptions::new("unix:path=/var/run/kubevirt-hooks/vdi/bus");
    opts.drop_vnc = knobs & 1 != 0;
    opts.audio = knobs & 2 != 0;
    opts.display = knobs & 4 != 0;
    opts.clipboard = knobs & 8 != 0;
    if knobs & 16 != 0 {
        opts.video_model = "vga".into();
    }
    if knobs & 32 != 0 {
        opts.qemu_env = vec![("QEMU_MODULE_DIR".into(), "/pack/modules".into())];
    }
    let Ok(once) = rewrite_bytes(xml, &opts) else {
        return;
    };
    if let Err(e) = well_formed(&once.xml) {
        panic!("rewrite produced malformed XML ({e}):\n{}", once.xml);
    }
    let twice = rewrite_bytes(once.xml.as_bytes(), &opts).expect("our own output is accepted");
    // Byte for byte on the corpus of real domains (tests/rewrite_corpus.rs); here, where text
    // like " !" may sit between elements, the indentation we derive may differ, and libvirt
    // ignores whitespace between elements: compared without it.
    assert_eq!(
        between_tags_trimmed(&once.xml),
        between_tags_trimmed(&twice.xml),
        "the rewrite is not idempotent:\n{}\n----\n{}",
        once.xml,
        twice.xml
    );
}
