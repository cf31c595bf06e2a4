//! Job states, the verbs a user applies to jobs, and which of them each state allows
//! (QAPI `JobStatus` and `JobVerb`; the tables of spec 3.5).

use std::fmt;

use super::error::JobError;

/// The state of a job, spelled as QEMU spells it in `JOB_STATUS_CHANGE` and `query-jobs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobStatus {
    /// Not yet created (never visible).
    Undefined,
    /// Created, not started.
    Created,
    /// Running its body.
    Running,
    /// Stopped at a pause point.
    Paused,
    /// Waiting for `complete` (mirror; never for backup).
    Ready,
    /// Paused while ready.
    Standby,
    /// Its body succeeded; waiting for the other jobs of its transaction.
    Waiting,
    /// Every job of its transaction succeeded; waiting to be finalized.
    Pending,
    /// Failed or cancelled; its transaction is being aborted.
    Aborting,
    /// Finalized; waiting to be dismissed.
    Concluded,
    /// Dismissed; gone from the registry.
    Null,
}

impl JobStatus {
    /// Every status, in QAPI order.
    pub const ALL: [JobStatus; 11] = [
        JobStatus::Undefined,
        JobStatus::Created,
        JobStatus::Running,
        JobStatus::Paused,
        JobStatus::Ready,
        JobStatus::Standby,
        JobStatus::Waiting,
        JobStatus::Pending,
        JobStatus::Aborting,
        JobStatus::Concluded,
        JobStatus::Null,
    ];

    /// QEMU's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Undefined => "undefined",
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }

    /// Whether QEMU's transition table allows going from `self` to `to`
    /// (`aborting` → `aborting` is allowed and emits no event).
    pub fn can_transition_to(self, to: JobStatus) -> bool {
        use JobStatus::*;
        match self {
            Undefined => matches!(to, Created),
            Created => matches!(to, Running | Aborting | Null),
            Running => matches!(to, Paused | Ready | Waiting | Aborting),
            Paused => matches!(to, Running),
            Ready => matches!(to, Standby | Waiting | Aborting),
            Standby => matches!(to, Ready),
            Waiting => matches!(to, Pending | Aborting),
            Pending => matches!(to, Aborting | Concluded),
            Aborting => matches!(to, Aborting | Concluded),
            Concluded => matches!(to, Null),
            Null => false,
        }
    }

    /// Whether the verb table allows `verb` in this state.
    pub fn allows(self, verb: JobVerb) -> bool {
        use JobStatus::*;
        match verb {
            JobVerb::Cancel => {
                matches!(self, Created | Running | Paused | Ready | Standby | Waiting | Pending)
            }
            JobVerb::Pause | JobVerb::Resume | JobVerb::SetSpeed | JobVerb::Change => {
                matches!(self, Created | Running | Paused | Ready | Standby)
            }
            JobVerb::Complete => matches!(self, Ready | Standby),
            JobVerb::Finalize => matches!(self, Pending),
            JobVerb::Dismiss => matches!(self, Concluded),
        }
    }

    /// Whether the job's body has finished (QEMU's "completed" states): from here on it
    /// only waits for its transaction, finalization or dismissal.
    pub fn is_completed(self) -> bool {
        matches!(
            self,
            JobStatus::Waiting
                | JobStatus::Pending
                | JobStatus::Aborting
                | JobStatus::Concluded
                | JobStatus::Null
        )
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A command verb applied to a job (QAPI `JobVerb`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobVerb {
    /// `job-cancel`, `block-job-cancel`.
    Cancel,
    /// `job-pause`, `block-job-pause`.
    Pause,
    /// `job-resume`, `block-job-resume`.
    Resume,
    /// `block-job-set-speed`.
    SetSpeed,
    /// `block-job-change`.
    Change,
    /// `job-complete`, `block-job-complete`.
    Complete,
    /// `job-finalize`, `block-job-finalize`.
    Finalize,
    /// `job-dismiss`, `block-job-dismiss`.
    Dismiss,
}

impl JobVerb {
    /// Every verb, in QAPI order.
    pub const ALL: [JobVerb; 8] = [
        JobVerb::Cancel,
        JobVerb::Pause,
        JobVerb::Resume,
        JobVerb::SetSpeed,
        JobVerb::Complete,
        JobVerb::Dismiss,
        JobVerb::Finalize,
        JobVerb::Change,
    ];

    /// QEMU's spelling, as it appears in the verb error.
    pub fn as_str(self) -> &'static str {
        match self {
            JobVerb::Cancel => "cancel",
            JobVerb::Pause => "pause",
            JobVerb::Resume => "resume",
            JobVerb::SetSpeed => "set-speed",
            JobVerb::Change => "change",
            JobVerb::Complete => "complete",
            JobVerb::Finalize => "finalize",
            JobVerb::Dismiss => "dismiss",
        }
    }
}

impl fmt::Display for JobVerb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Applies the verb table: `Ok` if `status` allows `verb`, else QEMU's error
/// `Job '<id>' in state '<state>' cannot accept command verb '<verb>'`.
pub fn check_verb(id: &str, status: JobStatus, verb: JobVerb) -> Result<(), JobError> {
    if status.allows(verb) {
        Ok(())
    } else {
        Err(JobError::VerbNotAllowed { id: id.to_owned(), status, verb })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings() {
        let names: Vec<_> = JobStatus::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            names,
            [
                "undefined",
                "created",
                "running",
                "paused",
                "ready",
                "standby",
                "waiting",
                "pending",
                "aborting",
                "concluded",
                "null"
            ]
        );
        let verbs: Vec<_> = JobVerb::ALL.iter().map(|v| v.as_str()).collect();
        assert_eq!(
            verbs,
            ["cancel", "pause", "resume", "set-speed", "complete", "dismiss", "finalize", "change"]
        );
    }

    /// QEMU's JobSTT, written as a matrix (rows: from, columns: to, QAPI order).
    #[test]
    fn transition_table() {
        let stt: [[u8; 11]; 11] = [
            /* U */ [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            /* C */ [0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1],
            /* R */ [0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 0],
            /* P */ [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
            /* Y */ [0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0],
            /* S */ [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0],
            /* W */ [0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0],
            /* D */ [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0],
            /* X */ [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0],
            /* E */ [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            /* N */ [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ];
        for (i, from) in JobStatus::ALL.iter().enumerate() {
            for (j, to) in JobStatus::ALL.iter().enumerate() {
                assert_eq!(from.can_transition_to(*to), stt[i][j] == 1, "{from} -> {to}");
            }
        }
    }

    /// QEMU's JobVerbTable (rows: verbs in QAPI order, columns: states).
    #[test]
    fn verb_table() {
        let table: [[u8; 11]; 8] = [
            /* cancel    */ [0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
            /* pause     */ [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
            /* resume    */ [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
            /* set-speed */ [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
            /* complete  */ [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0],
            /* dismiss   */ [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
            /* finalize  */ [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
            /* change    */ [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
        ];
        for (i, verb) in JobVerb::ALL.iter().enumerate() {
            for (j, status) in JobStatus::ALL.iter().enumerate() {
                let r = check_verb("j0", *status, *verb);
                assert_eq!(r.is_ok(), table[i][j] == 1, "{verb} in {status}");
                if let Err(e) = r {
                    assert_eq!(
                        e.to_string(),
                        format!("Job 'j0' in state '{status}' cannot accept command verb '{verb}'")
                    );
                }
            }
        }
    }
}
