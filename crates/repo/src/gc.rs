//! Garbage collection: removing chunks that no index names.
//!
//! # Why a running backup never loses a chunk
//!
//! A collection, holding the `gc` lock:
//!
//! 1. creates a marker object `gc/ID`; its modification time is `T0`;
//! 2. lists `writers/`: a registration whose `writer-ID` lock it can take belongs to a
//!    dead process and is removed; the others are live backups, each started at its
//!    registration object's modification time;
//! 3. sets `cutoff = min(T0, starts of live backups) - grace`;
//! 4. reads every index and marks the chunks they name;
//! 5. for each chunk that is unmarked and older than `cutoff`, under the exclusive lock
//!    of its shard, reads its time again and deletes it if it is still older.
//!
//! A backup that commits an index naming chunk `c` took `c` from one of two places:
//!
//! - it stored or renewed `c` ([`Repository::store_chunk`]) under the shared lock of
//!   `c`'s shard, after it registered, so `c`'s time is at least its start. If it was
//!   registered when step 2 listed, its start is at least the cutoff; if it registered
//!   later, it started after `T0`. Either way `c` is not older than the cutoff, unless
//!   step 5 deleted it before the renewal, which then found no chunk and created it
//!   again (both happen under the shard lock, one before the other).
//! - it kept `c` from its parent's index without touching it. The parent committed
//!   before the backup started, and the disk's lock (held by the backup) keeps anyone
//!   from removing the parent meanwhile. If the backup was registered at step 2, the
//!   parent existed before step 4 and `c` is marked. Otherwise the parent's own chunks
//!   are covered by the same argument, one backup earlier (by induction on the order
//!   indexes were committed in).
//!
//! Every time compared is a modification time that the storage itself set (the marker's,
//! the registrations', the chunks'), never a clock reading of this process: a file
//! system stamps files with a coarse clock that can lag the fine one by milliseconds, so
//! a chunk created just after `SystemTime::now()` could look older than it. (The first
//! version compared with `SystemTime::now()`, and the concurrent test caught a chunk
//! deleted that way.) The grace period covers clocks that differ between machines
//! writing to one repository; on one machine the protocol needs none.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, SystemTime};

use crate::backend::{LockMode, LockWait};
use crate::chunk::ChunkId;
use crate::repository::{Repository, shard_lock};
use crate::{Error, Progress, Result};

/// How old a temporary must be before a collection removes it.
const LEFTOVER_AGE: Duration = Duration::from_secs(3600);

/// How to collect.
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Chunks changed less than this long before the collection (or before the oldest
    /// running backup started) are kept.
    pub grace: Duration,
    /// Count what would be removed, remove nothing.
    pub dry_run: bool,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions { grace: Duration::from_secs(0), dry_run: false }
    }
}

/// What a collection found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Indexes read.
    pub indexes: u64,
    /// Chunks in the repository before.
    pub chunks: u64,
    /// Distinct chunks the indexes name.
    pub referenced: u64,
    /// Unreferenced chunks removed (or, dry run, that would be).
    pub removed: u64,
    /// Their bytes.
    pub removed_bytes: u64,
    /// Unreferenced chunks kept because they are newer than the cutoff.
    pub kept_recent: u64,
    /// Chunks the indexes name that are not in the repository (`verify` says more).
    pub missing: u64,
    /// Registrations of dead backups removed.
    pub stale_writers: u64,
    /// Backups running during the collection.
    pub live_writers: u64,
}

/// Collects garbage in `repo`.
pub fn gc(repo: &Repository, options: &GcOptions, progress: &dyn Progress) -> Result<GcReport> {
    let backend = repo.backend();
    let _gc = backend.lock("gc", LockMode::Exclusive, LockWait::Fail)?.ok_or_else(|| {
        Error::Busy { what: "garbage collection".into(), holder: "another gc is running".into() }
    })?;
    let mut report = GcReport::default();
    if options.dry_run {
        // A dry run writes no object, so it has no marker to take the storage's time
        // from: its report uses this process's clock, which can lag the storage's by a
        // few milliseconds (a chunk stored in those milliseconds may be counted).
        return collect(repo, options, progress, SystemTime::now(), &mut report).map(|()| report);
    }
    remove_markers(repo)?;
    let mut id = [0u8; 16];
    crate::key::random(&mut id)?;
    let marker = format!("gc/{}", crate::key::hex(&id));
    backend.create(&marker, b"")?;
    let t0 = backend
        .stat(&marker)?
        .map(|o| o.modified)
        .ok_or_else(|| Error::Missing { object: marker.clone() })?;
    let result = collect(repo, options, progress, t0, &mut report);
    let _ = backend.delete(&marker);
    result.map(|()| report)
}

/// A collection's markers left by one that was killed (under the `gc` lock, none is live).
fn remove_markers(repo: &Repository) -> Result<()> {
    for o in repo.backend().list("gc")? {
        repo.backend().delete(&o.key)?;
    }
    Ok(())
}

