//! A handle on one job, and the verbs of `job-*` and `block-job-*`.

use std::fmt;
use std::sync::Arc;

use serde_json::Value;
use tokio::runtime::Handle;

use super::context::JobContext;
use super::core::{JobData, Shared, State};
use super::error::{JobError, JobFailure};
use super::registry::DrainGuard;
use super::status::{JobStatus, JobVerb, check_verb};

/// A job in a [`JobRegistry`](super::JobRegistry). Cheap to clone. Once the job is
/// dismissed (status `null`) the handle stays valid but every verb answers
/// [`JobError::NotFound`].
#[derive(Clone)]
pub struct Job {
    pub(crate) shared: Arc<Shared>,
    pub(crate) key: u64,
    pub(crate) id: Arc<str>,
}

impl fmt::Debug for Job {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Job").field("id", &self.id).field("status", &self.status()).finish()
    }
}

impl Job {
    /// The job's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The current status; `null` once dismissed.
    pub fn status(&self) -> JobStatus {
        self.shared.lock().jobs.get(&self.key).map_or(JobStatus::Null, |j| j.status)
    }

    /// `query-jobs`' `JobInfo` of this job, if it still exists.
    pub fn info(&self) -> Option<Value> {
        self.shared.lock().jobs.get(&self.key).map(JobData::job_info)
    }

    /// `query-block-jobs`' `BlockJobInfo` of this job, if it still exists.
    pub fn block_info(&self) -> Option<Value> {
        self.shared.lock().jobs.get(&self.key).map(JobData::block_job_info)
    }

    /// The job's result once its body has returned: `Some(Ok)` or the failure
    /// (`Operation canceled` for a cancelled job).
    pub fn result(&self) -> Option<Result<(), JobFailure>> {
        self.shared.lock().jobs.get(&self.key).and_then(|j| j.result.clone())
    }

    /// Starts the job (CREATED → RUNNING) on the current tokio runtime. If it is
    /// paused already (a [`DrainGuard`] that includes it, or `job-pause` while created),
    /// it reaches its first pause point at once (→ PAUSED), as QEMU's job coroutine does
    /// when it starts inside a drained section.
    pub fn start(&self) -> Result<(), JobError> {
        let handle = Handle::try_current().map_err(|_| JobError::NoRuntime(self.id.to_string()))?;
        let driver = {
            let mut st = self.shared.lock();
            let j = st.jobs.get_mut(&self.key).ok_or(JobError::NotFound)?;
            if j.started || j.status != JobStatus::Created {
                return Err(JobError::AlreadyStarted(self.id.to_string()));
            }
            j.started = true;
            j.busy = true;
            self.shared.transition(j, JobStatus::Running);
            if j.pause_count > 0 && !j.is_cancelled() {
                self.shared.enter_pause(j);
            }
            j.driver.clone()
        };
        let shared = self.shared.clone();
        let ctx = JobContext { shared: shared.clone(), key: self.key, id: self.id.to_string() };
        let key = self.key;
        handle.spawn(async move {
            // The body runs in a task of its own so that a panicking driver fails its
            // job instead of leaving it running forever.
            let body = tokio::spawn(async move {
                ctx.pause_point().await;
                driver.dyn_run(&ctx).await
            });
            let result = match body.await {
                Ok(r) => r,
                Err(e) if e.is_panic() => Err(JobFailure::new("Job panicked")),
                Err(_) => Err(JobFailure::cancelled()),
            };
            shared.job_completed(key, result).await;
        });
        Ok(())
    }

    /// Runs `f` on the job's data under the op lock and the state lock.
    async fn verb<T>(
        &self,
        f: impl FnOnce(&Shared, &mut State, u64) -> Result<T, JobError>,
    ) -> Result<T, JobError> {
        let _op = self.shared.op_lock.lock().await;
        let mut st = self.shared.lock();
        if !st.jobs.contains_key(&self.key) {
            return Err(JobError::NotFound);
        }
        f(&self.shared, &mut st, self.key)
    }

    /// `job-pause` / `block-job-pause`: a user pause.
    pub async fn pause(&self) -> Result<(), JobError> {
        self.verb(|sh, st, key| {
            let j = job_mut(st, key)?;
            check_verb(&j.id, j.status, JobVerb::Pause)?;
            if j.user_paused {
                return Err(JobError::AlreadyPaused);
            }
            j.user_paused = true;
            sh.pause(j);
            Ok(())
        })
        .await
    }

    /// `job-resume` / `block-job-resume`: ends a user pause (or an error stop, whose
    /// io-status goes back to `ok`). The not-paused check comes before the verb table,
    /// as in QEMU.
    pub async fn resume(&self) -> Result<(), JobError> {
        self.verb(|sh, st, key| {
            let j = job_mut(st, key)?;
            if !j.user_paused || j.pause_count == 0 {
                return Err(JobError::NotPaused);
            }
            check_verb(&j.id, j.status, JobVerb::Resume)?;
            j.io_status = super::policy::IoStatus::Ok;
            j.user_paused = false;
            sh.resume(j);
            Ok(())
        })
        .await
    }

