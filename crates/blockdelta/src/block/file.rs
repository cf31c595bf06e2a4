//! The `file` driver: a host file, through the qcow2 crate's positional storage.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use qcow2::storage::{FileStorage, Storage};

use super::node::{BlockDriver, BlockStatus, ZeroFlags};

/// How a file node knows its length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileLength {
    /// Kept in memory and updated by this node's writes and resizes: right for a
    /// writable node, which holds the image's write lock, so no other program writes
    /// the file. Saves an `fstat` per request.
    Tracked,
    /// Measured (`fstat`) at every call: a read-only node may share the file with a
    /// writer (`force-share`) that grows it.
    Measured,
}

/// A host file as a block node. Writes from a format driver above may reach past the
/// end and grow the file.
pub struct FileDriver {
    storage: Arc<FileStorage>,
    length: FileLength,
    /// The length, when tracked.
    len: AtomicU64,
}

impl FileDriver {
    /// The driver over an opened file.
    pub fn new(storage: Arc<FileStorage>, length: FileLength) -> io::Result<Self> {
        let len = AtomicU64::new(storage.len()?);
        Ok(FileDriver { storage, length, len })
    }

    /// After a failed write: the file may have grown partly.
    fn remeasure(&self) {
        if self.length == FileLength::Tracked
            && let Ok(len) = self.storage.len()
        {
            self.len.store(len, Ordering::Release);
        }
    }

    /// After a write or write-zeroes that ended at `end`.
    fn wrote_to(&self, end: u64) {
        if self.length == FileLength::Tracked {
            self.len.fetch_max(end, Ordering::AcqRel);
        }
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
        match self.length {
            FileLength::Tracked => self.len.load(Ordering::Acquire),
            // An fstat; a file that cannot be measured reads as empty, which refuses I/O.
            FileLength::Measured => self.storage.len().unwrap_or(0),
        }
    }

    fn growable(&self) -> bool {
        true
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
        let result = self
            .storage
            .set_len(new_len)
            .map_err(|e| io::Error::new(e.kind(), format!("Failed to resize the file: {e}")));
        // Whatever happened, the file's length is what it now measures.
        if let Ok(len) = self.storage.len() {
            self.len.store(len, Ordering::Release);
        }
        result
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
        let result = self.storage.write_at(buf, offset);
        // Even a failed write may have grown the file partly; measure then.
        match &result {
            Ok(()) => self.wrote_to(offset + buf.len() as u64),
            Err(_) => self.remeasure(),
        }
        result?;
        if fua { self.storage.flush() } else { Ok(()) }
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        if flags.may_unmap && offset + len <= self.len() {
            self.storage.discard(offset, len)?;
        } else {
            let result = self.storage.write_zeroes(offset, len);
            match &result {
                Ok(()) => self.wrote_to(offset + len),
                Err(_) => self.remeasure(),
            }
            result?;
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
