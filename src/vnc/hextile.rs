//! Hextile (RFC 6143 §7.7.4): 16x16 tiles, each a background colour plus sub-rectangles of
//! other colours, or raw when that is smaller. Stateless apart from the background colour carried
//! from one tile to the next.

use super::encode::put_pixel;
use super::proto::PixelFormat;

const RAW: u8 = 1;
const BACKGROUND: u8 = 2;
const FOREGROUND: u8 = 4;
const ANY_SUBRECTS: u8 = 8;
const SUBRECTS_COLOURED: u8 = 16;
const TILE: usize = 16;

/// Encodes a `w`x`h` rectangle of canonical pixels (row-major) without its rectangle header.
pub fn encode(pf: &PixelFormat, w: usize, h: usize, pixels: &[u32], out: &mut Vec<u8>) {
    let mut last_bg: Option<u32> = None;
    let mut tile = [0u32; TILE * TILE];
    let mut subrects: Vec<(u32, u8, u8, u8, u8)> = Vec::with_capacity(TILE * TILE);
    let mut px = Vec::with_capacity(4);
    let bpp = pf.bytes();
    for ty in (0..h).step_by(TILE) {
        let th = TILE.min(h - ty);
        for tx in (0..w).step_by(TILE) {
            let tw = TILE.min(w - tx);
            for r in 0..th {
                let src = &pixels[(ty + r) * w + tx..(ty + r) * w + tx + tw];
                tile[r * tw..r * tw + tw].copy_from_slice(src);
            }
            let t = &tile[..tw * th];
            let (bg, colours) = background(t);
            subrects.clear();
            if colours > 1 {
                split_subrects(t, tw, th, bg, &mut subrects);
            }
            let two_colour = colours == 2;
            let per_subrect = if two_colour { 2 } else { 2 + bpp };
            let bg_cost = if last_bg == Some(bg) { 0 } else { bpp };
            let coded =
                1 + bg_cost + usize::from(two_colour) * bpp + 1 + subrects.len() * per_subrect;
            if subrects.len() > 255 || coded > 1 + t.len() * bpp {
                out.push(RAW);
                for &p in t {
                    put_pixel(pf, p, out);
                }
                // After a raw tile the background is undefined for the next one.
                last_bg = None;
                continue;
            }
            let mut mask = 0;
            if last_bg != Some(bg) {
                mask |= BACKGROUND;
            }
            if !subrects.is_empty() {
                mask |= ANY_SUBRECTS;
                mask |= if two_colour {
                    FOREGROUND
                } else {
                    SUBRECTS_COLOURED
                };
            }
            out.push(mask);
            if mask & BACKGROUND != 0 {
                put_pixel(pf, bg, out);
            }
            if mask & FOREGROUND != 0 {
                put_pixel(pf, subrects[0].0, out);
            }
            if mask & ANY_SUBRECTS != 0 {
                out.push(subrects.len() as u8);
                for &(c, x, y, sw, sh) in &subrects {
                    if mask & SUBRECTS_COLOURED != 0 {
                        px.clear();
                        put_pixel(pf, c, &mut px);
                        out.extend_from_slice(&px);
                    }
                    out.push((x << 4) | y);
                    out.push(((sw - 1) << 4) | (sh - 1));
                }
            }
            last_bg = Some(bg);
        }
    }
}

/// The most frequent colour of a tile, and how many distinct colours it has (counting stops at
/// a handful: many colours mean raw anyway).
fn background(t: &[u32]) -> (u32, usize) {
    const SLOTS: usize = 8;
    let mut seen: [(u32, u16); SLOTS] = [(0, 0); SLOTS];
    let mut n = 0;
    for &p in t {
        if let Some((_, count)) = seen[..n].iter_mut().find(|(c, _)| *c == p) {
            *count += 1;
        } else if n < SLOTS {
            seen[n] = (p, 1);
            n += 1;
        } else {
            return (seen[0].0, usize::MAX);
        }
    }
    let bg = seen[..n]
        .iter()
        .max_by_key(|(_, count)| *count)
        .map_or(0, |(c, _)| *c);
    (bg, n)
}