    /// `job-cancel` (QEMU passes `force = true`). A running job is woken and told; its
    /// abort path runs when its body returns (events after this returns). A job whose
    /// body already finished (WAITING, PENDING) or never started (CREATED) is aborted
    /// here, with its whole transaction, before this returns.
    pub async fn cancel(&self, force: bool) -> Result<(), JobError> {
        let _op = self.shared.op_lock.lock().await;
        self.cancel_locked(force, false).await
    }

    /// `block-job-cancel {device, force}`: refuses a user-paused job unless `force`
    /// (`The block job for device '<id>' is currently paused`), then as
    /// [`cancel`](Job::cancel).
    pub async fn block_job_cancel(&self, force: bool) -> Result<(), JobError> {
        let _op = self.shared.op_lock.lock().await;
        self.cancel_locked(force, true).await
    }

    async fn cancel_locked(&self, force: bool, block_job: bool) -> Result<(), JobError> {
        let abort_now = {
            let mut st = self.shared.lock();
            let j = job_mut(&mut st, self.key)?;
            if block_job && j.user_paused && !force {
                return Err(JobError::BlockJobPaused(j.id.clone()));
            }
            check_verb(&j.id, j.status, JobVerb::Cancel)?;
            self.shared.cancel_async(j, force);
            if !j.started {
                j.body_done = true;
                j.result = Some(Err(JobFailure::cancelled()));
                self.shared.update_rc(j);
                true
            } else if j.body_done {
                // A soft cancel of a finished job is ignored, as QEMU does.
                j.is_cancelled()
            } else {
                self.shared.wake_cancelled(j);
                false
            }
        };
        if abort_now {
            self.shared.txn_abort(self.key).await;
        }
        Ok(())
    }

    /// `block-job-set-speed`: the verb table first, then a negative speed is refused.
    /// A job waiting on its rate limit recomputes its delay at once when the speed goes
    /// up or to unlimited.
    pub async fn set_speed(&self, speed: i64) -> Result<(), JobError> {
        self.verb(|_, st, key| {
            let j = job_mut(st, key)?;
            check_verb(&j.id, j.status, JobVerb::SetSpeed)?;
            let speed = u64::try_from(speed).map_err(|_| JobError::NegativeSpeed)?;
            let old = j.speed;
            j.speed = speed;
            j.limit.set_speed(speed);
            if speed == 0 || speed > old {
                j.kick();
            }
            Ok(())
        })
        .await
    }

    /// `job-complete` / `block-job-complete`. Backup never gets past the verb table
    /// (`... cannot accept command verb 'complete'`, checked on QEMU 10.0.2).
    pub async fn complete(&self) -> Result<(), JobError> {
        let driver = self
            .verb(|_, st, key| {
                let j = job_mut(st, key)?;
                check_verb(&j.id, j.status, JobVerb::Complete)?;
                if j.cancelled || !j.driver.dyn_can_complete() {
                    return Err(JobError::CannotComplete(j.id.clone()));
                }
                Ok(j.driver.clone())
            })
            .await?;
        driver.dyn_complete().map_err(JobError::CompleteFailed)
    }

    /// `job-finalize` / `block-job-finalize`: finalizes the job's whole transaction
    /// (every job in it is PENDING): prepare, then commit or abort and clean each, with
    /// their events, before this returns.
    pub async fn finalize(&self) -> Result<(), JobError> {
        let _op = self.shared.op_lock.lock().await;
        let txn = {
            let mut st = self.shared.lock();
            let j = job_mut(&mut st, self.key)?;
            check_verb(&j.id, j.status, JobVerb::Finalize)?;
            j.txn
        };
        self.shared.do_finalize(txn).await;
        Ok(())
    }

    /// `job-dismiss` / `block-job-dismiss`: CONCLUDED → NULL; the id is free again.
    pub async fn dismiss(&self) -> Result<(), JobError> {
        self.verb(|sh, st, key| {
            let j = job_mut(st, key)?;
            check_verb(&j.id, j.status, JobVerb::Dismiss)?;
            sh.dismiss(st, key);
            Ok(())
        })
        .await
    }

    /// Pauses this job as a drain does (not a user pause) until the guard is dropped,
    /// after waiting for it to be quiescent (see [`DrainGuard`]).
    pub async fn drain(&self) -> DrainGuard {
        let mut guard = DrainGuard::new(self.shared.clone());
        guard.include(self);
        guard.quiesced().await;
        guard
    }

    /// Waits until the job is in `status` (or gone, for `null`). Only for states a job
    /// stays in until someone acts (`paused` by a user, `pending`, `concluded`, ...): a
    /// state the job passes through may be missed.
    pub async fn wait_status(&self, status: JobStatus) {
        loop {
            let mut rx = self.shared.subscribe();
            if self.status() == status {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Waits until the job is concluded or dismissed.
    pub async fn wait_finished(&self) {
        loop {
            let mut rx = self.shared.subscribe();
            if matches!(self.status(), JobStatus::Concluded | JobStatus::Null) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

fn job_mut(st: &mut State, key: u64) -> Result<&mut JobData, JobError> {
    st.jobs.get_mut(&key).ok_or(JobError::NotFound)
}
