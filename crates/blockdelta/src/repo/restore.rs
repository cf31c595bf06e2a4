//! Restoring a disk from the chunk store: chunks read, checked and written in parallel.
//!
//! To a new file (raw or qcow2): written under a temporary name beside the target and
//! renamed at the end, so a failed restore leaves no partial file; zero chunks, and
//! 64 KiB blocks of zeroes inside chunks, stay holes (raw) or unallocated clusters
//! (qcow2). An existing file is replaced only with
//! `force`. To a block device (`/dev/...`): written in place, zero chunks written as
//! zeroes, the device node itself never replaced; it must be at least as large as the
//! disk, and `force` is needed (its contents are overwritten).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use ::repo::restore::{RestoreStats, RestoreTarget, restore as restore_chunks};
use ::repo::{Backup, Progress, Repository};
use qcow2::Qcow2Image;

use super::{RepoError, Result, io_err};

/// The format of a restored image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreFormat {
    /// A raw (sparse) file, or a block device.
    Raw,
    /// A qcow2 image without backing file.
    Qcow2,
}

/// What to restore where.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// The disk.
    pub disk: String,
    /// The backup (the newest when `None`).
    pub at: Option<u64>,
    /// The output file or block device.
    pub to: PathBuf,
    /// The output format.
    pub format: RestoreFormat,
    /// Replace an existing output file, or overwrite a block device.
    pub force: bool,
    /// Chunks read and written at once.
    pub jobs: usize,
}

/// What a restore did.
#[derive(Debug, Clone)]
pub struct RestoreReport {
    /// The backup restored.
    pub backup: Backup,
    /// Chunks written, their bytes, and zero chunks.
    pub stats: RestoreStats,
}

/// A raw file or block device.
struct RawTarget {
    file: File,
    path: PathBuf,
    /// Zero chunks must be written (a device, whose old contents stay otherwise).
    zero_fill: bool,
}

/// Granularity of holes left in a restored file: 64 KiB blocks of zeroes inside a chunk
/// are not written (into a new file, where they read as zeroes anyway).
const HOLE: usize = 64 << 10;

/// Calls `write` for each run of 64 KiB blocks of `data` that are not all zero.
fn write_nonzero_runs(
    data: &[u8],
    offset: u64,
    mut write: impl FnMut(&[u8], u64) -> io::Result<()>,
) -> io::Result<()> {
    let mut run_start = None;
    for (i, block) in data.chunks(HOLE).enumerate() {
        let zero = ::repo::chunk::is_zero(block);
        match (zero, run_start) {
            (false, None) => run_start = Some(i * HOLE),
            (true, Some(start)) => {
                write(&data[start..i * HOLE], offset + start as u64)?;
                run_start = None;
            }
            _ => {}
        }
    }
    match run_start {
        Some(start) => write(&data[start..], offset + start as u64),
        None => Ok(()),
    }
}

impl RestoreTarget for RawTarget {
    fn name(&self) -> String {
        self.path.display().to_string()
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        if self.zero_fill {
            self.file.write_all_at(data, offset)?;
        } else {
            write_nonzero_runs(data, offset, |run, at| self.file.write_all_at(run, at))?;
        }
        super::fsutil::start_writeback(&self.file, offset, data.len() as u64);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        if !self.zero_fill {
            return Ok(());
        }
        let zeroes = vec![0u8; len.min(1 << 20) as usize];
        let mut at = 0;
        while at < len {
            let n = (len - at).min(zeroes.len() as u64) as usize;
            self.file.write_all_at(&zeroes[..n], offset + at)?;
            at += n as u64;
        }
        Ok(())
    }
}

/// A new qcow2 image (reads as zeroes where nothing is written).
struct Qcow2Target {
    image: Qcow2Image,
    path: PathBuf,
}

