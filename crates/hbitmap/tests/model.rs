//! Property tests: every operation of [`HBitmap`] is compared with a naive model, a
//! `Vec<bool>` with one entry per group plus the size in items.
//!
//! Positions and lengths are drawn as abstract recipes ([`Pos`], [`Len`]) and resolved
//! against the bitmap's current geometry when an operation runs, so that a sequence stays
//! meaningful after a truncate and proptest can shrink it freely. Positions favour the
//! boundaries of the structure: groups, bottom words (64 bits), summary blocks (64 words)
//! and the blocks of the second summary level (64 * 64 words).

use std::ops::Range;

use hbitmap::{HBitmap, HBitmapError};
use proptest::prelude::*;
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------

/// `bits` groups in items, saturating (granularities go up to 63).
fn unit(bits: u64, g: u32) -> u64 {
    bits.saturating_mul(1 << g)
}

/// Number of groups of `2^g` items needed to cover `items`.
fn groups(items: u64, g: u32) -> u64 {
    items.div_ceil(1u64 << g)
}

/// The naive bitmap: one bool per group.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Model {
    size: u64,
    g: u32,
    bits: Vec<bool>,
}

impl Model {
    fn new(size: u64, g: u32) -> Self {
        Model { size, g, bits: vec![false; groups(size, g) as usize] }
    }

    fn nbits(&self) -> u64 {
        self.bits.len() as u64
    }

    fn group_size(&self) -> u64 {
        1 << self.g
    }

    fn dirty_bits(&self) -> u64 {
        self.bits.iter().filter(|b| **b).count() as u64
    }

    fn count(&self) -> u64 {
        self.dirty_bits() << self.g
    }

    fn get(&self, item: u64) -> bool {
        item < self.size && self.bits[(item >> self.g) as usize]
    }

    fn fill_groups(&mut self, first: u64, end: u64, value: bool) {
        self.bits[first as usize..end as usize].fill(value);
    }

    fn out_of_range(&self, start: u64, len: u64) -> HBitmapError {
        HBitmapError::OutOfRange { start, len, size: self.size }
    }

    fn set(&mut self, start: u64, len: u64) -> Result<(), HBitmapError> {
        if len == 0 {
            return Ok(());
        }
        let end = match start.checked_add(len) {
            Some(end) if end <= self.size => end,
            _ => return Err(self.out_of_range(start, len)),
        };
        // Outward rounding: every group that holds an item of the range.
        self.fill_groups(start >> self.g, ((end - 1) >> self.g) + 1, true);
        Ok(())
    }

    fn reset(&mut self, start: u64, len: u64) -> Result<(), HBitmapError> {
        if len == 0 {
            return Ok(());
        }
        // The end may reach the end of the last (partial) group.
        let limit = self.size.max(self.nbits() << self.g);
        let end = match start.checked_add(len) {
            Some(end) if end <= limit => end,
            _ => return Err(self.out_of_range(start, len)),
        };
        let align = self.group_size();
        if !start.is_multiple_of(align) || (!end.is_multiple_of(align) && end != self.size) {
            return Err(HBitmapError::Misaligned { start, len, align });
        }
        self.fill_groups(start >> self.g, groups(end, self.g), false);
        Ok(())
    }

    fn reset_all(&mut self) {
        self.bits.fill(false);
    }

    fn set_all(&mut self) {
        self.bits.fill(true);
    }

    fn truncate(&mut self, new_size: u64) {
        self.size = new_size;
        self.bits.resize(groups(new_size, self.g) as usize, false);
    }

    fn merge(&mut self, other: &Model) -> Result<(), HBitmapError> {
        if self.size != other.size {
            return Err(HBitmapError::SizeMismatch { dest: self.size, src: other.size });
        }
        for (j, _) in other.bits.iter().enumerate().filter(|(_, b)| **b) {
            let lo = (j as u64) << other.g;
            let hi = ((j as u64 + 1) << other.g).min(self.size);
            self.fill_groups(lo >> self.g, ((hi - 1) >> self.g) + 1, true);
        }
        Ok(())
    }

    /// The bottom level as QEMU lays it out: at least one word, bit `i` of word `w` is
    /// group `64 * w + i`.
    fn words(&self) -> Vec<u64> {
        let mut words = vec![0u64; self.bits.len().div_ceil(64).max(1)];
        for (i, _) in self.bits.iter().enumerate().filter(|(_, b)| **b) {
            words[i / 64] |= 1 << (i % 64);
        }
        words
    }

    fn sha256(&self) -> [u8; 32] {
        let bytes: Vec<u8> = self.words().iter().flat_map(|w| w.to_le_bytes()).collect();
        Sha256::digest(&bytes).into()
    }

