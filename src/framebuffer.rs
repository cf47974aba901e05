//! The shared display model the VNC, RDP and web servers read: the current pixels of a console,
//! its size, a damage log every consumer reads at its own pace, and the cursor.
//!
//! Writers (the QEMU listener) only copy into it and record damage; they never wait for a
//! consumer. Each consumer ([`Viewer`]) remembers the last damage sequence number it saw, so a slow
//! viewer gets one merged "everything changed" instead of slowing QEMU or other viewers.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{Notify, watch};

use crate::pixman::{Format, UnsupportedFormat};

/// Largest surface we accept from QEMU: 8K UHD. Bounds memory whatever QEMU claims.
pub const MAX_WIDTH: u32 = 8192;
pub const MAX_HEIGHT: u32 = 8192;
pub const MAX_PIXELS: u64 = 7680 * 4320;
/// Largest surface an `Update` beyond the current size may grow it to (4K UHD, 33 MB).
pub const MAX_GROWN_PIXELS: u64 = 3840 * 2160;
/// Damage entries kept; a viewer further behind gets a full refresh.
const DAMAGE_LOG: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub w: u32,
    pub h: u32,
}

impl Rect {
    pub fn full(width: u32, height: u32) -> Self {
        Self {
            x: 0,
            y: 0,
            w: width,
            h: height,
        }
    }

    /// The smallest rectangle covering both.
    pub fn union(&self, b: &Rect) -> Rect {
        let (x0, y0) = (self.x.min(b.x), self.y.min(b.y));
        let x1 = (self.x + self.w).max(b.x + b.w);
        let y1 = (self.y + self.h).max(b.y + b.h);
        Rect {
            x: x0,
            y: y0,
            w: x1 - x0,
            h: y1 - y0,
        }
    }

    /// The smallest rectangle covering all of `rects` (`None` for none).
    pub fn bounding(rects: &[Rect]) -> Option<Rect> {
        let (first, rest) = rects.split_first()?;
        Some(rest.iter().fold(*first, |a, r| a.union(r)))
    }

    pub fn overlaps(&self, b: &Rect) -> bool {
        self.x < b.x + b.w && b.x < self.x + self.w && self.y < b.y + b.h && b.y < self.y + self.h
    }
}

/// Why a frame from QEMU was refused (logged by the caller; the model is left as it was).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error(
        "surface {width}x{height} is empty or larger than {MAX_WIDTH}x{MAX_HEIGHT} / {MAX_PIXELS} pixels"
    )]
    BadSize { width: u32, height: u32 },
    #[error(transparent)]
    Format(#[from] UnsupportedFormat),
    #[error("stride {stride} is smaller than {width} pixels of {bytes} bytes")]
    BadStride {
        stride: u32,
        width: u32,
        bytes: usize,
    },
    #[error("{got} bytes of pixel data, {need} needed")]
    ShortData { got: usize, need: usize },
    #[error("update {x},{y} {w}x{h} is outside the {width}x{height} surface")]
    OutOfBounds {
        x: i32,
        y: i32,
        w: i32,
        h: i32,
        width: u32,
        height: u32,
    },
}

/// Cursor image from `CursorDefine`: canonical ARGB pixels (alpha kept in the top byte).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Cursor {
    pub width: u32,
    pub height: u32,
    pub hot_x: u32,
    pub hot_y: u32,
    pub argb: Vec<u32>,
}

/// Pointer position and visibility from `MouseSet` (visible until QEMU says otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pointer {
    pub x: i32,
    pub y: i32,
    pub visible: bool,
}

