//! The write-intent log of a node's crash-safe bitmaps: before a write reaches a region
//! whose mark is not durable yet, the region is marked in the bitmap's stored data and
//! the image synced; a checkpoint stores the bitmaps again, which clears the marks.
//! The on-disk side (where marks go, when a record is trusted) is the driver's
//! (`qcow2::intent`); this module keeps the ordering.
//!
//! # Why no issued write is missed
//!
//! A writer sets the write's bits in the in-memory bitmaps first, then calls
//! [`IntentLog::ensure`], and issues the write only when that returns. `ensure` writes
//! the mark of every region of the write not yet marked *in the current generation* to
//! every table marks go to, then waits until a sync that started after those writes
//! has finished (one sync serves every writer waiting, [`GroupSync`]).
//!
//! A checkpoint ([`NodeBitmaps::checkpoint`](super::NodeBitmaps::checkpoint)):
//! 1. [`begin`](IntentLog::begin) starts a new generation: no region is marked in it,
//!    so every later write marks again (in the old tables, which are still live).
//! 2. It takes a copy of the bitmaps. A write whose `ensure` ran before step 1 set its
//!    bits before, so the copy has them; any other write marks in the new generation.
//! 3. The driver writes the copy to new clusters. [`written`](IntentLog::written) then
//!    replays the new generation's marks into them and sends later marks to both old
//!    and new, and the driver syncs before it switches the header: whichever table is
//!    live after a crash holds every region written to since its data was taken.
//! 4. [`switched`](IntentLog::switched): the header names the new clusters durably;
//!    marks stop going to the old ones before those are freed.

use std::io;
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use super::BitmapPersistence;

/// What the log knows of one crash-safe bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TrackedBitmap {
    /// The bitmap's name (what the stored record is keyed by).
    pub name: String,
    /// log2 of the granularity.
    pub granularity_bits: u8,
    /// log2 of the region size.
    pub region_bits: u8,
    /// Whether writes must be marked: the bitmap records them.
    pub active: bool,
}

struct Tracked {
    spec: TrackedBitmap,
    /// The data clusters marks go to: none before the first checkpoint, the live ones,
    /// and during a checkpoint from `written` on the new ones after them.
    tables: Vec<Arc<Vec<u64>>>,
    /// Regions marked in the current generation, a bit each.
    marked: Vec<u64>,
}

impl Tracked {
    fn is_marked(&self, region: u64) -> bool {
        self.marked.get((region / 64) as usize).is_some_and(|w| w & (1 << (region % 64)) != 0)
    }

    fn set_marked(&mut self, region: u64) {
        let word = (region / 64) as usize;
        if self.marked.len() <= word {
            self.marked.resize(word + 1, 0);
        }
        self.marked[word] |= 1 << (region % 64);
    }

    fn marked_regions(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (w, &word) in self.marked.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                out.push(w as u64 * 64 + b);
                bits &= bits - 1;
            }
        }
        out
    }
}

/// The marks of one node.
pub(super) struct IntentLog {
    store: Arc<dyn BitmapPersistence>,
    tracked: Mutex<Vec<Tracked>>,
    sync: GroupSync,
}

fn marking_failed(name: &str, reason: String) -> io::Error {
    io::Error::other(format!("cannot record the write in crash-safe bitmap '{name}': {reason}"))
}

