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
    /// Add the D-Bus display at all. Off when QEMU could not load it (no module pack matches
    /// the launcher): the VM then boots with KubeVirt's own VNC only.
    pub display: bool,
    /// Environment for QEMU through `<qemu:commandline>` (the module pack's `QEMU_MODULE_DIR`,
    /// and `LD_LIBRARY_PATH` when it carries libraries). Entries of these names are ours: they
    /// are replaced, everything else in the element is kept.
    pub qemu_env: Vec<(String, String)>,
    /// Add a `qemu-vdagent` channel with copy and paste on, so the guest's spice-vdagent
    /// reaches QEMU's clipboard (and ours through D-Bus). Left out when the domain already has
    /// a vdagent or spicevmc channel.
    pub clipboard: bool,
}

impl RewriteOptions {
    /// The usual options for a bus: audio on, a virtio video device if the domain has none,
    /// KubeVirt's VNC kept, the launcher's own modules.
    pub fn new(bus_address: impl Into<String>) -> Self {
        Self {
            bus_address: bus_address.into(),
            drop_vnc: false,
            audio: true,
            video_model: "virtio".into(),
            display: true,
            qemu_env: Vec::new(),
            clipboard: true,
        }
    }
}

/// libvirt's namespace for QEMU-specific elements (`<qemu:commandline>`).
pub const QEMU_NS: &str = "http://libvirt.org/schemas/domain/qemu/1.0";
/// Environment variables the rewrite owns in `<qemu:commandline>`.
pub const OWNED_ENV: &[&str] = &["QEMU_MODULE_DIR", "LD_LIBRARY_PATH"];

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
    /// The `qemu-vdagent` clipboard channel was added.
    pub added_clipboard: bool,
    /// The D-Bus display was left out (`display: false`).
    pub display_left_out: bool,
    /// `<qemu:env>` entries written.
    pub qemu_env: usize,
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
/// `<graphics type="dbus" address=…>`, with `audio` the `<audio type="dbus">` it links to, and
/// with `clipboard` a `qemu-vdagent` channel unless the domain has an agent channel already.
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
    // A byte-order mark is skipped by the reader but not by its positions' users (our edits
    // landed 3 bytes early: found by fuzzing); UTF-8 needs none, and libvirt writes none.
    let xml = xml.strip_prefix('\u{feff}').unwrap_or(xml);
    let scan = scan(xml, opts)?;
    let mut edits: Vec<Edit> = scan.cuts.iter().cloned().map(Edit::Cut).collect();
    if opts.display {
        edits.push(Edit::Insert(scan.insert_at, render_insertion(&scan, opts)));
        if !opts.qemu_env.is_empty() {
            edits.extend(scan.qemu.env_cuts.iter().cloned().map(Edit::Cut));
            edits.extend(render_qemu_env(&scan, opts));
        }
    } else if scan.expand_empty_devices {
        // The `<devices/>` cut goes back as it was.
        edits.push(Edit::Insert(scan.insert_at, "<devices/>".into()));
    }
    let out = apply(xml, edits);
    let mut summary = scan.summary;
    summary.display_left_out = !opts.display;
    summary.added_video = opts.display && !scan.has_video;
    summary.added_audio = opts.display && opts.audio && scan.has_sound;
    summary.added_clipboard = opts.display && opts.clipboard && !scan.has_agent_channel;
    summary.audio_skipped = (opts.display && opts.audio && !scan.has_sound)
        .then_some("the VM has no sound device (spec.domain.devices.sound)");
    summary.qemu_env = if opts.display { opts.qemu_env.len() } else { 0 };
    Ok(Rewritten { xml: out, summary })
}

/// One change to the document: bytes removed, or text inserted at a position.
enum Edit {
    Cut(Range<usize>),
    Insert(usize, String),
}

impl Edit {
    fn at(&self) -> usize {
        match self {
            Edit::Cut(r) => r.start,
            Edit::Insert(at, _) => *at,
        }
    }
}

