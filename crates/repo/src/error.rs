//! The repository's error type: what failed, on which object, and why.

use std::io;

/// A repository failure. Every variant names the object (or file) concerned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A storage operation failed.
    // The OS error is part of the text and deliberately not a `#[source]`: printers
    // of error chains would say it twice.
    #[error("{object}: {action}: {error}")]
    Io {
        /// The object or file.
        object: String,
        /// What was being done.
        action: &'static str,
        /// The OS error.
        error: io::Error,
    },
    /// An object that should exist does not.
    #[error("{object}: missing")]
    Missing {
        /// The object.
        object: String,
    },
    /// An object is damaged: its bytes do not decode, do not authenticate, or do not
    /// match their name.
    #[error("{object}: corrupt: {reason}")]
    Corrupt {
        /// The object.
        object: String,
        /// What is wrong.
        reason: String,
    },
    /// The repository is encrypted and no key was given.
    #[error(
        "{repository}: the repository is encrypted: give its key file (--keyfile FILE or \
         BLOCKDELTA_KEYFILE)"
    )]
    KeyMissing {
        /// The repository.
        repository: String,
    },
    /// The key given is not the repository's key.
    #[error("{repository}: the key file does not belong to this repository")]
    WrongKey {
        /// The repository.
        repository: String,
    },
    /// A key file cannot be read or opened (a wrong passphrase, a damaged file).
    #[error("{path}: {reason}")]
    KeyFile {
        /// The key file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// Someone else holds a lock this operation needs.
    #[error("{what} is busy: {holder}")]
    Busy {
        /// What is locked (a disk, the chunk store, a garbage collection).
        what: String,
        /// Who holds it, as far as known.
        holder: String,
    },
    /// The request cannot be carried out as given (unknown disk or backup, bad name or
    /// size, ...). Nothing was changed.
    #[error("{0}")]
    Invalid(String),
}

/// A repository result.
pub type Result<T> = std::result::Result<T, Error>;

/// Maps an OS error on `object` during `action` to [`Error::Io`].
pub(crate) fn io_err(object: &str, action: &'static str) -> impl FnOnce(io::Error) -> Error {
    let object = object.to_owned();
    move |error| Error::Io { object, action, error }
}

pub(crate) fn corrupt(object: &str, reason: impl Into<String>) -> Error {
    Error::Corrupt { object: object.to_owned(), reason: reason.into() }
}
