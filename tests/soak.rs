//! The soak (issue 22), not part of every CI run:
//!
//!     cargo test --release --test soak -- --ignored --nocapture
//!
//! 60 minutes (`VDI_SOAK_MINUTES`) of the real binary next to a real QEMU whose guest types on its
//! desktop, while viewers of every protocol come and go every few seconds: VNC and browser viewers
//! that watch and leave, that stall without reading, that reset mid-update, that fail their login
//! (from 127.0.0.2, so the failed-login limit does not lock the good ones out); FreeRDP sessions
//! killed mid-session and FreeRDP logins with a wrong password. QEMU is killed and started again
//! every 5 minutes (`VDI_SOAK_QEMU_EVERY`), and once, at the middle restart, dbus-daemon is killed
//! too. Each minute the viewers pause until the sidecar counts none, and the sidecar's RSS, open
//! fds, threads and async tasks are taken: the table must show them back within 10 % of minute 1
//! at the end, every viewer that connected while QEMU was up must have got a picture, and the log
//! must hold no error beyond the faults injected.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::qemu::{Video, Vm};
use common::rdp::{PASSWORD, USER};
use common::rfb::Client;
use common::x11::Xvfb;
use common::{Proc, Sidecar, free_addr, pids_with_cmdline, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What the churn saw, by viewer kind: (sessions, sessions that needed a picture, pictures).
#[derive(Default)]
struct Tally {
    kinds: Mutex<BTreeMap<&'static str, (u64, u64, u64)>>,
    missing: Mutex<Vec<String>>,
}

impl Tally {
    fn record(&self, kind: &'static str, needed: bool, got: bool, why: &str) {
        let mut k = self.kinds.lock().expect("tally");
        let e = k.entry(kind).or_default();
        e.0 += 1;
        if needed {
            e.1 += 1;
            e.2 += u64::from(got);
            if !got {
                self.missing
                    .lock()
                    .expect("tally")
                    .push(format!("{kind}: {why}"));
            }
        }
    }
}

struct Shared {
    vnc: SocketAddr,
    web: SocketAddr,
    bridge: SocketAddr,
    /// QEMU attached and drawing (cleared before a kill, set once it is attached again).
    qemu_up: AtomicBool,
    /// Viewers start no new session while set (the per-minute quiet sample).
    paused: AtomicBool,
    stop: AtomicBool,
    tally: Tally,
    qemu_restarts: AtomicU64,
}

/// More than one colour in the client's copy of the screen: the guest's desktop, not a blank.
fn is_picture(c: &Client) -> bool {
    c.fb.first()
        .is_some_and(|&first| c.fb.iter().any(|&p| p != first))
}

/// Watches for `secs`, asking for updates; whether a picture arrived.
async fn watch(mut c: Client, secs: u64) -> Result<bool, String> {
    c.set_encodings(&[16]).await;
    c.request(false).await;
    let end = Instant::now() + Duration::from_secs(secs);
    let mut got = false;
    while Instant::now() < end {
        tokio::time::timeout(Duration::from_secs(15), c.read_update())
            .await
            .map_err(|_| "no update within 15 s".to_string())?;
        got |= is_picture(&c);
        c.request(true).await;
    }
    Ok(got)
}

async fn connect_from(src: &str, to: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(format!("{src}:0").parse().expect("addr"))?;
    s.connect(to).await
}

/// One viewer session of `kind`. Panics (from the RFB client on a broken stream) are caught by
/// the task and counted as a missing picture where one was due.
async fn viewer(sh: Arc<Shared>, kind: &'static str, n: u64) {
    let up = sh.qemu_up.load(Ordering::SeqCst);
    let needs_picture = matches!(kind, "vnc" | "web") && up;
    let task = {
        let sh = Arc::clone(&sh);
        tokio::spawn(async move {
            match kind {
                "vnc" | "web" => {
                    let to = if kind == "vnc" { sh.vnc } else { sh.bridge };
                    let c = Client::connect(to, "003.008", Some(PASSWORD)).await?;
                    watch(c, 2 + n % 5).await
                }
                "stall" => {
                    // Asks for everything in Raw and then reads nothing for 20 s.
                    let mut c = Client::connect(sh.vnc, "003.008", Some(PASSWORD)).await?;
                    c.set_encodings(&[0]).await;
                    for _ in 0..8 {
                        c.request(false).await;
                    }
                    tokio::time::sleep(Duration::from_secs(20)).await;
                    Ok(false)
                }
                "reset" | "web-reset" => {
                    let c = if kind == "reset" {
                        Client::connect(sh.vnc, "003.008", Some(PASSWORD)).await?
                    } else {
                        Client::connect(sh.bridge, "003.008", Some(PASSWORD)).await?
                    };
                    let mut s = c.s;
                    common::rfb::set_encodings(&mut s, &[0]).await;
                    common::rfb::request(&mut s, false, 0, 0, 4096, 4096).await;
                    let mut part = [0u8; 1500];
                    let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut part)).await;
                    // Closing with unread data and no linger: a reset in the middle of the update.
                    let _ = s.set_zero_linger();
                    drop(s);
                    Ok(false)
                }
                "ws-garbage" => {
                    // A browser that sends half a handshake and resets.
                    let mut s = common::ws::open(sh.web).await?;
                    s.write_all(&common::ws::frame(true, 2, b"RFB 003.0"))
                        .await
                        .map_err(|e| e.to_string())?;
                    let _ = s.set_zero_linger();
                    Ok(false)
                }
                _ => {
                    // "bad-login": from another address than the good viewers.
                    let mut s = connect_from("127.0.0.2", sh.vnc)
                        .await
                        .map_err(|e| e.to_string())?;
                    let r = common::rfb::handshake(&mut s, "003.008", Some("wrong"), true).await;
                    if r.is_ok() {
                        return Err("a wrong password was accepted".into());
                    }
                    Ok(false)
                }
            }
        })
    };
    let (got, why) = match task.await {
        Ok(Ok(got)) => (got, "no picture".to_string()),
        Ok(Err(e)) => (false, e),
        Err(e) => (false, format!("client failed: {e}")),
    };
    // A restart during the session excuses it.
    let needed = needs_picture && sh.qemu_up.load(Ordering::SeqCst);
    sh.tally.record(kind, needed, got, &why);
}

