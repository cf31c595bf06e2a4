//! The write path of [`Qcow2Image`]: guest writes, zero writes, discards, flush,
//! resize, and the cluster allocator behind them.
//!
//! # Ordering (crash safety)
//!
//! Changed L2 tables and refcount blocks stay in write-back caches (dirty entries are
//! never evicted); changed L1 and refcount table entries are remembered by index. A
//! flush (explicit, or when too many tables are dirty) writes, in this order:
//!
//! 1. dirty refcount blocks, then `flush` of the storage (this also makes the data
//!    written so far durable);
//! 2. dirty refcount table entries (pointing at new blocks, written whole when they
//!    were allocated), then `flush`;
//! 3. dirty L2 tables, then `flush`;
//! 4. dirty L1 entries (pointing at new or copied L2 tables), then `flush`.
//!
//! So a reference never becomes durable before the refcount that counts it, nor a
//! table entry before the table it points to. References dropped from L1/L2 tables
//! (overwritten by copy-on-write, discarded, zeroed with unmap) are only *queued*: the
//! refcount decrements are applied after step 4 of the cycle that wrote the dropped
//! references, and written by a further cycle in the same flush. A cluster whose
//! refcount drops to zero is therefore reused only once no durable table points at it
//! (and once the data I/O started before is over, see `io_gate`).
//!
//! Newly allocated metadata clusters (L2 tables, refcount blocks) are written with
//! their initial content at allocation, before anything durable can point at them.
//! Refcount table growth and L1 growth are synchronous: the new table is written and
//! flushed, then the header is switched (a single-sector write) and flushed, then the
//! old table is freed.

use std::collections::BTreeSet;
use std::sync::{Arc, MutexGuard, PoisonError};

use crate::error::{Qcow2Error, Result};
use crate::header;
use crate::image::{Qcow2Image, lock};
use crate::l2::{self, ClusterMapping};
use crate::refcount;

/// The write path's bookkeeping, behind the metadata lock.
#[derive(Debug)]
pub(crate) struct WriteState {
    dirty_l1: BTreeSet<u64>,
    dirty_reftable: BTreeSet<u64>,
    /// Host clusters whose reference was dropped from an in-memory table.
    pending_decref: Vec<u64>,
    /// No free cluster below this index.
    pub(crate) free_hint: u64,
    /// Every cluster at or past this index is free (past the file and allocations).
    end_cluster: u64,
    /// Clusters chosen by an allocation in progress.
    reserved: Vec<u64>,
    autoclear_checked: bool,
}

impl WriteState {
    pub(crate) fn new(file_clusters: u64) -> WriteState {
        WriteState {
            dirty_l1: BTreeSet::new(),
            dirty_reftable: BTreeSet::new(),
            pending_decref: Vec::new(),
            free_hint: 1,
            end_cluster: file_clusters.max(1),
            reserved: Vec::new(),
            autoclear_checked: false,
        }
    }
}

/// What a guest cluster write does.
#[derive(Debug, Clone, Copy)]
enum Plan {
    /// Overwrite the cluster at `host` (refcount 1).
    InPlace { host: u64 },
    /// Write the new cluster at `host`, filled with the old content `old` where the
    /// request does not cover it; the L2 entry then changes from `old`.
    Alloc { host: u64, old: ClusterMapping },
}

/// How whole clusters are zeroed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ZeroMode {
    Zero { unmap: bool },
    Discard,
}

/// Releases claimed guest clusters on drop.
struct Claim<'a> {
    image: &'a Qcow2Image,
    first: u64,
    end: u64,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut set = lock(&self.image.claims);
        for c in self.first..self.end {
            set.remove(&c);
        }
        drop(set);
        self.image.claims_cv.notify_all();
    }
}

/// A `len`-byte slice of `storage` aligned to 4 KiB (so that O_DIRECT storage needs
/// no bounce buffer).
fn aligned(storage: &mut Vec<u8>, len: usize) -> &mut [u8] {
    const ALIGN: usize = 4096;
    if storage.len() < len + ALIGN {
        storage.resize(len + ALIGN, 0);
    }
    let skip = storage.as_ptr().align_offset(ALIGN).min(ALIGN);
    &mut storage[skip..skip + len]
}

fn be_bytes(table: &[u64]) -> Vec<u8> {
    table.iter().flat_map(|e| e.to_be_bytes()).collect()
}

/// The host clusters a mapping holds a reference to.
fn held_clusters(m: ClusterMapping, cluster_bits: u32) -> Vec<u64> {
    match m {
        ClusterMapping::Data { host } | ClusterMapping::Zero { host: Some(host) } => {
            vec![host >> cluster_bits]
        }
        ClusterMapping::Compressed { host, len } => {
            ((host >> cluster_bits)..=((host + len.max(1) - 1) >> cluster_bits)).collect()
        }
        _ => Vec::new(),
    }
}

