//! Taking a backup: new chunks first, the index last.
//!
//! A [`BackupWriter`] holds the disk's lock for its whole life (a second backup of the
//! same disk, a prune or a forget of it fails at once with [`Error::Busy`]), and is
//! registered under `writers/ID` while it runs, holding the lock `writer-ID`, so that a
//! garbage collection knows the oldest instant a running backup may have renewed or
//! created a chunk at (see [`crate::gc`]).
//!
//! # Crash safety
//!
//! A backup exists once its index object exists. New chunks go into a [`Batch`] of the
//! backend, published (contents durable, then names) every [`BATCH_BYTES`] or
//! [`BATCH_OBJECTS`] and at the end. [`BackupWriter::commit`] publishes the last batch,
//! syncs the backend (every chunk's name durable, including the names of chunks found
//! stored, which another process may have created and not yet synced), then creates the
//! index (write-once, durable content), then syncs again (its name). A crash before the
//! index's name is durable loses the backup and leaves only temporaries and chunks that
//! no index names: garbage that `gc` removes after its grace period. An index never
//! names a chunk whose name is not durable.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use serde::{Deserialize, Serialize};

use crate::backend::{Batch, Created, LockGuard, LockMode, LockWait};
use crate::chunk::{ChunkId, NameCheck};
use crate::index::{self, BackupKind, Index, IndexMeta};
use crate::key::{hex, random};
use crate::repository::{Backup, DiskLock, Repository, Staged, format_id};
use crate::{Error, Result, Timestamp};

/// What kind of backup, and from what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Basis {
    /// Every chunk comes from the source; chunks never given are zero.
    Full,
    /// Chunks not given are the parent backup's.
    Incremental {
        /// The backup this one is built on (a backup of the same disk).
        parent: u64,
    },
}

/// A backup about to be taken.
#[derive(Debug, Clone)]
pub struct BackupPlan {
    /// The disk.
    pub disk: String,
    /// Its size in bytes.
    pub size: u64,
    /// Full or incremental.
    pub basis: Basis,
    /// Where it is read from (shown by `list`).
    pub source: String,
    /// The dirty bitmap used or started.
    pub bitmap: Option<String>,
    /// The backup's point in time.
    pub time: Timestamp,
}

/// A registration object under `writers/`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub(crate) struct Registration {
    /// Seconds since the epoch, taken before the registration was created: no chunk
    /// this writer renews or creates is older.
    pub(crate) started: i64,
    /// The process, for messages.
    pub(crate) pid: u32,
}

/// A running backup's entry in `writers/` with its lock; removed when dropped.
struct Registered<'r> {
    repo: &'r Repository,
    key: String,
    lock_name: String,
    _lock: Box<dyn LockGuard>,
}

impl<'r> Registered<'r> {
    fn new(repo: &'r Repository) -> Result<Registered<'r>> {
        let mut name = [0u8; 16];
        random(&mut name)?;
        let name = hex(&name);
        // The lock first: a collector that sees the object and can take its lock
        // treats it as stale.
        let lock_name = format!("writer-{name}");
        let lock = repo
            .backend()
            .lock(&lock_name, LockMode::Exclusive, LockWait::Fail)?
            .ok_or_else(|| Error::Invalid("a new writer lock is held by someone".into()))?;
        let reg = Registration { started: crate::time::now().0, pid: std::process::id() };
        let json = serde_json::to_vec(&reg).map_err(|e| Error::Invalid(e.to_string()))?;
        let key = format!("writers/{name}");
        repo.backend().create(&key, &json)?;
        Ok(Registered { repo, key, lock_name, _lock: lock })
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        // Best effort: a leftover registration whose lock is free is removed by gc.
        // The object goes first: a collector that finds it then finds the lock held.
        let _ = self.repo.backend().delete(&self.key);
        let _ = self.repo.backend().remove_lock(&self.lock_name);
    }
}

/// A batch is published when it holds this many bytes of objects...
pub const BATCH_BYTES: u64 = 64 << 20;
/// ...or this many objects (each holds a file open until then).
pub const BATCH_OBJECTS: usize = 128;

/// The batch being filled, with its chunks' lengths (plain and stored) for the
/// counters.
struct Staging<'r> {
    batch: Box<dyn Batch + 'r>,
    chunks: Mutex<HashMap<ChunkId, (u64, u64)>>,
}

