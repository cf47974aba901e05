//! The libvirt domain rewrite: a pure function from KubeVirt's domain XML to one whose QEMU
//! exports its display (and audio) on our D-Bus bus.
//!
//! The rewrite is a list of byte-range edits found by a streaming quick-xml pass, so everything it
//! does not touch (namespaces and prefixes such as `qemu:commandline`, comments, attribute order
//! and quoting, indentation) is copied byte for byte. It is idempotent: KubeVirt calls the hook
//! 2–3 times per boot, and later inputs are libvirt's read-back of an earlier output (a
//! `<graphics type="dbus">` without `address`, no `<audio>`), so we always remove and re-add
//! rather than "skip if present".

use std::ops::Range;

use quick_xml::Reader;
use quick_xml::events::{BytesStart, Event};

/// Largest domain XML or VMI JSON we accept (KubeVirt domains are a few tens of KiB).
pub const MAX_INPUT_BYTES: usize = 16 * 1024 * 1024;

/// The `id` of the one `<audio type='dbus'>` we emit (every other `<audio>` is removed).
const AUDIO_ID: &str = "1";

/// Video models we accept for a video device we add (libvirt `<model type=…>`).
pub const VIDEO_MODELS: &[&str] = &["virtio", "vga", "bochs", "qxl", "cirrus", "ramfb"];

/// What the rewrite produces, from the operator's flags merged with per-VM annotations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RewriteOptions {
    /// D-Bus address of our bus as the compute container sees it.
    pub bus_address: String,
    /// Remove KubeVirt's `<graphics type='vnc'>` (breaks `virtctl vnc`).
    pub drop_vnc: bool,
    /// Export guest audio through `<audio type='dbus'>`.
    pub audio: bool,
    /// Model of the `<video>` added when the domain has none.
    pub video_model: String,
}

/// Errors for input the rewrite refuses. Messages are shown to the operator (gRPC status,
/// `SyncFailed` event), so they say what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("{what} is {len} bytes, more than the {MAX_INPUT_BYTES}-byte limit")]
    TooLarge { what: &'static str, len: usize },
    #[error("domain XML is not UTF-8")]
    NotUtf8,
    #[error("domain XML is malformed at byte {position}: {reason}")]
    Malformed { position: u64, reason: String },
    #[error("root element is <{0}>, expected <domain>")]
    RootNotDomain(String),
    #[error("domain XML has no root element")]
    NoRoot,
    #[error("domain has no <devices> element")]
    NoDevices,
    #[error("VMI is not valid JSON: {0}")]
    InvalidVmi(String),
    #[error("annotation {key}={value:?} is invalid: {reason}")]
    InvalidAnnotation {
        key: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("bus address must not be empty")]
    EmptyBusAddress,
}

/// What a rewrite changed, for the log line of each hook call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub removed_graphics: usize,
    pub removed_audio: usize,
    pub kept_graphics: usize,
    pub added_video: bool,
    pub added_audio: bool,
    /// Why audio was asked for but left out.
    pub audio_skipped: Option<&'static str>,
}

/// A rewritten domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewritten {
    pub xml: String,
    pub summary: Summary,
}

/// Rewrites a domain given as bytes (what the hook API carries).
pub fn rewrite_bytes(xml: &[u8], opts: &RewriteOptions) -> Result<Rewritten, Error> {
    if xml.len() > MAX_INPUT_BYTES {
        return Err(Error::TooLarge {
            what: "domain XML",
            len: xml.len(),
        });
    }
    let xml = std::str::from_utf8(xml).map_err(|_| Error::NotUtf8)?;
    rewrite(xml, opts)
}

/// Rewrites a domain: removes every `<audio>`, every dbus `<graphics>` (and the vnc one with
/// `drop_vnc`), then appends to `<devices>` a video device if there is none, our
/// `<graphics type="dbus" address=…>` and, with `audio`, the `<audio type="dbus">` it links to.
pub fn rewrite(xml: &str, opts: &RewriteOptions) -> Result<Rewritten, Error> {
    if xml.len() > MAX_INPUT_BYTES {
        return Err(Error::TooLarge {
            what: "domain XML",
            len: xml.len(),
        });
    }
    if opts.bus_address.is_empty() {
        return Err(Error::EmptyBusAddress);
    }
    let scan = scan(xml, opts)?;
    let insertion = render_insertion(&scan, opts);

    // Cuts are in document order and never overlap; the insertion goes before any cut that
    // starts where it does (the `<devices/>` case replaces that element).
    let mut out = String::with_capacity(xml.len() + insertion.len());
    let mut cursor = 0;
    let mut inserted = false;
    for cut in &scan.cuts {
        if !inserted && scan.insert_at <= cut.start {
            out.push_str(&xml[cursor..scan.insert_at]);
            out.push_str(&insertion);
            cursor = scan.insert_at;
            inserted = true;
        }
        out.push_str(&xml[cursor..cut.start]);
        cursor = cut.end;
    }
    if !inserted {
        out.push_str(&xml[cursor..scan.insert_at]);
        out.push_str(&insertion);
        cursor = scan.insert_at;
    }
    out.push_str(&xml[cursor..]);

    let mut summary = scan.summary;
    summary.added_video = !scan.has_video;
    summary.added_audio = opts.audio && scan.has_sound;
    summary.audio_skipped = (opts.audio && !scan.has_sound)
        .then_some("the VM has no sound device (spec.domain.devices.sound)");
    Ok(Rewritten { xml: out, summary })
}