impl Qcow2Image {
    pub(crate) fn meta(&self) -> MutexGuard<'_, WriteState> {
        self.meta.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn state_mut(&self) -> std::sync::RwLockWriteGuard<'_, crate::image::ImageState> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn claim(&self, first: u64, end: u64) -> Claim<'_> {
        let mut set = lock(&self.claims);
        while (first..end).any(|c| set.contains(&c)) {
            set = self.claims_cv.wait(set).unwrap_or_else(PoisonError::into_inner);
        }
        set.extend(first..end);
        Claim { image: self, first, end }
    }

    fn io_shared(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.io_gate.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn swrite(&self, buf: &[u8], at: u64, what: &'static str) -> Result<()> {
        self.storage.write_at(buf, at).map_err(Qcow2Error::io(what, at))?;
        Ok(())
    }

    pub(crate) fn sflush(&self) -> Result<()> {
        self.storage.flush().map_err(Qcow2Error::io("flushing", 0))
    }

    fn has_backing_file(&self) -> bool {
        self.backing.is_some() || self.state().header.backing_file.is_some()
    }

    /// Checks the image is writable; on the first change, clears the autoclear bits
    /// this crate does not maintain (all but the bitmaps bit) and makes that durable.
    pub(crate) fn prepare_write(&self) -> Result<()> {
        if !self.writable() {
            return Err(Qcow2Error::ReadOnly);
        }
        self.changed.store(true, std::sync::atomic::Ordering::Release);
        if self.autoclear_done.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(());
        }
        let mut ws = self.meta();
        if !ws.autoclear_checked {
            let (version, bits) = {
                let st = self.state();
                (st.header.version, st.header.autoclear_features)
            };
            // Bits this writer honours; every other must go before the first write.
            let honoured = if self.write_intent {
                header::AUTOCLEAR_BITMAPS | crate::intent::AUTOCLEAR_INTENT
            } else {
                header::AUTOCLEAR_BITMAPS
            };
            let keep = bits & honoured;
            if version >= 3 && bits != keep {
                self.swrite(&keep.to_be_bytes(), 88, "writing the header")?;
                self.sflush()?;
                self.state_mut().header.autoclear_features = keep;
            }
            ws.autoclear_checked = true;
            self.autoclear_done.store(true, std::sync::atomic::Ordering::Release);
        }
        Ok(())
    }

    // ---------------------------------------------------------------- refcounts

    pub(crate) fn rc_get(&self, cluster: u64) -> Result<u64> {
        self.refcount(cluster << self.cluster_bits)
    }

    /// Sets the refcount of host cluster `cluster` in memory (its block becomes dirty),
    /// allocating a refcount block or growing the refcount table when needed.
    pub(crate) fn rc_set(&self, ws: &mut WriteState, cluster: u64, value: u64) -> Result<()> {
        let cb = self.cluster_bits;
        let order = self.state().header.refcount_order;
        if value > refcount::max_refcount(order) {
            return Err(Qcow2Error::UnsupportedRequest("refcount overflow"));
        }
        let (ti, bi) = refcount::locate(cluster, cb, order);
        if ti >= self.state().reftable.len() as u64 {
            self.grow_reftable(ws, ti)?;
        }
        let (entry, table_offset) = {
            let st = self.state();
            (st.reftable[ti as usize], st.header.refcount_table_offset)
        };
        let entry_offset = table_offset + ti * 8;
        let block = match self.valid_refblock(entry, entry_offset)? {
            None => self.alloc_refblock(ws, ti)?,
            Some(b) => b,
        };
        self.refcount_block(block)?;
        let mut cache = lock(&self.refblock_cache);
        if let Some(t) = cache.get_mut_dirty(block) {
            refcount::set(Arc::make_mut(t), bi, order, value);
        } else {
            drop(cache);
            let mut data = self.refcount_block(block)?.to_vec();
            refcount::set(&mut data, bi, order, value);
            lock(&self.refblock_cache).put_dirty(block, data.into());
        }
        Ok(())
    }

    /// The refcount block a refcount table entry (at `entry_offset`) points to,
    /// checked: aligned, past the header, within the file.
    fn valid_refblock(&self, entry: u64, entry_offset: u64) -> Result<Option<u64>> {
        let Some(b) = refcount::reftable_entry_block(entry, self.cluster_bits, entry_offset)?
        else {
            return Ok(None);
        };
        let cs = self.cluster_size();
        if b < cs {
            return Err(Qcow2Error::corrupt(
                "refcount table entry",
                entry_offset,
                "refcount block overlaps the header",
            ));
        }
        self.check_in_file("refcount table entry", entry_offset, b, cs)?;
        Ok(Some(b))
    }

    /// Allocates the refcount block for refcount table index `ti` (whose entry is 0):
    /// in a free cluster, counted in itself when it falls in its own range.
    fn alloc_refblock(&self, ws: &mut WriteState, ti: u64) -> Result<u64> {
        let cb = self.cluster_bits;
        let order = self.state().header.refcount_order;
        let b = self.find_free(ws, 1)?;
        ws.reserved.push(b);
        ws.end_cluster = ws.end_cluster.max(b + 1);
        let mut data = vec![0u8; self.cluster_size() as usize];
        let (bti, bbi) = refcount::locate(b, cb, order);
        let self_described = bti == ti;
        if self_described {
            refcount::set(&mut data, bbi, order, 1);
        }
        let off = b << cb;
        self.swrite(&data, off, "writing a new refcount block")?;
        lock(&self.refblock_cache).put_dirty(off, data.into());
        self.state_mut().reftable[ti as usize] = off;
        ws.dirty_reftable.insert(ti);
        if !self_described {
            self.rc_set(ws, b, 1)?;
        }
        ws.reserved.retain(|&r| r != b);
        Ok(off)
    }

