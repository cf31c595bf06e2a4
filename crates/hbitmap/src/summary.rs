//! Summary levels over the bottom bit array, for searches that skip empty regions.
//!
//! A summary answers "where is the next bit of interest at or after position p". The
//! bottom level is the bitmap itself; which of its bits are of interest depends on the
//! [`Track`]: set bits (to find dirty items) or clear bits (to find clean ones). Above
//! the bottom, each summary level has one bit per *block* of 64 words of the level below,
//! set when any word of that block holds a bit of interest. A block of 64 words spans
//! 4096 bits, so a summary costs 1/4096 of the bitmap (plus 1/4096 of that, ...), and a
//! search reads at most two blocks per level: its cost depends on the depth, never on the
//! bitmap's size or on how long a run is.

/// Which bits of the bottom level a [`Summary`] indexes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Track {
    /// Set bits (dirty groups).
    Ones,
    /// Clear bits inside the valid range (clean groups).
    Zeros,
}

/// Words per block: one summary bit stands for this many words of the level below.
const BLOCK_WORDS: usize = 64;

/// The bits of bottom word `i` that `track` is interested in.
#[inline]
pub(crate) fn interest(track: Track, words: &[u64], nbits: u64, i: usize) -> u64 {
    match track {
        Track::Ones => words[i],
        Track::Zeros => !words[i] & valid_mask(words.len(), nbits, i),
    }
}

/// The bits of word `i` that lie below `nbits` in a level of `len` words.
#[inline]
pub(crate) fn valid_mask(len: usize, nbits: u64, i: usize) -> u64 {
    if i + 1 == len {
        let tail = nbits - (i as u64) * 64;
        if tail >= 64 { u64::MAX } else { (1u64 << tail) - 1 }
    } else {
        u64::MAX
    }
}

/// Summary levels; `levels[0]` summarises the bottom level, `levels[k]` summarises
/// `levels[k - 1]`. The last level has at most 64 words, so a search may scan it whole.
#[derive(Clone, Debug, Default)]
pub(crate) struct Summary {
    levels: Vec<Vec<u64>>,
}

/// A level below a summary level: either the bottom level (seen through a [`Track`]) or
/// a summary level (whose bits are all of interest).
#[derive(Clone, Copy)]
enum Lower<'a> {
    Bottom { words: &'a [u64], nbits: u64, track: Track },
    Summary(&'a [u64]),
}

impl Lower<'_> {
    #[inline]
    fn len(&self) -> usize {
        match self {
            Lower::Bottom { words, .. } => words.len(),
            Lower::Summary(words) => words.len(),
        }
    }

    #[inline]
    fn word(&self, i: usize) -> u64 {
        match *self {
            Lower::Bottom { words, nbits, track } => interest(track, words, nbits, i),
            Lower::Summary(words) => words[i],
        }
    }

    /// Whether any word of block `b` holds a bit of interest, looking at the words in
    /// `hint` first (the ones that just changed, which usually decide the answer).
    fn block_has_interest(&self, b: usize, hint: std::ops::Range<usize>) -> bool {
        let start = b * BLOCK_WORDS;
        let end = (start + BLOCK_WORDS).min(self.len());
        let lo = hint.start.clamp(start, end);
        let hi = hint.end.clamp(lo, end);
        (lo..hi).any(|i| self.word(i) != 0)
            || (start..lo).any(|i| self.word(i) != 0)
            || (hi..end).any(|i| self.word(i) != 0)
    }
}

impl Summary {
    /// Builds the summary of `words` from scratch.
    pub(crate) fn build(words: &[u64], nbits: u64, track: Track) -> Self {
        let lower = Lower::Bottom { words, nbits, track };
        let mut level0 = vec![0u64; summary_len(words.len())];
        if !level0.is_empty() {
            for b in 0..words.len().div_ceil(BLOCK_WORDS) {
                if lower.block_has_interest(b, 0..0) {
                    level0[b / 64] |= 1 << (b % 64);
                }
            }
        }
        Self::from_level0(level0)
    }

    /// Builds the levels above an already computed first level (`level0` is empty when
    /// the bottom level is small enough to need no summary).
    pub(crate) fn from_level0(level0: Vec<u64>) -> Self {
        let mut levels = Vec::new();
        if !level0.is_empty() {
            levels.push(level0);
        }
        while let Some(last) = levels.last().filter(|l| l.len() > BLOCK_WORDS) {
            let lower = Lower::Summary(last);
            let mut next = vec![0u64; summary_len(last.len())];
            for b in 0..last.len().div_ceil(BLOCK_WORDS) {
                if lower.block_has_interest(b, 0..0) {
                    next[b / 64] |= 1 << (b % 64);
                }
            }
            levels.push(next);
        }
        Summary { levels }
    }