    /// The words a serialization chunk covers, after the same checks as the bitmap.
    fn chunk(&self, start: u64, len: u64) -> Result<Range<usize>, HBitmapError> {
        if self.g >= 58 {
            return Err(HBitmapError::NotSerializable { granularity: self.g });
        }
        let align = 64u64 << self.g;
        let end = match start.checked_add(len) {
            Some(end) if end <= self.size => end,
            _ => return Err(self.out_of_range(start, len)),
        };
        if !start.is_multiple_of(align) || (!len.is_multiple_of(align) && end != self.size) {
            return Err(HBitmapError::Misaligned { start, len, align });
        }
        let nwords = self.bits.len().div_ceil(64).max(1);
        let first = (start / align) as usize;
        let last = (end.div_ceil(align) as usize).min(nwords).max(first);
        Ok(first..last)
    }

    fn serialize(&self, start: u64, len: u64) -> Result<Vec<u8>, HBitmapError> {
        let range = self.chunk(start, len)?;
        Ok(self.words()[range].iter().flat_map(|w| w.to_le_bytes()).collect())
    }

    /// Writes the words of a chunk; bits past the last group are dropped.
    fn write_words(&mut self, range: Range<usize>, word: impl Fn(usize) -> u64) {
        for (k, w) in range.enumerate() {
            let value = word(k);
            for i in 0..64 {
                let bit = w * 64 + i;
                if bit < self.bits.len() {
                    self.bits[bit] = value & (1 << i) != 0;
                }
            }
        }
    }

    fn deserialize_part(&mut self, buf: &[u8], start: u64, len: u64) -> Result<(), HBitmapError> {
        let range = self.chunk(start, len)?;
        let needed = range.len() as u64 * 8;
        if (buf.len() as u64) < needed {
            return Err(HBitmapError::BufferTooSmall { needed, got: buf.len() as u64 });
        }
        self.write_words(range, |k| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[k * 8..k * 8 + 8]);
            u64::from_le_bytes(b)
        });
        Ok(())
    }

    fn deserialize_fill(&mut self, start: u64, len: u64, ones: bool) -> Result<(), HBitmapError> {
        let range = self.chunk(start, len)?;
        self.write_words(range, |_| if ones { u64::MAX } else { 0 });
        Ok(())
    }

    /// The maximal dirty runs, in items, clipped to the size.
    fn runs(&self) -> Vec<Range<u64>> {
        let mut runs = Vec::new();
        let mut i = 0;
        while i < self.bits.len() {
            if self.bits[i] {
                let mut j = i;
                while j < self.bits.len() && self.bits[j] {
                    j += 1;
                }
                let start = (i as u64) << self.g;
                let end = ((j as u64) << self.g).min(self.size);
                runs.push(start..end);
                i = j;
            } else {
                i += 1;
            }
        }
        runs
    }
}

/// Searches answered from the model's run list (itself computed by a plain scan).
struct Queries<'a> {
    m: &'a Model,
    runs: Vec<Range<u64>>,
}

impl<'a> Queries<'a> {
    fn new(m: &'a Model) -> Self {
        Queries { m, runs: m.runs() }
    }

    /// The run holding `item`, or the first run after it.
    fn run_from(&self, item: u64) -> Option<&Range<u64>> {
        let i = self.runs.partition_point(|r| r.end <= item);
        self.runs.get(i)
    }

    fn next_dirty(&self, start: u64, end: u64) -> Option<u64> {
        let end = end.min(self.m.size);
        if start >= end {
            return None;
        }
        let item = self.run_from(start)?.start.max(start);
        (item < end).then_some(item)
    }

    fn next_clean(&self, start: u64, end: u64) -> Option<u64> {
        let end = end.min(self.m.size);
        if start >= end {
            return None;
        }
        let item = match self.run_from(start) {
            Some(r) if r.start <= start => r.end,
            _ => start,
        };
        (item < end).then_some(item)
    }

    fn next_dirty_area(&self, start: u64, end: u64, max_len: u64) -> Option<Range<u64>> {
        if max_len == 0 {
            return None;
        }
        let end = end.min(self.m.size);
        let first = self.next_dirty(start, end)?;
        let run_end = self.next_clean(first, end).unwrap_or(end);
        Some(first..run_end.min(first.saturating_add(max_len)))
    }

    fn status(&self, start: u64, len: u64) -> Result<(bool, u64), HBitmapError> {
        let end = match start.checked_add(len) {
            Some(end) if end <= self.m.size => end,
            _ => return Err(self.m.out_of_range(start, len)),
        };
        if len == 0 {
            return Ok((false, 0));
        }
        let dirty = self.m.get(start);
        let run_end = if dirty { self.next_clean(start, end) } else { self.next_dirty(start, end) };
        Ok((dirty, run_end.unwrap_or(end) - start))
    }

    fn runs_in(&self, range: Range<u64>) -> Vec<Range<u64>> {
        let end = range.end.min(self.m.size);
        self.runs
            .iter()
            .map(|r| r.start.max(range.start)..r.end.min(end))
            .filter(|r| r.start < r.end)
            .collect()
    }
}

// ---------------------------------------------------------------------------------------
// Random helpers
// ---------------------------------------------------------------------------------------

use testkit::SplitMix64 as Rng;