/// Applies edits that never overlap; at the same position an insertion goes before a cut (the
/// `<devices/>` case replaces that element).
fn apply(xml: &str, mut edits: Vec<Edit>) -> String {
    edits.sort_by_key(|e| (e.at(), matches!(e, Edit::Cut(_))));
    let mut out = String::with_capacity(xml.len() + 1024);
    let mut cursor = 0;
    for e in edits {
        match e {
            Edit::Cut(r) => {
                out.push_str(&xml[cursor..r.start]);
                cursor = r.end;
            }
            Edit::Insert(at, text) => {
                out.push_str(&xml[cursor..at]);
                out.push_str(&text);
                cursor = at;
            }
        }
    }
    out.push_str(&xml[cursor..]);
    out
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
    /// A `qemu-vdagent` or `spicevmc` channel: the guest agent's port exists (ours from an
    /// earlier pass, or the operator's own).
    has_agent_channel: bool,
    /// Whitespace before the first child of `<devices>` (e.g. "\n\t\t").
    child_indent: Option<String>,
    /// Whitespace before `</devices>` (e.g. "\n\t").
    closing_indent: Option<String>,
    qemu: QemuScan,
    summary: Summary,
}

/// Where `<qemu:commandline>` is, or where one would go.
#[derive(Default)]
struct QemuScan {
    /// The prefix bound to [`QEMU_NS`] on the root element, if any.
    prefix: Option<String>,
    /// Every namespace prefix the root element declares or an element uses.
    root_prefixes: Vec<String>,
    /// Where a namespace declaration goes (before the root start tag's `>`).
    root_attrs_end: usize,
    /// Whitespace before the root's children and before `</domain>`, and where that closing
    /// whitespace starts.
    root_child_indent: Option<String>,
    root_closing: Option<(usize, Option<String>)>,
    /// An existing commandline: where our entries go (before its closing tag's whitespace),
    /// the whitespace before its children and before its closing tag; or an empty element to
    /// replace.
    commandline: Option<CommandlineScan>,
    /// Our earlier `qemu:env` entries (and an empty `<qemu:commandline/>`): cut only when
    /// replaced, so a domain we add no environment to keeps what it had.
    env_cuts: Vec<Range<usize>>,
}

