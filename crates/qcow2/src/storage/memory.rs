//! Memory as storage, for tests, with power-loss simulation (see [`MemStorage`]).

use std::fmt;
use std::io;
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::Storage;

/// The granularity of torn writes ([`Survivors::Torn`]).
pub const SECTOR_SIZE: u64 = 512;

/// One change to the contents of a [`MemStorage`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// [`Storage::write_at`]: `data` at `offset`.
    Write {
        /// Where.
        offset: u64,
        /// What.
        data: Vec<u8>,
    },
    /// [`Storage::discard`] of `[offset, offset + len)`.
    Discard {
        /// Where.
        offset: u64,
        /// How many bytes.
        len: u64,
    },
    /// [`Storage::write_zeroes`] over `[offset, offset + len)`.
    WriteZeroes {
        /// Where.
        offset: u64,
        /// How many bytes.
        len: u64,
    },
    /// [`Storage::set_len`].
    SetLen {
        /// The new length.
        len: u64,
    },
}

impl Op {
    /// The byte range the operation changes; for [`Op::SetLen`], from the new length on.
    pub fn range(&self) -> std::ops::Range<u64> {
        match *self {
            Op::Write { offset, ref data } => offset..offset.saturating_add(data.len() as u64),
            Op::Discard { offset, len } | Op::WriteZeroes { offset, len } => {
                offset..offset.saturating_add(len)
            }
            Op::SetLen { len } => len..u64::MAX,
        }
    }

    /// Applies the operation to `bytes`. Ranges were checked to fit in memory before the
    /// operation was recorded.
    fn apply(&self, bytes: &mut Vec<u8>) {
        match *self {
            Op::Write { offset, ref data } => {
                let start = offset as usize;
                let end = start + data.len();
                if bytes.len() < end {
                    bytes.resize(end, 0);
                }
                bytes[start..end].copy_from_slice(data);
            }
            Op::Discard { offset, len } => {
                let start = usize::try_from(offset).unwrap_or(usize::MAX).min(bytes.len());
                let end = usize::try_from(offset.saturating_add(len))
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                bytes[start..end].fill(0);
            }
            Op::WriteZeroes { offset, len } => {
                let start = offset as usize;
                let end = start + len as usize;
                if bytes.len() < end {
                    bytes.resize(end, 0);
                }
                bytes[start..end].fill(0);
            }
            Op::SetLen { len } => bytes.resize(len as usize, 0),
        }
    }

    /// Applies the parts of the operation in the sectors for which `keep` is true.
    fn apply_torn(&self, bytes: &mut Vec<u8>, keep: &mut dyn FnMut() -> bool) {
        let range = self.range();
        if matches!(self, Op::SetLen { .. }) || range.is_empty() {
            if keep() {
                self.apply(bytes);
            }
            return;
        }
        let mut start = range.start;
        while start < range.end {
            let end = ((start / SECTOR_SIZE + 1) * SECTOR_SIZE).min(range.end);
            if keep() {
                let piece = match self {
                    Op::Write { offset, data } => Op::Write {
                        offset: start,
                        data: data[(start - offset) as usize..(end - offset) as usize].to_vec(),
                    },
                    Op::Discard { .. } => Op::Discard { offset: start, len: end - start },
                    _ => Op::WriteZeroes { offset: start, len: end - start },
                };
                piece.apply(bytes);
            }
            start = end;
        }
    }
}

/// Which unflushed operations reach the disk before the power goes.
#[derive(Clone, Copy)]
pub enum Survivors<'a> {
    /// None: only the durable image remains.
    None,
    /// All of them: the current image remains.
    All,
    /// The first `n` of them (as a write-back queue that drains in order would leave).
    Prefix(usize),
    /// Each survives or not with even odds, drawn from this seed.
    Random(u64),
    /// Each 512-byte sector of each operation survives or not with even odds, drawn from
    /// this seed: torn writes. ([`Op::SetLen`] survives or not as a whole.)
    Torn(u64),
    /// Those for which the predicate, given the index among the unflushed operations
    /// and the operation, returns true.
    Matching(&'a dyn Fn(usize, &Op) -> bool),
}

