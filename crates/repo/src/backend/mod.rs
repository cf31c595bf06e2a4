//! Where a repository's objects live, behind a narrow trait.
//!
//! An object is a whole byte string under a key: `/`-separated, each part made of ASCII
//! letters, digits, `.`, `_` and `-` (see [`valid_key`]). Objects are written once and
//! never changed in place: [`Backend::create`] makes one appear with its whole content or
//! not at all, and never replaces an existing object. Chunks and indexes are all written
//! that way, which is what object storage offers too (a conditional create).
//!
//! Durability: the content of a created object is durable when `create` returns; its
//! *name* (and a deletion) is durable after the next [`Backend::sync`]. A caller that
//! makes one object depend on others (an index on its chunks) syncs between them.
//!
//! Many objects at once go through a [`Batch`]: each is written when added, but neither
//! durable nor visible; [`Batch::publish`] makes all of their contents durable together,
//! and only then gives them their names. A name therefore never shows content that is
//! not durable, as with `create`, at the cost of one flush per batch instead of one per
//! object.
//!
//! Locks ([`Backend::lock`]) are advisory and held by the returned guard; a process that
//! dies loses its locks. The garbage collector also needs each object's modification
//! time and a way to renew it ([`Backend::touch`]).

mod batch;
mod local;
mod memory;

use std::fmt::Debug;
use std::time::SystemTime;

pub use batch::{Batch, BufferedBatch};
pub use local::LocalBackend;
pub use memory::{CutMode, MemoryBackend};

use crate::Result;

/// What is known of an object without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The key.
    pub key: String,
    /// Its length in bytes.
    pub size: u64,
    /// When it was created or last touched.
    pub modified: SystemTime,
}

/// The outcome of [`Backend::create`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// The object is new.
    New,
    /// An object of that key existed and was left as it was (its modification time
    /// renewed, as [`Backend::touch`] does).
    Existed,
}

/// How a lock is shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Any number of shared holders at once, but no exclusive one.
    Shared,
    /// One holder.
    Exclusive,
}

/// What [`Backend::lock`] does when the lock is held elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockWait {
    /// Wait until it is free.
    Block,
    /// Return `None` at once.
    Fail,
}

/// A held lock; dropping it releases the lock.
pub trait LockGuard: Send + Sync + Debug {}

/// A place for a repository's objects.
pub trait Backend: Send + Sync + Debug {
    /// Where the objects are, for messages (a directory, a bucket URL).
    fn location(&self) -> String;

    /// The whole object `key`; [`Error::Missing`](crate::Error::Missing) when there is
    /// none; [`Error::Corrupt`](crate::Error::Corrupt) when it is longer than `limit`
    /// (nothing past `limit` is read into memory).
    fn read(&self, key: &str, limit: u64) -> Result<Vec<u8>>;

    /// Up to `len` bytes of object `key` from byte `offset` (fewer at its end);
    /// [`Error::Missing`](crate::Error::Missing) when there is none.
    fn read_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>>;

    /// Creates object `key` with `data`, atomically, unless it exists. The content is
    /// durable when this returns; the name after the next [`sync`](Backend::sync).
    fn create(&self, key: &str, data: &[u8]) -> Result<Created>;

    /// A new, empty batch of creations (see [`Batch`]). Backends without a cheaper way
    /// return a [`BufferedBatch`], which keeps the objects in memory until published.
    fn batch(&self) -> Box<dyn Batch + '_>;

    /// Removes object `key`; `false` when there was none. Durable after the next sync.
    fn delete(&self, key: &str) -> Result<bool>;

    /// Every object whose key starts with `prefix` followed by `/` (or every object for
    /// an empty prefix), in no particular order.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>>;

    /// What is known of `key`, or `None`.
    fn stat(&self, key: &str) -> Result<Option<ObjectInfo>>;

    /// Renews the modification time of `key` to now; `false` when there is no such
    /// object. The object's name, which another process may have created and not yet
    /// synced, is durable after the next [`sync`](Backend::sync) of this backend.
    fn touch(&self, key: &str) -> Result<bool>;

    /// Makes every name created or deleted so far durable.
    fn sync(&self) -> Result<()>;

    /// Takes the lock `name` (a valid key part), or returns `None` when `wait` is
    /// [`LockWait::Fail`] and someone else holds it in a conflicting mode.
    fn lock(
        &self,
        name: &str,
        mode: LockMode,
        wait: LockWait,
    ) -> Result<Option<Box<dyn LockGuard>>>;

    /// Removes the lock `name`'s trace (a lock file), for locks whose names are never
    /// used again; called while holding it. Backends without traces do nothing.
    fn remove_lock(&self, name: &str) -> Result<()> {
        let _ = name;
        Ok(())
    }

    /// Removes what interrupted writes left behind (temporaries) that was last changed
    /// before `before`; returns how many. Backends without such leftovers do nothing.
    fn remove_leftovers(&self, before: SystemTime) -> Result<u64> {
        let _ = before;
        Ok(0)
    }
}

/// Whether `key` is a valid object key: non-empty parts of ASCII letters, digits, `.`,
/// `_`, `-`, separated by `/`, no part starting with `.`, at most 512 bytes.
pub fn valid_key(key: &str) -> bool {
    key.len() <= 512
        && !key.is_empty()
        && key.split('/').all(|part| {
            !part.is_empty()
                && !part.starts_with('.')
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        })
}

#[cfg(test)]
mod tests {
    use super::valid_key;

    #[test]
    fn keys_cannot_leave_the_repository() {
        assert!(valid_key("chunks/ab/abcdef"));
        assert!(valid_key("config"));
        for bad in ["", "/x", "x/", "a//b", "../x", "a/../b", ".hidden", "a b", "a/.b", "é"] {
            assert!(!valid_key(bad), "{bad:?}");
        }
        assert!(!valid_key(&"a".repeat(513)));
    }
}
