//! Push-mode backups: a running daemon (`blockdelta serve` or `qemu-storage-daemon`)
//! copies its disk into a scratch image with a `blockdev-backup` job, driven over QMP,
//! so that the daemon's point-in-time copy (copy-before-write) and the successor
//! protocol do the work; the image's clusters then go into the chunk store.
//!
//! # Steps
//!
//! 1. Under the disk's repository lock (held to the end): connect, recover from any
//!    interrupted push backup of this disk ([`recover`], below), remove its leftover
//!    scratch images, check the backup an incremental builds on, and start the
//!    repository's writer (which registers it for `gc`).
//! 2. Create the scratch image `push-TAG-NNNN-TOKEN.qcow2` (no backing file) and
//!    `blockdev-add` it (qcow2 over file, `backing: null`: the job writes only whole
//!    clusters, so the daemon never needs the parent's data).
//! 3. One `transaction`, i.e. one instant: the *safety bitmap* (below), then for a full
//!    backup `block-dirty-bitmap-clear NAME` (or `-add` when NAME is absent, `-remove`
//!    when it is inconsistent: see *After a daemon crash*), then `blockdev-backup`
//!    (`sync=full`, or `sync=incremental bitmap=NAME` with the default
//!    `bitmap-mode=on-success`: on success NAME keeps exactly the writes made since the
//!    job started, i.e. since this backup's point in time; on failure it is reclaimed).
//! 4. Wait for `BLOCK_JOB_COMPLETED`; `blockdev-del` the target (the daemon closes it;
//!    it was added with `cache.no-flush`, as nothing needs it durable); store the
//!    clusters the image allocates, each chunk completed from the parent's ([`super::image_ingest`]); commit the index: only now does the backup
//!    exist. Remove the scratch image.
//! 5. Remove the safety bitmap.
//!
//! # Why no write is ever lost: the safety bitmap
//!
//! The danger is the window between the daemon settling NAME and the index's commit.
//! Once the job succeeds, NAME abdicates and forgets the writes copied into the new
//! image; if the client dies before the index exists, that image is an orphan (the
//! next run deletes it) and the next incremental, built on the previous index, would
//! miss those writes. `auto-finalize: false` only moves the window (a kill between
//! `job-finalize` and the commit), and the image cannot be read safely before the
//! daemon has closed it, which needs the job finalized.
//!
//! So the transaction first adds a bitmap `S = blockdelta-pending/DISK/ID/TOKEN/NAME`
//! (NAME's granularity and persistence) and merges NAME into it: at the backup's
//! instant S holds every write since the parent backup, and S is enabled, so it keeps
//! recording. Nothing ever clears S. It is removed only once the index that records
//! attempt TOKEN is durable, and by then the writes it held are in a backup the
//! repository knows. In every other case (a failed or cancelled job, a full backup's
//! cleared NAME, a killed client at any moment) S is merged back into NAME before it
//! is removed, which restores NAME to a superset of the writes since the newest
//! index; a superset costs copying a little more, never a missed write.
//!
//! A full backup where NAME holds no valid bits (NAME absent, or inconsistent) adds a
//! *fresh* S instead (its token ends in `-fresh`): empty at the instant, recording from
//! then on. Merging it back could not restore NAME: it lacks every write between the
//! newest committed backup and the instant. So an uncommitted fresh S makes NAME
//! unusable instead (below), and the next backup must be full.
//!
//! [`recover`] runs at the start of every push backup of the disk (under the lock, so
//! never beside a live client): it cancels this disk's orphan jobs and waits for them
//! to go (a cancel reclaims NAME; a job that already completed left S), deletes orphan
//! target nodes, then settles the safety bitmaps of each NAME:
//!
//! - committed (its index exists and records its token) → removed;
//! - uncommitted, and inconsistent (its bits are unknown) or fresh: NAME cannot be
//!   restored to a superset, so NAME must not serve an incremental: one `transaction`
//!   removes NAME (unless NAME is itself inconsistent, which is unusable as it is and
//!   says so to the next incremental) and every S of NAME; the incremental of that run
//!   is refused with [`RepoError::TrackingLost`] saying why, and later ones find NAME
//!   absent (or inconsistent): the next backup must be full. Never a silent loss.
//! - otherwise → merged into NAME (NAME re-created if it is gone; if NAME is
//!   inconsistent, it is removed first and re-created from the S, which hold every
//!   write it should), then removed.
//!
//! Each step is idempotent, so a client killed during recovery is recovered by the next
//! one. Job ids carry the attempt's token, so a new job never takes the end of an orphan
//! job with the same backup id for its own.
//!
//! # After a daemon crash: inconsistent bitmaps
//!
//! A persistent bitmap is marked in use in the qcow2 image while a daemon has the image
//! open for writing, and stored (flag cleared) on a clean stop. A daemon that crashes or
//! is killed leaves the flag set, and the next daemon loads the bitmap as
//! *inconsistent* (`"inconsistent": true` in `query-named-block-nodes`): disabled, no
//! bits, usable only by `block-dirty-bitmap-remove`. Change tracking is lost.
//!
//! - An incremental then fails before changing anything, with
//!   [`RepoError::TrackingLost`]: the daemon stopped without saving the bitmap, take a
//!   full backup (`--full`).
//! - `--full` replaces NAME: the transaction removes the inconsistent NAME at the
//!   instant and adds a fresh S; right after it, a second transaction adds NAME
//!   (same granularity, persistent where the image can hold it) and merges S into it,
//!   so NAME holds exactly the writes since the instant and records from then on.
//!   The add cannot be in the backup's transaction: both qemu-storage-daemon 10.0.2
//!   and `blockdelta serve` keep a bitmap removed in a transaction until the
//!   transaction commits, so an add of the same name in it fails (`Bitmap already
//!   exists`). If that second transaction fails, recovery cancels the job and the
//!   backup fails; NAME is then absent, and the next backup must be full again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use ::repo::writer::{BackupPlan, Basis};
use ::repo::{Backup, Progress, Repository, Timestamp, format_id, parse_id};
use qcow2::Qcow2Image;
use serde_json::{Value, json};
use sha2::Digest;