/// A position recipe, resolved against a size and granularity into `[0, size]`.
#[derive(Clone, Copy, Debug)]
enum Pos {
    /// `size * f / 2^32`.
    Uniform(u32),
    /// Near a multiple of a structural unit: a group, a word (64 groups), a summary block
    /// (64 words) or a second-level block (64 * 64 words).
    Boundary { level: u8, k: u32, delta: i16 },
    /// `size - n`.
    End(u16),
    /// `n`.
    Start(u16),
}

const UNIT_BITS: [u64; 4] = [1, 64, 64 * 64, 64 * 64 * 64];

impl Pos {
    fn resolve(self, size: u64, g: u32) -> u64 {
        match self {
            Pos::Uniform(f) => ((u128::from(size) * u128::from(f)) >> 32) as u64,
            Pos::Boundary { level, k, delta } => {
                let unit = unit(UNIT_BITS[usize::from(level) % 4], g);
                let n = size / unit;
                let base = (u64::from(k) % (n + 1)).saturating_mul(unit);
                base.saturating_add_signed(i64::from(delta)).min(size)
            }
            Pos::End(n) => size.saturating_sub(u64::from(n)),
            Pos::Start(n) => u64::from(n).min(size),
        }
    }
}

/// A length recipe, resolved against a start, a size and a granularity.
#[derive(Clone, Copy, Debug)]
enum Len {
    Small(u16),
    Groups(u16),
    Words(u16),
    Blocks(u8),
    /// `(size - start) * f / 2^32`.
    Fraction(u32),
    ToEnd,
    /// One item or more past the end.
    PastEnd(u16),
    /// `start + len` overflows.
    Overflow,
}

impl Len {
    fn resolve(self, start: u64, size: u64, g: u32) -> u64 {
        let rest = size.saturating_sub(start);
        match self {
            Len::Small(n) => u64::from(n),
            Len::Groups(n) => unit(u64::from(n), g),
            Len::Words(n) => unit(u64::from(n) * 64, g),
            Len::Blocks(n) => unit(u64::from(n) * 4096, g),
            Len::Fraction(f) => ((u128::from(rest) * u128::from(f)) >> 32) as u64,
            Len::ToEnd => rest,
            Len::PastEnd(n) => rest + 1 + u64::from(n),
            Len::Overflow => u64::MAX - u64::from(start == 0),
        }
    }
}

/// A new size for truncate, within `[0, cap]`.
#[derive(Clone, Copy, Debug)]
enum NewSize {
    Delta(i32),
    GroupsDelta(i16),
    Fraction(u32),
    Same,
}

impl NewSize {
    fn resolve(self, size: u64, g: u32, cap: u64) -> u64 {
        let new = match self {
            NewSize::Delta(d) => size.saturating_add_signed(i64::from(d)),
            NewSize::GroupsDelta(d) => {
                let step = unit(u64::from(d.unsigned_abs()), g);
                if d < 0 { size.saturating_sub(step) } else { size.saturating_add(step) }
            }
            NewSize::Fraction(f) => ((u128::from(cap) * u128::from(f)) >> 32) as u64,
            NewSize::Same => size,
        };
        new.min(cap)
    }
}

#[derive(Clone, Debug)]
enum Op {
    Set(Pos, Len),
    /// A reset with raw arguments: often misaligned or out of range.
    Reset(Pos, Len),
    /// A reset rounded to groups (start down, length up, or exactly to the end).
    ResetAligned(Pos, Len),
    ResetAll,
    SetAll,
    Truncate(NewSize),
    /// Merge in another bitmap of granularity `g + gdelta` (clamped), filled by `fill`
    /// (or completely when `full`), of a different size when `mismatch`.
    Merge {
        gdelta: i8,
        fill: Vec<(Pos, Len)>,
        scatter: Option<(u64, u16)>,
        full: bool,
        mismatch: bool,
    },
    /// Deserialize random words into a chunk; `raw` keeps unaligned arguments.
    DeserializePart {
        pos: Pos,
        len: Len,
        seed: u64,
        raw: bool,
    },
    DeserializeZeroes {
        pos: Pos,
        len: Len,
        raw: bool,
    },
    DeserializeOnes {
        pos: Pos,
        len: Len,
        raw: bool,
    },
    /// `count` short ranges at pseudo-random places: set (lengths up to `spread` items),
    /// or reset (group-aligned holes up to `spread` groups).
    Scatter {
        seed: u64,
        count: u16,
        spread: u16,
        set: bool,
    },
}

fn pos() -> impl Strategy<Value = Pos> {
    prop_oneof![
        4 => any::<u32>().prop_map(Pos::Uniform),
        4 => (0u8..4, any::<u32>(), -3i16..=3)
            .prop_map(|(level, k, delta)| Pos::Boundary { level, k, delta }),
        1 => (0u16..200).prop_map(Pos::End),
        1 => (0u16..200).prop_map(Pos::Start),
    ]
}

