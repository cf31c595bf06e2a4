//! A backup repository on disk: one directory per disk, one chain of qcow2 images per
//! disk, and a JSON manifest per backup.
//!
//! Layout of `ROOT/DISK/`:
//!
//! - `NNNN.qcow2`: the backup image; an incremental's backing file is its parent's image
//!   (a relative name in the header, as `qemu-img create -b` writes it);
//! - `NNNN.sums`: the SHA-256 of every 64 KiB block of the disk at the backup's point
//!   in time (32 bytes each, in order), from which the range checksums are built and
//!   which lets an incremental hash only the blocks it copied;
//! - `NNNN.json`: the [`Manifest`]. Its presence makes the backup exist: it is written
//!   last, under a temporary name, fsynced and renamed (see [`fsutil`]);
//! - `.tmp-*`: temporaries of a backup in progress or interrupted; `.lock`: the lock a
//!   backup holds.
//!
//! Everything that reads the repository ([`Repository::backups`], [`Repository::chain`],
//! [`verify`](verify::verify), [`restore`](restore::restore)) only looks at backups with a
//! manifest, and never changes anything.

pub mod fsutil;
pub mod hash;
pub mod manifest;
pub mod pull;
pub mod push;
pub mod qmp_client;
pub mod restore;
pub mod verify;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

pub use manifest::{BackupKind, Manifest};

/// A repository failure. Every variant names the file or directory concerned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RepoError {
    /// A file operation failed.
    // The OS error is part of the text and deliberately not a `#[source]`: printers
    // of error chains would say it twice.
    #[error("{}: {action}: {error}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// The OS error.
        error: io::Error,
    },
    /// A manifest is unreadable or inconsistent.
    #[error("{}: corrupted manifest: {reason}", path.display())]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A backup image is missing, unreadable or does not match its manifest.
    #[error("{}: {reason}", path.display())]
    Image {
        /// The image (or checksum) file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Recorded and recomputed checksums differ.
    #[error("{}: checksum mismatch in bytes {start}..{end} (recorded {recorded}, computed {computed})", path.display())]
    Checksum {
        /// The image whose chain was read.
        path: PathBuf,
        /// First byte of the range.
        start: u64,
        /// End of the range.
        end: u64,
        /// The checksum in the manifest.
        recorded: String,
        /// The checksum of the data.
        computed: String,
    },
    /// The request cannot be carried out as given (unknown disk or backup, bad name,
    /// no parent for an incremental, ...).
    #[error("{0}")]
    Invalid(String),
    /// A push incremental cannot run because the node's dirty bitmap no longer holds
    /// every write since the newest backup (it is inconsistent after the daemon stopped
    /// without saving it, or recovery could not restore it). Nothing was changed; a
    /// full backup starts tracking anew.
    #[error(
        "change tracking was lost: {reason}. An incremental backup cannot know what changed \
         since the last backup: take a full backup (--full), which starts the bitmap anew"
    )]
    TrackingLost {
        /// The daemon's node.
        node: String,
        /// The dirty bitmap.
        bitmap: String,
        /// Why the bitmap cannot be used.
        reason: String,
    },
    /// The NBD source failed.
    #[error("{source_uri}: {reason}")]
    Source {
        /// The NBD URI.
        source_uri: String,
        /// What went wrong.
        reason: String,
    },
}

/// A repository result.
pub type Result<T> = std::result::Result<T, RepoError>;

pub(crate) fn io_err(path: &Path, action: &'static str) -> impl FnOnce(io::Error) -> RepoError {
    let path = path.to_path_buf();
    move |error| RepoError::Io { path, action, error }
}

/// Receives progress reports (bytes done out of a total). The default methods do
/// nothing, so callers that do not show progress pass [`NoProgress`].
pub trait Progress: Sync {
    /// A phase begins, with `total` bytes to do; called again with the same phase when
    /// the total grows (a backup learns its extents one window at a time), which keeps
    /// the bytes done so far.
    fn start(&self, phase: &str, total: u64) {
        let _ = (phase, total);
    }
    /// `bytes` more are done.
    fn advance(&self, bytes: u64) {
        let _ = bytes;
    }
    /// The phase is over.
    fn finish(&self) {}
}

/// A [`Progress`] that ignores everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;
impl Progress for NoProgress {}

/// One backup of a disk: its manifest and where its files are.
#[derive(Debug, Clone)]
pub struct Backup {
    /// The manifest.
    pub manifest: Manifest,
    /// The manifest file.
    pub manifest_path: PathBuf,
    /// The image file.
    pub image_path: PathBuf,
    /// The block checksum file.
    pub sums_path: PathBuf,
}

/// Whether `name` can name a disk or a backup: ASCII letters, digits, `.`, `_`, `-`,
/// not starting with `.`, at most 64 bytes (it becomes a file name).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A backup repository rooted at a directory.
#[derive(Debug, Clone)]
pub struct Repository {
    root: PathBuf,
}

