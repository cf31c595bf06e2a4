//! Backups into the chunk store (`crates/repo`, format and protocols in
//! `docs/REPOSITORY.md`) from a disk that a daemon serves:
//!
//! - [`pull`]: read an NBD export and its dirty bitmap (libvirt's and virtnbdbackup's
//!   model);
//! - [`push`]: have a daemon's `blockdev-backup` job copy the disk at one instant, over
//!   QMP (the `qmp-client` crate), then take its image in ([`image_ingest`]);
//! - [`restore`]: a backup written to a new image or a block device.

pub mod fsutil;
pub mod image_ingest;
pub mod pull;
pub mod push;
pub mod restore;

use std::io;
use std::path::{Path, PathBuf};

pub use ::repo::{Backup, NoProgress, Progress, Repository};

/// A backup client's failure. Every variant names what it concerns.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RepoError {
    /// The chunk store failed or refused.
    #[error(transparent)]
    Store(#[from] ::repo::Error),
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
    /// An image (a push backup's scratch image, a restore's output) failed.
    #[error("{}: {reason}", path.display())]
    Image {
        /// The image.
        path: PathBuf,
        /// What is wrong.
        reason: String,
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
    /// The NBD source (or the daemon's QMP monitor) failed.
    #[error("{source_uri}: {reason}")]
    Source {
        /// The NBD URI, or `QMP`.
        source_uri: String,
        /// What went wrong.
        reason: String,
    },
}

/// A backup client's result.
pub type Result<T> = std::result::Result<T, RepoError>;

/// `disk` if it can name a disk in the repository, else the error saying how to name it.
pub(crate) fn checked_disk(disk: String) -> Result<String> {
    if ::repo::valid_disk_name(&disk) {
        return Ok(disk);
    }
    Err(RepoError::Invalid(format!(
        "invalid disk name '{disk}' (letters, digits, '.', '_', '-'; give --disk)"
    )))
}

pub(crate) fn io_err(path: &Path, action: &'static str) -> impl FnOnce(io::Error) -> RepoError {
    let path = path.to_path_buf();
    move |error| RepoError::Io { path, action, error }
}
