//! QEMU's serialization format and SHA-256.
//!
//! The serialized form of a range is the bottom-level words covering it, each as a
//! little-endian `u64`: an LSB-first bit stream where bit `i` of the chunk is bit
//! `i % 8` of byte `i / 8`. It is the format of qcow2 bitmap data clusters and of QEMU's
//! migration stream, and what `x-debug-block-dirty-bitmap-sha256` hashes.

use sha2::{Digest, Sha256};

use crate::HBitmap;
use crate::HBitmapError;

/// Granularities at or above this cannot be serialized (QEMU's limit).
pub const MAX_SERIALIZABLE_GRANULARITY: u32 = 58;

impl HBitmap {
    /// Whether the bitmap can be serialized (granularity below 58).
    pub fn is_serializable(&self) -> bool {
        self.granularity < MAX_SERIALIZABLE_GRANULARITY
    }

    /// The alignment, in items, that serialized chunks must start on: one bottom word,
    /// `64 << granularity` items.
    pub fn serialization_align(&self) -> Result<u64, HBitmapError> {
        if !self.is_serializable() {
            return Err(HBitmapError::NotSerializable { granularity: self.granularity });
        }
        Ok(64u64 << self.granularity)
    }

    /// Bytes needed to serialize items `[start, start + len)` (whole bottom words).
    pub fn serialization_size(&self, start: u64, len: u64) -> Result<u64, HBitmapError> {
        Ok(self.chunk_words(start, len)?.len() as u64 * 8)
    }

    /// Writes items `[start, start + len)` into `buf` in the serialized format. `start`
    /// must be aligned to [`serialization_align`](Self::serialization_align), and so must
    /// `len` unless the chunk reaches the end of the bitmap.
    pub fn serialize_part(&self, buf: &mut [u8], start: u64, len: u64) -> Result<(), HBitmapError> {
        let words = self.chunk_words(start, len)?;
        check_buffer(buf.len(), words.len())?;
        for (out, w) in buf.chunks_exact_mut(8).zip(&self.words[words]) {
            out.copy_from_slice(&w.to_le_bytes());
        }
        Ok(())
    }

    /// Reads items `[start, start + len)` from `buf` (the inverse of
    /// [`serialize_part`](Self::serialize_part)). Bits past the end of the bitmap are
    /// ignored, so they can never be set in memory.
    pub fn deserialize_part(
        &mut self,
        buf: &[u8],
        start: u64,
        len: u64,
    ) -> Result<(), HBitmapError> {
        let words = self.chunk_words(start, len)?;
        check_buffer(buf.len(), words.len())?;
        self.replace_words(words, |i| {
            let at = i * 8;
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&buf[at..at + 8]);
            u64::from_le_bytes(bytes)
        });
        Ok(())
    }

    /// Marks the serialization chunk `[start, start + len)` all clean.
    pub fn deserialize_zeroes(&mut self, start: u64, len: u64) -> Result<(), HBitmapError> {
        let words = self.chunk_words(start, len)?;
        self.replace_words(words, |_| 0);
        Ok(())
    }

    /// Marks the serialization chunk `[start, start + len)` all dirty (whole words, up to
    /// the end of the bitmap).
    pub fn deserialize_ones(&mut self, start: u64, len: u64) -> Result<(), HBitmapError> {
        let words = self.chunk_words(start, len)?;
        self.replace_words(words, |_| u64::MAX);
        Ok(())
    }

    /// SHA-256 of the bottom level as QEMU hashes it: every word (at least one) as
    /// little-endian bytes. Equal to QEMU's `x-debug-block-dirty-bitmap-sha256` for the
    /// same bits.
    pub fn sha256(&self) -> [u8; 32] {
        let mut hasher = Sha256::new();
        let mut buf = [0u8; 4096];
        for chunk in self.words.chunks(buf.len() / 8) {
            for (out, w) in buf.chunks_exact_mut(8).zip(chunk) {
                out.copy_from_slice(&w.to_le_bytes());
            }
            hasher.update(&buf[..chunk.len() * 8]);
        }
        hasher.finalize().into()
    }

    /// [`sha256`](Self::sha256) as 64 lowercase hex digits.
    pub fn sha256_hex(&self) -> String {
        self.sha256().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The bottom words that serialize items `[start, start + len)`, after checking the
    /// alignment rules.
    fn chunk_words(&self, start: u64, len: u64) -> Result<std::ops::Range<usize>, HBitmapError> {
        let align = self.serialization_align()?;
        let end = self.checked_end(start, len)?;
        if !start.is_multiple_of(align) || (!len.is_multiple_of(align) && end != self.size) {
            return Err(HBitmapError::Misaligned { start, len, align });
        }
        let first = (start / align) as usize;
        let last = (end.div_ceil(align) as usize).min(self.words.len());
        Ok(first..last.max(first))
    }

    /// Replaces bottom words `range` with `word(i)` for `i` counted from the range's
    /// start, masking padding bits, and keeps count and summaries exact.
    fn replace_words(&mut self, range: std::ops::Range<usize>, word: impl Fn(usize) -> u64) {
        if range.is_empty() {
            return;
        }
        let mut count = self.count;
        for (i, w) in range.clone().enumerate() {
            let new = word(i) & self.valid_mask(w);
            count = count - u64::from(self.words[w].count_ones()) + u64::from(new.count_ones());
            self.words[w] = new;
        }
        self.count = count;
        self.refresh_summaries(range);
    }
}

fn check_buffer(got: usize, words: usize) -> Result<(), HBitmapError> {
    let needed = words as u64 * 8;
    if (got as u64) < needed {
        return Err(HBitmapError::BufferTooSmall { needed, got: got as u64 });
    }
    Ok(())
}