fn len() -> impl Strategy<Value = Len> {
    prop_oneof![
        3 => (0u16..300).prop_map(Len::Small),
        2 => (1u16..200).prop_map(Len::Groups),
        2 => (1u16..140).prop_map(Len::Words),
        1 => (1u8..4).prop_map(Len::Blocks),
        2 => any::<u32>().prop_map(Len::Fraction),
        1 => Just(Len::ToEnd),
        1 => (0u16..100).prop_map(Len::PastEnd),
        1 => Just(Len::Overflow),
    ]
}

fn new_size() -> impl Strategy<Value = NewSize> {
    prop_oneof![
        2 => (-300i32..300).prop_map(NewSize::Delta),
        2 => (-200i16..200).prop_map(NewSize::GroupsDelta),
        2 => any::<u32>().prop_map(NewSize::Fraction),
        1 => Just(NewSize::Same),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (pos(), len()).prop_map(|(p, l)| Op::Set(p, l)),
        2 => (pos(), len()).prop_map(|(p, l)| Op::Reset(p, l)),
        4 => (pos(), len()).prop_map(|(p, l)| Op::ResetAligned(p, l)),
        1 => Just(Op::ResetAll),
        1 => Just(Op::SetAll),
        2 => new_size().prop_map(Op::Truncate),
        2 => merge_op(-3..=3),
        1 => (pos(), len(), any::<u64>(), prop::bool::weighted(0.2))
            .prop_map(|(pos, len, seed, raw)| Op::DeserializePart { pos, len, seed, raw }),
        1 => (pos(), len(), prop::bool::weighted(0.2))
            .prop_map(|(pos, len, raw)| Op::DeserializeZeroes { pos, len, raw }),
        1 => (pos(), len(), prop::bool::weighted(0.2))
            .prop_map(|(pos, len, raw)| Op::DeserializeOnes { pos, len, raw }),
        3 => scatter(),
    ]
}

fn merge_op(gdelta: std::ops::RangeInclusive<i8>) -> impl Strategy<Value = Op> {
    (
        gdelta,
        prop::collection::vec((pos(), len()), 0..6),
        prop::option::weighted(0.5, (any::<u64>(), 1u16..400)),
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.1),
    )
        .prop_map(|(gdelta, fill, scatter, full, mismatch)| Op::Merge {
            gdelta,
            fill,
            scatter,
            full,
            mismatch,
        })
}

fn scatter() -> impl Strategy<Value = Op> {
    (any::<u64>(), 1u16..400, 1u16..300, any::<bool>())
        .prop_map(|(seed, count, spread, set)| Op::Scatter { seed, count, spread, set })
}

// ---------------------------------------------------------------------------------------
// Applying operations to both and checking every query
// ---------------------------------------------------------------------------------------

fn new_pair(size: u64, g: u32) -> (HBitmap, Model) {
    let bm = HBitmap::new(size, g).expect("valid geometry");
    (bm, Model::new(size, g))
}

/// A serialization chunk from recipes: aligned to `64 << g` unless `raw`.
fn chunk_args(pos: Pos, len: Len, raw: bool, size: u64, g: u32) -> (u64, u64) {
    let start = pos.resolve(size, g);
    let length = len.resolve(start, size, g);
    if raw || g >= 58 {
        return (start, length);
    }
    let align = 64u64 << g;
    let start = start / align * align;
    let rest = size - start;
    let length = match len {
        Len::ToEnd | Len::PastEnd(_) | Len::Overflow => rest,
        _ if length.div_ceil(align).saturating_mul(align) >= rest => rest,
        _ => length.div_ceil(align) * align,
    };
    (start, length)
}