/// Steps 2 to 5, with `t0` the marker's time.
fn collect(
    repo: &Repository,
    options: &GcOptions,
    progress: &dyn Progress,
    t0: SystemTime,
    report: &mut GcReport,
) -> Result<()> {
    let backend = repo.backend();
    let oldest_writer = live_writers(repo, options.dry_run, report)?;
    let start = oldest_writer.map_or(t0, |w| w.min(t0));
    let cutoff = start.checked_sub(options.grace).unwrap_or(SystemTime::UNIX_EPOCH);

    let marked = mark(repo, report, progress)?;
    let mut candidates: BTreeMap<String, Vec<(ChunkId, u64)>> = BTreeMap::new();
    let listed = backend.list("chunks")?;
    report.chunks = listed.len() as u64;
    let mut present = HashSet::with_capacity(listed.len());
    for o in listed {
        let Some(id) = ChunkId::from_key(&o.key) else { continue };
        present.insert(id);
        if marked.contains(&id) {
            continue;
        }
        if o.modified < cutoff {
            candidates.entry(shard_lock(&id)).or_default().push((id, o.size));
        } else {
            report.kept_recent += 1;
        }
    }
    report.missing = marked.iter().filter(|id| !present.contains(id)).count() as u64;
    drop(present);
    sweep(repo, candidates, cutoff, options.dry_run, report)?;
    if !options.dry_run {
        backend.sync()?;
        // A temporary is younger than the object being written through it, which no
        // registration covers yet (the registration itself is written through one):
        // only those of writes long dead go.
        let leftovers =
            t0.checked_sub(options.grace.max(LEFTOVER_AGE)).unwrap_or(SystemTime::UNIX_EPOCH);
        backend.remove_leftovers(leftovers)?;
    }
    Ok(())
}

/// Step 2: the start of the oldest live backup; dead registrations removed.
fn live_writers(
    repo: &Repository,
    dry_run: bool,
    report: &mut GcReport,
) -> Result<Option<SystemTime>> {
    let backend = repo.backend();
    let mut oldest: Option<SystemTime> = None;
    for o in backend.list("writers")? {
        let Some(name) = o.key.strip_prefix("writers/") else { continue };
        let lock_name = format!("writer-{name}");
        let lock = backend.lock(&lock_name, LockMode::Exclusive, LockWait::Fail)?;
        if lock.is_some() {
            report.stale_writers += 1;
            if !dry_run {
                backend.delete(&o.key)?;
                backend.remove_lock(&lock_name)?;
            }
            continue;
        }
        report.live_writers += 1;
        // The registration's own time (set by the storage, like every chunk's), not
        // the time it records.
        let started = o.modified;
        oldest = Some(oldest.map_or(started, |t| t.min(started)));
    }
    Ok(oldest)
}

/// Step 4: every chunk an index names. An index that cannot be read stops the
/// collection: its chunks cannot be told from garbage.
fn mark(
    repo: &Repository,
    report: &mut GcReport,
    progress: &dyn Progress,
) -> Result<HashSet<ChunkId>> {
    let keys = repo.index_keys()?;
    let total: u64 = keys.values().flatten().map(|o| o.size).sum();
    progress.start("mark", total);
    let mut marked = HashSet::new();
    for o in keys.values().flatten() {
        let index = match repo.read_index_key(&o.key) {
            Ok(i) => i,
            // Forgotten since the listing: nothing to keep for it.
            Err(Error::Missing { .. }) => continue,
            Err(e) => {
                return Err(Error::Invalid(format!(
                    "gc stopped, nothing removed: {e} (its chunks cannot be told from garbage; \
                     run verify, then forget that backup)"
                )));
            }
        };
        report.indexes += 1;
        marked.extend(index.entries.into_iter().filter(|id| !id.is_zero()));
        progress.advance(o.size);
    }
    progress.finish();
    report.referenced = marked.len() as u64;
    Ok(marked)
}

/// Step 5: delete the candidates still older than the cutoff, a shard at a time.
fn sweep(
    repo: &Repository,
    candidates: BTreeMap<String, Vec<(ChunkId, u64)>>,
    cutoff: SystemTime,
    dry_run: bool,
    report: &mut GcReport,
) -> Result<()> {
    let backend = repo.backend();
    for (shard, chunks) in candidates {
        let _lock = backend
            .lock(&shard, LockMode::Exclusive, LockWait::Block)?
            .ok_or_else(|| Error::Invalid("a blocking lock returned nothing".into()))?;
        for (id, size) in chunks {
            let key = id.key();
            match backend.stat(&key)? {
                Some(o) if o.modified < cutoff && (dry_run || backend.delete(&key)?) => {
                    report.removed += 1;
                    report.removed_bytes += size;
                }
                Some(o) if o.modified < cutoff => {}
                Some(_) => report.kept_recent += 1,
                None => {}
            }
        }
    }
    Ok(())
}
