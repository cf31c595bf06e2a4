//! Durable file operations for what the client writes outside the chunk store (a
//! restored image): a temporary name, fsync, rename into place, fsync of the directory.

use std::fs::{self, File};
use std::path::Path;

use super::{Result, io_err};

/// fsyncs a directory, making the renames and creations in it durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    let d = File::open(dir).map_err(io_err(dir, "opening the directory to sync it"))?;
    d.sync_all().map_err(io_err(dir, "syncing the directory"))
}

/// fsyncs a file.
pub fn fsync_file(path: &Path) -> Result<()> {
    let f = File::open(path).map_err(io_err(path, "opening the file to sync it"))?;
    f.sync_all().map_err(io_err(path, "syncing the file"))
}

/// Starts writing `len` bytes of `file` at `offset` back to the disk without waiting:
/// a restore's final fsync then finds most of it written, instead of writing the whole
/// image only at the end. A hint: its failure changes nothing.
pub fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else { return };
    // SAFETY: sync_file_range reads only its integer arguments and acts on the open
    // descriptor that `file` owns for the duration of the call.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Renames `from` to `to` (same directory).
pub fn rename(from: &Path, to: &Path) -> Result<()> {
    fs::rename(from, to).map_err(io_err(to, "renaming into place"))
}
