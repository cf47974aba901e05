//! The shared framebuffer as ironrdp-server's display: damage becomes `Bitmap` updates (the
//! server diffs and encodes them with the codec the client negotiated), size changes become
//! `Resize`, the cursor image and visibility follow QEMU, and the client's monitor layout asks
//! the guest for a new mode.

use std::collections::VecDeque;
use std::num::{NonZeroU16, NonZeroUsize};
use std::sync::Arc;

use anyhow::Result;
use bytes::Bytes;
use ironrdp::displaycontrol::pdu::DisplayControlMonitorLayout;
use ironrdp_server::{
    BitmapUpdate, DesktopSize, DisplayUpdate, PixelFormat, RGBAPointer, RdpServerDisplay,
    RdpServerDisplayUpdates,
};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::gfx::GfxLink;
use super::gfx_display::GfxView;
use crate::framebuffer::{Cursor, Framebuffer, Rect, Viewer};
use crate::h264::Video;
use crate::qemu::control::ConsoleControl;
use crate::session::budget::Budget;
use crate::session::stats::ViewerStats;

/// Desktop size announced while no display is attached yet.
const DETACHED_SIZE: DesktopSize = DesktopSize {
    width: 640,
    height: 480,
};
/// RDP desktops are limited to 16-bit sizes and clients cap them further.
const MAX_SIDE: u32 = 8192;
/// More damage rectangles than this are sent as their bounding box.
const MAX_RECTS: usize = 16;
/// Largest bitmap handed to ironrdp at once. It copies each bitmap two or three times while
/// encoding (rows flipped, the surface command, its fragments), so a whole 1080p frame at once
/// took ~30 MB more and got a 64 MB sidecar OOM-killed; bands are read from the framebuffer
/// only when ironrdp asks for the next update. Bands are whole 64-row strips (at most 1 MB at
/// the widest console).
const BAND_BYTES: u32 = 512 * 1024;
/// Largest pointer a client without the large-pointer capability accepts.
const MAX_POINTER: u32 = 96;

/// The display handler of one RDP session.
pub struct Display {
    fb: Framebuffer,
    control: ConsoleControl,
    /// Set when the session is activated (the server asks for updates only after the client
    /// authenticated and finished the connection sequence).
    activated: watch::Sender<bool>,
    stats: ViewerStats,
    /// The graphics pipeline and the console's H.264 stream, when H.264 is offered.
    gfx: Option<H264>,
}

/// What a session needs to send H.264.
#[derive(Clone)]
pub struct H264 {
    pub link: GfxLink,
    pub video: Video,
    /// Stillness after which lossy areas are sent losslessly; `None`: never.
    pub lossless_after: Option<std::time::Duration>,
    /// Whether the stream's encoder fits the memory limit (it is started for the first client).
    pub budget: Arc<Budget>,
}

/// How long a client that H.264 did not fit for stays on bitmaps before it is tried again.
const H264_RETRY: std::time::Duration = std::time::Duration::from_secs(30);

impl Display {
    pub fn new(
        fb: Framebuffer,
        control: ConsoleControl,
        activated: watch::Sender<bool>,
        stats: ViewerStats,
    ) -> Self {
        Self {
            fb,
            control,
            activated,
            stats,
            gfx: None,
        }
    }

    /// Sends H.264 once the client has confirmed over the pipeline that it takes it.
    pub fn with_h264(mut self, h264: H264) -> Self {
        self.gfx = Some(h264);
        self
    }
}

/// The desktop size to announce for a `w`x`h` surface (a placeholder while there is none).
fn desktop_size(w: u32, h: u32) -> DesktopSize {
    match (
        u16::try_from(w.min(MAX_SIDE)),
        u16::try_from(h.min(MAX_SIDE)),
    ) {
        (Ok(width), Ok(height)) if width > 0 && height > 0 => DesktopSize { width, height },
        _ => DETACHED_SIZE,
    }
}

#[async_trait::async_trait]
impl RdpServerDisplay for Display {
    async fn size(&mut self) -> DesktopSize {
        let (w, h) = self.fb.size();
        desktop_size(w, h)
    }

    async fn updates(&mut self) -> Result<Box<dyn RdpServerDisplayUpdates>> {
        self.activated.send_replace(true);
        let (w, h) = self.fb.size();
        let size = desktop_size(w, h);
        debug!(
            width = size.width,
            height = size.height,
            "RDP display activated"
        );
        Ok(Box::new(Updates {
            viewer: self.fb.viewer(),
            size,
            pending: VecDeque::new(),
            bands: VecDeque::new(),
            cursor_serial: 0,
            pointer_visible: true,
            stats: self.stats.clone(),
            gfx: self.gfx.clone(),
            h264: None,
            h264_retry: None,
        }))
    }