impl Default for Pointer {
    fn default() -> Self {
        Self {
            x: 0,
            y: 0,
            visible: true,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    width: u32,
    height: u32,
    pixels: Vec<u32>,
    /// Bumped on every resize and whenever the display goes away: consumers resend everything.
    generation: u64,
    /// Sequence number of the newest damage entry.
    seq: u64,
    log: VecDeque<(u64, Rect)>,
    attached: bool,
    cursor: Option<Arc<Cursor>>,
    cursor_serial: u64,
    pointer: Pointer,
    /// The newest damage sequence number a consumer has taken: frames after it wait for one.
    taken: u64,
    /// The next `Scanout` waited in QEMU's socket while the console changed size: if its size
    /// is not the current one, it is older than that change and is dropped.
    stale_scanout: bool,
}

/// Which delivery path frames came through (for logs, tests and benchmarks).
#[derive(Debug, Default)]
pub struct PathCounters {
    pub scanout: AtomicU64,
    pub update: AtomicU64,
    pub scanout_map: AtomicU64,
    pub update_map: AtomicU64,
    /// Surface size changes that came without a Scanout (QEMU 10.0's resize bug).
    pub resized_without_scanout: AtomicU64,
    /// Scanouts dropped as older than a console resize (they waited in the socket meanwhile).
    pub stale_scanout: AtomicU64,
    /// Inline frames the listener socket read into its reused buffer (`qemu::parked`).
    pub parked: AtomicU64,
}

impl PathCounters {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// A shared, cheaply cloned console model.
#[derive(Clone)]
pub struct Framebuffer {
    state: Arc<Mutex<State>>,
    notify: Arc<watch::Sender<u64>>,
    /// Woken when a consumer takes newer damage (the listener's socket waits on it).
    taken: Arc<Notify>,
    counters: Arc<PathCounters>,
}

impl std::fmt::Debug for Framebuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (w, h) = self.size();
        write!(f, "Framebuffer({w}x{h})")
    }
}

impl Default for Framebuffer {
    fn default() -> Self {
        Self::new()
    }
}

/// A copy of the whole surface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub width: u32,
    pub height: u32,
    pub generation: u64,
    pub attached: bool,
    pub pixels: Vec<u32>,
}

fn check_size(width: u32, height: u32) -> Result<usize, FrameError> {
    let n = u64::from(width) * u64::from(height);
    if width == 0 || height == 0 || width > MAX_WIDTH || height > MAX_HEIGHT || n > MAX_PIXELS {
        return Err(FrameError::BadSize { width, height });
    }
    usize::try_from(n).map_err(|_| FrameError::BadSize { width, height })
}

/// Bytes needed for `rows` rows of `width` pixels at `stride`: the last row need not be padded.
fn needed(stride: usize, rows: usize, width: usize, bytes: usize) -> usize {
    if rows == 0 {
        0
    } else {
        stride * (rows - 1) + width * bytes
    }
}

impl Framebuffer {
    pub fn new() -> Self {
        let (tx, _) = watch::channel(0);
        Self {
            state: Arc::new(Mutex::new(State::default())),
            notify: Arc::new(tx),
            taken: Arc::new(Notify::new()),
            counters: Arc::default(),
        }
    }

    /// Whether both handles are the same console's model.
    pub fn same(&self, other: &Framebuffer) -> bool {
        Arc::ptr_eq(&self.state, &other.state)
    }

    pub fn counters(&self) -> &PathCounters {
        &self.counters
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave pixels inconsistent in a way that matters
        // more than losing the display; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn damage(&self, st: &mut State, r: Rect) {
        st.seq += 1;
        if st.log.len() == DAMAGE_LOG {
            st.log.pop_front();
        }
        let seq = st.seq;
        st.log.push_back((seq, r));
        self.notify.send_replace(seq);
        self.taken.notify_waiters();
    }

    /// Changes the size, keeping the pixels of the region both sizes share (Console
    /// `Width`/`Height` changes arrive on the bus, unordered with the frames on the listener).
    fn resize_locked(&self, st: &mut State, width: u32, height: u32) -> Result<(), FrameError> {
        let n = check_size(width, height)?;
        if st.width != width || st.height != height || !st.attached {
            let old = std::mem::take(&mut st.pixels);
            let (ow, oh) = (st.width, st.height);
            st.pixels = vec![0; n];
            copy_old(&mut st.pixels, width, height, &old, ow, oh);
            st.width = width;
            st.height = height;
            st.generation += 1;
            st.log.clear();
        }
        st.attached = true;
        Ok(())
    }

    /// The surface changed size (a `Scanout`, a `ScanoutMap`, or Console `Width`/`Height`).
    /// Pixels are kept where the size did not change.
    pub fn resize(&self, width: u32, height: u32) -> Result<(), FrameError> {
        let mut st = self.lock();
        let changed = st.width != width || st.height != height || !st.attached;
        self.resize_locked(&mut st, width, height)?;
        if changed {
            self.damage(&mut st, Rect::full(width, height));
        }
        Ok(())
    }

    /// A size QEMU announced without pixels (Console `Width`/`Height`): as [`Self::resize`], but
    /// only up to [`MAX_GROWN_PIXELS`]; a larger surface comes with its Scanout.
    pub fn resize_hint(&self, width: u32, height: u32) -> Result<(), FrameError> {
        if u64::from(width) * u64::from(height) > MAX_GROWN_PIXELS {
            return Err(FrameError::BadSize { width, height });
        }
        self.resize(width, height)
    }

