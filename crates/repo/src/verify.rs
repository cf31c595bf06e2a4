//! Verification: every index decodes, every chunk it names is there and has its name.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use crate::chunk::{ChunkId, NameCheck};
use crate::index::{self, Index};
use crate::repository::{Repository, format_id};
use crate::{Error, Progress, Result, pool};

/// A chunk that is missing or damaged, and the backups that need it.
#[derive(Debug)]
pub struct BadChunk {
    /// The chunk.
    pub id: ChunkId,
    /// What is wrong.
    pub error: Error,
    /// `(disk, backup)` of every backup whose index names it.
    pub used_by: Vec<(String, u64)>,
}

/// What a verification found.
#[derive(Debug, Default)]
pub struct VerifyReport {
    /// Indexes read and found sound.
    pub indexes: u64,
    /// Indexes that cannot be read.
    pub bad_indexes: Vec<Error>,
    /// Distinct chunks checked.
    pub chunks: u64,
    /// Their bytes (decompressed).
    pub bytes: u64,
    /// Chunks missing or damaged.
    pub bad_chunks: Vec<BadChunk>,
}

impl VerifyReport {
    /// Whether everything is sound.
    pub fn ok(&self) -> bool {
        self.bad_indexes.is_empty() && self.bad_chunks.is_empty()
    }
}

/// Checks the backups of `disks` (every disk when empty): each index, then each
/// distinct chunk they name, `jobs` at a time.
pub fn verify(
    repo: &Repository,
    disks: &[String],
    jobs: usize,
    progress: &dyn Progress,
) -> Result<VerifyReport> {
    let mut report = VerifyReport::default();
    let disks = if disks.is_empty() { repo.disks()? } else { disks.to_vec() };
    let mut indexes: Vec<(String, u64, String)> = Vec::new();
    for disk in &disks {
        let (ok, errors) = repo.scan(disk)?;
        report.bad_indexes.extend(errors);
        indexes.extend(ok.into_iter().map(|b| (disk.clone(), b.meta.id, b.key)));
    }
    // Pass 1: the distinct chunks, with their lengths.
    let mut chunks: HashMap<ChunkId, u64> = HashMap::new();
    let mut sound = Vec::new();
    for (disk, id, key) in indexes {
        match repo.read_index_key(&key) {
            Ok(index) => {
                add_chunks(&index, &mut chunks);
                report.indexes += 1;
                sound.push((disk, id, key));
            }
            Err(e) => report.bad_indexes.push(e),
        }
    }
    let list: Vec<(ChunkId, u64)> = chunks.into_iter().collect();
    report.chunks = list.len() as u64;
    report.bytes = list.iter().map(|(_, len)| len).sum();
    progress.start("verify", report.bytes);
    let bad = Mutex::new(BTreeMap::new());
    pool::for_each::<Error>(jobs, list.len(), |i| {
        let (id, len) = list[i];
        if let Err(e) = repo.read_chunk(id, len, NameCheck::Always) {
            bad.lock().unwrap_or_else(|p| p.into_inner()).insert(id, e);
        }
        progress.advance(len);
        Ok(())
    })?;
    progress.finish();
    let bad = bad.into_inner().unwrap_or_else(|p| p.into_inner());
    if bad.is_empty() {
        return Ok(report);
    }
    // Pass 2, only when something is wrong: who uses the bad chunks.
    let mut users: BTreeMap<ChunkId, Vec<(String, u64)>> = BTreeMap::new();
    for (disk, id, key) in &sound {
        let index = repo.read_index_key(key)?;
        for e in index.entries.iter().filter(|e| bad.contains_key(e)) {
            let v = users.entry(*e).or_default();
            if v.last() != Some(&(disk.clone(), *id)) {
                v.push((disk.clone(), *id));
            }
        }
    }
    report.bad_chunks = bad
        .into_iter()
        .map(|(id, error)| BadChunk { id, error, used_by: users.remove(&id).unwrap_or_default() })
        .collect();
    Ok(report)
}

fn add_chunks(index: &Index, chunks: &mut HashMap<ChunkId, u64>) {
    let m = &index.meta;
    for (i, id) in index.entries.iter().enumerate() {
        if !id.is_zero() {
            chunks.entry(*id).or_insert_with(|| index::chunk_len(m.size, m.chunk_size, i as u64));
        }
    }
}

/// "disk 'vm1' backup 0003, ..." for messages.
pub fn describe_users(users: &[(String, u64)]) -> String {
    users.iter().map(|(d, id)| format!("{d} {}", format_id(*id))).collect::<Vec<_>>().join(", ")
}
