//! One [`RectEncoder`] per pixel encoding (Raw, Hextile, ZRLE, Tight): canonical pixels of one
//! rectangle in, RFB bytes out. [`super::frame`] runs them on the encoder pool.

use super::encode::{Zrle, raw};
use super::hextile;
use super::proto::{PixelFormat, enc};
use super::tight::{self, Tight};
use crate::framebuffer::Rect;

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
