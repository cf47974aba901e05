//! Guest sound over RDP (rdpsnd) from the real guest: QEMU's D-Bus audio → our listener →
//! FreeRDP 3, which plays it through PulseAudio into a null sink that we record. The recording
//! must hold the guest's 1 kHz tone for its 2 s, while a second client that stopped reading
//! (SIGSTOP) is connected and neither it nor the guest holds anything up. And the way back: a
//! microphone (a PulseAudio sine source) through FreeRDP's AUDIO_INPUT channel to the guest,
//! which records it and reports its pitch.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::Proc;
use common::pulse::{MIC, Pulse, SINK, samples};
use common::qemu::{AUDIO_ARGS, Rig, Video};
use common::rdp::{config, serve};
use common::x11::Xvfb;
use vdi_sidecar::session::Desktop;

fn freerdp(port: u16, x: &Xvfb, pulse: &Pulse, sound: &str, log: &std::path::Path) -> Proc {
    pulse.freerdp(port, x, &[&format!("/sound:{sound}")], log)
}

/// FreeRDP takes the first format we offer, Opus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freerdp_plays_the_guest_tone_in_opus_while_a_stalled_client_is_connected() {
    let (pcm_bytes, wire_bytes) = plays_the_tone("").await;
    // 96 kbit/s against 1536 kbit/s of PCM.
    assert!(
        wire_bytes * 12 < pcm_bytes,
        "{wire_bytes} bytes on the wire for {pcm_bytes} of PCM: not Opus"
    );
}

/// A client limited to PCM (`format:1`) gets 48 kHz s16 stereo as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freerdp_plays_the_guest_tone_in_pcm_while_a_stalled_client_is_connected() {
    let (pcm_bytes, wire_bytes) = plays_the_tone(",format:1").await;
    assert_eq!(wire_bytes, pcm_bytes, "PCM goes out as it is");
}

/// Plays the tone with both clients' sound options ending in `extra`; returns the PCM bytes
/// handed to rdpsnd and the bytes of the waves on the wire.
async fn plays_the_tone(extra: &'static str) -> (u64, u64) {
    let rig = Rig::start().await;
    let cfg = config();
    let stats = std::sync::Arc::clone(&cfg.stats);
    let (port, stop) = serve(cfg, Desktop::primary(&rig.consoles));
    let mut vm = rig.vm_with(Video::StdVga, AUDIO_ARGS);
    let dir = rig.dir.path().to_path_buf();
    let (vm, recorded, tone_line, log_text) = tokio::task::spawn_blocking(move || {
        vm.wait_ready();
        let x = Xvfb::start();
        let pulse = Pulse::start(440);
        let log = dir.join("xfreerdp-audio.log");
        let live = freerdp(
            port,
            &x,
            &pulse,
            &format!("sys:pulse,dev:{SINK}{extra}"),
            &log,
        );
        let stalled = freerdp(
            port,
            &x,
            &pulse,
            &format!("sys:fake{extra}"),
            &dir.join("xfreerdp-stalled.log"),
        );
        // Both logged in and their sound channels negotiated before the guest plays.
        std::thread::sleep(Duration::from_secs(8));
        stalled.signal("STOP");
        let wav = dir.join("heard.raw");
        let mut rec = pulse.record(&wav);
        std::thread::sleep(Duration::from_millis(500));
        // FreeRDP's PulseAudio backend opens its stream on the first wave and drops what comes
        // before the stream is ready ("pulse->stream=(nil)"): a short first sound at another
        // pitch, then the measured tone.
        let warm = vm.guest("tone 500 500");
        assert!(warm.contains("OK tone"), "{warm}");
        std::thread::sleep(Duration::from_secs(1));
        let tone_line = vm.guest("tone 1000 2000");
        std::thread::sleep(Duration::from_secs(3));
        rec.signal("INT");
        rec.wait_timeout(Duration::from_secs(5));
        stalled.signal("CONT");
        drop((live, stalled));
        let recorded = std::fs::read(&wav).unwrap_or_default();
        let log_text = std::fs::read_to_string(&log).unwrap_or_default();
        (vm, recorded, tone_line, log_text)
    })
    .await
    .expect("play");
    assert!(tone_line.contains("OK tone"), "{tone_line}");
    // The guest wrote its 2 s of sound in about 2 s: nobody blocked its sound card.
    let guest_ms: f64 = tone_line
        .rsplit_once(" ms ")
        .and_then(|(_, t)| t.trim_end_matches(" ms").parse().ok())
        .unwrap_or(f64::MAX);
    assert!(guest_ms < 2600.0, "the guest's tone took {guest_ms} ms");
    let pcm = samples(&recorded);
    assert!(
        pcm.iter().any(|s| s.abs() > 0.1),
        "nothing audible recorded ({} bytes); client log:\n{log_text}",
        recorded.len()
    );
    let (hz, secs) = common::tone(common::pulse::pitch_run(&pcm, 1000), 48000);
    eprintln!(
        "rdpsnd{extra} through FreeRDP + PulseAudio: {hz:.1} Hz for {secs:.2} s; {} bytes of PCM, \
         {} on the wire, {} waves dropped",
        stats.audio_bytes.load(Ordering::Relaxed),
        stats.audio_wire_bytes.load(Ordering::Relaxed),
        stats.audio_dropped.load(Ordering::Relaxed)
    );
    let (mean, max, waves) = stats.audio_wait.summary();
    eprintln!(
        "sound waited in our server {mean:.1} ms on average, {max:.1} ms at most ({waves} waves)"
    );
    assert!((hz - 1000.0).abs() < 10.0, "heard {hz:.1} Hz");
    assert!((secs - 2.0).abs() < 0.2, "heard {secs:.2} s");
    drop(vm);
    stop.cancel();
    rig.stop().await;
    (
        stats.audio_bytes.load(Ordering::Relaxed),
        stats.audio_wire_bytes.load(Ordering::Relaxed),
    )
}

