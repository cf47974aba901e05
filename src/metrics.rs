//! Prometheus metrics: what operators scrape from every sidecar (`/metrics` on the web listener,
//! or a plain-HTTP `--metrics ADDR`). One sidecar serves one VM, so there is one process-wide set
//! (as a process collector is), bumped where things happen — logins, sessions, frames from QEMU,
//! encodes, clipboard transfers — and encoded on each scrape with the VM's name as a label (the
//! name is learnt after start, from the hook or from QEMU). Traffic is not counted twice: the
//! front ends' own totals, the console's frame counters, the clipboard's and the budget's are read
//! at scrape time through [`Reader`]s the listeners' wiring registers, so this module depends on
//! none of the layers it describes.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{LazyLock, Mutex, MutexGuard};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// The content type of [`Metrics::render`]'s output (OpenMetrics text, which Prometheus reads).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Which front end a viewer came by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Protocol {
    #[default]
    Vnc,
    Rdp,
    /// VNC over the web listener's WebSocket (noVNC).
    Web,
}

impl Protocol {
    const ALL: [Protocol; 3] = [Protocol::Vnc, Protocol::Rdp, Protocol::Web];
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Vnc => "vnc",
            Protocol::Rdp => "rdp",
            Protocol::Web => "web",
        }
    }
}

/// How a login attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Login {
    /// Admitted (with credentials, or without where the operator opted out of them).
    Ok,
    /// Wrong credentials.
    Failed,
    /// Refused unheard: too many failed logins from that address.
    Limited,
    /// Refused: another viewer would exceed the memory limit.
    OverBudget,
}

impl Login {
    const ALL: [Login; 4] = [Login::Ok, Login::Failed, Login::Limited, Login::OverBudget];
    pub fn name(self) -> &'static str {
        match self {
            Login::Ok => "ok",
            Login::Failed => "failed",
            Login::Limited => "limited",
            Login::OverBudget => "over_budget",
        }
    }
}

fn buckets() -> impl Iterator<Item = f64> {
    // 100 µs … ~6.5 s: an encode of a small damage rectangle up to a stalled client's write.
    exponential_buckets(0.0001, 2.0, 17)
}

/// A front end's traffic so far (the sum over its viewers).
#[derive(Debug, Default, Clone, Copy)]
pub struct Traffic {
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub updates: u64,
    pub input_events: u64,
    pub audio_bytes: u64,
}

/// Frames from QEMU so far, by how the pixels came.
#[derive(Debug, Default, Clone, Copy)]
pub struct Frames {
    pub inline: u64,
    pub shm: u64,
}

/// The shared H.264 stream so far.
#[derive(Debug, Default, Clone, Copy)]
pub struct H264 {
    pub key_frames: u64,
    pub frames: u64,
    pub bytes: u64,
    pub encode_seconds: f64,
    pub subscribers: u64,
}

/// Clipboard transfers so far.
#[derive(Debug, Default, Clone, Copy)]
pub struct Clipboard {
    pub to_guest: u64,
    pub from_guest: u64,
    pub refused: u64,
}

/// The budget viewers are admitted against.
#[derive(Debug, Default, Clone, Copy)]
pub struct Budget {
    pub memory_limit: Option<u64>,
    /// CPUs' worth of quota (0.2 for 200m).
    pub cpus: Option<f64>,
    pub usage: u64,
    pub refusals: u64,
}

/// Reads one of those at scrape time.
pub type Reader<T> = Box<dyn Fn() -> T + Send + Sync>;

#[derive(Default)]
struct Readers {
    /// By protocol and a key naming the totals (a listener registers once however often it asks).
    traffic: Vec<(Protocol, usize, Reader<Traffic>)>,
    frames: Option<Reader<Frames>>,
    h264: Option<Reader<H264>>,
    clipboard: Option<Reader<Clipboard>>,
    budget: Option<Reader<Budget>>,
}

/// Every metric of the process. [`global`] is the one the sidecar uses; tests make their own.
pub struct Metrics {
    vm: Mutex<Option<(String, String)>>,
    viewers: [AtomicI64; 3],
    sessions: [Counter; 3],
    logins: [[Counter; 4]; 3],
    readers: Mutex<Readers>,
    /// Time to encode one shared update (all VNC and browser viewers of a group share it).
    encode: Histogram,
    /// Time to write one update to a viewer's socket: grows when a client or its network is slow.
    write: [Histogram; 3],
    attached: AtomicI64,
    attaches: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            vm: Mutex::new(None),
            viewers: Default::default(),
            sessions: Default::default(),
            logins: Default::default(),
            readers: Mutex::new(Readers::default()),
            encode: Histogram::new(buckets()),
            write: std::array::from_fn(|_| Histogram::new(buckets())),
            attached: AtomicI64::new(0),
            attaches: Counter::default(),
        }
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

