//! Building a backup's chunks from the pieces of the disk that were read.
//!
//! A backup reads only some byte ranges of its source: a full backup the allocated
//! ones, an incremental the dirty granules. [`ingest`] takes those ranges (announced
//! first, then given in any order), completes each chunk they touch from its base (the
//! parent backup's chunk for an incremental, zeroes for a full backup; none at all when
//! the ranges cover the whole chunk), and stores completed chunks on a few threads
//! while more arrive. A chunk no range touches keeps its base's name without being
//! read. Memory: the chunks partly received, plus two per storing thread.
//!
//! The base is read by the storing threads, not the one taking pieces in, and a piece
//! that is exactly one chunk becomes that chunk without a copy.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use crate::writer::BackupWriter;
use crate::{Error, Result};

/// A chunk being filled: its bytes so far, the byte ranges given (within the chunk),
/// and how many announced bytes are still to come.
struct Partial {
    data: Vec<u8>,
    given: Vec<(usize, usize)>,
    missing: u64,
    /// Whether the ranges leave parts of the chunk to take from its base.
    needs_base: bool,
}

/// A chunk whose announced bytes have all come, for a storing thread.
pub(crate) struct Completed {
    index: u64,
    data: Vec<u8>,
    /// The ranges of `data` that came from the source, when the rest is the base's;
    /// `None` when `data` is the whole chunk.
    given: Option<Vec<(usize, usize)>>,
}

impl Completed {
    /// The chunk's bytes: `data` where it was given, the base elsewhere.
    fn into_bytes(self, writer: &BackupWriter<'_>) -> Result<Vec<u8>> {
        let Some(given) = self.given else { return Ok(self.data) };
        let mut base = writer.parent_chunk(self.index)?;
        for (start, len) in given {
            base[start..start + len].copy_from_slice(&self.data[start..start + len]);
        }
        Ok(base)
    }
}

/// Assembles chunks from announced byte ranges (see the module docs).
struct Assembler<'w, 'r> {
    writer: &'w BackupWriter<'r>,
    /// Announced bytes still to come, per chunk not started yet.
    expected: HashMap<u64, u64>,
    started: HashMap<u64, Partial>,
}

impl<'w, 'r> Assembler<'w, 'r> {
    fn new(writer: &'w BackupWriter<'r>, ranges: &[(u64, u64)]) -> Result<Self> {
        let cs = writer.chunk_size();
        let size = writer.size();
        let mut expected: HashMap<u64, u64> = HashMap::new();
        for &(off, len) in ranges {
            let end = off
                .checked_add(len)
                .filter(|&e| e <= size)
                .ok_or_else(|| Error::Invalid(format!("range {off}+{len} is outside the disk")))?;
            let mut at = off;
            while at < end {
                let i = at / cs;
                let upto = ((i + 1) * cs).min(end);
                *expected.entry(i).or_default() += upto - at;
                at = upto;
            }
        }
        for (&i, &n) in &expected {
            if n > writer.chunk_len(i) {
                return Err(Error::Invalid(format!("the ranges given overlap in chunk {i}")));
            }
        }
        Ok(Assembler { writer, expected, started: HashMap::new() })
    }

