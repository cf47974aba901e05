//! The session audit trail: who was connected to this VM, when, how, and why it ended. One event
//! (tracing target `audit`) per session start, session end and refused login, with the same
//! fields whatever the protocol; `--log-format json` makes each one JSON line an operator's log
//! pipeline can keep. Every login attempt is counted in [`crate::metrics`] here too, so the log
//! and `/metrics` cannot disagree.

use std::net::SocketAddr;
use std::time::Instant;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tracing::info;

use super::stats::{Counters, ViewerStats};
use crate::h264::record::{Recorder, Recording};
use crate::metrics::{self, Login, Protocol};

fn now() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default()
}

fn vm() -> String {
    metrics::global().vm_name()
}

/// A login attempt ended `outcome` (counted; a refusal is also an audit event).
pub fn login(protocol: Protocol, peer: SocketAddr, user: Option<&str>, outcome: Login) {
    metrics::global().login(protocol, outcome);
    if outcome != Login::Ok {
        info!(
            target: "audit",
            event = "login_refused",
            vm = %vm(),
            protocol = protocol.name(),
            peer = %peer,
            user = user.unwrap_or(""),
            outcome = outcome.name(),
            at = %now(),
            "login refused"
        );
    }
}

/// One viewer session from login to its end. Ending it without [`SessionAudit::end`] (the
/// session's task was dropped: the sidecar is shutting down) records that as the reason.
pub struct SessionAudit {
    protocol: Protocol,
    peer: SocketAddr,
    user: String,
    shared: bool,
    start: String,
    started: Instant,
    stats: ViewerStats,
    ended: bool,
    _viewer: metrics::ViewerGuard,
    /// The session's recording (`--record-dir`), stopped with the session.
    recording: Option<Recording>,
}

impl SessionAudit {
    /// A viewer logged in; it counts as connected (`vdi_viewers`) until this ends.
    pub fn start(
        protocol: Protocol,
        peer: SocketAddr,
        user: Option<&str>,
        shared: bool,
        stats: &ViewerStats,
    ) -> Self {
        let a = Self {
            protocol,
            peer,
            user: user.unwrap_or("").to_owned(),
            shared,
            start: now(),
            started: Instant::now(),
            stats: stats.clone(),
            ended: false,
            _viewer: metrics::global().viewer(protocol),
            recording: None,
        };
        info!(
            target: "audit",
            event = "session_start",
            vm = %vm(),
            protocol = protocol.name(),
            peer = %peer,
            user = %a.user,
            shared,
            start = %a.start,
            "session started"
        );
        a
    }

    /// Records the console while this session lasts, into a file named after it (start, VM,
    /// protocol, peer, user).
    pub fn record(mut self, recorder: Option<&Recorder>) -> Self {
        if let Some(r) = recorder {
            let start = self.start.replace(':', "");
            let (vm, peer) = (vm(), self.peer.to_string());
            let rec = r.start(&[&start, &vm, self.protocol.name(), &peer, &self.user]);
            info!(target: "audit", event = "recording", path = %rec.path.display(), "session recorded");
            self.recording = Some(rec);
        }
        self
    }

    /// The session ended for `reason` (the client left, reset, was preempted, …).
    pub fn end(mut self, reason: &str) {
        self.log(reason);
    }

    fn log(&mut self, reason: &str) {
        self.ended = true;
        let own = self.stats.own();
        info!(
            target: "audit",
            event = "session_end",
            vm = %vm(),
            protocol = self.protocol.name(),
            peer = %self.peer,
            user = %self.user,
            shared = self.shared,
            start = %self.start,
            end = %now(),
            duration_secs = self.started.elapsed().as_secs_f64(),
            bytes_out = Counters::get(&own.bytes_out),
            bytes_in = Counters::get(&own.bytes_in),
            reason,
            "session ended"
        );
    }
}

impl Drop for SessionAudit {
    fn drop(&mut self) {
        if !self.ended {
            self.log("sidecar shutdown");
        }
    }
}

/// The reason for a connection that ended in an I/O error: resets named as such.
pub fn io_reason(e: &std::io::Error) -> String {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionReset | ConnectionAborted | BrokenPipe => "client reset".into(),
        UnexpectedEof => "client disconnected".into(),
        _ => format!("connection error: {e}"),
    }
}
