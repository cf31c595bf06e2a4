//! Error policies of block jobs (`on-source-error`, `on-target-error`) and what they
//! decide for one I/O error.

use std::fmt;
use std::str::FromStr;

/// ENOSPC on Linux: the error `enospc` and `auto` stop on.
pub(crate) const ENOSPC: i32 = 28;

/// QAPI `BlockdevOnError`: what a job does when an I/O error of its own fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum OnError {
    /// End the job with the error (the default).
    #[default]
    Report,
    /// Retry as if nothing happened.
    Ignore,
    /// Stop on ENOSPC, report anything else.
    Enospc,
    /// Pause the job (user-paused, io-status failed) until `job-resume`, then retry.
    Stop,
    /// Same as `enospc` for jobs.
    Auto,
}

impl OnError {
    /// QEMU's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            OnError::Report => "report",
            OnError::Ignore => "ignore",
            OnError::Enospc => "enospc",
            OnError::Stop => "stop",
            OnError::Auto => "auto",
        }
    }

    /// The action for an error with this `errno` (QEMU's `block_job_error_action`
    /// mapping).
    pub fn action(self, errno: Option<i32>) -> ErrorAction {
        match self {
            OnError::Report => ErrorAction::Report,
            OnError::Ignore => ErrorAction::Ignore,
            OnError::Stop => ErrorAction::Stop,
            OnError::Enospc | OnError::Auto => {
                if errno == Some(ENOSPC) {
                    ErrorAction::Stop
                } else {
                    ErrorAction::Report
                }
            }
        }
    }
}

impl FromStr for OnError {
    type Err = ();

    /// Parses QEMU's spelling; the caller reports an unknown value in QAPI's words.
    fn from_str(s: &str) -> Result<Self, ()> {
        Ok(match s {
            "report" => OnError::Report,
            "ignore" => OnError::Ignore,
            "enospc" => OnError::Enospc,
            "stop" => OnError::Stop,
            "auto" => OnError::Auto,
            _ => return Err(()),
        })
    }
}

impl fmt::Display for OnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// QAPI `BlockErrorAction`: what was decided for one error (`BLOCK_JOB_ERROR`'s
/// `action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorAction {
    /// Retry.
    Ignore,
    /// End the job with the error.
    Report,
    /// The job is now user-paused; retry after its next pause point.
    Stop,
}

impl ErrorAction {
    /// QEMU's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorAction::Ignore => "ignore",
            ErrorAction::Report => "report",
            ErrorAction::Stop => "stop",
        }
    }
}

/// Which side of a copy failed (`BLOCK_JOB_ERROR`'s `operation`). Read errors follow
/// `on-source-error`, write errors `on-target-error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoOperation {
    /// Reading the source.
    Read,
    /// Writing the target.
    Write,
}

impl IoOperation {
    /// QEMU's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            IoOperation::Read => "read",
            IoOperation::Write => "write",
        }
    }
}

/// QAPI `BlockDeviceIoStatus` of a block job (`query-block-jobs`' `io-status`): set
/// when an error stops the job, back to `ok` on resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum IoStatus {
    /// No error stopped the job.
    #[default]
    Ok,
    /// An error other than ENOSPC stopped the job.
    Failed,
    /// ENOSPC stopped the job.
    Nospace,
}

impl IoStatus {
    /// QEMU's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            IoStatus::Ok => "ok",
            IoStatus::Failed => "failed",
            IoStatus::Nospace => "nospace",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping() {
        for p in [OnError::Report, OnError::Ignore, OnError::Enospc, OnError::Stop, OnError::Auto] {
            assert_eq!(p.as_str().parse::<OnError>(), Ok(p));
        }
        assert_eq!(OnError::Enospc.action(Some(ENOSPC)), ErrorAction::Stop);
        assert_eq!(OnError::Auto.action(Some(5)), ErrorAction::Report);
        assert_eq!(OnError::Auto.action(None), ErrorAction::Report);
        assert_eq!(OnError::Stop.action(Some(5)), ErrorAction::Stop);
        assert_eq!(OnError::Ignore.action(Some(ENOSPC)), ErrorAction::Ignore);
        assert_eq!(OnError::Report.action(Some(ENOSPC)), ErrorAction::Report);
        assert!("nope".parse::<OnError>().is_err());
    }
}
