//! The `file` driver: a host file, through the qcow2 crate's positional storage.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use qcow2::storage::{FileStorage, Storage};

use super::node::{BlockDriver, BlockStatus, ZeroFlags};

/// A host file as a block node.
pub struct FileDriver {
    storage: Arc<FileStorage>,
    /// The length at open, then as resized (QEMU caches it too).
    len: AtomicU64,
}

impl FileDriver {
    /// The driver over an opened file.
    pub fn new(storage: Arc<FileStorage>) -> io::Result<Self> {
        let len = storage.len()?;
        Ok(FileDriver { storage, len: AtomicU64::new(len) })
    }

    /// The storage, for format drivers that sit on this node.
    pub fn storage(&self) -> Arc<FileStorage> {
        self.storage.clone()
    }
}

impl BlockDriver for FileDriver {
    fn driver_name(&self) -> &'static str {
        "file"
    }

    fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    /// A regular file takes any length, growing (sparse) or shrinking, as QEMU's
    /// `file` driver does; only what `ftruncate` cannot represent is refused.
    fn check_resize(&self, new_len: u64) -> io::Result<()> {
        if new_len > i64::MAX as u64 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "File too large"));
        }
        Ok(())
    }

    fn resize(&self, new_len: u64) -> io::Result<()> {
        self.storage
            .set_len(new_len)
            .map_err(|e| io::Error::new(e.kind(), format!("Failed to resize the file: {e}")))?;
        self.len.store(new_len, Ordering::Release);
        Ok(())
    }

    fn filename(&self) -> Option<PathBuf> {
        Some(self.storage.path().to_path_buf())
    }

    fn storage(&self) -> Option<Arc<dyn Storage>> {
        Some(self.storage.clone())
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.storage.read_at(buf, offset)
    }

    fn write(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.storage.write_at(buf, offset)?;
        if fua { self.storage.flush() } else { Ok(()) }
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        if flags.may_unmap {
            self.storage.discard(offset, len)?;
        } else {
            self.storage.write_zeroes(offset, len)?;
        }
        if flags.fua { self.storage.flush() } else { Ok(()) }
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.storage.discard(offset, len)
    }

    fn flush(&self) -> io::Result<()> {
        self.storage.flush()
    }

    fn block_status(&self, _offset: u64, len: u64) -> io::Result<BlockStatus> {
        Ok(BlockStatus { data: true, zero: false, allocated: true, depth: 1, len })
    }
}