/// Applies `op` to both, checks that they agree on the outcome, and that an error left
/// the bitmap unchanged. `cap` bounds the sizes truncate may choose.
fn apply(bm: &mut HBitmap, m: &mut Model, op: &Op, cap: u64) {
    let before = bm.clone();
    let (size, g) = (m.size, m.g);
    let (got, want) = match op {
        Op::Set(p, l) => {
            let start = p.resolve(size, g);
            let len = l.resolve(start, size, g);
            (bm.set(start, len), m.set(start, len))
        }
        Op::Reset(p, l) => {
            let start = p.resolve(size, g);
            let len = l.resolve(start, size, g);
            (bm.reset(start, len), m.reset(start, len))
        }
        Op::ResetAligned(p, l) => {
            let start = p.resolve(size, g) >> g << g;
            let len = match l {
                Len::ToEnd | Len::PastEnd(_) | Len::Overflow => size.saturating_sub(start),
                _ => l.resolve(start, size, g).div_ceil(1 << g) << g,
            };
            (bm.reset(start, len), m.reset(start, len))
        }
        Op::ResetAll => {
            bm.reset_all();
            m.reset_all();
            (Ok(()), Ok(()))
        }
        Op::SetAll => {
            bm.set_all();
            m.set_all();
            (Ok(()), Ok(()))
        }
        Op::Truncate(n) => {
            let new_size = n.resolve(size, g, cap);
            m.truncate(new_size);
            (bm.truncate(new_size), Ok(()))
        }
        Op::Merge { gdelta, fill, scatter, full, mismatch } => {
            let og = g.saturating_add_signed(i32::from(*gdelta)).min(40);
            let osize = if *mismatch { size ^ 1 } else { size };
            let (mut other, mut om) = new_pair(osize, og);
            if *full {
                other.set_all();
                om.set_all();
            }
            for (p, l) in fill {
                let start = p.resolve(osize, og);
                let len = l.resolve(start, osize, og);
                assert_eq!(other.set(start, len), om.set(start, len));
            }
            if let Some((seed, count)) = scatter {
                let op = Op::Scatter { seed: *seed, count: *count, spread: 50, set: true };
                apply(&mut other, &mut om, &op, osize);
            }
            (bm.merge(&other), m.merge(&om))
        }
        Op::DeserializePart { pos, len, seed, raw } => {
            let (start, len) = chunk_args(*pos, *len, *raw, size, g);
            let words = m.chunk(start, len).map_or(1, |r| r.len());
            let mut rng = Rng(*seed);
            // Sometimes a buffer one byte short.
            let short = usize::from(*raw && seed % 3 == 0);
            let buf: Vec<u8> =
                (0..(words * 8).saturating_sub(short)).map(|_| rng.next() as u8).collect();
            (bm.deserialize_part(&buf, start, len), m.deserialize_part(&buf, start, len))
        }
        Op::DeserializeZeroes { pos, len, raw } => {
            let (start, len) = chunk_args(*pos, *len, *raw, size, g);
            (bm.deserialize_zeroes(start, len), m.deserialize_fill(start, len, false))
        }
        Op::DeserializeOnes { pos, len, raw } => {
            let (start, len) = chunk_args(*pos, *len, *raw, size, g);
            (bm.deserialize_ones(start, len), m.deserialize_fill(start, len, true))
        }
        Op::Scatter { seed, count, spread, set } => {
            let mut rng = Rng(*seed);
            let spread = u64::from(*spread);
            for _ in 0..*count {
                if size == 0 {
                    break;
                }
                let (got, want) = if *set {
                    let start = rng.up_to(size - 1);
                    let len = (1 + rng.up_to(spread - 1)).min(size - start);
                    (bm.set(start, len), m.set(start, len))
                } else {
                    let start = rng.up_to(size - 1) >> g << g;
                    let len = unit(1 + rng.up_to(spread - 1), g).min(size - start);
                    (bm.reset(start, len), m.reset(start, len))
                };
                assert_eq!(got, want, "{op:?}");
                got.expect("scattered ranges are valid");
            }
            (Ok(()), Ok(()))
        }
    };
    assert_eq!(got, want, "outcome of {op:?} (size {size}, granularity {g})");
    if got.is_err() {
        assert_eq!(*bm, before, "{op:?} failed but changed the bitmap");
        assert_eq!(bm.count(), before.count());
    }
    assert_eq!(bm.count(), m.count(), "count after {op:?}");
    assert_eq!(bm.is_empty(), m.count() == 0);
}

