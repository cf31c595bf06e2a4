//! A hierarchical dirty bitmap, compatible with QEMU's `HBitmap`.
//!
//! An [`HBitmap`] tracks which groups of items are dirty. Items are abstract units (the
//! block layer uses bytes); the granularity is log2 of the items per bit, and ranges are
//! rounded to whole groups. What a user of QEMU's bitmaps can observe is reproduced
//! exactly: the dirty count, the search results, the serialized form of qcow2 bitmap
//! clusters ([`HBitmap::serialize_part`]) and the SHA-256 that QEMU's
//! `x-debug-block-dirty-bitmap-sha256` reports ([`HBitmap::sha256_hex`]).
//!
//! Costs:
//! - `count`, `is_empty`, `get`: O(1).
//! - `set`/`reset` of `n` bits: O(n / 64) plus two short summary updates.
//! - `next_dirty`, `next_clean`, and each step of [`HBitmap::dirty_runs`]: bounded by
//!   the depth of the summaries (at most a few hundred word reads for 2^41 bits), never
//!   by the bitmap's size or a run's length.
//! - `merge` of equal granularities: one pass over both arrays.
//! - Memory: the bits, plus 1/2048 of them for the two summaries.
//!
//! Deliberate differences from QEMU, where QEMU would assert or keep stray bits:
//! - `set` refuses a range that ends past the size (QEMU accepts one that ends inside the
//!   last group), and `get` past the size is false;
//! - deserializing never sets the padding bits past the end of the last word (QEMU's
//!   `deserialize_ones` can, and then hashes them).

#![deny(missing_docs)]

mod bitmap;
mod error;
mod merge;
mod search;
mod serialize;
mod summary;

pub use bitmap::{HBitmap, MAX_BITS, MAX_SIZE};
pub use error::HBitmapError;
pub use search::DirtyRuns;
pub use serialize::MAX_SERIALIZABLE_GRANULARITY;
