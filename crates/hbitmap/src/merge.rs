//! Merging one bitmap into another.

use crate::HBitmap;
use crate::HBitmapError;
use crate::summary::{Summary, Track, summary_len};

impl HBitmap {
    /// ORs `other` into `self`. Sizes (in items) must match; granularities may differ, in
    /// which case every dirty run of `other` is set in `self`, rounded outward to `self`'s
    /// groups.
    ///
    /// Equal granularities take one pass over both bottom levels that also recounts and
    /// rebuilds the summaries, so the cost is that of reading two arrays and writing one.
    pub fn merge(&mut self, other: &HBitmap) -> Result<(), HBitmapError> {
        if self.size != other.size {
            return Err(HBitmapError::SizeMismatch { dest: self.size, src: other.size });
        }
        if other.is_empty() {
            return Ok(());
        }
        if self.granularity != other.granularity {
            for run in other.dirty_runs(0) {
                self.set(run.start, run.end - run.start)?;
            }
            return Ok(());
        }
        self.merge_same_granularity(other);
        Ok(())
    }

    fn merge_same_granularity(&mut self, other: &HBitmap) {
        debug_assert_eq!(self.words.len(), other.words.len());
        let len = self.words.len();
        let mut ones0 = vec![0u64; summary_len(len)];
        let mut zeros0 = vec![0u64; summary_len(len)];
        let mut count = 0u64;
        for (b, (dst, src)) in self.words.chunks_mut(64).zip(other.words.chunks(64)).enumerate() {
            let (any, all) = or_block(dst, src, &mut count);
            if !ones0.is_empty() {
                let bit = 1u64 << (b % 64);
                if any != 0 {
                    ones0[b / 64] |= bit;
                }
                // Only the last word can have padding; its block is fixed up below.
                if all != u64::MAX {
                    zeros0[b / 64] |= bit;
                }
            }
        }
        self.count = count;
        self.ones = Summary::from_level0(ones0);
        self.zeros = Summary::from_level0(zeros0);
        if !self.nbits.is_multiple_of(64) {
            // The last word's padding reads as clear: recompute its block for Zeros.
            let last = len - 1;
            self.zeros.refresh(&self.words, self.nbits, Track::Zeros, last..len);
        }
    }
}

/// ORs `src` into `dst`, adds the set bits to `count`, and returns the OR and the AND of
/// the resulting words (any bit set / every bit set).
fn or_block(dst: &mut [u64], src: &[u64], count: &mut u64) -> (u64, u64) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("popcnt")
        {
            // SAFETY: the CPU supports AVX2 and POPCNT, checked just above.
            return unsafe { or_block_avx2(dst, src, count) };
        }
    }
    or_block_portable(dst, src, count)
}

#[inline(always)]
fn or_block_portable(dst: &mut [u64], src: &[u64], count: &mut u64) -> (u64, u64) {
    let mut any = 0u64;
    let mut all = u64::MAX;
    let mut n = 0u64;
    for (d, s) in dst.iter_mut().zip(src) {
        let w = *d | *s;
        *d = w;
        n += u64::from(w.count_ones());
        any |= w;
        all &= w;
    }
    *count += n;
    (any, all)
}

/// The same loop, compiled with AVX2 and POPCNT so that the compiler vectorizes it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,popcnt")]
fn or_block_avx2(dst: &mut [u64], src: &[u64], count: &mut u64) -> (u64, u64) {
    or_block_portable(dst, src, count)
}
