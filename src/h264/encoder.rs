//! One H.264 encoder for one console size: the framebuffer's damaged rows are converted to
//! I420 in place (the planes persist between frames, so a small change converts a small band)
//! and OpenH264 encodes the whole picture, which costs little where nothing changed (skipped
//! macroblocks).
//!
//! The stream is Constrained Baseline, Annex B, one slice per picture, its sizes padded to
//! multiples of 16 as MS-RDPEGFX's AVC420 requires; colours are BT.709 full range, what FreeRDP
//! and mstsc assume for AVC420 and what the SPS's VUI says for decoders that read it (browsers).

use anyhow::{Context, Result, bail};
use openh264::OpenH264API;
use openh264::encoder::{
    BitRate, Complexity, EncoderConfig, FrameRate, FrameType, IntraFramePeriod, Profile, QpRange,
    RateControlMode, SpsPpsStrategy, UsageType, VuiConfig,
};
use openh264::formats::YUVSlices;
use yuv::{
    BufferStoreMut, YuvConversionMode, YuvPlanarImageMut, YuvRange, YuvStandardMatrix,
    bgra_to_yuv420,
};

use crate::framebuffer::{Framebuffer, Rect};

// Framebuffer words are 0x00RRGGBB; read as bytes in memory order they must be B, G, R, X.
const _: () = assert!(
    cfg!(target_endian = "little"),
    "pixel words are read as BGRX bytes"
);

/// Largest side OpenH264's Level 5.2 (and RDP's 16-bit surfaces) take.
pub const MAX_SIDE: u32 = 4096;

/// Bits per pixel and second the rate control aims at: ~12 Mbit/s at 1080p (a third of what
/// RemoteFX sends for a moving 1080p screen at the same rate).
const BITS_PER_PIXEL_SECOND: u64 = 6;
/// Quantizer bounds: rate control may not go coarser than `MAX_QP` (text would smear; the
/// stream then takes more bytes instead) nor waste bytes finer than `MIN_QP`.
const MIN_QP: u8 = 16;
const MAX_QP: u8 = 34;

/// One encoded picture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Annex B NAL units (an IDR carries its SPS and PPS).
    pub data: Vec<u8>,
    pub key: bool,
}

/// Memory one encoder of a `width`x`height` console takes once it has coded a picture:
/// OpenH264's screen-content mode (reference pictures, its feature-search tables, the bitstream
/// buffer) and our I420 planes. Measured at 1920x1080: 55 MB more RSS after the first picture,
/// ~26.5 bytes per coded pixel; 28 leaves a margin. It decides whether a sidecar under a memory
/// limit may start H.264 at all (a 64 MB sidecar cannot hold a 1080p encoder).
pub fn memory_cost(width: u32, height: u32) -> u64 {
    28 * u64::from(align16(width)) * u64::from(align16(height))
}

/// `v` rounded up to a multiple of 16.
pub fn align16(v: u32) -> u32 {
    v.div_ceil(16) * 16
}

pub struct Encoder {
    width: u32,
    height: u32,
    /// Padded sizes: the picture OpenH264 codes.
    pw: u32,
    ph: u32,
    y: Vec<u8>,
    u: Vec<u8>,
    v: Vec<u8>,
    inner: openh264::encoder::Encoder,
    frame_rate: f32,
    /// The next picture must be an IDR (first picture, or asked for).
    key_next: bool,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "h264::Encoder({}x{})", self.width, self.height)
    }
}

impl Encoder {
    /// An encoder for a `width`x`height` console at up to `frame_rate` pictures per second.
    pub fn new(width: u32, height: u32, frame_rate: f32) -> Result<Self> {
        if width == 0 || height == 0 || width > MAX_SIDE || height > MAX_SIDE {
            bail!("{width}x{height} is outside what H.264 encoding here supports (1..={MAX_SIDE})");
        }
        let (pw, ph) = (align16(width), align16(height));
        let bitrate = u64::from(pw) * u64::from(ph) * BITS_PER_PIXEL_SECOND;
        let config = EncoderConfig::new()
            .usage_type(UsageType::ScreenContentRealTime)
            .profile(Profile::Baseline)
            .complexity(Complexity::Low)
            .rate_control_mode(RateControlMode::Bitrate)
            .bitrate(BitRate::from_bps(
                u32::try_from(bitrate).unwrap_or(u32::MAX),
            ))
            .qp(QpRange::new(MIN_QP, MAX_QP))
            .max_frame_rate(FrameRate::from_hz(frame_rate))
            // A skipped picture would leave a viewer's screen behind the framebuffer (OpenH264
            // warns once that the bit rate is then only a target).
            .skip_frames(false)
            // Not available for screen content (OpenH264 would turn them off with a warning).
            .adaptive_quantization(false)
            .background_detection(false)
            // IDRs only when a viewer needs one; every IDR repeats SPS and PPS.
            .intra_frame_period(IntraFramePeriod::from_num_frames(0))
            .sps_pps_strategy(SpsPpsStrategy::ConstantId)
            // One slice, one thread: the caller runs encoders off the async threads and a
            // sidecar's CPU budget is a fraction of a core.
            .num_threads(1)
            .vui(VuiConfig::bt709_full());
        let inner = openh264::encoder::Encoder::with_api_config(OpenH264API::from_source(), config)
            .context("OpenH264 encoder")?;
        let (cw, ch) = (pw / 2, ph / 2);
        Ok(Self {
            width,
            height,
            pw,
            ph,
            // Black in full range; the padding stays black and is cropped by every decoder.
            y: vec![0; (pw * ph) as usize],
            u: vec![128; (cw * ch) as usize],
            v: vec![128; (cw * ch) as usize],
            inner,
            frame_rate,
            key_next: true,
        })
    }

