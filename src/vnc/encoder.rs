//! Turning a planned update into RFB bytes: one [`RectEncoder`] per pixel encoding (Raw,
//! Hextile, ZRLE, Tight), and the [`UpdateJob`] that reads each part's pixels and encodes it.
//! The job owns everything it touches, so a large update can run on the blocking pool and come
//! back without holding up the connection's reactor thread (or anyone else's).

use tracing::warn;

use super::caps::{ClientCaps, Encoding};
use super::encode::{Zrle, raw, rect_header};
use super::proto::{PixelFormat, enc};
use super::tight::{self, Tight};
use super::update::{Part, Source};
use super::{hextile, pseudo};
use crate::framebuffer::{Framebuffer, Rect};

/// One pixel encoding.
pub trait RectEncoder: Send {
    /// The encoding number written in rectangle headers.
    fn number(&self) -> i32;

    /// Splits a rectangle into pieces this encoding can carry.
    fn split(&self, r: Rect, out: &mut Vec<Rect>) {
        out.push(r);
    }

    /// Appends the encoding of a `w`x`h` rectangle of canonical pixels (no header); returns
    /// whether it was lossy.
    fn encode(
        &mut self,
        pf: &PixelFormat,
        w: usize,
        h: usize,
        px: &[u32],
        out: &mut Vec<u8>,
    ) -> bool;
}

pub struct RawEncoder;

impl RectEncoder for RawEncoder {
    fn number(&self) -> i32 {
        enc::RAW
    }

    fn encode(
        &mut self,
        pf: &PixelFormat,
        _: usize,
        _: usize,
        px: &[u32],
        out: &mut Vec<u8>,
    ) -> bool {
        raw(pf, px, out);
        false
    }
}

pub struct HextileEncoder;

impl RectEncoder for HextileEncoder {
    fn number(&self) -> i32 {
        enc::HEXTILE
    }

    fn encode(
        &mut self,
        pf: &PixelFormat,
        w: usize,
        h: usize,
        px: &[u32],
        out: &mut Vec<u8>,
    ) -> bool {
        hextile::encode(pf, w, h, px, out);
        false
    }
}

impl RectEncoder for Zrle {
    fn number(&self) -> i32 {
        enc::ZRLE
    }

    fn encode(
        &mut self,
        pf: &PixelFormat,
        w: usize,
        h: usize,
        px: &[u32],
        out: &mut Vec<u8>,
    ) -> bool {
        Zrle::encode(self, pf, w, h, px, out);
        false
    }
}

impl RectEncoder for Tight {
    fn number(&self) -> i32 {
        enc::TIGHT
    }

    fn split(&self, r: Rect, out: &mut Vec<Rect>) {
        tight::split(r, out);
    }

    fn encode(
        &mut self,
        pf: &PixelFormat,
        w: usize,
        h: usize,
        px: &[u32],
        out: &mut Vec<u8>,
    ) -> bool {
        Tight::encode(self, pf, w, h, px, out)
    }
}

/// A connection's encoders. The zlib streams of ZRLE and Tight live as long as the connection:
/// the client's inflaters follow them, so they are created once and kept across SetEncodings.
pub struct Encoders {
    encoding: Encoding,
    zrle: Option<Zrle>,
    tight: Option<Tight>,
    raw: RawEncoder,
    hextile: HextileEncoder,
}

impl Default for Encoders {
    fn default() -> Self {
        Self {
            encoding: Encoding::Raw,
            zrle: None,
            tight: None,
            raw: RawEncoder,
            hextile: HextileEncoder,
        }
    }
}

impl Encoders {
    /// Follows a SetEncodings: the preferred encoding, compression level and JPEG quality.
    pub fn configure(&mut self, caps: &ClientCaps) {
        let level = caps.compress.unwrap_or(6);
        self.encoding = caps.encoding;
        if caps.encoding == Encoding::Zrle && self.zrle.is_none() {
            self.zrle = Some(Zrle::new(level));
        }
        if caps.encoding == Encoding::Tight {
            let tight = self.tight.get_or_insert_with(|| Tight::new(level, None));
            // JPEG is allowed only while the client sends a quality level.
            tight.set_quality(caps.quality, caps.fine_quality);
        }
    }