    fn request_layout(&mut self, layout: DisplayControlMonitorLayout) {
        let Some(m) = layout
            .monitors()
            .iter()
            .find(|m| m.is_primary())
            .or_else(|| layout.monitors().first())
        else {
            return;
        };
        let (w, h) = m.dimensions();
        let Some((w, h)) = requested_size(w, h) else {
            warn!(
                width = w,
                height = h,
                "monitor layout outside 200..=8192 ignored"
            );
            return;
        };
        let control = self.control.clone();
        info!(width = w, height = h, "client asks for a new desktop size");
        // Called from a blocking thread of the session's runtime: hand the D-Bus call to a task.
        tokio::spawn(async move {
            if let Err(e) = control.set_ui_info(w, h).await {
                warn!(error = %e, width = w, height = h, "guest resize not passed on");
            }
        });
    }
}

struct Updates {
    viewer: Viewer,
    /// The size the client was last told.
    size: DesktopSize,
    pending: VecDeque<DisplayUpdate>,
    /// Damage still to send as bitmaps, in bands of at most [`BAND_BYTES`].
    bands: VecDeque<Rect>,
    cursor_serial: u64,
    pointer_visible: bool,
    stats: ViewerStats,
    gfx: Option<H264>,
    /// Set while pictures go out over the graphics pipeline instead of bitmaps.
    h264: Option<GfxView>,
    /// H.264 did not fit the memory limit: bitmaps until then.
    h264_retry: Option<std::time::Instant>,
}

impl Updates {
    /// Turns what changed since the last call into updates.
    fn collect(&mut self) {
        let damage = self.viewer.take_damage();
        self.collect_pointer();
        if self.h264.is_some() {
            // Pictures come from the shared H.264 stream; only the pointer goes this way.
            return;
        }
        if !damage.attached && damage.width == 0 {
            return;
        }
        let now = desktop_size(damage.width, damage.height);
        if now != self.size {
            // The server deactivates, reactivates with `size()` and asks for a new update
            // stream, which starts with a full frame.
            self.size = now;
            self.bands.clear();
            self.pending.push_back(DisplayUpdate::Resize(now));
            return;
        }
        let mut rects = damage.rects;
        if rects.len() > MAX_RECTS {
            rects = Rect::bounding(&rects).into_iter().collect();
        }
        let mut sent = 0;
        for r in rects {
            // Whole 64-row tiles (RemoteFX codes 64x64 tiles: a cut tile would be coded twice).
            let rows = (BAND_BYTES / (r.w.max(1) * 4) / 64 * 64).max(64);
            let mut y = r.y;
            while y < r.y + r.h {
                let h = rows.min(r.y + r.h - y);
                self.bands.push_back(Rect { y, h, ..r });
                sent += 1;
                y += h;
            }
        }
        if sent > 0 {
            self.stats.add(|c| &c.updates, 1);
            self.stats.add(|c| &c.rects, sent);
        }
    }

    /// The next update already decided: queued ones first, then the next band of damage, read
    /// from the framebuffer now (its pixels newer than the damage said, never older).
    fn pop_ready(&mut self) -> Option<DisplayUpdate> {
        if let Some(u) = self.pending.pop_front() {
            return Some(u);
        }
        let fb = self.viewer.framebuffer().clone();
        while let Some(r) = self.bands.pop_front() {
            if let Some(b) = self.bitmap(&fb, r) {
                return Some(DisplayUpdate::Bitmap(b));
            }
        }
        None
    }

    /// Queues pointer shape and visibility changes.
    fn collect_pointer(&mut self) {
        let fb = self.viewer.framebuffer().clone();
        let (cursor, serial, pointer) = fb.cursor();
        if serial != self.cursor_serial {
            self.cursor_serial = serial;
            if let Some(c) = cursor.as_deref() {
                self.pending.push_back(pointer_update(c));
            }
        }
        if pointer.visible != self.pointer_visible {
            self.pointer_visible = pointer.visible;
            self.pending
                .push_back(match (pointer.visible, cursor.as_deref()) {
                    (false, _) => DisplayUpdate::HidePointer,
                    (true, Some(c)) => pointer_update(c),
                    (true, None) => DisplayUpdate::DefaultPointer,
                });
        }
    }

