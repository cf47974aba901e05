//! A dynamic virtual channel of our own (AUDIO_INPUT) next to ironrdp's. ironrdp-server 0.13
//! has no way to add one, but the transport sees the plaintext: we learn the `drdynvc` static
//! channel's MCS id from the client's Connect Initial, ask the client to create our channel
//! once it has answered the DVC capabilities, take every inbound message of our channel out
//! of the stream (ironrdp never sees an id it does not know), and hand back the PDUs to send,
//! which the transport writes between ironrdp's own.
//!
//! Layers, outside in: TPKT + X.224 + MCS Send Data (MS-RDPBCGR), the static channel's chunks
//! (CHANNEL_PDU_HEADER), the DVC PDU (MS-RDPEDYC), the AUDIO_INPUT message (MS-RDPEAI).

use ironrdp::pdu::mcs::{ConnectInitial, McsMessage, SendDataIndication};
use ironrdp::pdu::x224::{X224, X224Data};
use tracing::{debug, info, warn};

use super::audio_input::{AudioInput, CHANNEL_NAME};
use crate::qemu::audio_in::MicHub;

/// MCS id of the I/O channel; static channels follow it in the client's order (ironrdp's
/// acceptor numbers them so).
const IO_CHANNEL_ID: u16 = 1003;
/// Our DVC id: far above the small ids ironrdp hands out for its own channels.
const OUR_ID: u32 = 0x4149;
const CHANNEL_FLAG_FIRST: u32 = 0x01;
const CHANNEL_FLAG_LAST: u32 = 0x02;
const CHANNEL_FLAG_SHOW_PROTOCOL: u32 = 0x10;
const CMD_CREATE: u8 = 0x01;
const CMD_DATA_FIRST: u8 = 0x02;
const CMD_DATA: u8 = 0x03;
const CMD_CLOSE: u8 = 0x04;
const CMD_CAPS: u8 = 0x05;
/// Largest message of our channel accepted (a 20 ms stereo packet is under 4 KiB).
const MAX_MESSAGE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TapError {
    #[error("DVC PDU truncated")]
    Truncated,
    #[error("AUDIO_INPUT message of {0} bytes is too large")]
    TooLarge(usize),
}

/// Reads a DVC header and channel id: (cmd, sp, id, rest).
fn dvc_header(pdu: &[u8]) -> Result<(u8, u8, u32, &[u8]), TapError> {
    let (&h, rest) = pdu.split_first().ok_or(TapError::Truncated)?;
    let (cmd, sp, cb) = (h >> 4, (h >> 2) & 3, h & 3);
    let (id, rest) = var_uint(rest, cb)?;
    Ok((cmd, sp, id, rest))
}

/// A 1, 2 or 4-byte little-endian field, by its 2-bit size code.
fn var_uint(b: &[u8], code: u8) -> Result<(u32, &[u8]), TapError> {
    let n = match code {
        0 => 1,
        1 => 2,
        _ => 4,
    };
    if b.len() < n {
        return Err(TapError::Truncated);
    }
    let mut v = [0u8; 4];
    v[..n].copy_from_slice(&b[..n]);
    Ok((u32::from_le_bytes(v), &b[n..]))
}

/// A DVC PDU for our channel (2-byte id).
fn dvc_pdu(cmd: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![(cmd << 4) | 1];
    p.extend_from_slice(&(OUR_ID as u16).to_le_bytes());
    p.extend_from_slice(payload);
    p
}

#[derive(Default)]
struct Inbound {
    /// Inside a chunked static-channel message: whether it is ours, and its bytes so far.
    in_message: bool,
    ours: bool,
    /// Ours but past [`MAX_MESSAGE`]: dropped up to its last chunk.
    overflow: bool,
    buf: Vec<u8>,
    /// A DVC message of ours split with DataFirst/Data: its total length and bytes so far.
    dvc: Option<(usize, Vec<u8>)>,
}

pub struct DvcTap {
    drdynvc: Option<u16>,
    user: Option<u16>,
    connect_seen: bool,
    create_sent: bool,
    open: bool,
    inbound: Inbound,
    input: AudioInput,
    /// TPKTs to write to the client, between ironrdp's PDUs.
    pub out: Vec<u8>,
}

