//! Pixman pixel formats as QEMU's D-Bus display sends them, converted to our canonical pixel:
//! a native `u32` `0x00RRGGBB` (pixman x8r8g8b8, i.e. bytes B,G,R,X on little-endian).
//!
//! `PIXMAN_FORMAT(bpp, type, a, r, g, b) = bpp << 24 | type << 16 | a << 12 | r << 8 | g << 4 | b`;
//! pixels are host-endian words.

/// pixman x8r8g8b8, what VGA-class devices always send.
pub const X8R8G8B8: u32 = 0x2002_0888;
pub const A8R8G8B8: u32 = 0x2002_8888;
pub const X8B8G8R8: u32 = 0x2003_0888;
pub const A8B8G8R8: u32 = 0x2003_8888;
pub const B8G8R8X8: u32 = 0x2008_0888;
pub const B8G8R8A8: u32 = 0x2008_8888;
pub const R8G8B8X8: u32 = 0x2009_0888;
pub const R8G8B8A8: u32 = 0x2009_8888;
pub const R8G8B8: u32 = 0x1802_0888;
pub const B8G8R8: u32 = 0x1803_0888;
pub const R5G6B5: u32 = 0x1002_0565;
pub const X1R5G5B5: u32 = 0x1002_0555;

const TYPE_ARGB: u32 = 2;
const TYPE_ABGR: u32 = 3;
const TYPE_BGRA: u32 = 8;
const TYPE_RGBA: u32 = 9;

/// A format we can convert from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Format {
    code: u32,
    /// Bytes per pixel.
    pub bytes: usize,
    /// Bit position and width of each channel in the host-endian pixel word.
    r: (u32, u32),
    g: (u32, u32),
    b: (u32, u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unsupported pixman format {0:#010x}")]
pub struct UnsupportedFormat(pub u32);

impl Format {
    pub fn from_code(code: u32) -> Result<Self, UnsupportedFormat> {
        let bpp = code >> 24;
        let ty = (code >> 16) & 0xff;
        let a = (code >> 12) & 0xf;
        let r = (code >> 8) & 0xf;
        let g = (code >> 4) & 0xf;
        let b = code & 0xf;
        let bits = a + r + g + b;
        let ok_bpp = matches!(bpp, 16 | 24 | 32) && bits <= bpp && r > 0 && g > 0 && b > 0;
        if !ok_bpp {
            return Err(UnsupportedFormat(code));
        }
        // Channel positions, from the least significant bit, for each pixman type.
        let (rp, gp, bp) = match ty {
            TYPE_ARGB => (g + b, b, 0),
            TYPE_ABGR => (0, r, r + g),
            TYPE_BGRA => (bpp - b - g - r, bpp - b - g, bpp - b),
            TYPE_RGBA => (bpp - r, bpp - r - g, bpp - r - g - b),
            _ => return Err(UnsupportedFormat(code)),
        };
        let bytes = usize::try_from(bpp / 8).map_err(|_| UnsupportedFormat(code))?;
        Ok(Self {
            code,
            bytes,
            r: (rp, r),
            g: (gp, g),
            b: (bp, b),
        })
    }

    pub fn code(&self) -> u32 {
        self.code
    }

    /// Converts one row of `width` pixels from `src` into canonical pixels in `dst`.
    /// `src` must hold `width * bytes` bytes and `dst` `width` pixels.
    pub fn convert_row(&self, src: &[u8], dst: &mut [u32]) {
        if self.code == X8R8G8B8 || self.code == A8R8G8B8 {
            // Whole 4-byte arrays, not bytes: then the compiler loads and masks vectors (four
            // times faster; a byte-wise form was 12% of a 1080p animation's profile).
            let (pixels, _) = src.as_chunks::<4>();
            for (d, s) in dst.iter_mut().zip(pixels) {
                *d = u32::from_ne_bytes(*s) & 0x00ff_ffff;
            }
            return;
        }
        for (d, s) in dst.iter_mut().zip(src.chunks_exact(self.bytes)) {
            let word = match *s {
                [a, b] => u32::from(u16::from_ne_bytes([a, b])),
                // 24 bpp pixman formats are stored as three bytes, least significant first.
                [a, b, c] => u32::from_le_bytes([a, b, c, 0]),
                [a, b, c, e] => u32::from_ne_bytes([a, b, c, e]),
                _ => 0,
            };
            *d = (channel(word, self.r) << 16)
                | (channel(word, self.g) << 8)
                | channel(word, self.b);
        }
    }
}

/// Extracts a channel of `width` bits at `shift` and scales it to 8 bits.
fn channel(word: u32, (shift, width): (u32, u32)) -> u32 {
    let max = (1u32 << width) - 1;
    let v = (word >> shift) & max;
    if width == 8 {
        v
    } else {
        (v * 255 + max / 2) / max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(code: u32, bytes: &[u8]) -> u32 {
        let f = Format::from_code(code).unwrap();
        let mut out = [0u32; 1];
        f.convert_row(bytes, &mut out);
        out[0]
    }

    #[test]
    fn converts_every_32bpp_format() {
        // The colour 0x123456 (R=0x12, G=0x34, B=0x56) with alpha/padding 0xff.
        let cases = [
            (X8R8G8B8, 0xff12_3456u32),
            (A8R8G8B8, 0xff12_3456),
            (X8B8G8R8, 0xff56_3412),
            (A8B8G8R8, 0xff56_3412),
            (B8G8R8X8, 0x5634_12ff),
            (B8G8R8A8, 0x5634_12ff),
            (R8G8B8X8, 0x1234_56ff),
            (R8G8B8A8, 0x1234_56ff),
        ];
        for (code, word) in cases {
            assert_eq!(one(code, &word.to_ne_bytes()), 0x12_3456, "{code:#x}");
        }
    }

    #[test]
    fn x8r8g8b8_rows_of_every_length_match_pixel_by_pixel() {
        let f = Format::from_code(X8R8G8B8).unwrap();
        let src: Vec<u8> = (0..4 * 37).map(|i| (i * 7 + 3) as u8).collect();
        for w in 0..=37 {
            let mut out = vec![0xdead_beef; w];
            f.convert_row(&src[..w * 4], &mut out);
            for (i, &p) in out.iter().enumerate() {
                let b = &src[i * 4..i * 4 + 4];
                let want = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) & 0x00ff_ffff;
                assert_eq!(p, want, "pixel {i} of a row of {w}");
            }
        }
    }

    #[test]
    fn converts_16_and_24bpp() {
        assert_eq!(one(R8G8B8, &[0x56, 0x34, 0x12]), 0x12_3456);
        assert_eq!(one(B8G8R8, &[0x12, 0x34, 0x56]), 0x12_3456);
        assert_eq!(one(R5G6B5, &0xf800u16.to_ne_bytes()), 0xff_0000);
        assert_eq!(one(R5G6B5, &0x07e0u16.to_ne_bytes()), 0x00_ff00);
        assert_eq!(one(X1R5G5B5, &0x001fu16.to_ne_bytes()), 0x00_00ff);
    }

    #[test]
    fn rejects_nonsense_codes() {
        for code in [
            0,
            0x0802_0000,
            0x2007_0888,
            0x4002_0888,
            0x2002_0000,
            0x1002_0888,
        ] {
            assert!(Format::from_code(code).is_err(), "{code:#x}");
        }
    }
}
