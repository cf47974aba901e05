//! The module layering ARCHITECTURE.md describes, checked against the source: every
//! `crate::…` path in `src/` names a module its layer may import, front ends never import one
//! another, and the top-level modules form no cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level module → the top-level modules it may import.
fn allowed() -> BTreeMap<&'static str, &'static [&'static str]> {
    const FRONT: &[&str] = &[
        "session",
        "qemu",
        "framebuffer",
        "h264",
        "pcm",
        "net",
        "tls",
        "pixman",
        "health",
        "metrics",
    ];
    BTreeMap::from([
        ("pixman", &[][..]),
        ("cgroup", &[][..]),
        ("pcm", &[][..]),
        ("net", &[][..]),
        ("health", &[][..]),
        ("tls", &[][..]),
        ("bus", &[][..]),
        // What everyone counts into; it reads the layers it describes through closures.
        ("metrics", &[][..]),
        ("framebuffer", &["pixman"][..]),
        // The shared H.264 stream: framebuffer in, pictures out.
        ("h264", &["framebuffer", "pixman"][..]),
        ("modules", &[][..]),
        ("hook", &["health", "modules", "metrics"][..]),
        (
            "qemu",
            &[
                "framebuffer",
                "pixman",
                "pcm",
                "health",
                "cgroup",
                "metrics",
            ][..],
        ),
        (
            "session",
            &[
                "qemu",
                "framebuffer",
                "h264",
                "health",
                "pcm",
                "cgroup",
                "metrics",
            ][..],
        ),
        ("vnc", FRONT),
        ("rdp", FRONT),
        ("web", FRONT),
        (
            "viewers",
            &[
                "vnc",
                "rdp",
                "web",
                "session",
                "qemu",
                "framebuffer",
                "h264",
                "net",
                "metrics",
            ][..],
        ),
    ])
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`src/vnc/session.rs` → `vnc`).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src");
    let first = rel.components().next().expect("component");
    first
        .as_os_str()
        .to_string_lossy()
        .trim_end_matches(".rs")
        .to_owned()
}

/// Every top-level module named as `crate::<module>` in `text` (comments and strings included:
/// a doc link to another layer is a dependency of the reader too).
fn imports(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            out.insert(name);
        }
    }
    // `use crate::{a, b}` groups.
    let mut rest = text;
    while let Some(i) = rest.find("crate::{") {
        rest = &rest[i + "crate::{".len()..];
        let group = &rest[..rest.find('}').unwrap_or(0)];
        for part in group.split(',') {
            let name: String = part
                .trim()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

#[test]
fn layers_hold_and_there_is_no_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let rules = allowed();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut broken = Vec::new();
    for file in &files {
        let module = module_of(&src, file);
        if matches!(module.as_str(), "lib" | "main") {
            continue;
        }
        let text = std::fs::read_to_string(file).expect("read");
        for dep in imports(&text) {
            if dep == module {
                continue;
            }
            graph.entry(module.clone()).or_default().insert(dep.clone());
            if let Some(ok) = rules.get(module.as_str())
                && !ok.contains(&dep.as_str())
            {
                broken.push(format!("{} imports crate::{dep}", file.display()));
            }
        }
    }
    assert!(broken.is_empty(), "layering broken:\n{}", broken.join("\n"));
    // Every module of the crate has a rule or is a lifecycle module (anything goes there).
    for m in graph.keys() {
        assert!(
            rules.contains_key(m.as_str()) || matches!(m.as_str(), "serve" | "demo" | "config"),
            "module {m} has no layer in this test or ARCHITECTURE.md"
        );
    }
    // No cycle between top-level modules (depth-first search with colours).
    fn visit<'a>(
        m: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<&'a str, u8>,
        path: &mut Vec<&'a str>,
    ) {
        match state.get(m) {
            Some(2) => return,
            Some(1) => panic!("module cycle: {} -> {m}", path.join(" -> ")),
            _ => {}
        }
        state.insert(m, 1);
        path.push(m);
        for dep in graph.get(m).into_iter().flatten() {
            visit(dep, graph, state, path);
        }
        path.pop();
        state.insert(m, 2);
    }
    let mut state = BTreeMap::new();
    for m in graph.keys() {
        visit(m, &graph, &mut state, &mut Vec::new());
    }
}

#[test]
fn the_split_files_stay_small() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for file in ["vnc/session.rs", "rdp/transport.rs", "main.rs"] {
        let lines = std::fs::read_to_string(src.join(file))
            .expect("read")
            .lines()
            .count();
        assert!(lines <= 600, "src/{file} has {lines} lines");
    }
    assert!(
        !src.join("vnc/conn.rs").exists(),
        "vnc/conn.rs was split by concern"
    );
}

#[test]
fn the_import_scanner_sees_paths_and_groups() {
    let found = imports("use crate::qemu::input::Cmd;\nuse crate::{vnc, rdp::X};\n// crate::web");
    assert_eq!(
        found,
        ["qemu", "rdp", "vnc", "web"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );
}
