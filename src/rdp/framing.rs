//! RDP byte framing, without I/O: where each PDU on the wire ends, in both directions.
//!
//! Inbound we frame (and bound) every PDU before ironrdp sees it: TPKT (slow path, X.224 over
//! TCP), CredSSP TSRequests (DER) during NLA, and fast-path input, whose first bytes overlap
//! with DER's once the MCS connection has started. Outbound we follow ironrdp's PDUs so that PDUs
//! of ours go between them, and we read the CredSSP results it sends to learn whether a login
//! failed. Every length is checked before anything is buffered.

/// Largest CredSSP message accepted (NTLM needs a few KiB; Kerberos tickets more).
pub const MAX_DER: usize = 256 * 1024;
/// Bytes buffered while waiting for the rest of a PDU (a TPKT is at most 64 KiB).
pub const MAX_BUFFERED: usize = MAX_DER + 16 * 1024;

/// A TPKT header's total length (RFC 1006: version 3, reserved, 16-bit length), once four bytes
/// are there.
pub fn tpkt_len(head: &[u8]) -> Option<usize> {
    match head {
        [3, _, hi, lo, ..] => Some(usize::from(u16::from_be_bytes([*hi, *lo]))),
        _ => None,
    }
}

/// A fast-path PDU's total length and header size (1- or 2-byte length after the action
/// byte); `None` if more bytes are needed.
fn fast_path_len(head: &[u8]) -> Option<(usize, usize)> {
    let &l0 = head.get(1)?;
    if l0 & 0x80 == 0 {
        return Some((usize::from(l0), 2));
    }
    let &l1 = head.get(2)?;
    Some((usize::from(l0 & 0x7f) << 8 | usize::from(l1), 3))
}

/// A DER element's (tag, content length, header size), `Ok(None)` if more bytes are needed.
/// Lengths up to three bytes (16 MiB) are read; callers bound the total.
fn der_header(buf: &[u8]) -> Result<Option<(u8, usize, usize)>, ()> {
    let (Some(&tag), Some(&l0)) = (buf.first(), buf.get(1)) else {
        return Ok(None);
    };
    if l0 < 0x80 {
        return Ok(Some((tag, usize::from(l0), 2)));
    }
    let n = usize::from(l0 & 0x7f);
    if n == 0 || n > 3 {
        return Err(());
    }
    let Some(bytes) = buf.get(2..2 + n) else {
        return Ok(None);
    };
    let len = bytes
        .iter()
        .fold(0usize, |acc, b| acc << 8 | usize::from(*b));
    Ok(Some((tag, len, 2 + n)))
}

/// One framed inbound PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pdu {
    /// Slow-path (X.224 over TPKT): passed to ironrdp.
    Tpkt(usize),
    /// A CredSSP TSRequest (DER SEQUENCE): passed to ironrdp.
    Der(usize),
    /// Fast-path input: handed to the session's input task.
    FastPathInput(usize),
}

impl Pdu {
    pub fn size(self) -> usize {
        match self {
            Pdu::Tpkt(n) | Pdu::Der(n) | Pdu::FastPathInput(n) => n,
        }
    }
}

#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("TPKT length {0} is shorter than its header")]
    ShortTpkt(usize),
    #[error("CredSSP message of {0} bytes is too large or badly encoded")]
    BadDer(usize),
    #[error("fast-path length {0} is shorter than its header")]
    ShortFastPath(usize),
    #[error("encrypted fast-path input inside TLS")]
    EncryptedFastPath,
    #[error("CredSSP message after the MCS connection started")]
    LateDer,
    #[error("unknown PDU header byte {0:#04x}")]
    Unknown(u8),
}

