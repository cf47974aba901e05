//! /proc readings, medians and the printed table.

use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::client::{Enc, Run};

/// CPU seconds (user + system) used so far by `pid` (0: this process).
pub fn cpu_of(pid: u32) -> Result<f64> {
    let path = proc_path(pid, "stat");
    let stat = std::fs::read_to_string(&path).with_context(|| path.clone())?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    Ok(cpu_fields(&stat))
}

/// CPU seconds QEMU's threads other than its vCPUs have used so far: the display, VNC and
/// main-loop work. The guest's vCPU is flat out in the scenes, and its share of a 2-core machine
/// shrinks when a server gets busy, so counting it would make any server look cheaper.
pub fn qemu_cpu(pid: u32) -> Result<f64> {
    let mut total = 0.0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue; // the thread ended
        };
        let comm = stat
            .split_once('(')
            .and_then(|(_, r)| r.rsplit_once(')'))
            .map_or("", |(c, _)| c);
        if comm.starts_with("CPU ") {
            continue;
        }
        total += cpu_fields(&stat);
    }
    Ok(total)
}

fn cpu_fields(stat: &str) -> f64 {
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (field(11) + field(12)) / ticks_per_second()
}

/// Resident set size in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let path = proc_path(pid, "status");
    let status = std::fs::read_to_string(&path).with_context(|| path.clone())?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

fn proc_path(pid: u32, file: &str) -> String {
    if pid == 0 {
        format!("/proc/self/{file}")
    } else {
        format!("/proc/{pid}/{file}")
    }
}

fn ticks_per_second() -> f64 {
    // USER_HZ is 100 on every Linux ABI this runs on.
    100.0
}

/// QEMU's CPU rate with the scene running and no client attached to either server.
pub struct Baseline {
    pub qemu_cpu_per_s: f64,
}

pub async fn baseline(qemu_pid: u32, window: Duration) -> Result<Baseline> {
    let q0 = qemu_cpu(qemu_pid)?;
    let t0 = std::time::Instant::now();
    tokio::time::sleep(window).await;
    Ok(Baseline {
        qemu_cpu_per_s: (qemu_cpu(qemu_pid)? - q0) / t0.elapsed().as_secs_f64(),
    })
}

pub fn median(v: &[f64]) -> f64 {
    percentile(v, 0.5)
}

pub fn p95(v: &[f64]) -> f64 {
    percentile(v, 0.95)
}