    /// `Scanout`: a whole new surface.
    pub fn scanout(
        &self,
        width: u32,
        height: u32,
        stride: u32,
        format: u32,
        data: &[u8],
    ) -> Result<(), FrameError> {
        let fmt = Format::from_code(format)?;
        check_size(width, height)?;
        // The pixels must be there before the surface is sized for them: a Scanout claiming
        // 8K with a few bytes would otherwise cost a 132 MB allocation (found by fuzzing).
        check_layout(fmt, Rect::full(width, height), stride, data)?;
        let mut st = self.lock();
        if std::mem::take(&mut st.stale_scanout) && (st.width, st.height) != (width, height) {
            PathCounters::bump(&self.counters.stale_scanout);
            return Ok(());
        }
        self.resize_locked(&mut st, width, height)?;
        blit(&mut st, fmt, Rect::full(width, height), stride, data)?;
        self.damage(&mut st, Rect::full(width, height));
        Ok(())
    }

    /// `Update` (tightly packed rect) or a damaged rect of a shared-memory surface (`UpdateMap`,
    /// where `data` is the whole map and the rect is read from it at `stride`).
    ///
    /// QEMU 10.0 may send updates for a new, larger surface without a `Scanout` first; a rect
    /// beyond the current size grows the surface instead of being dropped.
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &self,
        x: i32,
        y: i32,
        w: i32,
        h: i32,
        stride: u32,
        format: u32,
        data: &[u8],
        data_is_whole_surface: bool,
    ) -> Result<(), FrameError> {
        let fmt = Format::from_code(format)?;
        let oob = |width, height| FrameError::OutOfBounds {
            x,
            y,
            w,
            h,
            width,
            height,
        };
        let (Ok(ux), Ok(uy), Ok(uw), Ok(uh)) = (
            u32::try_from(x),
            u32::try_from(y),
            u32::try_from(w),
            u32::try_from(h),
        ) else {
            let st = self.lock();
            return Err(oob(st.width, st.height));
        };
        if uw == 0 || uh == 0 {
            return Ok(());
        }
        let right = ux.checked_add(uw).ok_or_else(|| oob(0, 0))?;
        let bottom = uy.checked_add(uh).ok_or_else(|| oob(0, 0))?;
        let rect = Rect {
            x: ux,
            y: uy,
            w: uw,
            h: uh,
        };
        let data = if data_is_whole_surface {
            surface_tail(fmt, rect, stride, data)?
        } else {
            data
        };
        // Checked before any growth below, which must not be bought with a short message.
        check_layout(fmt, rect, stride, data)?;
        let mut st = self.lock();
        if right > st.width || bottom > st.height {
            // The resize-without-Scanout case: grow to cover the rect. A tiny rect far out would
            // make a huge surface, so growth stops at 4K UHD (a Scanout, which carries or maps
            // all of its pixels, may still go up to check_size's limit).
            let (nw, nh) = (right.max(st.width), bottom.max(st.height));
            if u64::from(nw) * u64::from(nh) > MAX_GROWN_PIXELS {
                return Err(oob(st.width, st.height));
            }
            check_size(nw, nh).map_err(|_| oob(st.width, st.height))?;
            self.resize_locked(&mut st, nw, nh)?;
            PathCounters::bump(&self.counters.resized_without_scanout);
            self.damage(&mut st, Rect::full(nw, nh));
        }
        // Guests (and QEMU's page-granular dirty tracking) report far more than what changed:
        // only the 16-pixel chunks whose pixels differ become damage.
        let changed = blit_changed(&mut st, fmt, rect, stride, data)?;
        st.attached = true;
        for r in changed {
            self.damage(&mut st, r);
        }
        Ok(())
    }

    /// The display went away (QEMU gone, `Disable`): consumers keep the last frame but learn
    /// the source is detached; the next frame starts a new generation.
    pub fn detach(&self) {
        let mut st = self.lock();
        st.attached = false;
        st.generation += 1;
        st.log.clear();
        let seq = st.seq + 1;
        st.seq = seq;
        self.notify.send_replace(seq);
    }

    pub fn set_cursor(&self, cursor: Cursor) {
        let mut st = self.lock();
        st.cursor = Some(Arc::new(cursor));
        st.cursor_serial += 1;
        let seq = st.seq + 1;
        st.seq = seq;
        self.notify.send_replace(seq);
    }

    pub fn set_pointer(&self, pointer: Pointer) {
        let mut st = self.lock();
        if st.pointer != pointer {
            st.pointer = pointer;
            let seq = st.seq + 1;
            st.seq = seq;
            self.notify.send_replace(seq);
        }
    }

    pub fn cursor(&self) -> (Option<Arc<Cursor>>, u64, Pointer) {
        let st = self.lock();
        (st.cursor.clone(), st.cursor_serial, st.pointer)
    }

    pub fn size(&self) -> (u32, u32) {
        let st = self.lock();
        (st.width, st.height)
    }

    pub fn is_attached(&self) -> bool {
        self.lock().attached
    }

    pub fn snapshot(&self) -> Snapshot {
        let st = self.lock();
        Snapshot {
            width: st.width,
            height: st.height,
            generation: st.generation,
            attached: st.attached,
            pixels: st.pixels.clone(),
        }
    }

    /// Copies `rect` (clipped to the surface) into `out`, row by row, tightly packed.
    pub fn read_rect(&self, rect: Rect, out: &mut Vec<u32>) -> Rect {
        out.clear();
        self.read_rows(rect, |row| out.extend_from_slice(row))
    }

    /// [`Framebuffer::read_rect`] as little-endian bytes (B, G, R, X per pixel), appended to
    /// `out`: the layout RDP's `BgrX32` bitmaps want, in one copy.
    pub fn read_rect_le(&self, rect: Rect, out: &mut Vec<u8>) -> Rect {
        self.read_rows(rect, |row| {
            for px in row {
                out.extend_from_slice(&px.to_le_bytes());
            }
        })
    }

    fn read_rows(&self, rect: Rect, mut row_out: impl FnMut(&[u32])) -> Rect {
        let st = self.lock();
        let r = clip(rect, st.width, st.height);
        for row in r.y..r.y + r.h {
            let start = row as usize * st.width as usize + r.x as usize;
            row_out(&st.pixels[start..start + r.w as usize]);
        }
        r
    }

    /// A consumer with its own damage position, starting with "everything changed".
    pub fn viewer(&self) -> Viewer {
        Viewer {
            fb: self.clone(),
            rx: self.notify.subscribe(),
            seen: None,
        }
    }
}

