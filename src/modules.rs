//! QEMU's D-Bus display modules for a stock virt-launcher. A launcher image has no `ui-dbus.so`
//! or `audio-dbus.so`, and QEMU loads only modules built by its very own build, so the sidecar
//! image carries *packs*: the modules (and libraries a stock launcher lacks) of one QEMU build,
//! each labelled with the launcher images it matches. The hook picks the pack for the launcher
//! it is called from (the VMI's `status.launcherContainerImageVersion`, or `--qemu-modules`),
//! copies it into the directory it shares with compute, and points QEMU at it through
//! `QEMU_MODULE_DIR` in the domain. No matching pack means no D-Bus display: the VM still boots,
//! with KubeVirt's own VNC, and the log and `/readyz` say why.
//!
//! A pack is a directory `<root>/<name>/` with `pack.json` (`{"qemu": "10.1.0-10.el9",
//! "launchers": ["v1.8.0", "sha256:…"]}`), `modules/*.so`, and optionally `lib/*.so*`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The subdirectory of our bus directory packs are installed into (shared with compute).
pub const SHARED_SUBDIR: &str = "qemu-modules";

/// The directory of a `unix:path=…` D-Bus address's socket: our bus directory as the compute
/// container sees it.
pub fn compute_dir(bus_address: &str) -> Option<PathBuf> {
    let path = bus_address.strip_prefix("unix:path=")?.split(',').next()?;
    Path::new(path).parent().map(Path::to_owned)
}

/// Where the sidecar image keeps its packs.
pub const DEFAULT_PACKS_DIR: &str = "/usr/share/vdi-sidecar/qemu-modules";
/// The modules the D-Bus display needs (ui-dbus links against ui-opengl's symbols).
pub const REQUIRED: &[&str] = &["ui-dbus.so", "audio-dbus.so", "ui-opengl.so"];
/// Largest file copied out of a pack (QEMU modules are a few hundred KiB; Mesa's are larger).
const MAX_FILE: u64 = 256 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read module packs in {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("module pack {path}: {reason}")]
    BadPack { path: PathBuf, reason: String },
    #[error("cannot install module pack {name} into {dest}")]
    Install {
        name: String,
        dest: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Deserialize)]
struct Manifest {
    /// The QEMU build (EVR) the modules come from.
    qemu: String,
    /// Launcher image tags or digests (`v1.8.0`, `sha256:…`) the pack matches.
    launchers: Vec<String>,
}

/// One pack in the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pack {
    pub name: String,
    pub dir: PathBuf,
    pub qemu: String,
    pub launchers: Vec<String>,
    /// Carries libraries (`lib/`) the stock launcher lacks.
    pub has_libs: bool,
}

impl Pack {
    /// Whether the launcher image `version` (`…/virt-launcher:v1.8.0`, `…@sha256:…`) is one of
    /// this pack's.
    pub fn matches(&self, version: &str) -> bool {
        let version = version.trim();
        self.launchers.iter().any(|l| {
            let l = l.trim();
            !l.is_empty()
                && (version == l
                    || version.ends_with(&format!(":{l}"))
                    || version.ends_with(&format!("@{l}")))
        })
    }
}

/// The packs under `root` (none when it does not exist).
pub fn scan(root: &Path) -> Result<Vec<Pack>, Error> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(Error::Read {
                path: root.to_owned(),
                source,
            });
        }
    };
    let mut packs = Vec::new();
    for entry in entries {
        let dir = entry
            .map_err(|source| Error::Read {
                path: root.to_owned(),
                source,
            })?
            .path();
        if !dir.join("pack.json").is_file() {
            continue;
        }
        let bad = |reason: String| Error::BadPack {
            path: dir.clone(),
            reason,
        };
        let text =
            std::fs::read_to_string(dir.join("pack.json")).map_err(|e| bad(e.to_string()))?;
        let m: Manifest = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        for module in REQUIRED {
            if !dir.join("modules").join(module).is_file() {
                return Err(bad(format!("modules/{module} is missing")));
            }
        }
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        packs.push(Pack {
            name,
            has_libs: dir.join("lib").is_dir(),
            dir,
            qemu: m.qemu,
            launchers: m.launchers,
        });
    }
    packs.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(packs)
}

/// `--qemu-modules`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Setting {
    /// The pack matching the launcher; the launcher's own modules when the image has no packs.
    Auto,
    /// The launcher provides the modules (a custom launcher image).
    Launcher,
    /// This pack, whatever the launcher.
    Named(String),
}

impl std::str::FromStr for Setting {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "auto" | "" => Setting::Auto,
            "none" => Setting::Launcher,
            name => Setting::Named(name.to_owned()),
        })
    }
}

/// What QEMU will load its D-Bus display from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// Its own module directory (the launcher has the modules).
    Launcher,
    Pack(Pack),
    /// Nothing that fits: the D-Bus display must stay out of the domain.
    NoMatch(String),
}

