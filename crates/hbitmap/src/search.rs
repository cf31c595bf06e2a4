//! Searches: next dirty or clean item, dirty areas, status, and the dirty-run iterator.

use std::ops::Range;

use crate::HBitmap;
use crate::HBitmapError;
use crate::summary::Track;

impl HBitmap {
    /// The first dirty item in `[start, min(end, size))`, clamped to be at least `start`.
    /// Cost O(depth), whatever the size of the bitmap.
    pub fn next_dirty(&self, start: u64, end: u64) -> Option<u64> {
        self.next_of(Track::Ones, start, end)
    }

    /// The first clean item in `[start, min(end, size))`, clamped to be at least `start`.
    /// Cost O(depth), whatever the length of the dirty run it skips.
    pub fn next_clean(&self, start: u64, end: u64) -> Option<u64> {
        self.next_of(Track::Zeros, start, end)
    }

    fn next_of(&self, track: Track, start: u64, end: u64) -> Option<u64> {
        let end = end.min(self.size);
        if start >= end {
            return None;
        }
        let summary = match track {
            Track::Ones => &self.ones,
            Track::Zeros => &self.zeros,
        };
        let bit = summary.find(&self.words, self.nbits, track, start >> self.granularity)?;
        let item = (bit << self.granularity).max(start);
        (item < end).then_some(item)
    }

    /// The first maximal dirty run inside `[start, min(end, size))`, clipped to the range
    /// and to at most `max_len` items, as `start..end` of items.
    pub fn next_dirty_area(&self, start: u64, end: u64, max_len: u64) -> Option<Range<u64>> {
        if max_len == 0 {
            return None;
        }
        let end = end.min(self.size);
        let first = self.next_dirty(start, end)?;
        let run_end = self.next_clean(first, end).unwrap_or(end);
        Some(first..run_end.min(first.saturating_add(max_len)))
    }

    /// Whether `start` is dirty, and how many items from `start` (at most `len`) share
    /// that state.
    pub fn status(&self, start: u64, len: u64) -> Result<(bool, u64), HBitmapError> {
        let end = self.checked_end(start, len)?;
        if len == 0 {
            return Ok((false, 0));
        }
        let dirty = self.get(start);
        let run_end = if dirty { self.next_clean(start, end) } else { self.next_dirty(start, end) };
        Ok((dirty, run_end.unwrap_or(end) - start))
    }

    /// The dirty runs (coalesced extents) at or after `from`, in order, clipped to the
    /// bitmap's size. Each step costs O(depth): a walk costs the number of runs it yields
    /// times the depth, not the size of the bitmap.
    pub fn dirty_runs(&self, from: u64) -> DirtyRuns<'_> {
        self.dirty_runs_in(from..self.size)
    }

    /// The dirty runs within `range`, clipped to it.
    pub fn dirty_runs_in(&self, range: Range<u64>) -> DirtyRuns<'_> {
        DirtyRuns { bitmap: self, pos: range.start, end: range.end.min(self.size) }
    }
}

/// Iterator over the dirty runs of an [`HBitmap`]; see [`HBitmap::dirty_runs`].
#[derive(Clone, Debug)]
pub struct DirtyRuns<'a> {
    bitmap: &'a HBitmap,
    pos: u64,
    end: u64,
}

impl Iterator for DirtyRuns<'_> {
    type Item = Range<u64>;

    fn next(&mut self) -> Option<Range<u64>> {
        let start = self.bitmap.next_dirty(self.pos, self.end)?;
        let end = self.bitmap.next_clean(start, self.end).unwrap_or(self.end);
        self.pos = end;
        Some(start..end)
    }
}

impl std::iter::FusedIterator for DirtyRuns<'_> {}
