//! Restoring a disk: the chain up to a backup flattened into one raw or qcow2 image.
//!
//! Sparse: areas that read as zeroes are not written (holes in a raw file, unallocated
//! clusters in a qcow2 image). Every range read is checked against the backup's
//! recorded checksum before the output is put in place. The output is written under a
//! temporary name beside the target and renamed at the end, so a failed restore leaves
//! no partial file; an existing target is replaced only with `force`.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use qcow2::Qcow2Image;

use super::hash;
use super::{Backup, Progress, RepoError, Repository, Result, io_err};

/// The format of a restored image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreFormat {
    /// A raw (sparse) file.
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
    pub at: Option<String>,
    /// The output file.
    pub to: PathBuf,
    /// The output format.
    pub format: RestoreFormat,
    /// Replace an existing output file.
    pub force: bool,
}

/// What a restore did.
#[derive(Debug, Clone)]
pub struct RestoreReport {
    /// The backup restored.
    pub backup: Backup,
    /// The chain read, full backup first (ids).
    pub chain: Vec<String>,
    /// Bytes of data written (zero areas are not written).
    pub bytes_written: u64,
}

enum Output {
    Raw(File),
    Qcow2(Box<Qcow2Image>),
}

impl Output {
    fn write(&self, data: &[u8], off: u64, path: &Path) -> Result<()> {
        match self {
            Output::Raw(f) => f.write_all_at(data, off).map_err(io_err(path, "writing")),
            Output::Qcow2(img) => img
                .write_at(data, off)
                .map_err(|e| RepoError::Image { path: path.to_path_buf(), reason: e.to_string() }),
        }
    }
}

/// Restores backup `opts.at` of `opts.disk` to `opts.to`.
pub fn restore(
    repo: &Repository,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreReport> {
    if !opts.force && fs::symlink_metadata(&opts.to).is_ok() {
        return Err(RepoError::Invalid(format!(
            "{}: the file exists (use --force to replace it)",
            opts.to.display()
        )));
    }
    let chain = repo.chain(&opts.disk, opts.at.as_deref())?;
    let top = chain.last().cloned().ok_or_else(|| RepoError::Invalid("empty chain".into()))?;
    let size = top.manifest.virtual_size;
    let image = Qcow2Image::open_path(&top.image_path, false)
        .map_err(|e| RepoError::Image { path: top.image_path.clone(), reason: e.to_string() })?;

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
    let result = (|| -> Result<u64> {
        let out = match opts.format {
            RestoreFormat::Raw => {
                let f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&tmp)
                    .map_err(io_err(&tmp, "creating"))?;
                f.set_len(size).map_err(io_err(&tmp, "setting the length"))?;
                Output::Raw(f)
            }
            RestoreFormat::Qcow2 => {
                qcow2::create::create_file(&tmp, qcow2::create::CreateOptions::new(size))
                    .map_err(|e| RepoError::Image { path: tmp.clone(), reason: e.to_string() })?;
                Output::Qcow2(Box::new(
                    Qcow2Image::open_path(&tmp, true).map_err(|e| RepoError::Image {
                        path: tmp.clone(),
                        reason: e.to_string(),
                    })?,
                ))
            }
        };
        let mut written = 0u64;
        progress.start("restore", size);
        for r in 0..hash::range_count(size) {
            let leaves =
                hash::hash_image_range(&image, &top.image_path, r, progress, |off, data| {
                    // Only the 64 KiB blocks that hold data are written: the rest stays a hole.
                    for (i, chunk) in data.chunks(hash::LEAF as usize).enumerate() {
                        if !hash::is_zero(chunk) {
                            out.write(chunk, off + i as u64 * hash::LEAF, &tmp)?;
                            written += chunk.len() as u64;
                        }
                    }
                    Ok(())
                })?;
            let computed = hash::hex(&hash::range_hash(&leaves));
            let recorded = &top.manifest.checksums[r as usize];
            if &computed != recorded {
                return Err(RepoError::Checksum {
                    path: first_bad_layer(&chain, r).unwrap_or_else(|| top.image_path.clone()),
                    start: r * hash::RANGE,
                    end: ((r + 1) * hash::RANGE).min(size),
                    recorded: recorded.clone(),
                    computed,
                });
            }
        }
        progress.finish();
        match out {
            Output::Raw(f) => f.sync_all().map_err(io_err(&tmp, "syncing"))?,
            Output::Qcow2(img) => img
                .close()
                .map_err(|e| RepoError::Image { path: tmp.clone(), reason: e.to_string() })?,
        }
        super::fsutil::fsync_file(&tmp)?;
        Ok(written)
    })();
    let written = match result {
        Ok(w) => w,
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
    Ok(RestoreReport {
        chain: chain.iter().map(|b| b.manifest.id.clone()).collect(),
        backup: top,
        bytes_written: written,
    })
}

/// The image of the oldest backup in `chain` whose range `r` no longer matches its own
/// recorded checksum: where the damage is, when a restore through the chain finds a
/// mismatch.
fn first_bad_layer(chain: &[Backup], r: u64) -> Option<PathBuf> {
    for b in chain {
        let image = Qcow2Image::open_path(&b.image_path, false).ok()?;
        let leaves =
            hash::hash_image_range(&image, &b.image_path, r, &super::NoProgress, |_, _| Ok(()))
                .ok()?;
        if hash::hex(&hash::range_hash(&leaves)) != b.manifest.checksums[r as usize] {
            return Some(b.image_path.clone());
        }
    }
    None
}
