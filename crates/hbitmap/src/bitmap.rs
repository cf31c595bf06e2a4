//! The bitmap itself: creation, set, reset, get, count and truncate.

use crate::HBitmapError;
use crate::summary::{Summary, Track, valid_mask};

/// Most bits a bitmap may have (QEMU's `HBITMAP_LOG_MAX_SIZE`): 2^41 bits, 256 GiB.
pub const MAX_BITS: u64 = 1 << 41;

/// Largest size in items (QEMU sizes are `int64_t`).
pub const MAX_SIZE: u64 = i64::MAX as u64;

/// A dirty bitmap over `size` items, one bit per group of `2^granularity` items.
///
/// Items are abstract units; the block layer uses bytes. Setting rounds a range outward
/// to whole groups; resetting needs group-aligned ranges (a tail that ends at the end of
/// the bitmap may be unaligned). Two summaries, one of set and one of clear bits, let the
/// searches skip empty and full regions; see the crate documentation for costs.
#[derive(Clone)]
pub struct HBitmap {
    pub(crate) size: u64,
    pub(crate) granularity: u32,
    pub(crate) nbits: u64,
    pub(crate) count: u64,
    /// The bottom level: bit `i` of word `w` is group `64 * w + i`. Bits at or past
    /// `nbits` are always clear. At least one word, as in QEMU (it shapes the SHA-256).
    pub(crate) words: Vec<u64>,
    pub(crate) ones: Summary,
    pub(crate) zeros: Summary,
}

impl std::fmt::Debug for HBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HBitmap")
            .field("size", &self.size)
            .field("granularity", &self.granularity)
            .field("dirty_groups", &self.count)
            .finish_non_exhaustive()
    }
}

impl PartialEq for HBitmap {
    fn eq(&self, other: &Self) -> bool {
        self.size == other.size
            && self.granularity == other.granularity
            && self.words == other.words
    }
}

impl Eq for HBitmap {}

/// Number of groups of `2^granularity` items needed to cover `items`.
#[inline]
pub(crate) fn groups(items: u64, granularity: u32) -> u64 {
    (items >> granularity) + u64::from(items & ((1u64 << granularity) - 1) != 0)
}

pub(crate) fn zeroed_words(n: usize) -> Result<Vec<u64>, HBitmapError> {
    let mut words = Vec::new();
    words.try_reserve_exact(n).map_err(|_| HBitmapError::Allocation { bytes: n as u64 * 8 })?;
    advise_huge_pages(&words);
    words.resize(n, 0);
    Ok(words)
}

/// Asks the kernel to back a large word array with huge pages, before it is touched: a
/// write to a random place of a bitmap of tens of MiB otherwise pays a page-table walk
/// on top of the cache miss. Advice only; failure changes nothing.
fn advise_huge_pages(words: &Vec<u64>) {
    const HUGE: usize = 2 << 20;
    let bytes = words.capacity() * 8;
    if bytes < 2 * HUGE {
        return;
    }
    let start = words.as_ptr() as usize;
    let aligned = start.next_multiple_of(HUGE);
    let len = (start + bytes - aligned) / HUGE * HUGE;
    // SAFETY: [aligned, aligned + len) lies inside the vector's allocation, which this
    // process owns for the vector's life; MADV_HUGEPAGE changes no contents, only how
    // the kernel backs the pages.
    let _ = unsafe {
        rustix::mm::madvise(
            aligned as *mut std::ffi::c_void,
            len,
            rustix::mm::Advice::LinuxHugepage,
        )
    };
}

/// Words of the bottom level for `nbits` bits: at least one.
pub(crate) fn word_count(nbits: u64) -> usize {
    // nbits <= MAX_BITS, so this fits a usize on 64-bit hosts.
    (nbits.div_ceil(64) as usize).max(1)
}

impl HBitmap {
    /// A clean bitmap of `size` items with `2^granularity` items per bit.
    pub fn new(size: u64, granularity: u32) -> Result<Self, HBitmapError> {
        let nbits = check_geometry(size, granularity)?;
        let words = zeroed_words(word_count(nbits))?;
        Ok(Self::from_words(size, granularity, nbits, words))
    }

    pub(crate) fn from_words(size: u64, granularity: u32, nbits: u64, words: Vec<u64>) -> Self {
        let count = words.iter().map(|w| u64::from(w.count_ones())).sum();
        let ones = Summary::build(&words, nbits, Track::Ones);
        let zeros = Summary::build(&words, nbits, Track::Zeros);
        HBitmap { size, granularity, nbits, count, words, ones, zeros }
    }

    /// Size in items.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Granularity: log2 of the number of items per bit.
    pub fn granularity(&self) -> u32 {
        self.granularity
    }

    /// Number of bits (groups).
    pub fn bits(&self) -> u64 {
        self.nbits
    }

    /// Number of dirty items: set bits times items per bit. Not clipped to the size when
    /// the last group is partial, as in QEMU. O(1).
    pub fn count(&self) -> u64 {
        self.count << self.granularity
    }

    /// Number of set bits. O(1).
    pub fn dirty_bits(&self) -> u64 {
        self.count
    }

    /// Whether no bit is set. O(1).
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether `item` is dirty. Items at or past the end are clean.
    pub fn get(&self, item: u64) -> bool {
        if item >= self.size {
            return false;
        }
        let bit = item >> self.granularity;
        self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }

