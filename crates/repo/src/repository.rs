//! A repository: its configuration, its disks and backups, reading and storing chunks.
//!
//! Objects (see `docs/REPOSITORY.md` for every format):
//!
//! - `config`: JSON ([`Config`]), written once by [`Repository::create`];
//! - `chunks/NN/NAME`: a chunk ([`crate::chunk`]), `NN` the first two hex digits of
//!   `NAME`;
//! - `backups/DIR/ID.idx`: a backup's index ([`crate::index`]); `DIR` is the disk's
//!   name, or a keyed hash of it in an encrypted repository;
//! - `writers/ID`: a backup in progress ([`crate::writer`]), for the garbage collector.
//!
//! Locks (advisory, [`Backend::lock`]): `disk-DIR` (exclusive: a backup, prune or
//! forget of that disk), `chunks-NN` (shared: storing a chunk of shard `NN`; exclusive:
//! the garbage collector deleting in it), `gc` (one collection at a time), and
//! `writer-ID` (held by the live backup `writers/ID`).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, Batch, Created, LockGuard, LockMode, LockWait};
use crate::chunk::{self, ChunkId, NameCheck, Sealer};
use crate::error::corrupt;
use crate::index::{self, Index, IndexMeta};
use crate::key::{Keys, hex, random};
use crate::{Error, Result, valid_disk_name};

/// The configuration object's key.
pub const CONFIG_KEY: &str = "config";
/// What `format` says in every repository's configuration.
pub const FORMAT: &str = "blockdelta-repository";
/// The configuration version written.
pub const VERSION: u32 = 1;
/// The chunk size of a new repository unless another is chosen.
pub const DEFAULT_CHUNK_SIZE: u64 = 1 << 20;
/// The zstd level of a new repository unless another is chosen.
pub const DEFAULT_COMPRESSION_LEVEL: i32 = 3;
/// The cipher an encrypted repository records.
pub const CIPHER: &str = "xchacha20-poly1305";
const MAX_CONFIG: u64 = 64 << 10;

/// A repository's configuration, fixed when it is created. Not secret: it holds no key,
/// only the fingerprint that tells the right key file from another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Config {
    /// Always [`FORMAT`].
    pub format: String,
    /// [`VERSION`].
    pub version: u32,
    /// A random identifier of the repository (hex).
    pub id: String,
    /// When it was created (RFC 3339).
    pub created: String,
    /// Bytes per chunk of every backup (a power of two).
    pub chunk_size: u64,
    /// The zstd level chunks are compressed with.
    pub compression_level: i32,
    /// Present when the repository is encrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionConfig>,
}

/// How an encrypted repository is encrypted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct EncryptionConfig {
    /// [`CIPHER`].
    pub cipher: String,
    /// The key's [`fingerprint`](Keys::fingerprint).
    pub key_fingerprint: String,
}

/// What a new repository is made with.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Bytes per chunk.
    pub chunk_size: u64,
    /// The zstd level (1-19).
    pub compression_level: i32,
    /// The key: encrypted when given.
    pub keys: Option<Keys>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            compression_level: DEFAULT_COMPRESSION_LEVEL,
            keys: None,
        }
    }
}

/// One backup as listed: its metadata and its index object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backup {
    /// What the index records.
    pub meta: IndexMeta,
    /// The index object's key.
    pub key: String,
    /// The index object's size in bytes.
    pub index_bytes: u64,
}

/// What a repository holds, in sum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Backups (readable indexes).
    pub backups: u64,
    /// Bytes of the non-zero chunks of every backup, counted once per backup: what the
    /// backups would take stored whole, without zero chunks.
    pub logical_bytes: u64,
    /// Distinct chunks the backups name.
    pub chunks: u64,
    /// Their bytes, uncompressed.
    pub unique_bytes: u64,
    /// Chunk objects in the repository (named or not) and their stored bytes.
    pub chunk_objects: u64,
    /// Stored bytes of the chunk objects.
    pub stored_chunk_bytes: u64,
    /// Stored bytes of the indexes.
    pub index_bytes: u64,
}

impl Stats {
    /// Logical bytes per unique byte (1 without any sharing).
    pub fn dedup_ratio(&self) -> f64 {
        if self.unique_bytes == 0 {
            1.0
        } else {
            self.logical_bytes as f64 / self.unique_bytes as f64
        }
    }
    /// Unique bytes per stored chunk byte (1 without compression).
    pub fn compression_ratio(&self) -> f64 {
        if self.stored_chunk_bytes == 0 {
            1.0
        } else {
            self.unique_bytes as f64 / self.stored_chunk_bytes as f64
        }
    }
    /// Everything stored: chunks and indexes.
    pub fn stored_bytes(&self) -> u64 {
        self.stored_chunk_bytes + self.index_bytes
    }
}

