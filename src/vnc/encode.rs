//! Pixels to RFB bytes: pixel-format translation, Raw and ZRLE (RFC 6143 §7.7.1, §7.7.6).

use flate2::{Compress, Compression, FlushCompress};

use super::proto::PixelFormat;

/// Writes one canonical pixel (`0x00RRGGBB`) in the client's pixel format.
#[inline]
pub fn put_pixel(pf: &PixelFormat, px: u32, out: &mut Vec<u8>) {
    if *pf == PixelFormat::NATIVE {
        out.extend_from_slice(&px.to_le_bytes());
        return;
    }
    let scale = |c: u32, max: u16| (c * u32::from(max) + 127) / 255;
    let v = (scale((px >> 16) & 0xff, pf.red_max) << pf.red_shift)
        | (scale((px >> 8) & 0xff, pf.green_max) << pf.green_shift)
        | (scale(px & 0xff, pf.blue_max) << pf.blue_shift);
    match (pf.bits_per_pixel, pf.big_endian) {
        (8, _) => out.push(v as u8),
        (16, false) => out.extend_from_slice(&(v as u16).to_le_bytes()),
        (16, true) => out.extend_from_slice(&(v as u16).to_be_bytes()),
        (_, false) => out.extend_from_slice(&v.to_le_bytes()),
        (_, true) => out.extend_from_slice(&v.to_be_bytes()),
    }
}

/// Appends a rectangle header (§7.6.1).
pub fn rect_header(out: &mut Vec<u8>, x: u16, y: u16, w: u16, h: u16, encoding: i32) {
    for v in [x, y, w, h] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out.extend_from_slice(&encoding.to_be_bytes());
}

/// Raw: every pixel in the client's format.
pub fn raw(pf: &PixelFormat, pixels: &[u32], out: &mut Vec<u8>) {
    out.reserve(pixels.len() * pf.bytes());
    if *pf == PixelFormat::NATIVE {
        // The common case (and the benchmark's worst CPU ratio when it was decided per pixel):
        // a straight little-endian copy the compiler can vectorise.
        out.extend(pixels.iter().flat_map(|p| p.to_le_bytes()));
        return;
    }
    for &p in pixels {
        put_pixel(pf, p, out);
    }
}

/// Appends `input` compressed on the continuing stream `z`, ending with a sync flush so the client
/// can decode everything sent so far (ZRLE's and Tight's streams live as long as the connection).
pub fn deflate_sync(z: &mut Compress, mut input: &[u8], out: &mut Vec<u8>) {
    out.reserve(input.len() / 2 + 64);
    loop {
        let before = z.total_in();
        if out.capacity() - out.len() < 64 {
            out.reserve(out.len().max(4096));
        }
        let status = z.compress_vec(input, out, FlushCompress::Sync);
        input = &input[(z.total_in() - before) as usize..];
        // An error cannot happen with in-memory buffers; stop with what we have. A full output
        // buffer may hold more pending output: go round again.
        if status.is_err() || (input.is_empty() && out.capacity() > out.len()) {
            return;
        }
    }
}

/// Which bytes of a pixel make up a ZRLE CPIXEL (§7.7.6): 3 of 4 when the colour fits.
fn cpixel_range(pf: &PixelFormat) -> std::ops::Range<usize> {
    let bytes = pf.bytes();
    if pf.bits_per_pixel == 32 && pf.depth <= 24 {
        let top = [pf.red_shift, pf.green_shift, pf.blue_shift]
            .iter()
            .zip([pf.red_max, pf.green_max, pf.blue_max])
            .map(|(s, m)| u32::from(*s) + (16 - m.leading_zeros()))
            .max()
            .unwrap_or(32);
        let low = [pf.red_shift, pf.green_shift, pf.blue_shift]
            .into_iter()
            .min()
            .unwrap_or(0);
        // Colour in the least significant 3 bytes, or in the most significant 3.
        if top <= 24 {
            return if pf.big_endian { 1..4 } else { 0..3 };
        }
        if low >= 8 {
            return if pf.big_endian { 0..3 } else { 1..4 };
        }
    }
    0..bytes
}