impl RestoreTarget for Qcow2Target {
    fn name(&self) -> String {
        self.path.display().to_string()
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        write_nonzero_runs(data, offset, |run, at| {
            self.image.write_at(run, at).map_err(|e| io::Error::other(e.to_string()))
        })
    }
    fn write_zeroes(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
}

fn is_block_device(path: &Path) -> bool {
    fs::metadata(path).map(|m| m.file_type().is_block_device()).unwrap_or(false)
}

/// Restores backup `opts.at` of `opts.disk` to `opts.to`.
pub fn restore(
    repo: &Repository,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreReport> {
    let backup = repo.backup(&opts.disk, opts.at)?;
    if is_block_device(&opts.to) {
        return restore_to_device(repo, backup, opts, progress);
    }
    if !opts.force && fs::symlink_metadata(&opts.to).is_ok() {
        return Err(RepoError::Invalid(format!(
            "{}: the file exists (use --force to replace it)",
            opts.to.display()
        )));
    }
    let index = repo.read_index(&backup)?;
    let size = index.meta.size;
    let dir = match opts.to.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = opts
        .to
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| RepoError::Invalid(format!("{}: not a file name", opts.to.display())))?;
    let tmp = dir.join(format!(".{name}.blockdelta-restore"));
    let _ = fs::remove_file(&tmp);
    let image_err = |path: &Path| {
        let path = path.to_path_buf();
        move |e: qcow2::Qcow2Error| RepoError::Image { path, reason: e.to_string() }
    };
    let result = (|| -> Result<RestoreStats> {
        match opts.format {
            RestoreFormat::Raw => {
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&tmp)
                    .map_err(io_err(&tmp, "creating"))?;
                file.set_len(size).map_err(io_err(&tmp, "setting the length"))?;
                let target = RawTarget { file, path: tmp.clone(), zero_fill: false };
                let stats = restore_chunks(repo, &index, &target, opts.jobs, progress)?;
                target.file.sync_all().map_err(io_err(&tmp, "syncing"))?;
                Ok(stats)
            }
            RestoreFormat::Qcow2 => {
                qcow2::create::create_file(&tmp, qcow2::create::CreateOptions::new(size))
                    .map_err(image_err(&tmp))?;
                let image = Qcow2Image::open_path(&tmp, true).map_err(image_err(&tmp))?;
                let target = Qcow2Target { image, path: tmp.clone() };
                let stats = restore_chunks(repo, &index, &target, opts.jobs, progress)?;
                target.image.close().map_err(image_err(&tmp))?;
                super::fsutil::fsync_file(&tmp)?;
                Ok(stats)
            }
        }
    })();
    let stats = match result {
        Ok(s) => s,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    if let Err(e) = super::fsutil::rename(&tmp, &opts.to) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    super::fsutil::fsync_dir(&dir)?;
    Ok(RestoreReport { backup, stats })
}

fn restore_to_device(
    repo: &Repository,
    backup: Backup,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreReport> {
    let to = &opts.to;
    if opts.format != RestoreFormat::Raw {
        return Err(RepoError::Invalid(format!(
            "{}: a block device takes the raw format",
            to.display()
        )));
    }
    if !opts.force {
        return Err(RepoError::Invalid(format!(
            "{}: a block device: its contents would be overwritten (use --force)",
            to.display()
        )));
    }
    let file = OpenOptions::new().write(true).open(to).map_err(io_err(to, "opening"))?;
    let device_size = {
        use std::io::Seek;
        let mut f = &file;
        f.seek(io::SeekFrom::End(0)).map_err(io_err(to, "sizing"))?
    };
    if device_size < backup.meta.size {
        return Err(RepoError::Invalid(format!(
            "{}: the device has {device_size} bytes, the disk {}",
            to.display(),
            backup.meta.size
        )));
    }
    let index = repo.read_index(&backup)?;
    let target = RawTarget { file, path: to.clone(), zero_fill: true };
    let stats = restore_chunks(repo, &index, &target, opts.jobs, progress)?;
    target.file.sync_all().map_err(io_err(to, "syncing"))?;
    Ok(RestoreReport { backup, stats })
}