/// The outcome of storing one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// All zero: nothing stored.
    Zero,
    /// It was in the repository already (its time renewed).
    Existed,
    /// Stored anew, this many bytes.
    New(u64),
}

/// The outcome of staging one chunk ([`Repository::stage_chunk`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Staged {
    /// All zero: nothing to store.
    Zero,
    /// It was in the repository already (its time renewed).
    Existed,
    /// Added to the batch, its object this many bytes.
    Added {
        /// The object's length.
        stored: u64,
    },
}

/// The lock of one disk ([`Repository::lock_disk`]); released when dropped.
#[derive(Debug)]
pub struct DiskLock {
    pub(crate) disk: String,
    _guard: Box<dyn LockGuard>,
}

/// An index object as listed.
#[derive(Debug, Clone)]
pub(crate) struct IndexObject {
    /// The backup number its key gives.
    pub(crate) id: u64,
    /// Its key.
    pub(crate) key: String,
    /// Its size in bytes.
    pub(crate) size: u64,
}

/// The text of a backup number, as commands show and take it.
pub fn format_id(id: u64) -> String {
    format!("{id:04}")
}

/// A backup number from its text: decimal digits.
pub fn parse_id(text: &str) -> Option<u64> {
    (!text.is_empty() && text.len() <= 19 && text.bytes().all(|b| b.is_ascii_digit()))
        .then(|| text.parse().ok())
        .flatten()
}

/// An open repository.
#[derive(Debug, Clone)]
pub struct Repository {
    backend: Arc<dyn Backend>,
    config: Config,
    sealer: Sealer,
}

impl Repository {
    /// Makes a new repository in `backend`, which must not hold one.
    pub fn create(backend: Arc<dyn Backend>, options: CreateOptions) -> Result<Repository> {
        index::check_geometry(0, options.chunk_size)?;
        if !(1..=19).contains(&options.compression_level) {
            return Err(Error::Invalid(format!(
                "compression level {}: from 1 to 19",
                options.compression_level
            )));
        }
        let mut id = [0u8; 16];
        random(&mut id)?;
        let config = Config {
            format: FORMAT.into(),
            version: VERSION,
            id: hex(&id),
            created: crate::time::now().to_string(),
            chunk_size: options.chunk_size,
            compression_level: options.compression_level,
            encryption: options.keys.as_ref().map(|k| EncryptionConfig {
                cipher: CIPHER.into(),
                key_fingerprint: k.fingerprint(),
            }),
        };
        let mut json =
            serde_json::to_vec_pretty(&config).map_err(|e| Error::Invalid(e.to_string()))?;
        json.push(b'\n');
        // Write-once: two concurrent `init`s cannot both win, and an existing
        // repository is never replaced.
        if backend.create(CONFIG_KEY, &json)? == Created::Existed {
            return Err(Error::Invalid(format!(
                "{}: a repository exists there already",
                backend.location()
            )));
        }
        backend.sync()?;
        Ok(Repository { backend, config, sealer: Sealer::new(options.keys) })
    }

    /// Opens the repository in `backend`; `keys` must be its key when it is encrypted.
    pub fn open(backend: Arc<dyn Backend>, keys: Option<Keys>) -> Result<Repository> {
        let location = backend.location();
        let bytes = match backend.read(CONFIG_KEY, MAX_CONFIG) {
            Err(Error::Missing { .. }) => {
                return Err(Error::Invalid(format!(
                    "{location}: not a blockdelta repository (no config; `blockdelta init` makes one)"
                )));
            }
            r => r?,
        };
        let config: Config = serde_json::from_slice(&bytes).map_err(|e| {
            corrupt(&format!("{location}/{CONFIG_KEY}"), format!("bad configuration: {e}"))
        })?;
        if config.format != FORMAT || config.version != VERSION {
            return Err(Error::Invalid(format!(
                "{location}: format {} version {} is not supported (this blockdelta reads {FORMAT} {VERSION})",
                config.format, config.version
            )));
        }
        index::check_geometry(0, config.chunk_size)
            .map_err(|e| corrupt(CONFIG_KEY, e.to_string()))?;
        match (&config.encryption, &keys) {
            (Some(_), None) => return Err(Error::KeyMissing { repository: location }),
            (Some(enc), Some(k)) if enc.key_fingerprint != k.fingerprint() => {
                return Err(Error::WrongKey { repository: location });
            }
            (Some(enc), Some(_)) if enc.cipher != CIPHER => {
                return Err(Error::Invalid(format!(
                    "{location}: cipher {} is not supported",
                    enc.cipher
                )));
            }
            (None, Some(_)) => {
                return Err(Error::Invalid(format!(
                    "{location}: the repository is not encrypted; it takes no key file"
                )));
            }
            _ => {}
        }
        Ok(Repository { backend, config, sealer: Sealer::new(keys) })
    }

