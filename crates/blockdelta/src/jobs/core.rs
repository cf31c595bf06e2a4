//! The state every job lives in, and the procedures that move jobs through their
//! lifecycle: pause and wake-up, cancellation, completion, and the transaction-wide
//! success, finalize and abort paths.
//!
//! Locking. QEMU runs all of this under one global job mutex and the main loop, so a
//! QMP command never sees a transaction half-finalized. Here:
//! - `state` (a `std::sync::Mutex`) holds every job and transaction; it is held only
//!   briefly and never across an `.await`. Events are emitted while it is held, so their
//!   order is the order of the state changes.
//! - `op_lock` (a `tokio::sync::Mutex`) serializes the operations that may call driver
//!   hooks or wait for other jobs: every verb, and a job's completion. It plays the
//!   part of QEMU's main loop. A job whose transaction is already aborting completes
//!   without it (the aborting operation holds it and waits for that job).
//! - `changed` is bumped on every state change; waiters (drain, abort, tests) subscribe
//!   to it. Each job's `wake` is bumped to wake its task (resume, cancel, set-speed).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{Map, Value, json};
use tokio::sync::watch;

use super::driver::DynDriver;
use super::error::JobFailure;
use super::policy::{IoStatus, OnError};
use super::ratelimit::RateLimit;
use super::status::JobStatus;
use super::{EventSink, JobType};

pub(crate) struct Shared {
    pub(crate) state: Mutex<State>,
    events: EventSink,
    pub(crate) op_lock: tokio::sync::Mutex<()>,
    changed: watch::Sender<u64>,
}

#[derive(Default)]
pub(crate) struct State {
    pub(crate) jobs: HashMap<u64, JobData>,
    /// Keys in creation order; queries list them newest first.
    pub(crate) order: Vec<u64>,
    pub(crate) txns: HashMap<u64, TxnData>,
    pub(crate) next_key: u64,
}

pub(crate) struct TxnData {
    /// Newest first: the order QEMU moves them to PENDING and finalizes them in.
    pub(crate) jobs: Vec<u64>,
    pub(crate) aborting: bool,
}

pub(crate) struct JobData {
    pub(crate) id: String,
    pub(crate) job_type: JobType,
    pub(crate) driver: Arc<dyn DynDriver>,
    pub(crate) status: JobStatus,
    /// The status to return to when a pause ends (running or ready).
    pub(crate) saved_status: JobStatus,
    pub(crate) txn: u64,
    /// User pauses (at most one) plus drains plus error stops.
    pub(crate) pause_count: u32,
    pub(crate) user_paused: bool,
    /// The task is stopped at a pause point.
    pub(crate) paused: bool,
    /// The task is executing driver code (not waiting in a context wait or pause).
    pub(crate) busy: bool,
    pub(crate) started: bool,
    /// `run` has returned (QEMU: the job is "completed").
    pub(crate) body_done: bool,
    pub(crate) cancelled: bool,
    pub(crate) force_cancel: bool,
    /// The job's result, once `run` returned (or it was cancelled before starting).
    pub(crate) result: Option<Result<(), JobFailure>>,
    pub(crate) auto_finalize: bool,
    pub(crate) auto_dismiss: bool,
    pub(crate) speed: u64,
    pub(crate) limit: RateLimit,
    pub(crate) current: u64,
    pub(crate) total: u64,
    pub(crate) on_source_error: OnError,
    pub(crate) on_target_error: OnError,
    pub(crate) io_status: IoStatus,
    pub(crate) nodes: Vec<String>,
    pub(crate) wake: watch::Sender<u64>,
}

