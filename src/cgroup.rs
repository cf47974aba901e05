//! What the kernel lets this process use: the memory limit and CPU quota of its cgroup (v1 or
//! v2, the tightest along the path to the root), and how much memory the cgroup uses now.
//! KubeVirt gives a hook sidecar 200m CPU / 64M memory on VMIs with dedicated CPUs: the encoder
//! pool, frame history and viewer admission are sized from this, not from the host.

use std::path::{Path, PathBuf};

/// Limits above this are "unlimited" (v1 reports 2^63 rounded to pages).
const UNLIMITED: u64 = 1 << 62;

/// One controller's directory for this process.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Dir {
    /// The cgroup's directory, then its ancestors up to the mount point.
    path: PathBuf,
    mount: PathBuf,
}

impl Dir {
    /// This directory and its ancestors inside the mount.
    fn chain(&self) -> impl Iterator<Item = &Path> {
        self.path
            .ancestors()
            .take_while(move |p| p.starts_with(&self.mount))
    }
}

/// The cgroup version the limits came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// The limits that apply to this process.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub version: Option<Version>,
    /// Bytes of memory the cgroup may use (`None`: unlimited).
    pub memory: Option<u64>,
    /// CPUs' worth of time per period (0.2 for 200m; `None`: unlimited).
    pub cpus: Option<f64>,
    memory_dir: Option<PathBuf>,
}

impl Limits {
    /// No cgroup information at all.
    pub fn none() -> Self {
        Self {
            version: None,
            memory: None,
            cpus: None,
            memory_dir: None,
        }
    }

    /// Reads this process's cgroups.
    pub fn detect() -> Self {
        let (Ok(cgroup), Ok(mountinfo)) = (
            std::fs::read_to_string("/proc/self/cgroup"),
            std::fs::read_to_string("/proc/self/mountinfo"),
        ) else {
            return Self::none();
        };
        Self::from_files(&cgroup, &mountinfo, |p| std::fs::read_to_string(p).ok())
    }

    /// The limits from `/proc/self/cgroup` and `/proc/self/mountinfo` texts; `read` reads a
    /// control file (tests pass a fake file system).
    pub fn from_files(
        cgroup: &str,
        mountinfo: &str,
        read: impl Fn(&Path) -> Option<String>,
    ) -> Self {
        let num = |p: &Path| -> Option<u64> { read(p)?.trim().parse().ok() };
        // cgroup v1: separate memory and cpu hierarchies.
        let mem_v1 = controller_dir(cgroup, mountinfo, Some("memory"));
        let cpu_v1 = controller_dir(cgroup, mountinfo, Some("cpu"));
        if mem_v1.is_some() || cpu_v1.is_some() {
            let memory_dir = mem_v1.as_ref().map(|d| d.path.clone());
            let memory = mem_v1.as_ref().and_then(|d| {
                d.chain()
                    .filter_map(|p| num(&p.join("memory.limit_in_bytes")))
                    .filter(|&v| v < UNLIMITED)
                    .min()
            });
            let cpus = cpu_v1.as_ref().and_then(|d| {
                d.chain()
                    .filter_map(|p| {
                        let quota: i64 = read(&p.join("cpu.cfs_quota_us"))?.trim().parse().ok()?;
                        let period: u64 = num(&p.join("cpu.cfs_period_us"))?;
                        (quota > 0 && period > 0).then(|| quota as f64 / period as f64)
                    })
                    .min_by(f64::total_cmp)
            });
            return Self {
                version: Some(Version::V1),
                memory,
                cpus,
                memory_dir,
            };
        }
        let Some(v2) = controller_dir(cgroup, mountinfo, None) else {
            return Self::none();
        };
        let memory = v2
            .chain()
            .filter_map(|p| num(&p.join("memory.max")))
            .filter(|&v| v < UNLIMITED)
            .min();
        let cpus = v2
            .chain()
            .filter_map(|p| {
                let text = read(&p.join("cpu.max"))?;
                let mut it = text.split_whitespace();
                let quota: u64 = it.next()?.parse().ok()?; // "max" fails: unlimited
                let period: u64 = it.next()?.parse().ok()?;
                (period > 0).then(|| quota as f64 / period as f64)
            })
            .min_by(f64::total_cmp);
        Self {
            version: Some(Version::V2),
            memory,
            cpus,
            memory_dir: Some(v2.path),
        }
    }

    /// The cgroup's working set now (usage less inactive page cache, which the kernel reclaims
    /// before it kills: what kubelet compares with the limit too), if known.
    pub fn memory_usage(&self) -> Option<u64> {
        let dir = self.memory_dir.as_ref()?;
        let (file, inactive) = match self.version {
            Some(Version::V1) => ("memory.usage_in_bytes", "total_inactive_file"),
            _ => ("memory.current", "inactive_file"),
        };
        let usage: u64 = std::fs::read_to_string(dir.join(file))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let stat = std::fs::read_to_string(dir.join("memory.stat")).unwrap_or_default();
        let cache = stat
            .lines()
            .find_map(|l| l.strip_prefix(inactive)?.trim().parse::<u64>().ok())
            .unwrap_or(0);
        Some(usage.saturating_sub(cache))
    }

