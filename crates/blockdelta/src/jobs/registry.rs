//! The registry of jobs by id, transactions, drains and the query commands.

use std::sync::Arc;

use serde_json::Value;
use tokio::sync::watch;

use super::core::{JobData, Shared, TxnData};
use super::driver::JobDriver;
use super::error::JobError;
use super::job::Job;
use super::policy::{IoStatus, OnError};
use super::ratelimit::RateLimit;
use super::status::JobStatus;
use super::{EventSink, JobType};

/// Every job of a daemon, by id. Cheap to clone (shared).
#[derive(Clone)]
pub struct JobRegistry {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for JobRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.jobs().iter().map(|j| j.id().to_owned())).finish()
    }
}

/// A group of jobs finalized together (QEMU's `JobTxn`, `completion-mode: grouped`):
/// they go PENDING together when all have succeeded, and if one fails or is cancelled
/// the others are cancelled and all abort. A job created without one is alone in a
/// transaction of its own (`individual`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobTxn {
    key: u64,
}

/// How to create a job. [`JobOptions::new`] gives QEMU's defaults.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct JobOptions {
    /// The job id (`job-id`); checked as QEMU checks ids.
    pub id: String,
    /// The job type (`backup`).
    pub job_type: JobType,
    /// The grouped transaction to join; `None` for a transaction of its own.
    pub txn: Option<JobTxn>,
    /// false: the job waits in PENDING for `job-finalize`.
    pub auto_finalize: bool,
    /// false: the job stays CONCLUDED until `job-dismiss`.
    pub auto_dismiss: bool,
    /// Bytes/s; 0 = unlimited; negative is refused as QEMU refuses it.
    pub speed: i64,
    /// Policy for read errors.
    pub on_source_error: OnError,
    /// Policy for write errors.
    pub on_target_error: OnError,
    /// Names of the block nodes the job uses, for [`JobRegistry::jobs_using_node`].
    pub nodes: Vec<String>,
}

impl JobOptions {
    /// Options with QEMU's defaults: own transaction, auto-finalize, auto-dismiss,
    /// unlimited speed, `report` on errors, no nodes.
    pub fn new(id: impl Into<String>, job_type: JobType) -> Self {
        JobOptions {
            id: id.into(),
            job_type,
            txn: None,
            auto_finalize: true,
            auto_dismiss: true,
            speed: 0,
            on_source_error: OnError::Report,
            on_target_error: OnError::Report,
            nodes: Vec::new(),
        }
    }
}

/// QEMU's `id_wellformed`: a letter, then letters, digits, `-`, `.`, `_`.
pub fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

impl JobRegistry {
    /// An empty registry whose events go to `events` (called in order, under the
    /// registry's lock: it must be quick and must not call back into the registry; a
    /// channel send is right).
    pub fn new(events: EventSink) -> Self {
        JobRegistry { shared: Arc::new(Shared::new(events)) }
    }

    /// A new, empty grouped transaction.
    pub fn new_txn(&self) -> JobTxn {
        let mut st = self.shared.lock();
        st.next_key += 1;
        JobTxn { key: st.next_key }
    }

    /// The id checks of job creation, in QEMU's order: `Invalid job ID '<id>'` (also for
    /// `""`, what QEMU's default id is for a node without a device name), then
    /// `Job ID '<id>' already in use`. [`create`](JobRegistry::create) runs them too; a
    /// caller can run them early where QEMU creates the job before other checks.
    pub fn check_new_id(&self, id: &str) -> Result<(), JobError> {
        let st = self.shared.lock();
        check_id(&st, id)
    }

    /// Creates a job (UNDEFINED → CREATED, `JOB_STATUS_CHANGE created`); it runs once
    /// [`Job::start`]ed. A negative speed fails after the job was created, as in QEMU
    /// (events `created`, `null`).
    pub fn create(&self, opts: JobOptions, driver: impl JobDriver) -> Result<Job, JobError> {
        let mut st = self.shared.lock();
        check_id(&st, &opts.id)?;
        st.next_key += 1;
        let key = st.next_key;
        let txn = match opts.txn {
            Some(t) => t.key,
            None => {
                st.next_key += 1;
                st.next_key
            }
        };
        let speed = u64::try_from(opts.speed).unwrap_or(0);
        let mut data = JobData {
            id: opts.id.clone(),
            job_type: opts.job_type,
            driver: Arc::new(driver),
            status: JobStatus::Undefined,
            saved_status: JobStatus::Running,
            txn,
            pause_count: 0,
            user_paused: false,
            paused: false,
            busy: false,
            started: false,
            body_done: false,
            cancelled: false,
            force_cancel: false,
            result: None,
            auto_finalize: opts.auto_finalize,
            auto_dismiss: opts.auto_dismiss,
            speed,
            limit: RateLimit::new(speed),
            current: 0,
            total: 0,
            on_source_error: opts.on_source_error,
            on_target_error: opts.on_target_error,
            io_status: IoStatus::Ok,
            nodes: opts.nodes,
            wake: watch::channel(0).0,
        };
        self.shared.transition(&mut data, JobStatus::Created);
        if opts.speed < 0 {
            self.shared.transition(&mut data, JobStatus::Null);
            return Err(JobError::NegativeSpeed);
        }
        st.jobs.insert(key, data);
        st.order.push(key);
        st.txns
            .entry(txn)
            .or_insert_with(|| TxnData { jobs: Vec::new(), aborting: false })
            .jobs
            .insert(0, key);
        Ok(Job { shared: self.shared.clone(), key, id: opts.id.into() })
    }