/// Frames the PDU at the start of `buf`: `Ok(None)` if more bytes are needed. `mcs_started` says
/// a TPKT has been seen, after which no CredSSP message may come (their first bytes overlap
/// with fast-path headers).
pub fn next_pdu(buf: &[u8], mcs_started: bool) -> Result<Option<Pdu>, FrameError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if first == 0x03 {
        let Some(len) = tpkt_len(buf) else {
            return Ok(None);
        };
        // 4 (TPKT) + 3 (the shortest X.224 header).
        if len < 7 {
            return Err(FrameError::ShortTpkt(len));
        }
        return Ok(Some(Pdu::Tpkt(len)));
    }
    if first == 0x30 && !mcs_started {
        return match der_header(buf) {
            Ok(None) => Ok(None),
            Ok(Some((_, len, header))) if len + header <= MAX_DER => {
                Ok(Some(Pdu::Der(len + header)))
            }
            Ok(Some((_, len, header))) => Err(FrameError::BadDer(len + header)),
            Err(()) => Err(FrameError::BadDer(0)),
        };
    }
    if first & 0x03 == 0 {
        // Bits 6-7 are the encryption flags: inside TLS nothing may be encrypted again.
        if first >> 6 != 0 {
            return Err(FrameError::EncryptedFastPath);
        }
        let Some((len, header)) = fast_path_len(buf) else {
            return Ok(None);
        };
        // numEvents of 0 in the header means a separate count byte follows; then one event.
        let count_byte = usize::from((first >> 2) & 0x0f == 0);
        if len < header + count_byte + 1 {
            return Err(FrameError::ShortFastPath(len));
        }
        return Ok(Some(Pdu::FastPathInput(len)));
    }
    if first == 0x30 {
        return Err(FrameError::LateDer);
    }
    Err(FrameError::Unknown(first))
}

/// Follows one TPKT whose bytes pass by in pieces (the X.224 Connection Request and Confirm,
/// before TLS): how many bytes are left of it once its header told its length.
#[derive(Debug, Default, Clone)]
pub struct TpktProgress {
    seen: usize,
    head: [u8; 4],
    len: Option<usize>,
}

impl TpktProgress {
    /// Accounts for bytes of the TPKT (and anything after it, which is not counted).
    pub fn advance(&mut self, bytes: &[u8]) {
        for (i, b) in bytes.iter().enumerate() {
            if let Some(slot) = self.head.get_mut(self.seen + i) {
                *slot = *b;
            }
        }
        self.seen += bytes.len();
        if self.len.is_none() && self.seen >= 4 {
            // A bogus length below the header's own is treated as just the header.
            self.len = Some(tpkt_len(&self.head).unwrap_or(4).max(4));
        }
    }

    /// Bytes still to come before the TPKT is complete (at least its header, while unknown).
    pub fn remaining(&self) -> usize {
        match self.len {
            None => 4 - self.seen.min(4),
            Some(len) => len.saturating_sub(self.seen),
        }
    }

    pub fn complete(&self) -> bool {
        self.len.is_some_and(|len| self.seen >= len)
    }
}

/// Length of the outbound PDU whose first bytes are `head`: `Ok(None)` if more are needed.
fn out_pdu_len(head: &[u8]) -> Result<Option<usize>, ()> {
    let Some(&b0) = head.first() else {
        return Ok(None);
    };
    if b0 == 0x03 {
        return match tpkt_len(head) {
            None => Ok(None),
            Some(len) if len >= 4 => Ok(Some(len)),
            Some(_) => Err(()),
        };
    }
    if b0 & 0x03 == 0 {
        return match fast_path_len(head) {
            None => Ok(None),
            Some((len, _)) if len >= 2 => Ok(Some(len)),
            Some(_) => Err(()),
        };
    }
    Err(())
}

/// Where ironrdp's output stands, so that PDUs of ours are written between its PDUs, never
/// inside one. ironrdp writes TPKTs and fast-path output PDUs; their headers give the length.
#[derive(Debug, Default)]
pub struct OutFrames {
    /// Tracking since the client's first MCS PDU: everything before it (CredSSP, the early
    /// authorization result) has been written by then, and is framed differently.
    pub active: bool,
    /// Bytes left of the PDU being written.
    left: usize,
    /// Header bytes of the next PDU seen so far (its length not yet known).
    head: Vec<u8>,
    /// Output we could not frame: nothing is injected any more.
    pub lost: bool,
}

impl OutFrames {
    pub fn at_boundary(&self) -> bool {
        self.active && !self.lost && self.left == 0 && self.head.is_empty()
    }

    /// Accounts for `bytes` written by ironrdp.
    pub fn advance(&mut self, mut bytes: &[u8]) {
        if !self.active {
            return;
        }
        while !bytes.is_empty() && !self.lost {
            if self.left > 0 {
                let n = self.left.min(bytes.len());
                self.left -= n;
                bytes = &bytes[n..];
                continue;
            }
            let before = self.head.len();
            let n = bytes.len().min(4 - before);
            self.head.extend_from_slice(&bytes[..n]);
            match out_pdu_len(&self.head) {
                Ok(None) => {
                    if self.head.len() >= 4 {
                        self.lost = true;
                    }
                    bytes = &bytes[n..];
                }
                Ok(Some(len)) => {
                    // The header bytes taken from `bytes` beyond `before` count towards `len`.
                    let Some(left) = len.checked_sub(before) else {
                        self.lost = true;
                        continue;
                    };
                    self.left = left;
                    self.head.clear();
                }
                Err(()) => self.lost = true,
            }
        }
    }
}

