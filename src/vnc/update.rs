//! Planning one FramebufferUpdate, without I/O: which rectangles to send for the damage and the
//! requested region, merged so no pixel goes twice; which rows of a full-width band are a
//! scroll (CopyRect from the viewer's own screen) and which must be sent as pixels.

use super::scroll::{RowHash, RowHashes};
use crate::framebuffer::{Damage, Rect};

/// Past this many damage rectangles, one bounding box costs less in headers.
const MAX_RECTS: usize = 32;
/// Most rects remembered for the lossless refresh: under endless animation the list would
/// otherwise grow with every frame.
pub const MAX_LOSSY_RECTS: usize = 64;

/// Where a rectangle's content comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Read from the framebuffer when encoding.
    Framebuffer,
    /// From the band snapshot whose rows were hashed (so the rows sent are the rows hashed).
    Band,
    /// CopyRect from row `src_y` of the viewer's own screen (full width).
    CopyFrom(u32),
}

/// One rectangle of an update and where its pixels come from.
pub type Part = (Rect, Source);

/// The rectangles to send: the damage inside the requested region (all of it when `full`).
pub fn update_rects(
    damage: &Damage,
    full: bool,
    region: Rect,
    width: u32,
    height: u32,
) -> Vec<Rect> {
    let clip = |r: Rect| -> Option<Rect> {
        let x0 = r.x.max(region.x);
        let y0 = r.y.max(region.y);
        let x1 =
            r.x.saturating_add(r.w)
                .min(region.x.saturating_add(region.w))
                .min(width);
        let y1 =
            r.y.saturating_add(r.h)
                .min(region.y.saturating_add(region.h))
                .min(height);
        (x1 > x0 && y1 > y0).then(|| Rect {
            x: x0,
            y: y0,
            w: x1 - x0,
            h: y1 - y0,
        })
    };
    if full {
        return clip(Rect::full(width, height)).into_iter().collect();
    }
    let mut rects: Vec<Rect> = damage.rects.iter().filter_map(|r| clip(*r)).collect();
    if rects.len() > MAX_RECTS {
        rects = Rect::bounding(&rects).into_iter().collect();
    }
    merge_overlaps(&mut rects);
    rects
}

/// Keeps a remembered region bounded: merge overlaps, and past the limit keep only the bounding
/// box (refreshing a bit more than needed beats unbounded memory).
pub fn cap_rects(rects: &mut Vec<Rect>) {
    if rects.len() <= MAX_LOSSY_RECTS {
        return;
    }
    merge_overlaps(rects);
    if rects.len() > MAX_LOSSY_RECTS {
        *rects = Rect::bounding(rects).into_iter().collect();
    }
}

/// Damage from several guest frames overlaps (often the same full-screen rect many times):
/// replace overlapping rects by their bounding box until none overlap, so no pixel is sent twice.
pub fn merge_overlaps(rects: &mut Vec<Rect>) {
    'again: loop {
        for i in 0..rects.len() {
            for j in i + 1..rects.len() {
                if rects[i].overlaps(&rects[j]) {
                    let merged = rects[i].union(&rects[j]);
                    rects.swap_remove(j);
                    rects[i] = merged;
                    continue 'again;
                }
            }
        }
        return;
    }
}

/// The one full-width band `rects` is, if it is one: only such bands can be scrolls.
pub fn single_band(rects: &[Rect], width: u32) -> Option<Rect> {
    match rects {
        [r] if r.x == 0 && r.w == width && r.h > 0 => Some(*r),
        _ => None,
    }
}

