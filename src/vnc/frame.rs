//! Encoded updates that any number of viewers can be sent: every rectangle is encoded on its own,
//! so its bytes mean the same to every client whatever it received before.
//!
//! - ZRLE: each rectangle's zlib data is a fresh raw-deflate stream ending in a flush (no
//!   reference to earlier data, byte-aligned). A client's inflater, started by the 2-byte zlib
//!   header the first rectangle it gets carries, decodes any sequence of them.
//! - Tight: each rectangle resets the zlib stream it uses (control-byte bits 0-3) and starts a
//!   new zlib stream; JPEG and fill rectangles have no stream at all.
//! - Raw, Hextile, CopyRect: no state.
//!
//! Work is cut into bands (64 rows; Tight's ≤ 2048 x 65536-pixel pieces) and encoded in parallel
//! on a small pool sized from the CPU quota; each worker keeps its encoders and one band of
//! pixels, never a whole frame.

use std::cell::RefCell;

use bytes::Bytes;
use rayon::prelude::*;

use super::caps::Encoding;
use super::encode::{Zrle, rect_header};
use super::encoder::{HextileEncoder, RawEncoder, RectEncoder};
use super::proto::{PixelFormat, enc};
use super::scroll::{RowHash, row_hash};
use super::tight::Tight;
use super::update::{Part, Source};
use crate::framebuffer::{Framebuffer, Rect};

/// Rows per band: ZRLE's tile height, so bands never cut a tile.
const BAND_ROWS: u32 = 64;
/// The zlib stream header a client's ZRLE inflater needs before the first raw-deflate data.
pub const ZLIB_HEADER: [u8; 2] = [0x78, 0x9c];

/// How rectangles are encoded: everything viewers must agree on to share bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub encoding: Encoding,
    pub pf: PixelFormat,
    /// Tight's JPEG quality (1..100) when the client allows lossy rectangles.
    pub jpeg: Option<u8>,
    /// zlib level 0..9.
    pub level: u32,
}

/// One encoded rectangle (its 12-byte header included).
#[derive(Debug, Clone)]
pub struct EncodedRect {
    pub bytes: Bytes,
    /// A ZRLE rectangle: `bytes[12..16]` is the zlib data's length, raw deflate from byte 16.
    pub zrle: bool,
    /// Sent as JPEG: to be refreshed losslessly once the screen is still.
    pub lossy: Option<Rect>,
}

/// What encoding a plan produced.
#[derive(Debug, Default)]
pub struct Encoded {
    pub rects: Vec<EncodedRect>,
    /// Hashes of full-width rows that were encoded from the framebuffer (`(y, hash)`), so
    /// CopyRect planning knows exactly what the clients' screens now show.
    pub rows: Vec<(u32, RowHash)>,
    pub bytes: usize,
}

/// One unit of work: a rectangle and where its pixels come from.
#[derive(Clone, Copy)]
enum Item {
    Copy { r: Rect, src_y: u32 },
    Pixels { r: Rect, full_width: bool },
}

/// Cuts planned parts into work items the encoding can carry and workers can share.
fn items(parts: &[Part], settings: &Settings, width: u32) -> Vec<Item> {
    let mut out = Vec::new();
    for &(r, source) in parts {
        if let Source::CopyFrom(src_y) = source {
            out.push(Item::Copy { r, src_y });
            continue;
        }
        let full_width = r.x == 0 && r.w == width;
        if settings.encoding == Encoding::Tight {
            let mut pieces = Vec::new();
            super::tight::split(r, &mut pieces);
            out.extend(pieces.into_iter().map(|p| Item::Pixels {
                r: p,
                full_width: full_width && p.w == width,
            }));
            continue;
        }
        let mut y = r.y;
        while y < r.y + r.h {
            // Bands start on multiples of BAND_ROWS, so a band is at most one 64-row strip.
            let end = ((y / BAND_ROWS + 1) * BAND_ROWS).min(r.y + r.h);
            out.push(Item::Pixels {
                r: Rect {
                    x: r.x,
                    y,
                    w: r.w,
                    h: end - y,
                },
                full_width,
            });
            y = end;
        }
    }
    out
}

/// A worker thread's encoders and pixel buffer, kept between frames.
#[derive(Default)]
struct Worker {
    pixels: Vec<u32>,
    zrle: Option<(u32, Zrle)>,
    tight: Option<(u32, Tight)>,
}

thread_local! {
    static WORKER: RefCell<Worker> = RefCell::new(Worker::default());
}