impl DvcTap {
    pub fn new(mic: MicHub) -> Self {
        Self {
            drdynvc: None,
            user: None,
            connect_seen: false,
            create_sent: false,
            open: false,
            inbound: Inbound::default(),
            input: AudioInput::new(mic),
            out: Vec::new(),
        }
    }

    /// Microphone bytes received so far.
    pub fn mic_bytes(&self) -> u64 {
        self.input.bytes_in
    }

    /// Looks at one inbound TPKT; `false` when it was ours and must not reach ironrdp.
    pub fn inbound(&mut self, tpkt: &[u8]) -> bool {
        if !self.connect_seen {
            self.learn_channels(tpkt);
            return true;
        }
        let Some(drdynvc) = self.drdynvc else {
            return true;
        };
        let Ok(X224(McsMessage::SendDataRequest(req))) =
            ironrdp::core::decode::<X224<McsMessage<'_>>>(tpkt)
        else {
            return true;
        };
        if req.channel_id != drdynvc {
            return true;
        }
        self.user = Some(req.initiator_id);
        match self.chunk(&req.user_data) {
            Ok(pass) => pass,
            Err(e) => {
                warn!(error = %e, "RDP microphone channel: bad message dropped");
                self.inbound = Inbound::default();
                false
            }
        }
    }