impl fmt::Debug for Survivors<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Survivors::None => f.write_str("None"),
            Survivors::All => f.write_str("All"),
            Survivors::Prefix(n) => f.debug_tuple("Prefix").field(n).finish(),
            Survivors::Random(seed) => f.debug_tuple("Random").field(seed).finish(),
            Survivors::Torn(seed) => f.debug_tuple("Torn").field(seed).finish(),
            Survivors::Matching(_) => f.write_str("Matching(..)"),
        }
    }
}

/// SplitMix64: a small deterministic generator for [`Survivors::Random`] and
/// [`Survivors::Torn`].
struct SplitMix(u64);

impl SplitMix {
    fn coin(&mut self) -> bool {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) & 1 == 1
    }
}

/// `durable` with the `unflushed` operations chosen by `survivors` applied in order.
fn crash_image(durable: &[u8], unflushed: &[Op], survivors: Survivors<'_>) -> Vec<u8> {
    let mut bytes = durable.to_vec();
    let mut rng = match survivors {
        Survivors::Random(seed) | Survivors::Torn(seed) => SplitMix(seed),
        _ => SplitMix(0),
    };
    for (i, op) in unflushed.iter().enumerate() {
        let keep = match survivors {
            Survivors::None => false,
            Survivors::All => true,
            Survivors::Prefix(n) => i < n,
            Survivors::Random(_) => rng.coin(),
            Survivors::Matching(predicate) => predicate(i, op),
            Survivors::Torn(_) => {
                op.apply_torn(&mut bytes, &mut || rng.coin());
                continue;
            }
        };
        if keep {
            op.apply(&mut bytes);
        }
    }
    bytes
}

/// An entry of a [`History`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// A change.
    Op(Op),
    /// A [`Storage::flush`]: every earlier change is durable.
    Flush,
}

/// What a recording [`MemStorage`] went through: its durable image when recording
/// began, then every change and flush since, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct History {
    base: Vec<u8>,
    entries: Vec<Entry>,
}

impl History {
    /// The durable image when recording began.
    pub fn base(&self) -> &[u8] {
        &self.base
    }

    /// The changes and flushes since recording began, in order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// How many flushes were recorded.
    pub fn flush_count(&self) -> usize {
        self.entries.iter().filter(|e| matches!(e, Entry::Flush)).count()
    }

    /// How many changes were recorded.
    pub fn op_count(&self) -> usize {
        self.entries.len() - self.flush_count()
    }

    /// The storage after a power cut while flush `n` (counted from 0) was under way:
    /// every change before flush `n - 1` is durable, and those between flushes `n - 1`
    /// and `n` survive as `survivors` says. `n == flush_count()` cuts the power at the
    /// end of the history (after the last change). `None` if `n` is greater.
    ///
    /// So `(0..=flush_count()).map(|n| power_cut_at_flush(n, …))` visits every flush
    /// point of the workload.
    pub fn power_cut_at_flush(&self, n: usize, survivors: Survivors<'_>) -> Option<MemStorage> {
        let stop = self.nth_index(n, |e| matches!(e, Entry::Flush))?;
        Some(self.power_cut_before(stop, survivors))
    }

    /// The storage after a power cut just before change `i` (counted from 0; so after
    /// the first `i` changes and the flushes among and right after them): durable up to
    /// the last flush before change `i`, the changes after that flush surviving as
    /// `survivors` says. `i == op_count()` cuts the power at the end. `None` if `i` is
    /// greater.
    pub fn power_cut_at_op(&self, i: usize, survivors: Survivors<'_>) -> Option<MemStorage> {
        let stop = self.nth_index(i, |e| matches!(e, Entry::Op(_)))?;
        Some(self.power_cut_before(stop, survivors))
    }