    /// The first run of `n` free clusters at or after the hint.
    fn find_free(&self, ws: &mut WriteState, n: u64) -> Result<u64> {
        let mut start = ws.free_hint.max(1);
        let mut c = start;
        while c - start < n {
            if c >= ws.end_cluster && !ws.reserved.iter().any(|&r| r >= c) {
                // Everything from here on is free.
                break;
            }
            if ws.reserved.contains(&c) || self.rc_get(c)? != 0 {
                start = c + 1;
            }
            c += 1;
        }
        if n == 1 {
            ws.free_hint = start;
        }
        Ok(start)
    }

    /// Allocates one host cluster (refcount 1 in memory); returns its offset.
    fn alloc_cluster(&self, ws: &mut WriteState) -> Result<u64> {
        self.alloc_run(ws, 1)
    }

    /// Allocates `n` contiguous host clusters; returns the offset of the first.
    pub(crate) fn alloc_run(&self, ws: &mut WriteState, n: u64) -> Result<u64> {
        let c = self.find_free(ws, n)?;
        ws.reserved.extend(c..c + n);
        ws.end_cluster = ws.end_cluster.max(c + n);
        let mut result = Ok(());
        for k in c..c + n {
            result = self.rc_set(ws, k, 1);
            if result.is_err() {
                break;
            }
        }
        ws.reserved.retain(|&r| r < c || r >= c + n);
        result?;
        if n == 1 && ws.free_hint == c {
            ws.free_hint = c + 1;
        }
        Ok(c << self.cluster_bits)
    }

    /// Grows the refcount table so that it has index `need_ti`: a new, bigger table
    /// after the end of the image, with the blocks that count it, then the header.
    fn grow_reftable(&self, ws: &mut WriteState, need_ti: u64) -> Result<()> {
        let cb = self.cluster_bits;
        let cs = self.cluster_size();
        let order = self.state().header.refcount_order;
        // Make every refcount block the new table will point to durable.
        self.write_refblocks()?;
        self.sflush()?;
        let (old_table, old_offset, old_clusters) = {
            let st = self.state();
            (
                st.reftable.clone(),
                st.header.refcount_table_offset,
                u64::from(st.header.refcount_table_clusters),
            )
        };
        let old_len = old_table.len() as u64;
        let start = ws.end_cluster.max(ws.reserved.iter().map(|r| r + 1).max().unwrap_or(0));
        let per_table_cluster = cs / 8;
        let mut entries =
            (need_ti + 1).max(old_len * 2).div_ceil(per_table_cluster) * per_table_cluster;
        let (tc, new_blocks) = loop {
            let tc = entries / per_table_cluster;
            // Which table indices the new area [start, start + tc + nb) needs.
            let mut nb = 0u64;
            let mut blocks;
            loop {
                let area_end = start + tc + nb;
                let first_ti = refcount::locate(start, cb, order).0;
                let last_ti = refcount::locate(area_end - 1, cb, order).0;
                blocks = (first_ti..=last_ti)
                    .filter(|&t| {
                        old_table
                            .get(t as usize)
                            .is_none_or(|e| e & refcount::REFTABLE_OFFSET_MASK == 0)
                    })
                    .collect::<Vec<u64>>();
                if blocks.len() as u64 <= nb {
                    break;
                }
                nb = blocks.len() as u64;
            }
            let area_end = start + tc + nb;
            let last_ti = refcount::locate(area_end - 1, cb, order).0;
            if last_ti < entries && need_ti < entries {
                break (tc, blocks);
            }
            entries =
                (last_ti + 1).max(need_ti + 1).div_ceil(per_table_cluster) * per_table_cluster;
        };
        if entries * 8 > header::MAX_REFTABLE_BYTES {
            return Err(Qcow2Error::UnsupportedRequest("the refcount table would exceed 8 MiB"));
        }
        let nb = new_blocks.len() as u64;
        let area_end = start + tc + nb;
        let mut table = old_table.clone();
        table.resize(entries as usize, 0);
        let mut new_block_data: Vec<(u64, Vec<u8>)> = Vec::new();
        for (k, &t) in new_blocks.iter().enumerate() {
            let off = (start + tc + k as u64) << cb;
            table[t as usize] = off;
            new_block_data.push((t, vec![0u8; cs as usize]));
        }
        // Count the new area: in the new blocks, or in existing blocks (in memory).
        for c in start..area_end {
            let (t, bi) = refcount::locate(c, cb, order);
            if let Some((_, data)) = new_block_data.iter_mut().find(|(bt, _)| *bt == t) {
                refcount::set(data, bi, order, 1);
            } else {
                let Some(block) = self.valid_refblock(table[t as usize], old_offset + t * 8)?
                else {
                    return Err(Qcow2Error::corrupt(
                        "refcount table",
                        old_offset,
                        "entry vanished",
                    ));
                };
                let mut data = self.refcount_block(block)?.to_vec();
                refcount::set(&mut data, bi, order, 1);
                lock(&self.refblock_cache).put_dirty(block, data.into());
            }
        }
        self.write_refblocks()?;
        for (k, (_, data)) in new_block_data.iter().enumerate() {
            self.swrite(data, (start + tc + k as u64) << cb, "writing a new refcount block")?;
        }
        let mut raw = be_bytes(&table);
        raw.resize((tc * cs) as usize, 0);
        self.swrite(&raw, start << cb, "writing the new refcount table")?;
        self.sflush()?;
        let mut fields = [0u8; 12];
        fields[..8].copy_from_slice(&(start << cb).to_be_bytes());
        fields[8..].copy_from_slice(&(tc as u32).to_be_bytes());
        self.swrite(&fields, 48, "writing the header")?;
        self.sflush()?;
        {
            let mut st = self.state_mut();
            st.reftable = table;
            st.header.refcount_table_offset = start << cb;
            st.header.refcount_table_clusters = tc as u32;
        }
        {
            let mut cache = lock(&self.refblock_cache);
            for (k, (_, data)) in new_block_data.into_iter().enumerate() {
                cache.insert_clean((start + tc + k as u64) << cb, data.into());
            }
        }
        ws.dirty_reftable.clear();
        ws.end_cluster = ws.end_cluster.max(area_end);
        // The header no longer points at the old table: free it now.
        for c in (old_offset >> cb)..(old_offset >> cb) + old_clusters {
            let rc = self.rc_get(c)?;
            if rc > 0 {
                self.rc_set(ws, c, rc - 1)?;
                if rc == 1 {
                    ws.free_hint = ws.free_hint.min(c);
                }
            }
        }
        Ok(())
    }