    /// The client's Connect Initial names its static channels; `drdynvc`'s place gives its id.
    fn learn_channels(&mut self, tpkt: &[u8]) {
        let Ok(X224(data)) = ironrdp::core::decode::<X224<X224Data<'_>>>(tpkt) else {
            return;
        };
        let Ok(ci) = ironrdp::core::decode::<ConnectInitial>(data.data.as_ref()) else {
            return;
        };
        self.connect_seen = true;
        let channels = ci
            .conference_create_request
            .gcc_blocks()
            .network
            .as_ref()
            .map(|n| n.channels.as_slice())
            .unwrap_or_default();
        self.drdynvc = channels
            .iter()
            .position(|c| c.name.as_str() == Some("drdynvc"))
            .and_then(|i| u16::try_from(i).ok())
            .map(|i| IO_CHANNEL_ID + 1 + i);
        debug!(drdynvc = ?self.drdynvc, "static channels");
    }

    /// One chunk of a static-channel message on `drdynvc`.
    fn chunk(&mut self, data: &[u8]) -> Result<bool, TapError> {
        if data.len() < 8 {
            return Err(TapError::Truncated);
        }
        let flags = u32::from_le_bytes([data[4], data[5], data[6], data[7]]);
        let body = &data[8..];
        if flags & CHANNEL_FLAG_FIRST != 0 {
            let (cmd, _, id, _) = dvc_header(body)?;
            let ours = matches!(cmd, CMD_CREATE..=CMD_CLOSE) && id == OUR_ID;
            if cmd == CMD_CAPS && !self.create_sent {
                // The client answered the capabilities: it now takes Create Requests.
                self.create_sent = true;
                let mut name = CHANNEL_NAME.as_bytes().to_vec();
                name.push(0);
                self.send(&dvc_pdu(CMD_CREATE, &name));
            }
            self.inbound.in_message = true;
            self.inbound.ours = ours;
            self.inbound.overflow = false;
            self.inbound.buf.clear();
        } else if !self.inbound.in_message {
            return Ok(true);
        }
        let ours = self.inbound.ours;
        if ours && !self.inbound.overflow {
            if self.inbound.buf.len() + body.len() > MAX_MESSAGE {
                warn!("RDP microphone channel: oversized message dropped");
                self.inbound.overflow = true;
                self.inbound.buf = Vec::new();
            } else {
                self.inbound.buf.extend_from_slice(body);
            }
        }
        if flags & CHANNEL_FLAG_LAST != 0 {
            self.inbound.in_message = false;
            if ours && !self.inbound.overflow {
                let pdu = std::mem::take(&mut self.inbound.buf);
                self.dvc(&pdu)?;
            }
        }
        Ok(!ours)
    }

    /// One whole DVC PDU of our channel.
    fn dvc(&mut self, pdu: &[u8]) -> Result<(), TapError> {
        let (cmd, sp, _, rest) = dvc_header(pdu)?;
        match cmd {
            CMD_CREATE => {
                let status = rest
                    .get(..4)
                    .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .ok_or(TapError::Truncated)?;
                if status < 0 {
                    info!(
                        status,
                        "RDP client has no microphone to share (AUDIO_INPUT refused)"
                    );
                    return Ok(());
                }
                self.open = true;
                let version = self.input.opened();
                self.send(&dvc_pdu(CMD_DATA, &version));
            }
            CMD_DATA_FIRST => {
                let (total, data) = var_uint(rest, sp)?;
                let total = total as usize;
                if total > MAX_MESSAGE || data.len() > total {
                    return Err(TapError::TooLarge(total));
                }
                if data.len() == total {
                    self.message(data);
                } else {
                    self.inbound.dvc = Some((total, data.to_vec()));
                }
            }
            CMD_DATA => match self.inbound.dvc.take() {
                Some((total, mut buf)) => {
                    if buf.len() + rest.len() > total {
                        return Err(TapError::TooLarge(buf.len() + rest.len()));
                    }
                    buf.extend_from_slice(rest);
                    if buf.len() == total {
                        self.message(&buf);
                    } else {
                        self.inbound.dvc = Some((total, buf));
                    }
                }
                None => self.message(rest),
            },
            CMD_CLOSE => {
                debug!("RDP client closed AUDIO_INPUT");
                self.open = false;
            }
            _ => {}
        }
        Ok(())
    }

    fn message(&mut self, msg: &[u8]) {
        if !self.open {
            return;
        }
        match self.input.on_message(msg) {
            Ok(replies) => {
                for r in replies {
                    self.send(&dvc_pdu(CMD_DATA, &r));
                }
            }
            Err(e) => warn!(error = %e, "RDP microphone: message refused"),
        }
    }

    /// Queues one DVC PDU (ours are small: one chunk) as a TPKT to the client.
    fn send(&mut self, dvc: &[u8]) {
        let (Some(channel_id), Some(initiator_id)) = (self.drdynvc, self.user) else {
            return;
        };
        let mut user_data = Vec::with_capacity(8 + dvc.len());
        user_data.extend_from_slice(&(dvc.len() as u32).to_le_bytes());
        user_data.extend_from_slice(
            &(CHANNEL_FLAG_FIRST | CHANNEL_FLAG_LAST | CHANNEL_FLAG_SHOW_PROTOCOL).to_le_bytes(),
        );
        user_data.extend_from_slice(dvc);
        let pdu = X224(SendDataIndication {
            initiator_id,
            channel_id,
            user_data: user_data.into(),
        });
        match ironrdp::core::encode_vec(&pdu) {
            Ok(bytes) => self.out.extend_from_slice(&bytes),
            Err(e) => warn!(error = %e, "RDP microphone: cannot encode"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ironrdp::pdu::mcs::SendDataRequest;

    const DRDYNVC: u16 = 1005;

    fn tap() -> DvcTap {
        let mut t = DvcTap::new(MicHub::default());
        t.connect_seen = true;
        t.drdynvc = Some(DRDYNVC);
        t
    }

    /// A client TPKT carrying `chunk` with `flags` on `channel`.
    fn from_client(channel: u16, total: usize, flags: u32, chunk: &[u8]) -> Vec<u8> {
        let mut user_data = (total as u32).to_le_bytes().to_vec();
        user_data.extend_from_slice(&flags.to_le_bytes());
        user_data.extend_from_slice(chunk);
        ironrdp::core::encode_vec(&X224(SendDataRequest {
            initiator_id: 1007,
            channel_id: channel,
            user_data: user_data.into(),
        }))
        .expect("encode")
    }

    /// The DVC PDUs in what the tap queued for the client.
    fn sent(t: &mut DvcTap) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut b = std::mem::take(&mut t.out);
        while !b.is_empty() {
            let len = usize::from(u16::from_be_bytes([b[2], b[3]]));
            let X224(McsMessage::SendDataIndication(ind)) =
                ironrdp::core::decode::<X224<McsMessage<'_>>>(&b[..len]).expect("decode")
            else {
                panic!("not a send data indication");
            };
            assert_eq!((ind.initiator_id, ind.channel_id), (1007, DRDYNVC));
            out.push(ind.user_data[8..].to_vec());
            b.drain(..len);
        }
        out
    }

    const BOTH: u32 = CHANNEL_FLAG_FIRST | CHANNEL_FLAG_LAST;

    #[test]
    fn opens_our_channel_after_the_caps_and_keeps_its_traffic_from_ironrdp() {
        let mut t = tap();
        // Another static channel and ironrdp's DVC traffic pass untouched.
        assert!(t.inbound(&from_client(1004, 4, BOTH, &[7, 0, 0, 0])));
        assert!(t.inbound(&from_client(DRDYNVC, 4, BOTH, &[0x50, 0, 2, 0])));
        let create = sent(&mut t);
        assert_eq!(create.len(), 1);
        assert_eq!(create[0][0], 0x11, "Create Request, 2-byte id");
        assert_eq!(&create[0][3..], b"AUDIO_INPUT\0");
        assert!(t.inbound(&from_client(DRDYNVC, 7, BOTH, &[0x30, 1, 9, 9, 9, 9, 9])));
        // The client's Create Response for our id is ours: swallowed, and we send Version.
        let mut resp = dvc_pdu(CMD_CREATE, &0i32.to_le_bytes());
        assert!(!t.inbound(&from_client(DRDYNVC, resp.len(), BOTH, &resp)));
        assert_eq!(sent(&mut t), [dvc_pdu(CMD_DATA, &[1, 1, 0, 0, 0])]);
        // Its Version arrives split in two static-channel chunks: still ours, answered once.
        resp = dvc_pdu(CMD_DATA, &[1, 2, 0, 0, 0]);
        let total = resp.len();
        assert!(!t.inbound(&from_client(DRDYNVC, total, CHANNEL_FLAG_FIRST, &resp[..4])));
        assert!(!t.inbound(&from_client(DRDYNVC, total, CHANNEL_FLAG_LAST, &resp[4..])));
        let formats = sent(&mut t);
        assert_eq!(formats.len(), 1);
        assert_eq!(formats[0][3], 0x02, "Sound Formats");
        // DataFirst + Data reassemble into one message.
        let data: Vec<u8> = [6u8].into_iter().chain([0u8; 99]).collect();
        let mut first = vec![(CMD_DATA_FIRST << 4) | (1 << 2) | 1];
        first.extend_from_slice(&(OUR_ID as u16).to_le_bytes());
        first.extend_from_slice(&100u16.to_le_bytes());
        first.extend_from_slice(&data[..60]);
        assert!(!t.inbound(&from_client(DRDYNVC, first.len(), BOTH, &first)));
        let rest = dvc_pdu(CMD_DATA, &data[60..]);
        assert!(!t.inbound(&from_client(DRDYNVC, rest.len(), BOTH, &rest)));
        assert_eq!(t.mic_bytes(), 99);
    }

    #[test]
    fn refused_and_hostile_input_stays_contained() {
        let mut t = tap();
        assert!(t.inbound(&from_client(DRDYNVC, 4, BOTH, &[0x50, 0, 2, 0])));
        sent(&mut t);
        let refuse = dvc_pdu(CMD_CREATE, &(-1i32).to_le_bytes());
        assert!(!t.inbound(&from_client(DRDYNVC, refuse.len(), BOTH, &refuse)));
        assert!(
            sent(&mut t).is_empty(),
            "nothing sent to a client without a microphone"
        );
        // An oversized DataFirst and endless chunks are refused, not buffered.
        let mut huge = vec![(CMD_DATA_FIRST << 4) | (2 << 2) | 1];
        huge.extend_from_slice(&(OUR_ID as u16).to_le_bytes());
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(!t.inbound(&from_client(DRDYNVC, huge.len(), BOTH, &huge)));
        let start = dvc_pdu(CMD_DATA, &[0; 1000]);
        assert!(!t.inbound(&from_client(DRDYNVC, 1 << 30, CHANNEL_FLAG_FIRST, &start)));
        for _ in 0..200 {
            t.inbound(&from_client(DRDYNVC, 1 << 30, 0, &[0; 1000]));
        }
        assert!(t.inbound.buf.len() <= MAX_MESSAGE);
        // Garbage TPKTs and truncated chunks never panic.
        for len in 0..40 {
            let junk: Vec<u8> = (0..len).map(|i| (i * 53 + 1) as u8).collect();
            t.inbound(&junk);
            t.inbound(&from_client(DRDYNVC, len, BOTH, &junk));
        }
    }
}
