//! The `raw` format driver: a window (`offset`, `size`) onto its child node.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::blkdebug::DebugEvent;
use super::node::{BlockDriver, BlockStatus, IoOrigin, Node, ZeroFlags};

/// The raw format over a child node.
pub struct RawDriver {
    child: Arc<Node>,
    offset: u64,
    size: AtomicU64,
    /// `size` was given: the window is fixed and cannot be resized (QEMU's rule).
    fixed_size: bool,
}

impl RawDriver {
    /// A window of `size` bytes at `offset` of `child` (the whole child by default).
    pub fn new(child: Arc<Node>, offset: u64, size: Option<u64>) -> Result<Self, String> {
        let child_len = child.len();
        if offset > child_len {
            return Err(format!(
                "Offset ({offset}) cannot be greater than size of the containing file ({child_len})"
            ));
        }
        let fixed_size = size.is_some();
        let size = match size {
            Some(size) if size % 512 != 0 => {
                return Err("Specified size is not multiple of 512".into());
            }
            Some(size) if offset.checked_add(size).is_none_or(|end| end > child_len) => {
                return Err(format!(
                    "The sum of offset ({offset}) and size ({size}) has to be smaller or equal to the actual size of the containing file ({child_len})"
                ));
            }
            Some(size) => size,
            None => child_len - offset,
        };
        Ok(RawDriver { child, offset, size: AtomicU64::new(size), fixed_size })
    }
}

impl BlockDriver for RawDriver {
    fn driver_name(&self) -> &'static str {
        "raw"
    }

    fn len(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn check_resize(&self, new_len: u64) -> io::Result<()> {
        if self.fixed_size {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "Cannot resize fixed-size raw disks",
            ));
        }
        if self.offset.checked_add(new_len).is_none_or(|end| end > i64::MAX as u64) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "Disk size too large for the chosen offset",
            ));
        }
        Ok(())
    }

    /// Resizes the child to `offset + new_len` (growing or shrinking it, as QEMU does),
    /// through the child node, whose own bitmaps follow.
    fn resize(&self, new_len: u64) -> io::Result<()> {
        self.child.resize_blocking(self.offset + new_len)?;
        self.size.store(new_len, Ordering::Release);
        Ok(())
    }

    fn filename(&self) -> Option<PathBuf> {
        self.child.filename()
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // QEMU's raw driver announces guest data I/O to its child (for blkdebug).
        self.child.debug_event(DebugEvent::READ_AIO);
        self.child.io(IoOrigin::Parent).read(buf, self.offset + offset)
    }

    fn try_read_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        self.child.io(IoOrigin::Parent).try_read_nowait(buf, self.offset + offset)
    }

    fn write(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.child.debug_event(DebugEvent::WRITE_AIO);
        self.child.io(IoOrigin::Parent).write(buf, self.offset + offset, fua)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        self.child.io(IoOrigin::Parent).write_zeroes(self.offset + offset, len, flags)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.child.io(IoOrigin::Parent).discard(self.offset + offset, len)
    }

    fn flush(&self) -> io::Result<()> {
        self.child.io(IoOrigin::Parent).flush()
    }

    fn block_status(&self, offset: u64, len: u64) -> io::Result<BlockStatus> {
        self.child.io(IoOrigin::Parent).block_status(self.offset + offset, len)
    }
}
