//! RFB clipboard bytes, both ways: classic cut text (rfbproto: Latin-1, LF line ends) and the
//! Extended Clipboard pseudo-encoding (0xC0A1E5CE: a signed length, flags, UTF-8 text with CRLF
//! line ends and a NUL, `provide` payloads in one self-contained zlib stream per message). Pure:
//! every size is checked before anything is allocated for it.

use std::io::{Read, Write};

use flate2::Compression;
use flate2::read::ZlibDecoder;
use flate2::write::ZlibEncoder;

/// The pseudo-encoding a client lists to speak Extended Clipboard.
pub const EXTENDED_CLIPBOARD: i32 = 0xC0A1_E5CE_u32 as i32;
/// ServerCutText.
const SERVER_CUT_TEXT: u8 = 3;

/// Extended Clipboard flag bits.
pub mod flag {
    pub const TEXT: u32 = 1;
    /// Formats are bits 0..=15.
    pub const FORMATS: u32 = 0xffff;
    pub const CAPS: u32 = 1 << 24;
    pub const REQUEST: u32 = 1 << 25;
    pub const PEEK: u32 = 1 << 26;
    pub const NOTIFY: u32 = 1 << 27;
    pub const PROVIDE: u32 = 1 << 28;
    pub const ACTIONS: u32 = CAPS | REQUEST | PEEK | NOTIFY | PROVIDE;
}

/// A decoded Extended Clipboard message from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Extended {
    /// What the client handles; `text_limit` is the largest text it takes unsolicited (`None`:
    /// it did not list text).
    Caps {
        actions: u32,
        text_limit: Option<u32>,
    },
    /// The client wants our text.
    Request { text: bool },
    /// The client asks what we have.
    Peek,
    /// The client's clipboard changed; `text`: it now holds text.
    Notify { text: bool },
    /// The client's text (`None`: the message carried no text).
    Provide { text: Option<String> },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClipboardError {
    #[error("extended clipboard message shorter than its fields")]
    Truncated,
    #[error("extended clipboard message with no known action (flags {0:#x})")]
    NoAction(u32),
    #[error("clipboard text of {0} bytes over the limit")]
    TooLarge(u64),
    #[error("clipboard text is not UTF-8")]
    NotUtf8,
    #[error("clipboard data does not inflate: {0}")]
    Inflate(String),
}

/// Decodes an Extended Clipboard message body (what follows the length). Text longer than
/// `limit` bytes (after line ends are made LF) is refused, never inflated beyond the limit.
pub fn decode_extended(body: &[u8], limit: usize) -> Result<Extended, ClipboardError> {
    let flags = read_u32(body, 0).ok_or(ClipboardError::Truncated)?;
    let rest = &body[4..];
    let text = flags & flag::TEXT != 0;
    // With caps the other action bits say what the client supports; otherwise one action.
    if flags & flag::CAPS != 0 {
        let formats = flags & flag::FORMATS;
        let n = formats.count_ones() as usize;
        if rest.len() < 4 * n {
            return Err(ClipboardError::Truncated);
        }
        // Sizes come in format bit order; text, bit 0, is first when present.
        let text_limit = text.then(|| read_u32(rest, 0)).flatten();
        return Ok(Extended::Caps {
            actions: flags & flag::ACTIONS,
            text_limit,
        });
    }
    if flags & flag::REQUEST != 0 {
        return Ok(Extended::Request { text });
    }
    if flags & flag::PEEK != 0 {
        return Ok(Extended::Peek);
    }
    if flags & flag::NOTIFY != 0 {
        return Ok(Extended::Notify { text });
    }
    if flags & flag::PROVIDE != 0 {
        if !text {
            return Ok(Extended::Provide { text: None });
        }
        return inflate_text(rest, limit).map(|t| Extended::Provide { text: Some(t) });
    }
    Err(ClipboardError::NoAction(flags))
}

/// The text entry of a `provide` payload: `U32 size` and that many bytes (CRLF, NUL-terminated).
fn inflate_text(zlib: &[u8], limit: usize) -> Result<String, ClipboardError> {
    // CRLF text may be up to twice the LF text we accept, plus its NUL.
    let wire_limit = (limit as u64).saturating_mul(2).saturating_add(1);
    let mut z = ZlibDecoder::new(zlib).take(wire_limit.saturating_add(4));
    let mut size = [0u8; 4];
    z.read_exact(&mut size)
        .map_err(|e| ClipboardError::Inflate(e.to_string()))?;
    let size = u64::from(u32::from_be_bytes(size));
    if size > wire_limit {
        return Err(ClipboardError::TooLarge(size));
    }
    let mut data = Vec::with_capacity(size as usize);
    z.take(size)
        .read_to_end(&mut data)
        .map_err(|e| ClipboardError::Inflate(e.to_string()))?;
    if (data.len() as u64) < size {
        return Err(ClipboardError::Truncated);
    }
    if data.last() == Some(&0) {
        data.pop();
    }
    let text = String::from_utf8(data).map_err(|_| ClipboardError::NotUtf8)?;
    let text = crlf_to_lf(&text);
    if text.len() > limit {
        return Err(ClipboardError::TooLarge(text.len() as u64));
    }
    Ok(text)
}

fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 4)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// Line ends as the guest (and D-Bus) use them.
pub fn crlf_to_lf(s: &str) -> String {
    s.replace("\r\n", "\n")
}

/// Classic ClientCutText: Latin-1 bytes, each one code point.
pub fn latin1_to_string(bytes: &[u8]) -> String {
    crlf_to_lf(&bytes.iter().map(|&b| char::from(b)).collect::<String>())
}

/// Text as classic cut text, or `None` when a character is outside Latin-1 (a classic client
/// would show a different text; nothing is sent rather than something wrong).
pub fn string_to_latin1(text: &str) -> Option<Vec<u8>> {
    crlf_to_lf(text)
        .chars()
        .map(|c| u8::try_from(u32::from(c)).ok())
        .collect()
}

fn header(out: &mut Vec<u8>, length: i32) {
    out.extend_from_slice(&[SERVER_CUT_TEXT, 0, 0, 0]);
    out.extend_from_slice(&length.to_be_bytes());
}

/// A classic ServerCutText carrying `latin1`.
pub fn server_cut_text(out: &mut Vec<u8>, latin1: &[u8]) {
    header(out, i32::try_from(latin1.len()).unwrap_or(i32::MAX));
    out.extend_from_slice(latin1);
}

fn extended(out: &mut Vec<u8>, flags: u32, payload: &[u8]) {
    let len = i32::try_from(4 + payload.len()).unwrap_or(i32::MAX);
    header(out, -len);
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(payload);
}

/// Our caps: text, with every action, and the largest text the client may send unsolicited.
pub fn server_caps(out: &mut Vec<u8>, text_limit: u32) {
    extended(
        out,
        flag::CAPS | flag::REQUEST | flag::PEEK | flag::NOTIFY | flag::PROVIDE | flag::TEXT,
        &text_limit.to_be_bytes(),
    );
}

/// Our clipboard changed: it now has text, or nothing.
pub fn notify(out: &mut Vec<u8>, text: bool) {
    extended(out, flag::NOTIFY | if text { flag::TEXT } else { 0 }, &[]);
}

/// Asks the client for its text.
pub fn request(out: &mut Vec<u8>) {
    extended(out, flag::REQUEST | flag::TEXT, &[]);
}

