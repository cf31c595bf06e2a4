//! The backup job's own part: `blockdev-backup` arguments with QEMU's checks in QEMU's
//! order, the set-up at job creation (the sync bitmap frozen and the copy-before-write
//! step installed at one drained point in time), the background copy, and the settlement
//! of the sync bitmap at commit or abort (spec sections 3.4 and 5).
//!
//! The generic job machinery (states, verbs, events, pause, rate limit, error policy)
//! runs it as [`BackupJob`].

use std::io;
use std::sync::{Arc, Mutex, PoisonError};

use serde_json::Value;

use crate::block::dirty_bitmap::{BitmapError, BitmapId, BitmapSyncMode, Checks, JobOutcome};
use crate::block::graph::BlockGraph;
use crate::block::node::{BeforeWriteId, Node};
use crate::block::options::{OptionsError, OptionsReader, Syntax};

use super::block_copy::{BlockCopy, CopyBeforeWrite, CopyError, InitialCopy, MAX_CHUNK};
use super::{ErrorAction, IoOperation, JobContext, JobDriver, JobError, JobFailure, OnError};

/// The smallest job cluster (QEMU's block-copy default).
pub const MIN_CLUSTER: u64 = 64 * 1024;
/// Background copies in flight at once.
pub const WORKERS: usize = 8;

/// `sync` of a backup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// Everything.
    Full,
    /// What the top layer holds.
    Top,
    /// Nothing in the background; copy-before-write only (fleecing).
    None,
    /// The clusters of a bitmap (`incremental` is this with `on-success`).
    Bitmap,
}

impl SyncMode {
    /// QMP's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SyncMode::Full => "full",
            SyncMode::Top => "top",
            SyncMode::None => "none",
            SyncMode::Bitmap => "bitmap",
        }
    }
}

/// The arguments of `blockdev-backup` (QEMU's `BlockdevBackup`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupOptions {
    /// `job-id` (QEMU derives a default from a device name; nodes have none).
    pub job_id: Option<String>,
    /// The source node.
    pub device: String,
    /// The target node.
    pub target: String,
    /// `sync` as given (`incremental` included).
    pub sync: String,
    /// Bytes per second for the background copy; 0 = unlimited (negative is refused
    /// when the job is created, as QEMU does).
    pub speed: i64,
    /// The sync bitmap's name.
    pub bitmap: Option<String>,
    /// `bitmap-mode`.
    pub bitmap_mode: Option<BitmapSyncMode>,
    /// `compress`.
    pub compress: bool,
    /// `on-source-error`.
    pub on_source_error: OnError,
    /// `on-target-error`.
    pub on_target_error: OnError,
    /// `auto-finalize` (default true).
    pub auto_finalize: bool,
    /// `auto-dismiss` (default true).
    pub auto_dismiss: bool,
    /// `filter-node-name`, accepted for compatibility (blockdelta has no filter node).
    pub filter_node_name: Option<String>,
    /// `x-perf.max-workers`.
    pub max_workers: Option<u64>,
}

impl BackupOptions {
    /// Reads the arguments (QMP JSON) with QEMU's texts for missing, unexpected and
    /// mistyped members.
    pub fn from_value(value: Value) -> Result<Self, OptionsError> {
        Self::from_value_at(value, "")
    }