    /// Threads worth running CPU-bound work on: the quota rounded up, at most the CPUs there are.
    pub fn workers(&self) -> usize {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        match self.cpus {
            Some(c) => (c.ceil() as usize).clamp(1, cores),
            None => cores,
        }
    }
}

/// This process's directory of `controller` (`None`: the v2 unified hierarchy).
fn controller_dir(cgroup: &str, mountinfo: &str, controller: Option<&str>) -> Option<Dir> {
    // /proc/self/cgroup: "hierarchy-id:controllers:path"; v2 is "0::path".
    let path = cgroup.lines().find_map(|line| {
        let mut f = line.splitn(3, ':');
        let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
        let ok = match controller {
            Some(c) => controllers.split(',').any(|x| x == c),
            None => controllers.is_empty(),
        };
        ok.then_some(path)
    })?;
    // mountinfo: "id parent major:minor root mountpoint options - fstype source superoptions".
    let (root, mount) = mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut l = left.split(' ');
        let root = l.nth(3)?;
        let mount = l.next()?;
        let mut r = right.split(' ');
        let fstype = r.next()?;
        let superopts = r.nth(1).unwrap_or("");
        let ok = match controller {
            Some(c) => fstype == "cgroup" && superopts.split(',').any(|o| o == c),
            None => fstype == "cgroup2",
        };
        ok.then_some((root, mount))
    })?;
    // Inside a cgroup namespace the path is relative to the mount's root.
    let rel = path
        .strip_prefix(root)
        .unwrap_or(path)
        .trim_start_matches('/');
    let mount = PathBuf::from(mount);
    Some(Dir {
        path: if rel.is_empty() {
            mount.clone()
        } else {
            mount.join(rel)
        },
        mount,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn fs(files: &[(&str, &str)]) -> impl Fn(&Path) -> Option<String> {
        let map: HashMap<PathBuf, String> = files
            .iter()
            .map(|(p, v)| (PathBuf::from(p), (*v).to_owned()))
            .collect();
        move |p| map.get(p).cloned()
    }

    const MOUNTS_V1: &str = "\
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw";

    #[test]
    fn v1_limits_are_the_tightest_on_the_path() {
        let cgroup = "4:memory:/pod/sidecar\n1:cpu:/pod/sidecar\n0::/\n";
        let l = Limits::from_files(
            cgroup,
            MOUNTS_V1,
            fs(&[
                (
                    "/sys/fs/cgroup/memory/pod/sidecar/memory.limit_in_bytes",
                    "64000000\n",
                ),
                (
                    "/sys/fs/cgroup/memory/pod/memory.limit_in_bytes",
                    "128000000\n",
                ),
                (
                    "/sys/fs/cgroup/memory/memory.limit_in_bytes",
                    "9223372036854771712\n",
                ),
                ("/sys/fs/cgroup/cpu/pod/sidecar/cpu.cfs_quota_us", "-1\n"),
                (
                    "/sys/fs/cgroup/cpu/pod/sidecar/cpu.cfs_period_us",
                    "100000\n",
                ),
                ("/sys/fs/cgroup/cpu/pod/cpu.cfs_quota_us", "20000\n"),
                ("/sys/fs/cgroup/cpu/pod/cpu.cfs_period_us", "100000\n"),
            ]),
        );
        assert_eq!(l.version, Some(Version::V1));
        assert_eq!(l.memory, Some(64_000_000));
        assert_eq!(l.cpus, Some(0.2));
        assert_eq!(l.workers(), 1);
    }

    #[test]
    fn v2_and_a_namespaced_root() {
        let mounts = "30 23 0:26 /kubepods/pod1/c1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw";
        let l = Limits::from_files(
            "0::/kubepods/pod1/c1\n",
            mounts,
            fs(&[
                ("/sys/fs/cgroup/memory.max", "64000000\n"),
                ("/sys/fs/cgroup/cpu.max", "20000 100000\n"),
            ]),
        );
        assert_eq!(l.version, Some(Version::V2));
        assert_eq!((l.memory, l.cpus), (Some(64_000_000), Some(0.2)));
        let unlimited = Limits::from_files(
            "0::/\n",
            mounts,
            fs(&[
                ("/sys/fs/cgroup/memory.max", "max\n"),
                ("/sys/fs/cgroup/cpu.max", "max 100000\n"),
            ]),
        );
        assert_eq!((unlimited.memory, unlimited.cpus), (None, None));
    }

    #[test]
    fn garbage_gives_no_limits() {
        let l = Limits::from_files("junk", "also junk", |_| None);
        assert_eq!(l, Limits::none());
        let l = Limits::from_files("4:memory:/x\n", MOUNTS_V1, |_| Some("NaN".into()));
        assert_eq!((l.memory, l.cpus), (None, None));
        assert!(Limits::detect().workers() >= 1);
    }
}
