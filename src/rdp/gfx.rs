//! RDP's graphics pipeline (MS-RDPEGFX) with H.264 (AVC420) from the console's shared encoder.
//!
//! ironrdp-server 0.13 hosts the channel and egfx 0.3 negotiates it; we decide what is sent.
//! egfx 0.3's own frame functions are not used: its AVC420 region rectangles are one pixel
//! short, its capability confirm drops a client's AVC_DISABLED flag and its uncompressed frame
//! can only start at (0, 0). So the session builds StartFrame / WireToSurface1 / EndFrame
//! itself, counts frames in flight from the client's acknowledgements (flow control), and
//! refreshes lossy areas losslessly with the Planar codec once the screen is still.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use ironrdp::core::{Encode, EncodeResult, WriteCursor};
use ironrdp::graphics::rdp6::{BgrAChannels, BitmapStreamEncoder};
use ironrdp::graphics::zgfx::wrap_uncompressed;
use ironrdp::pdu::geometry::{ExclusiveRectangle, InclusiveRectangle};
use ironrdp::svc::ChannelFlags;
use ironrdp_dvc::{DvcEncode, DvcMessage, encode_dvc_messages};
use ironrdp_egfx::pdu::{
    Avc420BitmapStream, CapabilitiesAdvertisePdu, CapabilitiesV8Flags, CapabilitiesV10Flags,
    CapabilitiesV81Flags, CapabilitiesV103Flags, CapabilitiesV104Flags, CapabilitiesV107Flags,
    CapabilitySet, Codec1Type, EndFramePdu, GfxPdu, PixelFormat, QuantQuality, StartFramePdu,
    Timestamp, WireToSurface1Pdu,
};
use ironrdp_egfx::server::{GraphicsPipelineHandler, GraphicsPipelineServer};
use ironrdp_server::{
    EgfxServerMessage, GfxDvcBridge, GfxServerFactory, GfxServerHandle, ServerEvent,
    ServerEventSender,
};
use tokio::sync::Notify;
use tokio::sync::mpsc::UnboundedSender;
use tracing::{debug, info};

use crate::framebuffer::{Framebuffer, Rect};

/// The client's acknowledgement answering `queueDepth`: it stopped acknowledging frames
/// (MS-RDPEGFX 2.2.2.13, SUSPEND_FRAME_ACKNOWLEDGEMENT).
const ACKS_SUSPENDED: u32 = 0xFFFF_FFFF;
/// Rows per Planar tile of a lossless refresh (bounds one PDU and the encode buffer).
const REFRESH_ROWS: u32 = 64;
/// QP announced for AVC420 regions (informational for the client).
const REGION_QP: u8 = 22;

/// What the pipeline's callbacks learnt, read by the session's display.
#[derive(Debug, Default)]
struct State {
    /// The client's advertised capability sets allow H.264 (before egfx's confirm).
    client_avc: bool,
    /// Capabilities confirmed: `Some(avc)`.
    ready: Option<bool>,
    closed: bool,
    /// Highest frame id the client acknowledged.
    acked: u32,
    acks_suspended: bool,
    advertised: Vec<String>,
}

#[derive(Default)]
struct Shared {
    sender: Mutex<Option<UnboundedSender<ServerEvent>>>,
    handle: Mutex<Option<GfxServerHandle>>,
    state: Mutex<State>,
    changed: Notify,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One session's link to its graphics pipeline: the factory given to ironrdp and the
/// display's side share it.
#[derive(Clone, Default)]
pub struct GfxLink {
    shared: Arc<Shared>,
}

impl GfxLink {
    pub fn factory(&self) -> Box<dyn GfxServerFactory> {
        Box::new(Factory {
            shared: Arc::clone(&self.shared),
        })
    }

    /// H.264 may be sent: capabilities confirmed, AVC allowed by the client, channel open.
    pub fn avc_ready(&self) -> bool {
        let st = lock(&self.shared.state);
        st.ready == Some(true) && !st.closed
    }

    /// The pipeline is up but the client refused H.264 (it keeps the bitmap path).
    pub fn avc_refused(&self) -> bool {
        lock(&self.shared.state).ready == Some(false)
    }

    /// Waits for a callback (capabilities, acknowledgement, close).
    pub async fn changed(&self) {
        self.shared.changed.notified().await;
    }

    /// Frames sent up to `last_sent` that the client has not acknowledged; 0 when it
    /// suspended acknowledgements.
    pub fn in_flight(&self, last_sent: u32) -> u32 {
        let st = lock(&self.shared.state);
        if st.acks_suspended {
            0
        } else {
            last_sent.saturating_sub(st.acked)
        }
    }

