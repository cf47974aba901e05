//! What sharing costs in bytes: shared encodings start every rectangle with a fresh zlib stream
//! (ZRLE) or a reset one (Tight), so no rectangle refers to data another viewer may not have.
//! Frames of the real guest's scenes are taken from our framebuffer and encoded twice, as the
//! changed 64-row bands a viewer would be sent: once with our per-rectangle resets, once with
//! one stream for the whole run (what a per-connection server keeps). The ratio is the price.

use std::time::Duration;

use anyhow::Result;
use vdi_sidecar::framebuffer::Framebuffer;
use vdi_sidecar::vnc::encode::Zrle;
use vdi_sidecar::vnc::proto::PixelFormat;
use vdi_sidecar::vnc::tight::{self, Tight};

use crate::stats::{Row, Table};
use crate::{Opts, Rig};

const BAND: usize = 64;

/// Snapshots of the screen every `gap` for `n` frames while `scene` runs.
async fn frames(rig: &mut Rig, fb: &Framebuffer, scene: &str, n: usize) -> Result<Vec<Vec<u32>>> {
    let gap = Duration::from_millis(100);
    let (length, _) = rig
        .start_scene(scene, gap * n as u32, 1, Duration::from_secs(2))
        .await?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(fb.snapshot().pixels);
        tokio::time::sleep(gap).await;
    }
    rig.finish_scene(length).await?;
    Ok(out)
}

/// Bytes of both ways of encoding the changed bands of consecutive frames.
fn sizes(frames: &[Vec<u32>], width: usize, zrle: bool) -> (usize, usize) {
    let pf = PixelFormat::NATIVE;
    let (mut shared, mut one_stream) = (0, 0);
    let mut z_shared = Zrle::new(6);
    let mut z_one = Zrle::continuous(6);
    let mut t_shared = Tight::new(6, None);
    let mut t_one = Tight::continuous(6, None);
    let mut out = Vec::new();
    let mut piece = Vec::new();
    for pair in frames.windows(2) {
        let (old, new) = (&pair[0], &pair[1]);
        let height = new.len() / width;
        for y0 in (0..height).step_by(BAND) {
            let rows = BAND.min(height - y0);
            let span = y0 * width..(y0 + rows) * width;
            if old.get(span.clone()) == new.get(span.clone()) {
                continue;
            }
            let px = &new[span];
            if zrle {
                out.clear();
                z_shared.encode(&pf, width, rows, px, &mut out);
                shared += out.len();
                out.clear();
                z_one.encode(&pf, width, rows, px, &mut out);
                one_stream += out.len();
            } else {
                // Tight takes pieces of at most 2048 x 32 pixels here (65536 pixels).
                let mut pieces = Vec::new();
                tight::split(
                    vdi_sidecar::framebuffer::Rect {
                        x: 0,
                        y: 0,
                        w: width as u32,
                        h: rows as u32,
                    },
                    &mut pieces,
                );
                for p in pieces {
                    piece.clear();
                    for r in p.y as usize..(p.y + p.h) as usize {
                        let at = r * width + p.x as usize;
                        piece.extend_from_slice(&px[at..at + p.w as usize]);
                    }
                    let (w, h) = (p.w as usize, p.h as usize);
                    out.clear();
                    t_shared.encode(&pf, w, h, &piece, &mut out);
                    shared += out.len();
                    out.clear();
                    t_one.encode(&pf, w, h, &piece, &mut out);
                    one_stream += out.len();
                }
            }
        }
    }
    (shared, one_stream)
}

pub async fn rows(rig: &mut Rig, opts: &Opts, fb: &Framebuffer, table: &mut Table) -> Result<()> {
    let n = if opts.full { 30 } else { 4 };
    let (w, _) = fb.size();
    for scene in ["desktop", "scroll", "video"] {
        let frames = frames(rig, fb, scene, n).await?;
        for zrle in [true, false] {
            let (shared, one) = sizes(&frames, w as usize, zrle);
            let name = if zrle { "ZRLE" } else { "Tight lossless" };
            table.budget(
                Row::other(
                    format!("KiB sent, {scene}, {name}: shared (resets) vs one stream"),
                    "KiB",
                    false,
                ),
                shared as f64 / 1024.0,
                one as f64 / 1024.0,
            );
        }
    }
    table.note(
        "the resets rows compare our shared encoding (ours) with one zlib stream per \
         connection (right column), same frames of the guest's scenes"
            .into(),
    );
    Ok(())
}