    fn bitmap(&self, fb: &Framebuffer, r: Rect) -> Option<BitmapUpdate> {
        // Canonical pixels are 0x00RRGGBB words: little-endian bytes B, G, R, X.
        let mut data = Vec::with_capacity(r.w as usize * r.h as usize * 4);
        let r = fb.read_rect_le(r, &mut data);
        let (x, y) = (u16::try_from(r.x).ok()?, u16::try_from(r.y).ok()?);
        let width = NonZeroU16::new(u16::try_from(r.w).ok()?)?;
        let height = NonZeroU16::new(u16::try_from(r.h).ok()?)?;
        if u32::from(x) + r.w > u32::from(self.size.width)
            || u32::from(y) + r.h > u32::from(self.size.height)
        {
            return None;
        }
        Some(BitmapUpdate {
            x,
            y,
            width,
            height,
            format: PixelFormat::BgrX32,
            data: Bytes::from(data),
            stride: NonZeroUsize::new(r.w as usize * 4)?,
        })
    }
}

#[async_trait::async_trait]
impl RdpServerDisplayUpdates for Updates {
    async fn next_update(&mut self) -> Result<Option<DisplayUpdate>> {
        // Cancel safe: every wait consumes nothing; everything after one is synchronous.
        loop {
            if let Some(u) = self.pop_ready() {
                return Ok(Some(u));
            }
            if let Some(view) = self.h264.as_mut() {
                if !view.active() {
                    // The client closed the pipeline: bitmaps again, from a full frame.
                    info!("RDP graphics pipeline closed: back to bitmaps");
                    self.h264 = None;
                    self.viewer = self.viewer.framebuffer().viewer();
                    continue;
                }
                tokio::select! {
                    wake = view.wait() => view.handle(wake)?,
                    _ = self.viewer.changed() => self.collect(),
                }
                continue;
            }
            let waiting = self
                .h264_retry
                .is_some_and(|t| std::time::Instant::now() < t);
            match &self.gfx {
                Some(g) if g.link.avc_ready() && !waiting => {
                    match g.budget.reserve_encoder(&g.video) {
                        Ok(()) => {
                            self.h264_retry = None;
                            self.h264 = Some(GfxView::new(
                                g.link.clone(),
                                &g.video,
                                self.stats.clone(),
                                g.lossless_after,
                            ));
                        }
                        Err(e) => {
                            warn!(error = %e, "H.264 does not fit the memory limit: bitmaps for now");
                            self.h264_retry = Some(std::time::Instant::now() + H264_RETRY);
                        }
                    }
                }
                Some(g) if !g.link.avc_refused() && !g.link.avc_ready() => {
                    tokio::select! {
                        _ = self.viewer.changed() => self.collect(),
                        _ = g.link.changed() => {}
                    }
                }
                _ => {
                    self.viewer.changed().await;
                    self.collect();
                }
            }
        }
    }
}

/// A client's monitor size, if MS-RDPEDISP allows it (200..=8192 each way); the width is made
/// even as the spec requires. Anything else never reaches the guest.
fn requested_size(w: u32, h: u32) -> Option<(u32, u32)> {
    let ok = |v: u32| (200..=MAX_SIDE).contains(&v);
    (ok(w) && ok(h)).then_some((w & !1, h))
}