    // ---------------------------------------------------------------- flushing

    fn write_refblocks(&self) -> Result<bool> {
        let dirty = lock(&self.refblock_cache).dirty_tables();
        for (off, data) in &dirty {
            self.swrite(data, *off, "writing a refcount block")?;
        }
        let mut cache = lock(&self.refblock_cache);
        for (off, _) in &dirty {
            cache.mark_clean(*off);
        }
        Ok(!dirty.is_empty())
    }

    /// Writes the entries of `table` (at `table_offset`) whose indices are in `dirty`,
    /// a 512-byte sector at a time.
    fn write_entries(
        &self,
        table: &[u64],
        table_offset: u64,
        dirty: &BTreeSet<u64>,
        what: &'static str,
    ) -> Result<()> {
        let mut last_sector = None;
        for &i in dirty {
            let sector = i / 64;
            if last_sector == Some(sector) {
                continue;
            }
            last_sector = Some(sector);
            let from = (sector * 64) as usize;
            let to = (from + 64).min(table.len());
            if from >= to {
                continue;
            }
            self.swrite(&be_bytes(&table[from..to]), table_offset + from as u64 * 8, what)?;
        }
        Ok(())
    }

    /// One write-back cycle, repeated until no refcount decrement is pending.
    pub(crate) fn flush_cycle(&self, ws: &mut WriteState) -> Result<()> {
        loop {
            // Decrements queued so far: their references go to disk in this round (on
            // an error they stay queued).
            let queued = ws.pending_decref.len();
            self.write_refblocks()?;
            self.sflush()?;
            if !ws.dirty_reftable.is_empty() {
                let (table, off) = {
                    let st = self.state();
                    (st.reftable.clone(), st.header.refcount_table_offset)
                };
                self.write_entries(&table, off, &ws.dirty_reftable, "writing the refcount table")?;
                self.sflush()?;
                ws.dirty_reftable.clear();
            }
            let dirty_l2 = lock(&self.l2_cache).dirty_tables();
            if !dirty_l2.is_empty() {
                for (off, table) in &dirty_l2 {
                    self.swrite(&be_bytes(table), *off, "writing an L2 table")?;
                }
                self.sflush()?;
                let mut cache = lock(&self.l2_cache);
                for (off, _) in &dirty_l2 {
                    cache.mark_clean(*off);
                }
            }
            if !ws.dirty_l1.is_empty() {
                let (table, off) = {
                    let st = self.state();
                    (st.l1.clone(), st.header.l1_table_offset)
                };
                self.write_entries(&table, off, &ws.dirty_l1, "writing the L1 table")?;
                self.sflush()?;
                ws.dirty_l1.clear();
            }
            if queued == 0 {
                return Ok(());
            }
            let decrefs: Vec<u64> = ws.pending_decref.drain(..queued).collect();
            // The dropped references are durable; wait for data I/O started before.
            drop(self.io_gate.write().unwrap_or_else(PoisonError::into_inner));
            for c in decrefs {
                let rc = self.rc_get(c)?;
                if rc > 0 {
                    self.rc_set(ws, c, rc - 1)?;
                    if rc == 1 {
                        ws.free_hint = ws.free_hint.min(c);
                    }
                }
            }
        }
    }