/// `r` cut to a `width`x`height` surface (empty when outside it).
pub fn clip(r: Rect, width: u32, height: u32) -> Rect {
    let x = r.x.min(width);
    let y = r.y.min(height);
    Rect {
        x,
        y,
        w: r.w.min(width - x),
        h: r.h.min(height - y),
    }
}

/// Copies the top-left region shared by the old (`ow`x`oh`) and new (`nw`x`nh`) surfaces.
fn copy_old(new: &mut [u32], nw: u32, nh: u32, old: &[u32], ow: u32, oh: u32) {
    if old.len() < ow as usize * oh as usize {
        return;
    }
    let w = ow.min(nw) as usize;
    for row in 0..oh.min(nh) as usize {
        let src = &old[row * ow as usize..row * ow as usize + w];
        new[row * nw as usize..row * nw as usize + w].copy_from_slice(src);
    }
}

/// Checks that `data` holds `r`'s rows at `stride`; returns the stride and a row's bytes.
fn check_layout(
    fmt: Format,
    r: Rect,
    stride: u32,
    data: &[u8],
) -> Result<(usize, usize), FrameError> {
    let row_bytes = r.w as usize * fmt.bytes;
    if (stride as usize) < row_bytes {
        return Err(FrameError::BadStride {
            stride,
            width: r.w,
            bytes: fmt.bytes,
        });
    }
    let need = needed(stride as usize, r.h as usize, r.w as usize, fmt.bytes);
    if data.len() < need {
        return Err(FrameError::ShortData {
            got: data.len(),
            need,
        });
    }
    Ok((stride as usize, row_bytes))
}

/// Copies a packed-or-strided rect whose first byte is at `data[0]`.
fn blit(st: &mut State, fmt: Format, r: Rect, stride: u32, data: &[u8]) -> Result<(), FrameError> {
    let (stride, row_bytes) = check_layout(fmt, r, stride, data)?;
    let width = st.width as usize;
    for row in 0..r.h as usize {
        let src = &data[row * stride..row * stride + row_bytes];
        let d0 = (r.y as usize + row) * width + r.x as usize;
        fmt.convert_row(src, &mut st.pixels[d0..d0 + r.w as usize]);
    }
    Ok(())
}

/// Where `r` starts in a whole surface laid out at `stride` (the shared-memory map).
fn surface_tail(fmt: Format, r: Rect, stride: u32, data: &[u8]) -> Result<&[u8], FrameError> {
    let offset = r.y as usize * stride as usize + r.x as usize * fmt.bytes;
    data.get(offset..).ok_or(FrameError::ShortData {
        got: data.len(),
        need: offset,
    })
}