/// Picks the pack for a launcher image version (`None`: the VMI did not say).
pub fn choose(packs: &[Pack], setting: &Setting, launcher: Option<&str>) -> Choice {
    let names = || {
        packs
            .iter()
            .map(|p| format!("{} (QEMU {}: {})", p.name, p.qemu, p.launchers.join(", ")))
            .collect::<Vec<_>>()
            .join("; ")
    };
    match setting {
        Setting::Launcher => Choice::Launcher,
        Setting::Named(name) => match packs.iter().find(|p| &p.name == name) {
            Some(p) => Choice::Pack(p.clone()),
            None => Choice::NoMatch(format!(
                "--qemu-modules {name}: no such pack (the image has: {})",
                names()
            )),
        },
        Setting::Auto if packs.is_empty() => Choice::Launcher,
        Setting::Auto => match launcher.and_then(|v| packs.iter().find(|p| p.matches(v))) {
            Some(p) => Choice::Pack(p.clone()),
            None => Choice::NoMatch(format!(
                "no QEMU module pack matches the launcher {} (the image has: {}); the VM runs \
                 without the D-Bus display (KubeVirt's VNC only). Use an image with a matching \
                 pack, --qemu-modules PACK, or a launcher that has the modules (--qemu-modules none)",
                launcher.unwrap_or("(not in the VMI's status)"),
                names()
            )),
        },
    }
}

/// Copies `pack` into `dest_root/<name>/` (readable by QEMU's uid) and returns that directory.
/// Files are written under a temporary name and renamed, so a QEMU starting meanwhile never
/// maps half a module.
pub fn install(pack: &Pack, dest_root: &Path) -> Result<PathBuf, Error> {
    let dest = dest_root.join(&pack.name);
    let err = |source| Error::Install {
        name: pack.name.clone(),
        dest: dest.clone(),
        source,
    };
    for sub in ["modules", "lib"] {
        let from = pack.dir.join(sub);
        if !from.is_dir() {
            continue;
        }
        let to = dest.join(sub);
        std::fs::create_dir_all(&to).map_err(err)?;
        set_mode(&dest, 0o755).map_err(err)?;
        set_mode(&to, 0o755).map_err(err)?;
        for entry in std::fs::read_dir(&from).map_err(err)? {
            let entry = entry.map_err(err)?;
            let meta = entry.metadata().map_err(err)?;
            if !meta.is_file() || meta.len() > MAX_FILE {
                continue;
            }
            let target = to.join(entry.file_name());
            if std::fs::metadata(&target).is_ok_and(|m| m.len() == meta.len()) {
                continue; // installed by an earlier call
            }
            let tmp = to.join(format!(".{}.tmp", entry.file_name().to_string_lossy()));
            std::fs::copy(entry.path(), &tmp).map_err(err)?;
            set_mode(&tmp, 0o644).map_err(err)?;
            std::fs::rename(&tmp, &target).map_err(err)?;
        }
    }
    Ok(dest)
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// The environment QEMU needs for a pack installed at `dir` as the compute container sees it.
pub fn qemu_env(pack: &Pack, dir: &Path) -> Vec<(String, String)> {
    let mut env = vec![(
        "QEMU_MODULE_DIR".to_owned(),
        dir.join("modules").display().to_string(),
    )];
    if pack.has_libs {
        env.push((
            "LD_LIBRARY_PATH".to_owned(),
            dir.join("lib").display().to_string(),
        ));
    }
    env
}

/// The hook's module packs: what the image has, the operator's setting, and where packs go in
/// the directory shared with compute (ours, and the same directory as compute sees it).
#[derive(Debug)]
pub struct Modules {
    pub setting: Setting,
    pub packs: Vec<Pack>,
    pub local_root: PathBuf,
    pub compute_root: PathBuf,
}

/// What one domain gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// The launcher's own modules: nothing to add.
    Launcher,
    /// `qemu:env` entries for an installed pack.
    Env(Vec<(String, String)>),
    /// No D-Bus display, for this reason.
    NoDisplay(String),
}

impl Modules {
    /// The launcher provides the modules (tests, plain libvirt, custom launchers).
    pub fn launcher() -> Self {
        Self {
            setting: Setting::Launcher,
            packs: Vec::new(),
            local_root: PathBuf::new(),
            compute_root: PathBuf::new(),
        }
    }