    /// Makes every completed write durable: writes back the metadata caches in the
    /// crash-safe order and flushes the storage; applies (and writes) the refcount
    /// decrements of dropped references, so a clean close leaves no leaked cluster.
    pub fn flush(&self) -> Result<()> {
        if !self.writable() {
            return Ok(());
        }
        let mut ws = self.meta();
        self.changed.store(false, std::sync::atomic::Ordering::Release);
        let result = self.flush_cycle(&mut ws);
        if result.is_err() {
            self.changed.store(true, std::sync::atomic::Ordering::Release);
        }
        result
    }

    /// Flushes and closes the image, reporting a flush error (dropping a writable
    /// image also flushes it, but ignores errors).
    pub fn close(self) -> Result<()> {
        self.flush()
    }

    /// Writes back when the caches hold too many dirty tables.
    fn maybe_write_back(&self) -> Result<()> {
        let over = {
            let l2 = lock(&self.l2_cache);
            let rb = lock(&self.refblock_cache);
            l2.dirty_count() > l2.capacity() || rb.dirty_count() > rb.capacity()
        };
        if over {
            let mut ws = self.meta();
            self.flush_cycle(&mut ws)?;
        }
        Ok(())
    }

    // ---------------------------------------------------------------- L2 access

    /// The raw L2 entry of guest cluster `c` (0 when its L1 entry maps no table).
    fn l2_entry(&self, c: u64) -> Result<u64> {
        let l2_bits = self.cluster_bits - 3;
        let l1_entry = self.state().l1.get((c >> l2_bits) as usize).copied().unwrap_or(0);
        let off = l1_entry & l2::OFFSET_MASK;
        if off == 0 {
            return Ok(0);
        }
        Ok(self.l2_table(off)?[(c & ((1 << l2_bits) - 1)) as usize])
    }

    /// Makes the L2 table covering guest cluster `c` exist and be owned by the active
    /// L1 table alone (refcount 1, COPIED): allocates it, or copies a shared one.
    fn ensure_l2_writable(&self, ws: &mut WriteState, c: u64) -> Result<u64> {
        let l1i = c >> (self.cluster_bits - 3);
        let e = match self.state().l1.get(l1i as usize) {
            Some(&e) => e,
            None => {
                return Err(Qcow2Error::corrupt("L1 table", l1i * 8, "too small for the size"));
            }
        };
        let l1_offset = self.state().header.l1_table_offset + l1i * 8;
        let off = l2::l1_entry_l2_offset(e, self.cluster_bits, l1_offset)?.unwrap_or(0);
        if off != 0 && off < self.cluster_size() {
            return Err(Qcow2Error::corrupt("L1 entry", l1_offset, "L2 table overlaps the header"));
        }
        if off != 0 && e & l2::COPIED != 0 {
            return Ok(off);
        }
        let content: Vec<u64> = if off == 0 {
            vec![0; (self.cluster_size() / 8) as usize]
        } else {
            self.l2_table(off)?.to_vec()
        };
        let new = self.alloc_cluster(ws)?;
        self.swrite(&be_bytes(&content), new, "writing a new L2 table")?;
        lock(&self.l2_cache).put_dirty(new, content.into());
        self.state_mut().l1[l1i as usize] = new | l2::COPIED;
        ws.dirty_l1.insert(l1i);
        if off != 0 {
            ws.pending_decref.push(off >> self.cluster_bits);
        }
        Ok(new)
    }

    /// Sets L2 entries of guest clusters (all in one L2 table, made writable before).
    fn set_l2_entries(&self, ws: &mut WriteState, updates: &[(u64, u64)]) -> Result<()> {
        let Some(&(c0, _)) = updates.first() else {
            return Ok(());
        };
        let off = self.ensure_l2_writable(ws, c0)?;
        self.l2_table(off)?;
        let mask = (1u64 << (self.cluster_bits - 3)) - 1;
        let mut cache = lock(&self.l2_cache);
        if let Some(t) = cache.get_mut_dirty(off) {
            let t = Arc::make_mut(t);
            for &(c, v) in updates {
                t[(c & mask) as usize] = v;
            }
        } else {
            drop(cache);
            let mut t = self.l2_table(off)?.to_vec();
            for &(c, v) in updates {
                t[(c & mask) as usize] = v;
            }
            lock(&self.l2_cache).put_dirty(off, t.into());
        }
        Ok(())
    }

    fn queue_decref(&self, ws: &mut WriteState, old: ClusterMapping) {
        ws.pending_decref.extend(held_clusters(old, self.cluster_bits));
    }

    // ---------------------------------------------------------------- guest writes