    /// Takes `data` read at `off`; calls `done` with every chunk it completes.
    fn give(
        &mut self,
        off: u64,
        data: Vec<u8>,
        done: &mut dyn FnMut(Completed) -> Result<()>,
    ) -> Result<()> {
        let cs = self.writer.chunk_size();
        let i = off / cs;
        if off == i * cs
            && data.len() as u64 == self.writer.chunk_len(i)
            && self.expected.get(&i) == Some(&(data.len() as u64))
        {
            // Exactly one whole chunk: it is the chunk.
            self.expected.remove(&i);
            return done(Completed { index: i, data, given: None });
        }
        let mut at = 0usize;
        while at < data.len() {
            let pos = off + at as u64;
            let i = pos / cs;
            let within = (pos - i * cs) as usize;
            let n = (data.len() - at).min(cs as usize - within);
            let part = match self.started.get_mut(&i) {
                Some(p) => p,
                None => {
                    let missing = self.expected.remove(&i).ok_or_else(|| {
                        Error::Invalid(format!("bytes at {pos} were not announced (or came twice)"))
                    })?;
                    let len = self.writer.chunk_len(i);
                    let needs_base = missing != len && self.writer.parent().is_some();
                    let partial = Partial {
                        data: vec![0; len as usize],
                        given: Vec::new(),
                        missing,
                        needs_base,
                    };
                    self.started.entry(i).or_insert(partial)
                }
            };
            if within + n > part.data.len() || n as u64 > part.missing {
                return Err(Error::Invalid(format!(
                    "bytes at {pos} were not announced (or came twice)"
                )));
            }
            part.data[within..within + n].copy_from_slice(&data[at..at + n]);
            part.given.push((within, n));
            part.missing -= n as u64;
            if part.missing == 0 {
                let p = self.started.remove(&i).unwrap_or_else(|| unreachable!());
                let given = p.needs_base.then_some(p.given);
                done(Completed { index: i, data: p.data, given })?;
            }
            at += n;
        }
        Ok(())
    }

    fn finish(self) -> Result<()> {
        let left: BTreeMap<u64, u64> = self
            .expected
            .into_iter()
            .chain(self.started.into_iter().map(|(i, p)| (i, p.missing)))
            .collect();
        match left.iter().next() {
            None => Ok(()),
            Some((i, n)) => Err(Error::Invalid(format!(
                "{} chunks incomplete: chunk {i} lacks {n} announced bytes",
                left.len()
            ))),
        }
    }
}

/// Stores into `writer` the chunks that `ranges` (byte ranges `(offset, length)` of the
/// disk, not overlapping) touch, from `pieces`: `(offset, bytes)` read from the source,
/// together covering exactly `ranges`, in any order. `jobs` threads store completed
/// chunks (hashing, compressing, sealing, writing) while `pieces` is consumed on this
/// thread. The first error stops everything.
pub fn ingest<I>(
    writer: &BackupWriter<'_>,
    ranges: &[(u64, u64)],
    pieces: I,
    jobs: usize,
) -> Result<()>
where
    I: IntoIterator<Item = Result<(u64, Vec<u8>)>>,
{
    let mut assembler = Assembler::new(writer, ranges)?;
    let jobs = jobs.max(1);
    let (tx, rx) = sync_channel::<Completed>(jobs);
    let rx = Mutex::new(rx);
    let failed: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| store_worker(writer, &rx, &failed));
        }
        let fed = feed(&mut assembler, pieces, &tx, &failed);
        drop(tx);
        if let Err(e) = fed {
            failed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
        }
    });
    if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    assembler.finish()
}

fn feed<I>(
    assembler: &mut Assembler<'_, '_>,
    pieces: I,
    tx: &SyncSender<Completed>,
    failed: &Mutex<Option<Error>>,
) -> Result<()>
where
    I: IntoIterator<Item = Result<(u64, Vec<u8>)>>,
{
    let stopped = || failed.lock().unwrap_or_else(|p| p.into_inner()).is_some();
    for piece in pieces {
        if stopped() {
            // A worker failed: its error is the one reported.
            return Ok(());
        }
        let (off, data) = piece?;
        assembler.give(off, data, &mut |chunk| {
            tx.send(chunk).map_err(|_| Error::Invalid("the chunk writers stopped".into()))
        })?;
    }
    Ok(())
}

/// Stores chunks until the channel closes; after a failure (its own or another's) it
/// only drains the channel, so that the feeder never blocks on a full one.
fn store_worker(
    writer: &BackupWriter<'_>,
    rx: &Mutex<Receiver<Completed>>,
    failed: &Mutex<Option<Error>>,
) {
    loop {
        let next = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok(chunk) = next else { return };
        if failed.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
            continue;
        }
        let index = chunk.index;
        if let Err(e) = chunk.into_bytes(writer).and_then(|bytes| writer.put(index, &bytes)) {
            failed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
        }
    }
}
