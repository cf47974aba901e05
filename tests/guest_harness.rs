//! The test guest itself: it boots, draws, and plays a known tone through its sound card (checked
//! here with QEMU's wav audio backend, independent of our code).

mod common;

use std::time::Duration;

use common::qemu::{Video, Vm};

/// (sample rate, channels, interleaved s16 samples) from a RIFF/WAVE file.
fn read_wav(data: &[u8]) -> (u32, u16, Vec<i16>) {
    assert_eq!(&data[0..4], b"RIFF");
    assert_eq!(&data[8..12], b"WAVE");
    let mut pos = 12;
    let (mut rate, mut channels, mut samples) = (0, 0, Vec::new());
    while pos + 8 <= data.len() {
        let id = &data[pos..pos + 4];
        let len = u32::from_le_bytes(data[pos + 4..pos + 8].try_into().expect("len")) as usize;
        let body = &data[pos + 8..(pos + 8 + len).min(data.len())];
        if id == b"fmt " {
            channels = u16::from_le_bytes([body[2], body[3]]);
            rate = u32::from_le_bytes(body[4..8].try_into().expect("rate"));
        } else if id == b"data" {
            samples = body
                .chunks_exact(2)
                .map(|b| i16::from_le_bytes([b[0], b[1]]))
                .collect();
        }
        pos += 8 + len;
    }
    (rate, channels, samples)
}

#[test]
fn guest_plays_a_known_tone() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The harness needs a bus for -display dbus; a private daemon is enough here.
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let bus = rt
        .block_on(vdi_sidecar::bus::Bus::start(
            vdi_sidecar::bus::BusConfig::in_dir(dir.path().join("bus")),
        ))
        .expect("bus");
    let wav = dir.path().join("out.wav");
    let mut vm = Vm::start_with(
        dir.path(),
        bus.address(),
        Video::StdVga,
        &[
            "-audiodev",
            &format!("wav,id=snd0,path={},out.frequency=48000", wav.display()),
            "-device",
            "intel-hda",
            "-device",
            "hda-duplex,audiodev=snd0",
        ],
    );
    vm.wait_ready();
    let line = vm.guest("tone 1000 2000");
    eprintln!("guest: {line}");
    let quit = vm.qmp_cmd(r#"{"execute":"quit"}"#);
    assert!(quit.contains("return"), "{quit}");
    assert!(
        vm.proc.wait_timeout(Duration::from_secs(10)).is_some(),
        "QEMU did not quit"
    );
    let (rate, channels, samples) = read_wav(&std::fs::read(&wav).expect("wav"));
    assert_eq!((rate, channels), (48000, 2));
    let left: Vec<i16> = samples.iter().step_by(2).copied().collect();
    // The tone: samples above a threshold, and the frequency from zero crossings within them.
    let loud: Vec<usize> = (0..left.len())
        .filter(|&i| left[i].unsigned_abs() > 3000)
        .collect();
    let (first, last) = (
        *loud.first().expect("no sound"),
        *loud.last().expect("no sound"),
    );
    let seconds = (last - first) as f64 / f64::from(rate);
    let mut crossings = 0;
    for i in first + 1..=last {
        if (left[i - 1] < 0) != (left[i] < 0) {
            crossings += 1;
        }
    }
    let freq = f64::from(crossings) / 2.0 / seconds;
    assert!(
        (freq - 1000.0).abs() < 10.0,
        "dominant frequency {freq:.1} Hz"
    );
    assert!((seconds - 2.0).abs() < 0.2, "tone lasted {seconds:.2} s");
    rt.block_on(bus.stop());
}