    /// Opens the repository in `backend`, or creates one with `options` when there is
    /// none yet (a first backup creates its repository).
    pub fn open_or_create(backend: Arc<dyn Backend>, options: CreateOptions) -> Result<Repository> {
        if backend.stat(CONFIG_KEY)?.is_none() {
            // Objects without a configuration: a damaged repository, or something else
            // entirely; either way not a place to make a new one.
            if !backend.list("")?.is_empty() {
                return Err(Error::Invalid(format!(
                    "{}: not a blockdelta repository (no config), and not empty",
                    backend.location()
                )));
            }
            match Repository::create(backend.clone(), options.clone()) {
                Ok(r) => return Ok(r),
                // Created by someone else meanwhile: open theirs.
                Err(Error::Invalid(_)) if backend.stat(CONFIG_KEY)?.is_some() => {}
                Err(e) => return Err(e),
            }
        }
        Repository::open(backend, options.keys)
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Where the objects are.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Whether chunks and indexes are encrypted.
    pub fn encrypted(&self) -> bool {
        self.sealer.sealed()
    }

    pub(crate) fn sealer(&self) -> &Sealer {
        &self.sealer
    }

    /// The directory part of a disk's index keys.
    pub(crate) fn disk_dir(&self, disk: &str) -> Result<String> {
        if !valid_disk_name(disk) {
            return Err(Error::Invalid(format!("invalid disk name '{disk}'")));
        }
        Ok(match self.sealer.keys() {
            Some(k) => k.disk_dir(disk),
            None => disk.to_owned(),
        })
    }

    /// The key of backup `id` of `disk`.
    pub(crate) fn index_key(&self, disk: &str, id: u64) -> Result<String> {
        Ok(format!("backups/{}/{}.idx", self.disk_dir(disk)?, format_id(id)))
    }

    /// Takes the lock of `disk` (held by a backup, prune or forget of it), or fails at
    /// once with [`Error::Busy`].
    pub fn lock_disk(&self, disk: &str) -> Result<DiskLock> {
        let name = format!("disk-{}", self.disk_dir(disk)?);
        let guard =
            self.backend.lock(&name, LockMode::Exclusive, LockWait::Fail)?.ok_or_else(|| {
                Error::Busy {
                    what: format!("disk '{disk}'"),
                    holder: "another backup, prune or forget of it is running".into(),
                }
            })?;
        Ok(DiskLock { disk: disk.to_owned(), _guard: guard })
    }

    /// Every index object, grouped by disk directory, ids ascending. Objects under
    /// `backups/` that are not index keys are ignored.
    pub(crate) fn index_keys(&self) -> Result<BTreeMap<String, Vec<IndexObject>>> {
        self.index_objects("backups")
    }

    /// [`index_keys`](Repository::index_keys) of the objects under `prefix` (`backups`,
    /// or one disk's `backups/DIR`).
    fn index_objects(&self, prefix: &str) -> Result<BTreeMap<String, Vec<IndexObject>>> {
        let mut by_dir: BTreeMap<String, Vec<IndexObject>> = BTreeMap::new();
        for o in self.backend.list(prefix)? {
            let Some(rest) = o.key.strip_prefix("backups/") else { continue };
            let Some((dir, file)) = rest.split_once('/') else { continue };
            let Some(id) = file.strip_suffix(".idx").and_then(parse_id) else { continue };
            by_dir.entry(dir.to_owned()).or_default().push(IndexObject {
                id,
                key: o.key.clone(),
                size: o.size,
            });
        }
        for v in by_dir.values_mut() {
            v.sort_by_key(|o| o.id);
        }
        Ok(by_dir)
    }

    /// The metadata of the index `key`, reading only its first bytes.
    pub(crate) fn read_meta(&self, key: &str) -> Result<IndexMeta> {
        let mut prefix = self.backend.read_range(key, 0, 4096)?;
        let need =
            Index::meta_prefix_len(&prefix).ok_or_else(|| corrupt(key, "not an index object"))?;
        if need > prefix.len() {
            prefix = self.backend.read_range(key, 0, need as u64)?;
        }
        Index::decode_meta(key, &prefix, &self.sealer).map(|(meta, _)| meta)
    }

    /// The whole index `key`.
    pub(crate) fn read_index_key(&self, key: &str) -> Result<Index> {
        let bytes = self.backend.read(key, index::max_object_len())?;
        Index::decode(key, &bytes, &self.sealer)
    }

    /// The disks that have backups, by name, sorted.
    pub fn disks(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for (dir, ids) in self.index_keys()? {
            let Some(newest) = ids.last() else { continue };
            let name = match self.sealer.keys() {
                None => dir,
                // The name is only inside the (sealed) indexes.
                Some(_) => self.read_meta(&newest.key)?.disk,
            };
            names.push(name);
        }
        names.sort();
        Ok(names)
    }

    /// Every backup of `disk`, oldest first, and the indexes whose metadata cannot be
    /// read (key and error) beside them.
    pub fn scan(&self, disk: &str) -> Result<(Vec<Backup>, Vec<Error>)> {
        let dir = self.disk_dir(disk)?;
        let mut ok = Vec::new();
        let mut errors = Vec::new();
        // Only this disk's directory is listed.
        let mine = self.index_objects(&format!("backups/{dir}"))?.remove(&dir).unwrap_or_default();
        for IndexObject { id, key, size } in mine {
            match self.read_meta(&key) {
                Ok(meta) if meta.disk == disk && meta.id == id => {
                    ok.push(Backup { meta, key, index_bytes: size })
                }
                Ok(meta) => errors.push(corrupt(
                    &key,
                    format!("it says it is backup {} of disk '{}'", format_id(meta.id), meta.disk),
                )),
                Err(e) => errors.push(e),
            }
        }
        Ok((ok, errors))
    }

    /// Every backup of `disk`, oldest first; an unreadable index is an error.
    pub fn backups(&self, disk: &str) -> Result<Vec<Backup>> {
        let (ok, mut errors) = self.scan(disk)?;
        if !errors.is_empty() {
            return Err(errors.swap_remove(0));
        }
        Ok(ok)
    }

    /// Backup `id` of `disk`, or the newest when `None`.
    pub fn backup(&self, disk: &str, id: Option<u64>) -> Result<Backup> {
        let backups = self.backups(disk)?;
        if backups.is_empty() {
            return Err(Error::Invalid(format!(
                "{}: no backups of disk '{disk}'",
                self.backend.location()
            )));
        }
        match id {
            None => Ok(backups.into_iter().next_back().unwrap_or_else(|| unreachable!())),
            Some(id) => backups.into_iter().find(|b| b.meta.id == id).ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: no backup {} of disk '{disk}'",
                    self.backend.location(),
                    format_id(id)
                ))
            }),
        }
    }

    /// The whole index of `backup`.
    pub fn read_index(&self, backup: &Backup) -> Result<Index> {
        let index = self.read_index_key(&backup.key)?;
        if index.meta != backup.meta {
            return Err(corrupt(&backup.key, "changed while it was read"));
        }
        Ok(index)
    }

    /// The bytes of chunk `id`, which holds `len` bytes (zeroes for [`ChunkId::ZERO`]),
    /// checked as `check` says.
    pub fn read_chunk(&self, id: ChunkId, len: u64, check: NameCheck) -> Result<Vec<u8>> {
        if id.is_zero() {
            return Ok(vec![0; len as usize]);
        }
        let object = self.backend.read(&id.key(), chunk::max_object_len(len))?;
        chunk::decode(id, object, &self.sealer, Some(len), check)
    }

    /// Stores `data` as a chunk unless it is all zero or stored already; returns its name.
    ///
    /// Against the garbage collector: under the shared lock of the chunk's shard, an
    /// existing chunk's time is renewed (so a collection that started before cannot
    /// find it old), or the chunk is created (new, so not old either) as a batch of one
    /// ([`stage_chunk`](Repository::stage_chunk), then
    /// [`publish_chunks`](Repository::publish_chunks)). The collector re-reads a chunk's
    /// time under the exclusive lock of its shard before deleting it.
    pub fn store_chunk(&self, data: &[u8]) -> Result<(ChunkId, Stored)> {
        let id = chunk::chunk_id(data, self.sealer.keys());
        let batch = self.backend.batch();
        let stored = match self.stage_chunk(id, data, &*batch)? {
            Staged::Zero => Stored::Zero,
            Staged::Existed => Stored::Existed,
            Staged::Added { stored } => {
                match self.publish_chunks(&*batch, std::iter::once(id))?.as_slice() {
                    [(_, Created::New)] => Stored::New(stored),
                    _ => Stored::Existed,
                }
            }
        };
        Ok((id, stored))
    }

    /// Adds chunk `data`, whose name `id` the caller computed, to `batch` unless it is
    /// stored already (then its time is renewed, under the shared lock of its shard).
    /// The chunk is stored once the batch
    /// is published with [`publish_chunks`](Repository::publish_chunks).
    pub(crate) fn stage_chunk(
        &self,
        id: ChunkId,
        data: &[u8],
        batch: &dyn Batch,
    ) -> Result<Staged> {
        if id.is_zero() {
            return Ok(Staged::Zero);
        }
        let key = id.key();
        {
            let _shard = self.shard_lock_shared(&id)?;
            if self.backend.touch(&key)? {
                return Ok(Staged::Existed);
            }
        }
        // Encoding happens outside the lock: a collection that runs meanwhile cannot
        // remove a chunk that does not exist yet.
        with_buffers(|object, scratch| {
            let level = self.config.compression_level;
            chunk::encode_into(id, data, &self.sealer, level, object, scratch)?;
            batch.add(&key, object)?;
            Ok(Staged::Added { stored: object.len() as u64 })
        })
    }

    /// Publishes `batch`, whose chunks are `ids`, holding the shared locks of their
    /// shards: a chunk found existing is renewed where no collection can be deleting it.
    pub(crate) fn publish_chunks(
        &self,
        batch: &dyn Batch,
        ids: impl Iterator<Item = ChunkId>,
    ) -> Result<Vec<(ChunkId, Created)>> {
        let shards: std::collections::BTreeSet<String> = ids.map(|id| shard_lock(&id)).collect();
        let mut held = Vec::with_capacity(shards.len());
        for name in &shards {
            held.push(self.lock_shared(name)?);
        }
        let published = batch.publish()?;
        published
            .into_iter()
            .map(|(key, created)| {
                let id = ChunkId::from_key(&key)
                    .ok_or_else(|| Error::Invalid(format!("'{key}' is not a chunk key")))?;
                Ok((id, created))
            })
            .collect()
    }

    fn shard_lock_shared(&self, id: &ChunkId) -> Result<Box<dyn LockGuard>> {
        self.lock_shared(&shard_lock(id))
    }

    fn lock_shared(&self, name: &str) -> Result<Box<dyn LockGuard>> {
        self.backend
            .lock(name, LockMode::Shared, LockWait::Block)?
            .ok_or_else(|| Error::Invalid("a blocking lock returned nothing".into()))
    }

    /// Totals of the whole repository; reads every index (an index that cannot be read is
    /// an error).
    pub fn stats(&self) -> Result<Stats> {
        let mut st = Stats::default();
        let mut seen = std::collections::HashSet::new();
        for o in self.index_keys()?.values().flatten() {
            let index = self.read_index_key(&o.key)?;
            let m = &index.meta;
            st.backups += 1;
            st.index_bytes += o.size;
            for (i, id) in index.entries.iter().enumerate() {
                if id.is_zero() {
                    continue;
                }
                let len = index::chunk_len(m.size, m.chunk_size, i as u64);
                st.logical_bytes += len;
                if seen.insert(*id) {
                    st.chunks += 1;
                    st.unique_bytes += len;
                }
            }
        }
        for o in self.backend.list("chunks")? {
            st.chunk_objects += 1;
            st.stored_chunk_bytes += o.size;
        }
        Ok(st)
    }

    /// Drops backup `id` of `disk` (its chunks stay until a garbage collection).
    pub fn forget(&self, disk: &str, id: u64) -> Result<Backup> {
        let _lock = self.lock_disk(disk)?;
        let backup = self.backup(disk, Some(id))?;
        self.backend.delete(&backup.key)?;
        self.backend.sync()?;
        Ok(backup)
    }
}

/// The lock of the shard that holds chunk `id`.
/// Runs `f` with this thread's object and compression buffers, reused: a fresh megabyte
/// buffer per chunk costs its page faults every time.
fn with_buffers<T>(f: impl FnOnce(&mut Vec<u8>, &mut Vec<u8>) -> Result<T>) -> Result<T> {
    thread_local! {
        static BUFFERS: std::cell::RefCell<(Vec<u8>, Vec<u8>)> =
            const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
    }
    BUFFERS.with(|cell| {
        let (object, scratch) = &mut *cell.borrow_mut();
        f(object, scratch)
    })
}

pub(crate) fn shard_lock(id: &ChunkId) -> String {
    format!("chunks-{}", &hex(&id.0[..1]))
}
