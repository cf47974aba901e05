//! One viewer's place in the shared encoding of its group: which group its settings put it in,
//! where its screen stands in the group's chain, and the steps from a request to a frame to send
//! (take a shared frame, encode the next one for everyone, wait for someone else's, or catch up
//! alone).

use std::sync::Arc;
use std::time::Instant;

use super::caps::{ClientCaps, Encoding};
use super::frame::Settings;
use super::proto::PixelFormat;
use super::share::{Cursor, Frame, Group, Groups, Key, Next};
use super::tight;
use super::update::{self, Part, Source};
use crate::framebuffer::{Framebuffer, Position, Rect, Viewer};

/// What a request comes to.
pub enum Fetched {
    Frame(Arc<Frame>),
    /// Nothing new to show now.
    Nothing,
}

pub struct Place {
    /// The client's pixel format.
    pub pf: PixelFormat,
    group: Option<Arc<Group>>,
    cursor: Option<Cursor>,
    /// Where the viewer's screen stood when it left another group: it rejoins by catch-up.
    rejoin: Option<Position>,
    /// When the group's lossless refresh is due (the screen has been still since).
    pub refresh_at: Option<Instant>,
}

impl Default for Place {
    fn default() -> Self {
        Self {
            pf: PixelFormat::NATIVE,
            group: None,
            cursor: None,
            rejoin: None,
            refresh_at: None,
        }
    }
}

impl Place {
    /// The viewer's screen can no longer be trusted (new size, pixel format, full request).
    pub fn forget(&mut self) {
        self.cursor = None;
        self.rejoin = None;
    }

    /// The group for the client's current settings.
    pub fn group(&mut self, caps: &ClientCaps, groups: &Groups, fb: &Framebuffer) -> Arc<Group> {
        let lossy = caps.encoding == Encoding::Tight;
        let stateless = matches!(caps.encoding, Encoding::Raw | Encoding::Hextile);
        let key = Key {
            settings: Settings {
                encoding: caps.encoding,
                pf: self.pf,
                jpeg: if lossy {
                    tight::jpeg_quality(caps.quality, caps.fine_quality)
                } else {
                    None
                },
                level: if stateless {
                    0
                } else {
                    caps.compress.unwrap_or(6).min(9)
                },
            },
            copy_rect: caps.copy_rect,
        };
        match &self.group {
            Some(g) if g.key == key => Arc::clone(g),
            old => {
                // Another group's chain ids mean nothing here: rejoin from where the screen is.
                if old.is_some()
                    && let Some(c) = self.cursor.take()
                {
                    self.rejoin = Some(c.pos);
                }
                let g = groups.get(key, fb);
                self.group = Some(Arc::clone(&g));
                g
            }
        }
    }

    /// This viewer's own update of `region` (damage since its position, or all of it).
    pub async fn private_region(
        &mut self,
        group: &Arc<Group>,
        region: Rect,
        incremental: bool,
        (width, height): (u32, u32),
    ) -> Arc<Frame> {
        let since = if incremental {
            self.cursor.map(|c| c.pos)
        } else {
            None
        };
        let d = group.framebuffer().damage_since(since);
        let full = !incremental || d.new_surface;
        let rects = update::update_rects(&d, full, region, width, height);
        let parts: Vec<Part> = rects.iter().map(|r| (*r, Source::Framebuffer)).collect();
        group.encode_private(parts, d.to).await
    }

    /// The next frame for a viewer asking for the whole screen. `extras`: the viewer has
    /// pseudo-rectangles to send anyway, so even a frame without pixels is worth sending.
    pub async fn next_frame(
        &mut self,
        group: &Arc<Group>,
        incremental: bool,
        extras: bool,
        viewer: &mut Viewer,
    ) -> Fetched {
        loop {
            let next = match self.rejoin.take() {
                Some(pos) => match group.catch_up(pos).await {
                    Some((frame, cursor)) => Next::Send(frame, cursor),
                    None => {
                        self.cursor = None;
                        continue;
                    }
                },
                None => group.next(self.cursor),
            };
            match next {
                Next::Send(frame, cursor) => {
                    self.cursor = Some(cursor);
                    viewer.seen(cursor.pos);
                    self.refresh_at = None;
                    if frame.encoded.rects.is_empty() && !extras && incremental {
                        // Nothing to show (say, the guest only moved the pointer): look again.
                        continue;
                    }
                    return Fetched::Frame(frame);
                }
                Next::Encode(job) => group.run(job).await,
                Next::Wait => group.wait().await,
                Next::CatchUp => {
                    let Some(c) = self.cursor else { continue };
                    match group.catch_up(c.pos).await {
                        Some((frame, cursor)) => {
                            self.cursor = Some(cursor);
                            viewer.seen(cursor.pos);
                            return Fetched::Frame(frame);
                        }
                        None => self.cursor = None,
                    }
                }
                Next::Idle(refresh_at) => {
                    self.refresh_at = refresh_at;
                    return Fetched::Nothing;
                }
            }
        }
    }
}