    /// Chooses (and installs) the pack for the launcher `version`.
    pub fn plan(&self, launcher: Option<&str>) -> Plan {
        match choose(&self.packs, &self.setting, launcher) {
            Choice::Launcher => Plan::Launcher,
            Choice::NoMatch(why) => Plan::NoDisplay(why),
            Choice::Pack(p) => match install(&p, &self.local_root) {
                Ok(_) => Plan::Env(qemu_env(&p, &self.compute_root.join(&p.name))),
                Err(e) => Plan::NoDisplay(format!("{e}: {}", error_chain(&e))),
            },
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push(s.to_string());
        cur = s.source();
    }
    out.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pack(root: &Path, name: &str, launchers: &[&str], libs: bool) {
        let dir = root.join(name);
        std::fs::create_dir_all(dir.join("modules")).unwrap();
        for m in REQUIRED {
            std::fs::write(dir.join("modules").join(m), format!("{name}:{m}")).unwrap();
        }
        if libs {
            std::fs::create_dir_all(dir.join("lib")).unwrap();
            std::fs::write(dir.join("lib/libepoxy.so.0"), "lib").unwrap();
        }
        let json = serde_json::json!({"qemu": format!("{name}-evr"), "launchers": launchers});
        std::fs::write(dir.join("pack.json"), json.to_string()).unwrap();
    }

    #[test]
    fn packs_are_chosen_by_launcher_tag_or_digest() {
        let root = tempfile::tempdir().unwrap();
        pack(root.path(), "kv-1.8", &["v1.8.0", "sha256:aaa"], true);
        pack(root.path(), "kv-1.9", &["v1.9.0"], false);
        let packs = scan(root.path()).unwrap();
        assert_eq!(packs.len(), 2);
        let pick = |l| choose(&packs, &Setting::Auto, l);
        assert!(
            matches!(pick(Some("registry/kubevirt/virt-launcher:v1.9.0")), Choice::Pack(p) if p.name == "kv-1.9")
        );
        assert!(
            matches!(pick(Some("r/k/virt-launcher@sha256:aaa")), Choice::Pack(p) if p.name == "kv-1.8")
        );
        match pick(Some("r/k/virt-launcher:v1.7.0")) {
            Choice::NoMatch(why) => {
                assert!(why.contains("v1.7.0") && why.contains("kv-1.8"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(pick(None), Choice::NoMatch(_)));
        assert!(matches!(
            choose(&packs, &"kv-1.8".parse().unwrap(), None),
            Choice::Pack(_)
        ));
        assert!(matches!(
            choose(&packs, &"nope".parse().unwrap(), None),
            Choice::NoMatch(_)
        ));
        assert_eq!(
            choose(&packs, &"none".parse().unwrap(), None),
            Choice::Launcher
        );
        // No packs at all: the launcher's own modules, as before packs existed.
        assert_eq!(choose(&[], &Setting::Auto, Some("x:v1")), Choice::Launcher);
        // Not a "v1.9.0" prefix match: a longer tag is another launcher.
        assert!(matches!(
            pick(Some("r/virt-launcher:v1.9.0-rc1")),
            Choice::NoMatch(_)
        ));
    }

    #[test]
    fn install_copies_modules_and_libs_readable_and_env_points_at_them() {
        let root = tempfile::tempdir().unwrap();
        pack(root.path(), "p", &["v1"], true);
        let p = scan(root.path()).unwrap().remove(0);
        let dest = tempfile::tempdir().unwrap();
        let dir = install(&p, dest.path()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let so = dir.join("modules/ui-dbus.so");
        assert_eq!(std::fs::read_to_string(&so).unwrap(), "p:ui-dbus.so");
        assert_eq!(
            std::fs::metadata(&so).unwrap().permissions().mode() & 0o777,
            0o644
        );
        assert!(dir.join("lib/libepoxy.so.0").is_file());
        // Again: nothing breaks, nothing is half-written.
        install(&p, dest.path()).unwrap();
        let env = qemu_env(&p, Path::new("/compute/vdi/qemu-modules/p"));
        assert_eq!(
            env,
            [
                (
                    "QEMU_MODULE_DIR".to_owned(),
                    "/compute/vdi/qemu-modules/p/modules".to_owned()
                ),
                (
                    "LD_LIBRARY_PATH".to_owned(),
                    "/compute/vdi/qemu-modules/p/lib".to_owned()
                )
            ]
        );
    }

    #[test]
    fn the_compute_side_directory_comes_from_the_bus_address() {
        assert_eq!(
            compute_dir("unix:path=/var/run/kubevirt-hooks/c0/vdi/bus"),
            Some(PathBuf::from("/var/run/kubevirt-hooks/c0/vdi"))
        );
        assert_eq!(
            compute_dir("unix:path=/x/bus,guid=1"),
            Some(PathBuf::from("/x"))
        );
        assert_eq!(compute_dir("tcp:host=x"), None);
    }

    #[test]
    fn broken_packs_are_reported() {
        let root = tempfile::tempdir().unwrap();
        pack(root.path(), "p", &["v1"], false);
        std::fs::remove_file(root.path().join("p/modules/audio-dbus.so")).unwrap();
        assert!(matches!(scan(root.path()), Err(Error::BadPack { .. })));
        std::fs::write(root.path().join("p/pack.json"), "{").unwrap();
        assert!(scan(root.path()).is_err());
        assert!(scan(Path::new("/nonexistent/packs")).unwrap().is_empty());
    }
}
