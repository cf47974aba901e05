//! HTTP/2 requests on the hook socket may carry any `:authority`. virt-launcher (grpc-go) sends
//! `localhost`, but gRPC C-core clients (grpcio, grpcurl's C builds) dialling `unix:/path` send
//! the socket path, percent-encoded (`var%2Frun%2F…sock`), which is no URI authority; h2 answers
//! such a request with RST_STREAM PROTOCOL_ERROR and there is no setting to relax that. The hook
//! socket never routes by authority, so this stream adapter sits between the socket and the gRPC
//! server and rewrites the header blocks the client sends: every header block is decoded
//! (HPACK, following the client's dynamic table) and re-encoded as literals without indexing,
//! with an invalid `:authority` replaced by `localhost`. The server's table thus stays empty and
//! in step. Everything else passes through unchanged; the server's output is not touched.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client connection preface (RFC 9113 §3.4).
const PREFACE_LEN: usize = 24;
const FRAME_HEADER: usize = 9;
/// Largest frame accepted: far above the 16 KiB a client may send without a larger
/// SETTINGS_MAX_FRAME_SIZE from us (we never send one).
const MAX_FRAME: usize = 1 << 20;
/// Largest header block accepted (all CONTINUATIONs together).
const MAX_HEADER_BLOCK: usize = 256 * 1024;
/// Frames we write are at most the minimum maximum frame size.
const OUT_FRAME: usize = 16 * 1024;
/// The dynamic table size a client may use: h2's default SETTINGS_HEADER_TABLE_SIZE.
const TABLE_SIZE: usize = 4096;

const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// A header block being gathered from HEADERS + CONTINUATION frames.
struct Block {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

/// The rewriting side of one connection, without I/O.
pub struct Rewriter {
    preface: usize,
    raw: BytesMut,
    block: Option<Block>,
    decoder: fluke_hpack::Decoder<'static>,
    /// Header blocks whose `:authority` was replaced (logs, tests).
    pub replaced: u64,
    /// The HPACK decoder panicked: its table is unknown, nothing more is decoded.
    broken: bool,
}

impl Default for Rewriter {
    fn default() -> Self {
        let mut decoder = fluke_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_SIZE);
        Self {
            preface: 0,
            raw: BytesMut::new(),
            block: None,
            decoder,
            replaced: 0,
            broken: false,
        }
    }
}

fn invalid(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("HTTP/2: {why}"))
}

impl Rewriter {
    /// Takes bytes from the client; appends what the server should read to `out`.
    pub fn feed(&mut self, bytes: &[u8], out: &mut BytesMut) -> io::Result<()> {
        if self.broken {
            return Err(invalid("undecodable header compression"));
        }
        self.raw.extend_from_slice(bytes);
        if self.preface < PREFACE_LEN {
            let n = (PREFACE_LEN - self.preface).min(self.raw.len());
            out.extend_from_slice(&self.raw.split_to(n));
            self.preface += n;
        }
        while self.raw.len() >= FRAME_HEADER {
            let len = usize::from(self.raw[0]) << 16
                | usize::from(self.raw[1]) << 8
                | usize::from(self.raw[2]);
            if len > MAX_FRAME {
                return Err(invalid("frame too large"));
            }
            if self.raw.len() < FRAME_HEADER + len {
                break;
            }
            let frame = self.raw.split_to(FRAME_HEADER + len);
            let (kind, flags) = (frame[3], frame[4]);
            let stream = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
            let payload = &frame[FRAME_HEADER..];
            match (kind, &mut self.block) {
                (HEADERS, None) => {
                    let (priority, fragment) = headers_payload(flags, payload)?;
                    self.block = Some(Block {
                        stream,
                        end_stream: flags & END_STREAM != 0,
                        priority,
                        fragment: fragment.to_vec(),
                    });
                }
                (CONTINUATION, Some(b)) if b.stream == stream => {
                    if b.fragment.len() + payload.len() > MAX_HEADER_BLOCK {
                        return Err(invalid("header block too large"));
                    }
                    b.fragment.extend_from_slice(payload);
                }
                (_, Some(_)) | (CONTINUATION, None) => {
                    return Err(invalid("header block interrupted"));
                }
                _ => {
                    out.extend_from_slice(&frame);
                    continue;
                }
            }
            if flags & END_HEADERS != 0
                && let Some(b) = self.block.take()
            {
                self.reencode(b, out)?;
            }
        }
        Ok(())
    }