static GLOBAL: LazyLock<Metrics> = LazyLock::new(Metrics::default);

/// The sidecar's metrics.
pub fn global() -> &'static Metrics {
    &GLOBAL
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One connected viewer; counted in `vdi_viewers` until dropped.
#[derive(Debug)]
pub struct ViewerGuard {
    metrics: &'static Metrics,
    protocol: Protocol,
}

impl Drop for ViewerGuard {
    fn drop(&mut self) {
        self.metrics.viewers[self.protocol as usize].fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// The VM these metrics describe (the hook's VMI, or QEMU's `-name` until the hook says).
    /// `from_hook` names win over QEMU's.
    pub fn set_vm(&self, namespace: &str, name: &str, from_hook: bool) {
        let mut vm = lock(&self.vm);
        if from_hook || vm.is_none() {
            *vm = Some((namespace.to_owned(), name.to_owned()));
        }
    }

    /// The VM's name (`namespace/name` once the hook has named it), for audit lines.
    pub fn vm_name(&self) -> String {
        match &*lock(&self.vm) {
            Some((ns, name)) if !ns.is_empty() => format!("{ns}/{name}"),
            Some((_, name)) => name.clone(),
            None => String::new(),
        }
    }

    /// A front end's traffic totals; `key` names them (registering the same key again replaces).
    pub fn register_traffic(&self, protocol: Protocol, key: usize, read: Reader<Traffic>) {
        let mut r = lock(&self.readers);
        r.traffic.retain(|(p, k, _)| !(*p == protocol && *k == key));
        r.traffic.push((protocol, key, read));
    }

    pub fn register_budget(&self, read: Reader<Budget>) {
        lock(&self.readers).budget = Some(read);
    }

    /// The console whose frames `vdi_qemu_frames_total` counts.
    pub fn register_frames(&self, read: Reader<Frames>) {
        lock(&self.readers).frames = Some(read);
    }

    /// The console's shared H.264 stream (`vdi_h264_*`).
    pub fn register_h264(&self, read: Reader<H264>) {
        lock(&self.readers).h264 = Some(read);
    }

    /// The VM's clipboard, whose transfers `vdi_clipboard_transfers_total` counts.
    pub fn register_clipboard(&self, read: Reader<Clipboard>) {
        lock(&self.readers).clipboard = Some(read);
    }

    pub fn login(&self, protocol: Protocol, outcome: Login) {
        self.logins[protocol as usize][outcome as usize].inc();
    }

    /// A viewer got its desktop; it is counted as connected until the guard drops.
    pub fn viewer(&'static self, protocol: Protocol) -> ViewerGuard {
        self.viewers[protocol as usize].fetch_add(1, Ordering::Relaxed);
        self.sessions[protocol as usize].inc();
        ViewerGuard {
            metrics: self,
            protocol,
        }
    }

    pub fn encoded(&self, took: Duration) {
        self.encode.observe(took.as_secs_f64());
    }

    pub fn written(&self, protocol: Protocol, took: Duration) {
        self.write[protocol as usize].observe(took.as_secs_f64());
    }

    /// QEMU's display attached (`true`) or went away.
    pub fn qemu_attached(&self, attached: bool) {
        self.attached.store(i64::from(attached), Ordering::Relaxed);
        if attached {
            self.attaches.inc();
        }
    }

    /// The OpenMetrics text of every metric now.
    pub fn render(&'static self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Scrape(self)));
        let mut out = String::new();
        // Writing into a String cannot fail; an error would only come from our own encoders.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        out
    }
}

/// Encodes [`Metrics`] on each scrape.
#[derive(Debug)]
struct Scrape(&'static Metrics);

type Labels<'a> = Vec<(&'static str, &'a str)>;
/// A family read off the front ends' totals: name, help, unit, which counter.
type TrafficFamily = (
    &'static str,
    &'static str,
    Option<Unit>,
    fn(&Traffic) -> u64,
);

/// Writes one metric family: each `(labels, value)` as a sample.
fn family<'a, M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: impl IntoIterator<Item = (Labels<'a>, M)>,
) -> Result<(), std::fmt::Error> {
    let mut samples = samples.into_iter().peekable();
    let Some((_, first)) = samples.peek() else {
        return Ok(());
    };
    let ty: MetricType = first.metric_type();
    let mut m = enc.encode_descriptor(name, help, unit, ty)?;
    for (labels, value) in samples {
        value.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// `&Counter`/`&Histogram` as encodable values.
#[derive(Debug)]
struct Ref<'a, M>(&'a M);

impl<M: EncodeMetric> EncodeMetric for Ref<'_, M> {
    fn encode(
        &self,
        encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }
    fn metric_type(&self) -> MetricType {
        self.0.metric_type()
    }
}