/// Plans a full-width band whose new rows hash to `hashes`: scrolled runs become CopyRects
/// (only for incremental requests: a full one must not rely on the client's screen), the rest
/// full-width pixel runs from the band. Records the band in the viewer's row hashes.
pub fn plan_band(
    band: Rect,
    hashes: &[RowHash],
    incremental: bool,
    rows: &mut RowHashes,
    parts: &mut Vec<Part>,
) {
    let moves = if incremental {
        rows.find_moves(band.y, hashes)
    } else {
        Vec::new()
    };
    let mut copied = vec![false; band.h as usize];
    for m in &moves {
        parts.push((
            Rect {
                x: 0,
                y: m.dst_y,
                w: band.w,
                h: m.rows,
            },
            Source::CopyFrom(m.src_y),
        ));
        let from = (m.dst_y - band.y) as usize;
        copied[from..from + m.rows as usize].fill(true);
    }
    let mut y = 0;
    while y < band.h {
        if copied[y as usize] {
            y += 1;
            continue;
        }
        let start = y;
        while y < band.h && !copied[y as usize] {
            y += 1;
        }
        parts.push((
            Rect {
                x: 0,
                y: band.y + start,
                w: band.w,
                h: y - start,
            },
            Source::Band,
        ));
    }
    rows.record(band.y, hashes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framebuffer::Position;
    use crate::vnc::scroll::row_hash;

    fn r(x: u32, y: u32, w: u32, h: u32) -> Rect {
        Rect { x, y, w, h }
    }

    #[test]
    fn overlapping_damage_is_sent_once() {
        let damage = Damage {
            width: 100,
            height: 100,
            new_surface: false,
            attached: true,
            to: Position {
                generation: 1,
                seq: 1,
            },
            rects: vec![
                r(0, 0, 100, 100),
                r(0, 0, 100, 100),
                r(10, 10, 5, 5),
                r(0, 0, 100, 100),
            ],
        };
        assert_eq!(
            update_rects(&damage, false, r(0, 0, 100, 100), 100, 100),
            [r(0, 0, 100, 100)]
        );
        let mut v = vec![
            r(0, 0, 10, 10),
            r(5, 5, 10, 10),
            r(50, 50, 2, 2),
            r(14, 14, 2, 2),
        ];
        merge_overlaps(&mut v);
        assert_eq!(v, [r(0, 0, 16, 16), r(50, 50, 2, 2)]);
    }

    #[test]
    fn damage_is_clipped_to_the_request_and_many_rects_become_one() {
        let damage = Damage {
            width: 100,
            height: 100,
            new_surface: false,
            attached: true,
            to: Position {
                generation: 1,
                seq: 1,
            },
            rects: (0..40).map(|i| r(i * 2, i * 2, 1, 1)).collect(),
        };
        assert_eq!(
            update_rects(&damage, false, r(0, 0, 100, 100), 100, 100),
            [r(0, 0, 79, 79)]
        );
        // A region outside the damage: nothing; a full request: the whole region.
        let one = Damage {
            rects: vec![r(0, 0, 10, 10)],
            ..damage
        };
        assert!(update_rects(&one, false, r(50, 50, 10, 10), 100, 100).is_empty());
        assert_eq!(
            update_rects(&one, true, r(50, 50, 500, 500), 100, 100),
            [r(50, 50, 50, 50)]
        );
        // A hostile region whose end overflows u32 is clipped, not wrapped.
        assert_eq!(
            update_rects(&one, false, r(5, 5, u32::MAX, u32::MAX), 100, 100),
            [r(5, 5, 5, 5)]
        );
    }

    #[test]
    fn remembered_lossy_areas_stay_bounded() {
        // Endless animation: the same full-screen rect every frame collapses to one.
        let mut v = vec![r(0, 0, 800, 600); 10_000];
        cap_rects(&mut v);
        assert_eq!(v, [r(0, 0, 800, 600)]);
        // Many disjoint small rects past the limit become their bounding box.
        let mut v: Vec<Rect> = (0..100).map(|i| r(i * 10, 0, 5, 5)).collect();
        cap_rects(&mut v);
        assert_eq!(v, [r(0, 0, 995, 5)]);
        // Under the limit nothing changes.
        let mut v = vec![r(0, 0, 5, 5), r(10, 0, 5, 5)];
        cap_rects(&mut v);
        assert_eq!(v.len(), 2);
    }

    /// Rows of a 4-pixel-wide screen, each row a distinct value.
    fn screen(rows: impl IntoIterator<Item = u32>) -> Vec<RowHash> {
        rows.into_iter().map(|v| row_hash(&[v; 4])).collect()
    }

    #[test]
    fn a_scrolled_band_becomes_copies_and_the_rest_pixels() {
        let mut rows = RowHashes::default();
        rows.reset(40);
        rows.record(0, &screen(0..40));
        // The page moved up by 3 rows: rows 0..37 show old 3..40; rows 37..40 are new.
        let new = screen((3..40).chain(100..103));
        let band = r(0, 0, 4, 40);
        let mut parts = Vec::new();
        plan_band(band, &new, true, &mut rows, &mut parts);
        assert_eq!(
            parts,
            [
                (r(0, 0, 4, 37), Source::CopyFrom(3)),
                (r(0, 37, 4, 3), Source::Band)
            ]
        );
        // The same band again is unchanged rows: no copies, all from the band.
        parts.clear();
        plan_band(band, &new, true, &mut rows, &mut parts);
        assert_eq!(parts, [(band, Source::Band)]);
        // A full (non-incremental) request never relies on the client's screen.
        let mut fresh = RowHashes::default();
        fresh.reset(40);
        fresh.record(0, &screen(0..40));
        parts.clear();
        plan_band(band, &new, false, &mut fresh, &mut parts);
        assert_eq!(parts, [(band, Source::Band)]);
    }

    #[test]
    fn only_one_full_width_rect_is_a_band() {
        assert_eq!(single_band(&[r(0, 5, 10, 3)], 10), Some(r(0, 5, 10, 3)));
        assert_eq!(single_band(&[r(1, 5, 9, 3)], 10), None);
        assert_eq!(single_band(&[r(0, 0, 10, 1), r(0, 4, 10, 1)], 10), None);
        assert_eq!(single_band(&[], 10), None);
    }
}