use super::image_ingest::ingest_image;
use super::{RepoError, Result, io_err};
use qmp_client::{Error as QmpClientError, QmpClient};

/// The bitmap a push backup uses when none is named.
pub const DEFAULT_BITMAP: &str = "blockdelta";

/// Prefix of safety bitmaps (see the module docs).
pub const PENDING_PREFIX: &str = "blockdelta-pending/";

/// What to back up and how.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// The daemon's QMP monitor socket.
    pub qmp: PathBuf,
    /// The node name of the disk in the daemon.
    pub node: String,
    /// The disk's name in the repository (default: the node name).
    pub disk: Option<String>,
    /// A full backup (a new chain) instead of an incremental.
    pub full: bool,
    /// The dirty bitmap on the node that tracks writes since the newest backup
    /// ([`DEFAULT_BITMAP`] when `None`).
    pub bitmap: Option<String>,
    /// How long to wait for the monitor and for each QMP reply.
    pub timeout: Duration,
    /// The backup job's speed in bytes per second (0: unlimited), so that a backup
    /// leaves the disk's bandwidth to its guest.
    pub speed: u64,
    /// Where the daemon writes the backup image before it is taken into the chunk
    /// store: a directory both the daemon and this process can reach.
    pub scratch: PathBuf,
    /// Threads storing chunks.
    pub jobs: usize,
}

impl PushOptions {
    /// Defaults: incremental, bitmap [`DEFAULT_BITMAP`], disk = node, 30 s timeout.
    pub fn new(
        qmp: impl Into<PathBuf>,
        node: impl Into<String>,
        scratch: impl Into<PathBuf>,
    ) -> Self {
        PushOptions {
            qmp: qmp.into(),
            node: node.into(),
            disk: None,
            full: false,
            bitmap: None,
            timeout: Duration::from_secs(30),
            speed: 0,
            scratch: scratch.into(),
            jobs: ::repo::pool::default_jobs(),
        }
    }
}