    /// Runs `f` on the pipeline server (surface commands), `None` before the channel exists.
    pub fn with_server<R>(&self, f: impl FnOnce(&mut GraphicsPipelineServer) -> R) -> Option<R> {
        let handle = lock(&self.shared.handle).clone()?;
        let mut server = handle.lock().unwrap_or_else(|p| p.into_inner());
        Some(f(&mut server))
    }

    /// Sends what the pipeline server queued (surface commands), then `pdus`, in that order.
    pub fn send(&self, pdus: Vec<GfxPdu>) -> Result<usize> {
        let (channel, mut messages) = self
            .with_server(|s| (s.channel_id(), s.drain_output()))
            .context("no graphics channel")?;
        let channel = channel.context("graphics channel not open")?;
        let mut bytes = 0;
        for pdu in &pdus {
            let raw = ironrdp::core::encode_vec(pdu).map_err(|e| anyhow!("GFX PDU: {e}"))?;
            let wrapped = wrap_uncompressed(&raw);
            bytes += wrapped.len();
            messages.push(Box::new(Wrapped(wrapped)) as DvcMessage);
        }
        let messages = encode_dvc_messages(channel, messages, ChannelFlags::SHOW_PROTOCOL)
            .map_err(|e| anyhow!("DVC framing: {e}"))?;
        let sender = lock(&self.shared.sender)
            .clone()
            .context("no server event channel")?;
        sender
            .send(ServerEvent::Egfx(EgfxServerMessage::SendMessages {
                messages,
            }))
            .map_err(|_| anyhow!("session ended"))?;
        Ok(bytes)
    }

    /// What the client advertised, for the log.
    pub fn advertised(&self) -> Vec<String> {
        lock(&self.shared.state).advertised.clone()
    }
}

/// A ZGFX-wrapped PDU as a DVC message.
struct Wrapped(Vec<u8>);

impl Encode for Wrapped {
    fn encode(&self, dst: &mut WriteCursor<'_>) -> EncodeResult<()> {
        ironrdp::core::ensure_size!(in: dst, size: self.0.len());
        dst.write_slice(&self.0);
        Ok(())
    }

    fn name(&self) -> &'static str {
        "RDPGFX (ZGFX segment)"
    }

    fn size(&self) -> usize {
        self.0.len()
    }
}

impl DvcEncode for Wrapped {}

struct Factory {
    shared: Arc<Shared>,
}

impl ServerEventSender for Factory {
    fn set_sender(&mut self, sender: UnboundedSender<ServerEvent>) {
        *lock(&self.shared.sender) = Some(sender);
    }
}

impl GfxServerFactory for Factory {
    fn build_gfx_handler(&self) -> Box<dyn GraphicsPipelineHandler> {
        Box::new(Handler {
            shared: Arc::clone(&self.shared),
        })
    }

    fn build_server_with_handle(&self) -> Option<(GfxDvcBridge, GfxServerHandle)> {
        let server = GraphicsPipelineServer::new(self.build_gfx_handler());
        let handle: GfxServerHandle = Arc::new(Mutex::new(server));
        *lock(&self.shared.handle) = Some(Arc::clone(&handle));
        Some((GfxDvcBridge::new(Arc::clone(&handle)), handle))
    }
}

/// egfx's callbacks. They run with the pipeline server locked: never touch the handle here.
struct Handler {
    shared: Arc<Shared>,
}

/// Whether one advertised or confirmed capability set lets the server send AVC420.
pub fn allows_avc(cap: &CapabilitySet) -> bool {
    match cap {
        CapabilitySet::V8 { .. } => false,
        CapabilitySet::V8_1 { flags } => flags.contains(CapabilitiesV81Flags::AVC420_ENABLED),
        CapabilitySet::V10 { flags } | CapabilitySet::V10_2 { flags } => {
            !flags.contains(CapabilitiesV10Flags::AVC_DISABLED)
        }
        CapabilitySet::V10_1 => true,
        CapabilitySet::V10_3 { flags } => !flags.contains(CapabilitiesV103Flags::AVC_DISABLED),
        CapabilitySet::V10_4 { flags }
        | CapabilitySet::V10_5 { flags }
        | CapabilitySet::V10_6 { flags }
        | CapabilitySet::V10_6Err { flags } => !flags.contains(CapabilitiesV104Flags::AVC_DISABLED),
        CapabilitySet::V10_7 { flags } => !flags.contains(CapabilitiesV107Flags::AVC_DISABLED),
    }
}