/// A 95 % bootstrap interval of median(us) / median(them): both sample sets resampled with
/// replacement 2,000 times (a fixed-seed xorshift, so a table is reproducible from its samples).
pub fn ratio_interval(us: &[f64], them: &[f64]) -> (f64, f64) {
    if us.is_empty() || them.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    let mut ratios: Vec<f64> = (0..2000)
        .map(|_| {
            let a: Vec<f64> = (0..us.len()).map(|_| us[next(us.len())]).collect();
            let b: Vec<f64> = (0..them.len()).map(|_| them[next(them.len())]).collect();
            median(&a) / median(&b).max(1e-9)
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    (ratios[50], ratios[1949])
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v[i.min(v.len() - 1)]
}

/// What a row measures and how it is labelled.
pub struct Row {
    label: String,
    unit: &'static str,
    /// Whether larger is better (fps) or smaller (bytes, CPU, latency, memory).
    higher_is_better: bool,
}

impl Row {
    pub fn fps(size: &str, enc: Enc) -> Self {
        Row {
            label: format!("fps, video, {}, {size}", enc.name()),
            unit: "fps",
            higher_is_better: true,
        }
    }
    pub fn cpu(size: &str, enc: Enc) -> Self {
        Row {
            label: format!("CPU per 1000 updates, video, {}, {size}", enc.name()),
            unit: "s",
            higher_is_better: false,
        }
    }
    pub fn bytes(size: &str, enc: Enc, scene: &str) -> Self {
        Row {
            label: format!("KiB per update, {scene}, {}, {size}", enc.name()),
            unit: "KiB",
            higher_is_better: false,
        }
    }
    pub fn latency(size: &str, which: &str) -> Self {
        Row {
            label: format!("key-to-pixel {which}, ZRLE, {size}"),
            unit: "ms",
            higher_is_better: false,
        }
    }
    pub fn other(label: String, unit: &'static str, higher_is_better: bool) -> Self {
        Row {
            label,
            unit,
            higher_is_better,
        }
    }
}

struct Line {
    row: Row,
    a: f64,
    b: f64,
}

#[derive(Default)]
pub struct Table {
    vnc: Vec<Line>,
    memory: Vec<Line>,
    rdp: Vec<Line>,
    /// Our VNC server to noVNC: Open H.264 + Tight against Tight alone.
    browser: Vec<Line>,
    /// Rows under KubeVirt's sidecar budget and with many viewers (ours, QEMU: NaN when the row
    /// has only our value).
    budget: Vec<Line>,
    /// The targets the issue sets, met or not, with what was measured.
    targets: Vec<(String, bool, String)>,
    notes: Vec<String>,
}

impl Table {
    pub fn pair(&mut self, row: Row, us: &[Run], them: &[Run], f: impl Fn(&Run) -> f64) {
        let a = median(&us.iter().map(&f).collect::<Vec<_>>());
        let b = median(&them.iter().map(&f).collect::<Vec<_>>());
        self.pair_values(row, a, b);
    }

    pub fn pair_values(&mut self, row: Row, a: f64, b: f64) {
        self.vnc.push(Line { row, a, b });
    }

    pub fn memory(&mut self, size: &str, viewers: usize, ours_mib: f64, qemu_growth_mib: f64) {
        self.memory.push(Line {
            row: Row {
                label: format!("RSS, `vdi-sidecar bridge`, {viewers} viewer(s), ZRLE, {size}"),
                unit: "MiB",
                higher_is_better: false,
            },
            a: ours_mib,
            b: qemu_growth_mib,
        });
    }

    pub fn budget(&mut self, row: Row, ours: f64, qemu: f64) {
        self.budget.push(Line {
            row,
            a: ours,
            b: qemu,
        });
    }

    /// A budget row with only our value (the cgroup is ours).
    pub fn budget_single(&mut self, row: Row, ours: f64) {
        self.budget.push(Line {
            row,
            a: ours,
            b: f64::NAN,
        });
    }

    pub fn target(&mut self, what: String, met: bool, measured: String) {
        self.targets.push((what, met, measured));
    }

    pub fn note(&mut self, text: String) {
        self.notes.push(text);
    }

    pub fn rdp(&mut self, row: Row, rdp: f64, vnc: f64) {
        self.rdp.push(Line {
            row,
            a: rdp,
            b: vnc,
        });
    }

    pub fn browser(&mut self, row: Row, h264: f64, tight: f64) {
        self.browser.push(Line {
            row,
            a: h264,
            b: tight,
        });
    }

    pub fn print(&self, facts: &str) {
        println!("\nvdi-sidecar vs QEMU's own VNC server, same VM, same run ({facts})");
        println!(
            "medians over alternating rounds; ratio = ours / QEMU (fps: higher is better, else lower)\n"
        );
        section("row", "vdi-sidecar", "QEMU -vnc", "ours/QEMU", &self.vnc);
        println!();
        section("memory", "ours (RSS)", "QEMU growth", "", &self.memory);
        if !self.rdp.is_empty() {
            println!();
            section(
                "RDP (FreeRDP 3), ours",
                "RDP",
                "our VNC ZRLE",
                "RDP/VNC",
                &self.rdp,
            );
        }
        if !self.browser.is_empty() {
            println!();
            section(
                "browser (noVNC's encodings), ours",
                "H.264+Tight",
                "Tight q6",
                "H.264/Tight",
                &self.browser,
            );
        }
        if !self.budget.is_empty() {
            println!();
            section(
                "budget and many viewers",
                "vdi-sidecar",
                "QEMU -vnc",
                "ours/QEMU",
                &self.budget,
            );
        }
        if !self.targets.is_empty() {
            println!("\n| target | met | measured |\n|---|---|---|");
            for (what, met, measured) in &self.targets {
                println!(
                    "| {what} | {} | {measured} |",
                    if *met { "yes" } else { "NO" }
                );
            }
        }
        for n in &self.notes {
            println!("\nnote: {n}");
        }
    }

    /// Every row has both values: the smoke test's only assertion.
    pub fn check_complete(&self) -> Result<()> {
        let lines = self
            .vnc
            .iter()
            .chain(&self.memory)
            .chain(&self.rdp)
            .chain(&self.browser);
        let missing: Vec<&str> = lines
            .filter(|l| !l.a.is_finite() || !l.b.is_finite())
            .chain(self.budget.iter().filter(|l| !l.a.is_finite()))
            .map(|l| l.row.label.as_str())
            .collect();
        if (self.memory.is_empty() && self.vnc.is_empty() && self.budget.is_empty())
            || !missing.is_empty()
        {
            bail!("incomplete table: {missing:?}");
        }
        Ok(())
    }
}

fn section(title: &str, a: &str, b: &str, ratio: &str, lines: &[Line]) {
    println!("| {title:<50} | {a:>14} | {b:>14} | {ratio:>9} |");
    println!("|{:-<52}|{:->16}|{:->16}|{:->11}|", "", "", "", "");
    for l in lines {
        let r = if l.b.abs() > 1e-9 && l.b.is_finite() && !ratio.is_empty() {
            let better = if l.row.higher_is_better {
                l.a >= l.b
            } else {
                l.a <= l.b
            };
            format!("{:.2}{}", l.a / l.b, if better { " ✓" } else { "  " })
        } else {
            String::new()
        };
        let b = if l.b.is_finite() {
            format!("{:>10.2} {:<3}", l.b, l.row.unit)
        } else {
            format!("{:>14}", "—")
        };
        println!(
            "| {:<50} | {:>10.2} {:<3} | {b} | {r:>9} |",
            l.row.label, l.a, l.row.unit
        );
    }
}