/// A ZRLE encoder. RFB has one zlib stream per connection (§7.7.6), but each rectangle here is
/// a fresh raw-deflate stream ending in a sync flush: appended to what a client's inflater has
/// seen (once it got the zlib header, [`super::frame::ZLIB_HEADER`]) it decodes the same for
/// every client, which is what lets one encoding serve many viewers.
pub struct Zrle {
    z: Compress,
    tile: Vec<u8>,
    px: Vec<u8>,
    /// Start every rectangle with a fresh stream (shareable); off only to measure the cost.
    reset: bool,
}

impl Default for Zrle {
    fn default() -> Self {
        Self::new(6)
    }
}

const TILE: usize = 64;
/// Palette RLE tiles hold up to 127 colours (subencodings 130–255).
const MAX_RLE_PALETTE: usize = 127;

/// Bytes of a ZRLE run length: (len - 1) as a sum of 255s and a final byte below 255.
fn rle_len_bytes(len: usize) -> usize {
    (len - 1) / 255 + 1
}

fn push_rle_len(out: &mut Vec<u8>, len: usize) {
    let mut rest = len - 1;
    while rest >= 255 {
        out.push(255);
        rest -= 255;
    }
    out.push(rest as u8);
}

impl Zrle {
    pub fn new(level: u32) -> Self {
        Self {
            z: Compress::new(Compression::new(level.min(9)), false),
            tile: Vec::new(),
            px: Vec::new(),
            reset: true,
        }
    }

    /// One continuous stream for every rectangle, as a per-connection RFB server would keep it
    /// (its own zlib header first): not shareable; for measuring what the resets cost.
    pub fn continuous(level: u32) -> Self {
        Self {
            z: Compress::new(Compression::new(level.min(9)), true),
            reset: false,
            ..Self::new(level)
        }
    }