impl JobData {
    /// QEMU's `job_is_cancelled`: a cancel was requested and it is forced.
    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancelled && self.force_cancel
    }

    pub(crate) fn kick(&self) {
        self.wake.send_modify(|v| *v = v.wrapping_add(1));
    }

    pub(crate) fn failure(&self) -> Option<&JobFailure> {
        match &self.result {
            Some(Err(e)) => Some(e),
            _ => None,
        }
    }

    pub(crate) fn job_info(&self) -> Value {
        let mut m = Map::new();
        m.insert("id".into(), json!(self.id));
        m.insert("type".into(), json!(self.job_type.as_str()));
        m.insert("status".into(), json!(self.status.as_str()));
        m.insert("current-progress".into(), json!(self.current));
        m.insert("total-progress".into(), json!(self.total));
        if let Some(e) = self.failure() {
            m.insert("error".into(), json!(e.message()));
        }
        Value::Object(m)
    }

    pub(crate) fn block_job_info(&self) -> Value {
        let mut m = Map::new();
        m.insert("type".into(), json!(self.job_type.as_str()));
        m.insert("device".into(), json!(self.id));
        m.insert("len".into(), json!(self.total));
        m.insert("offset".into(), json!(self.current));
        m.insert("busy".into(), json!(self.busy));
        m.insert("paused".into(), json!(self.pause_count > 0));
        m.insert("speed".into(), json!(self.speed));
        m.insert("io-status".into(), json!(self.io_status.as_str()));
        m.insert(
            "ready".into(),
            json!(matches!(self.status, JobStatus::Ready | JobStatus::Standby)),
        );
        m.insert("status".into(), json!(self.status.as_str()));
        m.insert("auto-finalize".into(), json!(self.auto_finalize));
        m.insert("auto-dismiss".into(), json!(self.auto_dismiss));
        if let Some(e) = self.failure() {
            m.insert("error".into(), json!(e.message()));
        }
        Value::Object(m)
    }

    /// `{type, device, len, offset, speed}`: the common part of the completion events.
    fn end_event(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("type".into(), json!(self.job_type.as_str()));
        m.insert("device".into(), json!(self.id));
        m.insert("len".into(), json!(self.total));
        m.insert("offset".into(), json!(self.current));
        m.insert("speed".into(), json!(self.speed));
        m
    }
}

