//! The shared failed-login limit for RDP. ironrdp checks the password itself, so we follow the
//! login from the bytes the transport sees: with NLA, a TSRequest carrying an errorCode (or a
//! HYBRID_EX "access denied") is a failed login and the client's first MCS PDU after CredSSP a
//! good one; with TLS security, the Client Info PDU's credentials are compared here. A client
//! that failed too often is answered like CredSSP answers a locked account
//! (`STATUS_ACCOUNT_LOCKED_OUT`, which mstsc and FreeRDP show as such) and never reaches ironrdp.

use std::net::SocketAddr;
use std::sync::Arc;

use ironrdp::pdu::mcs::McsMessage;
use ironrdp::pdu::rdp::ClientInfoPdu;
use ironrdp::pdu::x224::X224;
use tracing::{info, warn};

use super::Security;
use super::framing::{CredsspOut, CredsspWatch, ntstatus, ts_request_refusal, ts_request_status};
use crate::metrics::{Login as Attempt, Protocol};
use crate::session::audit;
use crate::session::auth::Auth;

/// Where the login stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Pending,
    Succeeded,
    Failed,
    /// Refused before trying: too many failures from this address.
    Limited,
    /// Refused before trying: the sidecar is at its memory limit.
    OverBudget,
}

/// One connection's login, as the transport sees it.
pub struct Login {
    auth: Arc<Auth>,
    peer: SocketAddr,
    security: Security,
    credssp_started: bool,
    out: CredsspWatch,
    outcome: Outcome,
    over_budget: bool,
}

impl Login {
    pub fn new(auth: Arc<Auth>, peer: SocketAddr, security: Security) -> Self {
        Self {
            auth,
            peer,
            security,
            credssp_started: false,
            out: CredsspWatch::default(),
            outcome: Outcome::Pending,
            over_budget: false,
        }
    }

    /// The viewer must be turned away: the memory budget has no room for it. NLA clients are
    /// told `STATUS_NO_MEMORY` in CredSSP (FreeRDP logs the status), TLS clients are closed.
    pub fn refuse_over_budget(mut self) -> Self {
        self.over_budget = true;
        self
    }

    pub fn outcome(&self) -> Outcome {
        self.outcome
    }

    fn settle(&mut self, outcome: Outcome) {
        if self.outcome != Outcome::Pending {
            return;
        }
        self.outcome = outcome;
        let counted = match outcome {
            Outcome::Succeeded => Some(Attempt::Ok),
            Outcome::Failed => Some(Attempt::Failed),
            Outcome::Limited => Some(Attempt::Limited),
            Outcome::OverBudget => Some(Attempt::OverBudget),
            Outcome::Pending => None,
        };
        if let Some(c) = counted {
            let user = self.auth.rdp_username().to_owned();
            audit::login(Protocol::Rdp, self.peer, Some(&user), c);
        }
        match outcome {
            Outcome::Succeeded => self.auth.succeeded(self.peer.ip()),
            Outcome::Failed => {
                self.auth.failed(self.peer.ip());
                warn!("RDP login failed");
            }
            Outcome::Limited => info!("RDP client refused: too many failed logins"),
            Outcome::OverBudget => warn!("RDP client refused: memory limit"),
            Outcome::Pending => {}
        }
    }

    /// The client's first TSRequest is about to reach ironrdp. `Some(reply)` when the client is
    /// refused: write the reply instead and close.
    pub fn credssp_request(&mut self, der: &[u8]) -> Option<Vec<u8>> {
        if self.credssp_started {
            return None;
        }
        self.credssp_started = true;
        let status = if self.over_budget {
            self.settle(Outcome::OverBudget);
            ntstatus::NO_MEMORY
        } else if !self.auth.allowed(self.peer.ip()) {
            self.settle(Outcome::Limited);
            ntstatus::ACCOUNT_LOCKED_OUT
        } else {
            return None;
        };
        // Answer in the client's CredSSP version (errorCode exists from version 3 on).
        let version = ts_request_status(der).map_or(6, |(v, _)| v.clamp(3, 6));
        Some(ts_request_refusal(version, status))
    }

    /// Bytes ironrdp wrote before the MCS connection (CredSSP replies).
    pub fn server_wrote(&mut self, bytes: &[u8]) {
        if !self.credssp_started || self.outcome != Outcome::Pending {
            return;
        }
        for msg in self.out.advance(bytes) {
            match msg {
                CredsspOut::TsRequest(Some(_)) | CredsspOut::EarlyAuthResult(5) => {
                    self.settle(Outcome::Failed)
                }
                CredsspOut::EarlyAuthResult(0) => self.settle(Outcome::Succeeded),
                _ => {}
            }
        }
    }