/// Sends `text` (LF line ends) as the spec wants it: CRLF, NUL-terminated, zlib.
pub fn provide(out: &mut Vec<u8>, text: &str) {
    let wire = crlf_to_lf(text).replace('\n', "\r\n");
    let size = u32::try_from(wire.len() + 1).unwrap_or(u32::MAX);
    let mut z = ZlibEncoder::new(Vec::with_capacity(wire.len() / 2 + 64), Compression::fast());
    // Writes into a Vec cannot fail.
    let _ = z.write_all(&size.to_be_bytes());
    let _ = z.write_all(wire.as_bytes());
    let _ = z.write_all(&[0]);
    let payload = z.finish().unwrap_or_default();
    extended(out, flag::PROVIDE | flag::TEXT, &payload);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The body of an extended ServerCutText we wrote (what follows the length).
    fn body(out: &[u8]) -> &[u8] {
        assert_eq!(out[0], SERVER_CUT_TEXT);
        let len = i32::from_be_bytes([out[4], out[5], out[6], out[7]]);
        assert!(len < 0, "extended messages have negative lengths");
        assert_eq!(out.len() - 8, len.unsigned_abs() as usize);
        &out[8..]
    }

    #[test]
    fn provide_round_trips_with_crlf_and_nul_on_the_wire() {
        for text in [
            "",
            "hello",
            "two\nlines\n",
            "Grüße — 日本語",
            "crlf\r\nstays lf",
        ] {
            let mut out = Vec::new();
            provide(&mut out, text);
            let b = body(&out);
            let mut wire = Vec::new();
            ZlibDecoder::new(&b[4..])
                .read_to_end(&mut wire)
                .expect("inflate");
            let size = u32::from_be_bytes([wire[0], wire[1], wire[2], wire[3]]) as usize;
            assert_eq!(size, wire.len() - 4);
            assert_eq!(wire.last(), Some(&0));
            assert!(!wire[4..].windows(2).any(|w| w[0] != b'\r' && w[1] == b'\n'));
            assert_eq!(
                decode_extended(b, 1 << 20),
                Ok(Extended::Provide {
                    text: Some(crlf_to_lf(text))
                })
            );
        }
    }

    #[test]
    fn caps_notify_request_peek_decode() {
        let mut out = Vec::new();
        server_caps(&mut out, 1 << 20);
        assert_eq!(
            decode_extended(body(&out), 10),
            Ok(Extended::Caps {
                actions: flag::ACTIONS,
                text_limit: Some(1 << 20)
            })
        );
        for t in [true, false] {
            let mut out = Vec::new();
            notify(&mut out, t);
            assert_eq!(
                decode_extended(body(&out), 10),
                Ok(Extended::Notify { text: t })
            );
        }
        let mut out = Vec::new();
        request(&mut out);
        assert_eq!(
            decode_extended(body(&out), 10),
            Ok(Extended::Request { text: true })
        );
        assert_eq!(
            decode_extended(&flag::PEEK.to_be_bytes(), 10),
            Ok(Extended::Peek)
        );
        // noVNC's caps: text and html and rtf, sizes in bit order.
        let mut b = (flag::CAPS | flag::REQUEST | 0b111).to_be_bytes().to_vec();
        b.extend([0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2, 0]);
        assert_eq!(
            decode_extended(&b, 10),
            Ok(Extended::Caps {
                actions: flag::CAPS | flag::REQUEST,
                text_limit: Some(0)
            })
        );
    }

    #[test]
    fn bad_messages_are_refused() {
        assert_eq!(decode_extended(&[0, 0], 10), Err(ClipboardError::Truncated));
        assert_eq!(
            decode_extended(&(flag::CAPS | 0b11).to_be_bytes(), 10),
            Err(ClipboardError::Truncated)
        );
        assert_eq!(
            decode_extended(&1u32.to_be_bytes(), 10),
            Err(ClipboardError::NoAction(1))
        );
        // Not zlib at all.
        let mut b = (flag::PROVIDE | flag::TEXT).to_be_bytes().to_vec();
        b.extend([1, 2, 3, 4]);
        assert!(matches!(
            decode_extended(&b, 10),
            Err(ClipboardError::Inflate(_))
        ));
        // Over the limit: refused from the size field, before inflating the text.
        let mut out = Vec::new();
        provide(&mut out, &"x".repeat(100));
        assert_eq!(
            decode_extended(body(&out), 10),
            Err(ClipboardError::TooLarge(101))
        );
        // A size field that lies about a short stream.
        let mut z = ZlibEncoder::new(Vec::new(), Compression::fast());
        z.write_all(&50u32.to_be_bytes()).expect("write");
        z.write_all(b"short").expect("write");
        let mut b = (flag::PROVIDE | flag::TEXT).to_be_bytes().to_vec();
        b.extend(z.finish().expect("finish"));
        assert_eq!(decode_extended(&b, 100), Err(ClipboardError::Truncated));
        // Invalid UTF-8.
        let mut z = ZlibEncoder::new(Vec::new(), Compression::fast());
        z.write_all(&2u32.to_be_bytes()).expect("write");
        z.write_all(&[0xff, 0]).expect("write");
        let mut b = (flag::PROVIDE | flag::TEXT).to_be_bytes().to_vec();
        b.extend(z.finish().expect("finish"));
        assert_eq!(decode_extended(&b, 100), Err(ClipboardError::NotUtf8));
    }

    #[test]
    fn latin1_both_ways_and_nothing_outside_it() {
        assert_eq!(latin1_to_string(b"caf\xe9\r\nok"), "café\nok");
        assert_eq!(string_to_latin1("café\n"), Some(b"caf\xe9\n".to_vec()));
        assert_eq!(string_to_latin1("Grüße — 日本語"), None);
        let mut out = Vec::new();
        server_cut_text(&mut out, b"hi");
        assert_eq!(out, [3, 0, 0, 0, 0, 0, 0, 2, b'h', b'i']);
    }

    proptest! {
        #[test]
        fn decoding_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_extended(&data, 64);
        }

        #[test]
        fn any_text_within_the_limit_round_trips(text in "\\PC{0,200}") {
            let mut out = Vec::new();
            provide(&mut out, &text);
            let want = crlf_to_lf(&text);
            let got = decode_extended(body(&out), 1 << 16);
            prop_assert_eq!(got, Ok(Extended::Provide { text: Some(want) }));
        }
    }
}
