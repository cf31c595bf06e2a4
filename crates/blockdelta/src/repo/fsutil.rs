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

/// Renames `from` to `to` (same directory).
pub fn rename(from: &Path, to: &Path) -> Result<()> {
    fs::rename(from, to).map_err(io_err(to, "renaming into place"))
}