impl Worker {
    /// The worker's ZRLE encoder at `level` (made once per level).
    fn zrle(&mut self, level: u32) -> &mut Zrle {
        if self.zrle.as_ref().is_none_or(|(l, _)| *l != level) {
            self.zrle = Some((level, Zrle::new(level)));
        }
        &mut self.zrle.get_or_insert_with(|| (level, Zrle::new(level))).1
    }

    /// The worker's Tight encoder at `level`, set to the JPEG quality `jpeg`.
    fn tight(&mut self, level: u32, jpeg: Option<u8>) -> &mut Tight {
        if self.tight.as_ref().is_none_or(|(l, _)| *l != level) {
            self.tight = Some((level, Tight::new(level, None)));
        }
        let t = &mut self
            .tight
            .get_or_insert_with(|| (level, Tight::new(level, None)))
            .1;
        t.set_jpeg(jpeg);
        t
    }
}

/// Encodes one work item into its bytes.
fn encode_item(
    fb: &Framebuffer,
    item: Item,
    s: &Settings,
) -> (Option<EncodedRect>, Vec<(u32, RowHash)>) {
    match item {
        Item::Copy { r, src_y } => {
            let mut out = Vec::with_capacity(16);
            rect_header(&mut out, 0, to16(r.y), to16(r.w), to16(r.h), enc::COPY_RECT);
            out.extend_from_slice(&0u16.to_be_bytes());
            out.extend_from_slice(&to16(src_y).to_be_bytes());
            (
                Some(EncodedRect {
                    bytes: Bytes::from(out),
                    zrle: false,
                    lossy: None,
                }),
                Vec::new(),
            )
        }
        Item::Pixels { r, full_width } => WORKER.with(|w| {
            let mut w = w.borrow_mut();
            let w = &mut *w;
            let got = fb.read_rect(r, &mut w.pixels);
            if got.w == 0 || got.h == 0 {
                return (None, Vec::new());
            }
            let rows = if full_width {
                w.pixels
                    .chunks_exact(got.w as usize)
                    .enumerate()
                    .map(|(i, row)| (got.y + i as u32, row_hash(row)))
                    .collect()
            } else {
                Vec::new()
            };
            let mut out = Vec::with_capacity(16 + got.w as usize * got.h as usize);
            let number = match s.encoding {
                Encoding::Raw => enc::RAW,
                Encoding::Hextile => enc::HEXTILE,
                Encoding::Zrle => enc::ZRLE,
                Encoding::Tight => enc::TIGHT,
            };
            rect_header(
                &mut out,
                to16(got.x),
                to16(got.y),
                to16(got.w),
                to16(got.h),
                number,
            );
            let (gw, gh) = (got.w as usize, got.h as usize);
            let pixels = std::mem::take(&mut w.pixels);
            let lossy = match s.encoding {
                Encoding::Raw => RawEncoder.encode(&s.pf, gw, gh, &pixels, &mut out),
                Encoding::Hextile => HextileEncoder.encode(&s.pf, gw, gh, &pixels, &mut out),
                Encoding::Zrle => {
                    RectEncoder::encode(w.zrle(s.level), &s.pf, gw, gh, &pixels, &mut out)
                }
                Encoding::Tight => {
                    RectEncoder::encode(w.tight(s.level, s.jpeg), &s.pf, gw, gh, &pixels, &mut out)
                }
            };
            w.pixels = pixels;
            // Frames are kept for other viewers: no slack capacity.
            out.shrink_to_fit();
            (
                Some(EncodedRect {
                    bytes: Bytes::from(out),
                    zrle: s.encoding == Encoding::Zrle,
                    lossy: lossy.then_some(got),
                }),
                rows,
            )
        }),
    }
}

/// Encodes `parts` of `fb` (whose width is `width`) on `pool`, in order.
pub fn encode(
    fb: &Framebuffer,
    parts: &[Part],
    settings: &Settings,
    width: u32,
    pool: &rayon::ThreadPool,
) -> Encoded {
    let work = items(parts, settings, width);
    let results: Vec<_> = if work.len() <= 1 {
        work.iter().map(|i| encode_item(fb, *i, settings)).collect()
    } else {
        pool.install(|| {
            work.par_iter()
                .map(|i| encode_item(fb, *i, settings))
                .collect()
        })
    };
    let mut out = Encoded::default();
    for (rect, rows) in results {
        if let Some(r) = rect {
            out.bytes += r.bytes.len();
            out.rects.push(r);
        }
        out.rows.extend(rows);
    }
    out
}