    /// [`from_value`](Self::from_value) for arguments at `at` (e.g. `actions[0].data` in
    /// a transaction), so that errors name the full path as QEMU's do.
    pub fn from_value_at(value: Value, at: &str) -> Result<Self, OptionsError> {
        let mut r = OptionsReader::new(value, at, Syntax::Json)?;
        let job_id = r.take_str("job-id")?;
        let device = r.require_str("device")?;
        let target = r.require_str("target")?;
        let sync = r
            .take_enum("sync", &["top", "full", "none", "incremental", "bitmap"])?
            .ok_or_else(|| OptionsError::Missing(r.path("sync")))?;
        let speed = match r.take_value("speed") {
            None => 0,
            Some(v) => v.as_i64().ok_or_else(|| OptionsError::InvalidType {
                key: r.path("speed"),
                expected: "integer".into(),
            })?,
        };
        let bitmap = r.take_str("bitmap")?;
        let bitmap_mode =
            r.take_enum("bitmap-mode", &["on-success", "never", "always"])?.map(|m| {
                match m.as_str() {
                    "on-success" => BitmapSyncMode::OnSuccess,
                    "never" => BitmapSyncMode::Never,
                    _ => BitmapSyncMode::Always,
                }
            });
        let compress = r.take_bool("compress")?.unwrap_or(false);
        let policies = ["report", "ignore", "enospc", "stop", "auto"];
        let on_source_error =
            r.take_enum("on-source-error", &policies)?.map(|p| on_error(&p)).unwrap_or_default();
        let on_target_error =
            r.take_enum("on-target-error", &policies)?.map(|p| on_error(&p)).unwrap_or_default();
        let auto_finalize = r.take_bool("auto-finalize")?.unwrap_or(true);
        let auto_dismiss = r.take_bool("auto-dismiss")?.unwrap_or(true);
        let filter_node_name = r.take_str("filter-node-name")?;
        r.take_bool("discard-source")?;
        let mut max_workers = None;
        if let Some(perf) = r.take_value("x-perf") {
            let mut p = OptionsReader::new(perf, &r.path("x-perf"), Syntax::Json)?;
            p.take_bool("use-copy-range")?;
            max_workers = p.take_u64("max-workers")?;
            p.take_u64("max-chunk")?;
            p.take_u64("min-cluster-size")?;
            p.finish()?;
        }
        r.finish()?;
        Ok(BackupOptions {
            job_id,
            device,
            target,
            sync,
            speed,
            bitmap,
            bitmap_mode,
            compress,
            on_source_error,
            on_target_error,
            auto_finalize,
            auto_dismiss,
            filter_node_name,
            max_workers,
        })
    }
}

fn on_error(policy: &str) -> OnError {
    match policy {
        "ignore" => OnError::Ignore,
        "enospc" => OnError::Enospc,
        "stop" => OnError::Stop,
        "auto" => OnError::Auto,
        _ => OnError::Report,
    }
}