    /// The encoder for the current encoding.
    pub fn current(&mut self) -> &mut dyn RectEncoder {
        match (self.encoding, &mut self.zrle, &mut self.tight) {
            (Encoding::Zrle, Some(z), _) => z,
            (Encoding::Tight, _, Some(t)) => t,
            (Encoding::Hextile, _, _) => &mut self.hextile,
            _ => &mut self.raw,
        }
    }

    /// Turns JPEG off (the lossless refresh) or back on; returns the previous setting.
    pub fn set_jpeg(&mut self, quality: Option<u8>) -> Option<Option<u8>> {
        self.tight.as_mut().map(|t| t.set_jpeg(quality))
    }
}

/// Updates larger than this many pixels are encoded on the blocking pool.
pub const BLOCKING_PIXELS: u64 = 64 * 1024;

/// A full-width band of damage read once, so the rows hashed are exactly the rows sent.
#[derive(Default)]
pub struct Band {
    pub rect: Rect,
    pub pixels: Vec<u32>,
}

/// Everything one update's encoding needs, owned, so it can move to another thread and back.
pub struct UpdateJob {
    pub fb: Framebuffer,
    pub pf: PixelFormat,
    pub last_rect: bool,
    pub encoders: Encoders,
    pub parts: Vec<Part>,
    pub band: Band,
    /// Pseudo-rectangles (cursor, LEDs, …) to put first, and how many.
    pub extras: Vec<u8>,
    pub n_extras: usize,
    /// The encoded update.
    pub out: Vec<u8>,
    /// Rectangles that went out lossy (JPEG), for the lossless refresh.
    pub lossy: Vec<Rect>,
    pixels: Vec<u32>,
    split: Vec<Part>,
}

impl UpdateJob {
    pub fn new(fb: Framebuffer) -> Self {
        Self {
            fb,
            pf: PixelFormat::NATIVE,
            last_rect: false,
            encoders: Encoders::default(),
            parts: Vec::new(),
            band: Band::default(),
            extras: Vec::new(),
            n_extras: 0,
            out: Vec::with_capacity(64 * 1024),
            lossy: Vec::new(),
            pixels: Vec::new(),
            split: Vec::new(),
        }
    }

    /// Pixels the planned parts carry (CopyRects cost nothing).
    pub fn pixels(&self) -> u64 {
        self.parts
            .iter()
            .filter(|p| !matches!(p.1, Source::CopyFrom(_)))
            .map(|(r, _)| u64::from(r.w) * u64::from(r.h))
            .sum()
    }

    /// Encodes the planned parts into `out` (cleared first) as one FramebufferUpdate.
    pub fn run(&mut self) {
        self.out.clear();
        self.lossy.clear();
        // Tight splits rectangles; with LastRect the count need not be known in advance.
        self.split.clear();
        let mut pieces = Vec::new();
        for &(r, source) in &self.parts {
            if matches!(source, Source::CopyFrom(_)) {
                self.split.push((r, source));
                continue;
            }
            pieces.clear();
            self.encoders.current().split(r, &mut pieces);
            self.split.extend(pieces.iter().map(|p| (*p, source)));
        }
        let count = self.split.len() + self.n_extras;
        let use_last_rect = self.last_rect && count >= usize::from(u16::MAX);
        let header = if use_last_rect {
            u16::MAX
        } else {
            u16::try_from(count).unwrap_or(u16::MAX)
        };
        pseudo::update_header(&mut self.out, header);
        self.out.extend_from_slice(&self.extras);
        let number = self.encoders.current().number();
        for (i, &(r, source)) in self.split.iter().enumerate() {
            if !use_last_rect && i + self.n_extras >= usize::from(u16::MAX) {
                break;
            }
            let (got, px): (Rect, &[u32]) = match source {
                Source::CopyFrom(src_y) => {
                    let (y, w, h) = (to16(r.y), to16(r.w), to16(r.h));
                    rect_header(&mut self.out, 0, y, w, h, enc::COPY_RECT);
                    self.out.extend_from_slice(&0u16.to_be_bytes());
                    self.out.extend_from_slice(&to16(src_y).to_be_bytes());
                    continue;
                }
                Source::Framebuffer => (
                    self.fb.read_rect(r, &mut self.pixels),
                    self.pixels.as_slice(),
                ),
                Source::Band => band_rows(&self.band, r, &mut self.pixels),
            };
            if got.w == 0 || got.h == 0 {
                continue;
            }
            let (x, y, w, h) = (to16(got.x), to16(got.y), to16(got.w), to16(got.h));
            rect_header(&mut self.out, x, y, w, h, number);
            let lossy = self.encoders.current().encode(
                &self.pf,
                got.w as usize,
                got.h as usize,
                px,
                &mut self.out,
            );
            if lossy {
                self.lossy.push(got);
            }
        }
        if use_last_rect {
            pseudo::last_rect(&mut self.out);
        }
    }
}