/// Width of the chunks compared, and height of the bands they are grouped in.
const CHUNK: usize = 16;

/// Like [`blit`], but returns only the parts of `r` whose pixels changed: per band of 16 rows,
/// runs of changed 16-pixel chunks; a run that continues the one above extends its rect.
fn blit_changed(
    st: &mut State,
    fmt: Format,
    r: Rect,
    stride: u32,
    data: &[u8],
) -> Result<Vec<Rect>, FrameError> {
    let (stride_us, row_bytes) = check_layout(fmt, r, stride, data)?;
    let (w, width) = (r.w as usize, st.width as usize);
    let chunks = w.div_ceil(CHUNK);
    let mut band = vec![false; chunks];
    let mut out: Vec<Rect> = Vec::new();
    // Rects that ended at the previous band's bottom, and may grow down.
    let mut open: Vec<usize> = Vec::new();
    let mut band_top = 0usize;
    for y in 0..r.h as usize {
        let src = &data[y * stride_us..y * stride_us + row_bytes];
        let d0 = (r.y as usize + y) * width + r.x as usize;
        let dst = &mut st.pixels[d0..d0 + w];
        // Chunk by chunk through a buffer on the stack: source and surface are each read once,
        // and a chunk that did not change is not written.
        let mut chunk = [0u32; CHUNK];
        for ((changed, d), s) in band
            .iter_mut()
            .zip(dst.chunks_mut(CHUNK))
            .zip(src.chunks(CHUNK * fmt.bytes))
        {
            let new = &mut chunk[..d.len()];
            fmt.convert_row(s, new);
            if d != new {
                d.copy_from_slice(new);
                *changed = true;
            }
        }
        let band_end = y + 1 == r.h as usize || (y + 1 - band_top) == CHUNK;
        if !band_end {
            continue;
        }
        let h = (y + 1 - band_top) as u32;
        let mut next_open = Vec::new();
        let mut c = 0;
        while c < chunks {
            if !band[c] {
                c += 1;
                continue;
            }
            let start = c;
            while c < chunks && band[c] {
                c += 1;
            }
            let x = r.x + (start * CHUNK) as u32;
            let rw = ((c * CHUNK).min(w) - start * CHUNK) as u32;
            let top = r.y + band_top as u32;
            match open
                .iter()
                .find(|&&i| out[i].x == x && out[i].w == rw && out[i].y + out[i].h == top)
            {
                Some(&i) => {
                    out[i].h += h;
                    next_open.push(i);
                }
                None => {
                    out.push(Rect {
                        x,
                        y: top,
                        w: rw,
                        h,
                    });
                    next_open.push(out.len() - 1);
                }
            }
        }
        open = next_open;
        band.iter_mut().for_each(|b| *b = false);
        band_top = y + 1;
    }
    Ok(out)
}

/// Where a consumer stands in the framebuffer's history: the surface generation and the damage
/// sequence number it has seen. Positions are plain values, so several consumers (a shared
/// encoding and the viewers it serves) can compare them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub generation: u64,
    pub seq: u64,
}

/// What a viewer must send next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub width: u32,
    pub height: u32,
    /// The surface was replaced (new size, or re-attached), or the consumer fell behind the log:
    /// resend everything, announce the size.
    pub new_surface: bool,
    pub attached: bool,
    pub rects: Vec<Rect>,
    /// The position this damage brings a consumer to.
    pub to: Position,
}

impl Framebuffer {
    /// The newest position (what [`Framebuffer::damage_since`] would bring a consumer to).
    pub fn position(&self) -> Position {
        let st = self.lock();
        Position {
            generation: st.generation,
            seq: st.seq,
        }
    }

    /// Everything damaged after `since` (all of the surface when `since` is `None`, from another
    /// generation, or older than the log).
    pub fn damage_since(&self, since: Option<Position>) -> Damage {
        let mut st = self.lock();
        self.mark_taken(&mut st);
        damage_locked(&st, since)
    }

    fn mark_taken(&self, st: &mut State) {
        if st.taken != st.seq {
            st.taken = st.seq;
            self.taken.notify_waiters();
        }
    }

    /// The next `Scanout` is older than the console's current size (see `listener_socket`).
    pub fn expect_stale_scanout(&self) {
        self.lock().stale_scanout = true;
    }