struct CommandlineScan {
    insert_at: usize,
    child_indent: Option<String>,
    closing_indent: Option<String>,
    /// `<qemu:commandline/>`: replaced by a full element.
    empty: bool,
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

/// An element's attribute `key`, unescaped.
fn attr(reader: &Reader<&[u8]>, e: &BytesStart<'_>, key: &str) -> Result<Option<String>, Error> {
    match e.try_get_attribute(key) {
        Ok(Some(a)) => Ok(Some(
            a.normalized_value(quick_xml::XmlVersion::Implicit1_0)
                .map_err(|err| malformed(reader, err))?
                .into_owned(),
        )),
        Ok(None) => Ok(None),
        Err(err) => Err(malformed(reader, err)),
    }
}

/// The prefix the root element binds to [`QEMU_NS`] (`xmlns:qemu="…"` → `qemu`), and every
/// prefix it declares (a new declaration must not repeat one).
fn qemu_prefix(
    reader: &Reader<&[u8]>,
    e: &BytesStart<'_>,
) -> Result<(Option<String>, Vec<String>), Error> {
    let mut found = None;
    let mut declared = Vec::new();
    for a in e.attributes() {
        let a = a.map_err(|err| malformed(reader, err))?;
        let key: &str = a.key.into_inner();
        if let Some(prefix) = key.strip_prefix("xmlns:") {
            let value = a
                .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                .map_err(|err| malformed(reader, err))?;
            if value == QEMU_NS && found.is_none() {
                found = Some(prefix.to_owned());
            }
            declared.push(prefix.to_owned());
        }
    }
    Ok((found, declared))
}

/// A prefix for [`QEMU_NS`] that the root does not declare yet: `qemu`, unless a domain binds
/// `qemu` to something else (then `qemu1`, `qemu2`, …).
fn free_qemu_prefix(declared: &[String]) -> String {
    std::iter::once("qemu".to_owned())
        .chain((1..).map(|n| format!("qemu{n}")))
        .find(|p| !declared.contains(p))
        .unwrap_or_else(|| "qemu".to_owned())
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
    // While skipping a dropped element: (depth at which it ends, start of the cut, whether it
    // is one of our `qemu:env` entries).
    let mut skipping: Option<(usize, usize, bool)> = None;

    let mut scan = Scan {
        cuts: Vec::new(),
        insert_at: 0,
        expand_empty_devices: false,
        has_video: false,
        has_sound: false,
        has_agent_channel: false,
        child_indent: None,
        closing_indent: None,
        qemu: QemuScan::default(),
        summary: Summary::default(),
    };
    let mut insert_at: Option<usize> = None;
    // Inside `<P:commandline>`: the depth of its children.
    let mut commandline_depth: Option<usize> = None;

    loop {
        let start = to_usize(reader.buffer_position());
        let event = reader.read_event().map_err(|e| malformed(&reader, e))?;
        let end = to_usize(reader.buffer_position());
        let ws_before = pending_ws.take();

        if let Some((skip_depth, cut_start, env)) = skipping {
            match event {
                Event::Start(_) => depth += 1,
                Event::End(_) => {
                    depth -= 1;
                    if depth == skip_depth {
                        if env {
                            scan.qemu.env_cuts.push(cut_start..end);
                        } else {
                            scan.cuts.push(cut_start..end);
                        }
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
                // A prefix used without a declaration must not become ours either: the next
                // rewrite would then see its elements as libvirt's (found by fuzzing).
                if let Some((p, _)) = name.split_once(':')
                    && !scan.qemu.root_prefixes.iter().any(|d| d == p)
                {
                    scan.qemu.root_prefixes.push(p.to_owned());
                }
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
                    let (prefix, declared) = qemu_prefix(&reader, e)?;
                    scan.qemu.prefix = prefix;
                    scan.qemu.root_prefixes.extend(declared);
                    scan.qemu.root_attrs_end = end.saturating_sub(1);
                } else if depth == 1
                    && scan
                        .qemu
                        .prefix
                        .as_deref()
                        .is_some_and(|p| name.strip_prefix(p) == Some(":commandline"))
                    && scan.qemu.commandline.is_none()
                {
                    if scan.qemu.root_child_indent.is_none() {
                        scan.qemu.root_child_indent =
                            ws_before.as_ref().map(|ws| xml[ws.clone()].to_owned());
                    }
                    if is_empty {
                        scan.qemu.env_cuts.push(start..end);
                        scan.qemu.commandline = Some(CommandlineScan {
                            insert_at: start,
                            child_indent: None,
                            closing_indent: None,
                            empty: true,
                        });
                    } else {
                        commandline_depth = Some(depth + 1);
                        scan.qemu.commandline = Some(CommandlineScan {
                            insert_at: end,
                            child_indent: None,
                            closing_indent: None,
                            empty: false,
                        });
                    }
                } else if Some(depth) == commandline_depth {
                    let owned = name.ends_with(":env") && {
                        let n = attr(&reader, e, "name")?;
                        n.as_deref().is_some_and(|n| OWNED_ENV.contains(&n))
                    };
                    if let Some(c) = scan.qemu.commandline.as_mut()
                        && c.child_indent.is_none()
                    {
                        c.child_indent = ws_before.as_ref().map(|ws| xml[ws.clone()].to_owned());
                    }
                    if owned {
                        let cut_start = ws_before.as_ref().map_or(start, |ws| ws.start);
                        if is_empty {
                            scan.qemu.env_cuts.push(cut_start..end);
                        } else {
                            skipping = Some((depth, cut_start, true));
                            depth += 1;
                        }
                        continue;
                    }
                } else if depth == 1 && scan.qemu.root_child_indent.is_none() {
                    scan.qemu.root_child_indent =
                        ws_before.as_ref().map(|ws| xml[ws.clone()].to_owned());
                }
                if depth == 1 && name == "devices" && !devices_done {
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
                            let kind = attr(&reader, e, "type")?;
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
                        "channel" => {
                            let kind = attr(&reader, e, "type")?;
                            if matches!(kind.as_deref(), Some("qemu-vdagent" | "spicevmc")) {
                                scan.has_agent_channel = true;
                            }
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
                            skipping = Some((depth, cut_start, false));
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
                    scan.qemu.root_closing = Some(match &ws_before {
                        Some(ws) => (ws.start, Some(xml[ws.clone()].to_owned())),
                        None => (start, None),
                    });
                }
                if commandline_depth == Some(depth + 1) {
                    commandline_depth = None;
                    if let Some(c) = scan.qemu.commandline.as_mut() {
                        match &ws_before {
                            Some(ws) => {
                                c.closing_indent = Some(xml[ws.clone()].to_owned());
                                c.insert_at = ws.start;
                            }
                            None => c.insert_at = start,
                        }
                    }
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
                let whitespace = AsRef::<str>::as_ref(t)
                    .bytes()
                    .all(|b| b.is_ascii_whitespace());
                if whitespace && (depth == 1 || commandline_depth == Some(depth)) {
                    pending_ws = Some(start..end);
                }
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
    if opts.clipboard && !scan.has_agent_channel {
        // Before our graphics: a later pass keeps this channel where it is and re-adds the
        // graphics after it, so the order (and the text) comes out the same. The port
        // spice-vdagent opens; mouse mode 'server' keeps the tablet as the pointer
        // (an agent taking it over would strand guests without one, e.g. installers).
        out.push_str(&format!(
            "{nl}<channel type=\"qemu-vdagent\">{inner}<source>{inner}{unit}<clipboard copypaste=\"yes\"></clipboard>{inner}{unit}<mouse mode=\"server\"></mouse>{inner}</source>{inner}<target type=\"virtio\" name=\"com.redhat.spice.0\"></target>{nl}</channel>"
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

/// The `<qemu:env>` entries of `opts`, into the domain's `<qemu:commandline>` (made, with the
/// namespace declared, when there is none).
fn render_qemu_env(scan: &Scan, opts: &RewriteOptions) -> Vec<Edit> {
    if opts.qemu_env.is_empty() {
        return Vec::new();
    }
    let q = &scan.qemu;
    let mut edits = Vec::new();
    // A prefix bound elsewhere must not be reused for libvirt's namespace.
    let prefix = match &q.prefix {
        Some(p) => p.clone(),
        None => {
            let p = free_qemu_prefix(&q.root_prefixes);
            edits.push(Edit::Insert(
                q.root_attrs_end,
                format!(" xmlns:{p}=\"{QEMU_NS}\""),
            ));
            p
        }
    };
    let entry = |indent: &str, (name, value): &(String, String)| {
        format!(
            "{indent}<{prefix}:env name=\"{}\" value=\"{}\"></{prefix}:env>",
            quick_xml::escape::escape(name.as_str()),
            quick_xml::escape::escape(value.as_str())
        )
    };
    let root_child = q.root_child_indent.clone().unwrap_or_default();
    match &q.commandline {
        Some(c) if !c.empty => {
            let indent = c
                .child_indent
                .clone()
                .or_else(|| c.closing_indent.as_ref().map(|cl| format!("{cl}\t")))
                .unwrap_or_default();
            let text: String = opts.qemu_env.iter().map(|kv| entry(&indent, kv)).collect();
            edits.push(Edit::Insert(c.insert_at, text));
        }
        other => {
            let inner = if root_child.is_empty() {
                String::new()
            } else {
                format!("{root_child}\t")
            };
            let entries: String = opts.qemu_env.iter().map(|kv| entry(&inner, kv)).collect();
            let element =
                format!("<{prefix}:commandline>{entries}{root_child}</{prefix}:commandline>");
            match other {
                // `<qemu:commandline/>` is replaced where it stood.
                Some(c) => edits.push(Edit::Insert(c.insert_at, element)),
                None => {
                    let (at, _) = q.root_closing.clone().unwrap_or((scan.insert_at, None));
                    edits.push(Edit::Insert(at, format!("{root_child}{element}")));
                }
            }
        }
    }
    edits
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> RewriteOptions {
        RewriteOptions::new("unix:path=/var/run/kubevirt-hooks/vdi/bus")
    }

    fn with_modules() -> RewriteOptions {
        RewriteOptions {
            qemu_env: vec![(
                "QEMU_MODULE_DIR".into(),
                "/var/run/kubevirt-hooks/vdi/qemu-modules/p1".into(),
            )],
            ..opts()
        }
    }

    #[test]
    fn qemu_env_goes_into_a_new_commandline_with_its_namespace() {
        let xml = "<domain type=\"kvm\">\n\t<name>x</name>\n\t<devices>\n\t\t<video/>\n\t</devices>\n</domain>";
        let out = rewrite(xml, &with_modules()).unwrap();
        assert!(
            out.xml
                .starts_with(&format!("<domain type=\"kvm\" xmlns:qemu=\"{QEMU_NS}\">")),
            "{}",
            out.xml
        );
        assert!(
            out.xml.ends_with(
                "\n\t</devices>\n\t<qemu:commandline>\n\t\t<qemu:env name=\"QEMU_MODULE_DIR\" \
                 value=\"/var/run/kubevirt-hooks/vdi/qemu-modules/p1\"></qemu:env>\n\t\
                 </qemu:commandline>\n</domain>"
            ),
            "{}",
            out.xml
        );
        assert_eq!(out.summary.qemu_env, 1);
        assert_eq!(rewrite(&out.xml, &with_modules()).unwrap().xml, out.xml);
    }

    #[test]
    fn an_undeclared_qemu_prefix_is_left_alone_and_the_rewrite_stays_idempotent() {
        let xml = "<domain><devices/><qemu:commandline><qemu:arg value=\"-x\"/>\
                   </qemu:commandline></domain>";
        let out = rewrite(xml, &with_modules()).unwrap();
        assert!(
            out.xml.contains(&format!("xmlns:qemu1=\"{QEMU_NS}\"")),
            "{}",
            out.xml
        );
        assert_eq!(rewrite(&out.xml, &with_modules()).unwrap().xml, out.xml);
    }

    #[test]
    fn a_byte_order_mark_does_not_shift_the_edits() {
        let xml =
            "\u{feff}<?xml version='1.0'?>\n<domain type='kvm'><devices>\n</devices></domain>";
        let out = rewrite(xml, &with_modules()).unwrap();
        assert!(
            out.xml
                .starts_with("<?xml version='1.0'?>\n<domain type='kvm' xmlns:qemu="),
            "{}",
            out.xml
        );
        assert!(
            out.xml.contains("<graphics type=\"dbus\"") && out.xml.ends_with("</domain>"),
            "{}",
            out.xml
        );
        assert_eq!(rewrite(&out.xml, &with_modules()).unwrap().xml, out.xml);
    }

    #[test]
    fn a_qemu_prefix_bound_to_another_namespace_is_not_declared_twice() {
        // Found by fuzzing: `xmlns:qemu` bound to another URI got a second `xmlns:qemu`, a
        // duplicated attribute that libvirt refuses (the VM would not start).
        let xml = "<domain type=\"kvm\" xmlns:qemu=\"http://example.org/other\" \
                   xmlns:qemu1=\"urn:x\"><devices/></domain>";
        let out = rewrite(xml, &with_modules()).unwrap();
        assert!(
            out.xml.contains(&format!("xmlns:qemu2=\"{QEMU_NS}\""))
                && out.xml.contains("<qemu2:commandline>")
                && out.xml.contains("xmlns:qemu=\"http://example.org/other\""),
            "{}",
            out.xml
        );
        assert_eq!(rewrite(&out.xml, &with_modules()).unwrap().xml, out.xml);
    }

    #[test]
    fn qemu_env_joins_an_existing_commandline_and_keeps_the_rest() {
        let xml = format!(
            "<domain xmlns:q=\"{QEMU_NS}\"><devices/><q:commandline><q:arg value=\"-x\"/>\
             <q:env name=\"QEMU_MODULE_DIR\" value=\"/old\"/><q:env name=\"KEEP\" value=\"1\"/>\
             </q:commandline></domain>"
        );
        let out = rewrite(&xml, &with_modules()).unwrap();
        assert!(out.xml.contains(
            "<q:commandline><q:arg value=\"-x\"/><q:env name=\"KEEP\" value=\"1\"/>\
             <q:env name=\"QEMU_MODULE_DIR\" value=\"/var/run/kubevirt-hooks/vdi/qemu-modules/p1\"></q:env>\
             </q:commandline>"
        ), "{}", out.xml);
        assert!(!out.xml.contains("/old"));
        assert_eq!(rewrite(&out.xml, &with_modules()).unwrap().xml, out.xml);
        // An empty commandline element is filled in place.
        let xml =
            format!("<domain xmlns:qemu=\"{QEMU_NS}\"><devices/><qemu:commandline/></domain>");
        let out = rewrite(&xml, &with_modules()).unwrap();
        assert!(out.xml.ends_with("</devices><qemu:commandline><qemu:env name=\"QEMU_MODULE_DIR\" \
             value=\"/var/run/kubevirt-hooks/vdi/qemu-modules/p1\"></qemu:env></qemu:commandline></domain>"), "{}", out.xml);
        assert_eq!(rewrite(&out.xml, &with_modules()).unwrap().xml, out.xml);
    }

    #[test]
    fn without_module_env_the_commandline_is_left_as_it_is() {
        // The launcher's own modules: an operator's LD_LIBRARY_PATH and an empty element stay.
        for xml in [
            format!(
                "<domain xmlns:qemu=\"{QEMU_NS}\"><devices/><qemu:commandline>\
                 <qemu:env name=\"LD_LIBRARY_PATH\" value=\"/opt\"/></qemu:commandline></domain>"
            ),
            format!("<domain xmlns:qemu=\"{QEMU_NS}\"><devices/><qemu:commandline/></domain>"),
        ] {
            let out = rewrite(&xml, &opts()).unwrap();
            let tail = xml.split("<devices/>").nth(1).unwrap();
            assert!(out.xml.ends_with(tail), "{}", out.xml);
            assert_eq!(out.summary.qemu_env, 0);
        }
    }

    #[test]
    fn without_a_display_nothing_of_ours_is_added() {
        let xml = "<domain><devices><graphics type=\"vnc\"/></devices></domain>";
        let o = RewriteOptions {
            display: false,
            ..with_modules()
        };
        let out = rewrite(xml, &o).unwrap();
        assert_eq!(out.xml, xml);
        assert!(out.summary.display_left_out && !out.summary.added_video);
        assert_eq!(
            rewrite("<domain><devices/></domain>", &o).unwrap().xml,
            "<domain><devices/></domain>"
        );
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
             <channel type=\"qemu-vdagent\"><source><clipboard copypaste=\"yes\"></clipboard>\
             <mouse mode=\"server\"></mouse></source>\
             <target type=\"virtio\" name=\"com.redhat.spice.0\"></target></channel>\
             <graphics type=\"dbus\" address=\"unix:path=/var/run/kubevirt-hooks/vdi/bus\">\
             </graphics></devices></domain>"
        );
        assert!(out.summary.added_clipboard);
        assert!(!out.summary.added_audio);
        assert!(out.summary.audio_skipped.is_some());
        assert_eq!(rewrite(&out.xml, &opts()).unwrap().xml, out.xml);
    }

    #[test]
    fn audio_is_linked_and_fixed_at_48k_stereo_s16_when_there_is_a_sound_card() {
        let xml = "<domain><devices><video/><sound model=\"ich9\"/></devices></domain>";
        let no_clipboard = RewriteOptions {
            clipboard: false,
            ..opts()
        };
        let out = rewrite(xml, &no_clipboard).unwrap();
        assert_eq!(
            out.xml,
            "<domain><devices><video/><sound model=\"ich9\"/>\
             <graphics type=\"dbus\" address=\"unix:path=/var/run/kubevirt-hooks/vdi/bus\">\
             <audio id=\"1\"></audio></graphics><audio id=\"1\" type=\"dbus\">\
             <output mixingEngine=\"yes\" fixedSettings=\"yes\"><settings frequency=\"48000\" \
             channels=\"2\" format=\"s16\"></settings></output></audio></devices></domain>"
        );
        assert!(out.summary.added_audio && out.summary.audio_skipped.is_none());
        assert_eq!(rewrite(&out.xml, &no_clipboard).unwrap().xml, out.xml);
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
