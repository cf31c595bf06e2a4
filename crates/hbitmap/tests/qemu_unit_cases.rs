//! The behaviours checked by QEMU's `tests/unit/test-hbitmap.c` (the 40 cases registered
//! in its `main()`, listed in section 9.4 of the spec), re-expressed against this crate's
//! API. One test per case, named after its path (`/hbitmap/truncate/grow/tiny` becomes
//! `truncate_grow_tiny`). Like the original harness, every case keeps a plain shadow
//! bitmap next to the [`HBitmap`] and cross-checks count, `get` and iteration after each
//! operation; most cases also assert concrete outcomes.
//!
//! QEMU's iterator (`hbitmap_iter_next`) yields the first item of each dirty group,
//! starting with the group that holds its start position; [`groups_from`] reproduces it
//! with positional `next_dirty` calls.
//!
//! The last tests check SHA-256 vectors that QEMU 10.0.2 itself printed (spec §10.4).

use std::ops::Range;

use hbitmap::{HBitmap, HBitmapError};
use sha2::{Digest, Sha256};

/// Bits per word, per summary block, per second-level block (QEMU's L1, L2, L3).
const L1: u64 = 64;
const L2: u64 = 64 * 64;
const L3: u64 = 64 * 64 * 64;

/// A plain shadow of the bitmap: one bool per group.
struct Shadow {
    size: u64,
    g: u32,
    bits: Vec<bool>,
}

impl Shadow {
    fn new(size: u64, g: u32) -> Self {
        Shadow { size, g, bits: vec![false; size.div_ceil(1 << g) as usize] }
    }

    fn get(&self, item: u64) -> bool {
        item < self.size && self.bits[(item >> self.g) as usize]
    }

    fn dirty_groups(&self) -> u64 {
        self.bits.iter().filter(|b| **b).count() as u64
    }

    /// First items of the dirty groups from the group of `first` on.
    fn groups_from(&self, first: u64) -> Vec<u64> {
        let from = (first >> self.g) as usize;
        (from..self.bits.len()).filter(|&i| self.bits[i]).map(|i| (i as u64) << self.g).collect()
    }

    /// First dirty item in `[start, min(end, size))`, by scanning items.
    fn next_dirty(&self, start: u64, end: u64) -> Option<u64> {
        (start..end.min(self.size)).find(|&i| self.get(i))
    }

    fn next_clean(&self, start: u64, end: u64) -> Option<u64> {
        (start..end.min(self.size)).find(|&i| !self.get(i))
    }

    fn next_dirty_area(&self, start: u64, end: u64, max: u64) -> Option<Range<u64>> {
        let end = end.min(self.size);
        let first = self.next_dirty(start, end)?;
        let mut last = first;
        while last < end && self.get(last) && last - first < max {
            last += 1;
        }
        Some(first..last)
    }
}

/// A bitmap and its shadow, changed together and compared after every change.
struct Harness {
    bm: HBitmap,
    shadow: Shadow,
}

impl Harness {
    fn new(size: u64, g: u32) -> Self {
        let h = Harness { bm: HBitmap::new(size, g).unwrap(), shadow: Shadow::new(size, g) };
        h.check(0);
        h
    }

    fn set(&mut self, start: u64, count: u64) {
        self.set_many(&[(start, count)]);
    }

    /// Several sets, checked once at the end.
    fn set_many(&mut self, ranges: &[(u64, u64)]) {
        for &(start, count) in ranges {
            self.bm.set(start, count).unwrap();
            if count > 0 {
                let g = self.shadow.g;
                let (first, last) = (start >> g, (start + count - 1) >> g);
                self.shadow.bits[first as usize..=last as usize].fill(true);
            }
        }
        self.check(0);
    }

    fn reset(&mut self, start: u64, count: u64) {
        self.bm.reset(start, count).unwrap();
        if count > 0 {
            let g = self.shadow.g;
            let (first, end) = (start >> g, (start + count).div_ceil(1 << g));
            self.shadow.bits[first as usize..end as usize].fill(false);
        }
        self.check(0);
    }

    fn reset_all(&mut self) {
        self.bm.reset_all();
        self.shadow.bits.fill(false);
        self.check(0);
    }

    fn truncate(&mut self, size: u64) {
        self.bm.truncate(size).unwrap();
        self.shadow.size = size;
        self.shadow.bits.resize(size.div_ceil(1 << self.shadow.g) as usize, false);
        self.check(0);
    }

    /// Count, `get` on the first and last item of every group, and iteration from
    /// `first`, against the shadow.
    fn check(&self, first: u64) {
        let (bm, s) = (&self.bm, &self.shadow);
        assert_eq!(bm.size(), s.size);
        assert_eq!(bm.bits(), s.bits.len() as u64);
        assert_eq!(bm.dirty_bits(), s.dirty_groups());
        assert_eq!(bm.count(), s.dirty_groups() << s.g);
        assert_eq!(bm.is_empty(), s.dirty_groups() == 0);
        for (i, &dirty) in s.bits.iter().enumerate() {
            let lo = (i as u64) << s.g;
            let hi = (lo + (1 << s.g) - 1).min(s.size - 1);
            assert_eq!(bm.get(lo), dirty, "get({lo})");
            assert_eq!(bm.get(hi), dirty, "get({hi})");
        }
        assert!(!bm.get(s.size));
        assert_eq!(groups_from(bm, first), s.groups_from(first), "iteration from {first}");
    }
}

