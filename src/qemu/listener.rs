//! The objects QEMU calls on our end of a `RegisterListener` socketpair: `Listener` (inline
//! frames, cursor), `Listener.Unix.Map` (shared-memory frames) and our `ParkedFrame` (inline
//! frames the socket read into a reused buffer, see [`super::parked`]). All feed one console's
//! [`Framebuffer`]. Handlers only copy and return (`spawn = false` keeps QEMU's order).

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use serde_bytes::Bytes;
use tracing::{debug, trace, warn};

use super::parked::{Frame, ParkedFrames};
use super::proxies::MAP_INTERFACE;
use super::shm::SharedSurface;
use crate::framebuffer::{Cursor, Framebuffer, PathCounters, Pointer};
use crate::pixman::Format;

/// The shared-memory surface last announced by `ScanoutMap`.
struct MapState {
    surface: SharedSurface,
    stride: u32,
    format: u32,
}

type SharedMap = Arc<Mutex<Option<MapState>>>;

/// `org.qemu.Display1.Listener` for one console.
pub struct Listener {
    console: u32,
    fb: Framebuffer,
    map: SharedMap,
    shared_memory: bool,
}

/// `org.qemu.Display1.Listener.Unix.Map` for the same console.
pub struct MapListener {
    console: u32,
    fb: Framebuffer,
    map: SharedMap,
}

/// `vdi.sidecar.ParkedFrame` for the same console: the frames `parked` holds.
pub struct ParkedTaker {
    console: u32,
    fb: Framebuffer,
    map: SharedMap,
    parked: ParkedFrames,
}

/// The interfaces of one listener, sharing the current map. With `shared_memory` false the
/// listener does not advertise `Listener.Unix.Map`, so QEMU sends every frame inline.
pub fn listener_objects(
    console: u32,
    fb: Framebuffer,
    shared_memory: bool,
    parked: ParkedFrames,
) -> (Listener, MapListener, ParkedTaker) {
    let map = SharedMap::default();
    (
        Listener {
            console,
            fb: fb.clone(),
            map: Arc::clone(&map),
            shared_memory,
        },
        MapListener {
            console,
            fb: fb.clone(),
            map: Arc::clone(&map),
        },
        ParkedTaker {
            console,
            fb,
            map,
            parked,
        },
    )
}

fn apply_scanout(
    console: u32,
    fb: &Framebuffer,
    map: &SharedMap,
    (width, height, stride, pixman_format): (u32, u32, u32, u32),
    data: &[u8],
) {
    drop_map(map);
    PathCounters::bump(&fb.counters().scanout);
    match fb.scanout(width, height, stride, pixman_format, data) {
        Ok(()) => debug!(
            console,
            width,
            height,
            stride,
            format = format_args!("{pixman_format:#x}"),
            "Scanout"
        ),
        Err(e) => warn!(console, error = %e, "Scanout refused"),
    }
}

fn apply_update(
    console: u32,
    fb: &Framebuffer,
    (x, y, width, height): (i32, i32, i32, i32),
    (stride, pixman_format): (u32, u32),
    data: &[u8],
) {
    trace!(console, x, y, width, height, "Update");
    PathCounters::bump(&fb.counters().update);
    if let Err(e) = fb.update(x, y, width, height, stride, pixman_format, data, false) {
        warn!(console, error = %e, "Update refused");
    }
}

fn drop_map(map: &SharedMap) {
    let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
    *m = None;
}

#[zbus::interface(name = "org.qemu.Display1.Listener", spawn = false)]
impl Listener {
    fn scanout(&mut self, width: u32, height: u32, stride: u32, pixman_format: u32, data: &Bytes) {
        // `data` borrows from the message: a 1080p frame is not copied once more.
        let layout = (width, height, stride, pixman_format);
        apply_scanout(self.console, &self.fb, &self.map, layout, data);
    }