    /// The index in `entries` of the `n`-th entry that `is` picks, `entries.len()` if
    /// there are exactly `n`, `None` if fewer.
    fn nth_index(&self, n: usize, is: impl Fn(&Entry) -> bool) -> Option<usize> {
        let mut picked = self.entries.iter().enumerate().filter(|(_, e)| is(e)).map(|(i, _)| i);
        match picked.nth(n) {
            Some(i) => Some(i),
            None => {
                (self.entries.iter().filter(|e| is(e)).count() == n).then_some(self.entries.len())
            }
        }
    }

    /// The storage after a power cut with `entries[..stop]` done.
    fn power_cut_before(&self, stop: usize, survivors: Survivors<'_>) -> MemStorage {
        let mut durable = self.base.clone();
        let mut unflushed = Vec::new();
        for entry in &self.entries[..stop] {
            match entry {
                Entry::Op(op) => unflushed.push(op.clone()),
                Entry::Flush => {
                    for op in unflushed.drain(..) {
                        op.apply(&mut durable);
                    }
                }
            }
        }
        MemStorage::from_bytes(crash_image(&durable, &unflushed, survivors))
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// What reads see.
    current: Vec<u8>,
    /// As of the last flush.
    durable: Vec<u8>,
    /// Changes since the last flush, in order.
    unflushed: Vec<Op>,
    flushes: u64,
    history: Option<History>,
}

/// Bytes in memory that can simulate power loss.
///
/// A [`MemStorage`] keeps two images: the *durable* one, as of the last
/// [`flush`](Storage::flush), and the *current* one that reads see, which is the durable
/// one with the operations since the last flush applied (the *unflushed* operations,
/// kept in order as [`Op`]s). Power loss keeps the durable image plus some of the
/// unflushed operations, chosen by [`Survivors`]:
///
/// - [`MemStorage::power_cut`] gives the storage as it would be if the power went now.
/// - To cut the power at every flush point of a workload, record its history
///   ([`MemStorage::with_history`]), run the workload once, and rebuild the storage as it
///   would be after a power cut at any point with [`History::power_cut_at_flush`] (while
///   the n-th flush was under way: every earlier flush done, the operations since the
///   previous one possibly lost) or [`History::power_cut_at_op`] (just before the i-th
///   operation).
///
/// ```
/// use qcow2::storage::{MemStorage, Storage, Survivors};
///
/// let storage = MemStorage::new().with_history();
/// storage.write_at(b"old", 0)?;
/// storage.flush()?;
/// storage.write_at(b"new", 0)?;
/// storage.write_at(b"tail", 100)?;
/// storage.flush()?;
///
/// let history = storage.history().expect("recording");
/// for flush in 0..=history.flush_count() {
///     for seed in 0..16 {
///         let crashed = history.power_cut_at_flush(flush, Survivors::Torn(seed)).unwrap();
///         // ... open the image on `crashed` and check it is consistent ...
///         # let _ = crashed;
///     }
/// }
/// // Power lost during the second flush, nothing of it written: only "old" remains.
/// let crashed = history.power_cut_at_flush(1, Survivors::None).unwrap();
/// assert_eq!(crashed.to_bytes(), b"old");
/// # Ok::<(), std::io::Error>(())
/// ```
///
/// An image opened on an `Arc<dyn Storage>` can be given a clone of an
/// `Arc<MemStorage>`; the test keeps the other handle to read the history or cut the
/// power. The storage a power cut returns is an ordinary `MemStorage` to open again.
///
/// The model: operations that were not flushed may each reach the disk or not,
/// independently; those that do are applied in their original order, so for any sector
/// the result is its durable content or that of one of the unflushed operations that
/// covered it. With [`Survivors::Torn`], each 512-byte sector of an operation survives
/// or not on its own (a write torn at sector granularity); a [`Op::SetLen`] is never
/// torn.
#[derive(Debug, Default)]
pub struct MemStorage {
    inner: Mutex<Inner>,
}

impl MemStorage {
    /// Empty storage.
    pub fn new() -> Self {
        Self::default()
    }