fn gauge(v: u64) -> ConstGauge<i64> {
    ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX))
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = self.0;
        let (namespace, vm) = lock(&m.vm).clone().unwrap_or_default();
        let base =
            || -> Labels<'_> { vec![("namespace", namespace.as_str()), ("vm", vm.as_str())] };
        let with = |k: &'static str, v: &'static str| {
            let mut l = base();
            l.push((k, v));
            l
        };
        let per_protocol = |pick: &dyn Fn(usize) -> u64| {
            Protocol::ALL
                .iter()
                .map(|p| {
                    (
                        with("protocol", p.name()),
                        ConstCounter::new(pick(*p as usize)),
                    )
                })
                .collect::<Vec<_>>()
        };
        let e = &mut enc;

        family(
            e,
            "vdi_viewers",
            "Viewers connected now",
            None,
            Protocol::ALL.iter().map(|p| {
                let n = m.viewers[*p as usize].load(Ordering::Relaxed);
                (with("protocol", p.name()), ConstGauge::new(n))
            }),
        )?;
        family(
            e,
            "vdi_sessions",
            "Viewer sessions started (after login)",
            None,
            per_protocol(&|i| m.sessions[i].get()),
        )?;
        let logins = Protocol::ALL.iter().flat_map(|p| {
            let base = &base;
            Login::ALL.iter().map(move |o| {
                let mut l = base();
                l.push(("protocol", p.name()));
                l.push(("outcome", o.name()));
                (
                    l,
                    ConstCounter::new(m.logins[*p as usize][*o as usize].get()),
                )
            })
        });
        family(e, "vdi_logins", "Login attempts by outcome", None, logins)?;

        // Read everything registered first, then encode without the lock.
        let (traffic, frames, h264, clipboard, budget) = {
            let r = lock(&m.readers);
            let traffic: Vec<(Protocol, Traffic)> =
                r.traffic.iter().map(|(p, _, read)| (*p, read())).collect();
            (
                traffic,
                r.frames.as_ref().map(|f| f()),
                r.h264.as_ref().map(|f| f()),
                r.clipboard.as_ref().map(|f| f()),
                r.budget.as_ref().map(|f| f()),
            )
        };
        // A protocol may have several listeners.
        let sum = |p: usize, f: &dyn Fn(&Traffic) -> u64| -> u64 {
            traffic
                .iter()
                .filter(|(q, _)| *q as usize == p)
                .map(|(_, t)| f(t))
                .sum()
        };
        let counted: [TrafficFamily; 5] = [
            (
                "vdi_sent",
                "Bytes written to viewers (after TLS)",
                Some(Unit::Bytes),
                |t| t.bytes_out,
            ),
            (
                "vdi_received",
                "Bytes read from viewers",
                Some(Unit::Bytes),
                |t| t.bytes_in,
            ),
            ("vdi_updates", "Screen updates sent to viewers", None, |t| {
                t.updates
            }),
            (
                "vdi_input_events",
                "Keyboard and pointer events from viewers",
                None,
                |t| t.input_events,
            ),
            (
                "vdi_audio_sent",
                "Guest sound (PCM) handed to viewers",
                Some(Unit::Bytes),
                |t| t.audio_bytes,
            ),
        ];
        for (name, help, unit, f) in counted {
            family(e, name, help, unit.as_ref(), per_protocol(&|p| sum(p, &f)))?;
        }

        family(
            e,
            "vdi_encode",
            "Time to encode one shared VNC update",
            Some(&Unit::Seconds),
            [(base(), Ref(&m.encode))],
        )?;
        family(
            e,
            "vdi_update_write",
            "Time to write one update to a viewer's socket",
            Some(&Unit::Seconds),
            [Protocol::Vnc, Protocol::Web]
                .iter()
                .map(|p| (with("protocol", p.name()), Ref(&m.write[*p as usize]))),
        )?;
        if let Some(f) = frames {
            family(
                e,
                "vdi_qemu_frames",
                "Frames received from QEMU: pixels in the message (inline) or in shared memory",
                None,
                [("inline", f.inline), ("shm", f.shm)]
                    .map(|(n, v)| (with("path", n), ConstCounter::new(v))),
            )?;
        }
        if let Some(v) = h264 {
            family(
                e,
                "vdi_h264_frames",
                "Pictures of the shared H.264 stream, by kind (one encoding for every viewer)",
                None,
                [
                    ("key", v.key_frames),
                    ("delta", v.frames - v.key_frames.min(v.frames)),
                ]
                .map(|(n, c)| (with("kind", n), ConstCounter::new(c))),
            )?;
            family(
                e,
                "vdi_h264_encoded",
                "Bytes of the shared H.264 stream",
                Some(&Unit::Bytes),
                [(base(), ConstCounter::new(v.bytes))],
            )?;
            family(
                e,
                "vdi_h264_encode",
                "CPU time converting and encoding the shared H.264 stream",
                Some(&Unit::Seconds),
                [(base(), ConstCounter::new(v.encode_seconds))],
            )?;
            family(
                e,
                "vdi_h264_viewers",
                "Viewers subscribed to the shared H.264 stream",
                None,
                [(base(), ConstGauge::new(v.subscribers as i64))],
            )?;
        }
        family(
            e,
            "vdi_qemu_attached",
            "1 while QEMU's display is attached",
            None,
            [(base(), ConstGauge::new(m.attached.load(Ordering::Relaxed)))],
        )?;
        family(
            e,
            "vdi_qemu_attaches",
            "Times QEMU's display attached (re-attaches after QEMU or bus restarts)",
            None,
            [(base(), Ref(&m.attaches))],
        )?;
        if let Some(c) = clipboard {
            family(
                e,
                "vdi_clipboard_transfers",
                "Clipboard texts passed between viewers and the guest, or refused by policy",
                None,
                [
                    ("to_guest", c.to_guest),
                    ("from_guest", c.from_guest),
                    ("refused", c.refused),
                ]
                .map(|(n, v)| (with("direction", n), ConstCounter::new(v))),
            )?;
        }

        if let Some(b) = &budget {
            limits(e, &base, b)?;
            family(
                e,
                "vdi_budget_refusals",
                "Viewers refused because they would exceed the memory limit",
                None,
                [(base(), ConstCounter::new(b.refusals))],
            )?;
            family(
                e,
                "vdi_memory_usage",
                "Memory in use, as admissions see it (the cgroup's usage, or RSS without one)",
                Some(&Unit::Bytes),
                [(base(), gauge(b.usage))],
            )?;
        }
        process(e, &base)
    }
}

