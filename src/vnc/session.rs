//! One RFB client after the handshake: the message loop. The client paces us: an update is sent
//! when it asked for one (or turned continuous updates on) and something changed; sound goes out
//! as it comes; input goes to the guest in order. A slow client only ever falls behind itself.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;
use tracing::{debug, info, trace};

use super::audio::Sound;
use super::caps::ClientCaps;
use super::config::VncConfig;
use super::cut_text::ClientClipboard;
use super::delivery::{Fetched, Place};
use super::extras::{self, Told};
use super::frame::{EncodedRect, ZLIB_HEADER};
use super::h264::{Next, VideoMode};
use super::handshake::ConnError;
use super::proto::{ClientMsg, PixelFormat, decode_with, rfb_buttons};
use super::pseudo;
use super::share::{Frame, Kind};
use crate::framebuffer::{Rect, Viewer};
use crate::net::Io;
use crate::qemu::audio::AudioEvent;
use crate::session::Desktop;
use crate::session::input::ViewerInput;
use crate::session::stats::ViewerStats;

/// How often LED and pointer-mode changes (which come without damage) are looked at.
const CONTROL_POLL: Duration = Duration::from_millis(250);
/// Small rectangles are gathered into one write up to this size; larger ones go straight from
/// the shared frame.
const WRITE_BATCH: usize = 64 * 1024;

/// An update the client is waiting for.
#[derive(Clone, Copy)]
struct Request {
    incremental: bool,
    region: Rect,
}

pub(super) struct Session {
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
    /// Where this viewer stands in the shared encoding of its group.
    place: Place,
    /// Tight, or the console's H.264 stream while the screen looks like video.
    video: VideoMode,
    /// The client's ZRLE inflater has had its zlib header.
    zlib_started: bool,
    sound: Sound,
    clipboard: ClientClipboard,
    inbuf: BytesMut,
    /// Replies to client messages, written after each batch.
    out: Vec<u8>,
}