/// One churn slot: a viewer after another, a second or two apart, until stopped.
async fn slot(sh: Arc<Shared>, kinds: &'static [&'static str], offset: u64) {
    let mut n = offset;
    while !sh.stop.load(Ordering::SeqCst) {
        if sh.paused.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let kind = kinds[(n as usize) % kinds.len()];
        viewer(Arc::clone(&sh), kind, n).await;
        n += 1;
        tokio::time::sleep(Duration::from_millis(500 + (n * 379) % 2000)).await;
    }
}

/// RDP churn (blocking: FreeRDP processes): a session killed after a few seconds, and now and
/// then a wrong password.
fn rdp_loop(sh: Arc<Shared>, port: u16, display: String, dir: std::path::PathBuf) {
    let mut n = 0u64;
    while !sh.stop.load(Ordering::SeqCst) {
        if sh.paused.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        n += 1;
        if n.is_multiple_of(4) {
            let (ok, _) = common::rdp::auth_only(port, USER, "wrong-password", &[]);
            sh.tally.record("rdp-bad-login", false, !ok, "");
        } else {
            let log = std::fs::File::create(dir.join("xfreerdp.log")).expect("log");
            let child = std::process::Command::new("xfreerdp3")
                .arg(format!("/v:127.0.0.1:{port}"))
                .arg(format!("/u:{USER}"))
                .arg(format!("/p:{PASSWORD}"))
                .args(["/cert:ignore", "/log-level:WARN"])
                .env("DISPLAY", &display)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(log)
                .spawn()
                .expect("xfreerdp3");
            let mut p = Proc {
                child,
                name: "xfreerdp3",
            };
            std::thread::sleep(Duration::from_secs(4 + n % 5));
            // SIGKILL: the sidecar sees the connection reset, as when a laptop drops off.
            let _ = p.child.kill();
            let _ = p.wait_timeout(Duration::from_secs(5));
            sh.tally.record("rdp", false, false, "");
        }
        std::thread::sleep(Duration::from_millis(1000 + (n * 613) % 3000));
    }
}