fn limits<'a>(
    e: &mut DescriptorEncoder,
    base: &dyn Fn() -> Labels<'a>,
    l: &Budget,
) -> Result<(), std::fmt::Error> {
    if let Some(mem) = l.memory_limit {
        family(
            e,
            "vdi_cgroup_memory_limit",
            "The cgroup's memory limit",
            Some(&Unit::Bytes),
            [(base(), gauge(mem))],
        )?;
    }
    if let Some(cpus) = l.cpus {
        family(
            e,
            "vdi_cgroup_cpu_limit_millicores",
            "The cgroup's CPU quota, in thousandths of a CPU",
            None,
            [(base(), gauge((cpus * 1000.0).round() as u64))],
        )?;
    }
    Ok(())
}

/// The process itself: what a soak or an operator watches for leaks (Prometheus' usual
/// `process_*` names), and the async tasks alive in the runtime.
fn process<'a>(
    e: &mut DescriptorEncoder,
    base: &dyn Fn() -> Labels<'a>,
) -> Result<(), std::fmt::Error> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        line[name.len()..].split_whitespace().next()?.parse().ok()
    };
    if let Some(kib) = field("VmRSS:") {
        family(
            e,
            "process_resident_memory",
            "Resident memory",
            Some(&Unit::Bytes),
            [(base(), gauge(kib * 1024))],
        )?;
    }
    if let Some(n) = field("Threads:") {
        family(
            e,
            "process_threads",
            "OS threads",
            None,
            [(base(), gauge(n))],
        )?;
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        // The directory handle itself is one of them.
        let n = dir.count().saturating_sub(1) as u64;
        family(
            e,
            "process_open_fds",
            "Open file descriptors",
            None,
            [(base(), gauge(n))],
        )?;
    }
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        let n = rt.metrics().num_alive_tasks() as u64;
        family(
            e,
            "vdi_runtime_tasks",
            "Async tasks alive",
            None,
            [(base(), gauge(n))],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn fresh() -> &'static Metrics {
        Box::leak(Box::default())
    }

    fn sample(text: &str, prefix: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    #[test]
    fn counts_show_up_under_their_names_and_labels() {
        let m = fresh();
        m.set_vm("", "qemu-name", false);
        m.set_vm("default", "vm-basic", true);
        m.set_vm("", "later-qemu-name", false);
        m.login(Protocol::Vnc, Login::Ok);
        m.login(Protocol::Rdp, Login::Failed);
        m.login(Protocol::Rdp, Login::Failed);
        let sent = Arc::new(AtomicI64::new(400));
        let read = |s: &Arc<AtomicI64>| -> Reader<Traffic> {
            let s = Arc::clone(s);
            Box::new(move || Traffic {
                bytes_out: s.load(Ordering::Relaxed) as u64,
                ..Traffic::default()
            })
        };
        m.register_traffic(Protocol::Web, 1, read(&sent));
        sent.store(1000, Ordering::Relaxed);
        m.register_traffic(Protocol::Web, 1, read(&sent));
        let a = m.viewer(Protocol::Web);
        let b = m.viewer(Protocol::Web);
        drop(a);
        m.register_frames(Box::new(|| Frames { inline: 0, shm: 2 }));
        m.register_h264(Box::new(|| H264 {
            key_frames: 2,
            frames: 10,
            bytes: 5000,
            encode_seconds: 0.25,
            subscribers: 3,
        }));
        m.qemu_attached(true);
        m.qemu_attached(false);
        m.qemu_attached(true);
        m.encoded(Duration::from_millis(3));
        let text = m.render();
        let l = r#"namespace="default",vm="vm-basic""#;
        let at = |s: &str| sample(&text, s);
        assert_eq!(
            at(&format!("vdi_viewers{{{l},protocol=\"web\"}}")),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            at(&format!("vdi_sessions_total{{{l},protocol=\"web\"}}")),
            Some(2.0)
        );
        assert_eq!(
            at(&format!(
                "vdi_logins_total{{{l},protocol=\"rdp\",outcome=\"failed\"}}"
            )),
            Some(2.0)
        );
        assert_eq!(
            at(&format!(
                "vdi_logins_total{{{l},protocol=\"vnc\",outcome=\"ok\"}}"
            )),
            Some(1.0)
        );
        // Registered once, however often the listener says so.
        assert_eq!(
            at(&format!("vdi_sent_bytes_total{{{l},protocol=\"web\"}}")),
            Some(1000.0)
        );
        assert_eq!(
            at(&format!("vdi_qemu_frames_total{{{l},path=\"shm\"}}")),
            Some(2.0)
        );
        assert_eq!(
            at(&format!("vdi_h264_frames_total{{{l},kind=\"delta\"}}")),
            Some(8.0)
        );
        assert_eq!(
            at(&format!("vdi_h264_encoded_bytes_total{{{l}}}")),
            Some(5000.0)
        );
        assert_eq!(
            at(&format!("vdi_h264_encode_seconds_total{{{l}}}")),
            Some(0.25)
        );
        assert_eq!(at(&format!("vdi_h264_viewers{{{l}}}")), Some(3.0));
        assert_eq!(at(&format!("vdi_qemu_attached{{{l}}}")), Some(1.0));
        assert_eq!(at(&format!("vdi_qemu_attaches_total{{{l}}}")), Some(2.0));
        assert_eq!(at(&format!("vdi_encode_seconds_count{{{l}}}")), Some(1.0));
        assert!(at(&format!("process_resident_memory_bytes{{{l}}}")).is_some_and(|v| v > 0.0));
        assert!(at(&format!("process_open_fds{{{l}}}")).is_some_and(|v| v > 0.0));
        assert!(text.ends_with("# EOF\n"));
        drop(b);
        assert_eq!(
            sample(&m.render(), &format!("vdi_viewers{{{l},protocol=\"web\"}}")),
            Some(0.0)
        );
    }

    #[test]
    fn cgroup_limits_are_exported_when_there_are_some() {
        let m = fresh();
        let text = m.render();
        assert!(!text.contains("vdi_cgroup_memory_limit"));
        m.register_budget(Box::new(Budget::default));
        assert!(!m.render().contains("vdi_cgroup_memory_limit"));
        m.register_budget(Box::new(|| Budget {
            memory_limit: Some(64_000_000),
            cpus: Some(0.2),
            usage: 20 << 20,
            refusals: 1,
        }));
        let text = m.render();
        assert_eq!(
            sample(&text, "vdi_cgroup_memory_limit_bytes{"),
            Some(64e6),
            "{text}"
        );
        assert_eq!(
            sample(&text, "vdi_cgroup_cpu_limit_millicores{"),
            Some(200.0)
        );
        assert_eq!(sample(&text, "vdi_budget_refusals_total{"), Some(1.0));
    }
}