/// NTSTATUS codes a CredSSP server reports in a TSRequest's errorCode.
pub mod ntstatus {
    pub const LOGON_FAILURE: u32 = 0xC000_006D;
    pub const ACCOUNT_LOCKED_OUT: u32 = 0xC000_0234;
    pub const NO_MEMORY: u32 = 0xC000_0017;
}

/// Splits a DER SEQUENCE into its elements' (tag, content).
fn der_elements(der: &[u8]) -> Option<Vec<(u8, &[u8])>> {
    let (tag, len, header) = der_header(der).ok()??;
    if tag != 0x30 {
        return None;
    }
    let mut rest = der.get(header..header + len)?;
    let mut out = Vec::new();
    while !rest.is_empty() {
        let (tag, len, header) = der_header(rest).ok()??;
        out.push((tag, rest.get(header..header + len)?));
        rest = &rest[header + len..];
    }
    Some(out)
}

/// The unsigned 32-bit value of `[n] INTEGER` content (up to five bytes with a sign byte).
fn tagged_u32(content: &[u8]) -> Option<u32> {
    let (tag, len, header) = der_header(content).ok()??;
    let int = content.get(header..header + len)?;
    if tag != 0x02 || int.is_empty() || int.len() > 5 {
        return None;
    }
    let v = int.iter().fold(0u64, |acc, b| acc << 8 | u64::from(*b));
    Some(v as u32)
}

/// A TSRequest's (version, errorCode) (MS-CSSP 2.2.1: `[0] version`, `[4] errorCode`).
pub fn ts_request_status(der: &[u8]) -> Option<(u32, Option<u32>)> {
    let elements = der_elements(der)?;
    let version = elements
        .iter()
        .find(|(t, _)| *t == 0xa0)
        .and_then(|(_, c)| tagged_u32(c))?;
    let error = elements
        .iter()
        .find(|(t, _)| *t == 0xa4)
        .and_then(|(_, c)| tagged_u32(c));
    Some((version, error))
}

/// A TSRequest that carries only `version` and `error` (NTSTATUS): how a CredSSP server refuses
/// a client (versions before 3 have no errorCode; the client then just sees the close).
pub fn ts_request_refusal(version: u32, error: u32) -> Vec<u8> {
    fn integer(v: u32) -> Vec<u8> {
        let mut bytes: Vec<u8> = v.to_be_bytes().to_vec();
        while bytes.len() > 1 && bytes[0] == 0 && bytes[1] & 0x80 == 0 {
            bytes.remove(0);
        }
        let mut out = vec![0x02, bytes.len() as u8];
        out.extend(bytes);
        out
    }
    fn tagged(tag: u8, inner: Vec<u8>) -> Vec<u8> {
        let mut out = vec![tag, inner.len() as u8];
        out.extend(inner);
        out
    }
    let mut body = tagged(0xa0, integer(version));
    // NTSTATUS is signed in MS-CSSP: its four bytes as they are.
    let mut code = vec![0x02, 4];
    code.extend_from_slice(&error.to_be_bytes());
    body.extend(tagged(0xa4, code));
    tagged(0x30, body)
}

/// What the server wrote during CredSSP: TSRequests and, with HYBRID_EX, the 4-byte Early User
/// Authorization Result (MS-RDPBCGR 2.2.10.2: 0 success, 5 access denied).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredsspOut {
    /// A TSRequest; its errorCode if it carries one.
    TsRequest(Option<u32>),
    EarlyAuthResult(u32),
}

/// Frames the server's CredSSP output as it is written, in pieces of any size.
#[derive(Debug, Default)]
pub struct CredsspWatch {
    buf: Vec<u8>,
    /// Output that is not CredSSP: stop looking.
    done: bool,
}

