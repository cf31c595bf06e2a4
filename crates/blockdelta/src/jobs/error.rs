//! Errors of the job layer: refused verbs and lookups (QEMU's texts and QMP classes),
//! and why a job's body failed.

use std::fmt;
use std::io;

use super::status::{JobStatus, JobVerb};

/// A refused job operation. `Display` is QEMU's exact text; [`JobError::class`] is the
/// QMP error class.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JobError {
    /// A `job-*` command named no job.
    #[error("Job not found")]
    NotFound,
    /// A `block-job-*` command named no job (class `DeviceNotActive`).
    #[error("Block job '{0}' not found")]
    BlockJobNotFound(String),
    /// The id does not start with a letter or holds characters other than letters,
    /// digits, `-`, `.` and `_` (also the empty id).
    #[error("Invalid job ID '{0}'")]
    InvalidId(String),
    /// Another job (in any state until dismissed) has this id.
    #[error("Job ID '{0}' already in use")]
    IdInUse(String),
    /// The verb table refuses the verb in the job's state.
    #[error("Job '{id}' in state '{status}' cannot accept command verb '{verb}'")]
    VerbNotAllowed {
        /// The job.
        id: String,
        /// Its state.
        status: JobStatus,
        /// The refused verb.
        verb: JobVerb,
    },
    /// `job-pause` of a job the user already paused.
    #[error("Job is already paused")]
    AlreadyPaused,
    /// `job-resume` of a job the user did not pause (checked before the verb table).
    #[error("Can't resume a job that was not paused")]
    NotPaused,
    /// `block-job-cancel` without `force` of a job the user paused (or an error stopped).
    #[error("The block job for device '{0}' is currently paused")]
    BlockJobPaused(String),
    /// A negative speed, at creation or in `block-job-set-speed`.
    #[error("Parameter 'speed' expects a non-negative value")]
    NegativeSpeed,
    /// `job-complete` of a job whose driver has no completion (or that is cancelled).
    #[error("The active block job '{0}' cannot be completed")]
    CannotComplete(String),
    /// The driver refused `job-complete`.
    #[error("{0}")]
    CompleteFailed(String),
    /// `start` outside a tokio runtime (a programming error of the caller).
    #[error("Job '{0}' cannot start outside a tokio runtime")]
    NoRuntime(String),
    /// `start` of a job that is not in state `created`.
    #[error("Job '{0}' has already been started")]
    AlreadyStarted(String),
}

impl JobError {
    /// The QMP error class QEMU uses for this error.
    pub fn class(&self) -> &'static str {
        match self {
            JobError::BlockJobNotFound(_) => "DeviceNotActive",
            _ => "GenericError",
        }
    }
}

/// Why a job's body (or its `prepare`) failed. Its message is what QEMU reports in
/// `BLOCK_JOB_COMPLETED`'s `error` and in the `error` of `query-jobs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobFailure {
    message: String,
    errno: Option<i32>,
}

/// The errno behind an I/O error: its own, or that of an I/O error it wraps (storage
/// errors carry the file and the operation around the OS error).
pub(crate) fn errno(err: &io::Error) -> Option<i32> {
    if let Some(code) = err.raw_os_error() {
        return Some(code);
    }
    let mut inner: Option<&(dyn std::error::Error + 'static)> =
        err.get_ref().map(|e| e as &(dyn std::error::Error + 'static));
    while let Some(e) = inner {
        if let Some(code) = e.downcast_ref::<io::Error>().and_then(io::Error::raw_os_error) {
            return Some(code);
        }
        inner = e.source();
    }
    None
}

/// ECANCELED on Linux: a cancelled job's result.
const ECANCELED: i32 = 125;

impl JobFailure {
    /// A failure with a message of the driver's own.
    pub fn new(message: impl Into<String>) -> Self {
        JobFailure { message: message.into(), errno: None }
    }

    /// A failure from an I/O error: the message is the C library's text for its errno
    /// (`Input/output error`), as QEMU reports a job that ended with `-errno`.
    pub fn io(err: &io::Error) -> Self {
        match errno(err) {
            Some(errno) => JobFailure { message: strerror(errno), errno: Some(errno) },
            None => JobFailure { message: err.to_string(), errno: None },
        }
    }

    /// The result of a cancelled job: `Operation canceled`.
    pub fn cancelled() -> Self {
        JobFailure { message: strerror(ECANCELED), errno: Some(ECANCELED) }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The errno, if the failure came from one.
    pub fn errno(&self) -> Option<i32> {
        self.errno
    }
}

impl fmt::Display for JobFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for JobFailure {}

impl From<io::Error> for JobFailure {
    fn from(err: io::Error) -> Self {
        JobFailure::io(&err)
    }
}

/// The C library's text for `errno`.
pub(crate) fn strerror(errno: i32) -> String {
    crate::block::strerror(&io::Error::from_raw_os_error(errno))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_texts() {
        assert_eq!(JobFailure::cancelled().message(), "Operation canceled");
        assert_eq!(
            JobFailure::io(&io::Error::from_raw_os_error(5)).message(),
            "Input/output error"
        );
        assert_eq!(JobFailure::io(&io::Error::from_raw_os_error(28)).errno(), Some(28));
        assert_eq!(JobFailure::io(&io::Error::other("odd")).message(), "odd");
    }

    #[test]
    fn classes() {
        assert_eq!(JobError::BlockJobNotFound("x".into()).class(), "DeviceNotActive");
        assert_eq!(JobError::NotFound.class(), "GenericError");
        assert_eq!(JobError::BlockJobNotFound("x".into()).to_string(), "Block job 'x' not found");
    }
}
