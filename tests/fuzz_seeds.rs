//! Every fuzz target (fuzz/fuzz_targets/) over its committed seeds (fuzz/seeds/<target>), in the
//! ordinary test build: what each target asserts (no panic, framing independent of how bytes
//! arrive, bounded output, idempotent rewrites, connections that end on their own) holds for
//! every seed on every CI run. Coverage-guided runs need the sanitizer build: `./ci/fuzz.sh`.
#![allow(clippy::unwrap_used, clippy::all)]

#[path = "../fuzz/fuzz_targets/audio_formats.rs"]
mod audio_formats;
#[path = "../fuzz/fuzz_targets/domain_rewrite.rs"]
mod domain_rewrite;
#[path = "../fuzz/fuzz_targets/hook_calls.rs"]
mod hook_calls;
#[path = "../fuzz/fuzz_targets/hook_http2.rs"]
mod hook_http2;
#[path = "../fuzz/fuzz_targets/qemu_frames.rs"]
mod qemu_frames;
#[path = "../fuzz/fuzz_targets/rdp_inbound.rs"]
mod rdp_inbound;
#[path = "../fuzz/fuzz_targets/rfb_messages.rs"]
mod rfb_messages;
#[path = "../fuzz/fuzz_targets/rfb_session.rs"]
mod rfb_session;
#[path = "../fuzz/fuzz_targets/web_http.rs"]
mod web_http;

#[test]
fn audio_formats_seeds() {
    replay("audio_formats", audio_formats::fuzz);
}

#[test]
fn domain_rewrite_seeds() {
    replay("domain_rewrite", domain_rewrite::fuzz);
}

#[test]
fn hook_calls_seeds() {
    replay("hook_calls", hook_calls::fuzz);
}

#[test]
fn hook_http2_seeds() {
    replay("hook_http2", hook_http2::fuzz);
}

#[test]
fn qemu_frames_seeds() {
    replay("qemu_frames", qemu_frames::fuzz);
}

#[test]
fn rdp_inbound_seeds() {
    replay("rdp_inbound", rdp_inbound::fuzz);
}

#[test]
fn rfb_messages_seeds() {
    replay("rfb_messages", rfb_messages::fuzz);
}

#[test]
fn rfb_session_seeds() {
    replay("rfb_session", rfb_session::fuzz);
}

#[test]
fn web_http_seeds() {
    replay("web_http", web_http::fuzz);
}

fn replay(target: &str, fuzz: fn(&[u8])) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let mut seeds: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "no seeds for {target}");
    for seed in &seeds {
        let data = std::fs::read(seed).unwrap();
        let started = std::time::Instant::now();
        fuzz(&data);
        // libFuzzer's -timeout in ci/fuzz.sh is 2 s; a debug build gets more.
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "{} took {:?}",
            seed.display(),
            started.elapsed()
        );
    }
    // Cut and corrupted versions of each seed too: what a mutation would try first.
    for seed in &seeds {
        let data = std::fs::read(seed).unwrap();
        for cut in [1, data.len() / 2, data.len().saturating_sub(1)] {
            fuzz(&data[..cut.min(data.len())]);
        }
        let mut flipped = data.clone();
        for i in (0..flipped.len()).step_by(7) {
            flipped[i] ^= 0x5a;
        }
        fuzz(&flipped);
    }
}
