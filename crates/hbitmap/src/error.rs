//! Errors of bitmap operations.

/// Why an [`HBitmap`](crate::HBitmap) operation was refused. The bitmap is unchanged
/// whenever one of these is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HBitmapError {
    /// The range reaches past the end of the bitmap (or overflows).
    #[error("range of {len} items at {start} is past the end of the bitmap ({size} items)")]
    OutOfRange {
        /// First item of the range.
        start: u64,
        /// Length of the range in items.
        len: u64,
        /// Size of the bitmap in items.
        size: u64,
    },
    /// The range is not aligned as the operation requires.
    #[error("range of {len} items at {start} is not aligned to {align} items")]
    Misaligned {
        /// First item of the range.
        start: u64,
        /// Length of the range in items.
        len: u64,
        /// The required alignment in items.
        align: u64,
    },
    /// The granularity (log2 of items per bit) is 64 or more.
    #[error("granularity 2^{granularity} is out of range (at most 2^63 items per bit)")]
    Granularity {
        /// The rejected granularity (log2).
        granularity: u32,
    },
    /// The size is larger than `i64::MAX` items or needs more than 2^41 bits.
    #[error("a bitmap of {size} items at granularity 2^{granularity} is too large")]
    TooLarge {
        /// Requested size in items.
        size: u64,
        /// Requested granularity (log2).
        granularity: u32,
    },
    /// Merge of bitmaps with different sizes.
    #[error("bitmaps are of different sizes (destination {dest} items, source {src} items)")]
    SizeMismatch {
        /// Size of the destination in items.
        dest: u64,
        /// Size of the source in items.
        src: u64,
    },
    /// Serialization needs a granularity below 58.
    #[error("a bitmap with granularity 2^{granularity} cannot be serialized")]
    NotSerializable {
        /// The bitmap's granularity (log2).
        granularity: u32,
    },
    /// A serialization buffer is too small for the range.
    #[error("buffer of {got} bytes is too small for the range ({needed} bytes needed)")]
    BufferTooSmall {
        /// Bytes the range needs.
        needed: u64,
        /// Bytes the buffer has.
        got: u64,
    },
    /// Memory for the bitmap could not be allocated.
    #[error("could not allocate {bytes} bytes for a bitmap")]
    Allocation {
        /// Bytes that were requested.
        bytes: u64,
    },
}
