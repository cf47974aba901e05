//! One RFB client after the handshake: the message loop. The client paces us: an update is sent
//! when it asked for one (or turned continuous updates on) and something changed; sound goes out
//! as it comes; input goes to the guest in order. A slow client only ever falls behind itself.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;
use tracing::{debug, info, trace, warn};

use super::audio::Sound;
use super::caps::ClientCaps;
use super::config::{SharePolicy, VncConfig};
use super::encoder::{self, UpdateJob};
use super::extras::{self, Told};
use super::handshake::{ConnError, handshake};
use super::proto::{ClientMsg, PixelFormat, decode};
use super::pseudo;
use super::scroll::{RowHashes, row_hash};
use super::update::{self, Source};
use crate::framebuffer::{Rect, Viewer};
use crate::net::Io;
use crate::qemu::audio::AudioEvent;
use crate::qemu::input::button;
use crate::session::Desktop;
use crate::session::input::ViewerInput;
use crate::session::stats::ViewerStats;

/// How long the screen must stay still before JPEG areas are resent losslessly.
const LOSSLESS_REFRESH: Duration = Duration::from_millis(150);
/// How often LED and pointer-mode changes (which come without damage) are looked at.
const CONTROL_POLL: Duration = Duration::from_millis(250);
/// An update this large is logged: something is wrong with the plan or the client's request.
const HUGE_UPDATE: usize = 64 * 1024 * 1024;

/// Serves one accepted connection to the end: handshake, then the session.
pub async fn serve<S: Io + 'static>(
    s: S,
    peer: SocketAddr,
    cfg: Arc<VncConfig>,
    desktop: Desktop,
) -> Result<(), ConnError> {
    let (io, shared) =
        match tokio::time::timeout(cfg.handshake_timeout, handshake(s, &cfg, peer)).await {
            Ok(r) => r?,
            Err(_) => return Err(ConnError::Timeout),
        };
    let (id, evict) = cfg.sessions.join();
    if !shared && cfg.share == SharePolicy::AllowExclusive {
        info!("exclusive client: disconnecting the other viewers");
        cfg.sessions.evict_before(id);
    }
    info!(shared, "VNC client authenticated");
    Session::new(io, cfg, desktop, id, evict).run().await
}

/// An update the client is waiting for.
#[derive(Clone, Copy)]
struct Request {
    incremental: bool,
    region: Rect,
}

struct Session {
    io: Box<dyn Io>,
    cfg: Arc<VncConfig>,
    desktop: Desktop,
    id: u64,
    evict: watch::Receiver<u64>,
    viewer: Viewer,
    input: ViewerInput,
    stats: ViewerStats,
    /// The size the client was last told.
    width: u32,
    height: u32,
    caps: ClientCaps,
    told: Told,
    /// An update request not answered yet.
    pending: Option<Request>,
    /// Continuous updates: the region to keep sending without requests.
    continuous: Option<Rect>,
    /// The next update must be complete (new pixel format, new size).
    force_full: bool,
    /// When to resend JPEG areas losslessly (the screen has been still since).
    refresh_at: Option<Instant>,
    /// Areas last sent as JPEG.
    lossy: Vec<Rect>,
    /// What the client's screen shows, row by row (for CopyRect).
    rows: RowHashes,
    /// Encoder state and buffers; `None` only while an update is encoded off this task.
    job: Option<UpdateJob>,
    sound: Sound,
    inbuf: BytesMut,
    /// Replies to client messages, written after each batch.
    out: Vec<u8>,
}