/// A 32-bit pointer: BGRA rows, bottom-up as in a DIB. Cursors larger than every client accepts
/// fall back to the default arrow.
fn pointer_update(c: &Cursor) -> DisplayUpdate {
    let fits = c.width > 0 && c.height > 0 && c.width <= MAX_POINTER && c.height <= MAX_POINTER;
    if !fits || c.argb.len() < (c.width * c.height) as usize {
        return DisplayUpdate::DefaultPointer;
    }
    let w = c.width as usize;
    let mut data = Vec::with_capacity(c.argb.len() * 4);
    for row in c.argb.chunks_exact(w).take(c.height as usize).rev() {
        for px in row {
            data.extend_from_slice(&px.to_le_bytes());
        }
    }
    DisplayUpdate::RGBAPointer(RGBAPointer {
        cache_index: 0,
        width: c.width as u16,
        height: c.height as u16,
        hot_x: c.hot_x.min(c.width - 1) as u16,
        hot_y: c.hot_y.min(c.height - 1) as u16,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pixman::X8R8G8B8;

    fn frame(w: u32, h: u32, px: u32) -> Vec<u8> {
        std::iter::repeat_n(px.to_ne_bytes(), (w * h) as usize)
            .flatten()
            .collect()
    }

    fn updates(fb: &Framebuffer) -> Updates {
        let (w, h) = fb.size();
        Updates {
            viewer: fb.viewer(),
            size: desktop_size(w, h),
            pending: VecDeque::new(),
            bands: VecDeque::new(),
            cursor_serial: 0,
            pointer_visible: true,
            stats: ViewerStats::new(&std::sync::Arc::default()),
            gfx: None,
            h264: None,
            h264_retry: None,
        }
    }

    #[test]
    fn full_frame_first_then_damage_as_bgrx() {
        let fb = Framebuffer::new();
        fb.scanout(8, 4, 32, X8R8G8B8, &frame(8, 4, 0x00112233))
            .expect("scanout");
        let mut u = updates(&fb);
        u.collect();
        let Some(DisplayUpdate::Bitmap(b)) = u.pop_ready() else {
            panic!("no full frame");
        };
        assert_eq!((b.x, b.y, b.width.get(), b.height.get()), (0, 0, 8, 4));
        assert_eq!(b.format, PixelFormat::BgrX32);
        assert_eq!(&b.data[..4], &[0x33, 0x22, 0x11, 0x00]);
        fb.update(2, 1, 3, 2, 12, X8R8G8B8, &frame(3, 2, 0x00abcdef), false)
            .expect("update");
        u.collect();
        let Some(DisplayUpdate::Bitmap(b)) = u.pop_ready() else {
            panic!("no damage");
        };
        assert_eq!((b.x, b.y, b.width.get(), b.height.get()), (2, 1, 3, 2));
        assert_eq!(b.stride.get(), 12);
        assert_eq!(&b.data[..4], &[0xef, 0xcd, 0xab, 0x00]);
    }

    #[test]
    fn a_large_frame_goes_out_in_small_bands_read_when_asked() {
        let (w, h) = (1920, 1080);
        let fb = Framebuffer::new();
        fb.scanout(w, h, w * 4, X8R8G8B8, &frame(w, h, 0x0000_0001))
            .expect("scanout");
        let mut u = updates(&fb);
        u.collect();
        assert!(
            u.pending.is_empty(),
            "nothing copied before it is asked for"
        );
        // Changed after the damage was taken: the band read later has the new pixels.
        fb.update(
            0,
            0,
            w as i32,
            1,
            w * 4,
            X8R8G8B8,
            &frame(w, 1, 0x0000_0002),
            false,
        )
        .expect("update");
        let mut rows = 0;
        let mut first = true;
        while let Some(DisplayUpdate::Bitmap(b)) = u.pop_ready() {
            assert!(
                b.data.len() <= BAND_BYTES as usize,
                "{} bytes",
                b.data.len()
            );
            assert_eq!((b.x, u32::from(b.width.get())), (0, w));
            assert_eq!(u32::from(b.y), rows, "bands in order, no gap");
            if first {
                assert_eq!(&b.data[..4], &[2, 0, 0, 0]);
                first = false;
            }
            rows += u32::from(b.height.get());
        }
        assert_eq!(rows, h, "the bands cover the frame");
    }

    #[test]
    fn mode_switch_is_a_resize() {
        let fb = Framebuffer::new();
        fb.scanout(8, 4, 32, X8R8G8B8, &frame(8, 4, 1))
            .expect("scanout");
        let mut u = updates(&fb);
        u.collect();
        u.pending.clear();
        u.bands.clear();
        fb.scanout(16, 8, 64, X8R8G8B8, &frame(16, 8, 2))
            .expect("scanout");
        u.collect();
        assert!(matches!(
            u.pending.pop_front(),
            Some(DisplayUpdate::Resize(DesktopSize {
                width: 16,
                height: 8
            }))
        ));
        assert!(u.pending.is_empty());
    }

    #[test]
    fn cursor_rows_are_bottom_up_and_hiding_works() {
        let fb = Framebuffer::new();
        fb.scanout(8, 4, 32, X8R8G8B8, &frame(8, 4, 1))
            .expect("scanout");
        let mut u = updates(&fb);
        u.collect();
        u.pending.clear();
        u.bands.clear();
        fb.set_cursor(Cursor {
            width: 2,
            height: 2,
            hot_x: 1,
            hot_y: 0,
            argb: vec![0xff00_0001, 0xff00_0002, 0xff00_0003, 0xff00_0004],
        });
        u.collect();
        let Some(DisplayUpdate::RGBAPointer(p)) = u.pending.pop_front() else {
            panic!("no pointer");
        };
        assert_eq!((p.width, p.height, p.hot_x, p.hot_y), (2, 2, 1, 0));
        assert_eq!(&p.data[..4], &[3, 0, 0, 0xff]);
        fb.set_pointer(crate::framebuffer::Pointer {
            x: 0,
            y: 0,
            visible: false,
        });
        u.collect();
        assert!(matches!(
            u.pending.pop_front(),
            Some(DisplayUpdate::HidePointer)
        ));
    }

    #[test]
    fn monitor_layouts_are_bounded() {
        assert_eq!(requested_size(1000, 700), Some((1000, 700)));
        assert_eq!(requested_size(1001, 700), Some((1000, 700)));
        assert_eq!(requested_size(100_000, 700), None);
        assert_eq!(requested_size(0, 0), None);
        assert_eq!(requested_size(8192, 8192), Some((8192, 8192)));
    }
}