    /// Storage holding `bytes`, durably.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        let inner = Inner { durable: bytes.clone(), current: bytes, ..Inner::default() };
        MemStorage { inner: Mutex::new(inner) }
    }

    /// Starts recording a [`History`] from the durable image, with the unflushed
    /// changes so far as its first entries.
    pub fn with_history(self) -> Self {
        self.record_history();
        self
    }

    /// Starts recording a [`History`] (again), like [`MemStorage::with_history`].
    pub fn record_history(&self) {
        let mut inner = self.lock();
        let entries = inner.unflushed.iter().cloned().map(Entry::Op).collect();
        inner.history = Some(History { base: inner.durable.clone(), entries });
    }

    /// The history recorded so far, `None` if not recording.
    pub fn history(&self) -> Option<History> {
        self.lock().history.clone()
    }

    /// A copy of the current bytes (what reads see).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.lock().current.clone()
    }

    /// A copy of the durable bytes (as of the last flush).
    pub fn durable_bytes(&self) -> Vec<u8> {
        self.lock().durable.clone()
    }

    /// The changes since the last flush, in order.
    pub fn unflushed(&self) -> Vec<Op> {
        self.lock().unflushed.clone()
    }

    /// How many times [`flush`](Storage::flush) was called.
    pub fn flush_count(&self) -> u64 {
        self.lock().flushes
    }

    /// The storage as it would be after a power cut now: the durable image with the
    /// unflushed changes chosen by `survivors` applied. The result is all durable and
    /// does not record a history; `self` is unchanged.
    pub fn power_cut(&self, survivors: Survivors<'_>) -> MemStorage {
        let inner = self.lock();
        MemStorage::from_bytes(crash_image(&inner.durable, &inner.unflushed, survivors))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Checks that `op` fits in memory, applies it and records it.
    fn change(&self, op: Op) -> io::Result<()> {
        let mut inner = self.lock();
        let end = match op {
            Op::Discard { .. } => 0,
            Op::SetLen { len } => len,
            _ => {
                let range = op.range();
                if range.is_empty() {
                    return Ok(());
                }
                range.end
            }
        };
        let end = usize::try_from(end)
            .ok()
            .filter(|&end| end <= isize::MAX as usize)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset out of range"))?;
        let grow = end.saturating_sub(inner.current.len());
        inner.current.try_reserve(grow).map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))?;
        op.apply(&mut inner.current);
        if let Some(history) = &mut inner.history {
            history.entries.push(Entry::Op(op.clone()));
        }
        inner.unflushed.push(op);
        Ok(())
    }
}

fn checked_end(offset: u64, len: u64) -> io::Result<u64> {
    offset
        .checked_add(len)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset out of range"))
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        checked_end(offset, buf.len() as u64)?;
        let inner = self.lock();
        let bytes = &inner.current;
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(bytes.len());
        let have = (bytes.len() - start).min(buf.len());
        buf[..have].copy_from_slice(&bytes[start..start + have]);
        buf[have..].fill(0);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        checked_end(offset, buf.len() as u64)?;
        self.change(Op::Write { offset, data: buf.to_vec() })
    }

    fn flush(&self) -> io::Result<()> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        for op in inner.unflushed.drain(..) {
            op.apply(&mut inner.durable);
        }
        inner.flushes += 1;
        if let Some(history) = &mut inner.history {
            history.entries.push(Entry::Flush);
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let len = len.min(self.len()?.saturating_sub(offset));
        if len == 0 {
            return Ok(());
        }
        self.change(Op::Discard { offset, len })
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        checked_end(offset, len)?;
        self.change(Op::WriteZeroes { offset, len })
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().current.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.change(Op::SetLen { len })
    }
}