#[derive(Clone, Copy, Default)]
struct Sample {
    rss_mib: f64,
    fds: u64,
    threads: u64,
    tasks: u64,
    updates: f64,
}

fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn scrape(metrics: &str) -> String {
    let r = common::http_get(metrics, "/metrics");
    r.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

fn sample(pid: u32, metrics: &str) -> Sample {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l[name.len()..].split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
    let text = scrape(metrics);
    Sample {
        rss_mib: field("VmRSS:") as f64 / 1024.0,
        fds,
        threads: field("Threads:"),
        tasks: metric_sum(&text, "vdi_runtime_tasks") as u64,
        updates: metric_sum(&text, "vdi_updates_total"),
    }
}

/// Starts QEMU in a fresh directory on the sidecar's bus with the guest typing on its desktop;
/// returns once our sidecar has attached to it (`attaches` grew).
fn start_qemu(sc: &Sidecar, n: u64, metrics: &str, attaches_before: f64) -> Vm {
    let dir = sc.dir.path().join(format!("qemu-{n}"));
    std::fs::create_dir_all(&dir).expect("qemu dir");
    let addr = format!("unix:path={}", sc.bus_socket().display());
    let mut vm = Vm::start(&dir, &addr, Video::StdVga);
    vm.wait_ready();
    assert!(
        wait_until(Duration::from_secs(60), || {
            metric_sum(&scrape(metrics), "vdi_qemu_attaches_total") > attaches_before
        }),
        "the sidecar did not attach to QEMU #{n}"
    );
    vm.send_line("scene desktop 3600000");
    vm
}

/// The log without terminal colours (the sidecar colours its log even into a file).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
#[ignore = "60 minutes; run by hand (see the module comment)"]
fn soak() {
    let minutes = env_u64("VDI_SOAK_MINUTES", 60);
    let qemu_every = env_u64("VDI_SOAK_QEMU_EVERY", 5).max(1);
    let (vnc, rdp, web, metrics) = (free_addr(), free_addr(), free_addr(), free_addr());
    let (vnc_s, rdp_s, web_s, metrics_s) = (
        vnc.to_string(),
        rdp.to_string(),
        web.to_string(),
        metrics.to_string(),
    );
    // The allocator settings of our image (its Containerfile's `ENV MALLOC_…` line): RSS as in a pod.
    let containerfile =
        std::fs::read_to_string(common::data_file("../../Containerfile")).expect("Containerfile");
    let malloc: Vec<(&str, &str)> = containerfile
        .lines()
        .filter_map(|l| l.strip_prefix("ENV "))
        .flat_map(|l| l.split_whitespace())
        .filter(|kv| kv.starts_with("MALLOC_"))
        .filter_map(|kv| kv.split_once('='))
        .collect();
    assert!(
        !malloc.is_empty(),
        "no MALLOC_ settings in the Containerfile"
    );
    let mut env: Vec<(&str, &str)> = vec![("VDI_PASSWORD", PASSWORD), ("VDI_LOG", "info")];
    env.extend(&malloc);
    let sc = Sidecar::start(
        &[
            "--vnc",
            &vnc_s,
            "--rdp",
            &rdp_s,
            "--http",
            &web_s,
            "--http-insecure",
            "--metrics",
            &metrics_s,
            "--username",
            USER,
        ],
        &env,
    );
    let pid = sc.proc.pid();
    let bus_conf = sc
        .hooks_dir()
        .join("vdi/dbus-daemon.conf")
        .display()
        .to_string();
    let mut vm = start_qemu(&sc, 0, &metrics_s, 0.0);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let bridge = rt.block_on(common::ws::bridge(web));
    let sh = Arc::new(Shared {
        vnc,
        web,
        bridge,
        qemu_up: AtomicBool::new(true),
        paused: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        tally: Tally::default(),
        qemu_restarts: AtomicU64::new(0),
    });
    const A: &[&str] = &["vnc", "web", "stall", "vnc", "reset", "bad-login"];
    const B: &[&str] = &[
        "web",
        "vnc",
        "web-reset",
        "ws-garbage",
        "web",
        "bad-login",
        "vnc",
    ];
    for (i, kinds) in [A, B, A, B].into_iter().enumerate() {
        rt.spawn(slot(Arc::clone(&sh), kinds, i as u64 * 3));
    }
    let x = Xvfb::start();
    let rdp_thread = {
        let (sh, display, dir) = (Arc::clone(&sh), x.display.clone(), sc.dir.path().to_owned());
        std::thread::spawn(move || rdp_loop(sh, rdp.port(), display, dir))
    };

    println!(
        "{:>6} {:>8} {:>5} {:>7} {:>6} {:>8} {:>9} {:>8}",
        "minute", "RSS MiB", "fds", "threads", "tasks", "viewers", "updates/s", "sessions"
    );
    let started = Instant::now();
    let mut rows: Vec<Sample> = Vec::new();
    let mut last_updates = 0.0;
    let mut last_sessions = 0;
    let mut qemu_n = 0;
    let mut bus_killed = false;
    for minute in 1..=minutes {
        // Busy for the minute, watching how many viewers there are; QEMU's restart falls in the
        // middle of a busy minute, with viewers connected.
        let mut peak = 0.0f64;
        let restart = minute.is_multiple_of(qemu_every) && minute < minutes;
        let mut restarted = false;
        while started.elapsed() < Duration::from_secs(minute * 60 - 10) {
            std::thread::sleep(Duration::from_secs(2));
            peak = peak.max(metric_sum(&scrape(&metrics_s), "vdi_viewers"));
            if restart && !restarted && started.elapsed() >= Duration::from_secs(minute * 60 - 45) {
                restarted = true;
                // QEMU killed (SIGKILL by PID, as the OOM killer or a crash would) and started
                // again; once, in the middle of the run, the bus goes down with it.
                sh.qemu_up.store(false, Ordering::SeqCst);
                let attaches = metric_sum(&scrape(&metrics_s), "vdi_qemu_attaches_total");
                let _ = vm.proc.child.kill();
                let _ = vm.proc.wait_timeout(Duration::from_secs(10));
                if !bus_killed && minute >= minutes / 2 {
                    bus_killed = true;
                    let old = pids_with_cmdline(&bus_conf);
                    for p in &old {
                        let _ = std::process::Command::new("kill")
                            .args(["-KILL", &p.to_string()])
                            .status();
                    }
                    assert!(
                        wait_until(Duration::from_secs(30), || sc
                            .log()
                            .contains("bus restarted")),
                        "the bus was not restarted:\n{}",
                        sc.log()
                    );
                    println!("       (dbus-daemon {old:?} killed and restarted)");
                }
                qemu_n += 1;
                vm = start_qemu(&sc, qemu_n, &metrics_s, attaches);
                sh.qemu_restarts.fetch_add(1, Ordering::SeqCst);
                sh.qemu_up.store(true, Ordering::SeqCst);
                println!("       (QEMU #{qemu_n} started and attached)");
            }
        }
        // Quiet: no viewer left, then the sample.
        sh.paused.store(true, Ordering::SeqCst);
        let quiet = wait_until(Duration::from_secs(40), || {
            metric_sum(&scrape(&metrics_s), "vdi_viewers") == 0.0
        });
        std::thread::sleep(Duration::from_secs(2));
        let s = sample(pid, &metrics_s);
        let sessions: u64 = sh
            .tally
            .kinds
            .lock()
            .expect("tally")
            .values()
            .map(|v| v.0)
            .sum();
        println!(
            "{minute:>6} {:>8.1} {:>5} {:>7} {:>6} {:>8} {:>9.1} {:>8}{}",
            s.rss_mib,
            s.fds,
            s.threads,
            s.tasks,
            peak,
            (s.updates - last_updates) / 60.0,
            sessions - last_sessions,
            if quiet {
                ""
            } else {
                "  (viewers still counted)"
            }
        );
        assert!(quiet, "viewers still counted after everyone left");
        last_updates = s.updates;
        last_sessions = sessions;
        rows.push(s);
        sh.paused.store(false, Ordering::SeqCst);
    }
    sh.stop.store(true, Ordering::SeqCst);
    let _ = rdp_thread.join();
    drop(rt);

    // The report.
    println!("\nviewer kind        sessions  needing a picture  pictures");
    for (kind, (n, needed, got)) in sh.tally.kinds.lock().expect("tally").iter() {
        println!("{kind:<18} {n:>8} {needed:>18} {got:>9}");
    }
    // (The log is plain text now; stripping colours keeps older binaries readable.)
    let log = strip_ansi(&sc.log());
    let rdp_over: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("RDP session over"))
        .collect();
    // A logged-in RDP session got a picture when the server sent it screen updates.
    let field = |l: &str, name: &str| -> Option<u64> {
        l.split(&format!(" {name}="))
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let rdp_ok: Vec<(u64, u64)> = rdp_over
        .iter()
        .filter(|l| l.contains("login=Succeeded"))
        .filter_map(|l| Some((field(l, "updates")?, field(l, "bytes_out")?)))
        .collect();
    let rdp_blank = rdp_ok.iter().filter(|(updates, _)| *updates == 0).count();
    let kib = rdp_ok.iter().map(|(_, b)| *b).sum::<u64>() / rdp_ok.len().max(1) as u64 / 1024;
    println!(
        "RDP sessions over: {} ({} logged in, {} without a screen update; {} KiB sent on average)",
        rdp_over.len(),
        rdp_ok.len(),
        rdp_blank,
        kib
    );
    let mut levels: BTreeMap<String, usize> = BTreeMap::new();
    for l in log.lines() {
        for level in [" ERROR ", " WARN "] {
            if let Some(at) = l.find(level) {
                // The message without time and spans: after the last span's "}: ".
                let msg = l[at..].rsplit("}: ").next().unwrap_or(&l[at..]);
                // Numbers vary from line to line; the kind of message does not.
                let msg: String = msg
                    .chars()
                    .take(90)
                    .map(|c| if c.is_ascii_digit() { '#' } else { c })
                    .collect();
                *levels.entry(format!("{}{msg}", level.trim())).or_default() += 1;
            }
        }
    }
    println!("\nwarnings and errors in the sidecar's log:");
    for (m, n) in &levels {
        println!("{n:>6}  {m}");
    }
    println!("QEMU restarts: {}", sh.qemu_restarts.load(Ordering::SeqCst));

    let first = rows.first().copied().unwrap_or_default();
    let last = rows.last().copied().unwrap_or_default();
    let within = |a: f64, b: f64| b <= (a * 1.10).ceil();
    assert!(within(first.rss_mib, last.rss_mib), "RSS grew");
    assert!(within(first.fds as f64, last.fds as f64), "fds grew");
    assert!(
        within(first.threads as f64, last.threads as f64),
        "threads grew"
    );
    assert!(within(first.tasks as f64, last.tasks as f64), "tasks grew");
    let missing = sh.tally.missing.lock().expect("tally").clone();
    assert!(
        missing.is_empty(),
        "viewers without a picture: {missing:#?}"
    );
    assert!(!rdp_ok.is_empty(), "no RDP session logged in");
    assert_eq!(
        rdp_blank, 0,
        "RDP sessions that logged in but got no picture"
    );
    let errors: Vec<_> = levels
        .keys()
        .filter(|m| m.starts_with("ERROR") && !m.contains("dbus-daemon exited"))
        .collect();
    assert!(
        errors.is_empty(),
        "errors beyond the injected faults: {errors:?}"
    );
    drop(vm);
}
