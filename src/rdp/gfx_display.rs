//! The display of a session whose client takes H.264: pictures of the console's shared stream
//! go out as AVC420 frames while the client keeps up (a few frames unacknowledged at most),
//! lossy areas are refreshed with Planar once the screen is still, and a size change is a
//! ResetGraphics and a new surface (no deactivation of the session).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use tracing::{debug, info};

use super::gfx::{GfxLink, Lossy, avc420_frame, planar_frame, timestamp};
use crate::framebuffer::{Framebuffer, Rect, clip};
use crate::h264::{Frame, Subscription, Video};
use crate::session::stats::{Counters, ViewerStats};

/// Frames the client may have unacknowledged; a picture beyond that is not sent and the
/// viewer resumes at the next key frame (gnome-remote-desktop throttles the same way).
pub const WINDOW: u32 = 3;
/// How long the screen stays still before lossy areas are sent losslessly (default).
pub const STILL: Duration = Duration::from_millis(300);
/// Bytes of ours the server may still have to write before a picture is dropped: a client
/// that suspended acknowledgements (or reads slowly) is paced by its socket.
const MAX_UNWRITTEN: u64 = 8 << 20;

/// What the GFX display waits for next.
pub enum Wake {
    Picture(Option<Arc<Frame>>),
    /// An acknowledgement or another pipeline callback.
    Pipeline,
    Still,
}

pub struct GfxView {
    link: GfxLink,
    sub: Subscription,
    fb: Framebuffer,
    surface: Option<(u16, u32, u32)>,
    /// Last frame id sent (ids start at 1).
    frame_id: u32,
    started: Instant,
    lossy: Lossy,
    /// Pictures were dropped for a slow client: resume at a key frame once it caught up.
    behind: bool,
    stats: ViewerStats,
    /// `None`: lossy areas are never refreshed.
    still: Option<Duration>,
    /// Bytes handed to the server, and the session's bytes written when we started.
    queued: u64,
    written_at_start: u64,
}

impl GfxView {
    pub fn new(link: GfxLink, video: &Video, stats: ViewerStats, still: Option<Duration>) -> Self {
        info!("RDP session switches to H.264 (AVC420) over the graphics pipeline");
        let written_at_start = Counters::get(&stats.own().bytes_out);
        Self {
            still,
            queued: 0,
            written_at_start,
            link,
            sub: video.subscribe(),
            fb: video.framebuffer().clone(),
            surface: None,
            frame_id: 0,
            started: Instant::now(),
            lossy: Lossy::default(),
            behind: false,
            stats,
        }
    }

    /// Whether the pipeline still carries H.264 (the client may close the channel).
    pub fn active(&self) -> bool {
        self.link.avc_ready()
    }