impl Session {
    pub(super) fn new(
        io: Box<dyn Io>,
        cfg: Arc<VncConfig>,
        desktop: Desktop,
        (id, evict): (u64, watch::Receiver<u64>),
        stats: ViewerStats,
    ) -> Self {
        let clip = desktop.clipboard.viewer();
        // Before QEMU attaches the surface is empty: announce a placeholder.
        let (width, height) = match desktop.fb.size() {
            (0, _) | (_, 0) => (640, 480),
            size => size,
        };
        Self {
            io,
            viewer: desktop.fb.viewer(),
            input: desktop.viewer_input(),
            stats,
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
            place: Place::default(),
            video: VideoMode::default(),
            zlib_started: false,
            sound: Sound::default(),
            clipboard: ClientClipboard::new(clip),
            inbuf: BytesMut::with_capacity(4096),
            out: Vec::with_capacity(4096),
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.io.write_all(bytes).await?;
        self.stats.add(|c| &c.bytes_out, bytes.len() as u64);
        Ok(())
    }

    pub(super) async fn run(mut self) -> Result<(), ConnError> {
        self.server_init().await?;
        let mut poll = tokio::time::interval(CONTROL_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            self.send_update_if_due().await?;
            let waiting = self.pending.is_some() || self.continuous.is_some();
            let refresh_at = self.place.refresh_at.map(Instant::from_std);
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
                () = self.viewer.changed(), if waiting && !self.video.active() => {}
                ev = self.video.next(), if waiting && self.video.active() => self.on_video(ev).await?,
                () = sleep_until_opt(refresh_at), if waiting && refresh_at.is_some() => {}
                ev = self.sound.recv(), if self.sound.is_on() => self.on_sound(ev).await?,
                ev = self.clipboard.next() => {
                    self.out.clear();
                    self.clipboard.event(ev, self.caps.ext_clipboard, &mut self.out);
                    self.flush_out().await?;
                }
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
        let (fw, fh) = self.desktop.fb.size();
        let resized = fw != 0 && fh != 0 && (fw, fh) != (self.width, self.height);
        if self.video.active() {
            if incremental && !resized {
                return Ok(()); // the stream's pictures answer it
            }
            self.video.stop();
        }
        if resized && (self.caps.desktop_size || self.caps.ext_desktop_size) {
            return self.announce_size(fw, fh).await;
        }
        if !incremental {
            self.place.forget();
        }
        let (extras, n_extras) = self.extras();
        let whole = region.x == 0
            && region.y == 0
            && region.w >= self.width
            && region.h >= self.height
            && !resized;
        let group = self
            .place
            .group(&self.caps, &self.cfg.groups, &self.desktop.fb);
        let fetched = if whole {
            self.place
                .next_frame(&group, incremental, n_extras > 0, &mut self.viewer)
                .await
        } else {
            // A part of the screen (or a surface the client cannot be told about): this
            // viewer's own encoding, and its place in the chain is kept.
            let size = (self.width, self.height);
            Fetched::Frame(
                self.place
                    .private_region(&group, region, incremental, size)
                    .await,
            )
        };
        match fetched {
            Fetched::Frame(frame) => {
                if frame.kind == Kind::CatchUp && whole {
                    self.stats.add(|c| &c.catch_ups, 1);
                }
                self.send(&frame, &extras, n_extras).await
            }
            Fetched::Nothing => {
                if n_extras > 0 {
                    self.write_update(&[], &extras, n_extras).await?;
                    self.pending = None;
                }
                Ok(())
            }
        }
    }

    /// The pseudo-rectangles this viewer is owed (cursor, LEDs, name, …) and their count.
    fn extras(&mut self) -> (Vec<u8>, usize) {
        let mut extras = Vec::new();
        let n = self.told.write(
            &self.caps,
            &self.desktop,
            &self.place.pf,
            (self.width, self.height),
            &self.cfg.desktop_name,
            &mut extras,
        );
        (extras, n)
    }

    /// A picture of the shared H.264 stream, as one whole-screen rectangle after this viewer's
    /// pseudo-rectangles; or, once the screen calmed down (or changed size), back to Tight with a
    /// complete update.
    async fn on_video(&mut self, ev: Next) -> Result<(), ConnError> {
        let f = match ev {
            Next::Picture(f) if (f.width, f.height) == (self.width, self.height) => f,
            _ => {
                debug!("the screen calmed down: back to Tight");
                self.video.stop();
                self.place.forget();
                self.force_full = true;
                return Ok(());
            }
        };
        let (extras, n_extras) = self.extras();
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        pseudo::update_header(&mut out, u16::try_from(n_extras + 1).unwrap_or(u16::MAX));
        out.extend_from_slice(&extras);
        self.video.header(&f, &mut out);
        let r = self.write(&out).await;
        self.out = out;
        r?;
        self.write(&f.data).await?;
        self.stats.add(|c| &c.updates, 1);
        self.stats.add(|c| &c.h264_frames, 1);
        self.stats.add(|c| &c.h264_key_frames, u64::from(f.key));
        self.pending = None;
        Ok(())
    }

    /// Sends `frame` with this viewer's pseudo-rectangles first, and counts it.
    async fn send(
        &mut self,
        frame: &Frame,
        extras: &[u8],
        n_extras: usize,
    ) -> Result<(), ConnError> {
        let rects = &frame.encoded.rects;
        if rects.is_empty() && n_extras == 0 && self.pending.is_some_and(|r| r.incremental) {
            return Ok(());
        }
        let t = Instant::now();
        self.write_update(rects, extras, n_extras).await?;
        crate::metrics::global().written(self.cfg.protocol, t.elapsed());
        self.stats.add(|c| &c.updates, 1);
        self.stats.add(|c| &c.rects, rects.len() as u64);
        let jpeg = rects.iter().filter(|r| r.lossy.is_some()).count();
        self.stats.add(|c| &c.jpeg_rects, jpeg as u64);
        self.stats.add(|c| &c.copy_rects, frame.copies as u64);
        if frame.kind == Kind::Refresh {
            self.stats.add(|c| &c.lossless_refreshes, 1);
        }
        let screen = u64::from(self.width) * u64::from(self.height);
        let now = std::time::Instant::now();
        if frame.kind == Kind::Delta
            && self.caps.h264
            && self.cfg.h264
            && self.video.observe(&frame.damage, screen, now)
            && self.video.start(&self.desktop.video, &self.desktop.budget)
        {
            debug!("the screen looks like video: H.264");
        }
        self.pending = None;
        self.force_full = false;
        Ok(())
    }

    /// Writes one FramebufferUpdate: the header, `extras` (`n_extras` pseudo-rectangles), then
    /// the shared rectangles, gathered into bounded writes.
    async fn write_update(
        &mut self,
        rects: &[EncodedRect],
        extras: &[u8],
        n_extras: usize,
    ) -> Result<(), ConnError> {
        let count = rects.len() + n_extras;
        let last_rect = self.caps.last_rect && count >= usize::from(u16::MAX);
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        pseudo::update_header(
            &mut out,
            if last_rect {
                u16::MAX
            } else {
                u16::try_from(count).unwrap_or(u16::MAX)
            },
        );
        out.extend_from_slice(extras);
        let mut result = Ok(());
        for (i, r) in rects.iter().enumerate() {
            if !last_rect && i + n_extras >= usize::from(u16::MAX) {
                break;
            }
            let mut bytes = &r.bytes[..];
            if r.zrle && !self.zlib_started && bytes.len() >= 16 {
                // The client's inflater starts with the zlib header, inside its first rect.
                let len = u32::from_be_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
                out.extend_from_slice(&bytes[..12]);
                out.extend_from_slice(&len.saturating_add(2).to_be_bytes());
                out.extend_from_slice(&ZLIB_HEADER);
                bytes = &bytes[16..];
                self.zlib_started = true;
            }
            if out.len() + bytes.len() <= WRITE_BATCH {
                out.extend_from_slice(bytes);
                continue;
            }
            if let Err(e) = self.write(&out).await {
                result = Err(e);
                break;
            }
            out.clear();
            if let Err(e) = self.write(bytes).await {
                result = Err(e);
                break;
            }
        }
        if result.is_ok() {
            if last_rect {
                pseudo::last_rect(&mut out);
            }
            result = self.write(&out).await;
        }
        self.out = out;
        Ok(result?)
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
        self.place.forget();
        self.write(&out).await?;
        self.pending = None;
        self.force_full = true;
        Ok(())
    }

    /// Handles every complete message read so far; replies go out after each.
    async fn handle_input(&mut self) -> Result<(), ConnError> {
        let cut_limit = self.clipboard.limit();
        loop {
            if self.clipboard.skipping(&mut self.inbuf) {
                return Ok(());
            }
            let Some(msg) = decode_with(&mut self.inbuf, cut_limit)? else {
                return Ok(());
            };
            trace!(?msg, "client message");
            self.out.clear();
            self.handle(msg).await?;
            self.flush_out().await?;
        }
    }

    /// Writes what `self.out` gathered.
    async fn flush_out(&mut self) -> Result<(), ConnError> {
        if !self.out.is_empty() {
            let out = std::mem::take(&mut self.out);
            let r = self.write(&out).await;
            self.out = out;
            self.out.clear();
            r?;
        }
        Ok(())
    }

    async fn handle(&mut self, msg: ClientMsg) -> Result<(), ConnError> {
        match msg {
            ClientMsg::SetPixelFormat(p) => {
                self.place.pf = p;
                // Cached colour bytes are in the old format: resend everything.
                self.force_full = true;
                self.place.forget();
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
            ClientMsg::CutText(latin1) => self.clipboard.classic(&latin1),
            ClientMsg::ExtendedCutText(body) => {
                self.clipboard
                    .extended(self.caps.ext_clipboard, &body, &mut self.out)
            }
            ClientMsg::CutTextSkipped { len, extended } => self.clipboard.skipped(len, extended),
        }
        Ok(())
    }

    fn set_encodings(&mut self, list: &[i32]) {
        let before = std::mem::replace(&mut self.caps, ClientCaps::from_list(list));
        let caps = &self.caps;
        debug!(?caps, "encodings set");
        self.told = Told::after_set_encodings(&before, caps, &mut self.out);
        self.clipboard
            .set_encodings(self.caps.ext_clipboard, &mut self.out);
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

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

fn to16(v: u32) -> u16 {
    u16::try_from(v).unwrap_or(u16::MAX)
}