/// A value after `key` in the guest's `OK record …` line.
fn field(line: &str, key: &str) -> f64 {
    line.split_whitespace()
        .skip_while(|w| *w != key)
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guest_records_the_rdp_clients_microphone() {
    const MIC_HZ: u32 = 700;
    let rig = Rig::start().await;
    let (port, stop) = serve(config(), Desktop::primary(&rig.consoles));
    let mic = Desktop::primary(&rig.consoles).mic;
    let mut vm = rig.vm_with(Video::StdVga, AUDIO_ARGS);
    let dir = rig.dir.path().to_path_buf();
    let (vm, line, log_text) = tokio::task::spawn_blocking(move || {
        vm.wait_ready();
        let x = Xvfb::start();
        let pulse = Pulse::start(MIC_HZ);
        let log = dir.join("xfreerdp-mic.log");
        let client = pulse.freerdp(
            port,
            &x,
            &[
                "/sound:sys:fake",
                &format!("/microphone:sys:pulse,dev:{MIC}"),
            ],
            &log,
        );
        std::thread::sleep(Duration::from_secs(8));
        let line = vm.guest("record 2000");
        drop(client);
        let log_text = std::fs::read_to_string(&log).unwrap_or_default();
        (vm, line, log_text)
    })
    .await
    .expect("record");
    assert!(
        line.contains("OK record"),
        "{line}\nclient log:\n{log_text}"
    );
    let (hz, sound_ms) = (field(&line, "freq"), field(&line, "sound"));
    let (pushed, dropped, underruns) = mic.counters();
    eprintln!(
        "microphone through FreeRDP: the guest heard {hz:.1} Hz for {sound_ms} ms; \
         {pushed} bytes to the guest, {dropped} dropped, {underruns} underruns"
    );
    assert!(
        (hz - f64::from(MIC_HZ)).abs() < f64::from(MIC_HZ) / 100.0,
        "the guest heard {hz:.1} Hz: {line}\nclient log:\n{log_text}"
    );
    assert!(sound_ms > 1800.0, "{line}");
    drop(vm);
    stop.cancel();
    rig.stop().await;
}
