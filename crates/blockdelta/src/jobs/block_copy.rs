//! The block-copy engine of a backup: which clusters still have to reach the target,
//! the background copy of those clusters, and the copy-before-write step that copies a
//! cluster's old contents before a guest write changes it.
//!
//! The *copy bitmap* holds one bit per job cluster still to copy. A copier claims
//! clusters by moving them from the copy bitmap to the in-flight set, copies them, and
//! drops them from the in-flight set; a failed copy puts them back. So each cluster is
//! copied at most once, and a guest write that touches a cluster in flight waits for
//! that copy instead of copying again. The copy-before-write step claims every cluster
//! of the write still in the copy bitmap and copies it before the write proceeds; it
//! ignores the rate limit, as QEMU's does.

use std::collections::BTreeSet;
use std::io;
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use hbitmap::HBitmap;

use super::IoOperation;
use crate::block::node::{BeforeWrite, IoOrigin, Node, ZeroFlags};

/// Largest run of clusters one background copy takes at once.
pub const MAX_CHUNK: u64 = 1 << 20;

/// A failed copy: the side, the I/O error, and how much of the range was copied first.
#[derive(Debug, thiserror::Error)]
#[error("{}", crate::block::graph::strerror(.source))]
pub struct CopyError {
    /// Which side failed.
    pub operation: IoOperation,
    /// The error.
    pub source: io::Error,
    /// Bytes at the start of the range (whole clusters) that reached the target before
    /// the failure: they stay copied and count as progress, as QEMU's block-copy, whose
    /// tasks each cover one run of equal block status, keeps the tasks that succeeded.
    pub copied: u64,
}

impl From<CopyError> for io::Error {
    fn from(e: CopyError) -> io::Error {
        e.source
    }
}

fn on(operation: IoOperation) -> impl Fn(io::Error) -> CopyError {
    move |source| CopyError { operation, source, copied: 0 }
}

/// What the copy bitmap starts with.
#[derive(Debug)]
pub enum InitialCopy<'a> {
    /// Every cluster: sync=full, and sync=none, whose job copies nothing in the
    /// background, so that only copy-before-write copies (what guests overwrite).
    All,
    /// Clusters allocated in the source's top layer (sync=top): unallocated ones read
    /// through to the backing image, which the target has as well.
    AllocatedInTop,
    /// The dirty bits of a bitmap (sync=bitmap / incremental), widened to job clusters.
    Bitmap(&'a HBitmap),
}

#[derive(Debug)]
struct CopyState {
    /// Clusters still to copy.
    to_copy: HBitmap,
    /// Clusters being copied (cluster indexes).
    in_flight: BTreeSet<u64>,
    /// Bytes of clusters copied (or found to need no copy).
    done: u64,
}

/// The copy state of one backup, shared by its background copier and the source's
/// copy-before-write step.
#[derive(Debug)]
pub struct BlockCopy {
    source: Arc<Node>,
    target: Arc<Node>,
    cluster_size: u64,
    len: u64,
    skip_unallocated: bool,
    state: Mutex<CopyState>,
    copied: Condvar,
}