/// The file names of backup `id`.
pub(crate) fn image_name(id: &str) -> String {
    format!("{id}.qcow2")
}
pub(crate) fn sums_name(id: &str) -> String {
    format!("{id}.sums")
}
pub(crate) fn manifest_name(id: &str) -> String {
    format!("{id}.json")
}

/// What a new backup's manifest records besides its files (which [`commit_backup`]
/// fills in).
pub(crate) struct NewBackup {
    pub(crate) id: String,
    pub(crate) disk: String,
    pub(crate) kind: manifest::BackupKind,
    pub(crate) time: String,
    pub(crate) time_unix: u64,
    pub(crate) source: String,
    pub(crate) bitmap: Option<String>,
    pub(crate) parent: Option<String>,
    pub(crate) virtual_size: u64,
    pub(crate) bytes_read: u64,
    pub(crate) bytes_copied: u64,
    pub(crate) checksums: Vec<String>,
}

/// Makes a backup exist: the synced image and block checksums (under temporary names
/// in `dir`) take their names, the directory is synced, and the manifest is written
/// atomically, last. A crash before the manifest's rename leaves files that no manifest
/// names, which the next backup removes and everything else ignores.
pub(crate) fn commit_backup(
    dir: &Path,
    image_tmp: &Path,
    sums_tmp: &Path,
    new: NewBackup,
) -> Result<Backup> {
    let sums_bytes = fs::read(sums_tmp).map_err(io_err(sums_tmp, "reading"))?;
    let sums_sha256 = hash::hex(&hash::sha256(&sums_bytes));
    drop(sums_bytes);
    let image_path = dir.join(image_name(&new.id));
    let sums_path = dir.join(sums_name(&new.id));
    fsutil::rename(image_tmp, &image_path)?;
    fsutil::rename(sums_tmp, &sums_path)?;
    fsutil::fsync_dir(dir)?;
    let image_bytes = fs::metadata(&image_path).map_err(io_err(&image_path, "stat"))?.len();
    let manifest = manifest::Manifest {
        format: manifest::FORMAT,
        image: image_name(&new.id),
        sums: sums_name(&new.id),
        id: new.id,
        disk: new.disk,
        kind: new.kind,
        time: new.time,
        time_unix: new.time_unix,
        source: new.source,
        bitmap: new.bitmap,
        parent: new.parent,
        virtual_size: new.virtual_size,
        bytes_read: new.bytes_read,
        bytes_copied: new.bytes_copied,
        image_bytes,
        sums_sha256,
        checksum_algorithm: manifest::ALGORITHM.to_owned(),
        checksum_range: hash::RANGE,
        checksums: new.checksums,
    };
    let manifest_path = dir.join(manifest_name(&manifest.id));
    fsutil::write_atomic(&manifest_path, manifest.to_json().as_bytes())?;
    Ok(Backup { manifest, manifest_path, image_path, sums_path })
}

impl Repository {
    /// Opens an existing repository.
    pub fn open(root: &Path) -> Result<Repository> {
        let meta = fs::metadata(root).map_err(io_err(root, "opening the repository"))?;
        if !meta.is_dir() {
            return Err(RepoError::Invalid(format!(
                "{}: the repository is not a directory",
                root.display()
            )));
        }
        Ok(Repository { root: root.to_path_buf() })
    }

    /// Opens the repository, creating its directory (and parents) if needed.
    pub fn open_or_create(root: &Path) -> Result<Repository> {
        if !root.exists() {
            fs::create_dir_all(root).map_err(io_err(root, "creating the repository"))?;
            // A relative one-component path has the empty path as parent: that is ".".
            let parent = root.parent().filter(|p| !p.as_os_str().is_empty());
            fsutil::fsync_dir(parent.unwrap_or(Path::new(".")))?;
        }
        Repository::open(root)
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of `disk`.
    pub fn disk_dir(&self, disk: &str) -> PathBuf {
        self.root.join(disk)
    }

    /// The disks, by name (directories with a valid name), sorted.
    pub fn disks(&self) -> Result<Vec<String>> {
        let mut v = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(io_err(&self.root, "listing"))? {
            let entry = entry.map_err(io_err(&self.root, "listing"))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if valid_name(&name) && entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                v.push(name);
            }
        }
        v.sort();
        Ok(v)
    }

    /// Every backup of `disk` that has a manifest, in id order. A manifest that cannot
    /// be read or does not match its name is an error naming it.
    pub fn backups(&self, disk: &str) -> Result<Vec<Backup>> {
        let (ok, mut errors) = self.scan(disk)?;
        if !errors.is_empty() {
            return Err(errors.swap_remove(0));
        }
        Ok(ok)
    }