    /// Whether damage was recorded that no consumer has taken yet: every viewer is still busy
    /// with an older frame, or there is none.
    pub fn has_untaken_damage(&self) -> bool {
        let st = self.lock();
        st.seq != st.taken
    }

    /// The newest damage sequence number (frames handled so far).
    pub fn damage_seq(&self) -> u64 {
        self.lock().seq
    }

    /// Waits until damage newer than `after` has been recorded and a consumer has taken it, or
    /// `timeout` passes: a frame let through has been handled and someone wanted it.
    pub async fn taken_after(&self, after: u64, timeout: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let woken = self.taken.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            {
                let st = self.lock();
                if st.seq > after && st.seq == st.taken {
                    return;
                }
            }
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                return;
            }
        }
    }

    /// Calls `row` with each row of `rect` (clipped), under one lock; returns the clipped rect.
    pub fn with_rows(&self, rect: Rect, row: impl FnMut(&[u32])) -> Rect {
        self.read_rows(rect, row)
    }

    /// Calls `band` once, under the lock, with the full-width rows `y0..y1` (clipped) as one
    /// slice, and the surface's width and height (converters that take whole images).
    pub fn with_band(&self, y0: u32, y1: u32, band: impl FnOnce(&[u32], u32, u32)) {
        let st = self.lock();
        let (y0, y1) = (y0.min(st.height), y1.min(st.height));
        let w = st.width as usize;
        let rows = st.pixels.get(y0 as usize * w..y1.max(y0) as usize * w);
        band(rows.unwrap_or(&[]), st.width, st.height);
    }
}

fn damage_locked(st: &State, since: Option<Position>) -> Damage {
    let full = || vec![Rect::full(st.width, st.height)];
    let same = since.filter(|p| p.generation == st.generation);
    let (new_surface, rects) = match same {
        None => (true, full()),
        Some(p) => match st.log.front() {
            // Fell behind the log: everything.
            Some(&(first, _)) if first > p.seq + 1 => (true, full()),
            _ => (
                false,
                st.log
                    .iter()
                    .filter(|(s, _)| *s > p.seq)
                    .map(|(_, r)| clip(*r, st.width, st.height))
                    .filter(|r| r.w > 0 && r.h > 0)
                    .collect(),
            ),
        },
    };
    Damage {
        width: st.width,
        height: st.height,
        new_surface,
        attached: st.attached,
        rects,
        to: Position {
            generation: st.generation,
            seq: st.seq,
        },
    }
}

/// One consumer's view of the framebuffer: its position and a change notification.
pub struct Viewer {
    fb: Framebuffer,
    rx: watch::Receiver<u64>,
    seen: Option<Position>,
}

impl Viewer {
    pub fn framebuffer(&self) -> &Framebuffer {
        &self.fb
    }

    /// Waits until something changed since the last [`Viewer::take_damage`] (or the last
    /// [`Viewer::seen`]).
    ///
    /// # Cancel safety
    /// Cancel safe: nothing is consumed until `take_damage`.
    pub async fn changed(&mut self) {
        if self.seen.map(|p| p.seq) != Some(*self.rx.borrow()) {
            return;
        }
        // The sender lives as long as the framebuffer, which this viewer holds.
        let _ = self.rx.changed().await;
    }

    /// Everything damaged since the last call, merged when the viewer fell behind.
    pub fn take_damage(&mut self) -> Damage {
        let mut st = self.fb.lock();
        self.fb.mark_taken(&mut st);
        let _ = self.rx.borrow_and_update();
        let d = damage_locked(&st, self.seen);
        self.seen = Some(d.to);
        d
    }