    fn reencode(&mut self, b: Block, out: &mut BytesMut) -> io::Result<()> {
        let mut block = Vec::with_capacity(b.fragment.len() + 64);
        let mut replaced = false;
        // fluke-hpack 0.3.1 panics (an `unwrap`) on a dynamic-table size update whose integer is
        // cut short, instead of returning an error (found by fuzzing). The panic is kept inside
        // this call and becomes the connection's error; the decoder is not used again after it,
        // because the connection ends.
        let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.decoder.decode_with_cb(&b.fragment, |name, value| {
                let value: &[u8] = if &*name == b":authority"
                    && http::uri::Authority::try_from(&*value).is_err()
                {
                    replaced = true;
                    b"localhost"
                } else {
                    &value
                };
                literal(&name, value, &mut block);
            })
        }));
        match decoded {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(invalid("bad header compression")),
            Err(_) => {
                self.broken = true;
                return Err(invalid("undecodable header compression"));
            }
        }
        if replaced {
            self.replaced += 1;
        }
        let mut first = true;
        let mut rest = &block[..];
        loop {
            let room = if first && b.priority.is_some() {
                OUT_FRAME - 5
            } else {
                OUT_FRAME
            };
            let (chunk, more) = rest.split_at(rest.len().min(room));
            let mut flags = if more.is_empty() { END_HEADERS } else { 0 };
            let kind = if first { HEADERS } else { CONTINUATION };
            let priority = if first { b.priority } else { None };
            if first && b.end_stream {
                flags |= END_STREAM;
            }
            if priority.is_some() {
                flags |= PRIORITY;
            }
            let len = chunk.len() + priority.map_or(0, |p| p.len());
            out.extend_from_slice(&u32::try_from(len).unwrap_or(0).to_be_bytes()[1..]);
            out.extend_from_slice(&[kind, flags]);
            out.extend_from_slice(&b.stream.to_be_bytes());
            if let Some(p) = priority {
                out.extend_from_slice(&p);
            }
            out.extend_from_slice(chunk);
            first = false;
            rest = more;
            if rest.is_empty() {
                return Ok(());
            }
        }
    }
}

/// A HEADERS payload's priority fields and header block fragment (padding removed).
fn headers_payload(flags: u8, payload: &[u8]) -> io::Result<(Option<[u8; 5]>, &[u8])> {
    let mut p = payload;
    let mut pad = 0;
    if flags & PADDED != 0 {
        let (&n, rest) = p.split_first().ok_or_else(|| invalid("bad padding"))?;
        pad = usize::from(n);
        p = rest;
    }
    let mut priority = None;
    if flags & PRIORITY != 0 {
        let (head, rest) = p
            .split_at_checked(5)
            .ok_or_else(|| invalid("bad priority"))?;
        let mut fields = [0u8; 5];
        fields.copy_from_slice(head);
        priority = Some(fields);
        p = rest;
    }
    let end = p
        .len()
        .checked_sub(pad)
        .ok_or_else(|| invalid("bad padding"))?;
    Ok((priority, &p[..end]))
}

/// An HPACK integer with an `n`-bit prefix whose other bits are `first` (RFC 7541 §5.1).
fn integer(v: usize, n: u32, first: u8, out: &mut Vec<u8>) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    let mut rest = v - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// "Literal Header Field without Indexing — New Name", strings without Huffman (§6.2.2).
fn literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0);
    integer(name.len(), 7, 0, out);
    out.extend_from_slice(name);
    integer(value.len(), 7, 0, out);
    out.extend_from_slice(value);
}

/// A client stream whose header blocks pass through a [`Rewriter`].
pub struct AuthorityFix<S> {
    inner: S,
    rewriter: Rewriter,
    ready: BytesMut,
    eof: bool,
}