    pub fn size(&self) -> (u32, u32) {
        (self.width, self.height)
    }

    /// The coded (padded) size.
    pub fn coded_size(&self) -> (u32, u32) {
        (self.pw, self.ph)
    }

    /// Whether the next picture will be an IDR.
    pub fn wants_key(&self) -> bool {
        self.key_next
    }

    /// The next picture will be an IDR.
    pub fn force_key(&mut self) {
        self.key_next = true;
    }

    /// Converts the rows `rects` touch from `fb` (which must be this encoder's size) and
    /// encodes a picture. `None` when the framebuffer no longer has this size.
    pub fn encode(&mut self, fb: &Framebuffer, rects: &[Rect]) -> Result<Option<Encoded>> {
        for band in bands(rects, self.height) {
            if !self.convert(fb, band)? {
                return Ok(None);
            }
        }
        if self.key_next {
            self.inner.force_intra_frame();
        }
        let yuv = YUVSlices::new(
            (&self.y, &self.u, &self.v),
            (self.pw as usize, self.ph as usize),
            (self.pw as usize, self.pw as usize / 2, self.pw as usize / 2),
        );
        let stream = self.inner.encode(&yuv).context("OpenH264 encode")?;
        let key = matches!(stream.frame_type(), FrameType::IDR | FrameType::I);
        let mut data = Vec::new();
        stream.write_vec(&mut data);
        if data.is_empty() {
            // Rate control dropped the picture although skipping is off: ask again next time.
            return Ok(Some(Encoded { data, key: false }));
        }
        if key {
            self.key_next = false;
        }
        Ok(Some(Encoded { data, key }))
    }

    /// Converts rows `band.0..band.1` (the start even) into the planes.
    fn convert(&mut self, fb: &Framebuffer, band: (u32, u32)) -> Result<bool> {
        let (y0, y1) = band;
        let (w, pw) = (self.width, self.pw);
        let rows = y1 - y0;
        let y_plane = &mut self.y[(y0 * pw) as usize..(y1 * pw) as usize];
        let c0 = (y0 / 2 * pw / 2) as usize;
        let c1 = (y1.div_ceil(2) * pw / 2) as usize;
        let (u_plane, v_plane) = (&mut self.u[c0..c1], &mut self.v[c0..c1]);
        let mut result = Ok(());
        let mut same = true;
        fb.with_band(y0, y1, |pixels, width, height| {
            if width != self.width || height != self.height {
                same = false;
                return;
            }
            let mut image = YuvPlanarImageMut {
                y_plane: BufferStoreMut::Borrowed(y_plane),
                y_stride: pw,
                u_plane: BufferStoreMut::Borrowed(u_plane),
                u_stride: pw / 2,
                v_plane: BufferStoreMut::Borrowed(v_plane),
                v_stride: pw / 2,
                width: w,
                height: rows,
            };
            result = bgra_to_yuv420(
                &mut image,
                bytemuck::cast_slice(pixels),
                w * 4,
                YuvRange::Full,
                YuvStandardMatrix::Bt709,
                YuvConversionMode::Balanced,
            )
            .map_err(|e| anyhow::anyhow!("BGRX to I420: {e:?}"));
        });
        result?;
        Ok(same)
    }

    pub fn frame_rate(&self) -> f32 {
        self.frame_rate
    }
}