    /// Whether a cluster under `mapping` reads as zeroes without looking at data: a zero
    /// cluster, or an unallocated one when there is no backing file.
    fn reads_as_zeroes(&self, mapping: ClusterMapping) -> bool {
        match mapping {
            ClusterMapping::Zero { .. } => true,
            ClusterMapping::Unallocated => !self.has_backing_file(),
            _ => false,
        }
    }

    /// Reads what guest cluster `c` holds under `mapping` into `buf` (one cluster).
    fn read_old(&self, mapping: ClusterMapping, c: u64, buf: &mut [u8]) -> Result<()> {
        match mapping {
            ClusterMapping::Unallocated => self.read_backing(buf, c << self.cluster_bits),
            ClusterMapping::Zero { .. } => {
                buf.fill(0);
                Ok(())
            }
            ClusterMapping::Data { host } => {
                self.storage.read_at(buf, host).map_err(Qcow2Error::io("reading data", host))
            }
            ClusterMapping::Compressed { host, len } => {
                buf.copy_from_slice(&self.decompressed(host, len)?);
                Ok(())
            }
        }
    }

    /// Writes `buf` at guest `offset` (any alignment and length within the virtual
    /// size). Partial writes to clusters that are unallocated, zero, compressed or
    /// shared copy the old content into a newly allocated cluster.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.prepare_write()?;
        let span = self.cluster_size() << (self.cluster_bits - 3);
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let n = ((span - pos % span) as usize).min(buf.len() - done);
            self.write_chunk(&buf[done..done + n], pos)?;
            done += n;
        }
        self.maybe_write_back()
    }

    /// A write within one L2 table.
    fn write_chunk(&self, data: &[u8], pos: u64) -> Result<()> {
        let cb = self.cluster_bits;
        let cs = self.cluster_size();
        let c0 = pos >> cb;
        let c_end = (pos + data.len() as u64 - 1) / cs + 1;
        let _claim = self.claim(c0, c_end);
        let (plans, gate) = {
            let mut ws = self.meta();
            let mut plans = Vec::with_capacity((c_end - c0) as usize);
            for c in c0..c_end {
                let entry = self.l2_entry(c)?;
                let m = self.map_cluster(c)?;
                let plan = match m {
                    ClusterMapping::Data { host } if entry & l2::COPIED != 0 => {
                        Plan::InPlace { host }
                    }
                    old => {
                        self.ensure_l2_writable(&mut ws, c)?;
                        Plan::Alloc { host: self.alloc_cluster(&mut ws)?, old }
                    }
                };
                plans.push(plan);
            }
            (plans, self.io_shared())
        };
        // Data I/O, outside the metadata lock: runs of contiguous host clusters that
        // need no copy-on-write go in one write.
        let mut run: Option<(u64, usize, usize)> = None; // host start, data from, data to
        let mut cluster_storage = Vec::new();
        for (k, plan) in plans.iter().enumerate() {
            let c = c0 + k as u64;
            let cstart = c << cb;
            let from = cstart.max(pos);
            let to = (cstart + cs).min(pos + data.len() as u64);
            let (dfrom, dto) = ((from - pos) as usize, (to - pos) as usize);
            let full = from == cstart && to == cstart + cs;
            let direct_host = match *plan {
                Plan::InPlace { host } => Some(host + (from - cstart)),
                Plan::Alloc { host, .. } if full => Some(host),
                Plan::Alloc { .. } => None,
            };
            if let Some(h) = direct_host {
                if let Some((rh, rf, rt)) = run
                    && rh + (rt - rf) as u64 == h
                {
                    run = Some((rh, rf, dto));
                    continue;
                }
                if let Some((rh, rf, rt)) = run.take() {
                    self.swrite(&data[rf..rt], rh, "writing data")?;
                }
                run = Some((h, dfrom, dto));
                continue;
            }
            if let Some((rh, rf, rt)) = run.take() {
                self.swrite(&data[rf..rt], rh, "writing data")?;
            }
            if let Plan::Alloc { host, old } = *plan {
                let at = (from - cstart) as usize;
                if self.reads_as_zeroes(old) {
                    // Nothing to copy: zero the new cluster cheaply (no 64 KiB buffer
                    // of zeroes through the page cache), then write the request.
                    self.storage
                        .write_zeroes(host, cs)
                        .map_err(Qcow2Error::io("zeroing a new cluster", host))?;
                    self.swrite(&data[dfrom..dto], host + at as u64, "writing data")?;
                    continue;
                }
                let cluster_buf = aligned(&mut cluster_storage, cs as usize);
                self.read_old(old, c, cluster_buf)?;
                cluster_buf[at..at + (dto - dfrom)].copy_from_slice(&data[dfrom..dto]);
                self.swrite(cluster_buf, host, "writing data")?;
            }
        }
        if let Some((rh, rf, rt)) = run.take() {
            self.swrite(&data[rf..rt], rh, "writing data")?;
        }
        drop(gate);
        // Point the L2 entries at the new clusters.
        let mut ws = self.meta();
        let mut updates = Vec::new();
        for (k, plan) in plans.iter().enumerate() {
            if let Plan::Alloc { host, old } = *plan {
                updates.push((c0 + k as u64, host | l2::COPIED));
                self.queue_decref(&mut ws, old);
            }
        }
        self.set_l2_entries(&mut ws, &updates)
    }

    /// Makes `len` guest bytes at `offset` read as zeroes. On v3 images whole clusters
    /// get the zero flag (their data cluster is freed when `unmap`, or when it is
    /// shared or compressed); partial clusters are written with zero bytes. v2 images
    /// have no zero flag: whole clusters are deallocated when there is no backing file,
    /// otherwise written with zeroes.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.check_range(offset, len)?;
        self.prepare_write()?;
        if len == 0 {
            return Ok(());
        }
        let v2_backing = self.version() < 3 && self.has_backing_file();
        let cs = self.cluster_size();
        let end = offset + len;
        let first_whole = offset.div_ceil(cs) * cs;
        let size = self.size();
        let mut last_whole = end / cs * cs;
        if end == size {
            last_whole = end.div_ceil(cs) * cs;
        }
        if v2_backing || first_whole >= last_whole {
            self.zero_partial(offset, len, unmap, v2_backing)?;
            return self.maybe_write_back();
        }
        if offset < first_whole {
            self.zero_partial(offset, first_whole - offset, unmap, false)?;
        }
        self.zero_clusters(first_whole / cs, last_whole / cs, ZeroMode::Zero { unmap })?;
        if last_whole < end {
            self.zero_partial(last_whole, end - last_whole, unmap, false)?;
        }
        self.maybe_write_back()
    }

    /// Zeroes parts of clusters (or, with a v2 image over a backing file, any range).
    /// A cluster that already reads as zeroes becomes a zero cluster, which allocates no
    /// data (QEMU does the same); otherwise zero bytes are written. The check and the
    /// change happen under the cluster's claim, so a concurrent write to another part
    /// of the cluster cannot be lost.
    fn zero_partial(&self, offset: u64, len: u64, unmap: bool, v2_backing: bool) -> Result<()> {
        if v2_backing {
            return self.write_zero_bytes(offset, len);
        }
        let cs = self.cluster_size();
        let mut pos = offset;
        while pos < offset + len {
            let c = pos / cs;
            let (start, end) = (c * cs, ((c + 1) * cs).min(self.size()));
            let n = end.min(offset + len) - pos;
            let claim = self.claim(c, c + 1);
            if self.reads_as_zero(start, end)? {
                self.zero_chunk_claimed(c, c + 1, ZeroMode::Zero { unmap })?;
                drop(claim);
            } else {
                drop(claim);
                self.write_zero_bytes(pos, n)?;
            }
            pos += n;
        }
        Ok(())
    }

    /// Whether all of `[start, end)` reads as zeroes according to the mapping.
    fn reads_as_zero(&self, start: u64, end: u64) -> Result<bool> {
        let mut pos = start;
        while pos < end {
            let s = self.block_status(pos, end - pos)?;
            if s.state == crate::backing::BlockState::Data {
                return Ok(false);
            }
            pos += s.len.max(1);
        }
        Ok(true)
    }

    fn write_zero_bytes(&self, offset: u64, len: u64) -> Result<()> {
        let chunk = (1u64 << 20).min(len);
        let zeroes = vec![0u8; chunk as usize];
        let mut done = 0;
        while done < len {
            let n = chunk.min(len - done);
            self.write_at(&zeroes[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }

    /// Discards the whole clusters in `len` guest bytes at `offset` (partial clusters
    /// are left alone, except the last cluster of the image). As QEMU does: on v3 an
    /// allocated cluster becomes a zero cluster (so that a backing file does not show
    /// through), an unallocated one stays so without a backing file; on v2 the cluster
    /// is deallocated without a backing file, and nothing happens with one.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        self.prepare_write()?;
        let cs = self.cluster_size();
        let end = offset + len;
        let first = offset.div_ceil(cs);
        let last = if end == self.size() { end.div_ceil(cs) } else { end / cs };
        if first >= last {
            return Ok(());
        }
        if self.version() < 3 && self.has_backing_file() {
            return Ok(());
        }
        self.zero_clusters(first, last, ZeroMode::Discard)?;
        self.maybe_write_back()
    }

    fn zero_clusters(&self, first: u64, end: u64, mode: ZeroMode) -> Result<()> {
        let per_l2 = 1u64 << (self.cluster_bits - 3);
        let mut c = first;
        while c < end {
            let stop = end.min((c / per_l2 + 1) * per_l2);
            self.zero_chunk(c, stop, mode)?;
            c = stop;
        }
        Ok(())
    }

    /// Zeroes or discards guest clusters `first..end`, all in one L2 table.
    fn zero_chunk(&self, first: u64, end: u64, mode: ZeroMode) -> Result<()> {
        let _claim = self.claim(first, end);
        self.zero_chunk_claimed(first, end, mode)
    }

    /// [`zero_chunk`](Self::zero_chunk) for a caller that holds the clusters' claim.
    fn zero_chunk_claimed(&self, first: u64, end: u64, mode: ZeroMode) -> Result<()> {
        let v3 = self.version() >= 3;
        let backing = self.has_backing_file();
        let mut ws = self.meta();
        let mut updates = Vec::new();
        let mut drops = Vec::new();
        for c in first..end {
            let entry = self.l2_entry(c)?;
            let m = self.map_cluster(c)?;
            let new = match (mode, m) {
                (_, ClusterMapping::Zero { host: None }) if v3 => None,
                (ZeroMode::Discard, ClusterMapping::Unallocated) if !backing => None,
                (ZeroMode::Zero { unmap: false }, ClusterMapping::Zero { host: Some(_) }) => None,
                (ZeroMode::Zero { unmap: false }, ClusterMapping::Data { host })
                    if v3 && entry & l2::COPIED != 0 =>
                {
                    Some(host | l2::COPIED | l2::ZERO)
                }
                (ZeroMode::Zero { .. }, ClusterMapping::Unallocated) if !v3 => None,
                (_, old) => {
                    drops.push(old);
                    Some(if v3 { l2::ZERO } else { 0 })
                }
            };
            if let Some(v) = new {
                updates.push((c, v));
            }
        }
        if updates.is_empty() {
            return Ok(());
        }
        self.set_l2_entries(&mut ws, &updates)?;
        for old in drops {
            self.queue_decref(&mut ws, old);
        }
        Ok(())
    }

    /// Grows the virtual size to `new_size` (shrinking is refused, and so is a resize
    /// while a stored bitmap is not in use, i.e. not loaded by the caller). The L1
    /// table is moved to a bigger area when needed: the new table is written and
    /// flushed before the header points at it.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        self.prepare_write()?;
        let size = self.size();
        if new_size < size {
            return Err(Qcow2Error::UnsupportedRequest("shrinking an image"));
        }
        if new_size > i64::MAX as u64 {
            return Err(Qcow2Error::OutOfRange { offset: new_size, len: 0, size });
        }
        self.check_bitmaps_allow_resize()?;
        let cb = self.cluster_bits;
        let cs = self.cluster_size();
        let mut ws = self.meta();
        self.flush_cycle(&mut ws)?;
        let bytes_per_l1 = 1u64 << (cb + cb - 3);
        let needed = new_size.div_ceil(bytes_per_l1);
        if needed * 8 > header::MAX_L1_BYTES {
            return Err(Qcow2Error::UnsupportedRequest("the L1 table would exceed 32 MiB"));
        }
        let (old_l1, old_off) = {
            let st = self.state();
            (st.l1.clone(), st.header.l1_table_offset)
        };
        if needed > old_l1.len() as u64 {
            let clusters = (needed * 8).div_ceil(cs);
            let new_len = clusters * cs / 8;
            let off = self.alloc_run(&mut ws, clusters)?;
            self.flush_cycle(&mut ws)?;
            let mut table = old_l1.clone();
            table.resize(new_len as usize, 0);
            self.swrite(&be_bytes(&table), off, "writing the new L1 table")?;
            self.sflush()?;
            let mut fields = [0u8; 24];
            fields[..8].copy_from_slice(&new_size.to_be_bytes());
            let crypt = self.state().header.crypt_method;
            fields[8..12].copy_from_slice(&crypt.to_be_bytes());
            fields[12..16].copy_from_slice(&(new_len as u32).to_be_bytes());
            fields[16..].copy_from_slice(&off.to_be_bytes());
            self.swrite(&fields, 24, "writing the header")?;
            self.sflush()?;
            {
                let mut st = self.state_mut();
                st.l1 = table;
                st.header.l1_table_offset = off;
                st.header.l1_size = new_len as u32;
                st.header.size = new_size;
            }
            self.size.store(new_size, std::sync::atomic::Ordering::Release);
            let old_clusters = (old_l1.len() as u64 * 8).div_ceil(cs);
            if old_off != 0 && old_clusters > 0 {
                // The header no longer points at the old table.
                for c in (old_off >> cb)..(old_off >> cb) + old_clusters {
                    let rc = self.rc_get(c)?;
                    if rc > 0 {
                        self.rc_set(&mut ws, c, rc - 1)?;
                        if rc == 1 {
                            ws.free_hint = ws.free_hint.min(c);
                        }
                    }
                }
            }
        } else {
            self.swrite(&new_size.to_be_bytes(), 24, "writing the header")?;
            self.sflush()?;
            self.state_mut().header.size = new_size;
            self.size.store(new_size, std::sync::atomic::Ordering::Release);
        }
        self.flush_cycle(&mut ws)
    }
}

impl Drop for Qcow2Image {
    fn drop(&mut self) {
        if self.writable() && self.changed.load(std::sync::atomic::Ordering::Acquire) {
            let _ = self.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_clusters_of_mappings() {
        assert_eq!(held_clusters(ClusterMapping::Data { host: 0x20000 }, 16), vec![2]);
        assert!(held_clusters(ClusterMapping::Unallocated, 16).is_empty());
        let c = held_clusters(ClusterMapping::Compressed { host: 0x1fe00, len: 0x400 }, 16);
        assert_eq!(c, vec![1, 2]);
    }
}