impl<S> AuthorityFix<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            rewriter: Rewriter::default(),
            ready: BytesMut::new(),
            eof: false,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 8 * 1024];
            let mut rb = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                this.eof = true;
                continue;
            }
            this.rewriter.feed(rb.filled(), &mut this.ready)?;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S> tonic::transport::server::Connected for AuthorityFix<S> {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = u32::try_from(payload.len()).unwrap().to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    type Headers = Vec<(Vec<u8>, Vec<u8>)>;

    /// Parses frames out of `bytes` (after the preface): (type, flags, decoded header block).
    fn server_view(bytes: &[u8]) -> Vec<(u8, u8, Headers)> {
        assert_eq!(&bytes[..PREFACE_LEN], PREFACE);
        let mut rest = &bytes[PREFACE_LEN..];
        let mut dec = fluke_hpack::Decoder::new();
        let mut out = Vec::new();
        let mut block = Vec::new();
        while !rest.is_empty() {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            let (kind, flags) = (rest[3], rest[4]);
            let mut payload = &rest[9..9 + len];
            if kind == HEADERS && flags & PRIORITY != 0 {
                payload = &payload[5..];
            }
            rest = &rest[9 + len..];
            if kind == HEADERS || kind == CONTINUATION {
                block.extend_from_slice(payload);
                if flags & END_HEADERS != 0 {
                    out.push((kind, flags, dec.decode(&block).expect("decodes")));
                    block.clear();
                }
            } else {
                out.push((kind, flags, Vec::new()));
            }
        }
        out
    }

    fn request(authority: &str) -> Headers {
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/kubevirt.hooks.info.Info/Info"),
            (":authority", authority),
            ("content-type", "application/grpc"),
        ]
        .iter()
        .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
    }

    #[test]
    fn socket_path_authority_becomes_localhost_and_indexing_is_resolved() {
        let mut enc = fluke_hpack::Encoder::new();
        let first = request("tmp%2Fhk%2Fvdi-sidecar.sock");
        let b1 = enc.encode(first.iter().map(|(n, v)| (&n[..], &v[..])));
        // The client's second request may refer to its dynamic table: we must resolve it.
        let b2 = enc.encode(first.iter().map(|(n, v)| (&n[..], &v[..])));
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS passes through
        input.extend(frame(HEADERS, END_HEADERS, 1, &b1));
        // The second block split over HEADERS (padded, with priority) and a CONTINUATION.
        let mut padded = vec![3u8];
        padded.extend_from_slice(&[0, 0, 0, 0, 16]);
        padded.extend_from_slice(&b2[..3]);
        padded.extend_from_slice(&[0, 0, 0]);
        input.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 3, &padded));
        input.extend(frame(CONTINUATION, END_HEADERS, 3, &b2[3..]));
        input.extend(frame(0x0, END_STREAM, 1, b"\0\0\0\0\0"));
        // Fed one byte at a time, the result is the same.
        let mut r = Rewriter::default();
        let mut out = BytesMut::new();
        for b in &input {
            r.feed(std::slice::from_ref(b), &mut out).expect("feeds");
        }
        let frames = server_view(&out);
        assert_eq!(frames.len(), 4);
        let want = request("localhost");
        assert_eq!(frames[1].2, want);
        assert_eq!(frames[2].2, want);
        assert_eq!(frames[2].1, END_HEADERS | END_STREAM | PRIORITY);
        assert_eq!(frames[3].0, 0x0, "DATA untouched");
        assert_eq!(r.replaced, 2);
    }

    #[test]
    fn a_cut_short_table_size_update_is_an_error_not_a_panic() {
        // 0x3f: a dynamic-table size update whose integer continues in a byte that is missing.
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &[0x3f]));
        let mut r = Rewriter::default();
        let mut out = BytesMut::new();
        let err = r.feed(&input, &mut out).unwrap_err();
        assert!(err.to_string().contains("header compression"), "{err}");
        // The connection is over: nothing more is accepted.
        assert!(r.feed(&frame(0x4, 0, 0, &[]), &mut out).is_err());
    }

    #[test]
    fn a_valid_authority_is_kept_and_junk_is_an_error() {
        let mut enc = fluke_hpack::Encoder::new();
        let req = request("localhost:1234");
        let b = enc.encode(req.iter().map(|(n, v)| (&n[..], &v[..])));
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &b));
        let mut r = Rewriter::default();
        let mut out = BytesMut::new();
        r.feed(&input, &mut out).expect("feeds");
        assert_eq!(server_view(&out)[0].2, req);
        assert_eq!(r.replaced, 0);
        // A CONTINUATION out of nowhere, an oversized frame, undecodable HPACK.
        for bad in [
            frame(CONTINUATION, END_HEADERS, 1, b"x"),
            vec![0x11, 0, 0, 0, 0, 0, 0, 0, 1],
            frame(
                HEADERS,
                END_HEADERS,
                1,
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            ),
        ] {
            let mut r = Rewriter::default();
            let mut input = PREFACE.to_vec();
            input.extend(bad);
            assert!(r.feed(&input, &mut BytesMut::new()).is_err());
        }
    }

    #[test]
    fn long_header_blocks_are_split_into_continuations() {
        let mut enc = fluke_hpack::Encoder::new();
        let mut req = request("x%2Fy");
        req.push((b"big".to_vec(), vec![b'a'; 40_000]));
        let b = enc.encode(req.iter().map(|(n, v)| (&n[..], &v[..])));
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &b));
        let mut out = BytesMut::new();
        Rewriter::default().feed(&input, &mut out).expect("feeds");
        let view = server_view(&out);
        assert_eq!(view.len(), 1);
        assert_eq!(view[0].0, CONTINUATION, "ended by a CONTINUATION");
        assert_eq!(view[0].2[3].1, b"localhost");
    }

    proptest! {
        #[test]
        fn arbitrary_client_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
            split in 1usize..40,
        ) {
            let mut r = Rewriter::default();
            let mut out = BytesMut::new();
            let mut input = PREFACE.to_vec();
            input.extend(bytes);
            for chunk in input.chunks(split) {
                if r.feed(chunk, &mut out).is_err() {
                    break;
                }
            }
        }
    }
}
