//! VNC authentication (RFC 6143 §7.2.2): DES challenge-response with the password as key.
//! Credentials and the failed-login limit are shared with the other front ends
//! ([`crate::session::auth`]).

use des::Des;
use des::cipher::{BlockEncrypt, KeyInit, generic_array::GenericArray};

/// A fresh 16-byte challenge.
pub fn challenge() -> [u8; 16] {
    let mut c = [0u8; 16];
    // On failure the challenge is still unpredictable enough to not be all zeros twice.
    if getrandom::fill(&mut c).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        c.copy_from_slice(&t.to_le_bytes());
    }
    c
}

/// The response a client holding `password` sends to `challenge`: DES-ECB with the password as
/// key, each key byte bit-reversed (the historical VNC quirk).
pub fn vnc_response(password: &str, challenge: &[u8; 16]) -> [u8; 16] {
    let mut key = [0u8; 8];
    for (k, p) in key.iter_mut().zip(password.as_bytes()) {
        *k = p.reverse_bits();
    }
    let cipher = Des::new(GenericArray::from_slice(&key));
    let mut out = *challenge;
    for block in out.chunks_exact_mut(8) {
        cipher.encrypt_block(GenericArray::from_mut_slice(block));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn des_response_matches_a_known_vector() {
        // Interoperability is shown by real clients in tests/vnc.rs; here: deterministic,
        // password-dependent, and only 8 characters count.
        let challenge: [u8; 16] = core::array::from_fn(|i| i as u8);
        let r = vnc_response("password", &challenge);
        let again = vnc_response("password", &challenge);
        assert_eq!(r, again);
        assert_ne!(r, vnc_response("passwore", &challenge));
        // Only 8 characters count.
        assert_eq!(vnc_response("password-long", &challenge), r);
    }
}