/// Why a backup could not be created. `Display` is QEMU's text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackupError {
    /// No node of that name.
    #[error("Cannot find device='{0}' nor node-name='{0}'")]
    NodeNotFound(String),
    /// sync=bitmap or incremental without a bitmap.
    #[error("must provide a valid bitmap name for '{0}' sync mode")]
    NoBitmapName(String),
    /// sync=incremental with a mode other than on-success.
    #[error("Bitmap sync mode must be 'on-success' when using sync mode 'incremental'")]
    IncrementalMode,
    /// The bitmap is not on the source node.
    #[error("Bitmap '{0}' could not be found")]
    BitmapNotFound(String),
    /// A bitmap without a mode.
    #[error("Bitmap sync mode must be given when providing a bitmap")]
    NoBitmapMode,
    /// sync=none with a bitmap.
    #[error("sync mode 'none' does not produce meaningful bitmap outputs")]
    NoneWithBitmap,
    /// mode=never with a sync other than bitmap.
    #[error("Bitmap sync mode 'never' has no meaningful effect when combined with sync mode '{0}'")]
    NeverWithSync(String),
    /// A mode without a bitmap.
    #[error("Cannot specify bitmap sync mode without a bitmap")]
    ModeWithoutBitmap,
    /// The job id is not an identifier, or is taken.
    #[error(transparent)]
    JobId(#[from] JobError),
    /// Source and target are one node.
    #[error("Source and target cannot be the same")]
    SameNode,
    /// `compress` on a target that cannot take compressed writes.
    #[error("Compression is not supported for this drive {0}")]
    Compression(String),
    /// `x-perf.max-workers` out of range.
    #[error("max-workers must be between 1 and 2147483647")]
    MaxWorkers,
    /// The target is read-only.
    #[error("Block node is read-only")]
    ReadOnlyTarget,
    /// Lengths differ.
    #[error("Source and target image have different sizes")]
    SizeMismatch,
    /// A bitmap check or the freeze failed.
    #[error(transparent)]
    Bitmap(#[from] BitmapError),
    /// Setting up the copy failed.
    #[error("{0}")]
    Setup(String),
}

/// A created backup: the sync bitmap frozen, the copy-before-write step installed.
#[derive(Debug)]
pub struct Backup {
    /// The job's id.
    pub job_id: String,
    /// The options it was created with.
    pub options: BackupOptions,
    /// The sync mode after `incremental` was rewritten.
    pub sync: SyncMode,
    source: Arc<Node>,
    target: Arc<Node>,
    copy: Arc<BlockCopy>,
    /// This backup's copy-before-write step on the source (other backups of the same
    /// source have their own).
    step: BeforeWriteId,
    /// The frozen sync bitmap and its mode.
    bitmap: Option<(BitmapId, BitmapSyncMode)>,
    /// Whether the source's resizes are still blocked (until clean-up).
    blocking_resize: Mutex<bool>,
}

impl Backup {
    /// Runs QEMU's checks in QEMU's order and sets the backup up: at one drained point
    /// in time, the sync bitmap gets its successor and the copy-before-write step goes
    /// into the source's write path. That instant is the backup's point in time.
    ///
    /// `check_id` runs the job layer's id checks (`Invalid job ID`, `Job ID … already in
    /// use`) where QEMU runs them.
    pub fn create(
        graph: &BlockGraph,
        options: BackupOptions,
        check_id: impl FnOnce(&str) -> Result<(), JobError>,
    ) -> Result<Backup, BackupError> {
        let source = graph
            .find(&options.device)
            .ok_or_else(|| BackupError::NodeNotFound(options.device.clone()))?;
        let target = graph
            .find(&options.target)
            .ok_or_else(|| BackupError::NodeNotFound(options.target.clone()))?;
        let mut sync = match options.sync.as_str() {
            "full" => SyncMode::Full,
            "top" => SyncMode::Top,
            "none" => SyncMode::None,
            _ => SyncMode::Bitmap,
        };
        let mut mode = options.bitmap_mode;
        // do_backup_common's checks, in order.
        if sync == SyncMode::Bitmap && options.bitmap.is_none() {
            return Err(BackupError::NoBitmapName(options.sync.clone()));
        }
        if options.sync == "incremental" {
            if mode.is_some_and(|m| m != BitmapSyncMode::OnSuccess) {
                return Err(BackupError::IncrementalMode);
            }
            mode = Some(BitmapSyncMode::OnSuccess);
        }
        let mut bitmap = None;
        if let Some(name) = &options.bitmap {
            let id = source
                .bitmaps()
                .find(name)
                .ok_or_else(|| BackupError::BitmapNotFound(name.clone()))?;
            let m = mode.ok_or(BackupError::NoBitmapMode)?;
            source.bitmaps().lookup(name, Checks::ALLOW_RO)?;
            if sync == SyncMode::None {
                return Err(BackupError::NoneWithBitmap);
            }
            if m == BitmapSyncMode::Never && sync != SyncMode::Bitmap {
                return Err(BackupError::NeverWithSync(sync.as_str().into()));
            }
            bitmap = Some((id, m));
        } else if mode.is_some() {
            return Err(BackupError::ModeWithoutBitmap);
        }
        if options.sync == "incremental" {
            sync = SyncMode::Bitmap;
        }
        // backup_job_create's checks.
        let job_id = options.job_id.clone().unwrap_or_default();
        if Arc::ptr_eq(&source, &target) {
            return Err(BackupError::SameNode);
        }
        if options.compress {
            return Err(BackupError::Compression(target.name().to_string()));
        }
        if options.max_workers.is_some_and(|w| w == 0 || w > i32::MAX as u64) {
            return Err(BackupError::MaxWorkers);
        }
        if target.read_only() {
            return Err(BackupError::ReadOnlyTarget);
        }
        if let Some((_, m)) = bitmap
            && m != BitmapSyncMode::Never
            && let Some(name) = &options.bitmap
        {
            source.bitmaps().lookup(name, Checks::DEFAULT)?;
        }
        if source.len() != target.len() {
            return Err(BackupError::SizeMismatch);
        }
        // QEMU creates the job (checking its id) after the bitmap checks and before
        // anything changes that a failure would have to undo here.
        check_id(&job_id)?;
        let cluster_size = target.cluster_size().unwrap_or(0).max(MIN_CLUSTER);
        // The point in time: no request in flight while the bitmap freezes and the
        // copy-before-write step goes in.
        // The job's length is fixed: no resizes of either node until clean-up. Blocked
        // before the drain, so that a resize cannot slip in between.
        source.block_resize(true);
        target.block_resize(true);
        let setup = source.drained(|| -> Result<_, BackupError> {
            if let Some((id, _)) = bitmap {
                source.bitmaps().create_successor(id)?;
            }
            let frozen = match bitmap {
                Some((id, _)) => Some(source.bitmaps().with_bits(id, Clone::clone)?),
                None => None,
            };
            let initial = match (sync, &frozen) {
                (SyncMode::Bitmap, Some(bits)) => InitialCopy::Bitmap(bits),
                (SyncMode::Top, _) => InitialCopy::AllocatedInTop,
                _ => InitialCopy::All,
            };
            let copy = BlockCopy::new(source.clone(), target.clone(), cluster_size, initial);
            let copy = match copy {
                Ok(c) => Arc::new(c),
                Err(e) => {
                    if let Some((id, _)) = bitmap {
                        let _ = source.bitmaps().reclaim(id);
                    }
                    return Err(BackupError::Setup(e.to_string()));
                }
            };
            let step = source.add_before_write(Arc::new(CopyBeforeWrite(copy.clone())));
            Ok((copy, step))
        });
        let (copy, step) = match setup {
            Ok(set) => set,
            Err(e) => {
                source.block_resize(false);
                target.block_resize(false);
                return Err(e);
            }
        };
        Ok(Backup {
            job_id,
            options,
            sync,
            source,
            target,
            copy,
            step,
            bitmap,
            blocking_resize: Mutex::new(true),
        })
    }

    /// The source node.
    pub fn source(&self) -> &Arc<Node> {
        &self.source
    }

    /// The target node.
    pub fn target(&self) -> &Arc<Node> {
        &self.target
    }

    /// The block-copy state.
    pub fn block_copy(&self) -> &Arc<BlockCopy> {
        &self.copy
    }

    /// The job's length in bytes (QEMU's `len`): what the copy bitmap holds at the start.
    pub fn total(&self) -> u64 {
        self.copy.remaining() + self.copy.done()
    }

    /// Commit (the job succeeded): the sync bitmap is settled as a success.
    pub fn commit(&self) -> Result<(), BitmapError> {
        self.settle(JobOutcome::Success)
    }

    /// Abort (failure or cancel): the sync bitmap is settled as a failure; with
    /// `always`, the clusters not copied go into the bitmap.
    pub fn abort(&self) -> Result<(), BitmapError> {
        self.settle(JobOutcome::Failure)
    }

    fn settle(&self, outcome: JobOutcome) -> Result<(), BitmapError> {
        let Some((id, mode)) = self.bitmap else { return Ok(()) };
        let uncopied = self.copy.uncopied();
        self.source.bitmaps().settle_backup_bitmap(id, mode, outcome, Some(&uncopied)).map(drop)
    }

    /// Clean-up after commit or abort: this backup's copy-before-write step (and only
    /// it) leaves the source's write path and resizes are allowed again. Writes in
    /// flight that already ran the step finish first (drained), so none is still
    /// copying into the target when the job's clean-up goes on.
    pub fn clean(&self) {
        self.source.drained(|| self.source.remove_before_write(self.step));
        let mut blocking = self.blocking_resize.lock().unwrap_or_else(PoisonError::into_inner);
        if std::mem::take(&mut *blocking) {
            self.source.block_resize(false);
            self.target.block_resize(false);
        }
    }
}

/// A backup as a job: the background copy is the body; commit and abort settle the sync
/// bitmap; clean removes the copy-before-write step.
#[derive(Debug, Clone)]
pub struct BackupJob(pub Arc<Backup>);

impl BackupJob {
    /// Copies a claimed range on a blocking thread.
    async fn copy(&self, range: std::ops::Range<u64>) -> Result<(), CopyError> {
        let copy = self.0.copy.clone();
        match tokio::task::spawn_blocking(move || copy.copy_claimed(range)).await {
            Ok(result) => result,
            Err(e) => Err(CopyError {
                operation: IoOperation::Read,
                source: io::Error::other(format!("copy task failed: {e}")),
                copied: 0,
            }),
        }
    }
}

/// Brings the job's progress up to the copy's: done bytes (background, partial chunks
/// up to their last whole cluster, and copy-before-write) and the remaining work.
fn report_progress(ctx: &JobContext, copy: &BlockCopy, reported: &mut u64) {
    let done = copy.done();
    ctx.add_progress(done.saturating_sub(*reported));
    *reported = done.max(*reported);
    ctx.set_remaining(copy.remaining());
}

/// Waits for the copies still in flight when the job stops (error or cancel): QEMU's
/// block-copy lets its running tasks finish and counts each that succeeds, so its final
/// `offset` includes them. The caller reports the progress afterwards.
async fn settle_in_flight(tasks: &mut tokio::task::JoinSet<(u64, Result<(), CopyError>)>) {
    while tasks.join_next().await.is_some() {}
}

impl JobDriver for BackupJob {
    /// Workers claim runs of clusters and copy them (several at once) until none is
    /// left, meeting pause points, noticing cancellation, obeying the rate limit and the
    /// error policy. sync=none copies nothing and waits to be cancelled.
    async fn run(&self, ctx: &JobContext) -> Result<(), JobFailure> {
        let backup = &self.0;
        ctx.set_total(backup.total());
        if backup.sync == SyncMode::None {
            while !ctx.is_cancelled() {
                ctx.sleep(std::time::Duration::from_millis(100)).await;
            }
            return Ok(());
        }
        let workers = backup.options.max_workers.map_or(WORKERS, |w| w.min(64) as usize);
        let mut tasks = tokio::task::JoinSet::new();
        let mut reported = 0;
        loop {
            ctx.pause_point().await;
            if ctx.is_cancelled() {
                settle_in_flight(&mut tasks).await;
                report_progress(ctx, &backup.copy, &mut reported);
                return Ok(());
            }
            // Rate-limited, one copy at a time, each waiting for the previous one's
            // bytes to be paid for (QEMU's block-copy delays the next chunk the same
            // way: a cancelled 64 KiB/s job has copied one chunk, not eight).
            // With a speed, QEMU also copies one cluster per chunk (measured: 64 KiB
            // after half a second at 64 KiB/s).
            let limited = ctx.speed() > 0;
            let allowed = if limited { 1 } else { workers.max(1) };
            let chunk = if limited { backup.copy.cluster_size() } else { MAX_CHUNK };
            while tasks.len() < allowed {
                let Some(range) = backup.copy.claim_next_at_most(chunk) else { break };
                let job = self.clone();
                let len = range.end - range.start;
                tasks.spawn(async move { (len, job.copy(range).await) });
            }
            let Some(joined) = tasks.join_next().await else {
                report_progress(ctx, &backup.copy, &mut reported);
                return Ok(());
            };
            let (len, result) = joined.map_err(|e| JobFailure::new(e.to_string()))?;
            // Copy-before-write copies count too, as in QEMU's shared progress meter.
            report_progress(ctx, &backup.copy, &mut reported);
            match result {
                Ok(()) => ctx.rate_limit(len).await,
                Err(e) => {
                    // As QEMU's block-copy call: no new copies after a failure; the
                    // running ones finish (and count) before the error policy acts, so
                    // a stopped job shows their progress while paused.
                    settle_in_flight(&mut tasks).await;
                    report_progress(ctx, &backup.copy, &mut reported);
                    match ctx.error_action(e.operation, &e.source) {
                        // The failed clusters went back into the copy bitmap: a retry
                        // claims them again.
                        ErrorAction::Ignore => {}
                        ErrorAction::Stop => ctx.pause_point().await,
                        _ => return Err(JobFailure::io(&e.source)),
                    }
                }
            }
        }
    }

    async fn commit(&self) {
        let _ = self.0.commit();
    }

    async fn abort(&self) {
        let _ = self.0.abort();
    }

    /// Drains the source (waits for writes in flight): off the event loop.
    async fn clean(&self) {
        crate::block::off_event_loop(|| self.0.clean());
    }
}