    /// Bytes of heap memory the summary uses.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.levels.iter().map(|l| l.capacity() * 8).sum::<usize>()
            + self.levels.capacity() * std::mem::size_of::<Vec<u64>>()
    }

    /// Brings the summary up to date after bottom words `changed` were modified.
    pub(crate) fn refresh(
        &mut self,
        words: &[u64],
        nbits: u64,
        track: Track,
        changed: std::ops::Range<usize>,
    ) {
        let mut changed = changed;
        for depth in 0..self.levels.len() {
            if changed.is_empty() {
                return;
            }
            let (below, above) = self.levels.split_at_mut(depth);
            let lower = match below.last() {
                None => Lower::Bottom { words, nbits, track },
                Some(level) => Lower::Summary(level),
            };
            let upper = &mut above[0];
            let first_block = changed.start / BLOCK_WORDS;
            let last_block = (changed.end - 1) / BLOCK_WORDS;
            let mut flipped: Option<(usize, usize)> = None;
            for b in first_block..=last_block {
                let bit = 1u64 << (b % 64);
                let want = lower.block_has_interest(b, changed.clone());
                if (upper[b / 64] & bit != 0) != want {
                    upper[b / 64] ^= bit;
                    let w = b / 64;
                    flipped = Some(flipped.map_or((w, w), |(lo, _)| (lo, w)));
                }
            }
            changed = match flipped {
                Some((lo, hi)) => lo..hi + 1,
                None => 0..0,
            };
        }
    }

    /// The first bottom bit at or after `start` that `track` is interested in.
    pub(crate) fn find(&self, words: &[u64], nbits: u64, track: Track, start: u64) -> Option<u64> {
        if start >= nbits {
            return None;
        }
        let found = self.find_bottom(words, nbits, track, start)?;
        (found < nbits).then_some(found)
    }

    /// [`find`](Self::find) on the bottom level, `start < nbits`. The bottom words are
    /// read directly (not through a [`Lower`], which costs a copy per call): most
    /// searches end in the block of `start`, and only a miss there climbs the summary.
    fn find_bottom(&self, words: &[u64], nbits: u64, track: Track, start: u64) -> Option<u64> {
        let hit = |i: usize| {
            let m = interest(track, words, nbits, i);
            (m != 0).then(|| i as u64 * 64 + u64::from(m.trailing_zeros()))
        };
        // start < nbits <= 2^41, so the word index fits.
        let w = (start / 64) as usize;
        let first = interest(track, words, nbits, w) & (u64::MAX << (start % 64));
        if first != 0 {
            return Some(w as u64 * 64 + u64::from(first.trailing_zeros()));
        }
        let block = w / BLOCK_WORDS;
        let block_end = ((block + 1) * BLOCK_WORDS).min(words.len());
        if let Some(found) = (w + 1..block_end).find_map(hit) {
            return Some(found);
        }
        if self.levels.is_empty() {
            // The bottom level is a single block, just scanned.
            return None;
        }
        let next_block = usize::try_from(self.find_in_level(0, block as u64 + 1)?).ok()?;
        let start = next_block * BLOCK_WORDS;
        let found = (start..(start + BLOCK_WORDS).min(words.len())).find_map(hit);
        debug_assert!(found.is_some(), "summary bit set for a block without interest");
        found
    }

    /// The first set bit at or after `start` in summary level `k`, climbing to the levels
    /// above to skip the blocks that have none.
    fn find_in_level(&self, k: usize, start: u64) -> Option<u64> {
        let level = &self.levels[k];
        let w = usize::try_from(start / 64).ok()?;
        if w >= level.len() {
            return None;
        }
        let first = level[w] & (u64::MAX << (start % 64));
        if first != 0 {
            return Some(w as u64 * 64 + u64::from(first.trailing_zeros()));
        }
        let block = w / BLOCK_WORDS;
        let block_end = ((block + 1) * BLOCK_WORDS).min(level.len());
        if let Some(hit) = scan(level, w + 1..block_end) {
            return Some(hit);
        }
        if k + 1 == self.levels.len() {
            // The top level has at most one block, which was just scanned.
            return None;
        }
        let next_block = usize::try_from(self.find_in_level(k + 1, block as u64 + 1)?).ok()?;
        let start = next_block * BLOCK_WORDS;
        let hit = scan(level, start..(start + BLOCK_WORDS).min(level.len()));
        debug_assert!(hit.is_some(), "summary bit set for a block without interest");
        hit
    }
}

fn scan(level: &[u64], range: std::ops::Range<usize>) -> Option<u64> {
    for i in range {
        let m = level[i];
        if m != 0 {
            return Some(i as u64 * 64 + u64::from(m.trailing_zeros()));
        }
    }
    None
}

/// Words of the summary level above a level of `len` words (zero when none is needed).
pub(crate) fn summary_len(len: usize) -> usize {
    if len <= BLOCK_WORDS { 0 } else { len.div_ceil(BLOCK_WORDS).div_ceil(64) }
}