/// What a push backup did.
#[derive(Debug, Clone)]
pub struct PushReport {
    /// The new backup.
    pub backup: Backup,
    /// What recovery of interrupted backups did first (one line each).
    pub recovered: Vec<String>,
    /// Leftover images of interrupted backups that were removed.
    pub removed: Vec<PathBuf>,
    /// Time from the transaction to `BLOCK_JOB_COMPLETED`.
    pub job_time: Duration,
    /// Time taken in all.
    pub elapsed: Duration,
}

fn qmp_err(e: QmpClientError) -> RepoError {
    RepoError::Source { source_uri: "QMP".into(), reason: e.to_string() }
}

fn img_err(path: &Path) -> impl Fn(qcow2::Qcow2Error) -> RepoError + '_ {
    move |e| RepoError::Image { path: path.to_path_buf(), reason: e.to_string() }
}

/// A short tag of the disk name for job ids and node names (QEMU limits node names to
/// 31 characters; the disk name may be 64).
fn disk_tag(disk: &str) -> String {
    ::repo::key::hex(&sha2::Sha256::digest(disk.as_bytes()))[..8].to_owned()
}
fn job_prefix(disk: &str) -> String {
    format!("bdb-{}-", disk_tag(disk))
}
fn node_prefix(disk: &str) -> String {
    format!("bdt-{}-", disk_tag(disk))
}

/// The end of a *fresh* safety bitmap's token: one that a full backup adds empty
/// because NAME held no valid bits at its instant (NAME absent or inconsistent). Its
/// bits are writes since that instant only, so it can never restore NAME.
const FRESH: &str = "-fresh";

/// A parsed safety bitmap name.
struct Pending {
    full_name: String,
    id: String,
    token: String,
    bitmap: String,
    fresh: bool,
}

fn parse_pending(name: &str, disk: &str) -> Option<Pending> {
    let rest = name.strip_prefix(PENDING_PREFIX)?;
    let mut it = rest.splitn(4, '/');
    let (d, id, token, bitmap) = (it.next()?, it.next()?, it.next()?, it.next()?);
    (d == disk).then(|| Pending {
        full_name: name.to_owned(),
        id: id.to_owned(),
        token: token.to_owned(),
        bitmap: bitmap.to_owned(),
        fresh: token.ends_with(FRESH),
    })
}

/// The `source` a push backup's index records; it carries the attempt's token, by which
/// recovery knows whether a safety bitmap's backup was committed.
fn source_text(opts: &PushOptions, token: &str) -> String {
    format!("qmp:{} node={} attempt={token}", opts.qmp.display(), opts.node)
}

/// One bitmap of a node, as `query-named-block-nodes` lists it.
#[derive(Debug, Clone)]
struct BitmapInfo {
    name: String,
    granularity: u64,
    persistent: bool,
    /// Found in use in the image when the daemon opened it (the daemon stopped without
    /// saving it): its bits are unknown; it can only be removed.
    inconsistent: bool,
}

/// The node's record from `query-named-block-nodes`.
fn node_record(q: &mut QmpClient, node: &str) -> Result<Value> {
    let nodes = q.execute("query-named-block-nodes", Value::Null).map_err(qmp_err)?;
    nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n["node-name"] == node))
        .cloned()
        .ok_or_else(|| RepoError::Invalid(format!("the daemon has no block node '{node}'")))
}

