//! A write-back cache of metadata tables (L2 tables, refcount blocks) keyed by host
//! offset.
//!
//! Clean tables are evicted least recently used first; dirty tables (changed in memory,
//! not yet written to the file) are never evicted: the write path writes them back in
//! the order crash safety requires and then marks them clean.

use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug)]
struct Slot<T: ?Sized> {
    table: Arc<T>,
    used: u64,
    dirty: bool,
}

/// Tables by host offset, clean ones bounded by a capacity, dirty ones pinned.
#[derive(Debug)]
pub(crate) struct MetaCache<T: ?Sized> {
    capacity: usize,
    tick: u64,
    dirty: usize,
    map: HashMap<u64, Slot<T>>,
}

impl<T: ?Sized> MetaCache<T> {
    /// A cache holding at most `capacity` clean tables (at least one).
    pub(crate) fn new(capacity: usize) -> Self {
        MetaCache { capacity: capacity.max(1), tick: 0, dirty: 0, map: HashMap::new() }
    }

    /// The table at `offset`, if cached.
    pub(crate) fn get(&mut self, offset: u64) -> Option<Arc<T>> {
        self.tick += 1;
        let tick = self.tick;
        self.map.get_mut(&offset).map(|s| {
            s.used = tick;
            Arc::clone(&s.table)
        })
    }

    fn make_room(&mut self) {
        while self.map.len() >= self.capacity + self.dirty {
            let victim = self
                .map
                .iter()
                .filter(|(_, s)| !s.dirty)
                .min_by_key(|(_, s)| s.used)
                .map(|(&k, _)| k);
            match victim {
                Some(k) => {
                    self.map.remove(&k);
                }
                None => break,
            }
        }
    }

    /// Caches `table` read from the file at `offset`, unless a table is already cached
    /// there (which is newer); returns the cached table.
    pub(crate) fn insert_clean(&mut self, offset: u64, table: Arc<T>) -> Arc<T> {
        if let Some(t) = self.get(offset) {
            return t;
        }
        self.make_room();
        self.tick += 1;
        self.map.insert(offset, Slot { table: Arc::clone(&table), used: self.tick, dirty: false });
        table
    }

    /// Replaces (or adds) the table at `offset` and marks it dirty.
    pub(crate) fn put_dirty(&mut self, offset: u64, table: Arc<T>) {
        self.tick += 1;
        let used = self.tick;
        if let Some(s) = self.map.get_mut(&offset) {
            if !s.dirty {
                self.dirty += 1;
            }
            *s = Slot { table, used, dirty: true };
            return;
        }
        self.make_room();
        self.dirty += 1;
        self.map.insert(offset, Slot { table, used, dirty: true });
    }

    /// The cached table at `offset` for changing in place, marked dirty.
    pub(crate) fn get_mut_dirty(&mut self, offset: u64) -> Option<&mut Arc<T>> {
        self.tick += 1;
        let tick = self.tick;
        let s = self.map.get_mut(&offset)?;
        if !s.dirty {
            s.dirty = true;
            self.dirty += 1;
        }
        s.used = tick;
        Some(&mut s.table)
    }

    /// The dirty tables, by increasing offset.
    pub(crate) fn dirty_tables(&self) -> Vec<(u64, Arc<T>)> {
        let mut v: Vec<(u64, Arc<T>)> = self
            .map
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(&k, s)| (k, Arc::clone(&s.table)))
            .collect();
        v.sort_unstable_by_key(|(k, _)| *k);
        v
    }

    /// Marks the table at `offset` clean (written to the file).
    pub(crate) fn mark_clean(&mut self, offset: u64) {
        if let Some(s) = self.map.get_mut(&offset)
            && s.dirty
        {
            s.dirty = false;
            self.dirty -= 1;
        }
    }

    /// Number of dirty tables.
    pub(crate) fn dirty_count(&self) -> usize {
        self.dirty
    }

    /// The most clean tables kept.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }
}
