//! Restoring a backup: chunks read, checked and written in parallel.

use std::io;

use crate::chunk::NameCheck;
use crate::index::{self, Index};
use crate::repository::Repository;
use crate::{Error, Progress, Result, pool};

/// Where a restored disk goes.
pub trait RestoreTarget: Sync {
    /// For messages: a path.
    fn name(&self) -> String;
    /// Writes `data` at `offset`.
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Makes `len` bytes at `offset` read as zeroes (a new sparse file needs nothing).
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()>;
}

/// What a restore did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoreStats {
    /// Chunks read from the repository and written.
    pub data_chunks: u64,
    /// Bytes of those.
    pub data_bytes: u64,
    /// Zero chunks (holes).
    pub zero_chunks: u64,
}

/// Writes every chunk of `index` to `target`, `jobs` chunks at a time (each one read,
/// decrypted, decompressed and checked against its name before it is written).
pub fn restore(
    repo: &Repository,
    index: &Index,
    target: &dyn RestoreTarget,
    jobs: usize,
    progress: &dyn Progress,
) -> Result<RestoreStats> {
    let m = &index.meta;
    progress.start("restore", m.size);
    let write_err = |action: &'static str| {
        let name = target.name();
        move |error| Error::Io { object: name, action, error }
    };
    let len_of = |i: usize| index::chunk_len(m.size, m.chunk_size, i as u64);
    pool::for_each(jobs, index.entries.len(), |i| {
        let id = index.entries[i];
        let offset = i as u64 * m.chunk_size;
        if id.is_zero() {
            target.write_zeroes(offset, len_of(i)).map_err(write_err("writing zeroes"))?;
        } else {
            let bytes = repo.read_chunk(id, len_of(i), NameCheck::UnlessSealed)?;
            target.write_at(offset, &bytes).map_err(write_err("writing"))?;
        }
        progress.advance(len_of(i));
        Ok(())
    })?;
    progress.finish();
    let mut stats = RestoreStats::default();
    for (i, id) in index.entries.iter().enumerate() {
        if id.is_zero() {
            stats.zero_chunks += 1;
        } else {
            stats.data_chunks += 1;
            stats.data_bytes += len_of(i);
        }
    }
    Ok(stats)
}
