//! blockdelta's backup repository: a content-addressed chunk store with one complete
//! index per backup.
//!
//! A disk at a point in time is an [`Index`](index::Index): the disk cut into fixed-size
//! chunks aligned to the disk, each named by the SHA-256 of its bytes (an HMAC-SHA-256
//! under the repository's key when encrypted), all-zero chunks not stored at all. A
//! chunk is stored once whatever disk or backup it belongs to, compressed with zstd and,
//! in an encrypted repository, sealed with XChaCha20-Poly1305. Every backup is a complete
//! index, so restore, verify and retention never walk a chain; an incremental reads only
//! the dirty granules from its source and takes the rest of each chunk it changes from
//! the previous backup's chunk.
//!
//! The modules, bottom up:
//!
//! - [`backend`]: where objects live (a local directory now), behind a narrow trait;
//! - [`key`]: key files and the keys derived from them;
//! - [`chunk`]: chunk names and the chunk object format;
//! - [`index`]: the index object format;
//! - [`repository`]: opening and creating a repository, reading chunks and indexes;
//! - [`writer`]: taking a backup (locks, new chunks, the index committed last), and
//!   [`assemble`]: its chunks built from the ranges read and their parent's chunks;
//! - [`restore`], [`verify`], [`prune`], [`gc`]: what is done with backups.
//!
//! `docs/REPOSITORY.md` gives the on-disk format byte by byte and the crash-safety
//! argument of every update.

pub mod assemble;
pub mod backend;
pub mod chunk;
pub mod gc;
pub mod index;
pub mod key;
pub mod prune;
pub mod repository;
pub mod restore;
pub mod verify;
pub mod writer;

mod error;
pub mod pool;
mod time;

pub use error::{Error, Result};
pub use repository::{Backup, Repository, format_id, parse_id};
pub use time::{Timestamp, rfc3339};

/// Receives progress reports (bytes done out of a total). The default methods do
/// nothing, so callers that do not show progress pass [`NoProgress`].
pub trait Progress: Sync {
    /// A phase begins, with `total` bytes to do; called again with the same phase when
    /// the total grows, which keeps the bytes done so far.
    fn start(&self, phase: &str, total: u64) {
        let _ = (phase, total);
    }
    /// `bytes` more are done.
    fn advance(&self, bytes: u64) {
        let _ = bytes;
    }
    /// The phase is over.
    fn finish(&self) {}
}

/// A [`Progress`] that ignores everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;
impl Progress for NoProgress {}

/// Whether `name` can name a disk: ASCII letters, digits, `.`, `_`, `-`, not starting
/// with `.`, at most 64 bytes (it can become a file name).
pub fn valid_disk_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}
