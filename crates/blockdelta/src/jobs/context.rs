//! What a running job's driver uses: pause points, cancellation, progress, the rate
//! limit, the error policy, and waits that a pause or cancel can interrupt.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

use super::core::Shared;
use super::policy::{ENOSPC, ErrorAction, IoOperation, IoStatus};
use super::status::JobStatus;

/// The running job, as its driver sees it. Given to [`JobDriver::run`](super::JobDriver::run).
///
/// The job is *busy* while driver code runs and *idle* while it waits in
/// [`sleep`](JobContext::sleep), [`rate_limit`](JobContext::rate_limit),
/// [`wait_for`](JobContext::wait_for) or at a pause point. A pause requested while the job
/// is idle takes effect at once (the job shows `paused` before the pause command
/// returns); a busy job pauses at its next pause point or wait, as in QEMU.
pub struct JobContext {
    pub(crate) shared: Arc<Shared>,
    pub(crate) key: u64,
    pub(crate) id: String,
}

/// What an idle wait saw before the job was woken up.
enum Idle {
    /// The job is cancelled: stop waiting.
    Cancelled,
    /// A pause was pending or started: it has been waited out.
    Paused,
    /// Ready to wait: the receiver fires on the next wake-up.
    Wait(watch::Receiver<u64>),
}

impl JobContext {
    /// The job's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether the job has been cancelled (forced; backup's cancels always are). The
    /// driver should stop soon and return.
    pub fn is_cancelled(&self) -> bool {
        self.shared.lock().jobs.get(&self.key).is_none_or(|j| j.is_cancelled())
    }

