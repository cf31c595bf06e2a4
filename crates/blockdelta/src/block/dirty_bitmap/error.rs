//! Errors of the dirty-bitmap manager, with QEMU's exact texts.

use super::BitmapId;

/// Why a dirty-bitmap operation was refused. Where QEMU has a message for the same
/// condition, `Display` gives exactly QEMU's text (QMP class `GenericError`), so the QMP
/// layer can pass it on unchanged. The bitmaps are unchanged whenever one is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BitmapError {
    /// The bitmap is in use by a backup, an export, or a pending transaction.
    #[error("Bitmap '{0}' is currently in use by another operation and cannot be used")]
    Busy(String),
    /// The bitmap was loaded from a read-only node.
    #[error("Bitmap '{0}' is readonly and cannot be modified")]
    Readonly(String),
    /// The bitmap was found in use on disk at load: its bits are unknown.
    #[error("Bitmap '{0}' is inconsistent and cannot be used")]
    Inconsistent(String),
    /// No bitmap of that name on the node.
    #[error("Dirty bitmap '{0}' not found")]
    NotFound(String),
    /// No node of that name (for merge sources on other nodes).
    #[error("Node '{0}' not found")]
    NodeNotFound(String),
    /// `block-dirty-bitmap-add` with an empty name.
    #[error("Bitmap name cannot be empty")]
    EmptyName,
    /// Granularity not a power of two, or below 512 bytes.
    #[error("Granularity must be power of 2 and at least 512")]
    InvalidGranularity {
        /// The rejected granularity in bytes.
        granularity: u64,
    },
    /// A bitmap of that name exists on the node already.
    #[error("Bitmap already exists: {0}")]
    AlreadyExists(String),
    /// Names are at most [`MAX_NAME_LEN`](super::MAX_NAME_LEN) bytes.
    #[error("Bitmap name too long: {0}")]
    NameTooLong(String),
    /// `x-crash-safe` / `x-intent-granularity` cannot be honoured.
    #[error("{reason}")]
    InvalidIntent {
        /// Why.
        reason: String,
    },
    /// The node's driver cannot store bitmaps (not qcow2).
    #[error("Can't store persistent bitmaps to {node}: Operation not supported")]
    PersistenceUnsupported {
        /// The node's name.
        node: String,
    },
    /// The node's driver refused to make this bitmap persistent.
    #[error("Can't make bitmap '{name}' persistent in '{node}': {reason}")]
    CannotMakePersistent {
        /// The bitmap's name.
        name: String,
        /// The node's name.
        node: String,
        /// The driver's reason, e.g. `Cannot store dirty bitmaps in qcow2 v2 files`.
        reason: String,
    },
    /// Merge of bitmaps covering different lengths.
    #[error(
        "Bitmaps are of different sizes (destination size is {dest}, source size is {src}) and can't be merged"
    )]
    SizeMismatch {
        /// Destination length in bytes.
        dest: u64,
        /// Source length in bytes.
        src: u64,
    },
    /// `create_successor` on a bitmap that has one.
    #[error("Cannot create a successor for a bitmap that already has one")]
    HasSuccessor,
    /// `abdicate` without a successor.
    #[error("Cannot relinquish control if there's no successor present")]
    NoSuccessorToAbdicate,
    /// `reclaim` without a successor.
    #[error("Cannot reclaim a successor when none is present")]
    NoSuccessorToReclaim,
    /// Removing a persistent bitmap from the image failed.
    #[error("Failed to update bitmap extension: {reason}")]
    StoreUpdate {
        /// What went wrong in the image.
        reason: String,
    },
    /// Storing the persistent bitmaps failed.
    #[error("Lost persistent bitmaps during inactivation of node '{node}': {reason}")]
    Store {
        /// The node.
        node: String,
        /// Why.
        reason: String,
    },
    /// An internal handle outlived its bitmap (a bug in the caller).
    #[error("dirty bitmap {0:?} does not exist on this node")]
    UnknownId(BitmapId),
    /// A resize of a qcow2 node whose image holds a persistent bitmap that is not in
    /// memory (it could not be resized with the others).
    #[error("Cannot resize qcow2 with persistent bitmaps that were not loaded into memory")]
    ResizeNotLoaded,
    /// Reading the stored bitmaps' list failed (before a resize).
    #[error("{reason}")]
    StoredList {
        /// What went wrong in the image.
        reason: String,
    },
    /// The bit structure refused the operation (size limits, allocation).
    #[error(transparent)]
    Bits(#[from] hbitmap::HBitmapError),
}

impl BitmapError {
    /// The hint QEMU prints after the message (qemu-img and HMP; not part of QMP `desc`).
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            BitmapError::Inconsistent(_) => {
                Some("Try block-dirty-bitmap-remove to delete this bitmap from disk")
            }
            _ => None,
        }
    }
}