impl GraphicsPipelineHandler for Handler {
    fn capabilities_advertise(&mut self, pdu: &CapabilitiesAdvertisePdu) {
        let caps: Vec<CapabilitySet> = pdu
            .0
            .iter()
            .filter_map(|c| c.parsed().ok().flatten())
            .collect();
        let mut st = lock(&self.shared.state);
        st.client_avc = caps.iter().any(allows_avc);
        st.advertised = caps.iter().map(|c| format!("{c:?}")).collect();
        debug!(caps = ?st.advertised, avc = st.client_avc, "GFX capabilities advertised");
    }

    fn on_ready(&mut self, negotiated: &CapabilitySet) {
        let mut st = lock(&self.shared.state);
        // The confirmed set carries the client's own flags (our preferences have all of them),
        // so its AVC_DISABLED counts; the advertised sets are checked too.
        let avc = st.client_avc && allows_avc(negotiated);
        st.ready = Some(avc);
        st.closed = false;
        info!(confirmed = ?negotiated, h264 = avc, "RDP graphics pipeline ready");
        drop(st);
        self.shared.changed.notify_one();
    }

    fn on_frame_ack(&mut self, frame_id: u32, queue_depth: u32, _total_frames_decoded: u32) {
        let mut st = lock(&self.shared.state);
        st.acks_suspended = queue_depth == ACKS_SUSPENDED;
        st.acked = st.acked.max(frame_id);
        drop(st);
        self.shared.changed.notify_one();
    }

    fn on_close(&mut self) {
        lock(&self.shared.state).closed = true;
        self.shared.changed.notify_one();
    }

    /// Every version we can serve, each with all flags: egfx confirms the client's highest
    /// common version with the intersection of flags, i.e. the client's own.
    fn preferred_capabilities(&self) -> Vec<CapabilitySet> {
        vec![
            CapabilitySet::V10_7 {
                flags: CapabilitiesV107Flags::all(),
            },
            CapabilitySet::V10_6 {
                flags: CapabilitiesV104Flags::all(),
            },
            CapabilitySet::V10_5 {
                flags: CapabilitiesV104Flags::all(),
            },
            CapabilitySet::V10_4 {
                flags: CapabilitiesV104Flags::all(),
            },
            CapabilitySet::V10_3 {
                flags: CapabilitiesV103Flags::all(),
            },
            CapabilitySet::V10_2 {
                flags: CapabilitiesV10Flags::all(),
            },
            CapabilitySet::V10_1,
            CapabilitySet::V10 {
                flags: CapabilitiesV10Flags::all(),
            },
            CapabilitySet::V8_1 {
                flags: CapabilitiesV81Flags::all(),
            },
            CapabilitySet::V8 {
                flags: CapabilitiesV8Flags::all(),
            },
        ]
    }

    /// egfx's own frame tracking is not used (see the module comment).
    fn max_frames_in_flight(&self) -> u32 {
        u32::MAX
    }
}

/// The wire timestamp of `ms` since the session started.
pub fn timestamp(ms: u64) -> Timestamp {
    Timestamp {
        milliseconds: (ms % 1000) as u16,
        seconds: ((ms / 1000) % 60) as u8,
        minutes: ((ms / 60_000) % 60) as u8,
        hours: ((ms / 3_600_000) % 24) as u16,
    }
}

fn exclusive(r: &Rect) -> Option<ExclusiveRectangle> {
    Some(ExclusiveRectangle {
        left: u16::try_from(r.x).ok()?,
        top: u16::try_from(r.y).ok()?,
        right: u16::try_from(r.x + r.w).ok()?,
        bottom: u16::try_from(r.y + r.h).ok()?,
    })
}

/// One AVC420 picture as the three PDUs of a frame. Region rectangles are written exclusive
/// (right and bottom one past the last pixel) as RDPGFX_RECT16 is on the wire, through egfx's
/// `InclusiveRectangle` type (a plain four-field record).
pub fn avc420_frame(
    surface_id: u16,
    frame_id: u32,
    ts: Timestamp,
    h264: &[u8],
    rects: &[Rect],
) -> Option<Vec<GfxPdu>> {
    let regions: Vec<ExclusiveRectangle> = rects.iter().map(exclusive).collect::<Option<_>>()?;
    let bounds = Rect::bounding(rects).and_then(|b| exclusive(&b))?;
    let stream = Avc420BitmapStream {
        rectangles: regions
            .iter()
            .map(|r| InclusiveRectangle {
                left: r.left,
                top: r.top,
                right: r.right,
                bottom: r.bottom,
            })
            .collect(),
        quant_qual_vals: regions
            .iter()
            .map(|_| QuantQuality {
                quantization_parameter: REGION_QP,
                progressive: false,
                quality: 100,
            })
            .collect(),
        data: h264,
    };
    let bitmap_data = ironrdp::core::encode_vec(&stream).ok()?;
    Some(vec![
        GfxPdu::StartFrame(StartFramePdu {
            timestamp: ts,
            frame_id,
        }),
        GfxPdu::WireToSurface1(WireToSurface1Pdu {
            surface_id,
            codec_id: Codec1Type::Avc420,
            pixel_format: PixelFormat::XRgb,
            destination_rectangle: bounds,
            bitmap_data,
        }),
        GfxPdu::EndFrame(EndFramePdu { frame_id }),
    ])
}