    /// Like [`backups`](Repository::backups), but returns the unreadable manifests as
    /// errors beside the readable backups (for `verify`, which reports them all).
    pub fn scan(&self, disk: &str) -> Result<(Vec<Backup>, Vec<RepoError>)> {
        if !valid_name(disk) {
            return Err(RepoError::Invalid(format!("invalid disk name '{disk}'")));
        }
        let dir = self.disk_dir(disk);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(RepoError::Invalid(format!(
                    "{}: no disk '{disk}' in the repository",
                    dir.display()
                )));
            }
            Err(e) => return Err(io_err(&dir, "listing")(e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err(&dir, "listing"))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".json")
                && valid_name(id)
            {
                names.push(id.to_owned());
            }
        }
        names.sort();
        let mut ok = Vec::new();
        let mut errors = Vec::new();
        for id in names {
            let manifest_path = dir.join(manifest_name(&id));
            match Manifest::load(&manifest_path, disk, &id) {
                Ok(manifest) => ok.push(Backup {
                    image_path: dir.join(&manifest.image),
                    sums_path: dir.join(&manifest.sums),
                    manifest,
                    manifest_path,
                }),
                Err(e) => errors.push(e),
            }
        }
        Ok((ok, errors))
    }

    /// The chain of `disk` ending at backup `at` (the newest backup when `None`), full
    /// backup first. Each link is checked cheaply ([`check_backup_files`]).
    pub fn chain(&self, disk: &str, at: Option<&str>) -> Result<Vec<Backup>> {
        let backups = self.backups(disk)?;
        let dir = self.disk_dir(disk);
        let top = match at {
            Some(id) => backups.iter().find(|b| b.manifest.id == id).ok_or_else(|| {
                RepoError::Invalid(format!("{}: no backup '{id}' of disk '{disk}'", dir.display()))
            })?,
            None => backups.last().ok_or_else(|| {
                RepoError::Invalid(format!("{}: disk '{disk}' has no backups", dir.display()))
            })?,
        };
        chain_of(&backups, top)
    }
}

/// Follows parent links from `top` down to a full backup; returns the chain full
/// backup first, each link checked with [`check_backup_files`].
pub fn chain_of(backups: &[Backup], top: &Backup) -> Result<Vec<Backup>> {
    let mut chain = vec![top.clone()];
    loop {
        let child = chain.last().cloned().unwrap_or_else(|| top.clone());
        check_backup_files(&child)?;
        let Some(parent_id) = &child.manifest.parent else { break };
        if chain.len() > backups.len() {
            return Err(RepoError::Manifest {
                path: child.manifest_path.clone(),
                reason: "the parent links loop".into(),
            });
        }
        let parent = backups.iter().find(|b| &b.manifest.id == parent_id).ok_or_else(|| {
            RepoError::Manifest {
                path: child.manifest_path.clone(),
                reason: format!("parent backup '{parent_id}' is missing (no manifest)"),
            }
        })?;
        if parent.manifest.virtual_size != child.manifest.virtual_size {
            return Err(RepoError::Manifest {
                path: child.manifest_path.clone(),
                reason: format!(
                    "virtual size {} differs from parent '{parent_id}' ({})",
                    child.manifest.virtual_size, parent.manifest.virtual_size
                ),
            });
        }
        chain.push(parent.clone());
    }
    chain.reverse();
    Ok(chain)
}

/// The cheap checks of one backup's files against its manifest: the image exists with
/// the recorded length, its header has the recorded virtual size and names the parent's
/// image as backing file, and the checksum file has the right length.
pub fn check_backup_files(b: &Backup) -> Result<()> {
    let m = &b.manifest;
    let img = &b.image_path;
    let len = fs::metadata(img)
        .map_err(|e| RepoError::Image { path: img.clone(), reason: format!("backup image: {e}") })?
        .len();
    if len != m.image_bytes {
        return Err(RepoError::Image {
            path: img.clone(),
            reason: format!(
                "image is {len} bytes, the manifest records {} (truncated or changed)",
                m.image_bytes
            ),
        });
    }
    let storage = qcow2::storage::FileOptions::new()
        .locking(qcow2::storage::Locking::ForceShare)
        .open(img)
        .map_err(|e| RepoError::Image { path: img.clone(), reason: e.to_string() })?;
    let header = qcow2::image::read_header(&storage, len)
        .map_err(|e| RepoError::Image { path: img.clone(), reason: e.to_string() })?;
    if header.size != m.virtual_size {
        return Err(RepoError::Image {
            path: img.clone(),
            reason: format!(
                "virtual size {} differs from the manifest's {}",
                header.size, m.virtual_size
            ),
        });
    }
    let backing = header.backing_file.as_deref().map(|b| String::from_utf8_lossy(b).into_owned());
    let want = m.parent.as_deref().map(image_name);
    if backing != want {
        return Err(RepoError::Image {
            path: img.clone(),
            reason: format!(
                "backing file {} but the manifest's parent is {}",
                backing.as_deref().unwrap_or("(none)"),
                want.as_deref().unwrap_or("(none)")
            ),
        });
    }
    let sums_len = fs::metadata(&b.sums_path)
        .map_err(|e| RepoError::Image {
            path: b.sums_path.clone(),
            reason: format!("checksum file: {e}"),
        })?
        .len();
    if sums_len != hash::sums_len(m.virtual_size) {
        return Err(RepoError::Image {
            path: b.sums_path.clone(),
            reason: format!(
                "checksum file is {sums_len} bytes, expected {}",
                hash::sums_len(m.virtual_size)
            ),
        });
    }
    Ok(())
}