/// Checks every query of `bm` against `m`. `samples` bounds the number of random start
/// positions (small bitmaps are checked at every item).
fn check(bm: &HBitmap, m: &Model, seed: u64, samples: usize) {
    let (size, g) = (m.size, m.g);
    let q = Queries::new(m);
    let mut rng = Rng(seed);

    assert_eq!(bm.size(), size);
    assert_eq!(bm.granularity(), g);
    assert_eq!(bm.bits(), m.nbits());
    assert_eq!(bm.dirty_bits(), m.dirty_bits());
    assert_eq!(bm.count(), m.count());
    assert_eq!(bm.is_empty(), m.dirty_bits() == 0);

    // Every bit, through the run iterator.
    let runs: Vec<Range<u64>> = bm.dirty_runs(0).collect();
    assert_eq!(runs, q.runs, "dirty_runs(0)");

    // Every bit, through serialization and the hash.
    if g < 58 {
        let want = m.serialize(0, size).expect("whole bitmap is a valid chunk");
        assert_eq!(bm.serialization_size(0, size), Ok(want.len() as u64));
        let mut buf = vec![0xa5u8; want.len()];
        bm.serialize_part(&mut buf, 0, size).expect("serialize whole bitmap");
        assert_eq!(buf, want, "serialized image");
    }
    assert_eq!(bm.sha256(), m.sha256(), "sha256");
    assert_eq!(bm.sha256_hex(), hex(&m.sha256()));

    // Start positions: everything when small, else boundaries, run edges and random.
    let mut points: Vec<u64> = Vec::new();
    if size <= 1200 {
        points.extend(0..=size);
    } else {
        points.extend([0, 1, size - 1, size]);
        for unit in UNIT_BITS.map(|u| unit(u, g)) {
            let n = size / unit;
            for _ in 0..4 {
                let base = rng.up_to(n) * unit;
                points.extend([base.saturating_sub(1), base, base + 1].map(|p| p.min(size)));
            }
        }
        for _ in 0..samples {
            points.push(rng.up_to(size));
        }
        let picked: Vec<usize> = if q.runs.len() <= samples / 4 {
            (0..q.runs.len()).collect()
        } else {
            (0..samples / 4).map(|_| rng.up_to(q.runs.len() as u64 - 1) as usize).collect()
        };
        for i in picked {
            let r = &q.runs[i];
            points.extend([r.start.saturating_sub(1), r.start, r.end - 1, r.end]);
        }
    }

    for &p in &points {
        assert_eq!(bm.get(p), m.get(p), "get({p})");
        let span = unit(3 * 64, g);
        let ends = [size, u64::MAX, p, p + 1, p.saturating_add(1 + rng.up_to(span))];
        for e in ends {
            assert_eq!(bm.next_dirty(p, e), q.next_dirty(p, e), "next_dirty({p}, {e})");
            assert_eq!(bm.next_clean(p, e), q.next_clean(p, e), "next_clean({p}, {e})");
            for max in [1, 1 + rng.up_to(span), u64::MAX] {
                assert_eq!(
                    bm.next_dirty_area(p, e, max),
                    q.next_dirty_area(p, e, max),
                    "next_dirty_area({p}, {e}, {max})"
                );
            }
        }
        assert_eq!(bm.next_dirty_area(p, size, 0), None);
        let rest = size - p.min(size);
        for len in [0, 1, rest, rng.up_to(rest), rest + 1, u64::MAX] {
            assert_eq!(bm.status(p, len), q.status(p, len), "status({p}, {len})");
        }
    }
    for far in [size + 1, size.saturating_add(1 << g), u64::MAX] {
        assert!(!bm.get(far));
        assert_eq!(bm.next_dirty(far, u64::MAX), None);
        assert_eq!(bm.next_clean(far, u64::MAX), None);
    }

    // Clipped run iteration over a few ranges.
    for _ in 0..6 {
        let a = rng.up_to(size + 2);
        let b = if rng.next().is_multiple_of(2) {
            a.saturating_add(rng.up_to(unit(4 * 64, g)))
        } else {
            rng.up_to(size + 2)
        };
        let got: Vec<Range<u64>> = bm.dirty_runs_in(a..b).collect();
        assert_eq!(got, q.runs_in(a..b), "dirty_runs_in({a}..{b})");
    }
    let from = rng.up_to(size);
    let got: Vec<Range<u64>> = bm.dirty_runs(from).collect();
    assert_eq!(got, q.runs_in(from..u64::MAX), "dirty_runs({from})");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs `ops` on a fresh bitmap and its model, checking every query after each op when
/// `check_each`, else only at the end.
fn run_sequence(
    size: u64,
    g: u32,
    ops: &[Op],
    cap: u64,
    seed: u64,
    samples: usize,
    check_each: bool,
) {
    let (mut bm, mut m) = new_pair(size, g);
    for (i, op) in ops.iter().enumerate() {
        apply(&mut bm, &mut m, op, cap);
        if check_each {
            check(&bm, &m, seed.wrapping_add(i as u64), samples);
        }
    }
    check(&bm, &m, seed, samples);
}

// ---------------------------------------------------------------------------------------
// Geometries
// ---------------------------------------------------------------------------------------

/// (size, granularity) for a number of bits in `bits`, often next to a multiple of 64,
/// the last group often partial.
fn geometry(bits: Range<u64>, gran: Range<u32>) -> impl Strategy<Value = (u64, u32)> {
    (bits, gran, any::<u64>(), 0u8..6).prop_map(|(mut nbits, g, slack, near_word)| {
        if near_word < 3 && nbits >= 64 {
            nbits = nbits / 64 * 64 + u64::from(near_word) - 1;
        }
        let size = if nbits == 0 { 0 } else { (nbits << g) - slack % (1 << g) };
        (size, g)
    })
}

fn small_geometry() -> impl Strategy<Value = (u64, u32)> {
    prop_oneof![geometry(0..200, 0..7), geometry(60..700, 0..4), (0u64..3, 40u32..64),]
}

fn medium_geometry() -> impl Strategy<Value = (u64, u32)> {
    geometry(4000..20_000, 0..5)
}

/// More than 64 * 64 words: the first summary level has several words.
fn big_geometry() -> impl Strategy<Value = (u64, u32)> {
    prop_oneof![geometry(262_100..400_000, 0..4), geometry(300_000..330_000, 16..17)]
}

// ---------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn new_bitmap_is_clean((size, g) in prop_oneof![small_geometry(), medium_geometry()], seed: u64) {
        let (bm, m) = new_pair(size, g);
        check(&bm, &m, seed, 64);
        prop_assert!(bm.heap_bytes() >= (m.nbits().div_ceil(64).max(1) * 8) as usize);
    }

    #[test]
    fn set_and_reset(
        (size, g) in prop_oneof![small_geometry(), medium_geometry()],
        ops in prop::collection::vec(
            prop_oneof![
                (pos(), len()).prop_map(|(p, l)| Op::Set(p, l)),
                (pos(), len()).prop_map(|(p, l)| Op::Reset(p, l)),
                (pos(), len()).prop_map(|(p, l)| Op::ResetAligned(p, l)),
                Just(Op::SetAll),
                Just(Op::ResetAll),
                scatter(),
            ],
            1..12,
        ),
        seed: u64,
    ) {
        run_sequence(size, g, &ops, size, seed, 48, true);
    }

    #[test]
    fn merge_any_granularity(
        (size, g) in prop_oneof![small_geometry(), medium_geometry()],
        fill in prop::collection::vec((pos(), len()), 0..6),
        pre in prop::collection::vec(scatter(), 0..3),
        merges in prop::collection::vec(merge_op(-4..=4), 1..4),
        seed: u64,
    ) {
        let mut ops: Vec<Op> = fill.into_iter().map(|(p, l)| Op::Set(p, l)).collect();
        ops.extend(pre);
        ops.extend(merges);
        run_sequence(size, g, &ops, size, seed, 48, false);
    }

    #[test]
    fn truncate_grow_and_shrink(
        (size, g) in prop_oneof![small_geometry(), medium_geometry()],
        ops in prop::collection::vec(
            prop_oneof![
                3 => (pos(), len()).prop_map(|(p, l)| Op::Set(p, l)),
                1 => Just(Op::SetAll),
                3 => new_size().prop_map(Op::Truncate),
                1 => (pos(), len()).prop_map(|(p, l)| Op::ResetAligned(p, l)),
            ],
            1..10,
        ),
        seed: u64,
    ) {
        let cap = size.saturating_mul(2).max(unit(300, g)).min(i64::MAX as u64);
        run_sequence(size, g, &ops, cap, seed, 48, true);
    }

    #[test]
    fn serialize_round_trip(
        (size, g) in prop_oneof![small_geometry(), medium_geometry()],
        fill in prop::collection::vec((pos(), len()), 0..8),
        cuts in prop::collection::vec(any::<u32>(), 0..6),
        seed: u64,
    ) {
        prop_assume!(g < 58);
        let (mut bm, mut m) = new_pair(size, g);
        for (p, l) in &fill {
            apply(&mut bm, &mut m, &Op::Set(*p, *l), size);
        }
        let align = 64u64 << g;
        prop_assert_eq!(bm.serialization_align(), Ok(align));
        // Aligned cut points; the last chunk ends at the size.
        let mut bounds: Vec<u64> = cuts.iter().map(|c| Pos::Uniform(*c).resolve(size, g) / align * align).collect();
        bounds.extend([0, size]);
        bounds.sort_unstable();
        bounds.dedup();
        let image = m.serialize(0, size).unwrap();
        let mut joined = Vec::new();
        let mut copy = HBitmap::new(size, g).unwrap();
        let mut chunks: Vec<(u64, u64, Vec<u8>)> = Vec::new();
        for w in bounds.windows(2) {
            let (start, len) = (w[0], w[1] - w[0]);
            let n = bm.serialization_size(start, len).unwrap() as usize;
            prop_assert_eq!(Ok(n), m.chunk(start, len).map(|r| r.len() * 8));
            let mut buf = vec![0u8; n];
            bm.serialize_part(&mut buf, start, len).unwrap();
            prop_assert_eq!(&buf, &m.serialize(start, len).unwrap());
            if n > 0 {
                let mut short = vec![0u8; n - 1];
                prop_assert_eq!(
                    bm.serialize_part(&mut short, start, len),
                    Err(HBitmapError::BufferTooSmall { needed: n as u64, got: n as u64 - 1 })
                );
            }
            joined.extend_from_slice(&buf);
            chunks.push((start, len, buf));
        }
        prop_assert_eq!(&joined, &image);
        // Deserialize the chunks in a scrambled order into a fresh bitmap.
        let mut rng = Rng(seed);
        for i in (1..chunks.len()).rev() {
            chunks.swap(i, rng.up_to(i as u64) as usize);
        }
        for (start, len, buf) in &chunks {
            copy.deserialize_part(buf, *start, *len).unwrap();
        }
        prop_assert_eq!(&copy, &bm);
        check(&copy, &m, seed, 32);
        // Zeroes and ones over the same chunks.
        for (start, len, _) in &chunks {
            let ones = rng.next().is_multiple_of(2);
            let (mut a, mut b) = (copy.clone(), m.clone());
            let got = if ones { a.deserialize_ones(*start, *len) } else { a.deserialize_zeroes(*start, *len) };
            prop_assert_eq!(got, b.deserialize_fill(*start, *len, ones));
            check(&a, &b, seed, 16);
        }
    }

    #[test]
    fn sha256_matches_model(
        (size, g) in prop_oneof![small_geometry(), medium_geometry()],
        fill in prop::collection::vec((pos(), len()), 0..8),
    ) {
        let (mut bm, mut m) = new_pair(size, g);
        for (p, l) in &fill {
            apply(&mut bm, &mut m, &Op::Set(*p, *l), size);
        }
        let words = m.nbits().div_ceil(64).max(1) as usize;
        let mut bytes = vec![0u8; words * 8];
        for bit in 0..m.nbits() {
            if m.bits[bit as usize] {
                bytes[(bit / 8) as usize] |= 1 << (bit % 8);
            }
        }
        let want: [u8; 32] = Sha256::digest(&bytes).into();
        prop_assert_eq!(bm.sha256(), want);
        prop_assert_eq!(bm.sha256_hex(), hex(&want));
    }

    #[test]
    fn random_sequences_small(
        (size, g) in small_geometry(),
        ops in prop::collection::vec(op(), 1..16),
        seed: u64,
    ) {
        let cap = size.saturating_mul(2).max(unit(200, g)).min(i64::MAX as u64);
        run_sequence(size, g, &ops, cap, seed, 48, true);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn random_sequences_medium(
        (size, g) in medium_geometry(),
        ops in prop::collection::vec(op(), 1..16),
        seed: u64,
    ) {
        run_sequence(size, g, &ops, size + (size >> 1), seed, 64, true);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn random_sequences_big(
        (size, g) in big_geometry(),
        ops in prop::collection::vec(op(), 1..12),
        seed: u64,
    ) {
        run_sequence(size, g, &ops, size + (size >> 2), seed, 96, false);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4))]

    /// More than 64 * 64 * 64 words: the summaries have two levels.
    #[test]
    fn random_sequences_huge(
        (size, g) in geometry(64 * 64 * 64 * 64 + 1..64 * 64 * 64 * 64 + 300_000, 0..2),
        ops in prop::collection::vec(op(), 1..8),
        seed: u64,
    ) {
        run_sequence(size, g, &ops, size + 100_000, seed, 128, false);
    }
}

