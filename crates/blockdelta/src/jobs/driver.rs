//! The trait a job's implementation (its *driver*) provides, and its type-erased form.

use std::future::Future;
use std::pin::Pin;

use super::context::JobContext;
use super::error::JobFailure;

/// What a kind of job does. The job layer calls these; they must not call the job's
/// own verbs (`Job::cancel` and so on), which wait for the job layer's lock.
///
/// Order of calls, as in QEMU:
/// 1. [`run`](JobDriver::run), once the job is started and past its first pause point.
/// 2. When every job of the transaction has finished its `run` successfully and the
///    transaction is finalized (at once with auto-finalize, else at `job-finalize`):
///    [`prepare`](JobDriver::prepare) of each job; if one fails, the transaction aborts.
/// 3. For each job of the transaction, newest first: [`commit`](JobDriver::commit) if
///    every job succeeded, else [`abort`](JobDriver::abort) (a failed or cancelled job,
///    and every job of a grouped transaction with one), then [`clean`](JobDriver::clean),
///    then its `BLOCK_JOB_COMPLETED` or `BLOCK_JOB_CANCELLED` event.
///
/// A backup settles its bitmap in `commit`/`abort` (spec 5.4) and removes its
/// copy-before-write filter in `clean`.
pub trait JobDriver: Send + Sync + 'static {
    /// The job's body. Call [`JobContext::pause_point`] (or the context's waits) often:
    /// that is where a pause takes effect and a cancel is noticed. Return
    /// `Err(JobFailure)` to fail the job; after a cancel, return anything (`Ok` is
    /// turned into `Operation canceled`).
    fn run(&self, ctx: &JobContext) -> impl Future<Output = Result<(), JobFailure>> + Send;

    /// Called at finalization before any commit or abort, for jobs that succeeded.
    fn prepare(&self) -> impl Future<Output = Result<(), JobFailure>> + Send {
        async { Ok(()) }
    }

    /// The transaction succeeded: make the job's effects permanent.
    fn commit(&self) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// The job failed, was cancelled, or a job of its grouped transaction did.
    fn abort(&self) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// Called after `commit` or `abort`, always.
    fn clean(&self) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// Called (under the job layer's lock: keep it short, do not block) when a cancel
    /// is requested. Returns whether the cancel is forced; only a forced cancel makes
    /// [`JobContext::is_cancelled`] true. The default forces, as QEMU does for drivers
    /// without a cancel callback (backup always forces). A driver can use this to
    /// interrupt I/O in flight.
    fn cancel(&self, force: bool) -> bool {
        let _ = force;
        true
    }

    /// Whether `job-complete` applies to this kind of job (mirror); backup: no.
    fn can_complete(&self) -> bool {
        false
    }

    /// `job-complete` of a ready job whose driver [`can_complete`](JobDriver::can_complete).
    fn complete(&self) -> Result<(), String> {
        Ok(())
    }
}

pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// [`JobDriver`] with boxed futures, so that jobs of any driver live in one registry.
pub(crate) trait DynDriver: Send + Sync {
    fn dyn_run<'a>(&'a self, ctx: &'a JobContext) -> BoxFuture<'a, Result<(), JobFailure>>;
    fn dyn_prepare(&self) -> BoxFuture<'_, Result<(), JobFailure>>;
    fn dyn_commit(&self) -> BoxFuture<'_, ()>;
    fn dyn_abort(&self) -> BoxFuture<'_, ()>;
    fn dyn_clean(&self) -> BoxFuture<'_, ()>;
    fn dyn_cancel(&self, force: bool) -> bool;
    fn dyn_can_complete(&self) -> bool;
    fn dyn_complete(&self) -> Result<(), String>;
}

impl<D: JobDriver> DynDriver for D {
    fn dyn_run<'a>(&'a self, ctx: &'a JobContext) -> BoxFuture<'a, Result<(), JobFailure>> {
        Box::pin(self.run(ctx))
    }
    fn dyn_prepare(&self) -> BoxFuture<'_, Result<(), JobFailure>> {
        Box::pin(self.prepare())
    }
    fn dyn_commit(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.commit())
    }
    fn dyn_abort(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.abort())
    }
    fn dyn_clean(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.clean())
    }
    fn dyn_cancel(&self, force: bool) -> bool {
        self.cancel(force)
    }
    fn dyn_can_complete(&self) -> bool {
        self.can_complete()
    }
    fn dyn_complete(&self) -> Result<(), String> {
        self.complete()
    }
}