fn bitmaps_of(record: &Value) -> Vec<BitmapInfo> {
    record["dirty-bitmaps"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|b| {
                    Some(BitmapInfo {
                        name: b["name"].as_str()?.to_owned(),
                        granularity: b["granularity"].as_u64().unwrap_or(65536),
                        persistent: b["persistent"].as_bool().unwrap_or(false),
                        inconsistent: b["inconsistent"].as_bool().unwrap_or(false),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// What [`recover`] did.
#[derive(Debug, Clone, Default)]
pub struct Recovery {
    /// One line per step taken.
    pub done: Vec<String>,
    /// Bitmaps that could not be restored to hold every write since the newest backup,
    /// with the reason: each was removed (or left inconsistent), so that the next backup
    /// with it must be full.
    pub lost: Vec<(String, String)>,
}

/// Brings the daemon back to a settled state after interrupted push backups of `disk`
/// (see the module docs). Must run under the disk's lock.
pub fn recover(q: &mut QmpClient, node: &str, disk: &str, repo: &Repository) -> Result<Recovery> {
    let mut rec = Recovery::default();
    let done = &mut rec.done;
    // 1. Orphan jobs: cancel (which reclaims the bitmap) and wait until they are gone.
    let jp = job_prefix(disk);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let jobs = q.execute("query-jobs", Value::Null).map_err(qmp_err)?;
        let ours: Vec<(String, String)> = jobs
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|j| {
                let id = j["id"].as_str()?;
                let status = j["status"].as_str()?;
                id.starts_with(&jp).then(|| (id.to_owned(), status.to_owned()))
            })
            .collect();
        if ours.is_empty() {
            break;
        }
        for (id, status) in &ours {
            let r = match status.as_str() {
                "concluded" => q.execute("job-dismiss", json!({"id": id})),
                "pending" => q.execute("job-finalize", json!({"id": id})),
                "aborting" | "null" => Ok(Value::Null),
                _ => q.execute("job-cancel", json!({"id": id})),
            };
            // A job may move on between the query and the verb: refusals are retried.
            if r.is_ok() && status != "aborting" {
                done.push(format!("orphan job {id} ({status}): cancelled or settled"));
            }
        }
        if Instant::now() > deadline {
            return Err(RepoError::Invalid(format!(
                "orphan backup jobs of disk '{disk}' did not end: {ours:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // 2. Orphan target nodes.
    let np = node_prefix(disk);
    let nodes = q.execute("query-named-block-nodes", Value::Null).map_err(qmp_err)?;
    for n in nodes.as_array().into_iter().flatten() {
        if let Some(name) = n["node-name"].as_str()
            && name.starts_with(&np)
        {
            q.execute("blockdev-del", json!({"node-name": name})).map_err(qmp_err)?;
            done.push(format!("orphan target node {name}: deleted"));
        }
    }
    // 3. Safety bitmaps, per bitmap they guard.
    let record = node_record(q, node)?;
    let bitmaps = bitmaps_of(&record);
    let mut guarded: BTreeMap<String, Vec<(Pending, &BitmapInfo)>> = BTreeMap::new();
    for b in &bitmaps {
        if let Some(p) = parse_pending(&b.name, disk) {
            guarded.entry(p.bitmap.clone()).or_default().push((p, b));
        }
    }
    let committed = if guarded.is_empty() { Vec::new() } else { repo.backups(disk)? };
    for (name, safety) in guarded {
        let target = bitmaps.iter().find(|b| b.name == name);
        let uncommitted: Vec<&(Pending, &BitmapInfo)> = safety
            .iter()
            .filter(|(p, _)| {
                !committed.iter().any(|b| {
                    parse_id(&p.id) == Some(b.meta.id)
                        && b.meta.source.ends_with(&format!("attempt={}", p.token))
                })
            })
            .collect();
        // An uncommitted safety bitmap that is inconsistent (its bits are unknown) or
        // fresh (it started empty: NAME had no valid bits at that full backup's
        // instant) cannot restore NAME: NAME is made unusable instead.
        let why_lost = uncommitted.iter().find_map(|(p, info)| {
            if info.inconsistent {
                Some(format!(
                    "safety bitmap '{}' of an interrupted backup is inconsistent (the daemon \
                     stopped without saving it), so bitmap '{name}' cannot get back the writes \
                     it held",
                    p.full_name
                ))
            } else if p.fresh {
                Some(format!(
                    "full backup {} was interrupted before it was committed, and bitmap \
                     '{name}' only tracks writes since it started",
                    p.id
                ))
            } else {
                None
            }
        });
        let mut actions = Vec::new();
        if let Some(why) = why_lost {
            // One transaction: NAME (an inconsistent NAME is unusable as it is, and says so
            // to the next incremental) and every safety bitmap of it.
            if let Some(t) = target
                && !t.inconsistent
            {
                actions.push(json!({"type": "block-dirty-bitmap-remove", "data": {
                    "node": node, "name": name}}));
            }
            for (p, _) in &safety {
                actions.push(json!({"type": "block-dirty-bitmap-remove", "data": {
                    "node": node, "name": p.full_name}}));
            }
            q.execute("transaction", json!({"actions": actions})).map_err(qmp_err)?;
            let what = if target.is_some_and(|t| !t.inconsistent) {
                "removed with its safety bitmaps"
            } else {
                "its safety bitmaps removed"
            };
            done.push(format!("bitmap '{name}' cannot be restored ({why}): {what}"));
            rec.lost.push((name.clone(), why));
            continue;
        }
        if !uncommitted.is_empty() {
            settle_back(q, node, target, &name, &uncommitted)?;
            for (p, _) in &uncommitted {
                done.push(format!("bitmap '{name}': merged back from {}", p.full_name));
            }
        }
        for (p, _) in &safety {
            q.execute("block-dirty-bitmap-remove", json!({"node": node, "name": p.full_name}))
                .map_err(qmp_err)?;
            done.push(format!("safety bitmap {} removed", p.full_name));
        }
    }
    Ok(rec)
}

/// Merges the safety bitmaps `safety` into `name`, re-creating `name` if it is gone or
/// inconsistent (the safety bitmaps hold every write it should hold).
fn settle_back(
    q: &mut QmpClient,
    node: &str,
    target: Option<&BitmapInfo>,
    name: &str,
    safety: &[&(Pending, &BitmapInfo)],
) -> Result<()> {
    let Some((_, first)) = safety.first() else { return Ok(()) };
    let inconsistent = target.is_some_and(|t| t.inconsistent);
    if inconsistent {
        // A merge cannot target an inconsistent bitmap, and an add of the same name
        // cannot share a transaction with its removal (the removal takes effect at
        // commit). Killed here, the next recovery finds NAME gone and re-adds it.
        q.execute("block-dirty-bitmap-remove", json!({"node": node, "name": name}))
            .map_err(qmp_err)?;
    }
    let mut actions = Vec::new();
    if target.is_none() || inconsistent {
        actions.push(json!({"type": "block-dirty-bitmap-add", "data": {
            "node": node, "name": name, "granularity": first.granularity,
            "persistent": first.persistent}}));
    }
    let sources: Vec<&str> = safety.iter().map(|(p, _)| p.full_name.as_str()).collect();
    actions.push(json!({"type": "block-dirty-bitmap-merge", "data": {
        "node": node, "target": name, "bitmaps": sources}}));
    q.execute("transaction", json!({"actions": actions})).map_err(qmp_err)?;
    Ok(())
}

/// Takes a push-mode backup of `opts.node` into `repo`.
pub fn push_backup(
    repo: &Repository,
    opts: &PushOptions,
    progress: &dyn Progress,
) -> Result<PushReport> {
    let started = Instant::now();
    let time = Timestamp::from_system(SystemTime::now());
    let disk = super::checked_disk(opts.disk.clone().unwrap_or_else(|| opts.node.clone()))?;
    let bitmap = opts.bitmap.clone().unwrap_or_else(|| DEFAULT_BITMAP.to_owned());
    if bitmap.is_empty() || bitmap.starts_with(PENDING_PREFIX) {
        return Err(RepoError::Invalid(format!("invalid bitmap name '{bitmap}'")));
    }
    if !opts.full && repo.backups(&disk)?.is_empty() {
        return Err(RepoError::Invalid(format!(
            "{}: disk '{disk}' has no backups: take a full backup first (--full)",
            repo.backend().location()
        )));
    }
    // Everything below runs under the disk's lock, held by the writer to the end.
    let lock = repo.lock_disk(&disk)?;
    let mut q = QmpClient::connect(&opts.qmp, opts.timeout).map_err(qmp_err)?;
    q.set_timeout(opts.timeout);
    q.set_id_prefix(format!("blockdelta-{}", std::process::id()));
    let recovery = recover(&mut q, &opts.node, &disk, repo)?;
    let removed = remove_leftover_images(&opts.scratch, &disk)?;

    let backups = repo.backups(&disk)?;
    let parent = if opts.full { None } else { backups.last().cloned() };
    let record = node_record(&mut q, &opts.node)?;
    let size = record["image"]["virtual-size"].as_u64().ok_or_else(|| {
        RepoError::Invalid(format!("the daemon reports no virtual size for node '{}'", opts.node))
    })?;
    if size > qcow2::create::MAX_VIRTUAL_SIZE || !size.is_multiple_of(512) {
        return Err(RepoError::Invalid(format!("unsupported disk size {size}")));
    }
    // A size that differs from the parent's is refused by the writer.
    let bitmaps = bitmaps_of(&record);
    let existing = bitmaps.iter().find(|b| b.name == bitmap).cloned();
    let persistent = record["drv"] == "qcow2" && record["ro"] != true;
    if !opts.full {
        check_tracking(&recovery, existing.as_ref(), &opts.node, &bitmap)?;
    }
    // NAME's bits, when they are valid: every write since the newest backup.
    let base = existing.as_ref().filter(|b| !b.inconsistent);
    let fresh = if base.is_some() { "" } else { FRESH };
    let token = format!("{}.{}{fresh}", time.0, std::process::id());
    let writer = repo.begin_backup_locked(
        BackupPlan {
            disk: disk.clone(),
            size,
            basis: match &parent {
                None => Basis::Full,
                Some(p) => Basis::Incremental { parent: p.meta.id },
            },
            source: source_text(opts, &token),
            bitmap: Some(bitmap.clone()),
            time,
        },
        lock,
    )?;
    let id = format_id(writer.id());
    std::fs::create_dir_all(&opts.scratch).map_err(io_err(&opts.scratch, "creating"))?;
    let image_tmp = opts.scratch.join(format!("{}{id}-{token}.qcow2", image_prefix(&disk)));
    qcow2::create::create_file(&image_tmp, qcow2::create::CreateOptions::new(size))
        .map_err(img_err(&image_tmp))?;

    let target = format!("{}{id}", node_prefix(&disk));
    // The attempt's token makes the job id unique: an orphan job of an earlier attempt
    // at the same backup id, cancelled by recovery, sends its `BLOCK_JOB_CANCELLED` on
    // this connection, and it must not be taken for this job's end.
    let job = format!("{}{id}-{token}", job_prefix(&disk));
    // `cache.no-flush`: the image is read back once, from the page cache, and then
    // deleted; nothing ever depends on it surviving a crash (recovery deletes an
    // orphan image), so making it durable would only write it to the disk for nothing.
    if let Err(e) = q.execute(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": target, "backing": null,
               "cache": {"no-flush": true},
               "file": {"driver": "file", "filename": image_tmp}}),
    ) {
        let _ = std::fs::remove_file(&image_tmp);
        return Err(qmp_err(e));
    }
    let safety = format!("{PENDING_PREFIX}{disk}/{id}/{token}/{bitmap}");
    let (actions, replace) =
        backup_actions(opts, &bitmap, &safety, &job, &target, existing.as_ref(), persistent);
    let job_started = Instant::now();
    if let Err(e) = q.execute("transaction", json!({"actions": actions})) {
        // Nothing happened in the daemon but the target node: remove it and the file.
        let _ = q.execute("blockdev-del", json!({"node-name": target}));
        let _ = std::fs::remove_file(&image_tmp);
        return Err(qmp_err(e));
    }
    if let Some(r) = replace
        && let Err(e) = q.execute("transaction", r)
    {
        // The job runs without NAME: recovery cancels it and removes what it made.
        let _ = recover(&mut q, &opts.node, &disk, repo);
        let _ = std::fs::remove_file(&image_tmp);
        return Err(qmp_err(e));
    }
    progress.start("backup (daemon)", size);
    let outcome = wait_job(&mut q, &job, progress);
    progress.finish();
    let job_time = job_started.elapsed();
    match outcome {
        Ok(_) => {}
        Err(e) => {
            // The daemon reclaimed NAME (incremental); a full backup's cleared NAME is
            // restored from the safety bitmap. Then the repository is as it was.
            let _ = recover(&mut q, &opts.node, &disk, repo);
            let _ = std::fs::remove_file(&image_tmp);
            return Err(e);
        }
    }
    q.execute("blockdev-del", json!({"node-name": target})).map_err(qmp_err)?;

    // Into the chunk store: the clusters the job wrote, completed from the parent's chunks.
    let ingested = (|| -> Result<u64> {
        let image = Qcow2Image::open_path(&image_tmp, false).map_err(img_err(&image_tmp))?;
        progress.start("store", size);
        let copied = ingest_image(&writer, &image, &image_tmp, opts.jobs)?;
        progress.finish();
        Ok(copied)
    })();
    let _ = std::fs::remove_file(&image_tmp);
    // A failure here leaves the safety bitmap: the next backup's recovery merges it back.
    let copied = ingested?;
    writer.add_bytes_read(copied);
    let backup = writer.commit()?;
    // Committed: the safety bitmap's writes are in this backup now.
    q.execute("block-dirty-bitmap-remove", json!({"node": opts.node, "name": safety}))
        .map_err(qmp_err)?;
    Ok(PushReport {
        backup,
        recovered: recovery.done,
        removed,
        job_time,
        elapsed: started.elapsed(),
    })
}

/// Refuses an incremental when NAME cannot know every write since the newest backup.
fn check_tracking(
    recovery: &Recovery,
    existing: Option<&BitmapInfo>,
    node: &str,
    bitmap: &str,
) -> Result<()> {
    let lost = |reason: String| RepoError::TrackingLost {
        node: node.to_owned(),
        bitmap: bitmap.to_owned(),
        reason,
    };
    if let Some((_, why)) = recovery.lost.iter().find(|(b, _)| b == bitmap) {
        return Err(lost(why.clone()));
    }
    match existing {
        None => Err(RepoError::Invalid(format!(
            "node '{node}' has no dirty bitmap '{bitmap}': take a full backup (--full), which adds it"
        ))),
        Some(b) if b.inconsistent => Err(lost(format!(
            "dirty bitmap '{bitmap}' of node '{node}' is inconsistent: the daemon stopped \
             without saving it (it crashed or was killed), so it may miss writes"
        ))),
        Some(_) => Ok(()),
    }
}

/// The backup's transaction (safety bitmap, NAME reset for a full backup, the job), and
/// the transaction that re-creates an inconsistent NAME right after it.
fn backup_actions(
    opts: &PushOptions,
    bitmap: &str,
    safety: &str,
    job: &str,
    target: &str,
    existing: Option<&BitmapInfo>,
    persistent: bool,
) -> (Vec<Value>, Option<Value>) {
    let base = existing.filter(|b| !b.inconsistent);
    let mut actions = Vec::new();
    // A safety bitmap always: with NAME's bits when they are valid; otherwise (a full
    // backup where NAME is absent or inconsistent) empty, and *fresh*: then it records
    // from the instant only, and recovery of an uncommitted attempt removes NAME
    // instead of merging it back. NAME's granularity is kept; a new NAME is persistent
    // where the image can hold it (qcow2 on a writable node), so that the chain
    // survives a clean restart of the daemon.
    let mut add_safety = json!({"node": opts.node, "name": safety,
        "persistent": base.map_or(persistent, |b| b.persistent)});
    if let Some(b) = existing {
        add_safety["granularity"] = json!(b.granularity);
    }
    actions.push(json!({"type": "block-dirty-bitmap-add", "data": add_safety}));
    if base.is_some() {
        actions.push(json!({"type": "block-dirty-bitmap-merge", "data": {
            "node": opts.node, "target": safety, "bitmaps": [bitmap]}}));
    }
    let mut replace = None;
    if opts.full {
        actions.push(match existing {
            Some(b) if !b.inconsistent => json!({"type": "block-dirty-bitmap-clear", "data": {
                "node": opts.node, "name": bitmap}}),
            // Inconsistent: removed at the instant. Its replacement cannot be added in
            // the same transaction (both daemons refuse the name until the removal
            // commits), so it is added right after and given the fresh safety bitmap's
            // bits: the writes since the instant, exactly.
            Some(b) => {
                replace = Some(json!({"actions": [
                    {"type": "block-dirty-bitmap-add", "data": {"node": opts.node,
                        "name": bitmap, "granularity": b.granularity,
                        "persistent": persistent}},
                    {"type": "block-dirty-bitmap-merge", "data": {"node": opts.node,
                        "target": bitmap, "bitmaps": [safety]}}]}));
                json!({"type": "block-dirty-bitmap-remove", "data": {
                    "node": opts.node, "name": bitmap}})
            }
            None => json!({"type": "block-dirty-bitmap-add", "data": {
                "node": opts.node, "name": bitmap, "persistent": persistent}}),
        });
        actions.push(json!({"type": "blockdev-backup", "data": {
            "job-id": job, "device": opts.node, "target": target, "sync": "full",
            "speed": opts.speed}}));
    } else {
        actions.push(json!({"type": "blockdev-backup", "data": {
            "job-id": job, "device": opts.node, "target": target, "sync": "incremental",
            "bitmap": bitmap, "speed": opts.speed}}));
    }
    (actions, replace)
}

/// The start of the names of a disk's push images in the scratch directory.
fn image_prefix(disk: &str) -> String {
    format!("push-{}-", disk_tag(disk))
}

/// Removes the push images of `disk` that interrupted backups left in `scratch` (under
/// the disk's lock: no live backup of it has one).
fn remove_leftover_images(scratch: &Path, disk: &str) -> Result<Vec<PathBuf>> {
    let prefix = image_prefix(disk);
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(scratch) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(io_err(scratch, "listing")(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err(scratch, "listing"))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) && name.ends_with(".qcow2") {
            std::fs::remove_file(entry.path()).map_err(io_err(&entry.path(), "removing"))?;
            removed.push(entry.path());
        }
    }
    Ok(removed)
}

/// Waits for the job's end; returns the bytes it reports copied (`offset`), or its
/// error. Progress comes from `query-jobs` every half second.
fn wait_job(q: &mut QmpClient, job: &str, progress: &dyn Progress) -> Result<u64> {
    let mut reported = 0u64;
    loop {
        let ev = q
            .wait_event(Duration::from_millis(500), |e| {
                matches!(e["event"].as_str(), Some("BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED"))
                    && e["data"]["device"] == job
            })
            .map_err(qmp_err)?;
        if let Some(ev) = ev {
            let d = &ev["data"];
            if ev["event"] == "BLOCK_JOB_CANCELLED" {
                return Err(RepoError::Invalid(format!("backup job {job} was cancelled")));
            }
            if let Some(err) = d["error"].as_str() {
                return Err(RepoError::Invalid(format!("backup job {job} failed: {err}")));
            }
            let done = d["offset"].as_u64().unwrap_or(0);
            progress.advance(done.saturating_sub(reported));
            return Ok(done);
        }
        let jobs = q.execute("query-jobs", Value::Null).map_err(qmp_err)?;
        if let Some(j) = jobs.as_array().and_then(|a| a.iter().find(|j| j["id"] == job)) {
            let done = j["current-progress"].as_u64().unwrap_or(0);
            progress.advance(done.saturating_sub(reported));
            reported = reported.max(done);
        }
    }
}