// ---------------------------------------------------------------------------------------
// Plain cases
// ---------------------------------------------------------------------------------------

#[test]
fn new_rejects_bad_geometry() {
    assert_eq!(HBitmap::new(10, 64).unwrap_err(), HBitmapError::Granularity { granularity: 64 });
    assert_eq!(
        HBitmap::new(1 << 42, 0).unwrap_err(),
        HBitmapError::TooLarge { size: 1 << 42, granularity: 0 }
    );
    assert_eq!(
        HBitmap::new(u64::MAX, 63).unwrap_err(),
        HBitmapError::TooLarge { size: u64::MAX, granularity: 63 }
    );
    // The largest size at the top granularity is fine: one bit.
    let bm = HBitmap::new(i64::MAX as u64, 63).unwrap();
    assert_eq!(bm.bits(), 1);
    // Exactly 2^41 bits is the limit (not allocated here: 2^42 items at granularity 1 is
    // the same number of bits, checked through the error on one more group).
    assert!(matches!(HBitmap::new((1 << 42) + 1, 1), Err(HBitmapError::TooLarge { .. })));
}

#[test]
fn not_serializable_at_granularity_58() {
    let mut bm = HBitmap::new(100, 58).unwrap();
    assert!(!bm.is_serializable());
    let err = HBitmapError::NotSerializable { granularity: 58 };
    assert_eq!(bm.serialization_align(), Err(err.clone()));
    assert_eq!(bm.serialization_size(0, 100), Err(err.clone()));
    assert_eq!(bm.serialize_part(&mut [0; 8], 0, 100), Err(err.clone()));
    assert_eq!(bm.deserialize_ones(0, 100), Err(err));
    assert!(HBitmap::new(100, 57).unwrap().is_serializable());
}