    /// Stops here while the job is paused (by the user, a drain or an error stop) and
    /// returns when it is resumed or cancelled. Returns at once otherwise.
    pub async fn pause_point(&self) {
        loop {
            let mut rx = {
                let mut st = self.shared.lock();
                let Some(j) = st.jobs.get_mut(&self.key) else { return };
                if !j.paused {
                    if j.pause_count == 0 || j.is_cancelled() {
                        j.busy = true;
                        return;
                    }
                    self.shared.enter_pause(j);
                }
                j.wake.subscribe()
            };
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Marks the job idle, or handles a pending pause or cancel instead.
    async fn go_idle(&self) -> Idle {
        let pause = {
            let mut st = self.shared.lock();
            let Some(j) = st.jobs.get_mut(&self.key) else { return Idle::Cancelled };
            if j.is_cancelled() {
                return Idle::Cancelled;
            }
            if j.paused || j.pause_count > 0 {
                true
            } else {
                j.busy = false;
                let rx = j.wake.subscribe();
                self.shared.notify();
                return Idle::Wait(rx);
            }
        };
        debug_assert!(pause);
        self.pause_point().await;
        Idle::Paused
    }

    /// Back from an idle wait: busy again unless a pause caught the job while idle, in
    /// which case it waits here for the resume.
    async fn leave_idle(&self) {
        {
            let mut st = self.shared.lock();
            if let Some(j) = st.jobs.get_mut(&self.key)
                && !j.paused
            {
                j.busy = true;
            }
        }
        self.pause_point().await;
    }

    /// Sleeps for `duration` (QEMU's `job_sleep_ns`): returns early when the job is
    /// cancelled, woken (set-speed) or after a pause ends.
    pub async fn sleep(&self, duration: Duration) {
        self.sleep_until(Instant::now() + duration).await;
    }

    async fn sleep_until(&self, deadline: Instant) {
        match self.go_idle().await {
            Idle::Cancelled | Idle::Paused => {}
            Idle::Wait(mut rx) => {
                tokio::select! {
                    _ = rx.changed() => {}
                    _ = tokio::time::sleep_until(deadline) => {}
                }
                self.leave_idle().await;
            }
        }
    }

    /// Accounts `bytes` just copied against the job's speed and waits as long as the
    /// rate limit asks (speed in bytes/s, 0 = unlimited, 100 ms slices). A speed change
    /// while waiting takes effect at once; a pause is honoured; a cancel ends the wait.
    pub async fn rate_limit(&self, bytes: u64) {
        let mut delay = self.account(bytes);
        while !delay.is_zero() {
            if self.is_cancelled() {
                return;
            }
            self.sleep_until(Instant::now() + delay).await;
            delay = self.account(0);
        }
    }

    fn account(&self, bytes: u64) -> Duration {
        let now = Instant::now();
        let mut st = self.shared.lock();
        match st.jobs.get_mut(&self.key) {
            Some(j) => j.limit.account(bytes, now),
            None => Duration::ZERO,
        }
    }

    /// Waits for `fut` while the job is idle (QEMU's `job_yield` around work done
    /// elsewhere, such as copy workers). A pause takes effect at once and, if `fut`
    /// finishes while paused, the result is handed back only after the resume. Returns
    /// `None` (dropping `fut`) as soon as the job is cancelled.
    pub async fn wait_for<F: Future>(&self, fut: F) -> Option<F::Output> {
        tokio::pin!(fut);
        loop {
            let mut rx = match self.go_idle().await {
                Idle::Cancelled => return None,
                Idle::Paused => continue,
                Idle::Wait(rx) => rx,
            };
            tokio::select! {
                out = &mut fut => {
                    self.leave_idle().await;
                    return Some(out);
                }
                r = rx.changed() => {
                    self.leave_idle().await;
                    if r.is_err() {
                        return None;
                    }
                }
            }
        }
    }

    /// Sets the progress total (`len`, `total-progress`) in bytes.
    pub fn set_total(&self, total: u64) {
        self.with_job(|j| j.total = total);
    }

    /// Sets the total to what is done plus `remaining` (QEMU's
    /// `job_progress_set_remaining`).
    pub fn set_remaining(&self, remaining: u64) {
        self.with_job(|j| j.total = j.current.saturating_add(remaining));
    }

    /// Adds `bytes` to the progress (`offset`, `current-progress`).
    pub fn add_progress(&self, bytes: u64) {
        self.with_job(|j| j.current = j.current.saturating_add(bytes));
    }

    /// `(current, total)` progress.
    pub fn progress(&self) -> (u64, u64) {
        let st = self.shared.lock();
        st.jobs.get(&self.key).map_or((0, 0), |j| (j.current, j.total))
    }

    /// The current speed limit in bytes/s (0 = unlimited).
    pub fn speed(&self) -> u64 {
        self.shared.lock().jobs.get(&self.key).map_or(0, |j| j.speed)
    }

    fn with_job(&self, f: impl FnOnce(&mut super::core::JobData)) {
        let mut st = self.shared.lock();
        if let Some(j) = st.jobs.get_mut(&self.key) {
            f(j);
        }
    }

    /// Applies the job's error policy to an I/O error of its own (read errors follow
    /// `on-source-error`, write errors `on-target-error`), emits
    /// `BLOCK_JOB_ERROR {device, operation, action}`, and returns the action:
    /// - `Report`: end the job with `Err(JobFailure::io(err))`;
    /// - `Ignore`: retry;
    /// - `Stop`: the job is now user-paused with io-status `failed` (`nospace` for
    ///   ENOSPC); call [`pause_point`](JobContext::pause_point), which returns after
    ///   `job-resume` (or a cancel), then retry unless cancelled.
    pub fn error_action(&self, op: IoOperation, err: &io::Error) -> ErrorAction {
        let errno = super::error::errno(err);
        let mut st = self.shared.lock();
        let Some(j) = st.jobs.get_mut(&self.key) else { return ErrorAction::Report };
        let policy = match op {
            IoOperation::Read => j.on_source_error,
            IoOperation::Write => j.on_target_error,
        };
        let action = policy.action(errno);
        self.shared.emit(
            "BLOCK_JOB_ERROR",
            json!({"device": j.id, "operation": op.as_str(), "action": action.as_str()}),
        );
        if action == ErrorAction::Stop {
            if !j.user_paused {
                // Visible as a user pause, so that job-resume resumes it.
                self.shared.pause(j);
                j.user_paused = true;
            }
            j.io_status = if errno == Some(ENOSPC) { IoStatus::Nospace } else { IoStatus::Failed };
        }
        action
    }

    /// RUNNING → READY, with `BLOCK_JOB_READY` (mirror-like jobs, which then wait for
    /// `job-complete`; backup never does this).
    pub fn set_ready(&self) {
        let mut st = self.shared.lock();
        let Some(j) = st.jobs.get_mut(&self.key) else { return };
        if j.status != JobStatus::Running {
            return;
        }
        self.shared.transition(j, JobStatus::Ready);
        self.shared.emit(
            "BLOCK_JOB_READY",
            json!({"type": j.job_type.as_str(), "device": j.id, "len": j.total,
                   "offset": j.current, "speed": j.speed}),
        );
    }
}