    #[allow(clippy::too_many_arguments)]
    fn update(
        &mut self,
        x: i32,
        y: i32,
        width: i32,
        height: i32,
        stride: u32,
        pixman_format: u32,
        data: &Bytes,
    ) {
        let rect = (x, y, width, height);
        apply_update(self.console, &self.fb, rect, (stride, pixman_format), data);
    }

    /// GL (DMABUF) frames need a render node and readback; we never ask for `gl=on`.
    #[zbus(name = "ScanoutDMABUF")]
    #[allow(clippy::too_many_arguments)]
    fn scanout_dmabuf(
        &mut self,
        _dmabuf: zbus::OwnedFd,
        width: u32,
        height: u32,
        _stride: u32,
        fourcc: u32,
        _modifier: u64,
        _y0_top: bool,
    ) -> zbus::fdo::Result<()> {
        warn!(
            console = self.console,
            width, height, fourcc, "ScanoutDMABUF refused: run QEMU's D-Bus display with gl=off"
        );
        Err(zbus::fdo::Error::NotSupported(
            "vdi-sidecar does not take DMABUF frames; use -display dbus,gl=off".into(),
        ))
    }

    #[zbus(name = "UpdateDMABUF")]
    fn update_dmabuf(&mut self, _x: i32, _y: i32, _w: i32, _h: i32) -> zbus::fdo::Result<()> {
        Err(zbus::fdo::Error::NotSupported("no DMABUF scanout".into()))
    }

    fn disable(&mut self) {
        debug!(console = self.console, "Disable");
        drop_map(&self.map);
        self.fb.detach();
    }

    fn mouse_set(&mut self, x: i32, y: i32, on: i32) {
        self.fb.set_pointer(Pointer {
            x,
            y,
            visible: on != 0,
        });
    }

    fn cursor_define(&mut self, width: i32, height: i32, hot_x: i32, hot_y: i32, data: &Bytes) {
        match cursor(width, height, hot_x, hot_y, data) {
            Some(c) => self.fb.set_cursor(c),
            None => warn!(
                console = self.console,
                width,
                height,
                len = data.len(),
                "CursorDefine refused"
            ),
        }
    }

    /// Read once by QEMU at registration: we take shared-memory frames.
    #[zbus(property)]
    fn interfaces(&self) -> Vec<String> {
        if self.shared_memory {
            vec![MAP_INTERFACE.to_owned()]
        } else {
            Vec::new()
        }
    }
}

/// Largest cursor accepted (QEMU's are 64x64; virtio-gpu allows up to 256x256).
const MAX_CURSOR: i32 = 512;

fn cursor(width: i32, height: i32, hot_x: i32, hot_y: i32, data: &[u8]) -> Option<Cursor> {
    if !(1..=MAX_CURSOR).contains(&width) || !(1..=MAX_CURSOR).contains(&height) {
        return None;
    }
    let (w, h) = (u32::try_from(width).ok()?, u32::try_from(height).ok()?);
    if data.len() != w as usize * h as usize * 4 {
        return None;
    }
    let argb = data
        .chunks_exact(4)
        .map(|p| u32::from_ne_bytes([p[0], p[1], p[2], p[3]]))
        .collect();
    Some(Cursor {
        width: w,
        height: h,
        hot_x: u32::try_from(hot_x.clamp(0, width - 1)).ok()?,
        hot_y: u32::try_from(hot_y.clamp(0, height - 1)).ok()?,
        argb,
    })
}