#[test]
fn merge_sizes_must_match() {
    let mut a = HBitmap::new(1000, 2).unwrap();
    let mut b = HBitmap::new(1001, 2).unwrap();
    b.set_all();
    a.set(3, 1).unwrap();
    let before = a.clone();
    assert_eq!(a.merge(&b), Err(HBitmapError::SizeMismatch { dest: 1000, src: 1001 }));
    assert_eq!(a, before);
    // Even an empty source of another size is refused.
    assert_eq!(
        a.merge(&HBitmap::new(999, 0).unwrap()),
        Err(HBitmapError::SizeMismatch { dest: 1000, src: 999 })
    );
}

#[test]
fn merge_rounds_outward_to_destination() {
    // Source granularity 0, destination granularity 4: one item dirties a 16-item group.
    let mut dst = HBitmap::new(100, 4).unwrap();
    let mut src = HBitmap::new(100, 0).unwrap();
    src.set(17, 1).unwrap();
    src.set(99, 1).unwrap();
    dst.merge(&src).unwrap();
    assert_eq!(dst.dirty_runs(0).collect::<Vec<_>>(), vec![16..32, 96..100]);
    assert_eq!(dst.count(), 32);
    // Source granularity 4, destination 0: a group becomes its items, clipped to the size.
    let mut dst = HBitmap::new(100, 0).unwrap();
    let mut src = HBitmap::new(100, 4).unwrap();
    src.set(99, 1).unwrap();
    dst.merge(&src).unwrap();
    assert_eq!(dst.dirty_runs(0).collect::<Vec<_>>(), vec![96..100]);
    assert_eq!(dst.count(), 4);
}