    /// Waits for the next thing to do. Cancel safe.
    pub async fn wait(&mut self) -> Wake {
        let still = self.lossy.last().zip(self.still).map(|(t, d)| t + d);
        let still = async {
            match still {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            f = self.sub.next() => Wake::Picture(f),
            _ = self.link.changed() => Wake::Pipeline,
            _ = still => Wake::Still,
        }
    }

    /// Handles what `wait` returned.
    pub fn handle(&mut self, wake: Wake) -> Result<()> {
        match wake {
            Wake::Picture(Some(f)) => self.picture(&f),
            Wake::Picture(None) => Ok(()),
            Wake::Pipeline => {
                if self.behind && self.room() {
                    self.behind = false;
                    self.sub.resync();
                }
                Ok(())
            }
            Wake::Still => self.refresh(),
        }
    }

    fn room(&self) -> bool {
        let written = Counters::get(&self.stats.own().bytes_out) - self.written_at_start;
        self.link.in_flight(self.frame_id) < WINDOW
            && self.queued.saturating_sub(written) < MAX_UNWRITTEN
    }

    fn ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn picture(&mut self, f: &Frame) -> Result<()> {
        if self.behind {
            return Ok(());
        }
        if !self.room() {
            // Too far ahead of the client: drop this and what follows until a key frame.
            self.behind = true;
            self.stats.add(|c| &c.h264_dropped, 1);
            debug!(frame = f.seq, "client behind: H.264 pictures dropped");
            return Ok(());
        }
        let surface = match self.surface {
            Some((id, w, h)) if (w, h) == (f.width, f.height) => id,
            _ => {
                if !f.key {
                    // A picture of a size the client has no surface for yet.
                    self.sub.resync();
                    return Ok(());
                }
                self.new_surface(f.width, f.height)?
            }
        };
        self.frame_id += 1;
        let Some(pdus) = avc420_frame(
            surface,
            self.frame_id,
            timestamp(self.ms()),
            &f.data,
            &f.rects,
        ) else {
            return Ok(());
        };
        self.queued += self.link.send(pdus)? as u64;
        self.lossy.add(&f.rects, Instant::now());
        self.stats.add(|c| &c.updates, 1);
        self.stats.add(|c| &c.rects, f.rects.len() as u64);
        self.stats.add(|c| &c.h264_frames, 1);
        self.stats
            .add(|c| &c.h264_encode_ns, f.encode_time.as_nanos() as u64);
        if f.key {
            self.stats.add(|c| &c.h264_key_frames, 1);
        }
        Ok(())
    }

    /// ResetGraphics for the new size, one surface mapped at the origin.
    fn new_surface(&mut self, w: u32, h: u32) -> Result<u16> {
        let (w16, h16) = (
            u16::try_from(w).unwrap_or(u16::MAX),
            u16::try_from(h).unwrap_or(u16::MAX),
        );
        let had = self.surface.is_some();
        let id = self
            .link
            .with_server(|s| {
                if had {
                    s.resize(w16, h16);
                } else {
                    s.set_output_dimensions(w16, h16);
                }
                let id = s.create_surface(w16, h16)?;
                s.map_surface_to_output(id, 0, 0).then_some(id)
            })
            .flatten()
            .ok_or_else(|| anyhow::anyhow!("graphics surface {w}x{h} not created"))?;
        debug!(surface = id, width = w, height = h, "GFX surface");
        self.surface = Some((id, w, h));
        self.lossy.clear();
        Ok(id)
    }

    /// Sends the lossy areas again, exactly (Planar), once the screen is still.
    fn refresh(&mut self) -> Result<()> {
        let Some((surface, w, h)) = self.surface else {
            self.lossy.clear();
            return Ok(());
        };
        if !self.room() {
            // Try again a little later, when the client caught up.
            let rects = self.lossy.take();
            self.lossy.add(&rects, Instant::now());
            return Ok(());
        }
        let rects: Vec<Rect> = self
            .lossy
            .take()
            .into_iter()
            .map(|r| clip(r, w, h))
            .filter(|r| r.w > 0 && r.h > 0)
            .collect();
        if rects.is_empty() || self.fb.size() != (w, h) {
            return Ok(());
        }
        self.frame_id += 1;
        let pdus = planar_frame(
            surface,
            self.frame_id,
            timestamp(self.ms()),
            &self.fb,
            &rects,
        )?;
        let bytes = self.link.send(pdus)?;
        self.queued += bytes as u64;
        debug!(rects = rects.len(), bytes, "lossless refresh (Planar)");
        self.stats.add(|c| &c.lossless_refreshes, 1);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pixman::X8R8G8B8;
    use ironrdp_dvc::DvcProcessor;
    use ironrdp_egfx::pdu::{
        CapabilitiesAdvertisePdu, CapabilitiesV107Flags, CapabilitySet, FrameAcknowledgePdu,
        GfxPdu, QueueDepth,
    };
    use ironrdp_server::{GfxDvcBridge, ServerEvent};
    use tokio::sync::mpsc::UnboundedReceiver;

    const CHANNEL: u32 = 7;

    /// A pipeline whose "client" advertised `caps`, as ironrdp-server would wire it.
    fn pipeline(caps: &[CapabilitySet]) -> (GfxLink, GfxDvcBridge, UnboundedReceiver<ServerEvent>) {
        let link = GfxLink::default();
        let mut factory = link.factory();
        let (tx, rx) = ServerEvent::create_channel();
        factory.set_sender(tx);
        let (mut bridge, _) = factory.build_server_with_handle().expect("bridge");
        bridge.start(CHANNEL).expect("start");
        let pdu = GfxPdu::CapabilitiesAdvertise(CapabilitiesAdvertisePdu::from_typed(caps));
        let raw = ironrdp::core::encode_vec(&pdu).expect("encode");
        bridge.process(CHANNEL, &raw).expect("caps");
        (link, bridge, rx)
    }

    fn ack(bridge: &mut GfxDvcBridge, frame_id: u32, queue_depth: QueueDepth) {
        let pdu = GfxPdu::FrameAcknowledge(FrameAcknowledgePdu {
            queue_depth,
            frame_id,
            total_frames_decoded: frame_id,
        });
        let raw = ironrdp::core::encode_vec(&pdu).expect("encode");
        bridge.process(CHANNEL, &raw).expect("ack");
    }

    fn solid(w: u32, h: u32, px: u32) -> Vec<u8> {
        std::iter::repeat_n(px.to_ne_bytes(), (w * h) as usize)
            .flatten()
            .collect()
    }

    /// Runs the view for `d` while the screen changes every 10 ms.
    async fn run_for(view: &mut GfxView, fb: &Framebuffer, d: Duration) {
        let end = Instant::now() + d;
        let mut i = 0u32;
        while Instant::now() < end {
            i += 1;
            fb.update(0, 0, 16, 16, 64, X8R8G8B8, &solid(16, 16, i), false)
                .expect("update");
            if let Ok(w) = tokio::time::timeout(Duration::from_millis(10), view.wait()).await {
                view.handle(w).expect("handle");
            }
        }
    }

    /// What a hostile client sends on the pipeline is an error for its session (ironrdp ends
    /// it), never a panic, and does not make the pipeline ready.
    #[test]
    fn malformed_pipeline_pdus_are_errors() {
        let link = GfxLink::default();
        let mut factory = link.factory();
        let (tx, _rx) = ServerEvent::create_channel();
        factory.set_sender(tx);
        let (mut bridge, _) = factory.build_server_with_handle().expect("bridge");
        bridge.start(CHANNEL).expect("start");
        let caps = GfxPdu::CapabilitiesAdvertise(CapabilitiesAdvertisePdu::from_typed(&[
            CapabilitySet::V10_7 {
                flags: CapabilitiesV107Flags::empty(),
            },
        ]));
        let good = ironrdp::core::encode_vec(&caps).expect("encode");
        for cut in 0..good.len() {
            let _ = bridge.process(CHANNEL, &good[..cut]);
        }
        // A capability count far beyond the bytes, and a PDU length lying upwards.
        let mut lying = good.clone();
        lying[8] = 0xff;
        lying[9] = 0xff;
        assert!(bridge.process(CHANNEL, &lying).is_err());
        assert!(!link.avc_ready(), "garbage made the pipeline ready");
        let mut long = good.clone();
        long[4] = 0xff;
        long[5] = 0xff;
        long[6] = 0xff;
        long[7] = 0x7f;
        // egfx reads what the PDU holds, not what its header claims: no allocation follows it.
        let _ = bridge.process(CHANNEL, &long);
        assert!(bridge.process(CHANNEL, &[0xff; 64]).is_err());
    }

    #[test]
    fn avc_disabled_clients_are_not_sent_h264() {
        let (link, _b, _rx) = pipeline(&[CapabilitySet::V10_7 {
            flags: CapabilitiesV107Flags::AVC_DISABLED,
        }]);
        assert!(!link.avc_ready());
        assert!(link.avc_refused());
        let (link, _b, _rx) = pipeline(&[CapabilitySet::V10_7 {
            flags: CapabilitiesV107Flags::empty(),
        }]);
        assert!(link.avc_ready());
    }

    /// A client that never acknowledges gets the window's frames and no more (nothing queues
    /// up for it); once it acknowledges it resumes at a key frame.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_stops_acknowledging_gets_no_more_than_the_window() {
        let (link, mut bridge, mut rx) = pipeline(&[CapabilitySet::V10_7 {
            flags: CapabilitiesV107Flags::empty(),
        }]);
        let fb = Framebuffer::new();
        fb.scanout(64, 64, 256, X8R8G8B8, &solid(64, 64, 0))
            .expect("scanout");
        let video = Video::new(fb.clone(), 60.0);
        let stats = ViewerStats::new(&std::sync::Arc::default());
        let mut view = GfxView::new(link, &video, stats.clone(), None);
        // Under a loaded machine the window may take longer to fill: keep going (bounded).
        for _ in 0..8 {
            run_for(&mut view, &fb, Duration::from_millis(1500)).await;
            if Counters::get(&stats.own().h264_dropped) >= 1 {
                break;
            }
        }
        let sent = Counters::get(&stats.own().h264_frames);
        assert_eq!(sent, u64::from(WINDOW), "frames without acknowledgement");
        assert!(Counters::get(&stats.own().h264_dropped) >= 1);
        let mut events = 0;
        while rx.try_recv().is_ok() {
            events += 1;
        }
        // The surface commands and one event per frame.
        assert!(events <= WINDOW as usize + 1, "{events} events queued");

        ack(&mut bridge, WINDOW, QueueDepth::AvailableBytes(0));
        run_for(&mut view, &fb, Duration::from_millis(1500)).await;
        let after = Counters::get(&stats.own().h264_frames);
        assert!(after > sent, "frames resume after the acknowledgement");
        assert_eq!(
            Counters::get(&stats.own().h264_key_frames),
            2,
            "the first picture and the one after the gap are key frames"
        );
    }
}
