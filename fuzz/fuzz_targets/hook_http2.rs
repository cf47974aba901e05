//! The hook socket's HTTP/2 `:authority` rewriter (frames and HPACK from virt-launcher, before
//! tonic sees them): fed in any pieces it gives the same output, or the same error, as fed
//! whole, and its buffers stay bounded.
// Built by cargo-fuzz (`--cfg fuzzing`) as a libFuzzer target; included by tests/fuzz_seeds.rs
// as a module whose `fuzz` replays the committed seeds in the ordinary test run.
#![cfg_attr(fuzzing, no_main)]

use bytes::BytesMut;
use vdi_sidecar::hook::authority::Rewriter;

fn run(data: &[u8], chunk: usize) -> (BytesMut, bool) {
    let mut rw = Rewriter::default();
    let mut out = BytesMut::new();
    for piece in data.chunks(chunk.max(1)) {
        if rw.feed(piece, &mut out).is_err() {
            return (out, true);
        }
    }
    (out, false)
}

/// fluke-hpack 0.3.1 panics on some truncated blocks; the rewriter contains that panic and
/// turns it into the connection's error (src/hook/authority.rs). libFuzzer's panic hook would
/// abort on it anyway, so that one known panic is let through to the rewriter's catch_unwind;
/// any other panic still aborts and is a finding.
fn allow_known_upstream_panic() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let fuzzer_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let upstream = info.location().is_some_and(|l| {
                l.file().contains("fluke-hpack") && l.file().ends_with("decoder.rs")
            });
            if !upstream {
                fuzzer_hook(info);
            }
        }));
    });
}

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|input: &[u8]| fuzz(input));

/// One input.
pub fn fuzz(input: &[u8]) {
    allow_known_upstream_panic();
    let Some((&knobs, data)) = input.split_first() else {
        return;
    };
    let (whole, whole_err) = run(data, data.len());
    let (cut, cut_err) = run(data, usize::from(knobs) + 1);
    assert_eq!(
        whole_err, cut_err,
        "an error depends on how the bytes arrived"
    );
    if !whole_err {
        assert_eq!(whole, cut, "output depends on how the bytes arrived");
    }
    // A re-encoded header block is never much larger than the one it replaces.
    assert!(
        whole.len() <= data.len() * 40 + 4096,
        "{} from {}",
        whole.len(),
        data.len()
    );
}
