//! Storing persistent dirty bitmaps into a qcow2 image, and removing them.
//!
//! Semantics of QEMU 10.0.2 (`qemu-bitmaps-spec.md` §6.4, §6.5), implemented from the
//! "Bitmaps extension" of `docs/interop/qcow2.txt`.
//!
//! # Ordering (crash safety)
//!
//! 1. Data clusters (only the non-zero ones), bitmap tables and the new directory are
//!    written to newly allocated clusters, never over live ones.
//! 2. A flush cycle makes their refcounts (and their content) durable.
//! 3. The header is rewritten in one write (bitmaps extension updated, added or dropped,
//!    autoclear bit 0 set or cleared), then synced. A crash before this point leaves the
//!    old set of bitmaps (and leaked clusters at worst); after it, the new set.
//! 4. Only then are the old directory and the replaced (or removed) bitmaps' tables and
//!    data clusters freed, and the refcount decrements flushed.
//!
//! A stale extension (autoclear bit 0 clear: a program without bitmap support wrote the
//! image) is dropped at a writable open by step 3 alone; its clusters are leaked.
//!
//! blockdelta's write-intent record ([`crate::intent`]) is rewritten in the header write
//! of step 3, so it switches with the directory. A bitmap stored [`StoreForm::Open`]
//! gets every data cluster allocated, is in use, and its record entry is bound to its
//! new table; every entry of a bitmap not stored by this call loses its binding. A
//! checkpoint that must keep marking regions while it runs passes [`StoreHooks`]: marks
//! go to the old clusters until the header switched, to the new ones from
//! [`StoreHooks::written`] on, and never to the old ones after
//! [`StoreHooks::switched`], since they are freed after it.

use hbitmap::HBitmap;

use crate::bitmaps::{
    self, BitmapsError, BitmapsExtension, DirectoryEntry, FLAG_AUTO, GRANULARITY_BITS, MAX_BITMAPS,
    MAX_DIRECTORY_SIZE, MAX_NAME_SIZE, MAX_PHYS_SIZE, MAX_TABLE_SIZE, TABLE_OFFSET,
    TYPE_DIRTY_TRACKING,
};
use crate::error::Qcow2Error;
use crate::header::{self, AUTOCLEAR_BITMAPS, EXT_BITMAPS, HeaderExtension};
use crate::image::Qcow2Image;
use crate::intent::{AUTOCLEAR_INTENT, EXT_INTENT, IntentEntry, IntentRecord};
use crate::write::WriteState;

/// A persistent bitmap held in memory, to be stored (callers skip inconsistent and
/// readonly bitmaps).
#[derive(Debug, Clone, Copy)]
pub struct StoredBitmap<'a> {
    /// The name (1 to 1023 bytes).
    pub name: &'a str,
    /// log2 of the granularity in bytes (9 to 31); must match `bits`.
    pub granularity_bits: u8,
    /// Whether the bitmap is enabled (stored with the `auto` flag).
    pub enabled: bool,
    /// The bits; their size must be the image's virtual size.
    pub bits: &'a HBitmap,
    /// How it is stored.
    pub form: StoreForm,
    /// What the write-intent record says of it.
    pub intent: Intent,
}

/// What the write-intent record ([`crate::intent`]) says of a stored bitmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// Nothing new: an entry it has keeps its settings (loses its binding), none is
    /// made (QEMU's way of storing).
    Unchanged,
    /// Not crash-safe, by choice: the record remembers that across opens.
    OptedOut,
    /// Crash-safe, with regions of `2^bits` bytes (kept across clean closes too).
    Regions(u8),
}

/// How a bitmap is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreForm {
    /// As QEMU stores it at a clean close: not in use, all-zero clusters left out.
    Closed,
    /// Crash-safe while open: in use, every data cluster allocated, so that regions can
    /// be marked in place ([`crate::intent`]).
    Open,
}