fn to16(v: u32) -> u16 {
    u16::try_from(v).unwrap_or(u16::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pixman::X8R8G8B8;
    use flate2::{Decompress, FlushDecompress};

    fn fb(w: u32, h: u32) -> Framebuffer {
        let fb = Framebuffer::new();
        let data: Vec<u8> = (0..w * h)
            .flat_map(|i| (((i / 7) * 0x010203) & 0xff_ffff).to_ne_bytes())
            .collect();
        fb.scanout(w, h, w * 4, X8R8G8B8, &data).expect("scanout");
        fb
    }

    fn settings(encoding: Encoding) -> Settings {
        Settings {
            encoding,
            pf: PixelFormat::NATIVE,
            jpeg: None,
            level: 6,
        }
    }

    fn pool() -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .expect("pool")
    }

    #[test]
    fn work_is_cut_into_aligned_bands_and_tight_pieces() {
        let r = Rect {
            x: 0,
            y: 10,
            w: 100,
            h: 150,
        };
        let bands: Vec<Rect> = items(&[(r, Source::Framebuffer)], &settings(Encoding::Zrle), 100)
            .into_iter()
            .map(|i| match i {
                Item::Pixels { r, full_width } => {
                    assert!(full_width);
                    r
                }
                Item::Copy { .. } => panic!("no copies"),
            })
            .collect();
        let ys: Vec<(u32, u32)> = bands.iter().map(|b| (b.y, b.h)).collect();
        assert_eq!(ys, [(10, 54), (64, 64), (128, 32)]);
        let wide = Rect::full(4096, 40);
        let pieces = items(
            &[(wide, Source::Framebuffer)],
            &settings(Encoding::Tight),
            4096,
        );
        assert!(
            pieces
                .iter()
                .all(|i| matches!(i, Item::Pixels { r, .. } if r.w <= 2048 && r.w * r.h <= 65536))
        );
    }

    #[test]
    fn zrle_rects_are_independent_raw_deflate_streams() {
        let fb = fb(200, 130);
        let parts = [(Rect::full(200, 130), Source::Framebuffer)];
        let out = encode(&fb, &parts, &settings(Encoding::Zrle), 200, &pool());
        assert_eq!(out.rects.len(), 3, "three bands");
        assert_eq!(out.rows.len(), 130, "every full-width row hashed");
        // Each band decodes on its own (no reference to another) and all of them in a row
        // through one inflater, as a client that got the zlib header first reads them.
        let mut one = Decompress::new(true);
        let mut sink = Vec::with_capacity(1 << 20);
        one.decompress_vec(&ZLIB_HEADER, &mut sink, FlushDecompress::Sync)
            .expect("header");
        for r in &out.rects {
            assert!(r.zrle);
            let b = &r.bytes;
            let len = u32::from_be_bytes([b[12], b[13], b[14], b[15]]) as usize;
            assert_eq!(b.len(), 16 + len);
            let mut alone = Decompress::new(false);
            let mut v = Vec::with_capacity(1 << 20);
            alone
                .decompress_vec(&b[16..], &mut v, FlushDecompress::Sync)
                .expect("alone");
            let before = sink.len();
            one.decompress_vec(&b[16..], &mut sink, FlushDecompress::Sync)
                .expect("in a row");
            assert_eq!(&sink[before..], &v[..], "the same data either way");
        }
    }

    #[test]
    fn copies_cost_no_pixels_and_tight_resets_every_stream_it_uses() {
        let fb = fb(64, 64);
        let parts = [
            (
                Rect {
                    x: 0,
                    y: 0,
                    w: 64,
                    h: 32,
                },
                Source::CopyFrom(32),
            ),
            (
                Rect {
                    x: 0,
                    y: 32,
                    w: 64,
                    h: 32,
                },
                Source::Framebuffer,
            ),
        ];
        let out = encode(&fb, &parts, &settings(Encoding::Tight), 64, &pool());
        assert_eq!(out.rects.len(), 2);
        assert_eq!(out.rects[0].bytes.len(), 16, "a CopyRect header and source");
        let ctl = out.rects[1].bytes[12];
        let stream = (ctl >> 4) & 3;
        assert_ne!(ctl & 0x80, 0x80, "basic compression, not fill or JPEG");
        assert_eq!(ctl & (1 << stream), 1 << stream, "the stream is reset");
    }
}