impl<'r> Staging<'r> {
    fn new(repo: &'r Repository) -> Staging<'r> {
        Staging { batch: repo.backend().batch(), chunks: Mutex::new(HashMap::new()) }
    }
}

/// What one backup stored.
#[derive(Debug, Default)]
struct Counters {
    bytes_read: AtomicU64,
    new_bytes: AtomicU64,
    new_stored_bytes: AtomicU64,
    new_chunks: AtomicU64,
}

/// A backup being taken. Chunks can be given from several threads at once.
pub struct BackupWriter<'r> {
    repo: &'r Repository,
    plan: BackupPlan,
    id: u64,
    chunk_size: u64,
    parent: Option<Index>,
    entries: Mutex<Vec<ChunkId>>,
    /// Chunks this backup stored or renewed. No collection can delete them while it
    /// runs (their times are at least its registration's), so a repeat needs no
    /// second renewal.
    held: Mutex<HashSet<ChunkId>>,
    /// New chunks not published yet. Adding takes the read lock; swapping in a fresh
    /// batch to publish the full one takes the write lock, so that no add is half done.
    staging: RwLock<Staging<'r>>,
    counters: Counters,
    _registered: Registered<'r>,
    _disk_lock: DiskLock,
}

impl std::fmt::Debug for BackupWriter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupWriter").field("disk", &self.plan.disk).field("id", &self.id).finish()
    }
}

impl Repository {
    /// Starts a backup of `plan.disk`: takes the disk's lock, registers the writer, and
    /// for an incremental loads the parent's index (which must have the same size).
    pub fn begin_backup(&self, plan: BackupPlan) -> Result<BackupWriter<'_>> {
        let lock = self.lock_disk(&plan.disk)?;
        self.begin_backup_locked(plan, lock)
    }

    /// [`begin_backup`](Repository::begin_backup) with the disk's lock already taken
    /// (by a caller that had work to do under it first).
    pub fn begin_backup_locked(
        &self,
        plan: BackupPlan,
        disk_lock: DiskLock,
    ) -> Result<BackupWriter<'_>> {
        if disk_lock.disk != plan.disk {
            return Err(Error::Invalid(format!(
                "the lock of disk '{}' does not cover disk '{}'",
                disk_lock.disk, plan.disk
            )));
        }
        let chunk_size = self.config().chunk_size;
        index::check_geometry(plan.size, chunk_size)?;
        let existing = self.backups(&plan.disk)?;
        let id = existing.last().map(|b| b.meta.id + 1).unwrap_or(1);
        let parent = match plan.basis {
            Basis::Full => None,
            Basis::Incremental { parent } => {
                let b: &Backup =
                    existing.iter().find(|b| b.meta.id == parent).ok_or_else(|| {
                        Error::Invalid(format!(
                            "disk '{}' has no backup {} to build on",
                            plan.disk,
                            format_id(parent)
                        ))
                    })?;
                if b.meta.size != plan.size {
                    return Err(Error::Invalid(format!(
                        "disk '{}' is {} bytes, its backup {} was {}: take a full backup",
                        plan.disk,
                        plan.size,
                        format_id(parent),
                        b.meta.size
                    )));
                }
                if b.meta.chunk_size != chunk_size {
                    return Err(Error::Invalid(format!(
                        "backup {} has chunks of {} bytes, the repository {}: take a full backup",
                        format_id(parent),
                        b.meta.chunk_size,
                        chunk_size
                    )));
                }
                Some(self.read_index(b)?)
            }
        };
        let entries = match &parent {
            Some(p) => p.entries.clone(),
            None => vec![ChunkId::ZERO; index::chunk_count(plan.size, chunk_size) as usize],
        };
        let registered = Registered::new(self)?;
        Ok(BackupWriter {
            repo: self,
            plan,
            id,
            chunk_size,
            parent,
            entries: Mutex::new(entries),
            held: Mutex::new(HashSet::new()),
            staging: RwLock::new(Staging::new(self)),
            counters: Counters::default(),
            _registered: registered,
            _disk_lock: disk_lock,
        })
    }
}

