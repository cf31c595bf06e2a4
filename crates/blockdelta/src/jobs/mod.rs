//! Jobs: QEMU's generic job machinery (`job.c`, `blockjob.c`), on tokio.
//!
//! A [`JobRegistry`] holds every job by id. A job is created with [`JobOptions`] and a
//! [`JobDriver`] (what the job does: backup's block-copy loop), then [`Job::start`]ed.
//! Its task runs [`JobDriver::run`] with a [`JobContext`], through which the driver
//! meets pause points, notices cancellation, reports progress, obeys the rate limit
//! and applies the error policy. The registry drives the state machine of spec 3.5
//! ([`JobStatus`], verbs in [`JobVerb`]) exactly as QEMU does, including transactions
//! ([`JobTxn`]), auto-finalize and auto-dismiss, and emits QEMU's events through the
//! [`EventSink`] given at construction.
//!
//! # Lifecycle (what QEMU 10.0.2 shows, and this reproduces)
//!
//! - Success, auto: `created, running, [paused, running], waiting, pending`,
//!   `BLOCK_JOB_COMPLETED`, `concluded, null`. The bracketed pair comes from QEMU
//!   starting the job inside a drained section; start it under a [`DrainGuard`] to get
//!   it (see there).
//! - `auto-finalize=false`: after `pending`, `BLOCK_JOB_PENDING {type, id}`; then
//!   [`Job::finalize`] gives `BLOCK_JOB_COMPLETED, concluded`. `auto-dismiss=false`:
//!   the job stays `concluded` (with `error` in the queries if it failed) until
//!   [`Job::dismiss`] → `null`.
//! - Failure with `report`: `BLOCK_JOB_ERROR`, `aborting`, `BLOCK_JOB_COMPLETED {error}`,
//!   `concluded, null`. A failed or cancelled job never goes to PENDING.
//! - Cancel: `aborting, BLOCK_JOB_CANCELLED, concluded, null`. Cancelling a paused job
//!   first wakes it (`running`). Cancelling in WAITING or PENDING aborts at once.
//! - Grouped transaction, one job fails or is cancelled: the others are cancelled, each
//!   goes `aborting` as its body returns; then every job, newest first, is aborted and
//!   cleaned and gets its event (`BLOCK_JOB_COMPLETED {error}` for the failed one,
//!   `BLOCK_JOB_CANCELLED` for the others), `concluded`, `null`.
//!
//! # For a job implementation (backup)
//!
//! ```ignore
//! impl JobDriver for Backup {
//!     async fn run(&self, ctx: &JobContext) -> Result<(), JobFailure> {
//!         ctx.set_total(bytes_to_copy);
//!         while let Some(chunk) = self.next_chunk() {
//!             ctx.pause_point().await;
//!             if ctx.is_cancelled() { return Ok(()); } // becomes "Operation canceled"
//!             match self.copy(chunk).await {
//!                 Ok(n) => { ctx.add_progress(n); ctx.rate_limit(n).await; }
//!                 Err((op, e)) => match ctx.error_action(op, &e) {
//!                     ErrorAction::Report => return Err(JobFailure::io(&e)),
//!                     ErrorAction::Ignore => self.retry(chunk),
//!                     ErrorAction::Stop => { self.retry(chunk); ctx.pause_point().await; }
//!                 },
//!             }
//!         }
//!         Ok(())
//!     }
//!     async fn commit(&self) { /* settle the bitmap: success */ }
//!     async fn abort(&self) { /* settle the bitmap: failure */ }
//!     async fn clean(&self) { /* remove the copy-before-write filter */ }
//! }
//! ```
//!
//! The QMP layer resolves ids with [`JobRegistry::job`] (`job-*`: `Job not found`) or
//! [`JobRegistry::block_job`] (`block-job-*`: `Block job '<id>' not found`, class
//! `DeviceNotActive`, see [`JobError::class`]), then calls the verb methods of [`Job`];
//! `job-cancel` is `cancel(true)`, `block-job-cancel` is `block_job_cancel(force)`.

pub mod backup;
pub mod block_copy;
mod context;
mod core;
mod driver;
mod error;
mod job;
mod policy;
mod ratelimit;
mod registry;
pub mod status;

use std::sync::Arc;

pub use context::JobContext;
pub use driver::JobDriver;
pub use error::{JobError, JobFailure};
pub use job::Job;
pub use policy::{ErrorAction, IoOperation, IoStatus, OnError};
pub use ratelimit::SLICE as RATE_LIMIT_SLICE;
pub use registry::{DrainGuard, JobOptions, JobRegistry, JobTxn, id_wellformed};
pub use status::{JobStatus, JobVerb};

/// Where the registry sends events: `(name, data)`, e.g. `("JOB_STATUS_CHANGE",
/// {"id": "job0", "status": "running"})`. Called in order, under the registry's lock:
/// it must be quick and must not call back into the registry.
pub type EventSink = Arc<dyn Fn(&'static str, serde_json::Value) + Send + Sync>;

/// QAPI `JobType`: the kind of a job, as QEMU spells it in events and queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum JobType {
    /// `commit`.
    Commit,
    /// `stream`.
    Stream,
    /// `mirror`.
    Mirror,
    /// `backup`.
    Backup,
    /// `create`.
    Create,
    /// `amend`.
    Amend,
    /// `snapshot-load`.
    SnapshotLoad,
    /// `snapshot-save`.
    SnapshotSave,
    /// `snapshot-delete`.
    SnapshotDelete,
}

impl JobType {
    /// QEMU's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            JobType::Commit => "commit",
            JobType::Stream => "stream",
            JobType::Mirror => "mirror",
            JobType::Backup => "backup",
            JobType::Create => "create",
            JobType::Amend => "amend",
            JobType::SnapshotLoad => "snapshot-load",
            JobType::SnapshotSave => "snapshot-save",
            JobType::SnapshotDelete => "snapshot-delete",
        }
    }
}