fn lock(m: &Mutex<CopyState>) -> MutexGuard<'_, CopyState> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl BlockCopy {
    /// The copy state for `source` → `target` with clusters of `cluster_size` bytes (a
    /// power of two), starting with `initial`. Meant to be called with the source
    /// drained ([`Node::drained`]), at the backup's point in time.
    pub fn new(
        source: Arc<Node>,
        target: Arc<Node>,
        cluster_size: u64,
        initial: InitialCopy<'_>,
    ) -> io::Result<Self> {
        let len = source.len();
        let granularity = cluster_size.trailing_zeros();
        let mut to_copy = HBitmap::new(len, granularity)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let skip_unallocated = matches!(initial, InitialCopy::AllocatedInTop);
        match initial {
            InitialCopy::All => to_copy.set_all(),
            // As QEMU's scan at job start: a cluster stays only if some of it is
            // allocated in the top layer (set rounds outward), so the job's length is
            // the allocated bytes and a failed bitmap-mode=always job hands back only
            // allocated clusters.
            InitialCopy::AllocatedInTop => {
                // Called while the source is drained: the job's own request does not
                // wait at the gate.
                let mut pos = 0;
                while pos < len {
                    let status = source.io(IoOrigin::Job).block_status(pos, len - pos)?;
                    let n = status.len.clamp(1, len - pos);
                    if status.allocated {
                        to_copy.set(pos, n).map_err(|e| {
                            io::Error::new(io::ErrorKind::InvalidInput, e.to_string())
                        })?;
                    }
                    pos += n;
                }
            }
            InitialCopy::Bitmap(bits) => {
                for run in bits.dirty_runs(0) {
                    let end = run.end.min(len);
                    if run.start < end {
                        to_copy.set(run.start, end - run.start).map_err(|e| {
                            io::Error::new(io::ErrorKind::InvalidInput, e.to_string())
                        })?;
                    }
                }
            }
        }
        Ok(BlockCopy {
            source,
            target,
            cluster_size,
            len,
            skip_unallocated,
            state: Mutex::new(CopyState { to_copy, in_flight: BTreeSet::new(), done: 0 }),
            copied: Condvar::new(),
        })
    }

    /// The job cluster size.
    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    /// Bytes still to copy (clusters in the copy bitmap or in flight), clipped to the
    /// disk's length: the job's remaining work.
    pub fn remaining(&self) -> u64 {
        let st = lock(&self.state);
        let in_flight = st.in_flight.len() as u64 * self.cluster_size;
        (st.to_copy.count() + in_flight).min(self.len)
    }

    /// The clusters still to copy (for `bitmap-mode=always` when the job fails).
    pub fn uncopied(&self) -> HBitmap {
        lock(&self.state).to_copy.clone()
    }

    /// Bytes done so far.
    pub fn done(&self) -> u64 {
        lock(&self.state).done
    }

    /// Claims the next run of clusters to copy in the background, at most
    /// [`MAX_CHUNK`] bytes; `None` when nothing is left to claim.
    pub fn claim_next(&self) -> Option<Range<u64>> {
        self.claim_next_at_most(MAX_CHUNK)
    }

    /// [`claim_next`](Self::claim_next) with at most `max` bytes (rounded up to a
    /// cluster).
    pub fn claim_next_at_most(&self, max: u64) -> Option<Range<u64>> {
        let mut st = lock(&self.state);
        let area = st.to_copy.next_dirty_area(0, self.len, max.max(1))?;
        let start = area.start / self.cluster_size * self.cluster_size;
        let end = area.end.div_ceil(self.cluster_size) * self.cluster_size;
        let end = end.min(self.len);
        // The area is whole clusters of the bitmap: clear exactly them.
        let _ = st.to_copy.reset(start, end - start);
        for c in start / self.cluster_size..end.div_ceil(self.cluster_size) {
            st.in_flight.insert(c);
        }
        Some(start..end)
    }

    /// Copies a claimed range (blocking) with the job's own requests, which never wait
    /// at a gate: a guest write may be waiting for this copy inside copy-before-write.
    /// On failure the clusters go back to the copy bitmap, to be copied again later.
    pub fn copy_claimed(&self, range: Range<u64>) -> Result<(), CopyError> {
        let result = self.copy_range(range.clone());
        let mut st = lock(&self.state);
        for c in range.start / self.cluster_size..range.end.div_ceil(self.cluster_size) {
            st.in_flight.remove(&c);
        }
        match &result {
            Ok(()) => st.done += range.end - range.start,
            Err(e) => {
                st.done += e.copied;
                let failed = range.start + e.copied;
                let _ = st.to_copy.set(failed, range.end - failed);
            }
        }
        drop(st);
        self.copied.notify_all();
        result
    }

    /// Reads `range` from the source and writes it to the target: areas that read as
    /// zeroes are written as zeroes (no allocation on the target); with sync=top,
    /// areas not allocated in the source's top layer are skipped.
    fn copy_range(&self, range: Range<u64>) -> Result<(), CopyError> {
        let mut pos = range.start;
        self.copy_from(range.clone(), &mut pos).map_err(|mut e| {
            // Whole clusters before the failing position are on the target.
            e.copied = (pos - range.start) / self.cluster_size * self.cluster_size;
            e
        })
    }

    /// The copy loop of [`BlockCopy::copy_range`]; `pos` tells where it stopped.
    fn copy_from(&self, range: Range<u64>, pos: &mut u64) -> Result<(), CopyError> {
        let (read, write) = (on(IoOperation::Read), on(IoOperation::Write));
        let (source, target) = (self.source.io(IoOrigin::Job), self.target.io(IoOrigin::Job));
        let mut buf = Vec::new();
        while *pos < range.end {
            let at = *pos;
            let status = source.block_status(at, range.end - at).map_err(&read)?;
            let n = status.len.clamp(1, range.end - at);
            if self.skip_unallocated && !status.allocated {
                *pos += n;
                continue;
            }
            if status.zero && !status.data {
                target.write_zeroes(at, n, ZeroFlags::default()).map_err(&write)?;
            } else {
                buf.resize(n as usize, 0);
                source.read(&mut buf, at).map_err(&read)?;
                if buf.iter().all(|&b| b == 0) {
                    target.write_zeroes(at, n, ZeroFlags::default()).map_err(&write)?;
                } else {
                    target.write(&buf, at, false).map_err(&write)?;
                }
            }
            *pos += n;
        }
        Ok(())
    }

    /// Copy-before-write: makes sure every cluster overlapping `[offset, offset + len)`
    /// has been copied, copying those still in the copy bitmap now and waiting for
    /// those in flight.
    pub fn copy_before_write(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 || offset >= self.len {
            return Ok(());
        }
        let end = (offset + len).min(self.len);
        let first = offset / self.cluster_size;
        let last = end.div_ceil(self.cluster_size);
        let mut st = lock(&self.state);
        loop {
            // Wait for clusters of the range someone else is copying.
            if (first..last).any(|c| st.in_flight.contains(&c)) {
                st = self.copied.wait(st).unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            // Claim what is left of the range.
            let mut claimed: Vec<Range<u64>> = Vec::new();
            let mut c = first;
            while c < last {
                let pos = c * self.cluster_size;
                if st.to_copy.get(pos) {
                    let start = c;
                    while c < last && st.to_copy.get(c * self.cluster_size) {
                        st.in_flight.insert(c);
                        c += 1;
                    }
                    let (s, e) = (start * self.cluster_size, (c * self.cluster_size).min(self.len));
                    let _ = st.to_copy.reset(s, e - s);
                    claimed.push(s..e);
                } else {
                    c += 1;
                }
            }
            drop(st);
            let mut result = Ok(());
            for r in claimed {
                if let Err(e) = self.copy_claimed(r)
                    && result.is_ok()
                {
                    result = Err(e.into());
                }
            }
            return result;
        }
    }
}

/// The copy-before-write step of a backup, installed on the source node.
#[derive(Debug)]
pub struct CopyBeforeWrite(pub Arc<BlockCopy>);

impl BeforeWrite for CopyBeforeWrite {
    fn before_write(&self, _node: &Node, offset: u64, len: u64) -> io::Result<()> {
        self.0.copy_before_write(offset, len)
    }
}