/// Covers every non-background pixel with single-colour rectangles: grow right, then down.
fn split_subrects(t: &[u32], tw: usize, th: usize, bg: u32, out: &mut Vec<(u32, u8, u8, u8, u8)>) {
    let mut done = [false; TILE * TILE];
    for y in 0..th {
        for x in 0..tw {
            let c = t[y * tw + x];
            if c == bg || done[y * tw + x] {
                continue;
            }
            let mut x1 = x + 1;
            while x1 < tw && t[y * tw + x1] == c && !done[y * tw + x1] {
                x1 += 1;
            }
            let mut y1 = y + 1;
            while y1 < th && (x..x1).all(|i| t[y1 * tw + i] == c && !done[y1 * tw + i]) {
                y1 += 1;
            }
            for row in y..y1 {
                done[row * tw + x..row * tw + x1].fill(true);
            }
            out.push((c, x as u8, y as u8, (x1 - x) as u8, (y1 - y) as u8));
            if out.len() > 255 {
                return;
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A Hextile decoder for native 32 bpp pixels, as a client implements it.
    pub fn decode(data: &[u8], w: usize, h: usize) -> Vec<u32> {
        let mut px = vec![0u32; w * h];
        let mut r = data;
        let take = |r: &mut &[u8]| {
            let v = u32::from_le_bytes([r[0], r[1], r[2], r[3]]);
            *r = &r[4..];
            v
        };
        let (mut bg, mut fg) = (0, 0);
        for ty in (0..h).step_by(TILE) {
            for tx in (0..w).step_by(TILE) {
                let (tw, th) = (TILE.min(w - tx), TILE.min(h - ty));
                let mask = r[0];
                r = &r[1..];
                if mask & RAW != 0 {
                    for y in 0..th {
                        for x in 0..tw {
                            px[(ty + y) * w + tx + x] = take(&mut r);
                        }
                    }
                    continue;
                }
                if mask & BACKGROUND != 0 {
                    bg = take(&mut r);
                }
                if mask & FOREGROUND != 0 {
                    fg = take(&mut r);
                }
                for y in 0..th {
                    px[(ty + y) * w + tx..(ty + y) * w + tx + tw].fill(bg);
                }
                if mask & ANY_SUBRECTS != 0 {
                    let n = r[0];
                    r = &r[1..];
                    for _ in 0..n {
                        let c = if mask & SUBRECTS_COLOURED != 0 {
                            take(&mut r)
                        } else {
                            fg
                        };
                        let (xy, wh) = (r[0], r[1]);
                        r = &r[2..];
                        let (sx, sy) = (usize::from(xy >> 4), usize::from(xy & 15));
                        let (sw, sh) = (usize::from(wh >> 4) + 1, usize::from(wh & 15) + 1);
                        for y in sy..sy + sh {
                            for x in sx..sx + sw {
                                px[(ty + y) * w + tx + x] = c;
                            }
                        }
                    }
                }
            }
        }
        assert!(r.is_empty(), "trailing bytes");
        px
    }

    #[test]
    fn round_trips_solid_two_colour_many_colour_and_noise() {
        let (w, h) = (77, 40);
        let solid = vec![0x336699; w * h];
        let text: Vec<u32> = (0..w * h)
            .map(|i| {
                if (i * 7 / 3) % 5 == 0 {
                    0xffffff
                } else {
                    0x000000
                }
            })
            .collect();
        let blocks: Vec<u32> = (0..w * h)
            .map(|i| [0x111111, 0xff0000, 0x00ff00, 0x0000ff][((i % w) / 9 + (i / w) / 5) % 4])
            .collect();
        let noise: Vec<u32> = (0..w * h)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761) & 0xff_ffff)
            .collect();
        for pixels in [solid, text, blocks, noise] {
            let mut out = Vec::new();
            encode(&PixelFormat::NATIVE, w, h, &pixels, &mut out);
            assert_eq!(decode(&out, w, h), pixels);
        }
    }

    #[test]
    fn solid_tiles_cost_one_byte_after_the_first() {
        let mut out = Vec::new();
        encode(&PixelFormat::NATIVE, 64, 64, &vec![7; 64 * 64], &mut out);
        assert_eq!(out.len(), 5 + 15);
    }
}