impl Shared {
    pub(crate) fn new(events: EventSink) -> Self {
        Shared {
            state: Mutex::new(State::default()),
            events,
            op_lock: tokio::sync::Mutex::new(()),
            changed: watch::channel(0).0,
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent-enough state (every update is
        // a few field writes); keep serving rather than cascading the panic.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn emit(&self, name: &'static str, data: Value) {
        (self.events)(name, data);
    }

    /// Wakes everyone waiting for some job's state to change.
    pub(crate) fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Moves a job to `to`, emitting `JOB_STATUS_CHANGE` if the status changes.
    pub(crate) fn transition(&self, j: &mut JobData, to: JobStatus) {
        let from = j.status;
        // Every caller follows QEMU's table; a miss is a bug here, not bad input.
        debug_assert!(from.can_transition_to(to), "job {}: {from} -> {to}", j.id);
        j.status = to;
        if from != to {
            self.emit("JOB_STATUS_CHANGE", json!({"id": j.id, "status": to.as_str()}));
        }
        self.notify();
    }

    /// The job stops at a pause point: paused (standby when ready).
    pub(crate) fn enter_pause(&self, j: &mut JobData) {
        j.saved_status = j.status;
        let to = if j.status == JobStatus::Ready { JobStatus::Standby } else { JobStatus::Paused };
        self.transition(j, to);
        j.paused = true;
        j.busy = false;
        self.notify();
    }

    /// Wakes a job stopped at a pause point. The waker makes the transition back (as
    /// QEMU's job coroutine does when entered synchronously), so the event precedes the
    /// reply to the command that woke it.
    pub(crate) fn wake_from_pause(&self, j: &mut JobData) {
        if j.paused {
            j.paused = false;
            j.busy = true;
            let back = j.saved_status;
            self.transition(j, back);
            j.kick();
        }
    }

    /// One more pause. A job idle in a context wait reaches its pause point at once (QEMU
    /// enters the sleeping coroutine), a busy one at its next pause point.
    pub(crate) fn pause(&self, j: &mut JobData) {
        j.pause_count += 1;
        if j.started
            && !j.body_done
            && !j.paused
            && !j.busy
            && !j.is_cancelled()
            && matches!(j.status, JobStatus::Running | JobStatus::Ready)
        {
            self.enter_pause(j);
        }
        self.notify();
    }

    /// One pause less; the last one wakes the job.
    pub(crate) fn resume(&self, j: &mut JobData) {
        j.pause_count = j.pause_count.saturating_sub(1);
        if j.pause_count == 0 {
            self.wake_from_pause(j);
        }
        self.notify();
    }

    /// Marks a cancel (QEMU's `job_cancel_async`): undoes a user pause, asks the driver
    /// whether it is forced. Waking the job is the caller's business.
    pub(crate) fn cancel_async(&self, j: &mut JobData, force: bool) {
        let force = j.driver.dyn_cancel(force);
        if j.user_paused {
            j.io_status = IoStatus::Ok;
            j.user_paused = false;
            j.pause_count = j.pause_count.saturating_sub(1);
        }
        j.cancelled = true;
        j.force_cancel |= force;
        self.notify();
    }

    /// Wakes a cancelled job wherever it waits, even paused by a drain: once cancelled
    /// it does not pause again.
    pub(crate) fn wake_cancelled(&self, j: &mut JobData) {
        self.wake_from_pause(j);
        j.kick();
    }

    /// QEMU's `job_update_rc`: a cancelled job's success becomes `Operation canceled`,
    /// and a failed job goes to ABORTING.
    pub(crate) fn update_rc(&self, j: &mut JobData) {
        if matches!(j.result, Some(Ok(()))) && j.is_cancelled() {
            j.result = Some(Err(JobFailure::cancelled()));
        }
        if matches!(j.result, Some(Err(_))) {
            self.transition(j, JobStatus::Aborting);
        }
    }

    /// Records the end of a job's body, then (unless its transaction is already being
    /// aborted, which will finish it) runs the success or abort path.
    pub(crate) async fn job_completed(self: &Arc<Self>, key: u64, result: Result<(), JobFailure>) {
        {
            let mut st = self.lock();
            let Some(j) = st.jobs.get_mut(&key) else { return };
            j.body_done = true;
            j.busy = false;
            j.result = Some(result);
            self.update_rc(j);
            let txn = j.txn;
            if st.txns.get(&txn).is_some_and(|t| t.aborting) {
                return;
            }
        }
        let _op = self.op_lock.lock().await;
        let failed = {
            let st = self.lock();
            let Some(j) = st.jobs.get(&key) else { return };
            if st.txns.get(&j.txn).is_some_and(|t| t.aborting) {
                return;
            }
            // Waiting, pending or beyond: someone else (a finalize or an abort that
            // took the op lock before us) already moved this job on.
            if j.status != JobStatus::Running
                && j.status != JobStatus::Ready
                && j.status != JobStatus::Aborting
            {
                return;
            }
            j.failure().is_some()
        };
        if failed {
            self.txn_abort(key).await;
        } else {
            self.txn_success(key).await;
        }
    }

    /// A job succeeded: WAITING; when the whole transaction has, every job goes PENDING
    /// (newest first, with `BLOCK_JOB_PENDING` for manual-finalize jobs), and if none
    /// needs manual finalization, the transaction is finalized. Caller holds `op_lock`.
    async fn txn_success(self: &Arc<Self>, key: u64) {
        let finalize_txn = {
            let mut st = self.lock();
            let Some(j) = st.jobs.get_mut(&key) else { return };
            self.transition(j, JobStatus::Waiting);
            let txn = j.txn;
            let members = st.txns.get(&txn).map(|t| t.jobs.clone()).unwrap_or_default();
            if members.iter().any(|k| st.jobs.get(k).is_some_and(|o| !o.body_done)) {
                return;
            }
            let mut all_auto = true;
            for k in &members {
                if let Some(o) = st.jobs.get_mut(k) {
                    self.transition(o, JobStatus::Pending);
                    if !o.auto_finalize {
                        all_auto = false;
                        self.emit(
                            "BLOCK_JOB_PENDING",
                            json!({"type": o.job_type.as_str(), "id": o.id}),
                        );
                    }
                }
            }
            all_auto.then_some(txn)
        };
        if let Some(txn) = finalize_txn {
            self.do_finalize(txn).await;
        }
    }

    /// Finalizes a transaction whose jobs are all PENDING: `prepare` each, then commit
    /// (or, if a prepare failed, abort) each. Caller holds `op_lock`.
    pub(crate) async fn do_finalize(self: &Arc<Self>, txn: u64) {
        let members = self.txn_members(txn);
        for k in &members {
            let driver = {
                let st = self.lock();
                match st.jobs.get(k) {
                    Some(j) if matches!(j.result, Some(Ok(()))) => j.driver.clone(),
                    _ => continue,
                }
            };
            if let Err(e) = driver.dyn_prepare().await {
                {
                    let mut st = self.lock();
                    if let Some(j) = st.jobs.get_mut(k) {
                        j.result = Some(Err(e));
                        self.update_rc(j);
                    }
                }
                self.txn_abort(*k).await;
                return;
            }
        }
        for k in members {
            self.finalize_single(k).await;
        }
    }

    /// Aborts the transaction of `key` (QEMU's `job_completed_txn_abort`): every other
    /// job is force-cancelled, all are waited for (each goes ABORTING as its body
    /// returns), then each is finalized, newest first. Caller holds `op_lock`.
    pub(crate) async fn txn_abort(self: &Arc<Self>, key: u64) {
        let txn = {
            let mut st = self.lock();
            let Some(j) = st.jobs.get(&key) else { return };
            let txn = j.txn;
            let Some(t) = st.txns.get_mut(&txn) else { return };
            if t.aborting {
                return;
            }
            t.aborting = true;
            let members = t.jobs.clone();
            for k in members {
                if k == key {
                    continue;
                }
                let Some(o) = st.jobs.get_mut(&k) else { continue };
                self.cancel_async(o, true);
                if !o.started {
                    // Never started: it completes here, as QEMU's cancel does.
                    o.body_done = true;
                    o.result = Some(Err(JobFailure::cancelled()));
                    self.update_rc(o);
                } else {
                    self.wake_cancelled(o);
                }
            }
            txn
        };
        loop {
            let mut rx = self.subscribe();
            {
                let st = self.lock();
                let members = st.txns.get(&txn).map(|t| t.jobs.clone()).unwrap_or_default();
                if members.iter().all(|k| st.jobs.get(k).is_none_or(|o| o.body_done)) {
                    break;
                }
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
        for k in self.txn_members(txn) {
            self.finalize_single(k).await;
        }
    }

    fn txn_members(&self, txn: u64) -> Vec<u64> {
        self.lock().txns.get(&txn).map(|t| t.jobs.clone()).unwrap_or_default()
    }

    /// Commit or abort, clean, the completion event, CONCLUDED, and with auto-dismiss
    /// NULL. Caller holds `op_lock`.
    async fn finalize_single(self: &Arc<Self>, key: u64) {
        let (driver, ok) = {
            let mut st = self.lock();
            let Some(j) = st.jobs.get_mut(&key) else { return };
            // A job that succeeded but whose grouped peer failed is cancelled by now.
            self.update_rc(j);
            (j.driver.clone(), matches!(j.result, Some(Ok(()))))
        };
        if ok {
            driver.dyn_commit().await;
        } else {
            driver.dyn_abort().await;
        }
        driver.dyn_clean().await;
        let mut st = self.lock();
        let Some(j) = st.jobs.get_mut(&key) else { return };
        if j.started {
            let mut data = j.end_event();
            if j.is_cancelled() {
                self.emit("BLOCK_JOB_CANCELLED", Value::Object(data));
            } else {
                if let Some(e) = j.failure() {
                    data.insert("error".into(), json!(e.message()));
                }
                self.emit("BLOCK_JOB_COMPLETED", Value::Object(data));
            }
        }
        let txn = j.txn;
        self.transition(j, JobStatus::Concluded);
        let dismiss = j.auto_dismiss;
        if let Some(t) = st.txns.get_mut(&txn) {
            t.jobs.retain(|k| *k != key);
            if t.jobs.is_empty() {
                st.txns.remove(&txn);
            }
        }
        if dismiss {
            self.dismiss(&mut st, key);
        }
    }

    /// CONCLUDED → NULL, and the job leaves the registry.
    pub(crate) fn dismiss(&self, st: &mut State, key: u64) {
        if let Some(j) = st.jobs.get_mut(&key) {
            self.transition(j, JobStatus::Null);
        }
        st.jobs.remove(&key);
        st.order.retain(|k| *k != key);
        self.notify();
    }
}