/// The full-width row bands `rects` touch, merged, starting on even rows (a chroma row covers
/// two) and clipped to `height`.
pub fn bands(rects: &[Rect], height: u32) -> Vec<(u32, u32)> {
    let mut spans: Vec<(u32, u32)> = rects
        .iter()
        .filter(|r| r.w > 0 && r.h > 0 && r.y < height)
        .map(|r| (r.y & !1, (r.y + r.h).min(height)))
        .collect();
    spans.sort_unstable();
    let mut out: Vec<(u32, u32)> = Vec::with_capacity(spans.len());
    for (a, b) in spans {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    // An odd end inside the picture would leave the chroma row it shares half converted.
    for band in &mut out {
        if band.1 % 2 == 1 && band.1 < height {
            band.1 += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pixman::X8R8G8B8;
    use openh264::decoder::Decoder;
    use openh264::formats::YUVSource;

    fn frame(w: u32, h: u32, px: impl Fn(u32, u32) -> u32) -> Vec<u8> {
        (0..h)
            .flat_map(|y| (0..w).map(move |x| (x, y)))
            .flat_map(|(x, y)| px(x, y).to_ne_bytes())
            .collect()
    }

    #[test]
    fn bands_merge_and_start_even() {
        let r = |y, h| Rect { x: 3, y, w: 5, h };
        assert_eq!(
            bands(&[r(5, 2), r(6, 10), r(40, 1)], 100),
            [(4, 16), (40, 42)]
        );
        assert_eq!(bands(&[r(98, 10)], 99), [(98, 99)]);
        assert!(bands(&[r(200, 1)], 100).is_empty());
    }

    /// The stream decodes (OpenH264's own decoder) to the picture, at the padded size, and a
    /// later picture with a small change is a much smaller P picture.
    #[test]
    fn encodes_a_decodable_stream_and_small_changes_cost_little() {
        let (w, h) = (100, 60);
        let fb = Framebuffer::new();
        let colour = |x: u32, _y: u32| if x < 50 { 0x00ff_0000 } else { 0x0000_00ff };
        fb.scanout(w, h, w * 4, X8R8G8B8, &frame(w, h, colour))
            .expect("scanout");
        let mut enc = Encoder::new(w, h, 30.0).expect("encoder");
        assert_eq!(enc.coded_size(), (112, 64));
        let first = enc
            .encode(&fb, &[Rect::full(w, h)])
            .expect("encode")
            .expect("same size");
        assert!(first.key, "the first picture is an IDR");
        // SPS (type 7) first, Annex B start code.
        assert_eq!(&first.data[..4], &[0, 0, 0, 1]);
        assert_eq!(first.data[4] & 0x1f, 7);

        let mut dec = Decoder::new().expect("decoder");
        let pic = dec.decode(&first.data).expect("decode").expect("a picture");
        assert_eq!(pic.dimensions(), (112, 64));
        // Red in full-range BT.709: Y = 0.2126 * 255 = 54, V = 255.
        let y = pic.y()[10 * pic.strides().0 + 10];
        let v = pic.v()[5 * pic.strides().2 + 5];
        assert!((50..=60).contains(&y), "luma of red: {y}");
        assert!(v > 220, "red's Cr: {v}");

        fb.update(
            10,
            10,
            4,
            4,
            16,
            X8R8G8B8,
            &frame(4, 4, |_, _| 0x00ff_ffff),
            false,
        )
        .expect("update");
        let second = enc
            .encode(
                &fb,
                &[Rect {
                    x: 10,
                    y: 10,
                    w: 4,
                    h: 4,
                }],
            )
            .expect("encode")
            .expect("same size");
        assert!(!second.key);
        assert!(
            second.data.len() * 4 < first.data.len(),
            "P picture {} bytes vs IDR {}",
            second.data.len(),
            first.data.len()
        );
        let pic = dec
            .decode(&second.data)
            .expect("decode")
            .expect("a picture");
        let y = pic.y()[11 * pic.strides().0 + 11];
        assert!(y > 200, "the white square: {y}");

        enc.force_key();
        let third = enc.encode(&fb, &[]).expect("encode").expect("same size");
        assert!(third.key, "asked for an IDR");
    }

    #[test]
    fn a_resized_framebuffer_is_not_encoded_at_the_old_size() {
        let fb = Framebuffer::new();
        fb.scanout(32, 32, 128, X8R8G8B8, &frame(32, 32, |_, _| 0))
            .expect("scanout");
        let mut enc = Encoder::new(32, 32, 30.0).expect("encoder");
        fb.scanout(64, 32, 256, X8R8G8B8, &frame(64, 32, |_, _| 0))
            .expect("scanout");
        assert_eq!(
            enc.encode(&fb, &[Rect::full(32, 32)]).expect("encode"),
            None
        );
    }

    #[test]
    fn sizes_outside_the_level_are_refused() {
        assert!(Encoder::new(0, 10, 30.0).is_err());
        assert!(Encoder::new(8192, 10, 30.0).is_err());
    }
}