impl BackupWriter<'_> {
    /// The number the backup will have.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.plan.size
    }

    /// Bytes per chunk.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// The number of chunks of the disk.
    pub fn chunk_count(&self) -> u64 {
        index::chunk_count(self.plan.size, self.chunk_size)
    }

    /// The length of chunk `i` (the last may be short).
    pub fn chunk_len(&self, i: u64) -> u64 {
        index::chunk_len(self.plan.size, self.chunk_size, i)
    }

    /// The parent's index (incremental only).
    pub fn parent(&self) -> Option<&Index> {
        self.parent.as_ref()
    }

    /// The bytes of chunk `i` in the parent backup (zeroes for a full backup).
    pub fn parent_chunk(&self, i: u64) -> Result<Vec<u8>> {
        let len = self.chunk_len(i);
        match &self.parent {
            Some(p) => self.repo.read_chunk(p.entries[i as usize], len, NameCheck::UnlessSealed),
            None => Ok(vec![0; len as usize]),
        }
    }

    /// Sets chunk `i` to `data` (its whole length), storing it when it is new.
    pub fn put(&self, i: u64, data: &[u8]) -> Result<ChunkId> {
        if i >= self.chunk_count() || data.len() as u64 != self.chunk_len(i) {
            return Err(Error::Invalid(format!(
                "chunk {i} of {} bytes does not fit a disk of {} bytes",
                data.len(),
                self.plan.size
            )));
        }
        let id = crate::chunk::chunk_id(data, self.repo.sealer().keys());
        if !id.is_zero() && !self.held.lock().unwrap_or_else(|e| e.into_inner()).contains(&id) {
            self.store(id, data)?;
        }
        self.entries.lock().unwrap_or_else(|e| e.into_inner())[i as usize] = id;
        Ok(id)
    }

    fn store(&self, id: ChunkId, data: &[u8]) -> Result<()> {
        let full = {
            let staging = self.staging.read().unwrap_or_else(|e| e.into_inner());
            match self.repo.stage_chunk(id, data, &*staging.batch)? {
                Staged::Zero | Staged::Existed => false,
                Staged::Added { stored } => {
                    let mut chunks = staging.chunks.lock().unwrap_or_else(|e| e.into_inner());
                    chunks.insert(id, (data.len() as u64, stored));
                    let (objects, bytes) = staging.batch.pending();
                    objects >= BATCH_OBJECTS || bytes >= BATCH_BYTES
                }
            }
        };
        self.held.lock().unwrap_or_else(|e| e.into_inner()).insert(id);
        if full {
            self.publish_staged()?;
        }
        Ok(())
    }

    /// Publishes the chunks staged so far and counts the new ones.
    fn publish_staged(&self) -> Result<()> {
        let staging = {
            let mut slot = self.staging.write().unwrap_or_else(|e| e.into_inner());
            std::mem::replace(&mut *slot, Staging::new(self.repo))
        };
        let chunks = staging.chunks.into_inner().unwrap_or_else(|e| e.into_inner());
        let published = self.repo.publish_chunks(&*staging.batch, chunks.keys().copied())?;
        for (id, created) in published {
            if let (Created::New, Some(&(plain, stored))) = (created, chunks.get(&id)) {
                self.counters.new_chunks.fetch_add(1, Ordering::Relaxed);
                self.counters.new_bytes.fetch_add(plain, Ordering::Relaxed);
                self.counters.new_stored_bytes.fetch_add(stored, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Counts `bytes` read from the source.
    pub fn add_bytes_read(&self, bytes: u64) {
        self.counters.bytes_read.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Makes the backup exist (see the module's crash-safety argument) and returns it.
    pub fn commit(self) -> Result<Backup> {
        self.publish_staged()?;
        let backend = self.repo.backend();
        backend.sync()?;
        let c = &self.counters;
        let meta = IndexMeta {
            disk: self.plan.disk.clone(),
            id: self.id,
            kind: match self.plan.basis {
                Basis::Full => BackupKind::Full,
                Basis::Incremental { .. } => BackupKind::Incremental,
            },
            time: self.plan.time.to_string(),
            time_unix: self.plan.time.0,
            size: self.plan.size,
            chunk_size: self.chunk_size,
            parent: match self.plan.basis {
                Basis::Full => None,
                Basis::Incremental { parent } => Some(parent),
            },
            bitmap: self.plan.bitmap.clone(),
            source: self.plan.source.clone(),
            bytes_read: c.bytes_read.load(Ordering::Relaxed),
            new_bytes: c.new_bytes.load(Ordering::Relaxed),
            new_stored_bytes: c.new_stored_bytes.load(Ordering::Relaxed),
            new_chunks: c.new_chunks.load(Ordering::Relaxed),
        };
        let entries = std::mem::take(&mut *self.entries.lock().unwrap_or_else(|e| e.into_inner()));
        let index = Index { meta: meta.clone(), entries };
        let key = self.repo.index_key(&self.plan.disk, self.id)?;
        let object = index.encode(&key, self.repo.sealer())?;
        if backend.create(&key, &object)? == Created::Existed {
            return Err(Error::Busy {
                what: format!("backup {} of disk '{}'", format_id(self.id), self.plan.disk),
                holder: "another writer committed it first".into(),
            });
        }
        backend.sync()?;
        Ok(Backup { meta, key, index_bytes: object.len() as u64 })
    }
}