impl Session {
    fn new(
        io: Box<dyn Io>,
        cfg: Arc<VncConfig>,
        desktop: Desktop,
        id: u64,
        evict: watch::Receiver<u64>,
    ) -> Self {
        // Before QEMU attaches the surface is empty: announce a placeholder.
        let (width, height) = match desktop.fb.size() {
            (0, _) | (_, 0) => (640, 480),
            size => size,
        };
        let mut rows = RowHashes::default();
        rows.reset(height);
        Self {
            io,
            viewer: desktop.fb.viewer(),
            input: desktop.viewer_input(),
            stats: ViewerStats::new(&cfg.stats),
            job: Some(UpdateJob::new(desktop.fb.clone())),
            cfg,
            desktop,
            id,
            evict,
            width,
            height,
            caps: ClientCaps::default(),
            told: Told::default(),
            pending: None,
            continuous: None,
            force_full: false,
            refresh_at: None,
            lossy: Vec::new(),
            rows,
            sound: Sound::default(),
            inbuf: BytesMut::with_capacity(4096),
            out: Vec::with_capacity(4096),
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.io.write_all(bytes).await?;
        self.stats.add(|c| &c.bytes_out, bytes.len() as u64);
        Ok(())
    }

    async fn run(mut self) -> Result<(), ConnError> {
        self.server_init().await?;
        let mut poll = tokio::time::interval(CONTROL_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            self.send_update_if_due().await?;
            let waiting = self.pending.is_some() || self.continuous.is_some();
            let refresh_at = self.refresh_at;
            let polls = waiting && (self.caps.led_state || self.caps.pointer_motion);
            tokio::select! {
                n = self.io.read_buf(&mut self.inbuf) => {
                    let n = n?;
                    if n == 0 {
                        debug!("client closed the connection");
                        return Ok(());
                    }
                    self.stats.add(|c| &c.bytes_in, n as u64);
                    self.handle_input().await?;
                }
                () = self.viewer.changed(), if waiting => {}
                () = sleep_until_opt(refresh_at), if waiting && refresh_at.is_some() => {}
                ev = self.sound.recv(), if self.sound.is_on() => self.on_sound(ev).await?,
                _ = poll.tick(), if polls => {}
                r = self.evict.changed() => {
                    if r.is_ok() && *self.evict.borrow() > self.id {
                        return Err(ConnError::Evicted);
                    }
                }
            }
        }
    }

    /// ServerInit (RFC 6143 §7.3.2).
    async fn server_init(&mut self) -> Result<(), ConnError> {
        let name = self.cfg.desktop_name.as_bytes();
        let mut out = Vec::with_capacity(24 + name.len());
        out.extend_from_slice(&to16(self.width).to_be_bytes());
        out.extend_from_slice(&to16(self.height).to_be_bytes());
        PixelFormat::NATIVE.encode(&mut out);
        out.extend_from_slice(&u32::try_from(name.len()).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(name);
        self.write(&out).await?;
        Ok(())
    }

    /// Answers a pending request (or feeds continuous updates) once there is something to send.
    async fn send_update_if_due(&mut self) -> Result<(), ConnError> {
        let target = match (self.pending, self.continuous) {
            (Some(r), _) => Some((r.incremental && !self.force_full, r.region)),
            (None, Some(region)) => Some((!self.force_full, region)),
            (None, None) => None,
        };
        let Some((incremental, region)) = target else {
            return Ok(());
        };
        let Some(mut job) = self.job.take() else {
            return Ok(());
        };
        let damage = self.viewer.take_damage();
        let resized = damage.width != 0
            && damage.height != 0
            && (damage.width, damage.height) != (self.width, self.height);
        if resized && (self.caps.desktop_size || self.caps.ext_desktop_size) {
            self.job = Some(job);
            return self.announce_size(damage.width, damage.height).await;
        }
        let full = !incremental || damage.new_surface;
        job.extras.clear();
        job.n_extras = self.told.write(
            &self.caps,
            &self.desktop,
            &job.pf,
            (self.width, self.height),
            &self.cfg.desktop_name,
            &mut job.extras,
        );
        let mut rects = update::update_rects(&damage, full, region, self.width, self.height);
        // Nothing changed since the JPEG went out: now send those areas losslessly.
        let refresh = rects.is_empty() && self.refresh_at.is_some_and(|t| t <= Instant::now());
        let mut saved_quality = None;
        if refresh {
            self.refresh_at = None;
            rects = std::mem::take(&mut self.lossy);
            update::merge_overlaps(&mut rects);
            saved_quality = job.encoders.set_jpeg(None);
        } else if full {
            self.lossy.clear();
        }
        let asked_full = self.pending.is_some_and(|r| !r.incremental);
        if rects.is_empty() && job.n_extras == 0 && !asked_full {
            self.job = Some(job);
            return Ok(());
        }
        self.plan(&mut job, &rects, !full);
        let copies = job
            .parts
            .iter()
            .filter(|p| matches!(p.1, Source::CopyFrom(_)))
            .count() as u64;
        let mut job = encoder::encode(job).await;
        if let Some(q) = saved_quality {
            job.encoders.set_jpeg(q);
        }
        self.stats.add(|c| &c.updates, 1);
        self.stats.add(|c| &c.rects, job.parts.len() as u64);
        self.stats.add(|c| &c.jpeg_rects, job.lossy.len() as u64);
        self.stats.add(|c| &c.copy_rects, copies);
        if refresh {
            self.stats.add(|c| &c.lossless_refreshes, 1);
        } else if !job.lossy.is_empty() {
            self.lossy.extend_from_slice(&job.lossy);
            update::cap_rects(&mut self.lossy);
            self.refresh_at = Some(Instant::now() + LOSSLESS_REFRESH);
        }
        if job.out.len() > HUGE_UPDATE {
            warn!(bytes = job.out.len(), "very large update");
        }
        let result = self.write(&job.out).await;
        self.job = Some(job);
        result?;
        self.pending = None;
        self.force_full = false;
        Ok(())
    }

    /// The size change goes alone; the client asks again for the new surface.
    async fn announce_size(&mut self, width: u32, height: u32) -> Result<(), ConnError> {
        (self.width, self.height) = (width, height);
        let mut out = Vec::with_capacity(32);
        pseudo::update_header(&mut out, 1);
        if self.caps.ext_desktop_size {
            pseudo::extended_desktop_size(&mut out, 0, 0, width, height);
        } else {
            pseudo::desktop_size(&mut out, width, height);
        }
        self.told.layout = false;
        self.rows.reset(height);
        self.write(&out).await?;
        self.pending = None;
        self.force_full = true;
        Ok(())
    }

    /// Decides the update's parts: a single full-width band may be a scroll (CopyRects, when
    /// the client takes them); anything else is read from the framebuffer as it is encoded.
    fn plan(&mut self, job: &mut UpdateJob, rects: &[Rect], incremental: bool) {
        job.parts.clear();
        if !self.caps.copy_rect {
            job.parts
                .extend(rects.iter().map(|r| (*r, Source::Framebuffer)));
            return;
        }
        if let Some(band) = update::single_band(rects, self.width)
            && job.fb.read_rect(band, &mut job.band.pixels) == band
        {
            job.band.rect = band;
            let hashes: Vec<_> = job
                .band
                .pixels
                .chunks_exact(band.w as usize)
                .map(row_hash)
                .collect();
            update::plan_band(band, &hashes, incremental, &mut self.rows, &mut job.parts);
            return;
        }
        for r in rects {
            self.rows.forget(r);
            job.parts.push((*r, Source::Framebuffer));
        }
    }

    /// Handles every complete message read so far; replies go out after each.
    async fn handle_input(&mut self) -> Result<(), ConnError> {
        while let Some(msg) = decode(&mut self.inbuf)? {
            trace!(?msg, "client message");
            self.out.clear();
            self.handle(msg).await?;
            if !self.out.is_empty() {
                let out = std::mem::take(&mut self.out);
                let r = self.write(&out).await;
                self.out = out;
                r?;
            }
        }
        Ok(())
    }

    async fn handle(&mut self, msg: ClientMsg) -> Result<(), ConnError> {
        match msg {
            ClientMsg::SetPixelFormat(p) => {
                if let Some(job) = self.job.as_mut() {
                    job.pf = p;
                }
                // Cached colour bytes are in the old format: resend everything.
                self.force_full = true;
            }
            ClientMsg::SetEncodings(list) => self.set_encodings(&list),
            ClientMsg::UpdateRequest {
                incremental,
                x,
                y,
                w,
                h,
            } => {
                let region = Rect {
                    x: x.into(),
                    y: y.into(),
                    w: w.into(),
                    h: h.into(),
                };
                // While continuous updates run, incremental requests are redundant.
                if self.continuous.is_none() || !incremental {
                    self.pending = Some(Request {
                        // A non-incremental request wins over an incremental one.
                        incremental: self.pending.is_none_or(|p| p.incremental) && incremental,
                        region,
                    });
                }
            }
            ClientMsg::QemuExtKey { down, keycode, .. } => {
                self.stats.add(|c| &c.input_events, 1);
                self.input.key(keycode, down).await;
            }
            ClientMsg::Key { down, keysym } => {
                self.stats.add(|c| &c.input_events, 1);
                self.input.keysym(keysym, down).await;
            }
            ClientMsg::Pointer { mask, x, y } => {
                self.stats.add(|c| &c.input_events, 1);
                if self.caps.pointer_motion && self.told.absolute == Some(false) {
                    // Relative mode: coordinates are deltas biased by 0x7FFF.
                    self.input
                        .relative(i32::from(x) - 0x7fff, i32::from(y) - 0x7fff);
                } else {
                    self.input.pointer(x.into(), y.into());
                }
                self.input.buttons(rfb_buttons(mask)).await;
            }
            ClientMsg::SetDesktopSize {
                width: w,
                height: h,
                screens,
            } => {
                let status =
                    extras::resize_status(&self.desktop.control, w, h, screens.len()).await;
                info!(w, h, status, "client asked for a new desktop size");
                if self.caps.ext_desktop_size {
                    pseudo::update_header(&mut self.out, 1);
                    pseudo::extended_desktop_size(
                        &mut self.out,
                        1,
                        status,
                        self.width,
                        self.height,
                    );
                }
            }
            ClientMsg::Fence { flags, payload } => {
                if flags & pseudo::FENCE_REQUEST != 0 {
                    // Messages are handled in order and each reply is written before the next
                    // is read: every ordering flag already holds.
                    let keep = flags
                        & (pseudo::FENCE_BLOCK_BEFORE
                            | pseudo::FENCE_BLOCK_AFTER
                            | pseudo::FENCE_SYNC_NEXT);
                    pseudo::server_fence(&mut self.out, keep, &payload);
                }
            }
            ClientMsg::EnableContinuousUpdates { enable, x, y, w, h } => {
                if !self.caps.continuous_updates {
                    return Err(ConnError::Refused(
                        "EnableContinuousUpdates without the pseudo-encoding",
                    ));
                }
                if enable {
                    self.continuous = Some(Rect {
                        x: x.into(),
                        y: y.into(),
                        w: w.into(),
                        h: h.into(),
                    });
                } else {
                    self.continuous = None;
                    pseudo::end_of_continuous_updates(&mut self.out);
                }
            }
            ClientMsg::QemuAudio { op, format } => {
                if !self.caps.qemu_audio {
                    return Err(ConnError::Refused(
                        "QEMU audio message without the pseudo-encoding",
                    ));
                }
                self.sound
                    .message(op, format, &self.desktop.audio, &mut self.out)
                    .map_err(ConnError::Refused)?;
            }
            ClientMsg::CutText(_) => {}
        }
        Ok(())
    }

    fn set_encodings(&mut self, list: &[i32]) {
        let before = std::mem::replace(&mut self.caps, ClientCaps::from_list(list));
        let caps = &self.caps;
        if let Some(job) = self.job.as_mut() {
            job.encoders.configure(caps);
            job.last_rect = caps.last_rect;
        }
        debug!(?caps, "encodings set");
        self.told = Told::after_set_encodings(&before, caps, &mut self.out);
    }

    async fn on_sound(
        &mut self,
        ev: Result<AudioEvent, broadcast::error::RecvError>,
    ) -> Result<(), ConnError> {
        use broadcast::error::RecvError;
        match ev {
            Ok(AudioEvent::Pcm(format, data, since)) => {
                let mut out = std::mem::take(&mut self.out);
                out.clear();
                self.sound.pcm(&format, &data, &mut out);
                let r = self.write(&out).await;
                self.out = out;
                r?;
                self.stats.add(|c| &c.audio_bytes, data.len() as u64);
                self.stats.audio_sent(since);
            }
            Ok(AudioEvent::Started(_) | AudioEvent::Stopped) => {}
            // A viewer that cannot keep up loses audio rather than delaying anyone.
            Err(RecvError::Lagged(n)) => {
                debug!(chunks = n, "audio dropped: viewer too slow");
                self.stats.add(|c| &c.audio_dropped, n);
            }
            Err(RecvError::Closed) => self.sound.stop(),
        }
        Ok(())
    }
}

/// RFB button mask bits → QEMU buttons: bits 0-2 left/middle/right, 3-6 wheel up/down/left/right.
fn rfb_buttons(mask: u8) -> u32 {
    [
        button::LEFT,
        button::MIDDLE,
        button::RIGHT,
        button::WHEEL_UP,
        button::WHEEL_DOWN,
        button::WHEEL_LEFT,
        button::WHEEL_RIGHT,
    ]
    .iter()
    .enumerate()
    .filter(|(bit, _)| mask & (1 << bit) != 0)
    .fold(0, |held, (_, b)| held | 1 << b)
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

fn to16(v: u32) -> u16 {
    u16::try_from(v).unwrap_or(u16::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfb_button_bits_map_to_qemu_buttons() {
        assert_eq!(rfb_buttons(0), 0);
        assert_eq!(rfb_buttons(0b001), 1 << button::LEFT);
        assert_eq!(rfb_buttons(0b010), 1 << button::MIDDLE);
        assert_eq!(rfb_buttons(0b100), 1 << button::RIGHT);
        assert_eq!(
            rfb_buttons(0b111_1000),
            1 << button::WHEEL_UP
                | 1 << button::WHEEL_DOWN
                | 1 << button::WHEEL_LEFT
                | 1 << button::WHEEL_RIGHT
        );
        assert_eq!(rfb_buttons(0x80), 0, "bit 7 is not a button");
    }
}