/// The result of the streaming pass: what to cut and where to insert.
struct Scan {
    cuts: Vec<Range<usize>>,
    insert_at: usize,
    /// Replaces `<devices/>` (an empty element) when set: the insertion must carry the tags.
    expand_empty_devices: bool,
    has_video: bool,
    /// A `<sound>` card: without one a D-Bus audio backend would carry nothing.
    has_sound: bool,
    /// Whitespace before the first child of `<devices>` (e.g. "\n\t\t").
    child_indent: Option<String>,
    /// Whitespace before `</devices>` (e.g. "\n\t").
    closing_indent: Option<String>,
    summary: Summary,
}

fn malformed(reader: &Reader<&[u8]>, err: impl std::fmt::Display) -> Error {
    Error::Malformed {
        position: reader.error_position(),
        reason: err.to_string(),
    }
}

fn to_usize(pos: u64) -> usize {
    usize::try_from(pos).unwrap_or(usize::MAX)
}

fn type_attr(reader: &Reader<&[u8]>, e: &BytesStart<'_>) -> Result<Option<String>, Error> {
    match e.try_get_attribute("type") {
        Ok(Some(a)) => Ok(Some(
            a.normalized_value(quick_xml::XmlVersion::Implicit1_0)
                .map_err(|err| malformed(reader, err))?
                .into_owned(),
        )),
        Ok(None) => Ok(None),
        Err(err) => Err(malformed(reader, err)),
    }
}