/// A lossless refresh of `rects` from `fb` as one frame of Planar tiles (RLE, no alpha).
pub fn planar_frame(
    surface_id: u16,
    frame_id: u32,
    ts: Timestamp,
    fb: &Framebuffer,
    rects: &[Rect],
) -> Result<Vec<GfxPdu>> {
    let mut pdus = vec![GfxPdu::StartFrame(StartFramePdu {
        timestamp: ts,
        frame_id,
    })];
    let mut pixels = Vec::new();
    let mut out = Vec::new();
    for r in rects {
        let mut y = r.y;
        while y < r.y + r.h {
            let tile = Rect {
                x: r.x,
                y,
                w: r.w,
                h: REFRESH_ROWS.min(r.y + r.h - y),
            };
            y += tile.h;
            pixels.clear();
            let got = fb.read_rect_le(tile, &mut pixels);
            if got.w == 0 || got.h == 0 {
                continue;
            }
            let dest = exclusive(&got).context("tile outside 16-bit coordinates")?;
            // Worst case of the RLE planes: a little over 3 bytes a pixel, plus headers.
            out.resize(got.w as usize * got.h as usize * 4 + 64, 0);
            let n = BitmapStreamEncoder::new(got.w as usize, got.h as usize)
                .encode_bitmap::<BgrAChannels>(&pixels, &mut out, true)
                .map_err(|e| anyhow!("Planar: {e}"))?;
            pdus.push(GfxPdu::WireToSurface1(WireToSurface1Pdu {
                surface_id,
                codec_id: Codec1Type::Planar,
                pixel_format: PixelFormat::XRgb,
                destination_rectangle: dest,
                bitmap_data: out[..n].to_vec(),
            }));
        }
    }
    pdus.push(GfxPdu::EndFrame(EndFramePdu { frame_id }));
    Ok(pdus)
}

/// Areas sent lossily since the last lossless refresh, kept few (merged past a bound).
#[derive(Debug, Default)]
pub struct Lossy {
    rects: VecDeque<Rect>,
    since: Option<Instant>,
}

/// Lossy areas kept before they are merged into their bounding box.
const MAX_LOSSY: usize = 32;

impl Lossy {
    pub fn add(&mut self, rects: &[Rect], now: Instant) {
        self.rects.extend(rects.iter().copied());
        if self.rects.len() > MAX_LOSSY {
            let all: Vec<Rect> = self.rects.drain(..).collect();
            self.rects.extend(Rect::bounding(&all));
        }
        self.since = Some(now);
    }

    /// When the last lossy picture was sent, if anything is lossy.
    pub fn last(&self) -> Option<Instant> {
        self.since.filter(|_| !self.rects.is_empty())
    }

    pub fn take(&mut self) -> Vec<Rect> {
        self.since = None;
        self.rects.drain(..).collect()
    }

