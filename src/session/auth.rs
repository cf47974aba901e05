//! Credentials and failed-login limits shared by every front end: VNC (VNC authentication and
//! VeNCrypt Plain), the browser page (VNC authentication over WebSocket) and RDP (NLA or the
//! Client Info PDU). One [`Auth`] is shared by all listeners of a sidecar, so a client cannot get
//! more password guesses by switching protocols.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// VNC authentication only uses the first 8 bytes of a password; generated passwords are that
/// long so they work with every protocol.
pub const VNC_PASSWORD_LEN: usize = 8;

/// The user name RDP clients log in with when the operator named none (RDP needs one).
pub const DEFAULT_RDP_USER: &str = "vdi";

/// A user name (optional for VNC, where only VeNCrypt Plain carries one) and a password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: Option<String>,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Who may log in, and who has failed too often.
#[derive(Debug, Default)]
pub struct Auth {
    /// `None` only when the operator explicitly opted out of authentication.
    credentials: Option<Credentials>,
    pub limiter: LoginLimiter,
}

impl Auth {
    pub fn new(credentials: Option<Credentials>) -> Self {
        Self {
            credentials,
            limiter: LoginLimiter::default(),
        }
    }

    /// A password and no user name.
    pub fn password(password: impl Into<String>) -> Self {
        Self::new(Some(Credentials {
            username: None,
            password: password.into(),
        }))
    }

    /// A user name and a password.
    pub fn user_password(username: impl Into<String>, password: impl Into<String>) -> Self {
        Self::new(Some(Credentials {
            username: Some(username.into()),
            password: password.into(),
        }))
    }

    /// Nobody needs to log in (`--insecure-no-auth`).
    pub fn open() -> Self {
        Self::new(None)
    }

    pub fn with_limiter(mut self, limiter: LoginLimiter) -> Self {
        self.limiter = limiter;
        self
    }

    pub fn required(&self) -> bool {
        self.credentials.is_some()
    }

    pub fn credentials(&self) -> Option<&Credentials> {
        self.credentials.as_ref()
    }

    pub fn secret(&self) -> Option<&str> {
        self.credentials.as_ref().map(|c| c.password.as_str())
    }

    /// The user name RDP clients must give.
    pub fn rdp_username(&self) -> &str {
        self.credentials
            .as_ref()
            .and_then(|c| c.username.as_deref())
            .unwrap_or(DEFAULT_RDP_USER)
    }

    /// Checks a user name (when the protocol carries one and the operator set one) and a
    /// password, in constant time.
    pub fn check(&self, username: Option<&[u8]>, password: &[u8]) -> bool {
        let Some(c) = &self.credentials else {
            return true;
        };
        let user_ok = match (c.username.as_deref(), username) {
            (Some(want), Some(got)) => constant_time_eq(want.as_bytes(), got),
            _ => true,
        };
        let pass_ok = constant_time_eq(c.password.as_bytes(), password);
        user_ok & pass_ok
    }

    /// Whether `addr` may try to log in now (always, when no login is needed).
    pub fn allowed(&self, addr: IpAddr) -> bool {
        !self.required() || self.limiter.allowed(addr)
    }

    pub fn failed(&self, addr: IpAddr) {
        self.limiter.failed(addr);
    }

    pub fn succeeded(&self, addr: IpAddr) {
        self.limiter.succeeded(addr);
    }
}

/// The reason every front end gives a client that failed too often.
pub const RATE_LIMITED: &str = "too many failed logins; try again later";

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

/// Compares without an early exit.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Debug)]
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

    #[test]
    fn check_compares_user_only_when_both_sides_have_one() {
        let auth = Auth::new(Some(Credentials {
            username: Some("alice".into()),
            password: "secret".into(),
        }));
        assert!(auth.check(Some(b"alice"), b"secret"));
        assert!(auth.check(None, b"secret"));
        assert!(!auth.check(Some(b"bob"), b"secret"));
        assert!(!auth.check(Some(b"alice"), b"secre"));
        assert_eq!(auth.rdp_username(), "alice");
        assert_eq!(Auth::password("x").rdp_username(), DEFAULT_RDP_USER);
        let open = Auth::open();
        assert!(open.check(None, b"anything") && !open.required());
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..10 {
            open.failed(ip);
        }
        assert!(open.allowed(ip), "no login, no limit");
        assert!(!format!("{auth:?}").contains("secret"));
    }
}