fn scan(xml: &str, opts: &RewriteOptions) -> Result<Scan, Error> {
    let mut reader = Reader::from_reader(xml.as_bytes());
    reader.config_mut().check_end_names = true;

    let mut depth: usize = 0;
    let mut root_seen = false;
    let mut root_closed = false;
    let mut devices_depth: Option<usize> = None; // depth of <devices>' children while inside it
    let mut devices_done = false;
    // Span of the whitespace text just before the current event, if directly inside <devices>.
    let mut pending_ws: Option<Range<usize>> = None;
    // While skipping a dropped element: (depth at which it ends, start of the cut).
    let mut skipping: Option<(usize, usize)> = None;

    let mut scan = Scan {
        cuts: Vec::new(),
        insert_at: 0,
        expand_empty_devices: false,
        has_video: false,
        has_sound: false,
        child_indent: None,
        closing_indent: None,
        summary: Summary::default(),
    };
    let mut insert_at: Option<usize> = None;

    loop {
        let start = to_usize(reader.buffer_position());
        let event = reader.read_event().map_err(|e| malformed(&reader, e))?;
        let end = to_usize(reader.buffer_position());
        let ws_before = pending_ws.take();

        if let Some((skip_depth, cut_start)) = skipping {
            match event {
                Event::Start(_) => depth += 1,
                Event::End(_) => {
                    depth -= 1;
                    if depth == skip_depth {
                        scan.cuts.push(cut_start..end);
                        skipping = None;
                    }
                }
                Event::Eof => {
                    return Err(Error::Malformed {
                        position: reader.buffer_position(),
                        reason: "document ends inside an element".into(),
                    });
                }
                _ => {}
            }
            continue;
        }

        match event {
            Event::Start(ref e) | Event::Empty(ref e) => {
                let is_empty = matches!(event, Event::Empty(_));
                let qname = e.name();
                let name: &str = qname.into_inner();
                if depth == 0 {
                    if root_closed {
                        return Err(malformed(&reader, "more than one root element"));
                    }
                    if name != "domain" {
                        return Err(Error::RootNotDomain(name.to_owned()));
                    }
                    root_seen = true;
                    if is_empty {
                        return Err(Error::NoDevices);
                    }
                } else if depth == 1 && name == "devices" && !devices_done {
                    if is_empty {
                        scan.cuts.push(start..end);
                        insert_at = Some(start);
                        scan.expand_empty_devices = true;
                        devices_done = true;
                    } else {
                        devices_depth = Some(depth + 1);
                    }
                } else if Some(depth) == devices_depth {
                    if scan.child_indent.is_none() {
                        scan.child_indent = ws_before.as_ref().map(|ws| xml[ws.clone()].to_owned());
                    }
                    let drop = match name {
                        "audio" => {
                            scan.summary.removed_audio += 1;
                            true
                        }
                        "graphics" => {
                            let kind = type_attr(&reader, e)?;
                            let drop = match kind.as_deref() {
                                Some("dbus") => true,
                                Some("vnc") => opts.drop_vnc,
                                _ => false,
                            };
                            if drop {
                                scan.summary.removed_graphics += 1;
                            } else {
                                scan.summary.kept_graphics += 1;
                            }
                            drop
                        }
                        "video" => {
                            scan.has_video = true;
                            false
                        }
                        "sound" => {
                            scan.has_sound = true;
                            false
                        }
                        _ => false,
                    };
                    if drop {
                        // Take the indentation before the element with it, so a later pass
                        // re-inserts into exactly the same text (idempotence).
                        let cut_start = ws_before.as_ref().map_or(start, |ws| ws.start);
                        if is_empty {
                            scan.cuts.push(cut_start..end);
                        } else {
                            skipping = Some((depth, cut_start));
                            depth += 1;
                        }
                        continue;
                    }
                }
                if !is_empty {
                    depth += 1;
                }
            }
            Event::End(ref e) => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| malformed(&reader, "unexpected end tag"))?;
                if depth == 0 {
                    root_closed = true;
                }
                if devices_depth == Some(depth + 1) && e.name().into_inner() == "devices" {
                    devices_depth = None;
                    devices_done = true;
                    match ws_before {
                        Some(ws) => {
                            scan.closing_indent = Some(xml[ws.clone()].to_owned());
                            insert_at = Some(ws.start);
                        }
                        None => insert_at = Some(start),
                    }
                }
            }
            Event::Text(ref t) => {
                if devices_depth == Some(depth) {
                    let raw: &str = t.as_ref();
                    if raw.bytes().all(|b| b.is_ascii_whitespace()) {
                        pending_ws = Some(start..end);
                    }
                } else if depth == 0
                    && !AsRef::<str>::as_ref(t)
                        .bytes()
                        .all(|b| b.is_ascii_whitespace())
                {
                    return Err(malformed(&reader, "text outside the root element"));
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }

    if !root_seen {
        return Err(Error::NoRoot);
    }
    if depth != 0 {
        return Err(Error::Malformed {
            position: reader.buffer_position(),
            reason: "document ends inside an element".into(),
        });
    }
    scan.insert_at = insert_at.ok_or(Error::NoDevices)?;
    Ok(scan)
}

/// Renders the elements we add, indented like the surrounding document.
fn render_insertion(scan: &Scan, opts: &RewriteOptions) -> String {
    let closing = scan.closing_indent.as_deref();
    let child = match (scan.child_indent.as_deref(), closing) {
        (Some(c), _) => Some(c.to_owned()),
        (None, Some(cl)) => Some(format!("{cl}\t")),
        (None, None) => None,
    };
    // One indentation step, for children of the elements we add.
    let unit = match (child.as_deref(), closing) {
        (Some(c), Some(cl)) if c.len() > cl.len() && c.starts_with(cl) => c[cl.len()..].to_owned(),
        (Some(_), _) => "\t".to_owned(),
        (None, _) => String::new(),
    };
    let nl = child.clone().unwrap_or_default();
    let inner = if child.is_some() {
        format!("{nl}{unit}")
    } else {
        String::new()
    };

    let mut out = String::new();
    if scan.expand_empty_devices {
        out.push_str("<devices>");
    }
    if !scan.has_video {
        out.push_str(&format!(
            "{nl}<video>{inner}<model type=\"{}\" heads=\"1\"></model>{nl}</video>",
            quick_xml::escape::escape(opts.video_model.as_str())
        ));
    }
    let address = quick_xml::escape::escape(opts.bus_address.as_str());
    if opts.audio && scan.has_sound {
        out.push_str(&format!(
            "{nl}<graphics type=\"dbus\" address=\"{address}\">{inner}<audio id=\"{AUDIO_ID}\"></audio>{nl}</graphics>"
        ));
        // 48 kHz stereo s16 out of QEMU's mixer: what RDP/Opus and VNC viewers take as is.
        out.push_str(&format!(
            "{nl}<audio id=\"{AUDIO_ID}\" type=\"dbus\">{inner}<output mixingEngine=\"yes\" fixedSettings=\"yes\">{inner}{unit}<settings frequency=\"48000\" channels=\"2\" format=\"s16\"></settings>{inner}</output>{nl}</audio>"
        ));
    } else {
        out.push_str(&format!(
            "{nl}<graphics type=\"dbus\" address=\"{address}\"></graphics>"
        ));
    }
    if scan.expand_empty_devices {
        out.push_str("</devices>");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> RewriteOptions {
        RewriteOptions {
            bus_address: "unix:path=/var/run/kubevirt-hooks/vdi/bus".into(),
            drop_vnc: false,
            audio: true,
            video_model: "virtio".into(),
        }
    }

    #[test]
    fn rejects_non_domain_root() {
        assert_eq!(
            rewrite("<network/>", &opts()).unwrap_err(),
            Error::RootNotDomain("network".into())
        );
    }

    #[test]
    fn rejects_missing_devices() {
        assert_eq!(
            rewrite("<domain><name>x</name></domain>", &opts()).unwrap_err(),
            Error::NoDevices
        );
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "not xml",
            "<domain><devices></domain>",
            "<domain><devices>",
            "<domain><devices/></domain><domain/>",
            "<domain><devices><graphics type='dbus'></devices></domain>",
            "<domain><devices><graphics type=dbus/></devices></domain>",
        ] {
            assert!(rewrite(bad, &opts()).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn rejects_oversized() {
        let big = vec![b' '; MAX_INPUT_BYTES + 1];
        assert!(matches!(
            rewrite_bytes(&big, &opts()),
            Err(Error::TooLarge { .. })
        ));
        assert_eq!(
            rewrite_bytes(&[0xff, 0xfe], &opts()).unwrap_err(),
            Error::NotUtf8
        );
    }

    #[test]
    fn expands_empty_devices() {
        // No sound card: no audio backend either, and the summary says why.
        let out = rewrite("<domain><devices/></domain>", &opts()).unwrap();
        assert_eq!(
            out.xml,
            "<domain><devices><video><model type=\"virtio\" heads=\"1\"></model></video>\
             <graphics type=\"dbus\" address=\"unix:path=/var/run/kubevirt-hooks/vdi/bus\">\
             </graphics></devices></domain>"
        );
        assert!(!out.summary.added_audio);
        assert!(out.summary.audio_skipped.is_some());
        assert_eq!(rewrite(&out.xml, &opts()).unwrap().xml, out.xml);
    }

    #[test]
    fn audio_is_linked_and_fixed_at_48k_stereo_s16_when_there_is_a_sound_card() {
        let xml = "<domain><devices><video/><sound model=\"ich9\"/></devices></domain>";
        let out = rewrite(xml, &opts()).unwrap();
        assert_eq!(
            out.xml,
            "<domain><devices><video/><sound model=\"ich9\"/>\
             <graphics type=\"dbus\" address=\"unix:path=/var/run/kubevirt-hooks/vdi/bus\">\
             <audio id=\"1\"></audio></graphics><audio id=\"1\" type=\"dbus\">\
             <output mixingEngine=\"yes\" fixedSettings=\"yes\"><settings frequency=\"48000\" \
             channels=\"2\" format=\"s16\"></settings></output></audio></devices></domain>"
        );
        assert!(out.summary.added_audio && out.summary.audio_skipped.is_none());
        assert_eq!(rewrite(&out.xml, &opts()).unwrap().xml, out.xml);
    }

    #[test]
    fn escapes_address() {
        let mut o = opts();
        o.bus_address = "unix:path=/a\"b&c".into();
        let out = rewrite("<domain><devices></devices></domain>", &o).unwrap();
        assert!(
            out.xml.contains("address=\"unix:path=/a&quot;b&amp;c\""),
            "{}",
            out.xml
        );
    }

    #[test]
    fn only_direct_children_of_devices_are_touched() {
        let xml = "<domain><metadata><audio id=\"9\"/></metadata><devices>\
                   <hostdev><audio/></hostdev></devices></domain>";
        let out = rewrite(xml, &opts()).unwrap();
        assert!(out.xml.starts_with(
            "<domain><metadata><audio id=\"9\"/></metadata><devices><hostdev><audio/></hostdev>"
        ));
        assert_eq!(out.summary.removed_audio, 0);
    }
}
