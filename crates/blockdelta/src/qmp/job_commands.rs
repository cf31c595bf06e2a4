//! The backup and job commands: `blockdev-backup`, `job-*`, `block-job-*`, `query-jobs`
//! and `query-block-jobs`, on the job layer (`crate::jobs`).

use std::sync::Arc;

use serde_json::{Value, json};

use super::drive_backup::{DriveBackupJob, OwnedTarget};
use super::protocol::{ErrorClass, QmpError};
use super::{Qmp, finish, generic, reader};
use crate::jobs::backup::{Backup, BackupJob, BackupOptions};
use crate::jobs::{Job, JobError, JobOptions, JobType};

/// The commands of this module.
pub(super) const COMMANDS: &[&str] = &[
    "blockdev-backup",
    "drive-backup",
    "query-jobs",
    "query-block-jobs",
    "job-pause",
    "job-resume",
    "job-cancel",
    "job-complete",
    "job-finalize",
    "job-dismiss",
    "block-job-pause",
    "block-job-resume",
    "block-job-cancel",
    "block-job-complete",
    "block-job-set-speed",
    "block-job-finalize",
    "block-job-dismiss",
];

/// A job-layer error as QMP reports it (`Block job … not found` is `DeviceNotActive`).
pub(super) fn job_error(e: JobError) -> QmpError {
    let class = match e.class() {
        "DeviceNotActive" => ErrorClass::DeviceNotActive,
        _ => ErrorClass::GenericError,
    };
    QmpError { class, desc: e.to_string() }
}

/// A backup created but not started: what `blockdev-backup` and the transaction action
/// prepare. `start` runs it; dropping it unstarted is not allowed (use `cancel`).
pub(super) struct PreparedBackup {
    pub(super) job: Job,
}

/// Creates a backup job (not started) from `blockdev-backup` arguments. With `owned`
/// (`drive-backup`), the job removes its target node when it is cleaned up.
pub(super) fn create_backup(
    qmp: &Qmp,
    options: BackupOptions,
    txn: Option<crate::jobs::JobTxn>,
    owned: Option<OwnedTarget>,
) -> Result<PreparedBackup, QmpError> {
    let jobs = qmp.jobs();
    let backup =
        Backup::create(qmp.graph(), options, |id| jobs.check_new_id(id)).map_err(|e| match e {
            crate::jobs::backup::BackupError::JobId(e) => job_error(e),
            other => generic(other),
        })?;
    let o = &backup.options;
    let mut opts = JobOptions::new(backup.job_id.clone(), JobType::Backup);
    opts.txn = txn;
    opts.auto_finalize = o.auto_finalize;
    opts.auto_dismiss = o.auto_dismiss;
    opts.speed = o.speed;
    opts.on_source_error = o.on_source_error;
    opts.on_target_error = o.on_target_error;
    opts.nodes = vec![o.device.clone(), o.target.clone()];
    let backup = Arc::new(backup);
    let job = BackupJob(backup.clone());
    let created = match owned {
        None => jobs.create(opts, job),
        Some(target) => jobs.create(opts, DriveBackupJob { inner: job, target }),
    };
    match created {
        Ok(job) => Ok(PreparedBackup { job }),
        Err(e) => {
            // Nothing ran: undo the freeze and the copy-before-write step.
            let _ = backup.abort();
            backup.clean();
            Err(job_error(e))
        }
    }
}

pub(super) async fn execute(
    qmp: &Qmp,
    command: &str,
    args: Value,
) -> Option<Result<Value, QmpError>> {
    Some(run(qmp, command, args).await)
}

async fn run(qmp: &Qmp, command: &str, args: Value) -> Result<Value, QmpError> {
    let jobs = qmp.jobs();
    match command {
        "blockdev-backup" => {
            let options = BackupOptions::from_value(args).map_err(generic)?;
            // QEMU creates and starts the job inside a drained section (which also
            // gives running jobs their paused/running pair).
            let mut drain = jobs.drain_all().await;
            // Drains the source and may scan it (sync=top): off the event loop.
            let prepared =
                crate::block::off_event_loop(|| create_backup(qmp, options, None, None))?;
            drain.include(&prepared.job);
            prepared.job.start().map_err(job_error)?;
            drop(drain);
            Ok(json!({}))
        }
        "drive-backup" => {
            let args = super::drive_backup::parse(args, "")?;
            // As for blockdev-backup; QEMU also creates and opens the target drained.
            let mut drain = jobs.drain_all().await;
            let prepared =
                crate::block::off_event_loop(|| super::drive_backup::prepare(qmp, args, None))?;
            drain.include(&prepared.job);
            prepared.job.start().map_err(job_error)?;
            drop(drain);
            Ok(json!({}))
        }
        "query-jobs" => {
            finish(reader(args)?)?;
            Ok(jobs.query_jobs())
        }
        "query-block-jobs" => {
            finish(reader(args)?)?;
            Ok(jobs.query_block_jobs())
        }
        _ => {
            let block = command.starts_with("block-job-");
            let verb = command.strip_prefix("block-job-").or_else(|| command.strip_prefix("job-"));
            let Some(verb) = verb else {
                return Err(QmpError::command_not_found(format!(
                    "The command {command} has not been found"
                )));
            };
            let mut r = reader(args)?;
            let key =
                if !block || matches!(verb, "finalize" | "dismiss") { "id" } else { "device" };
            let id = r.require_str(key).map_err(generic)?;
            let force = if verb == "cancel" && block {
                r.take_bool("force").map_err(generic)?.unwrap_or(false)
            } else {
                false
            };
            let speed = if verb == "set-speed" {
                let v = r
                    .take_value("speed")
                    .ok_or_else(|| QmpError::generic("Parameter 'speed' is missing"))?;
                Some(v.as_i64().ok_or_else(|| {
                    QmpError::generic("Invalid parameter type for 'speed', expected: integer")
                })?)
            } else {
                None
            };
            finish(r)?;
            let job = if block { jobs.block_job(&id) } else { jobs.job(&id) }.map_err(job_error)?;
            let result = match verb {
                "pause" => job.pause().await,
                "resume" => job.resume().await,
                "cancel" if block => job.block_job_cancel(force).await,
                "cancel" => job.cancel(true).await,
                "complete" => job.complete().await,
                "finalize" => job.finalize().await,
                "dismiss" => job.dismiss().await,
                "set-speed" => job.set_speed(speed.unwrap_or(0)).await,
                _ => {
                    return Err(QmpError::command_not_found(format!(
                        "The command {command} has not been found"
                    )));
                }
            };
            result.map(|()| json!({})).map_err(job_error)
        }
    }
}
