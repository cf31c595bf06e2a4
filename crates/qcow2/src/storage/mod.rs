//! Positional storage under an image: a file, or memory.

use std::io;
use std::sync::Arc;

mod file;
mod lock;
mod memory;

pub use file::{FileOptions, FileStorage};
pub use lock::{
    ConflictKind, LockConflict, Locking, PERM_LOCK_BASE, Permission, Permissions, SHARED_LOCK_BASE,
};
pub use memory::{Entry, History, MemStorage, Op, SECTOR_SIZE, Survivors};

/// Positional I/O on the bytes under an image. Implementations are shared between
/// threads; each call is independent (no cursor).
///
/// Reads past the end of the storage return zeroes for the part past the end, as a
/// file's holes do; callers that must not read there check [`len`](Storage::len).
pub trait Storage: Send + Sync {
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Reads `buf.len()` bytes at `offset` only if that cannot block on the device (the
    /// bytes are in the page cache); `Ok(false)` when it would block, or when the
    /// storage cannot tell, and then `buf` holds garbage. Lets async callers serve
    /// cached reads without handing them to another thread.
    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        let _ = (buf, offset);
        Ok(false)
    }

    /// Writes all of `buf` at `offset`, growing the storage if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Makes everything written so far durable (`fdatasync` for a file).
    fn flush(&self) -> io::Result<()>;

    /// Deallocates `[offset, offset + len)` (punch a hole); the range then reads as
    /// zeroes. The length of the storage does not change.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Makes `[offset, offset + len)` read as zeroes, allocating it where that is
    /// cheaper than writing; grows the storage if the range reaches past the end.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()>;

    /// The current length in bytes.
    fn len(&self) -> io::Result<u64>;

    /// Whether the storage is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Truncates or extends (with zeroes) to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;

    /// Drops any image locks held (the storage is being closed; other programs may open
    /// the file at once, even while this handle lives on a little longer).
    fn release_locks(&self) -> io::Result<()> {
        Ok(())
    }
}

/// Forwards every method, so that shared (`Arc<MemStorage>`: a crash test keeps a handle
/// while an image owns the storage), boxed (`Box<dyn Storage>`) and borrowed storage can
/// be used wherever a `Storage` is expected.
macro_rules! forward_storage {
    ($($ty:ty),*) => {$(
        impl<S: Storage + ?Sized> Storage for $ty {
            fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
                (**self).read_at(buf, offset)
            }

            fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
                (**self).read_at_nowait(buf, offset)
            }

            fn release_locks(&self) -> io::Result<()> {
                (**self).release_locks()
            }

            fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
                (**self).write_at(buf, offset)
            }

            fn flush(&self) -> io::Result<()> {
                (**self).flush()
            }

            fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
                (**self).discard(offset, len)
            }

            fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
                (**self).write_zeroes(offset, len)
            }

            fn len(&self) -> io::Result<u64> {
                (**self).len()
            }

            fn is_empty(&self) -> io::Result<bool> {
                (**self).is_empty()
            }

            fn set_len(&self, len: u64) -> io::Result<()> {
                (**self).set_len(len)
            }
        }
    )*};
}

forward_storage!(&S, Box<S>, Arc<S>);