    /// Records that the consumer is at `pos` (it was brought there by someone else's damage),
    /// so [`Viewer::changed`] waits for anything newer.
    pub fn seen(&mut self, pos: Position) {
        self.seen = Some(pos);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pixman::X8R8G8B8;
    use std::time::Duration;

    fn solid(w: u32, h: u32, px: u32) -> Vec<u8> {
        std::iter::repeat_n(px.to_ne_bytes(), (w * h) as usize)
            .flatten()
            .collect()
    }

    #[test]
    fn scanout_then_update() {
        let fb = Framebuffer::new();
        fb.scanout(4, 2, 16, X8R8G8B8, &solid(4, 2, 0x11)).unwrap();
        fb.update(1, 1, 2, 1, 8, X8R8G8B8, &solid(2, 1, 0x22), false)
            .unwrap();
        let s = fb.snapshot();
        assert_eq!(s.pixels, [0x11, 0x11, 0x11, 0x11, 0x11, 0x22, 0x22, 0x11]);
    }

    #[test]
    fn honours_stride_padding() {
        let fb = Framebuffer::new();
        let mut data = Vec::new();
        for row in 0..2u32 {
            data.extend(solid(2, 1, row + 1));
            data.extend([0xee; 8]); // padding
        }
        fb.scanout(2, 2, 16, X8R8G8B8, &data).unwrap();
        assert_eq!(fb.snapshot().pixels, [1, 1, 2, 2]);
    }

    #[test]
    fn rejects_bad_frames_without_changing_state() {
        let fb = Framebuffer::new();
        fb.scanout(2, 2, 8, X8R8G8B8, &solid(2, 2, 7)).unwrap();
        let before = fb.snapshot();
        let bad = [
            fb.scanout(0, 2, 8, X8R8G8B8, &[]),
            fb.scanout(100_000, 100_000, 400_000, X8R8G8B8, &[]),
            fb.scanout(2, 2, 4, X8R8G8B8, &solid(2, 2, 1)),
            fb.scanout(2, 2, 8, X8R8G8B8, &solid(1, 1, 1)),
            fb.scanout(2, 2, 8, 0xdead_beef, &solid(2, 2, 1)),
            fb.update(-1, 0, 1, 1, 4, X8R8G8B8, &solid(1, 1, 1), false),
            fb.update(0, 0, 1, 1, 4, X8R8G8B8, &[], false),
            fb.update(i32::MAX, i32::MAX, i32::MAX, 1, 4, X8R8G8B8, &[], false),
            fb.update(0, 0, 9000, 9000, 36000, X8R8G8B8, &[], false),
        ];
        for r in bad {
            assert!(r.is_err());
        }
        assert_eq!(fb.snapshot().pixels, before.pixels);
    }

    #[test]
    fn short_frames_never_size_the_surface() {
        let fb = Framebuffer::new();
        fb.scanout(2, 2, 8, X8R8G8B8, &solid(2, 2, 7)).unwrap();
        // A big Scanout or a far-out Update whose pixels are not in the message.
        assert!(
            fb.scanout(7680, 4320, 30720, X8R8G8B8, &solid(2, 2, 1))
                .is_err()
        );
        assert!(
            fb.update(7000, 4000, 8, 8, 32, X8R8G8B8, &[], false)
                .is_err()
        );
        // A tiny Update far beyond 4K UHD, with its pixels: growth is bounded.
        assert!(
            fb.update(7000, 4000, 1, 1, 4, X8R8G8B8, &solid(1, 1, 1), false)
                .is_err()
        );
        // A console size announced without pixels is bounded the same way.
        assert!(fb.resize_hint(7680, 4320).is_err());
        let s = fb.snapshot();
        assert_eq!((s.width, s.height, s.pixels.len()), (2, 2, 4));
        fb.resize_hint(1920, 1080).unwrap();
        assert_eq!(fb.size(), (1920, 1080));
    }

    #[test]
    fn update_beyond_surface_grows_it() {
        let fb = Framebuffer::new();
        fb.scanout(2, 1, 8, X8R8G8B8, &solid(2, 1, 5)).unwrap();
        fb.update(0, 2, 3, 1, 12, X8R8G8B8, &solid(3, 1, 9), false)
            .unwrap();
        let s = fb.snapshot();
        assert_eq!((s.width, s.height), (3, 3));
        assert_eq!(s.pixels, [5, 5, 0, 0, 0, 0, 9, 9, 9]);
    }

    #[test]
    fn only_changed_chunks_become_damage() {
        let fb = Framebuffer::new();
        fb.scanout(100, 40, 400, X8R8G8B8, &solid(100, 40, 1))
            .unwrap();
        let mut v = fb.viewer();
        v.take_damage();
        // A guest rewrites 100x40 with the same pixels: nothing to send.
        fb.update(0, 0, 100, 40, 400, X8R8G8B8, &solid(100, 40, 1), false)
            .unwrap();
        assert!(v.take_damage().rects.is_empty());
        // One pixel differs at (37, 21): its 16x16 chunk (clipped to the band) is the damage.
        let mut data = solid(100, 40, 1);
        let at = (21 * 100 + 37) * 4;
        data[at..at + 4].copy_from_slice(&2u32.to_ne_bytes());
        fb.update(0, 0, 100, 40, 400, X8R8G8B8, &data, false)
            .unwrap();
        assert_eq!(
            v.take_damage().rects,
            [Rect {
                x: 32,
                y: 16,
                w: 16,
                h: 16
            }]
        );
        assert_eq!(fb.snapshot().pixels[21 * 100 + 37], 2);
        // Everything changes: one rect, the update's own, not one per band.
        fb.update(3, 2, 90, 35, 360, X8R8G8B8, &solid(90, 35, 3), false)
            .unwrap();
        assert_eq!(
            v.take_damage().rects,
            [Rect {
                x: 3,
                y: 2,
                w: 90,
                h: 35
            }]
        );
    }

    #[test]
    fn viewers_track_damage_independently() {
        let fb = Framebuffer::new();
        let mut a = fb.viewer();
        let mut b = fb.viewer();
        fb.scanout(4, 4, 16, X8R8G8B8, &solid(4, 4, 1)).unwrap();
        assert!(a.take_damage().new_surface);
        fb.update(0, 0, 1, 1, 4, X8R8G8B8, &solid(1, 1, 2), false)
            .unwrap();
        let d = a.take_damage();
        assert!(!d.new_surface);
        assert_eq!(
            d.rects,
            [Rect {
                x: 0,
                y: 0,
                w: 1,
                h: 1
            }]
        );
        // b never read: it gets one full refresh.
        let d = b.take_damage();
        assert!(d.new_surface);
        assert_eq!(d.rects, [Rect::full(4, 4)]);
        // A viewer that falls behind the log gets a full rect too.
        for i in 0..DAMAGE_LOG as u32 + 5 {
            // Alternating colours: an update that changes nothing is no damage.
            fb.update(1, 1, 1, 1, 4, X8R8G8B8, &solid(1, 1, 3 + i % 2), false)
                .unwrap();
        }
        assert_eq!(a.take_damage().rects, [Rect::full(4, 4)]);
    }

    #[tokio::test]
    async fn frames_wait_until_the_last_one_was_handled_and_taken_but_not_forever() {
        let fb = Framebuffer::new();
        let mut v = fb.viewer();
        fb.scanout(4, 4, 16, X8R8G8B8, &solid(4, 4, 1)).unwrap();
        let passed = fb.damage_seq();
        // The frame let through is not handled yet: wait, up to the timeout.
        let t = std::time::Instant::now();
        fb.taken_after(passed, Duration::from_millis(200)).await;
        assert!(t.elapsed() >= Duration::from_millis(200));
        // Handled, and then taken by a viewer while we wait: the wait ends then.
        let waiter = {
            let fb = fb.clone();
            tokio::spawn(async move {
                let t = std::time::Instant::now();
                fb.taken_after(passed, Duration::from_secs(5)).await;
                t.elapsed()
            })
        };
        tokio::time::sleep(Duration::from_millis(30)).await;
        fb.scanout(4, 4, 16, X8R8G8B8, &solid(4, 4, 2)).unwrap();
        assert!(fb.has_untaken_damage());
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!waiter.is_finished(), "handled but nobody took it yet");
        let _ = v.take_damage();
        assert!(waiter.await.unwrap() < Duration::from_secs(2));
        assert!(!fb.has_untaken_damage());
        // Handled and taken already: no wait at all.
        let t = std::time::Instant::now();
        fb.taken_after(passed, Duration::from_secs(5)).await;
        assert!(t.elapsed() < Duration::from_secs(2));
        // A shared encoding's damage_since counts as taking too.
        fb.scanout(4, 4, 16, X8R8G8B8, &solid(4, 4, 3)).unwrap();
        let _ = fb.damage_since(None);
        assert!(!fb.has_untaken_damage());
    }

    #[test]
    fn a_scanout_that_waited_through_a_console_resize_does_not_undo_it() {
        let fb = Framebuffer::new();
        fb.scanout(4, 4, 16, X8R8G8B8, &solid(4, 4, 1)).unwrap();
        fb.resize(8, 8).unwrap();
        fb.expect_stale_scanout();
        fb.scanout(4, 4, 16, X8R8G8B8, &solid(4, 4, 2)).unwrap();
        assert_eq!(fb.size(), (8, 8));
        assert_eq!(PathCounters::get(&fb.counters().stale_scanout), 1);
        // Only that one: a later Scanout of another size is a real mode switch.
        fb.scanout(4, 4, 16, X8R8G8B8, &solid(4, 4, 3)).unwrap();
        assert_eq!(fb.size(), (4, 4));
        // A stale mark on a frame of the current size changes nothing.
        fb.expect_stale_scanout();
        fb.scanout(4, 4, 16, X8R8G8B8, &solid(4, 4, 4)).unwrap();
        assert_eq!(fb.snapshot().pixels[0] & 0xff_ffff, 4);
    }
}
