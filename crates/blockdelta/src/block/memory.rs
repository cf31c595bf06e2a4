//! A protocol driver over any [`Storage`]: with [`qcow2::storage::MemStorage`] it
//! gives a node whose every write and flush is recorded, so that tests can cut the
//! power at any point of a workload that runs through the whole graph (format driver,
//! bitmaps, write-intent marks). Not reachable from `--blockdev`.

use std::io;
use std::sync::Arc;

use qcow2::storage::Storage;

use super::node::{BlockDriver, BlockStatus, ZeroFlags};

/// A storage as a growable block node, like `file` over a host file.
pub struct StorageDriver {
    storage: Arc<dyn Storage>,
}

impl StorageDriver {
    /// The driver over `storage`.
    pub fn new(storage: Arc<dyn Storage>) -> Self {
        StorageDriver { storage }
    }
}

impl BlockDriver for StorageDriver {
    fn driver_name(&self) -> &'static str {
        "file"
    }

    fn len(&self) -> u64 {
        // A storage that cannot be measured reads as empty, which refuses I/O.
        self.storage.len().unwrap_or(0)
    }

    fn growable(&self) -> bool {
        true
    }

    fn check_resize(&self, _new_len: u64) -> io::Result<()> {
        Ok(())
    }

    fn resize(&self, new_len: u64) -> io::Result<()> {
        self.storage.set_len(new_len)
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
        self.storage.write_zeroes(offset, len)?;
        if flags.fua { self.storage.flush() } else { Ok(()) }
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.storage.discard(offset, len)
    }

    fn flush(&self) -> io::Result<()> {
        self.storage.flush()
    }

    fn block_status(&self, offset: u64, len: u64) -> io::Result<BlockStatus> {
        let _ = offset;
        Ok(BlockStatus { data: true, zero: false, allocated: true, depth: 1, len })
    }
}