/// Rows of the band snapshot covering `r` (whole rows in place; a piece is gathered).
fn band_rows<'a>(band: &'a Band, r: Rect, scratch: &'a mut Vec<u32>) -> (Rect, &'a [u32]) {
    let bw = band.rect.w as usize;
    let row0 = (r.y - band.rect.y) as usize;
    if r.x == band.rect.x && r.w == band.rect.w {
        return (r, &band.pixels[row0 * bw..(row0 + r.h as usize) * bw]);
    }
    scratch.clear();
    for row in row0..row0 + r.h as usize {
        let start = row * bw + (r.x - band.rect.x) as usize;
        scratch.extend_from_slice(&band.pixels[start..start + r.w as usize]);
    }
    (r, scratch.as_slice())
}

/// Surfaces are at most 8192 pixels each way (framebuffer::MAX_WIDTH), so coordinates fit.
fn to16(v: u32) -> u16 {
    u16::try_from(v).unwrap_or(u16::MAX)
}

/// Encodes `job`, on the blocking pool when it is large, so no reactor thread spends a 1080p
/// frame's worth of zlib while other viewers' input waits.
pub async fn encode(mut job: UpdateJob) -> UpdateJob {
    if job.pixels() < BLOCKING_PIXELS {
        job.run();
        return job;
    }
    let fb = job.fb.clone();
    match tokio::task::spawn_blocking(move || {
        job.run();
        job
    })
    .await
    {
        Ok(job) => job,
        Err(e) => {
            // The encoders panicked or the runtime is shutting down: start over with a clean
            // state (the connection then ends on the broken stream's next write, if at all).
            warn!(error = %e, "update encoding failed");
            UpdateJob::new(fb)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pixman::X8R8G8B8;

    fn fb(w: u32, h: u32) -> Framebuffer {
        let fb = Framebuffer::new();
        let data: Vec<u8> = (0..w * h).flat_map(|i| (i * 7919).to_ne_bytes()).collect();
        fb.scanout(w, h, w * 4, X8R8G8B8, &data).expect("scanout");
        fb
    }

    #[test]
    fn raw_update_carries_the_framebuffer_pixels() {
        let fb = fb(8, 4);
        let mut job = UpdateJob::new(fb.clone());
        job.parts = vec![(
            Rect {
                x: 2,
                y: 1,
                w: 3,
                h: 2,
            },
            Source::Framebuffer,
        )];
        job.run();
        // Header (4) + rect header (12) + 6 pixels of 4 bytes.
        assert_eq!(job.out.len(), 4 + 12 + 6 * 4);
        assert_eq!(&job.out[..4], &[0, 0, 0, 1]);
        let mut want = Vec::new();
        fb.read_rect(
            Rect {
                x: 2,
                y: 1,
                w: 3,
                h: 2,
            },
            &mut want,
        );
        let got: Vec<u32> = job.out[16..]
            .chunks_exact(4)
            .map(|p| u32::from_le_bytes([p[0], p[1], p[2], 0]))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn tight_pieces_and_copies_are_counted_in_the_header() {
        let fb = fb(4096, 2);
        let mut job = UpdateJob::new(fb);
        let caps = ClientCaps::from_list(&[enc::TIGHT]);
        job.encoders.configure(&caps);
        job.band.rect = Rect::full(4096, 2);
        job.band.pixels = vec![5; 4096 * 2];
        job.parts = vec![
            (
                Rect {
                    x: 0,
                    y: 0,
                    w: 4096,
                    h: 1,
                },
                Source::CopyFrom(1),
            ),
            (
                Rect {
                    x: 0,
                    y: 1,
                    w: 4096,
                    h: 1,
                },
                Source::Band,
            ),
        ];
        job.run();
        // Tight carries at most 2048 pixels per row: the band row goes as two pieces.
        assert_eq!(u16::from_be_bytes([job.out[2], job.out[3]]), 3);
        assert!(job.lossy.is_empty(), "no JPEG without a quality level");
    }
}