#[zbus::interface(name = "org.qemu.Display1.Listener.Unix.Map", spawn = false)]
impl MapListener {
    /// QEMU waits for this reply (1 s) with its main loop blocked: map and return.
    fn scanout_map(
        &mut self,
        handle: zbus::OwnedFd,
        offset: u32,
        width: u32,
        height: u32,
        stride: u32,
        pixman_format: u32,
    ) -> zbus::fdo::Result<()> {
        let fd = OwnedFd::from(handle);
        let invalid = |msg: String| {
            warn!(console = self.console, "ScanoutMap refused: {msg}");
            zbus::fdo::Error::InvalidArgs(msg)
        };
        let fmt = Format::from_code(pixman_format).map_err(|e| invalid(e.to_string()))?;
        let row = u64::from(width) * fmt.bytes as u64;
        if u64::from(stride) < row {
            return Err(invalid(format!("stride {stride} < row of {row} bytes")));
        }
        // Mapped (and the fd's size checked) before the surface is sized: claimed dimensions
        // alone must not buy an allocation (found by fuzzing the framebuffer's checks).
        let len = u64::from(stride) * u64::from(height);
        let surface =
            SharedSurface::map(fd, u64::from(offset), len).map_err(|e| invalid(e.to_string()))?;
        self.fb
            .resize(width, height)
            .map_err(|e| invalid(e.to_string()))?;
        debug!(
            console = self.console,
            width, height, stride, offset, "ScanoutMap"
        );
        PathCounters::bump(&self.fb.counters().scanout_map);
        // The map holds the whole surface already: take it all.
        let (w, h) = (
            i32::try_from(width).unwrap_or(i32::MAX),
            i32::try_from(height).unwrap_or(i32::MAX),
        );
        if let Err(e) = self
            .fb
            .update(0, 0, w, h, stride, pixman_format, surface.bytes(), true)
        {
            warn!(console = self.console, error = %e, "initial map copy refused");
        }
        *self.map.lock().unwrap_or_else(|p| p.into_inner()) = Some(MapState {
            surface,
            stride,
            format: pixman_format,
        });
        Ok(())
    }

    fn update_map(&mut self, x: i32, y: i32, width: i32, height: i32) {
        trace!(console = self.console, x, y, width, height, "UpdateMap");
        PathCounters::bump(&self.fb.counters().update_map);
        let state = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let Some(ms) = state.as_ref() else {
            warn!(console = self.console, "UpdateMap without ScanoutMap");
            return;
        };
        let (fw, fh) = self.fb.size();
        let inside = x >= 0
            && y >= 0
            && width >= 0
            && height >= 0
            && i64::from(x) + i64::from(width) <= i64::from(fw)
            && i64::from(y) + i64::from(height) <= i64::from(fh);
        if !inside {
            warn!(
                console = self.console,
                x, y, width, height, "UpdateMap outside the mapped surface"
            );
            return;
        }
        if let Err(e) = self.fb.update(
            x,
            y,
            width,
            height,
            ms.stride,
            ms.format,
            ms.surface.bytes(),
            true,
        ) {
            warn!(console = self.console, error = %e, "UpdateMap refused");
        }
    }
}

#[zbus::interface(name = "vdi.sidecar.ParkedFrame", spawn = false)]
impl ParkedTaker {
    /// Sent by our socket reader in place of a `Scanout`/`Update` it read itself.
    fn take(&mut self, token: u64) {
        let Some(parked) = self.parked.take(token) else {
            debug!(
                console = self.console,
                token, "no parked frame for this token"
            );
            return;
        };
        PathCounters::bump(&self.fb.counters().parked);
        match parked.frame() {
            Some(Frame::Scanout {
                width,
                height,
                stride,
                format,
                data,
            }) => {
                let layout = (width, height, stride, format);
                apply_scanout(self.console, &self.fb, &self.map, layout, data);
            }
            Some(Frame::Update {
                x,
                y,
                width,
                height,
                stride,
                format,
                data,
            }) => {
                let rect = (x, y, width, height);
                apply_update(self.console, &self.fb, rect, (stride, format), data);
            }
            None => warn!(
                console = self.console,
                kind = ?parked.kind,
                len = parked.len,
                "inline frame refused: its body does not match its signature"
            ),
        }
        self.parked.give_back(parked.bytes);
    }
}