    /// Marks items `[start, start + len)` dirty, rounding outward to whole groups.
    /// `len == 0` does nothing.
    pub fn set(&mut self, start: u64, len: u64) -> Result<(), HBitmapError> {
        if len == 0 {
            return Ok(());
        }
        let end = self.checked_end(start, len)?;
        let first = start >> self.granularity;
        let last = (end - 1) >> self.granularity;
        self.update_bits(first, last + 1, true);
        Ok(())
    }

    /// Marks items `[start, start + len)` clean. `start` must be group-aligned, and so
    /// must the end unless it is the end of the bitmap (or the end of its last group).
    pub fn reset(&mut self, start: u64, len: u64) -> Result<(), HBitmapError> {
        if len == 0 {
            return Ok(());
        }
        let align = 1u64 << self.granularity;
        let end = start.checked_add(len).ok_or(HBitmapError::OutOfRange {
            start,
            len,
            size: self.size,
        })?;
        let aligned_size = self.nbits << self.granularity;
        if end > self.size.max(aligned_size) {
            return Err(HBitmapError::OutOfRange { start, len, size: self.size });
        }
        if !start.is_multiple_of(align) || (!end.is_multiple_of(align) && end != self.size) {
            return Err(HBitmapError::Misaligned { start, len, align });
        }
        let first = start >> self.granularity;
        let end_bit = groups(end, self.granularity);
        self.update_bits(first, end_bit, false);
        Ok(())
    }

    /// Marks every item clean.
    pub fn reset_all(&mut self) {
        self.words.fill(0);
        self.count = 0;
        self.rebuild_summaries();
    }

    /// Marks every item dirty.
    pub fn set_all(&mut self) {
        if self.nbits > 0 {
            self.update_bits(0, self.nbits, true);
        }
    }

    /// Changes the size to `new_size` items. Growing adds clean items; shrinking drops the
    /// groups past the new end (a partial last group keeps its bit).
    pub fn truncate(&mut self, new_size: u64) -> Result<(), HBitmapError> {
        let new_nbits = check_geometry(new_size, self.granularity)?;
        let new_words = word_count(new_nbits);
        if new_nbits < self.nbits {
            self.update_bits(new_nbits, self.nbits, false);
            self.words.truncate(new_words);
            self.words.shrink_to_fit();
        } else if new_words > self.words.len() {
            let extra = new_words - self.words.len();
            self.words
                .try_reserve_exact(extra)
                .map_err(|_| HBitmapError::Allocation { bytes: extra as u64 * 8 })?;
            self.words.resize(new_words, 0);
        }
        self.size = new_size;
        self.nbits = new_nbits;
        self.rebuild_summaries();
        Ok(())
    }

    /// Bytes of heap memory the bitmap uses.
    pub fn heap_bytes(&self) -> usize {
        self.words.capacity() * 8 + self.ones.heap_bytes() + self.zeros.heap_bytes()
    }

    pub(crate) fn checked_end(&self, start: u64, len: u64) -> Result<u64, HBitmapError> {
        match start.checked_add(len) {
            Some(end) if end <= self.size => Ok(end),
            _ => Err(HBitmapError::OutOfRange { start, len, size: self.size }),
        }
    }

    pub(crate) fn rebuild_summaries(&mut self) {
        self.ones = Summary::build(&self.words, self.nbits, Track::Ones);
        self.zeros = Summary::build(&self.words, self.nbits, Track::Zeros);
    }

    /// Sets or clears bits `[first, end)`, keeping the count and summaries exact.
    pub(crate) fn update_bits(&mut self, first: u64, end: u64, set: bool) {
        debug_assert!(first < end && end <= self.nbits);
        let first_word = (first / 64) as usize;
        let last_word = ((end - 1) / 64) as usize;
        let mut added: u64 = 0;
        let mut removed: u64 = 0;
        for w in first_word..=last_word {
            let lo = if w == first_word { first % 64 } else { 0 };
            let hi = if w == last_word { (end - 1) % 64 + 1 } else { 64 };
            let mask = range_mask(lo, hi);
            let old = self.words[w];
            let new = if set { old | mask } else { old & !mask };
            if new != old {
                self.words[w] = new;
                if set {
                    added += u64::from((new ^ old).count_ones());
                } else {
                    removed += u64::from((new ^ old).count_ones());
                }
            }
        }
        self.count = self.count + added - removed;
        self.refresh_summaries(first_word..last_word + 1);
    }

    pub(crate) fn refresh_summaries(&mut self, changed: std::ops::Range<usize>) {
        self.ones.refresh(&self.words, self.nbits, Track::Ones, changed.clone());
        self.zeros.refresh(&self.words, self.nbits, Track::Zeros, changed);
    }

    /// Mask of the valid bits of bottom word `i`.
    pub(crate) fn valid_mask(&self, i: usize) -> u64 {
        valid_mask(self.words.len(), self.nbits, i)
    }
}

/// Bits `[lo, hi)` of a word, `0 <= lo < hi <= 64`.
#[inline]
pub(crate) fn range_mask(lo: u64, hi: u64) -> u64 {
    let upper = if hi >= 64 { u64::MAX } else { (1u64 << hi) - 1 };
    upper & (u64::MAX << lo)
}

/// Validates size and granularity; returns the number of bits.
fn check_geometry(size: u64, granularity: u32) -> Result<u64, HBitmapError> {
    if granularity >= 64 {
        return Err(HBitmapError::Granularity { granularity });
    }
    let nbits = groups(size, granularity);
    if size > MAX_SIZE || nbits > MAX_BITS {
        return Err(HBitmapError::TooLarge { size, granularity });
    }
    Ok(nbits)
}