    /// Encodes a `w`x`h` rectangle of canonical pixels (row-major) into `out` (length-prefixed
    /// zlib data, without the rectangle header).
    pub fn encode(
        &mut self,
        pf: &PixelFormat,
        w: usize,
        h: usize,
        pixels: &[u32],
        out: &mut Vec<u8>,
    ) {
        let cp = cpixel_range(pf);
        let csize = cp.len();
        self.tile.clear();
        let mut palette: Vec<u32> = Vec::with_capacity(MAX_RLE_PALETTE + 1);
        let mut runs: Vec<(u32, usize)> = Vec::with_capacity(TILE * TILE);
        let cpixel = |p: u32, tile: &mut Vec<u8>, px: &mut Vec<u8>| {
            px.clear();
            put_pixel(pf, p, px);
            tile.extend_from_slice(&px[cp.clone()]);
        };
        for ty in (0..h).step_by(TILE) {
            let th = TILE.min(h - ty);
            for tx in (0..w).step_by(TILE) {
                let tw = TILE.min(w - tx);
                let row = |r: usize| &pixels[(ty + r) * w + tx..(ty + r) * w + tx + tw];
                // One pass: the runs in scan order and the (sorted) palette, up to 127 colours.
                palette.clear();
                runs.clear();
                for r in 0..th {
                    for &p in row(r) {
                        match runs.last_mut() {
                            Some((c, n)) if *c == p => {
                                *n += 1;
                                continue;
                            }
                            _ => runs.push((p, 1)),
                        }
                        if palette.len() <= MAX_RLE_PALETTE
                            && let Err(at) = palette.binary_search(&p)
                        {
                            palette.insert(at, p);
                        }
                    }
                }
                let npx = tw * th;
                let colours = palette.len();
                let index = |p: u32| palette.binary_search(&p).unwrap_or(0) as u8;
                // Size of each subencoding; the smallest wins (§7.7.5).
                let raw_size = npx * csize;
                let rle_size: usize = runs.iter().map(|&(_, n)| csize + rle_len_bytes(n)).sum();
                let packed_bits = match colours {
                    2 => 1,
                    3..=4 => 2,
                    5..=16 => 4,
                    _ => 0,
                };
                let packed_size = (packed_bits > 0)
                    .then(|| colours * csize + th * (tw * packed_bits).div_ceil(8));
                let palette_rle_size = (2..=MAX_RLE_PALETTE).contains(&colours).then(|| {
                    colours * csize
                        + runs
                            .iter()
                            .map(|&(_, n)| 1 + if n > 1 { rle_len_bytes(n) } else { 0 })
                            .sum::<usize>()
                });
                if colours == 1 {
                    self.tile.push(1);
                    cpixel(palette[0], &mut self.tile, &mut self.px);
                    continue;
                }
                let best = [
                    Some(raw_size),
                    Some(rle_size),
                    packed_size,
                    palette_rle_size,
                ]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(raw_size);
                if Some(best) == packed_size {
                    self.tile.push(colours as u8);
                    for &c in &palette {
                        cpixel(c, &mut self.tile, &mut self.px);
                    }
                    for r in 0..th {
                        let (mut acc, mut used) = (0u8, 0);
                        for &p in row(r) {
                            acc = (acc << packed_bits) | index(p);
                            used += packed_bits;
                            if used == 8 {
                                self.tile.push(acc);
                                (acc, used) = (0, 0);
                            }
                        }
                        if used > 0 {
                            self.tile.push(acc << (8 - used));
                        }
                    }
                } else if Some(best) == palette_rle_size {
                    self.tile.push(128 + colours as u8);
                    for &c in &palette {
                        cpixel(c, &mut self.tile, &mut self.px);
                    }
                    for &(p, n) in &runs {
                        if n == 1 {
                            self.tile.push(index(p));
                        } else {
                            self.tile.push(index(p) | 128);
                            push_rle_len(&mut self.tile, n);
                        }
                    }
                } else if best == rle_size {
                    self.tile.push(128);
                    for &(p, n) in &runs {
                        cpixel(p, &mut self.tile, &mut self.px);
                        push_rle_len(&mut self.tile, n);
                    }
                } else {
                    self.tile.push(0);
                    for r in 0..th {
                        for &p in row(r) {
                            cpixel(p, &mut self.tile, &mut self.px);
                        }
                    }
                }
            }
        }
        let len_at = out.len();
        out.extend_from_slice(&[0; 4]);
        let start = out.len();
        // No back-reference into an earlier rectangle: a client that did not receive it can
        // still decode this one.
        if self.reset {
            self.z.reset();
        }
        deflate_sync(&mut self.z, &self.tile, out);
        let len = u32::try_from(out.len() - start).unwrap_or(u32::MAX);
        out[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Decompress, FlushDecompress};

    #[test]
    fn translates_pixel_formats() {
        let mut out = Vec::new();
        put_pixel(&PixelFormat::NATIVE, 0x123456, &mut out);
        assert_eq!(out, [0x56, 0x34, 0x12, 0x00]);
        let rgb565_be = PixelFormat {
            bits_per_pixel: 16,
            depth: 16,
            big_endian: true,
            true_colour: true,
            red_max: 31,
            green_max: 63,
            blue_max: 31,
            red_shift: 11,
            green_shift: 5,
            blue_shift: 0,
        };
        out.clear();
        put_pixel(&rgb565_be, 0xff0000, &mut out);
        assert_eq!(out, [0xf8, 0x00]);
        let bgr233 = PixelFormat {
            bits_per_pixel: 8,
            depth: 8,
            big_endian: false,
            true_colour: true,
            red_max: 7,
            green_max: 7,
            blue_max: 3,
            red_shift: 0,
            green_shift: 3,
            blue_shift: 6,
        };
        out.clear();
        put_pixel(&bgr233, 0x00ff00, &mut out);
        assert_eq!(out, [0b0011_1000]);
    }

    /// Decodes our ZRLE output (subencodings 0, 1, 2..16) back to pixels.
    fn unzrle(
        data: &[u8],
        w: usize,
        h: usize,
        z: &mut Decompress,
        seen: &mut std::collections::BTreeSet<u8>,
    ) -> Vec<u32> {
        let len = u32::from_be_bytes(data[0..4].try_into().unwrap()) as usize;
        let mut raw = Vec::with_capacity(1 << 20);
        z.decompress_vec(&data[4..4 + len], &mut raw, FlushDecompress::Sync)
            .unwrap();
        let mut px = vec![0u32; w * h];
        let mut r = &raw[..];
        let cp = |r: &mut &[u8]| {
            let v = u32::from_le_bytes([r[0], r[1], r[2], 0]);
            *r = &r[3..];
            v
        };
        for ty in (0..h).step_by(64) {
            for tx in (0..w).step_by(64) {
                let (tw, th) = (64.min(w - tx), 64.min(h - ty));
                let sub = r[0];
                seen.insert(sub);
                r = &r[1..];
                match sub {
                    0 => {
                        for y in 0..th {
                            for x in 0..tw {
                                px[(ty + y) * w + tx + x] = cp(&mut r);
                            }
                        }
                    }
                    1 => {
                        let c = cp(&mut r);
                        for y in 0..th {
                            for x in 0..tw {
                                px[(ty + y) * w + tx + x] = c;
                            }
                        }
                    }
                    128 | 130..=255 => {
                        let pal: Vec<u32> = if sub == 128 {
                            Vec::new()
                        } else {
                            (0..sub - 128).map(|_| cp(&mut r)).collect()
                        };
                        let mut i = 0;
                        while i < tw * th {
                            let (c, long) = if sub == 128 {
                                (cp(&mut r), true)
                            } else {
                                let b = r[0];
                                r = &r[1..];
                                (pal[usize::from(b & 127)], b & 128 != 0)
                            };
                            let mut len = 1;
                            if long {
                                loop {
                                    let b = r[0];
                                    r = &r[1..];
                                    len += usize::from(b);
                                    if b != 255 {
                                        break;
                                    }
                                }
                            }
                            for k in i..i + len {
                                px[(ty + k / tw) * w + tx + k % tw] = c;
                            }
                            i += len;
                        }
                        assert_eq!(i, tw * th, "runs overflow the tile");
                    }
                    n => {
                        let pal: Vec<u32> = (0..n).map(|_| cp(&mut r)).collect();
                        let bits = match n {
                            2 => 1,
                            3 | 4 => 2,
                            _ => 4,
                        };
                        for y in 0..th {
                            let row_bytes = (tw * bits).div_ceil(8);
                            for x in 0..tw {
                                let bit = x * bits;
                                let byte = r[bit / 8];
                                let idx = (byte >> (8 - bits - bit % 8)) & ((1 << bits) - 1);
                                px[(ty + y) * w + tx + x] = pal[idx as usize];
                            }
                            r = &r[row_bytes..];
                        }
                    }
                }
            }
        }
        px
    }

    #[test]
    fn zrle_round_trips_across_tile_kinds_and_rects() {
        let mut enc = Zrle::default();
        // Each rectangle is raw deflate on its own; one inflater reads them all in a row.
        let mut dec = Decompress::new(false);
        let (w, h) = (150, 70);
        let noise: Vec<u32> = (0..w * h)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761) & 0xff_ffff)
            .collect();
        let bars: Vec<u32> = (0..w * h)
            .map(|i| [0xff0000, 0x00ff00, 0x0000ff][(i % w) / 50])
            .collect();
        let solid = vec![0x123456; w * h];
        // Long runs of many colours (plain RLE) and of a few dozen (palette RLE).
        let stripes: Vec<u32> = (0..w * h)
            .map(|i| ((i as u32 / 7) * 0x010305) & 0xff_ffff)
            .collect();
        let bands: Vec<u32> = (0..w * h)
            .map(|i| ((i as u32 / 300) % 40) * 0x030201)
            .collect();
        let runs_of_1000: Vec<u32> = (0..w * h).map(|i| (i as u32 / 1000) * 0x0f0f0f).collect();
        let mut seen = std::collections::BTreeSet::new();
        let checker: Vec<u32> = (0..w * h)
            .map(|i| {
                if (i % w + i / w) % 2 == 0 {
                    0xffffff
                } else {
                    0x0000ff
                }
            })
            .collect();
        for pixels in [noise, bars, solid, stripes, bands, runs_of_1000, checker] {
            let mut out = Vec::new();
            enc.encode(&PixelFormat::NATIVE, w, h, &pixels, &mut out);
            assert_eq!(unzrle(&out, w, h, &mut dec, &mut seen), pixels);
        }
        // Raw, solid, packed palette, plain RLE and palette RLE were all exercised.
        assert!(
            seen.contains(&0) && seen.contains(&1) && seen.contains(&128),
            "{seen:?}"
        );
        assert!(seen.iter().any(|s| (2..=16).contains(s)), "{seen:?}");
        assert!(seen.iter().any(|&s| s >= 130), "{seen:?}");
    }
}