impl CredsspWatch {
    /// Accounts for written bytes; returns the messages they completed.
    pub fn advance(&mut self, bytes: &[u8]) -> Vec<CredsspOut> {
        let mut out = Vec::new();
        if self.done {
            return out;
        }
        self.buf.extend_from_slice(bytes);
        loop {
            match self.buf.first() {
                None => break,
                Some(0x30) => match der_header(&self.buf) {
                    Ok(Some((_, len, header))) if len + header <= MAX_DER => {
                        let total = len + header;
                        if self.buf.len() < total {
                            break;
                        }
                        let msg: Vec<u8> = self.buf.drain(..total).collect();
                        out.push(CredsspOut::TsRequest(
                            ts_request_status(&msg).and_then(|(_, e)| e),
                        ));
                    }
                    Ok(None) => break,
                    _ => {
                        self.done = true;
                        break;
                    }
                },
                Some(_) if self.buf.len() >= 4 => {
                    let r =
                        u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
                    self.buf.drain(..4);
                    out.push(CredsspOut::EarlyAuthResult(r));
                    // Nothing of CredSSP follows the result.
                    self.done = true;
                    break;
                }
                Some(_) => break,
            }
        }
        if self.done {
            self.buf = Vec::new();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames_each_kind() {
        assert_eq!(next_pdu(&[], false), Ok(None));
        assert_eq!(next_pdu(&[3, 0, 0], false), Ok(None));
        assert_eq!(next_pdu(&[3, 0, 0, 19], true), Ok(Some(Pdu::Tpkt(19))));
        assert_eq!(next_pdu(&[3, 0, 0, 2], true), Err(FrameError::ShortTpkt(2)));
        assert_eq!(next_pdu(&[0x30, 0x05], false), Ok(Some(Pdu::Der(7))));
        assert_eq!(
            next_pdu(&[0x30, 0x82, 0x01, 0x00], false),
            Ok(Some(Pdu::Der(0x104)))
        );
        assert_eq!(next_pdu(&[0x30, 0x82, 0x01], false), Ok(None));
        assert!(matches!(
            next_pdu(&[0x30, 0x84, 1, 2, 3, 4], false),
            Err(FrameError::BadDer(_))
        ));
        assert!(matches!(
            next_pdu(&[0x30, 0x83, 0x10, 0, 0], false),
            Err(FrameError::BadDer(_))
        ));
        // One event (numEvents 1 in bits 2..6), length 9.
        assert_eq!(
            next_pdu(&[0x04, 9, 0x20, 0, 0, 0, 0, 0, 0], true),
            Ok(Some(Pdu::FastPathInput(9)))
        );
        assert_eq!(
            next_pdu(&[0x04, 0x81, 0x00], true),
            Ok(Some(Pdu::FastPathInput(256)))
        );
        assert_eq!(
            next_pdu(&[0x04, 2], true),
            Err(FrameError::ShortFastPath(2))
        );
        // numEvents 0 needs the count byte.
        assert_eq!(
            next_pdu(&[0x00, 3], true),
            Err(FrameError::ShortFastPath(3))
        );
        assert_eq!(
            next_pdu(&[0x84, 9], true),
            Err(FrameError::EncryptedFastPath)
        );
        assert_eq!(next_pdu(&[0x30, 9], true), Ok(Some(Pdu::FastPathInput(9))));
        assert_eq!(next_pdu(&[0x31, 9], true), Err(FrameError::Unknown(0x31)));
    }

    #[test]
    fn output_framing_finds_every_boundary_whatever_the_write_sizes() {
        // A TPKT of 7, a fast-path PDU of 5 (1-byte length), one of 300 (2-byte length).
        let mut stream = vec![3, 0, 0, 7, 1, 2, 3];
        stream.extend_from_slice(&[0, 5, 9, 9, 9]);
        stream.extend_from_slice(&[0, 0x81, 0x2c]);
        stream.extend(std::iter::repeat_n(7, 297));
        let boundaries = [7, 12, stream.len()];
        for split in 1..=stream.len() {
            let mut f = OutFrames {
                active: true,
                ..OutFrames::default()
            };
            let mut at = Vec::new();
            for (i, chunk) in stream.chunks(split).enumerate() {
                f.advance(chunk);
                if f.at_boundary() {
                    at.push((i * split + chunk.len()).min(stream.len()));
                }
            }
            assert!(!f.lost);
            assert!(f.at_boundary());
            for a in &at {
                assert!(
                    boundaries.contains(a),
                    "split {split}: boundary claimed at {a}"
                );
            }
        }
        let mut bad = OutFrames {
            active: true,
            ..OutFrames::default()
        };
        bad.advance(&[0xff, 1, 2]);
        assert!(bad.lost && !bad.at_boundary());
    }

    #[test]
    fn tpkt_progress_counts_across_pieces() {
        let mut p = TpktProgress::default();
        assert_eq!(p.remaining(), 4);
        p.advance(&[3, 0]);
        assert_eq!(p.remaining(), 2);
        p.advance(&[0, 11, 1, 2]);
        assert_eq!(p.remaining(), 5);
        assert!(!p.complete());
        p.advance(&[0; 5]);
        assert!(p.complete() && p.remaining() == 0);
        // A length shorter than the header ends with the header.
        let mut p = TpktProgress::default();
        p.advance(&[3, 0, 0, 1]);
        assert!(p.complete());
    }

    #[test]
    fn refusal_round_trips_and_credssp_output_is_read() {
        let refusal = ts_request_refusal(6, ntstatus::ACCOUNT_LOCKED_OUT);
        assert_eq!(
            ts_request_status(&refusal),
            Some((6, Some(ntstatus::ACCOUNT_LOCKED_OUT)))
        );
        assert_eq!(next_pdu(&refusal, false), Ok(Some(Pdu::Der(refusal.len()))));
        // A TSRequest with version and negoTokens only: no error.
        let ok = [
            0x30, 0x0b, 0xa0, 0x03, 0x02, 0x01, 0x06, 0xa1, 0x04, 0x30, 0x02, 0x30, 0x00,
        ];
        assert_eq!(ts_request_status(&ok), Some((6, None)));
        // Both, written one byte at a time, then the early result "access denied".
        let mut w = CredsspWatch::default();
        let mut seen = Vec::new();
        let mut stream = ok.to_vec();
        stream.extend_from_slice(&refusal);
        stream.extend_from_slice(&5u32.to_le_bytes());
        for b in &stream {
            seen.extend(w.advance(std::slice::from_ref(b)));
        }
        assert_eq!(
            seen,
            [
                CredsspOut::TsRequest(None),
                CredsspOut::TsRequest(Some(ntstatus::ACCOUNT_LOCKED_OUT)),
                CredsspOut::EarlyAuthResult(5)
            ]
        );
        assert!(
            w.advance(&[3, 0, 0, 7]).is_empty(),
            "nothing after the result"
        );
        assert_eq!(ts_request_status(&[0x30, 0x03, 0xa0, 0x01]), None);
    }

    proptest! {
        #[test]
        fn inbound_framing_never_panics_nor_overclaims(
            buf in proptest::collection::vec(any::<u8>(), 0..64),
            mcs in any::<bool>(),
        ) {
            if let Ok(Some(p)) = next_pdu(&buf, mcs) {
                prop_assert!(p.size() >= 2 && p.size() <= MAX_DER);
                if let Pdu::Tpkt(n) = p { prop_assert!(n >= 7); }
            }
        }

        #[test]
        fn outbound_framing_is_independent_of_write_sizes(
            pdus in proptest::collection::vec((any::<bool>(), 4usize..400), 1..8),
            split in 1usize..50,
        ) {
            let mut stream = Vec::new();
            for (tpkt, len) in &pdus {
                if *tpkt {
                    stream.extend_from_slice(&[3, 0]);
                    stream.extend_from_slice(&(*len as u16).to_be_bytes());
                    stream.resize(stream.len() + len - 4, 0xaa);
                } else {
                    stream.extend_from_slice(&[0, 0x80 | (*len >> 8) as u8, *len as u8]);
                    stream.resize(stream.len() + len - 3, 0xbb);
                }
            }
            let mut f = OutFrames { active: true, ..OutFrames::default() };
            for chunk in stream.chunks(split) {
                f.advance(chunk);
            }
            prop_assert!(!f.lost);
            prop_assert!(f.at_boundary());
        }

        #[test]
        fn credssp_watch_and_status_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..200),
            split in 1usize..20,
        ) {
            let _ = ts_request_status(&bytes);
            let mut w = CredsspWatch::default();
            for chunk in bytes.chunks(split) {
                let _ = w.advance(chunk);
            }
            prop_assert!(w.buf.len() <= MAX_DER + 4);
        }

        #[test]
        fn tpkt_progress_never_panics(
            pieces in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..10), 0..10),
        ) {
            let mut p = TpktProgress::default();
            for piece in &pieces {
                p.advance(piece);
                let _ = (p.remaining(), p.complete());
            }
        }
    }
}
