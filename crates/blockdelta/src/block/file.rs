//! The `file` driver: a host file, through the qcow2 crate's positional storage.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use qcow2::storage::{FileStorage, Storage};

use super::node::{BlockDriver, BlockStatus, ZeroFlags};

/// A host file as a block node. Its length is the file's current length: a format
/// driver above it grows the file.
pub struct FileDriver {
    storage: Arc<FileStorage>,
}

impl FileDriver {
    /// The driver over an opened file.
    pub fn new(storage: Arc<FileStorage>) -> io::Result<Self> {
        storage.len()?;
        Ok(FileDriver { storage })
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
        // An fstat; a file that cannot be measured reads as empty, which refuses I/O.
        self.storage.len().unwrap_or(0)
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
            .map_err(|e| io::Error::new(e.kind(), format!("Failed to resize the file: {e}")))
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

    fn try_read_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        self.storage.read_at_nowait(buf, offset)
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

    /// Holes of the host file read as zeroes and hold no data, as QEMU's file driver
    /// reports them.
    fn block_status(&self, offset: u64, len: u64) -> io::Result<BlockStatus> {
        let (data, run) = self.storage.data_run(offset)?;
        Ok(BlockStatus { data, zero: !data, allocated: true, depth: 1, len: run.min(len) })
    }
}
