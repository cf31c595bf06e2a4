//! A small deterministic generator, so that "random" test inputs are the same every run.

/// SplitMix64 (Steele, Lea and Flood): 64-bit state, good enough for test inputs.
#[derive(Clone, Debug)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 random bits.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..=n` (modulo bias is irrelevant for tests).
    pub fn up_to(&mut self, n: u64) -> u64 {
        if n == u64::MAX { self.next() } else { self.next() % (n + 1) }
    }
}
