//! Scroll detection for CopyRect. QEMU tells us which pixels changed, never that they moved; a
//! scrolling console or page repaints whole full-width bands. Each viewer keeps one hash per row
//! of what it was last sent; a band whose new rows are the old rows shifted becomes CopyRects
//! (12 + 4 bytes each) instead of pixels.

use crate::framebuffer::Rect;

/// A row hash; 0 means "unknown" (the viewer's row is not known exactly).
pub type RowHash = u64;

const UNKNOWN: RowHash = 0;
/// Shorter copied runs are not worth a rectangle header.
const MIN_RUN: u32 = 8;

/// Hash of one row of canonical pixels (never [`UNKNOWN`]).
pub fn row_hash(row: &[u32]) -> RowHash {
    // FNV-1a over whole pixels, then a final mix: fast, and collisions only cost a wrong picture
    // if two different rows also line up as a consistent shift (they are re-verified as a run).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &p in row {
        h = (h ^ u64::from(p)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 29;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 32;
    if h == UNKNOWN { 1 } else { h }
}

/// One viewer's knowledge of its own screen, row by row.
#[derive(Debug, Default)]
pub struct RowHashes {
    rows: Vec<RowHash>,
}

/// A band row range `[dst, dst + len)` to fill from `[dst + dy, …)` of the viewer's screen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    pub dst_y: u32,
    pub src_y: u32,
    pub rows: u32,
}

impl RowHashes {
    /// Forgets everything (new surface, new pixel format): nothing can be a copy source.
    pub fn reset(&mut self, height: u32) {
        self.rows.clear();
        self.rows.resize(height as usize, UNKNOWN);
    }

    /// Rows `[y, y + h)` were changed with pixels we did not hash.
    pub fn forget(&mut self, r: &Rect) {
        let end = ((r.y + r.h) as usize).min(self.rows.len());
        if let Some(rows) = self.rows.get_mut(r.y as usize..end) {
            rows.fill(UNKNOWN);
        }
    }

    /// Rows from `y` on now show exactly these (full-width) rows.
    pub fn record(&mut self, y: u32, hashes: &[RowHash]) {
        let start = y as usize;
        let end = (start + hashes.len()).min(self.rows.len());
        if start < end {
            self.rows[start..end].copy_from_slice(&hashes[..end - start]);
        }
    }

    /// For a full-width band starting at `y0` whose new rows hash to `new`: the moves (in the
    /// order they must be applied) that recreate rows from the viewer's current screen.
    pub fn find_moves(&self, y0: u32, new: &[RowHash]) -> Vec<Move> {
        let height = self.rows.len() as i64;
        // Candidate shift: the most common offset between a changed new row and the one old
        // row with the same (unique) content.
        let mut unique: std::collections::HashMap<RowHash, Option<u32>> =
            std::collections::HashMap::with_capacity(self.rows.len());
        for (i, &h) in self.rows.iter().enumerate() {
            if h != UNKNOWN {
                unique
                    .entry(h)
                    .and_modify(|e| *e = None)
                    .or_insert(Some(i as u32));
            }
        }
        let mut votes: std::collections::HashMap<i64, u32> = std::collections::HashMap::new();
        for (i, &h) in new.iter().enumerate() {
            let y = i64::from(y0) + i as i64;
            if self.rows.get(y as usize) == Some(&h) {
                continue; // unchanged row
            }
            if let Some(Some(src)) = unique.get(&h) {
                *votes.entry(i64::from(*src) - y).or_default() += 1;
            }
        }
        let Some((&dy, &n)) = votes.iter().max_by_key(|(dy, n)| (**n, -dy.abs())) else {
            return Vec::new();
        };
        if dy == 0 || n < MIN_RUN {
            return Vec::new();
        }
        // Runs of rows that really are the old rows shifted by dy (re-verified row by row).
        let mut moves = Vec::new();
        let mut run: Option<(u32, u32)> = None;
        for (i, &h) in new.iter().enumerate() {
            let y = i64::from(y0) + i as i64;
            let src = y + dy;
            let same = src >= 0
                && src < height
                && h != UNKNOWN
                && self.rows[src as usize] == h
                && self.rows.get(y as usize) != Some(&h);
            match (same, run) {
                (true, Some((start, len))) => run = Some((start, len + 1)),
                (true, None) => run = Some((y as u32, 1)),
                (false, Some((start, len))) => {
                    push_run(&mut moves, start, len, dy);
                    run = None;
                }
                (false, None) => {}
            }
        }
        if let Some((start, len)) = run {
            push_run(&mut moves, start, len, dy);
        }
        // Content moving up (dy > 0) is copied top first, down bottom first, so no copy reads
        // rows an earlier copy already overwrote.
        if dy < 0 {
            moves.reverse();
        }
        moves
    }
}

fn push_run(moves: &mut Vec<Move>, dst_y: u32, rows: u32, dy: i64) {
    if rows >= MIN_RUN {
        moves.push(Move {
            dst_y,
            src_y: (i64::from(dst_y) + dy) as u32,
            rows,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn screen(rows: u32, seed: u32) -> Vec<RowHash> {
        (0..rows)
            .map(|r| row_hash(&[r.wrapping_mul(seed), r ^ seed, 7]))
            .collect()
    }

    #[test]
    fn a_scroll_up_becomes_one_copy_and_new_rows_stay_pixels() {
        let old = screen(100, 3);
        let mut v = RowHashes::default();
        v.reset(100);
        v.record(0, &old);
        // Content moves up 10 rows; 10 new rows appear at the bottom.
        let mut new: Vec<RowHash> = old[10..].to_vec();
        new.extend(screen(10, 99));
        assert_eq!(
            v.find_moves(0, &new),
            [Move {
                dst_y: 0,
                src_y: 10,
                rows: 90
            }]
        );
    }

    #[test]
    fn a_scroll_down_copies_bottom_first_and_unknown_rows_are_never_sources() {
        let old = screen(60, 5);
        let mut v = RowHashes::default();
        v.reset(60);
        v.record(0, &old);
        v.forget(&Rect {
            x: 0,
            y: 30,
            w: 5,
            h: 1,
        });
        // Content moves down 4 rows.
        let mut new = screen(4, 77);
        new.extend_from_slice(&old[..56]);
        let moves = v.find_moves(0, &new);
        // Row 30 of the old screen is unknown: the run breaks there (new row 34).
        assert_eq!(
            moves,
            [
                Move {
                    dst_y: 35,
                    src_y: 31,
                    rows: 25
                },
                Move {
                    dst_y: 4,
                    src_y: 0,
                    rows: 30
                },
            ]
        );
    }

    #[test]
    fn unrelated_changes_and_blank_screens_give_no_moves() {
        let mut v = RowHashes::default();
        v.reset(50);
        v.record(0, &vec![row_hash(&[0; 4]); 50]);
        assert!(v.find_moves(0, &screen(50, 9)).is_empty());
        // All rows identical: every offset matches, none is unique; nothing to gain anyway.
        assert!(v.find_moves(0, &vec![row_hash(&[0; 4]); 50]).is_empty());
        assert_ne!(row_hash(&[]), UNKNOWN);
    }
}