/// QEMU's iteration: the first item of each dirty group, from the group of `first` on.
fn groups_from(bm: &HBitmap, first: u64) -> Vec<u64> {
    let g = bm.granularity();
    let mut out = Vec::new();
    let mut pos = first >> g << g;
    while let Some(item) = bm.next_dirty(pos, u64::MAX) {
        let group = item >> g;
        out.push(group << g);
        pos = (group + 1) << g;
    }
    out
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------
// size
// ---------------------------------------------------------------------------------------

/// `/hbitmap/size/0`: a zero-size bitmap can be created and used.
#[test]
fn size_0() {
    let h = Harness::new(0, 0);
    assert_eq!(h.bm.bits(), 0);
    assert_eq!(h.bm.next_dirty(0, u64::MAX), None);
    assert_eq!(h.bm.next_clean(0, u64::MAX), None);
    assert_eq!(h.bm.dirty_runs(0).count(), 0);
    // One (empty) word is still allocated and hashed, as in QEMU.
    assert_eq!(h.bm.sha256_hex(), sha256_hex(&[0; 8]));
    drop(h);
}

/// `/hbitmap/size/unaligned`: first and last bits of a bitmap of L3 + 23 bits.
#[test]
fn size_unaligned() {
    let mut h = Harness::new(L3 + 23, 0);
    h.set(0, 1);
    h.set(L3 + 22, 1);
    assert_eq!(h.bm.count(), 2);
    assert_eq!(groups_from(&h.bm, 0), vec![0, L3 + 22]);
    assert_eq!(groups_from(&h.bm, 1), vec![L3 + 22]);
    assert_eq!(h.bm.next_dirty(1, u64::MAX), Some(L3 + 22));
    assert_eq!(h.bm.next_clean(L3 + 22, u64::MAX), None);
    assert_eq!(h.bm.dirty_runs(0).collect::<Vec<_>>(), vec![0..1, L3 + 22..L3 + 23]);
}

// ---------------------------------------------------------------------------------------
// iter
// ---------------------------------------------------------------------------------------

/// `/hbitmap/iter/empty`: iterating an empty bitmap yields nothing.
#[test]
fn iter_empty() {
    let h = Harness::new(L1, 0);
    assert!(groups_from(&h.bm, 0).is_empty());
    assert_eq!(h.bm.dirty_runs(0).next(), None);
}

/// `/hbitmap/iter/partial`: with every bit set, iteration from many offsets (word and
/// level boundaries) yields exactly the bits from there on.
#[test]
fn iter_partial() {
    let mut h = Harness::new(L3, 0);
    h.set(0, L3);
    let starts = [0, 31, L1 - 1, L1, L1 * 2 - 1, L2 - 1, L2, L2 * 2 - 1, L3 / 2, L3 - 1];
    for first in starts {
        let got = groups_from(&h.bm, first);
        assert_eq!(got.len() as u64, L3 - first, "from {first}");
        assert!(got.iter().copied().eq(first..L3), "from {first}");
        h.check(first);
    }
    // Only the upper half set: iteration from anywhere starts at max(first, L3 / 2).
    h.reset_all();
    h.set(L3 / 2, L3 / 2);
    for first in starts {
        let got = groups_from(&h.bm, first);
        assert!(got.iter().copied().eq(first.max(L3 / 2)..L3), "from {first}");
        h.check(first);
    }
}

/// `/hbitmap/iter/granularity`: at granularity 7 iteration yields group starts, skips set
/// bits before the start position and handles the last group.
#[test]
fn iter_granularity() {
    let size = 131_072 << 7;
    let mut h = Harness::new(size, 7);
    assert!(groups_from(&h.bm, 0).is_empty());

    let group = L2 + L1 + 1;
    h.set((group << 7) + 8, 8);
    assert_eq!(groups_from(&h.bm, 0), vec![group << 7]);
    // Starting in the next group skips it.
    assert!(groups_from(&h.bm, (group + 1) << 7).is_empty());

    h.set(size - 8, 8);
    assert_eq!(groups_from(&h.bm, 0), vec![group << 7, 131_071 << 7]);
    assert_eq!(groups_from(&h.bm, (group + 1) << 7), vec![131_071 << 7]);
    // Starting inside a group still yields that group's first item.
    assert_eq!(groups_from(&h.bm, (131_071 << 7) + 100), vec![131_071 << 7]);
    h.check(0);
    h.check((group << 7) + 3);
}

// ---------------------------------------------------------------------------------------
// get
// ---------------------------------------------------------------------------------------

/// `/hbitmap/get/all`: after setting everything `get` is true everywhere.
#[test]
fn get_all() {
    let mut h = Harness::new(L3, 0);
    h.set(0, L3);
    assert!((0..L3).all(|i| h.bm.get(i)));
    assert!(!h.bm.get(L3));
    assert_eq!(h.bm.count(), L3);
}

/// `/hbitmap/get/some`: `get` after setting single bits at word and level boundaries.
#[test]
fn get_some() {
    let mut h = Harness::new(2 * L2, 0);
    for bit in [10, L1 - 1, L1, L1 * 2 - 1, L2 - 1, L2, L2 + 1] {
        h.set(bit, 1);
        assert!(h.bm.get(bit));
        assert!(!h.bm.get(bit + 2), "neighbour of {bit}");
    }
    assert_eq!(h.bm.count(), 7);
    assert!(!h.bm.get(0));
    assert!(!h.bm.get(L1 + 1));
    assert!(!h.bm.get(L2 - 2));
}

// ---------------------------------------------------------------------------------------
// set
// ---------------------------------------------------------------------------------------

/// `/hbitmap/set/all`: setting the whole L3 range.
#[test]
fn set_all() {
    let mut h = Harness::new(L3, 0);
    h.set(0, L3);
    assert_eq!(h.bm.count(), L3);
    assert_eq!(h.bm.dirty_runs(0).collect::<Vec<_>>(), vec![0..L3]);
    assert_eq!(h.bm.next_clean(0, u64::MAX), None);
}

/// `/hbitmap/set/one`: single bits at 10, L1 - 1, L1, L2 - 1, L2 (and the last bit).
#[test]
fn set_one() {
    let mut h = Harness::new(L3, 0);
    let bits = [10, L1 - 1, L1, L2 - 1, L2, L3 - 1];
    for (n, bit) in bits.into_iter().enumerate() {
        h.set(bit, 1);
        assert_eq!(h.bm.count(), n as u64 + 1);
    }
    assert_eq!(groups_from(&h.bm, 0), bits);
}

/// `/hbitmap/set/two-elem`: ranges spanning two words, and several words across the L1
/// and L2 boundaries.
#[test]
fn set_two_elem() {
    let mut h = Harness::new(L3, 0);
    h.set(L1 - 1, 2);
    assert_eq!(h.bm.dirty_runs(0).collect::<Vec<_>>(), vec![L1 - 1..L1 + 1]);
    h.set(L1 * 2 - 1, 4);
    h.set(L1 * 4, L1 + 1);
    h.set(L1 * 8 - 1, L1 + 1);
    h.set(L2 - 1, 2);
    h.set(L2 * 2 - L1, L1 * 2);
    assert_eq!(h.bm.count(), 2 + 4 + (L1 + 1) + (L1 + 1) + 2 + L1 * 2);
    assert_eq!(
        h.bm.dirty_runs(0).collect::<Vec<_>>(),
        vec![
            L1 - 1..L1 + 1,
            L1 * 2 - 1..L1 * 2 + 3,
            L1 * 4..L1 * 5 + 1,
            L1 * 8 - 1..L1 * 9,
            L2 - 1..L2 + 1,
            L2 * 2 - L1..L2 * 2 + L1,
        ]
    );
}

/// `/hbitmap/set/general`: assorted multi-word ranges up to nearly the whole bitmap.
#[test]
fn set_general() {
    let mut h = Harness::new(L3, 0);
    h.set(L1 - 1, L1 + 2);
    h.set(L1 * 3 - 1, L1 * 4 + 2);
    h.set(L1 * 8 + 5, L1 * 2 + 1);
    h.set(L2 - 1, L2 + 2);
    h.set(L2 * 3 - 1, L2 * 4 + 2);
    h.set(L2 * 10, L3 - L2 * 10 - 1);
    assert_eq!(h.bm.next_clean(L2 * 10, u64::MAX), Some(L3 - 1));
    h.set(1, L3 - 2);
    assert_eq!(h.bm.dirty_runs(0).collect::<Vec<_>>(), vec![1..L3 - 1]);
    assert_eq!(h.bm.count(), L3 - 2);
}

/// `/hbitmap/set/twice`: setting an already set bit leaves the count unchanged.
#[test]
fn set_twice() {
    let mut h = Harness::new(L3, 0);
    h.set(L1 * 5, 1);
    assert_eq!(h.bm.count(), 1);
    h.set(L1 * 5, 1);
    assert_eq!(h.bm.count(), 1);
    h.set(L1 * 5 - 3, 7);
    assert_eq!(h.bm.count(), 7);
}

/// `/hbitmap/set/overlap`: overlapping ranges, including at the end of the bitmap.
#[test]
fn set_overlap() {
    let mut h = Harness::new(L3, 0);
    h.set(L1 * 2 - 1, L1 * 2 + 2);
    h.set(L1 * 3, L1 * 2);
    assert_eq!(h.bm.count(), L1 * 3 + 1);
    h.set(L2 * 3, L2 * 2);
    h.set(L2 * 4 - 1, L2);
    assert_eq!(h.bm.next_clean(L2 * 3, u64::MAX), Some(L2 * 5));
    h.set(L3 - L1, L1);
    h.set(L3 - L1 * 2, L1 * 2);
    assert_eq!(h.bm.next_dirty(L2 * 5, u64::MAX), Some(L3 - L1 * 2));
    assert_eq!(h.bm.count(), L1 * 3 + 1 + L2 * 2 + L1 * 2);
}

// ---------------------------------------------------------------------------------------
// reset
// ---------------------------------------------------------------------------------------

/// `/hbitmap/reset/empty`: resetting an empty bitmap is harmless.
#[test]
fn reset_empty() {
    let mut h = Harness::new(L3, 0);
    h.reset(0, L3);
    h.reset(L1 * 2, L1);
    assert!(h.bm.is_empty());
    assert_eq!(h.bm.next_clean(0, u64::MAX), Some(0));
}

/// `/hbitmap/reset/general`: interleaved set and reset over varied ranges keep the levels
/// and the count consistent.
#[test]
fn reset_general() {
    let mut h = Harness::new(L3, 0);
    h.set(L1 * 2 - 1, L1 * 2 + 2);
    h.reset(L1 * 2, L1);
    assert_eq!(h.bm.count(), L1 + 2);
    h.set(L2 - 5, 10);
    h.reset(L2 - 1, 2);
    h.set(L2 * 2, L2 * 3);
    h.reset(L2 * 3 - 1, L2 + 2);
    h.set(0, L3);
    h.reset(L1, L3 - L1 * 2);
    assert_eq!(h.bm.dirty_runs(0).collect::<Vec<_>>(), vec![0..L1, L3 - L1..L3]);
    h.reset(0, L3);
    assert!(h.bm.is_empty());
    assert_eq!(h.bm.next_dirty(0, u64::MAX), None);
}

/// `/hbitmap/reset/all`: `reset_all` after various sets empties everything.
#[test]
fn reset_all() {
    let mut h = Harness::new(L3, 0);
    h.set(L1 - 1, 2);
    h.set(L2 * 5 + 3, L2);
    h.set(L3 - 1, 1);
    h.reset_all();
    assert!(h.bm.is_empty());
    assert!(groups_from(&h.bm, 0).is_empty());
    // The bitmap is fully usable afterwards.
    h.set(L2, 1);
    assert_eq!(groups_from(&h.bm, 0), vec![L2]);
    h.set(0, L3);
    h.reset_all();
    assert_eq!(h.bm.next_clean(0, u64::MAX), Some(0));
}

// ---------------------------------------------------------------------------------------
// granularity
// ---------------------------------------------------------------------------------------

/// `/hbitmap/granularity`: at granularity 1 one item marks a 2-item group; partial
/// overlaps; the count after reset.
#[test]
fn granularity() {
    let mut h = Harness::new(L1, 1);
    h.set(0, 1);
    assert_eq!(h.bm.count(), 2);
    assert!(h.bm.get(1));
    h.set(2, 1);
    assert_eq!(h.bm.count(), 4);
    h.set(0, 3);
    assert_eq!(h.bm.count(), 4);
    h.reset(0, 2);
    assert_eq!(h.bm.count(), 2);
    assert_eq!(groups_from(&h.bm, 0), vec![2]);
    // Odd ranges round outward.
    h.set(5, 2);
    assert_eq!(groups_from(&h.bm, 0), vec![2, 4, 6]);
    assert_eq!(h.bm.count(), 6);
    // Resets must be group-aligned.
    assert!(matches!(h.bm.reset(1, 2), Err(HBitmapError::Misaligned { .. })));
    assert!(matches!(h.bm.reset(2, 1), Err(HBitmapError::Misaligned { .. })));
    h.check(0);
}

// ---------------------------------------------------------------------------------------
// truncate
// ---------------------------------------------------------------------------------------

/// `/hbitmap/truncate/nop`: truncating to the same size changes nothing.
#[test]
fn truncate_nop() {
    let mut h = Harness::new(L2, 0);
    h.set(L1, L1 * 3);
    let before = h.bm.clone();
    h.truncate(L2);
    assert_eq!(h.bm, before);
    assert_eq!(h.bm.count(), L1 * 3);
}

/// Fills a bitmap of `size` items (completely, then with every other group), truncates
/// it by `diff` and checks the outcome against the shadow. Growing: the new items are
/// clean and can be set. Shrinking: the groups past the new end are gone (growing back
/// shows them clean) while the groups up to the new end, partial last one included,
/// survive. Returns the number of bits after the truncate.
fn truncate_case(size: u64, diff: i64, g: u32) -> u64 {
    let new_size = size.checked_add_signed(diff).unwrap();
    let new_bits = new_size.div_ceil(1 << g);
    for pattern in [false, true] {
        let mut h = Harness::new(size, g);
        if pattern {
            let ranges: Vec<(u64, u64)> =
                (0..h.bm.bits()).step_by(2).map(|b| (b << g, 1)).collect();
            h.set_many(&ranges);
        } else {
            h.set(0, size);
        }
        let kept: Vec<u64> =
            h.shadow.groups_from(0).into_iter().filter(|i| *i < new_size).collect();
        h.truncate(new_size);
        assert_eq!(h.bm.bits(), new_bits);
        assert_eq!(groups_from(&h.bm, 0), kept);
        if diff > 0 {
            // Only the groups that existed before may be dirty.
            let old_bits = size.div_ceil(1 << g);
            assert_eq!(h.bm.next_dirty(old_bits << g, u64::MAX), None);
            if new_bits > old_bits {
                assert_eq!(h.bm.next_clean(old_bits << g, u64::MAX), Some(old_bits << g));
            }
            h.set(size, new_size - size);
            assert!(h.bm.get(new_size - 1));
        } else {
            assert!(!h.bm.get(new_size));
            h.truncate(size);
            assert_eq!(groups_from(&h.bm, 0), kept);
            assert_eq!(h.bm.next_dirty(new_bits << g, u64::MAX), None);
            if !pattern {
                // The boundary survives: dirty up to the new end (rounded to its group).
                assert!(h.bm.get(new_size - 1));
                let clean = Some(new_bits << g).filter(|c| *c < size);
                assert_eq!(h.bm.next_clean(0, u64::MAX), clean);
            }
        }
    }
    new_bits
}

/// `/hbitmap/truncate/grow/negligible`: growth smaller than a group, within the last
/// group (granularity 1).
#[test]
fn truncate_grow_negligible() {
    let size = L2 * 2 + 1;
    assert_eq!(truncate_case(size, 1, 1), size.div_ceil(2));
}

/// `/hbitmap/truncate/shrink/negligible`: shrinking within the last group.
#[test]
fn truncate_shrink_negligible() {
    let size = L2 * 2 + 2;
    assert_eq!(truncate_case(size, -1, 1), size / 2);
}

/// `/hbitmap/truncate/grow/tiny`: growth smaller than a group that crosses a group
/// boundary.
#[test]
fn truncate_grow_tiny() {
    assert_eq!(truncate_case(L2 * 2, 1, 1), L2 + 1);
}

/// `/hbitmap/truncate/shrink/tiny`: shrinking by less than a group across a group
/// boundary.
#[test]
fn truncate_shrink_tiny() {
    assert_eq!(truncate_case(L2 * 2 + 1, -1, 1), L2);
}

/// `/hbitmap/truncate/grow/small`: growth smaller than a word, within the last word.
#[test]
fn truncate_grow_small() {
    assert_eq!(truncate_case(L2 + 1, 8, 0), L2 + 9);
}

/// `/hbitmap/truncate/shrink/small`: shrinking within the last word.
#[test]
fn truncate_shrink_small() {
    assert_eq!(truncate_case(L2 + 9, -8, 0), L2 + 1);
}

/// `/hbitmap/truncate/grow/medium`: growth smaller than a word that crosses a word
/// boundary.
#[test]
fn truncate_grow_medium() {
    assert_eq!(truncate_case(L2 - 8, 16, 0), L2 + 8);
}

/// `/hbitmap/truncate/shrink/medium`: shrinking by less than a word across a word
/// boundary.
#[test]
fn truncate_shrink_medium() {
    assert_eq!(truncate_case(L2 + 8, -16, 0), L2 - 8);
}

/// `/hbitmap/truncate/grow/large`: growth by more than a word (here across a summary
/// block too).
#[test]
fn truncate_grow_large() {
    assert_eq!(truncate_case(L2 - 8, (L2 + L1 * 3 + 13) as i64, 0), L2 * 2 + L1 * 3 + 5);
    assert_eq!(truncate_case(L2 * 2, (L3 + 5) as i64, 3), (L2 * 2 + L3 + 5).div_ceil(8));
}

/// `/hbitmap/truncate/shrink/large`: shrinking by more than a word; the bits past the new
/// end disappear and the boundary bits survive.
#[test]
fn truncate_shrink_large() {
    assert_eq!(truncate_case(L2 * 2 + L1 * 3 + 5, -((L2 + L1 * 3 + 13) as i64), 0), L2 - 8);
    assert_eq!(truncate_case(L3 + L2 + 5, -((L3 + 1) as i64), 2), (L2 + 4) / 4);
}

// ---------------------------------------------------------------------------------------
// serialize
// ---------------------------------------------------------------------------------------

/// `/hbitmap/serialize/align`: the serialization alignment is 64 << granularity.
#[test]
fn serialize_align() {
    let mut bm = HBitmap::new(L3 * 8, 3).unwrap();
    assert_eq!(bm.serialization_align(), Ok(512));
    let mut buf = vec![0u8; 8];
    assert!(bm.serialize_part(&mut buf, 512, 512).is_ok());
    assert_eq!(
        bm.serialize_part(&mut buf, 256, 512),
        Err(HBitmapError::Misaligned { start: 256, len: 512, align: 512 })
    );
    assert_eq!(
        bm.deserialize_zeroes(512, 100),
        Err(HBitmapError::Misaligned { start: 512, len: 100, align: 512 })
    );
    // An unaligned length is fine when the chunk reaches the end.
    bm.truncate(L3 * 8 - 3).unwrap();
    assert_eq!(bm.serialization_size(L3 * 8 - 512, 509), Ok(8));
    for g in [0, 1, 16, 57] {
        assert_eq!(HBitmap::new(100, g).unwrap().serialization_align(), Ok(64 << g));
    }
}

/// The serialized image of the whole bitmap, checked bit by bit against the shadow:
/// bit `i` is bit `i % 8` of byte `i / 8`.
fn check_image(h: &Harness) -> Vec<u8> {
    let size = h.bm.size();
    let mut buf = vec![0u8; h.bm.serialization_size(0, size).unwrap() as usize];
    h.bm.serialize_part(&mut buf, 0, size).unwrap();
    assert_eq!(buf.len() as u64, h.bm.bits().div_ceil(64).max(1) * 8);
    for bit in 0..buf.len() as u64 * 8 {
        let got = buf[(bit / 8) as usize] & (1 << (bit % 8)) != 0;
        let want = h.shadow.bits.get(bit as usize).copied().unwrap_or(false);
        assert_eq!(got, want, "bit {bit} of the image");
    }
    buf
}

/// `/hbitmap/serialize/basic`: for combinations of start and length around word and
/// level boundaries, the whole-bitmap image is the exact LSB-first little-endian bit
/// image, and deserializing it restores the bitmap.
#[test]
fn serialize_basic() {
    for g in [0, 3] {
        let size = (L2 * 2 + 100) << g;
        let mut h = Harness::new(size, g);
        let points = [0, 1, L1 - 1, L1, L1 + 1, L2 - 1, L2, L2 + 1, L2 * 2 - 1].map(|p| p << g);
        let lens = [1, 2, L1 - 1, L1, L1 + 1, L2 - 1, L2 + 1].map(|l| l << g);
        for start in points {
            for len in lens.into_iter().filter(|l| start + l <= size) {
                h.reset_all();
                h.set(start, len);
                let image = check_image(&h);
                let mut copy = HBitmap::new(size, g).unwrap();
                copy.deserialize_part(&image, 0, size).unwrap();
                assert_eq!(copy, h.bm);
                assert_eq!(copy.count(), len);
                assert_eq!(copy.dirty_runs(0).collect::<Vec<_>>(), vec![start..start + len]);
            }
        }
    }
}

/// `/hbitmap/serialize/part`: serializing in L2-sized parts gives the right bits for each
/// part, and the parts deserialize back.
#[test]
fn serialize_part() {
    for g in [0, 1] {
        let size = (L3 + L1 * 3 + 7) << g;
        let mut h = Harness::new(size, g);
        for bit in [0, 1, L1 - 1, L1, L2 - 1, L2, L2 + 5, L2 * 7 + 63, L3 - 1, L3, L3 + L1 * 3 + 6]
        {
            h.set(bit << g, 1);
        }
        h.set((L2 * 9) << g, (L2 + 3) << g);
        let part = L2 << g;
        let mut copy = HBitmap::new(size, g).unwrap();
        let mut start = 0;
        while start < size {
            let len = part.min(size - start);
            let n = h.bm.serialization_size(start, len).unwrap() as usize;
            assert_eq!(n as u64, (len >> g).div_ceil(64) * 8);
            let mut buf = vec![0u8; n];
            h.bm.serialize_part(&mut buf, start, len).unwrap();
            for i in 0..len >> g {
                let bit = (start >> g) + i;
                let got = buf[(i / 8) as usize] & (1 << (i % 8)) != 0;
                let want = h.shadow.bits.get(bit as usize).copied().unwrap_or(false);
                assert_eq!(got, want, "bit {bit} in the part at {start}");
            }
            copy.deserialize_part(&buf, start, len).unwrap();
            start += len;
        }
        assert_eq!(copy, h.bm);
        assert_eq!(copy.count(), h.bm.count());
    }
}

/// `/hbitmap/serialize/zeroes`: `deserialize_zeroes` on aligned chunks clears exactly
/// those ranges; iteration then finds the next set range.
#[test]
fn serialize_zeroes() {
    for g in [0, 5] {
        let size = L3 << g;
        let chunk = L2 << g;
        let mut h = Harness::new(size, g);
        h.set(0, size);
        for k in (1..L3 / L2).step_by(2) {
            h.bm.deserialize_zeroes(k * chunk, chunk).unwrap();
            let (lo, hi) = ((k * L2) as usize, ((k + 1) * L2) as usize);
            h.shadow.bits[lo..hi].fill(false);
            if k < 6 {
                h.check(0);
            }
            let next = Some((k + 1) * chunk).filter(|n| *n < size);
            assert_eq!(h.bm.next_dirty(k * chunk, u64::MAX), next);
        }
        h.check(0);
        let runs: Vec<Range<u64>> = h.bm.dirty_runs(0).collect();
        assert_eq!(runs.len() as u64, L3 / L2 / 2);
        for (i, run) in (0..).zip(&runs) {
            assert_eq!(*run, 2 * i * chunk..(2 * i + 1) * chunk);
        }
        // Positional iteration from inside a cleared chunk lands on the next set one.
        assert_eq!(groups_from(&h.bm, chunk + (5 << g)).first(), Some(&(2 * chunk)));
        // Zeroing the rest empties the bitmap.
        h.bm.deserialize_zeroes(0, size).unwrap();
        assert!(h.bm.is_empty());
        assert_eq!(h.bm.next_dirty(0, u64::MAX), None);
    }
}

// ---------------------------------------------------------------------------------------
// iter_and_reset
// ---------------------------------------------------------------------------------------

/// `/hbitmap/iter/iter_and_reset`: resets in the middle of a (positional) iteration are
/// safe: the walk neither returns cleared bits nor misses remaining ones.
#[test]
fn iter_iter_and_reset() {
    let mut h = Harness::new(L3, 0);
    h.set(0, L3);
    // Reset everything once the first bit has been returned.
    let first = h.bm.next_dirty(0, u64::MAX);
    assert_eq!(first, Some(0));
    h.reset(0, L3);
    assert_eq!(h.bm.next_dirty(1, u64::MAX), None);

    // A scattered pattern; each step resets the bit found and the next L1 + 1 bits.
    h.reset_all();
    let ranges: Vec<(u64, u64)> = (0..L3 / 97).map(|k| (k * 97, 3)).collect();
    h.set_many(&ranges);
    let mut seen = Vec::new();
    let mut pos = 0;
    while let Some(item) = h.bm.next_dirty(pos, u64::MAX) {
        assert!(h.shadow.get(item), "{item} was reset before being reached");
        assert_eq!(h.shadow.next_dirty(pos, u64::MAX), Some(item));
        seen.push(item);
        let len = (L1 + 2).min(L3 - item);
        h.bm.reset(item, len).unwrap();
        h.shadow.bits[item as usize..(item + len) as usize].fill(false);
        pos = item + 1;
    }
    assert!(h.bm.is_empty());
    assert_eq!(seen.first(), Some(&0));
    assert!(seen.windows(2).all(|w| w[1] > w[0] + L1 + 1));
    h.check(0);
}

// ---------------------------------------------------------------------------------------
// next_zero
// ---------------------------------------------------------------------------------------

/// `next_dirty` and `next_clean` against a plain scan of the shadow, at many starts and
/// for several counts (QEMU's (start, count); here `end = start + count`).
fn check_next_x(h: &Harness) {
    let size = h.bm.size();
    let g = h.bm.granularity();
    let mut starts = vec![0, 1, size / 2, size - 1, size];
    for p in [L1, L2, L3] {
        let p = p << g;
        starts.extend([p - 1, p, p + 1].into_iter().filter(|s| *s <= size));
    }
    for run in h.bm.dirty_runs(0).take(8) {
        starts.extend([run.start.saturating_sub(1), run.start, run.end - 1, run.end]);
    }
    for start in starts {
        for count in [0, 1, 2, L1, L2 + 3, L3, u64::MAX] {
            let end = start.saturating_add(count);
            assert_eq!(
                h.bm.next_dirty(start, end),
                h.shadow.next_dirty(start, end),
                "next_dirty({start}, +{count})"
            );
            assert_eq!(
                h.bm.next_clean(start, end),
                h.shadow.next_clean(start, end),
                "next_zero({start}, +{count})"
            );
        }
    }
}

fn next_x_case(g: u32) {
    let size = L3;
    let mut h = Harness::new(size, g);
    check_next_x(&h);
    h.set(L2 + 5, 1);
    check_next_x(&h);
    h.set(L2 * 2 + 1, L1 * 3);
    check_next_x(&h);
    h.set(size - L1, L1);
    check_next_x(&h);
    h.set(0, size);
    check_next_x(&h);
    h.reset((L2 * 3) >> g << g, 1 << g);
    check_next_x(&h);
    h.reset(0, L1 << g);
    check_next_x(&h);
}

/// `/hbitmap/next_zero/next_x_0`: `next_dirty` / `next_zero` agree with a plain scan,
/// granularity 0.
#[test]
fn next_zero_next_x_0() {
    next_x_case(0);
}

/// `/hbitmap/next_zero/next_x_4`: the same at granularity 4.
#[test]
fn next_zero_next_x_4() {
    next_x_case(4);
}

/// `/hbitmap/next_zero/next_x_after_truncate`: the searches are right after growing.
#[test]
fn next_zero_next_x_after_truncate() {
    let mut h = Harness::new(L1, 0);
    h.truncate(L1 * 2);
    h.set(0, L1);
    check_next_x(&h);
    assert_eq!(h.bm.next_clean(0, u64::MAX), Some(L1));
    assert_eq!(h.bm.next_dirty(L1, u64::MAX), None);
    h.truncate(L2 + 3);
    h.set(L2 + 2, 1);
    check_next_x(&h);
    assert_eq!(h.bm.next_dirty(L1, u64::MAX), Some(L2 + 2));
}

// ---------------------------------------------------------------------------------------
// next_dirty_area
// ---------------------------------------------------------------------------------------

/// `next_dirty_area` with and without a maximum length, against a plain scan.
fn check_next_dirty_area(h: &Harness) {
    let size = h.bm.size();
    let g = h.bm.granularity();
    let mut starts = vec![0, 1, size / 3, size - 1];
    for p in [L1, L2] {
        let p = p << g;
        starts.extend([p - 1, p, p + 1].into_iter().filter(|s| *s <= size));
    }
    for run in h.bm.dirty_runs(0).take(6) {
        starts.extend([run.start.saturating_sub(1), run.start + 1, run.end - 1, run.end]);
    }
    for start in starts {
        for count in [1, L1 + 1, L2 * 2, u64::MAX] {
            let end = start.saturating_add(count);
            for max in [1, 2, L1 - 1, L2, u64::MAX] {
                assert_eq!(
                    h.bm.next_dirty_area(start, end, max),
                    h.shadow.next_dirty_area(start, end, max),
                    "next_dirty_area({start}, {end}, {max})"
                );
            }
        }
    }
}

fn next_dirty_area_case(g: u32) {
    let size = L2 * 4 + 11;
    let mut h = Harness::new(size, g);
    check_next_dirty_area(&h);
    h.set(L1 + 5, 1);
    check_next_dirty_area(&h);
    h.set(L2 - 3, L1 * 2);
    check_next_dirty_area(&h);
    h.set(size - 7, 7);
    check_next_dirty_area(&h);
    h.set(0, size);
    check_next_dirty_area(&h);
    h.reset((L2 * 2) >> g << g, 4 << g);
    check_next_dirty_area(&h);
}

/// `/hbitmap/next_dirty_area/next_dirty_area_0`: granularity 0.
#[test]
fn next_dirty_area_next_dirty_area_0() {
    next_dirty_area_case(0);
}

/// `/hbitmap/next_dirty_area/next_dirty_area_1`: granularity 1.
#[test]
fn next_dirty_area_next_dirty_area_1() {
    next_dirty_area_case(1);
}

/// `/hbitmap/next_dirty_area/next_dirty_area_4`: granularity 4.
#[test]
fn next_dirty_area_next_dirty_area_4() {
    let size = L2 * 8 + 11;
    let mut h = Harness::new(size, 4);
    check_next_dirty_area(&h);
    h.set(L1 + 5, 1);
    assert_eq!(h.bm.next_dirty_area(0, u64::MAX, u64::MAX), Some(L1..L1 + 16));
    assert_eq!(h.bm.next_dirty_area(L1 + 6, u64::MAX, u64::MAX), Some(L1 + 6..L1 + 16));
    assert_eq!(h.bm.next_dirty_area(0, L1, u64::MAX), None);
    assert_eq!(h.bm.next_dirty_area(0, L1 + 4, u64::MAX), Some(L1..L1 + 4));
    assert_eq!(h.bm.next_dirty_area(0, u64::MAX, 5), Some(L1..L1 + 5));
    check_next_dirty_area(&h);
    h.set(L2 - 3, L1 * 2);
    check_next_dirty_area(&h);
    h.set(size - 7, 7);
    assert_eq!(h.bm.next_dirty_area(size - 20, u64::MAX, u64::MAX), Some(size - 11..size));
    check_next_dirty_area(&h);
    h.set(0, size);
    check_next_dirty_area(&h);
    h.reset(L2 * 2, 4 << 4);
    check_next_dirty_area(&h);
}

/// `/hbitmap/next_dirty_area/next_dirty_area_after_truncate`: correct after growing.
#[test]
fn next_dirty_area_next_dirty_area_after_truncate() {
    let mut h = Harness::new(L1, 0);
    h.truncate(L1 * 2);
    h.set(0, L1);
    check_next_dirty_area(&h);
    assert_eq!(h.bm.next_dirty_area(0, u64::MAX, u64::MAX), Some(0..L1));
    assert_eq!(h.bm.next_dirty_area(L1, u64::MAX, u64::MAX), None);
    h.set(L1 + L1 / 2, 4);
    assert_eq!(h.bm.next_dirty_area(L1, u64::MAX, u64::MAX), Some(L1 + L1 / 2..L1 + L1 / 2 + 4));
    assert_eq!(h.bm.next_dirty_area(L1, u64::MAX, 3), Some(L1 + L1 / 2..L1 + L1 / 2 + 3));
    check_next_dirty_area(&h);
}

// ---------------------------------------------------------------------------------------
// SHA-256 vectors printed by QEMU 10.0.2 (spec §10.4)
// ---------------------------------------------------------------------------------------

const MIB: u64 = 1 << 20;

/// An empty 64 MiB bitmap at 64 KiB granularity: 1024 bits, 16 zero words.
#[test]
fn sha256_empty_64mib_granularity_16() {
    let bm = HBitmap::new(64 * MIB, 16).unwrap();
    assert_eq!(bm.bits(), 1024);
    assert_eq!(bm.sha256_hex(), "38723a2e5e8a17aa7950dc008209944e898f69a7bd10a23c839d341e935fd5ca");
}

/// Bits 0, 16, 511 and 512 set in the same bitmap.
#[test]
fn sha256_bits_0_16_511_512() {
    let mut bm = HBitmap::new(64 * MIB, 16).unwrap();
    for bit in [0, 16, 511, 512] {
        bm.set(bit << 16, 1).unwrap();
    }
    assert_eq!(bm.count(), 4 << 16);
    assert_eq!(bm.sha256_hex(), "82ce47617b1c4f5ffb1c02e09acf4f3824947441f353fc178bbf3ab44755602e");
}

/// A 66048-item bitmap at granularity 16 with its last 512 items set: the partial second
/// group is dirty, the count is a whole group, and the image is the word 2.
#[test]
fn sha256_last_512_items_of_66048() {
    let mut bm = HBitmap::new(66_048, 16).unwrap();
    bm.set(66_048 - 512, 512).unwrap();
    assert_eq!(bm.count(), 65_536);
    assert_eq!(bm.sha256_hex(), sha256_hex(&[2, 0, 0, 0, 0, 0, 0, 0]));
}
