//! Durable file operations: every change to the repository is made under a temporary
//! name, fsynced, renamed into place, and the directory fsynced, so that a crash leaves
//! either the old state or the new one.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::{RepoError, Result, io_err};

/// Prefix of temporary files in a disk directory.
pub const TMP_PREFIX: &str = ".tmp-";

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

/// Writes `bytes` to `path` atomically: a temporary in the same directory, fsync,
/// rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!("{TMP_PREFIX}{name}"));
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_err(&tmp, "creating"))?;
        f.write_all(bytes).map_err(io_err(&tmp, "writing"))?;
        f.sync_all().map_err(io_err(&tmp, "syncing"))?;
    }
    rename(&tmp, path)?;
    fsync_dir(dir)
}

/// An exclusive lock on a disk directory (`.lock`, `flock`), held while a backup
/// writes there; the kernel drops it when the process dies.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock of `dir`, or fails at once naming it when another process holds it.
    pub fn acquire(dir: &Path) -> Result<DirLock> {
        let path = dir.join(".lock");
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err(&path, "opening the lock file"))?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
            |_| {
                RepoError::Invalid(format!(
                    "{}: another backup of this disk is running",
                    path.display()
                ))
            },
        )?;
        Ok(DirLock { _file: file })
    }
}

/// Removes what an interrupted backup left in `dir`: temporaries, and image or checksum
/// files of backups that have no manifest (the manifest is renamed into place last, so
/// such files were never part of a backup). Returns what was removed.
pub fn remove_leftovers(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir, "listing"))? {
        let entry = entry.map_err(io_err(dir, "listing"))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale = if name.starts_with(TMP_PREFIX) {
            true
        } else if let Some(id) = name.strip_suffix(".qcow2").or_else(|| name.strip_suffix(".sums"))
        {
            !dir.join(super::manifest_name(id)).exists()
        } else {
            false
        };
        if stale {
            let p = entry.path();
            fs::remove_file(&p)
                .map_err(io_err(&p, "removing a leftover of an interrupted backup"))?;
            removed.push(p);
        }
    }
    if !removed.is_empty() {
        fsync_dir(dir)?;
    }
    Ok(removed)
}