/// Where an open-form bitmap's data now lies: its data clusters in table order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenTable {
    /// The bitmap.
    pub name: String,
    /// The host offset of each data cluster.
    pub clusters: Vec<u64>,
}

/// Calls a checkpoint gets while a store runs (see the module documentation).
pub trait StoreHooks {
    /// The new clusters are written and durable but not yet live: from now on, marks
    /// must go to them too. Marks made before this call that the new data may lack are
    /// to be written to them now; they are made durable before the header switches.
    fn written(&mut self, image: &Qcow2Image, tables: &[OpenTable]) -> crate::error::Result<()>;
    /// The header points at the new clusters, durably: the old ones are freed next, so
    /// no mark may go to them any more.
    fn switched(&mut self);
}

/// No hooks: a store with nobody marking.
struct NoHooks;

impl StoreHooks for NoHooks {
    fn written(&mut self, _: &Qcow2Image, _: &[OpenTable]) -> crate::error::Result<()> {
        Ok(())
    }
    fn switched(&mut self) {}
}

/// Why storing or removing bitmaps failed. `Display` is QEMU's text where it has one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The image failed.
    #[error(transparent)]
    Image(#[from] Qcow2Error),
    /// The on-disk bitmaps are invalid.
    #[error(transparent)]
    Bitmaps(#[from] BitmapsError),
    /// The image is version 2.
    #[error("Cannot store dirty bitmaps in qcow2 v2 files")]
    Version2,
    /// A bitmap of that name is on disk and was not loaded by us (not in use).
    #[error("Bitmap '{0}' already exists in the image")]
    AlreadyExists(String),
    /// A bitmap breaks a constraint.
    #[error("Bitmap '{name}' doesn't satisfy the constraints: {reason}")]
    Constraints {
        /// The bitmap.
        name: String,
        /// Which constraint.
        reason: String,
    },
    /// More than 65535 bitmaps.
    #[error("Too many persistent bitmaps")]
    TooManyBitmaps,
    /// The directory would exceed 1024 × 65535 bytes.
    #[error("Bitmap directory is too large")]
    DirectoryTooLarge,
    /// The header with its extensions and backing file name exceeds the first cluster.
    #[error("Failed to update bitmap extension: the header does not fit in the first cluster")]
    HeaderTooBig,
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, StoreError>;

/// Clusters of a bitmap (table and non-zero data clusters), from its on-disk table.
fn bitmap_clusters(image: &Qcow2Image, entry: &DirectoryEntry) -> Result<Vec<u64>> {
    let cs = image.cluster_size();
    let cb = image.cluster_bits;
    let table = bitmaps::read_table(image.storage.as_ref(), entry, cs)?;
    let mut out: Vec<u64> =
        table.iter().map(|e| e & TABLE_OFFSET).filter(|&o| o != 0).map(|o| o >> cb).collect();
    let first = entry.table_offset >> cb;
    out.extend(first..first + (u64::from(entry.table_size) * 8).div_ceil(cs));
    Ok(out)
}

impl Qcow2Image {
    /// The directory currently on disk (empty without the extension or when autoclear
    /// bit 0 is clear), with where it lies.
    fn current_directory(&self) -> Result<(Vec<DirectoryEntry>, Option<BitmapsExtension>)> {
        let (data, autoclear) = {
            let st = self.state();
            (st.header.bitmaps_extension().map(<[u8]>::to_vec), st.header.autoclear_features)
        };
        let Some(data) = data else {
            return Ok((Vec::new(), None));
        };
        if autoclear & AUTOCLEAR_BITMAPS == 0 {
            return Ok((Vec::new(), None));
        }
        let cs = self.cluster_size();
        let ext = BitmapsExtension::parse(&data, cs)?;
        let entries = bitmaps::read_directory(self.storage.as_ref(), &ext, cs, self.size())?;
        Ok((entries, Some(ext)))
    }

    /// Whether the header has a bitmaps extension that a program without bitmap
    /// support may have outdated: autoclear bit 0 is clear (always so in a version 2
    /// image). Its bitmaps must not be used.
    pub fn has_stale_bitmaps(&self) -> bool {
        let st = self.state();
        st.header.bitmaps_extension().is_some()
            && st.header.autoclear_features & AUTOCLEAR_BITMAPS == 0
    }

    /// Drops a stale bitmaps extension (see [`has_stale_bitmaps`](Self::has_stale_bitmaps))
    /// from the header, as QEMU does when it opens such an image writable: the header is
    /// rewritten without it in one write, then synced. Returns whether it did.
    ///
    /// The old directory, tables and data clusters are left allocated (leaked, as QEMU
    /// leaves them; `check -r leaks` frees them): a program that did not know the
    /// extension may have repaired those "leaks" and reused the clusters for guest data
    /// since, so freeing what the stale directory names could free live clusters.
    pub fn drop_stale_bitmaps(&self) -> crate::error::Result<bool> {
        if !self.writable() || !self.has_stale_bitmaps() {
            return Ok(false);
        }
        // Serialized with the other header writers (allocation, stores).
        let _ws = self.meta();
        if !self.has_stale_bitmaps() {
            return Ok(false);
        }
        match self.switch_bitmaps_header(None, &IntentRecord::default()) {
            Ok(()) => Ok(true),
            Err(StoreError::Image(e)) => Err(e),
            // A header loses bytes here, so it cannot outgrow the first cluster.
            Err(_) => Err(Qcow2Error::corrupt("header", 0, "cannot drop the bitmaps extension")),
        }
    }

    /// Refuses a resize while the image holds a bitmap that is not in use: nobody
    /// loaded it, so nobody will store it at the new size, and QEMU refuses to open an
    /// image whose (not in use) bitmap table does not cover the disk. Bitmaps loaded by
    /// a writable user are marked in use first (`bitmaps::mark_in_use`), and stored at
    /// the new size when it closes.
    pub(crate) fn check_bitmaps_allow_resize(&self) -> crate::error::Result<()> {
        let Ok((entries, _)) = self.current_directory() else {
            return Err(Qcow2Error::UnsupportedRequest(
                "resizing an image whose bitmap directory cannot be read",
            ));
        };
        if entries.iter().any(|e| !e.in_use()) {
            return Err(Qcow2Error::UnsupportedRequest(
                "resizing an image with persistent bitmaps that were not loaded (not in use)",
            ));
        }
        Ok(())
    }

    /// The names of the bitmaps stored in the image, in directory order (none without
    /// the extension, or when autoclear bit 0 is clear: the bitmaps are then stale).
    pub fn stored_bitmap_names(&self) -> Result<Vec<String>> {
        Ok(self.current_directory()?.0.into_iter().map(|e| e.name).collect())
    }

    /// Stores persistent bitmaps (QEMU's `qcow2_store_persistent_dirty_bitmaps`):
    /// entries on disk not named are kept; a named entry must be in use (loaded by the
    /// caller) and is replaced; the stored entries have `auto` iff enabled and in_use
    /// clear. See the module documentation for the crash-safe order.
    pub fn store_bitmaps(&self, bitmaps: &[StoredBitmap<'_>]) -> Result<()> {
        self.store_bitmaps_with(bitmaps, &mut NoHooks).map(drop)
    }

    /// [`store_bitmaps`](Self::store_bitmaps) with a checkpoint's hooks; returns where
    /// the open-form bitmaps' data now lies.
    pub fn store_bitmaps_with(
        &self,
        bitmaps: &[StoredBitmap<'_>],
        hooks: &mut dyn StoreHooks,
    ) -> Result<Vec<OpenTable>> {
        if bitmaps.is_empty() {
            return Ok(Vec::new());
        }
        if !self.writable() {
            return Err(Qcow2Error::ReadOnly.into());
        }
        if self.version() < 3 {
            return Err(StoreError::Version2);
        }
        self.prepare_write()?;
        let cs = self.cluster_size();
        let disk_len = self.size();
        let mut ws = self.meta();
        let (mut entries, old_ext) = self.current_directory()?;
        let mut to_free = Vec::new();
        // Check everything before allocating anything.
        let mut seen = std::collections::HashSet::new();
        for b in bitmaps {
            let fail = |reason: &str| {
                Err(StoreError::Constraints { name: b.name.to_string(), reason: reason.into() })
            };
            if b.name.is_empty() || b.name.len() > MAX_NAME_SIZE {
                return fail("invalid name length");
            }
            if !GRANULARITY_BITS.contains(&b.granularity_bits)
                || u32::from(b.granularity_bits) != b.bits.granularity()
            {
                return fail("invalid granularity");
            }
            if b.bits.size() != disk_len {
                return fail("the bitmap size differs from the disk size");
            }
            let tsize = bitmaps::table_size(disk_len, 1 << b.granularity_bits, cs);
            if tsize > u64::from(MAX_TABLE_SIZE) || tsize * cs > MAX_PHYS_SIZE {
                return fail("the bitmap is too big");
            }
            if !seen.insert(b.name) {
                return fail("the name is given twice");
            }
            if let Some(old) = entries.iter().find(|e| e.name == b.name)
                && !old.in_use()
            {
                return Err(StoreError::AlreadyExists(b.name.to_string()));
            }
        }
        let new_count = entries.len()
            + bitmaps.iter().filter(|b| !entries.iter().any(|e| e.name == b.name)).count();
        if new_count > MAX_BITMAPS as usize {
            return Err(StoreError::TooManyBitmaps);
        }
        let dir_size: usize = entries
            .iter()
            .filter(|e| !bitmaps.iter().any(|b| b.name == e.name))
            .map(DirectoryEntry::encoded_len)
            .sum::<usize>()
            + bitmaps.iter().map(|b| (24 + b.name.len()).next_multiple_of(8)).sum::<usize>();
        if dir_size as u64 > MAX_DIRECTORY_SIZE {
            return Err(StoreError::DirectoryTooLarge);
        }
        // Fail before allocating when the new header would not fit.
        let placeholder =
            BitmapsExtension { nb_bitmaps: 1, directory_size: 0, directory_offset: 0 };
        let record = self.intent_record_after(bitmaps, &[], &entries);
        self.bitmaps_header(Some(placeholder), &record)?;
        let mut open_tables = Vec::new();
        for b in bitmaps {
            let clusters = bitmaps::encode_clusters(b.bits, cs).map_err(|e| {
                StoreError::Constraints { name: b.name.to_string(), reason: e.to_string() }
            })?;
            let mut table = vec![0u64; clusters.len()];
            let zero = vec![0u8; cs as usize];
            for (slot, data) in table.iter_mut().zip(&clusters) {
                let data = match (data, b.form) {
                    (Some(data), _) => data,
                    (None, StoreForm::Open) => &zero,
                    (None, StoreForm::Closed) => continue,
                };
                let off = self.alloc_run(&mut ws, 1)?;
                self.swrite(data, off, "writing bitmap data")?;
                *slot = off;
            }
            if b.form == StoreForm::Open {
                open_tables.push(OpenTable { name: b.name.to_string(), clusters: table.clone() });
            }
            let table_clusters = (table.len() as u64 * 8).div_ceil(cs);
            let table_off = self.alloc_run(&mut ws, table_clusters)?;
            let mut raw: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
            raw.resize((table_clusters * cs) as usize, 0);
            self.swrite(&raw, table_off, "writing a bitmap table")?;
            let in_use = if b.form == StoreForm::Open { bitmaps::FLAG_IN_USE } else { 0 };
            let entry = DirectoryEntry {
                table_offset: table_off,
                table_size: table.len() as u32,
                flags: in_use | if b.enabled { FLAG_AUTO } else { 0 },
                bitmap_type: TYPE_DIRTY_TRACKING,
                granularity_bits: b.granularity_bits,
                name: b.name.to_string(),
            };
            if let Some(old) = entries.iter_mut().find(|e| e.name == b.name) {
                // Freed once the header no longer points at it. A table that cannot be
                // read is leaked rather than freed.
                if let Ok(c) = bitmap_clusters(self, old) {
                    to_free.extend(c);
                }
                *old = entry;
            } else {
                entries.push(entry);
            }
        }
        let tables: Vec<(&str, u64)> = bitmaps
            .iter()
            .map(|b| {
                let e = entries.iter().find(|e| e.name == b.name).expect("just stored");
                (b.name, e.table_offset)
            })
            .collect();
        let record = self.intent_record_after(bitmaps, &tables, &entries);
        let written = |image: &Qcow2Image, hooks: &mut dyn StoreHooks| {
            hooks.written(image, &open_tables)?;
            // The marks the hook wrote, durable before the header names the clusters.
            image.sflush()
        };
        self.commit_directory(&mut ws, &entries, old_ext, to_free, &record, hooks, &written)?;
        Ok(open_tables)
    }

    /// The write-intent record after storing `bitmaps` at `tables` (name, new table
    /// offset; empty for a size estimate) into `directory`: their entries get the new
    /// binding, a generation more and their region size; every other entry loses its
    /// binding, and entries of bitmaps no longer in the directory go.
    fn intent_record_after(
        &self,
        bitmaps: &[StoredBitmap<'_>],
        tables: &[(&str, u64)],
        directory: &[DirectoryEntry],
    ) -> IntentRecord {
        let mut record = self.intent_record();
        for e in &mut record.entries {
            e.table_offset = 0;
        }
        for b in bitmaps {
            let table_offset = tables.iter().find(|t| t.0 == b.name).map_or(u64::MAX, |t| t.1);
            let region_bits = match b.intent {
                Intent::Unchanged => continue,
                Intent::OptedOut => None,
                Intent::Regions(bits) => Some(bits),
            };
            match record.entries.iter_mut().find(|e| e.name == b.name) {
                Some(e) => {
                    e.table_offset = table_offset;
                    e.generation += 1;
                    e.region_bits = region_bits;
                }
                None => record.entries.push(IntentEntry {
                    name: b.name.to_string(),
                    table_offset,
                    generation: 1,
                    region_bits,
                }),
            }
        }
        record.entries.retain(|e| {
            directory.iter().any(|d| d.name == e.name) || bitmaps.iter().any(|b| b.name == e.name)
        });
        record
    }

    /// The write-intent record in the header (empty without one, or when it cannot be
    /// read: a damaged record trusts nothing).
    pub fn intent_record(&self) -> IntentRecord {
        match IntentRecord::from_header(&self.state().header) {
            Some(Ok(r)) => r,
            _ => IntentRecord::default(),
        }
    }

    /// Removes a stored bitmap (QEMU's `qcow2_co_remove_persistent_dirty_bitmap`): the
    /// directory is rewritten without it (or the extension dropped when it was the
    /// last), then its table and data clusters are freed. A missing bitmap is not an
    /// error.
    pub fn remove_stored_bitmap(&self, name: &str) -> Result<()> {
        if !self.writable() {
            return Err(Qcow2Error::ReadOnly.into());
        }
        if self.version() < 3 {
            return Ok(());
        }
        if !self.current_directory()?.0.iter().any(|e| e.name == name) {
            return Ok(());
        }
        self.prepare_write()?;
        let mut ws = self.meta();
        // Read again under the metadata lock.
        let (mut entries, old_ext) = self.current_directory()?;
        let Some(i) = entries.iter().position(|e| e.name == name) else {
            return Ok(());
        };
        let removed = entries.remove(i);
        let to_free = bitmap_clusters(self, &removed).unwrap_or_default();
        let mut record = self.intent_record();
        record.entries.retain(|e| e.name != name);
        let none = |_: &Qcow2Image, _: &mut dyn StoreHooks| Ok(());
        self.commit_directory(&mut ws, &entries, old_ext, to_free, &record, &mut NoHooks, &none)
    }

    /// Writes `entries` as the new directory (in new clusters), switches the header to
    /// it and to `record`, then frees the old directory and the clusters `to_free`.
    /// `written` runs when the new clusters are durable, before the header switches;
    /// `hooks.switched` right after the switch.
    #[allow(clippy::too_many_arguments)]
    fn commit_directory(
        &self,
        ws: &mut WriteState,
        entries: &[DirectoryEntry],
        old_ext: Option<BitmapsExtension>,
        to_free: Vec<u64>,
        record: &IntentRecord,
        hooks: &mut dyn StoreHooks,
        written: &dyn Fn(&Qcow2Image, &mut dyn StoreHooks) -> crate::error::Result<()>,
    ) -> Result<()> {
        let cs = self.cluster_size();
        let cb = self.cluster_bits;
        let new_ext = if entries.is_empty() {
            None
        } else {
            let mut dir = Vec::new();
            for e in entries {
                e.encode(&mut dir);
            }
            let clusters = (dir.len() as u64).div_ceil(cs);
            let off = self.alloc_run(ws, clusters)?;
            let size = dir.len() as u64;
            dir.resize((clusters * cs) as usize, 0);
            self.swrite(&dir, off, "writing the bitmap directory")?;
            Some(BitmapsExtension {
                nb_bitmaps: entries.len() as u32,
                directory_size: size,
                directory_offset: off,
            })
        };
        // New clusters (and their content) durable before the header references them.
        self.flush_cycle(ws)?;
        written(self, hooks)?;
        self.switch_bitmaps_header(new_ext, record)?;
        hooks.switched();
        let mut free = to_free;
        if let Some(old) = old_ext {
            let first = old.directory_offset >> cb;
            free.extend(first..first + old.directory_size.div_ceil(cs));
        }
        for c in free {
            let rc = self.rc_get(c)?;
            if rc > 0 {
                self.rc_set(ws, c, rc - 1)?;
                if rc == 1 {
                    ws.free_hint = ws.free_hint.min(c);
                }
            }
        }
        self.flush_cycle(ws)?;
        Ok(())
    }

    /// Rewrites the header with the bitmaps extension `ext` (or without it) and
    /// autoclear bit 0 set (cleared without it), and the write-intent `record` with bit
    /// 40 set (both dropped when the record is empty), in one write, then syncs.
    fn switch_bitmaps_header(
        &self,
        ext: Option<BitmapsExtension>,
        record: &IntentRecord,
    ) -> Result<()> {
        let (h, bytes) = self.bitmaps_header(ext, record)?;
        self.swrite(&bytes, 0, "writing the header")?;
        self.sflush()?;
        self.state_mut().header = h;
        Ok(())
    }

    /// The header with the bitmaps extension `ext` (or without it) and the write-intent
    /// `record`, and the bytes to write at offset 0 for it.
    fn bitmaps_header(
        &self,
        ext: Option<BitmapsExtension>,
        record: &IntentRecord,
    ) -> Result<(header::Header, Vec<u8>)> {
        let mut h = self.state().header.clone();
        let old_bytes = header_bytes(&h);
        set_extension(&mut h, EXT_BITMAPS, ext.map(|e| e.to_bytes().to_vec()));
        if ext.is_some() {
            h.autoclear_features |= AUTOCLEAR_BITMAPS;
        } else {
            h.autoclear_features &= !AUTOCLEAR_BITMAPS;
        }
        let intent = (ext.is_some() && !record.entries.is_empty()).then(|| record.to_bytes());
        if intent.is_some() {
            h.autoclear_features |= AUTOCLEAR_INTENT;
        } else {
            h.autoclear_features &= !AUTOCLEAR_INTENT;
        }
        set_extension(&mut h, EXT_INTENT, intent);
        // The backing file name follows the end marker, as QEMU lays it out.
        if h.backing_file.is_some() {
            h.backing_file_offset = extensions_end(&h);
        }
        let mut bytes = header_bytes(&h);
        if bytes.len() as u64 > self.cluster_size() {
            return Err(StoreError::HeaderTooBig);
        }
        // Zero what the old header used past the new one.
        if bytes.len() < old_bytes.len() {
            bytes.resize(old_bytes.len(), 0);
        }
        Ok((h, bytes))
    }
}

/// Replaces, adds or (with `None`) drops the extension of type `ext_type`.
fn set_extension(h: &mut header::Header, ext_type: u32, data: Option<Vec<u8>>) {
    match (h.extensions.iter().position(|e| e.ext_type == ext_type), data) {
        (Some(i), Some(d)) => h.extensions[i].data = d,
        (Some(i), None) => {
            h.extensions.remove(i);
        }
        (None, Some(d)) => h.extensions.push(HeaderExtension { ext_type, data: d }),
        (None, None) => {}
    }
}

/// Where the extension area (with its end marker) of `h` ends.
fn extensions_end(h: &header::Header) -> u64 {
    u64::from(h.header_length)
        + h.extensions.iter().map(|e| 8 + (e.data.len() as u64).next_multiple_of(8)).sum::<u64>()
        + 8
}

/// The header's bytes: fixed fields, extensions, end marker, backing file name.
fn header_bytes(h: &header::Header) -> Vec<u8> {
    let mut b = Vec::with_capacity(512);
    b.extend_from_slice(&header::MAGIC.to_be_bytes());
    b.extend_from_slice(&h.version.to_be_bytes());
    b.extend_from_slice(&h.backing_file_offset.to_be_bytes());
    b.extend_from_slice(&h.backing_file_size.to_be_bytes());
    b.extend_from_slice(&h.cluster_bits.to_be_bytes());
    b.extend_from_slice(&h.size.to_be_bytes());
    b.extend_from_slice(&h.crypt_method.to_be_bytes());
    b.extend_from_slice(&h.l1_size.to_be_bytes());
    b.extend_from_slice(&h.l1_table_offset.to_be_bytes());
    b.extend_from_slice(&h.refcount_table_offset.to_be_bytes());
    b.extend_from_slice(&h.refcount_table_clusters.to_be_bytes());
    b.extend_from_slice(&h.nb_snapshots.to_be_bytes());
    b.extend_from_slice(&h.snapshots_offset.to_be_bytes());
    b.extend_from_slice(&h.incompatible_features.to_be_bytes());
    b.extend_from_slice(&h.compatible_features.to_be_bytes());
    b.extend_from_slice(&h.autoclear_features.to_be_bytes());
    b.extend_from_slice(&h.refcount_order.to_be_bytes());
    b.extend_from_slice(&h.header_length.to_be_bytes());
    if h.header_length > 104 {
        b.push(h.compression_type);
        b.extend_from_slice(&h.extra_fields);
    }
    b.resize(h.header_length as usize, 0);
    for e in &h.extensions {
        b.extend_from_slice(&e.ext_type.to_be_bytes());
        b.extend_from_slice(&(e.data.len() as u32).to_be_bytes());
        b.extend_from_slice(&e.data);
        b.resize(b.len().next_multiple_of(8), 0);
    }
    b.extend_from_slice(&[0u8; 8]);
    if let Some(name) = &h.backing_file {
        b.resize(b.len().max(h.backing_file_offset as usize), 0);
        b.extend_from_slice(name);
    }
    b
}