    /// An inbound TPKT (the MCS connection). `false` when the client is refused and the
    /// connection must close.
    pub fn tpkt(&mut self, tpkt: &[u8]) -> bool {
        if self.over_budget {
            self.settle(Outcome::OverBudget);
            return false;
        }
        match self.security {
            Security::Nla => {
                if self.credssp_started {
                    // CredSSP is over and the client goes on: its password was right.
                    self.settle(Outcome::Succeeded);
                }
                !matches!(self.outcome, Outcome::Limited | Outcome::OverBudget)
            }
            Security::Tls => self.client_info(tpkt),
        }
    }

    /// TLS security: the Client Info PDU (the first Send Data Request) carries the password.
    fn client_info(&mut self, tpkt: &[u8]) -> bool {
        if self.outcome != Outcome::Pending || !self.auth.required() {
            return self.outcome != Outcome::Limited;
        }
        let Ok(X224(McsMessage::SendDataRequest(req))) =
            ironrdp::core::decode::<X224<McsMessage<'_>>>(tpkt)
        else {
            return true;
        };
        if !self.auth.allowed(self.peer.ip()) {
            self.settle(Outcome::Limited);
            return false;
        }
        let Ok(info) = ironrdp::core::decode::<ClientInfoPdu>(req.user_data.as_ref()) else {
            // Not a Client Info PDU: ironrdp will refuse it.
            self.settle(Outcome::Failed);
            return true;
        };
        let creds = &info.client_info.credentials;
        let ok = self
            .auth
            .check(Some(creds.username.as_bytes()), creds.password.as_bytes())
            && creds.username == self.auth.rdp_username();
        self.settle(if ok {
            Outcome::Succeeded
        } else {
            Outcome::Failed
        });
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::auth::LoginLimiter;

    fn login(auth: &Arc<Auth>) -> Login {
        Login::new(
            Arc::clone(auth),
            "10.1.2.3:50000".parse().unwrap(),
            Security::Nla,
        )
    }

    const CLIENT_HELLO: [u8; 7] = [0x30, 0x05, 0xa0, 0x03, 0x02, 0x01, 0x06];

    #[test]
    fn error_replies_count_and_the_limit_refuses_in_the_clients_version() {
        let auth = Arc::new(
            Auth::password("pw")
                .with_limiter(LoginLimiter::new(2, std::time::Duration::from_secs(60))),
        );
        for _ in 0..2 {
            let mut l = login(&auth);
            assert_eq!(l.credssp_request(&CLIENT_HELLO), None);
            l.server_wrote(&ts_request_refusal(6, ntstatus::LOGON_FAILURE));
            assert_eq!(l.outcome(), Outcome::Failed);
        }
        let mut l = login(&auth);
        let refusal = l.credssp_request(&CLIENT_HELLO).expect("refused");
        assert_eq!(
            ts_request_status(&refusal),
            Some((6, Some(ntstatus::ACCOUNT_LOCKED_OUT)))
        );
        assert_eq!(l.outcome(), Outcome::Limited);
        assert!(!l.tpkt(&[3, 0, 0, 7, 2, 0xf0, 0x80]));
    }

    #[test]
    fn going_on_to_mcs_is_a_success_and_clears_failures() {
        let auth = Arc::new(
            Auth::password("pw")
                .with_limiter(LoginLimiter::new(2, std::time::Duration::from_secs(60))),
        );
        let mut bad = login(&auth);
        bad.credssp_request(&CLIENT_HELLO);
        bad.server_wrote(&5u32.to_le_bytes()); // HYBRID_EX: access denied
        assert_eq!(bad.outcome(), Outcome::Failed);
        let mut good = login(&auth);
        assert_eq!(good.credssp_request(&CLIENT_HELLO), None);
        assert!(good.tpkt(&[3, 0, 0, 7, 2, 0xf0, 0x80]));
        assert_eq!(good.outcome(), Outcome::Succeeded);
        // The failure was forgotten: two more are allowed before the limit.
        for _ in 0..2 {
            let mut l = login(&auth);
            assert_eq!(l.credssp_request(&CLIENT_HELLO), None);
            l.server_wrote(&ts_request_refusal(6, ntstatus::LOGON_FAILURE));
        }
        assert!(login(&auth).credssp_request(&CLIENT_HELLO).is_some());
    }
}