impl IntentLog {
    pub(super) fn new(store: Arc<dyn BitmapPersistence>) -> Self {
        IntentLog { store, tracked: Mutex::new(Vec::new()), sync: GroupSync::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Tracked>> {
        self.tracked.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes the tracked set `specs` (the node's crash-safe bitmaps). A bitmap that
    /// stays keeps its tables and marks; a new one (or one whose sizes changed) has no
    /// table until the next checkpoint.
    pub(super) fn update(&self, specs: &[TrackedBitmap]) {
        let mut tracked = self.lock();
        tracked.retain(|t| {
            specs.iter().any(|s| {
                s.name == t.spec.name
                    && s.granularity_bits == t.spec.granularity_bits
                    && s.region_bits == t.spec.region_bits
            })
        });
        for spec in specs {
            match tracked.iter_mut().find(|t| t.spec.name == spec.name) {
                Some(t) => t.spec.active = spec.active,
                None => tracked.push(Tracked {
                    spec: spec.clone(),
                    tables: Vec::new(),
                    marked: Vec::new(),
                }),
            }
        }
    }

    /// Before a write, write-zeroes or discard of `[offset, offset + len)` is issued:
    /// every region of it is marked durably in every active bitmap's stored data.
    /// The write's bits must already be set in memory.
    pub(super) fn ensure(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = offset.saturating_add(len);
        let mut wait = None;
        {
            let mut tracked = self.lock();
            for t in tracked.iter_mut().filter(|t| t.spec.active) {
                let first = offset >> t.spec.region_bits;
                let last = (end - 1) >> t.spec.region_bits;
                let new: Vec<u64> = (first..=last).filter(|&r| !t.is_marked(r)).collect();
                if !new.is_empty() && !t.tables.is_empty() {
                    for table in &t.tables {
                        self.store
                            .write_marks(table, t.spec.granularity_bits, t.spec.region_bits, &new)
                            .map_err(|e| marking_failed(&t.spec.name, e))?;
                    }
                    wait = Some(self.sync.written());
                }
                for r in new {
                    t.set_marked(r);
                }
            }
            // Marks of this generation that another writer made and whose sync is not
            // over: this write must not overtake them either.
            if wait.is_none() && tracked.iter().any(|t| t.spec.active && !t.tables.is_empty()) {
                wait = self.sync.pending();
            }
        }
        match wait {
            Some(seq) => self
                .sync
                .wait(seq, || self.store.sync_marks())
                .map_err(|e| io::Error::other(format!("cannot sync the write-intent record: {e}"))),
            None => Ok(()),
        }
    }

    /// Step 1 of a checkpoint: a new generation, with nothing marked.
    pub(super) fn begin(&self) {
        for t in self.lock().iter_mut() {
            t.marked.clear();
        }
    }

    /// Step 3: the bitmaps' new data clusters are written (not live yet): this
    /// generation's marks are copied there, and later marks go there too.
    pub(super) fn written(&self, tables: &[(String, Vec<u64>)]) -> Result<(), String> {
        let mut tracked = self.lock();
        for (name, clusters) in tables {
            let Some(t) = tracked.iter_mut().find(|t| &t.spec.name == name) else { continue };
            let regions = t.marked_regions();
            if !regions.is_empty() {
                self.store.write_marks(
                    clusters,
                    t.spec.granularity_bits,
                    t.spec.region_bits,
                    &regions,
                )?;
            }
            t.tables.push(Arc::new(clusters.clone()));
        }
        Ok(())
    }

    /// Step 4: the new clusters are live; the old ones are about to be freed.
    pub(super) fn switched(&self) {
        for t in self.lock().iter_mut() {
            if t.tables.len() > 1 {
                t.tables.remove(0);
            }
        }
    }

    /// A checkpoint failed before the switch: marks go to the old clusters only (the
    /// new ones are not live and may be freed).
    pub(super) fn abort(&self, tables: &[(String, Vec<u64>)]) {
        for t in self.lock().iter_mut() {
            if let Some((_, clusters)) = tables.iter().find(|(n, _)| *n == t.spec.name) {
                t.tables.retain(|c| c.as_slice() != clusters.as_slice());
            }
        }
    }

    /// Whether a region was marked in this generation.
    pub(super) fn any_marked(&self) -> bool {
        self.lock().iter().any(|t| t.marked.iter().any(|&w| w != 0))
    }

    /// No table is live any more (the bitmaps were stored closed).
    pub(super) fn detach(&self) {
        for t in self.lock().iter_mut() {
            t.tables.clear();
        }
    }

    /// Runs `remove` (which deletes bitmap `name`'s stored copy and frees its clusters)
    /// with no mark in flight, and drops the bitmap's tables before any mark can go to
    /// the freed clusters: on success, and on failure too, since a failure after the
    /// header switched may have freed them already.
    pub(super) fn remove_stored(
        &self,
        name: &str,
        remove: impl FnOnce() -> Result<(), String>,
    ) -> Result<(), String> {
        let mut tracked = self.lock();
        let result = remove();
        for t in tracked.iter_mut().filter(|t| t.spec.name == name) {
            t.tables.clear();
        }
        result
    }

    /// The tracked bitmaps, for queries.
    pub(super) fn tracked(&self) -> Vec<(TrackedBitmap, bool)> {
        self.lock().iter().map(|t| (t.spec.clone(), !t.tables.is_empty())).collect()
    }
}

/// One sync for every writer waiting: a writer that wrote marks takes a sequence
/// number, and waits until a sync that started after its number was taken is over.
#[derive(Default)]
struct GroupSync {
    state: Mutex<SyncState>,
    done: Condvar,
}

#[derive(Default)]
struct SyncState {
    /// Mark writes so far.
    written: u64,
    /// Mark writes known durable.
    synced: u64,
    /// A sync is running.
    syncing: bool,
}

impl GroupSync {
    fn lock(&self) -> std::sync::MutexGuard<'_, SyncState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Notes a mark write; returns its number.
    fn written(&self) -> u64 {
        let mut s = self.lock();
        s.written += 1;
        s.written
    }

    /// The newest mark write not yet durable, if any.
    fn pending(&self) -> Option<u64> {
        let s = self.lock();
        (s.synced < s.written).then_some(s.written)
    }

    /// Waits until mark write `seq` is durable, running `sync` when no sync that
    /// covers it is under way.
    fn wait(&self, seq: u64, sync: impl Fn() -> Result<(), String>) -> Result<(), String> {
        let mut s = self.lock();
        loop {
            if s.synced >= seq {
                return Ok(());
            }
            if !s.syncing {
                s.syncing = true;
                let target = s.written;
                drop(s);
                let result = sync();
                s = self.lock();
                s.syncing = false;
                if result.is_ok() {
                    s.synced = s.synced.max(target);
                }
                self.done.notify_all();
                result?;
                continue;
            }
            s = self.done.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    /// A store that records marks and counts syncs.
    #[derive(Default)]
    struct Recorder {
        marks: Mutex<Vec<(Vec<u64>, Vec<u64>)>>,
        syncs: AtomicUsize,
    }

    impl BitmapPersistence for Recorder {
        fn can_store(&self, _: &str, _: u32, _: &[(&str, u32)]) -> Result<(), String> {
            Ok(())
        }
        fn remove_stored(&self, _: &str) -> Result<(), String> {
            Ok(())
        }
        fn store(&self, _: &[super::super::BitmapToStore<'_>]) -> Result<(), String> {
            Ok(())
        }
        fn write_marks(&self, table: &[u64], _: u8, _: u8, regions: &[u64]) -> Result<(), String> {
            self.marks.lock().unwrap().push((table.to_vec(), regions.to_vec()));
            Ok(())
        }
        fn sync_marks(&self) -> Result<(), String> {
            std::thread::sleep(std::time::Duration::from_millis(20));
            self.syncs.fetch_add(1, SeqCst);
            Ok(())
        }
    }

    fn spec(active: bool) -> TrackedBitmap {
        TrackedBitmap { name: "b".into(), granularity_bits: 16, region_bits: 24, active }
    }

    #[test]
    fn first_write_marks_and_syncs_later_ones_do_not() {
        let store = Arc::new(Recorder::default());
        let log = IntentLog::new(store.clone());
        log.update(&[spec(true)]);
        log.written(&[("b".into(), vec![65536])]).unwrap();
        log.switched();
        log.ensure(0, 4096).unwrap();
        log.ensure(4096, 4096).unwrap();
        log.ensure((16 << 20) - 1, 2).unwrap(); // regions 0 and 1
        assert_eq!(
            *store.marks.lock().unwrap(),
            vec![(vec![65536], vec![0]), (vec![65536], vec![1])]
        );
        assert_eq!(store.syncs.load(SeqCst), 2);
        // Inactive bitmaps are not marked.
        log.update(&[spec(false)]);
        log.ensure(100 << 20, 1).unwrap();
        assert_eq!(store.marks.lock().unwrap().len(), 2);
    }

    #[test]
    fn concurrent_writers_to_one_region_share_a_sync() {
        let store = Arc::new(Recorder::default());
        let log = Arc::new(IntentLog::new(store.clone()));
        log.update(&[spec(true)]);
        log.written(&[("b".into(), vec![65536])]).unwrap();
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let log = log.clone();
                std::thread::spawn(move || log.ensure(i * 4096, 4096).unwrap())
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(store.marks.lock().unwrap().len(), 1, "one mark");
        assert!(store.syncs.load(SeqCst) <= 2, "{} syncs", store.syncs.load(SeqCst));
    }

    #[test]
    fn a_checkpoint_replays_marks_and_dual_writes_until_the_switch() {
        let store = Arc::new(Recorder::default());
        let log = IntentLog::new(store.clone());
        log.update(&[spec(true)]);
        log.written(&[("b".into(), vec![1])]).unwrap();
        log.switched();
        log.ensure(0, 1).unwrap();
        log.begin();
        // Marked again in the new generation, to the old table.
        log.ensure(0, 1).unwrap();
        log.written(&[("b".into(), vec![2])]).unwrap();
        log.ensure(32 << 20, 1).unwrap();
        log.switched();
        log.ensure(48 << 20, 1).unwrap();
        assert_eq!(
            *store.marks.lock().unwrap(),
            vec![
                (vec![1], vec![0]),
                (vec![1], vec![0]),
                (vec![2], vec![0]), // the replay
                (vec![1], vec![2]),
                (vec![2], vec![2]),
                (vec![2], vec![3]),
            ]
        );
    }
}