    pub fn clear(&mut self) {
        self.rects.clear();
        self.since = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pixman::X8R8G8B8;
    use ironrdp::core::{ReadCursor, decode_cursor};
    use ironrdp::graphics::rdp6::BitmapStreamDecoder;

    #[test]
    fn avc_is_allowed_only_where_the_client_said_so() {
        assert!(!allows_avc(&CapabilitySet::V8 {
            flags: CapabilitiesV8Flags::empty()
        }));
        assert!(!allows_avc(&CapabilitySet::V8_1 {
            flags: CapabilitiesV81Flags::empty()
        }));
        assert!(allows_avc(&CapabilitySet::V8_1 {
            flags: CapabilitiesV81Flags::AVC420_ENABLED
        }));
        assert!(allows_avc(&CapabilitySet::V10_7 {
            flags: CapabilitiesV107Flags::SMALL_CACHE
        }));
        assert!(!allows_avc(&CapabilitySet::V10_7 {
            flags: CapabilitiesV107Flags::AVC_DISABLED
        }));
        assert!(!allows_avc(&CapabilitySet::V10 {
            flags: CapabilitiesV10Flags::AVC_DISABLED
        }));
    }

    /// The wire form a client parses: region rectangles exclusive, the destination their
    /// bounding box, one frame id in start and end.
    #[test]
    fn an_avc420_frame_carries_exclusive_regions() {
        let rects = [
            Rect {
                x: 0,
                y: 0,
                w: 16,
                h: 8,
            },
            Rect {
                x: 100,
                y: 50,
                w: 20,
                h: 10,
            },
        ];
        let pdus =
            avc420_frame(3, 7, timestamp(61_234), &[0, 0, 0, 1, 0x67], &rects).expect("frame");
        assert_eq!(pdus.len(), 3);
        let GfxPdu::WireToSurface1(w) = &pdus[1] else {
            panic!("not a WireToSurface1");
        };
        assert_eq!(w.codec_id, Codec1Type::Avc420);
        assert_eq!(
            (
                w.destination_rectangle.left,
                w.destination_rectangle.top,
                w.destination_rectangle.right,
                w.destination_rectangle.bottom
            ),
            (0, 0, 120, 60)
        );
        let mut cur = ReadCursor::new(&w.bitmap_data);
        let s: Avc420BitmapStream<'_> = decode_cursor(&mut cur).expect("metablock");
        assert_eq!(s.rectangles.len(), 2);
        let r = &s.rectangles[1];
        assert_eq!((r.left, r.top, r.right, r.bottom), (100, 50, 120, 60));
        assert_eq!(s.data, &[0, 0, 0, 1, 0x67]);
        assert!(matches!(
            pdus[0],
            GfxPdu::StartFrame(StartFramePdu { frame_id: 7, .. })
        ));
        assert!(matches!(
            pdus[2],
            GfxPdu::EndFrame(EndFramePdu { frame_id: 7 })
        ));
    }

    /// A Planar refresh decodes (ironrdp's decoder) back to the framebuffer's exact pixels.
    #[test]
    fn a_planar_refresh_is_exact() {
        let (w, h) = (70u32, 80u32);
        let fb = Framebuffer::new();
        let frame: Vec<u8> = (0..w * h)
            .flat_map(|i| (i.wrapping_mul(2_654_435_761) & 0x00ff_ffff).to_ne_bytes())
            .collect();
        fb.scanout(w, h, w * 4, X8R8G8B8, &frame).expect("scanout");
        let rect = Rect {
            x: 5,
            y: 3,
            w: 60,
            h: 70,
        };
        let pdus = planar_frame(1, 2, timestamp(0), &fb, &[rect]).expect("refresh");
        // 70 rows: a 64-row tile and a 6-row tile between start and end.
        assert_eq!(pdus.len(), 4);
        let mut want = Vec::new();
        fb.read_rect(rect, &mut want);
        let mut got = Vec::new();
        for pdu in &pdus[1..3] {
            let GfxPdu::WireToSurface1(t) = pdu else {
                panic!("not a tile");
            };
            assert_eq!(t.codec_id, Codec1Type::Planar);
            let d = &t.destination_rectangle;
            let (tw, th) = (usize::from(d.right - d.left), usize::from(d.bottom - d.top));
            let mut rgb = Vec::new();
            BitmapStreamDecoder::default()
                .decode_bitmap_stream_to_rgb24(&t.bitmap_data, &mut rgb, tw, th)
                .expect("decode");
            got.extend(
                rgb.chunks_exact(3)
                    .map(|p| u32::from(p[0]) << 16 | u32::from(p[1]) << 8 | u32::from(p[2])),
            );
        }
        assert_eq!(got, want, "lossless");
    }

    #[test]
    fn lossy_areas_stay_few_and_are_taken_once() {
        let mut l = Lossy::default();
        let now = Instant::now();
        assert!(l.last().is_none());
        for i in 0..100 {
            l.add(
                &[Rect {
                    x: i,
                    y: i,
                    w: 1,
                    h: 1,
                }],
                now,
            );
        }
        assert!(l.rects.len() <= MAX_LOSSY);
        assert_eq!(l.last(), Some(now));
        let taken = l.take();
        assert!(!taken.is_empty());
        let b = Rect::bounding(&taken).expect("some");
        assert_eq!((b.x, b.y, b.w, b.h), (0, 0, 100, 100));
        assert!(l.last().is_none());
    }
}