    fn handle(&self, key: u64, j: &JobData) -> Job {
        Job { shared: self.shared.clone(), key, id: j.id.as_str().into() }
    }

    fn find(&self, id: &str) -> Option<Job> {
        let st = self.shared.lock();
        st.jobs.iter().find(|(_, j)| j.id == id).map(|(k, j)| self.handle(*k, j))
    }

    /// The job for a `job-*` command: unknown ids give `Job not found`.
    pub fn job(&self, id: &str) -> Result<Job, JobError> {
        self.find(id).ok_or(JobError::NotFound)
    }

    /// The job for a `block-job-*` command: unknown ids give `Block job '<id>' not
    /// found` (class `DeviceNotActive`).
    pub fn block_job(&self, id: &str) -> Result<Job, JobError> {
        self.find(id).ok_or_else(|| JobError::BlockJobNotFound(id.to_owned()))
    }

    /// Every job, newest first (the order of QEMU's queries).
    pub fn jobs(&self) -> Vec<Job> {
        let st = self.shared.lock();
        st.order.iter().rev().filter_map(|k| st.jobs.get(k).map(|j| self.handle(*k, j))).collect()
    }

    /// The jobs (not yet concluded) that use node `name`.
    pub fn jobs_using_node(&self, name: &str) -> Vec<Job> {
        let st = self.shared.lock();
        st.order
            .iter()
            .rev()
            .filter_map(|k| st.jobs.get(k).map(|j| (k, j)))
            .filter(|(_, j)| {
                !matches!(j.status, JobStatus::Concluded | JobStatus::Null)
                    && j.nodes.iter().any(|n| n == name)
            })
            .map(|(k, j)| self.handle(*k, j))
            .collect()
    }

    /// `query-jobs`: `[JobInfo]`, newest first.
    pub fn query_jobs(&self) -> Value {
        let st = self.shared.lock();
        Value::Array(
            st.order.iter().rev().filter_map(|k| st.jobs.get(k)).map(JobData::job_info).collect(),
        )
    }

    /// `query-block-jobs`: `[BlockJobInfo]`, newest first.
    pub fn query_block_jobs(&self) -> Value {
        let st = self.shared.lock();
        Value::Array(
            st.order
                .iter()
                .rev()
                .filter_map(|k| st.jobs.get(k))
                .map(JobData::block_job_info)
                .collect(),
        )
    }

    /// Pauses every job as a drain does (QEMU's `bdrv_drain_all_begin`) and waits until
    /// each is quiescent; dropping the guard resumes them, newest first. An idle job
    /// shows `paused` at once; a busy one when it reaches a pause point.
    pub async fn drain_all(&self) -> DrainGuard {
        let mut guard = DrainGuard::new(self.shared.clone());
        let jobs: Vec<Job> = self.jobs().into_iter().rev().collect();
        for j in &jobs {
            guard.include(j);
        }
        guard.quiesced().await;
        guard
    }

    /// Cancels every job and waits until each is concluded (QEMU's
    /// `job_cancel_sync_all` at shutdown).
    pub async fn cancel_all(&self) {
        for j in self.jobs() {
            // A job in a state that refuses cancel is finishing anyway.
            let _ = j.cancel(true).await;
        }
        for j in self.jobs() {
            j.wait_finished().await;
        }
    }
}

fn check_id(st: &super::core::State, id: &str) -> Result<(), JobError> {
    if !id_wellformed(id) {
        return Err(JobError::InvalidId(id.to_owned()));
    }
    if st.jobs.values().any(|j| j.id == id) {
        return Err(JobError::IdInUse(id.to_owned()));
    }
    Ok(())
}

/// Jobs paused as a drained section pauses them (not user pauses: `paused: true` in
/// `query-block-jobs`, but `job-resume` does not end it). Dropping the guard resumes them
/// in reverse order.
///
/// QEMU creates and starts a backup job inside a drained section of its source, so a
/// successful job's events begin `created, running, paused, running`. To reproduce that:
///
/// ```ignore
/// let mut drain = registry.drain_all().await; // QMP transaction: every job pauses
/// let job = registry.create(opts, driver)?;   // created
/// drain.include(&job);                        // its node is drained
/// job.start()?;                               // running, paused
/// drop(drain);                                // running
/// ```
pub struct DrainGuard {
    shared: Arc<Shared>,
    keys: Vec<u64>,
}

impl std::fmt::Debug for DrainGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DrainGuard").field("jobs", &self.keys.len()).finish()
    }
}

impl DrainGuard {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        DrainGuard { shared, keys: Vec::new() }
    }

    /// Pauses one more job until the guard is dropped (for a job created inside the
    /// drained section, or a job of another drained node).
    pub fn include(&mut self, job: &Job) {
        let mut st = self.shared.lock();
        if let Some(j) = st.jobs.get_mut(&job.key) {
            self.shared.pause(j);
            self.keys.push(job.key);
        }
    }

    /// Waits until every job of the guard is quiescent: stopped at a pause point, idle in
    /// a wait, finished, or not started.
    pub async fn quiesced(&self) {
        loop {
            let mut rx = self.shared.subscribe();
            {
                let st = self.shared.lock();
                let busy =
                    self.keys.iter().filter_map(|k| st.jobs.get(k)).any(|j| {
                        j.started && !j.body_done && j.busy && !j.paused && !j.is_cancelled()
                    });
                if !busy {
                    return;
                }
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Ends the drained section (same as dropping the guard).
    pub fn end(self) {}
}

impl Drop for DrainGuard {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        for k in self.keys.iter().rev() {
            if let Some(j) = st.jobs.get_mut(k) {
                self.shared.resume(j);
            }
        }
    }
}
