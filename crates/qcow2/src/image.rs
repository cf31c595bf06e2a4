//! [`Qcow2Image`]: opening an image and reading it (the write path is in
//! [`crate::write`]).

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use crate::backing::{BackingImage, BlockState, BlockStatus, open_qcow2_layer};
use crate::cache::MetaCache;
use crate::compress;
use crate::error::{FeatureKind, Qcow2Error, Result};
use crate::header::{self, Header, HeaderExtension};
use crate::l2::{self, ClusterMapping};
use crate::refcount;
use crate::snapshot::{self, Snapshot};
use crate::storage::Storage;

/// Default size of the L2 table cache, in bytes.
pub const DEFAULT_L2_CACHE_BYTES: u64 = 4 << 20;
/// Default size of the refcount block cache, in bytes.
pub const DEFAULT_REFCOUNT_CACHE_BYTES: u64 = 1 << 20;

/// Incompatible feature bits this crate knows about.
const KNOWN_INCOMPAT: u64 = header::INCOMPAT_DIRTY
    | header::INCOMPAT_CORRUPT
    | header::INCOMPAT_DATA_FILE
    | header::INCOMPAT_COMPRESSION
    | header::INCOMPAT_EXTENDED_L2;

/// How to open an image.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Open for writing (refused when the image is marked corrupt): enables
    /// [`Qcow2Image::write_at`] and the other changing methods.
    pub writable: bool,
    /// The backing image, opened by the caller, when the image has a backing file.
    pub backing: Option<Arc<dyn BackingImage>>,
    /// Open an image that names a backing file without one: its unallocated clusters
    /// then read as zeroes. Without this, a missing backing image is an error.
    pub ignore_backing: bool,
    /// Most bytes of L2 tables to cache (at least one table is cached).
    pub l2_cache_bytes: u64,
    /// Most bytes of refcount blocks to cache (at least one block is cached).
    pub refcount_cache_bytes: u64,
    /// The opener keeps blockdelta's write-intent record ([`crate::intent`]) true: it
    /// marks regions before writing to them. Without this a writer clears autoclear
    /// bit 40 before its first write, as it clears every bit it does not honour.
    pub write_intent: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            writable: false,
            backing: None,
            ignore_backing: false,
            l2_cache_bytes: DEFAULT_L2_CACHE_BYTES,
            refcount_cache_bytes: DEFAULT_REFCOUNT_CACHE_BYTES,
            write_intent: false,
        }
    }
}

/// The metadata of an open image that the write path will change: the header (with
/// its extensions and autoclear bits), the active L1 table and the refcount table.
#[derive(Debug)]
pub(crate) struct ImageState {
    pub(crate) header: Header,
    pub(crate) l1: Vec<u64>,
    pub(crate) reftable: Vec<u64>,
    pub(crate) snapshots: Vec<Snapshot>,
}

/// An open qcow2 image.
///
/// Shared between threads (`&self` methods). The header, L1 table, refcount table and
/// snapshot table are behind a read-write lock; L2 tables and refcount blocks go
/// through write-back caches keyed by host offset (clean tables bounded, dirty ones
/// pinned until written), and the last decompressed cluster is kept. Images opened
/// writable take [`write_at`](Qcow2Image::write_at), [`write_zeroes`](Qcow2Image::write_zeroes),
/// [`discard`](Qcow2Image::discard), [`resize`](Qcow2Image::resize) and
/// [`flush`](Qcow2Image::flush); see [`crate::write`] for the crash-safe ordering.
/// Dropping a changed image flushes it (errors ignored; [`close`](Qcow2Image::close)
/// reports them).
///
/// The virtual size, cluster size and compression type are copied out of the header
/// for lock-free reads: a resize updates `size` as well as the header.
pub struct Qcow2Image {
    pub(crate) storage: Arc<dyn Storage>,
    writable: bool,
    /// [`OpenOptions::write_intent`].
    pub(crate) write_intent: bool,
    pub(crate) backing: Option<Arc<dyn BackingImage>>,
    pub(crate) cluster_bits: u32,
    pub(crate) size: AtomicU64,
    compression_type: u8,
    /// The file length last seen (refreshed when an offset seems past the end).
    file_len: AtomicU64,
    pub(crate) state: RwLock<ImageState>,
    pub(crate) l2_cache: Mutex<MetaCache<[u64]>>,
    pub(crate) refblock_cache: Mutex<MetaCache<[u8]>>,
    /// The write path's metadata lock and bookkeeping (see [`crate::write`]).
    pub(crate) meta: Mutex<crate::write::WriteState>,
    /// Guest clusters being changed by a write, zero write or discard.
    pub(crate) claims: Mutex<HashSet<u64>>,
    pub(crate) claims_cv: std::sync::Condvar,
    /// Held shared during data I/O to host clusters; taken exclusively before freed
    /// clusters become reusable.
    pub(crate) io_gate: RwLock<()>,
    pub(crate) autoclear_done: std::sync::atomic::AtomicBool,
    /// Whether a change was made since the last flush (dropping the image flushes).
    pub(crate) changed: std::sync::atomic::AtomicBool,
    /// The last decompressed cluster: (host offset of the compressed data, data).
    last_compressed: Mutex<Option<(u64, Arc<[u8]>)>>,
}

impl std::fmt::Debug for Qcow2Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Image")
            .field("size", &self.size())
            .field("cluster_bits", &self.cluster_bits)
            .field("writable", &self.writable)
            .field("backing", &self.backing)
            .finish_non_exhaustive()
    }
}

fn invalid(field: &'static str, value: u64, reason: &'static str) -> Qcow2Error {
    Qcow2Error::InvalidHeader { field, value, reason }
}

/// Checks that a table of `bytes` bytes at `offset` is cluster-aligned, does not
/// overlap the header cluster and lies within the file.
fn check_table(
    field: &'static str,
    offset: u64,
    bytes: u64,
    cluster_size: u64,
    file_len: u64,
) -> Result<()> {
    if !offset.is_multiple_of(cluster_size) {
        return Err(invalid(field, offset, "not aligned to a cluster"));
    }
    if bytes == 0 {
        return Ok(());
    }
    if offset < cluster_size {
        return Err(invalid(field, offset, "overlaps the header cluster"));
    }
    match offset.checked_add(bytes) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(invalid(field, offset, "the table reaches past the end of the file")),
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Qcow2Image {
    /// Opens the qcow2 image on `storage`.
    ///
    /// Reads and checks the header, its extensions, the active L1 table and the
    /// refcount table. A writable open drops a stale bitmaps extension (autoclear bit
    /// 0 clear) from the header, as QEMU does. Refuses unknown incompatible features, encryption, external data
    /// files, extended L2 entries, the dirty bit (the refcounts need repair), and the
    /// corrupt bit for a writable open.
    pub fn open(storage: Arc<dyn Storage>, options: OpenOptions) -> Result<Qcow2Image> {
        let file_len = storage.len().map_err(Qcow2Error::io("getting the file length", 0))?;
        let h = read_header(&*storage, file_len)?;
        check_features(&h, options.writable)?;
        if h.backing_file.is_some() && options.backing.is_none() && !options.ignore_backing {
            return Err(Qcow2Error::Backing {
                path: String::from_utf8_lossy(h.backing_file.as_deref().unwrap_or_default())
                    .into_owned(),
                reason: "the image has a backing file but none was supplied \
                         (set OpenOptions::backing or ignore_backing)"
                    .to_owned(),
                source: None,
            });
        }

        // Virtual size and the active L1 table.
        if h.size > i64::MAX as u64 {
            return Err(invalid("size", h.size, "virtual size larger than 2^63 - 1"));
        }
        let l2_entries_bits = h.cluster_bits - 3;
        let bytes_per_l1 = 1u64 << (h.cluster_bits + l2_entries_bits);
        let needed_l1 = h.size.div_ceil(bytes_per_l1);
        let max_l1 = header::MAX_L1_BYTES / 8;
        if needed_l1 > max_l1 {
            return Err(invalid(
                "size",
                h.size,
                "virtual size needs an L1 table larger than 32 MiB for this cluster size",
            ));
        }
        if u64::from(h.l1_size) > max_l1 {
            return Err(invalid("l1_size", h.l1_size.into(), "L1 table larger than 32 MiB"));
        }
        if u64::from(h.l1_size) < needed_l1 {
            return Err(invalid(
                "l1_size",
                h.l1_size.into(),
                "L1 table too small for the virtual size",
            ));
        }
        let cluster_size = h.cluster_size();
        let l1_bytes = u64::from(h.l1_size) * 8;
        check_table("l1_table_offset", h.l1_table_offset, l1_bytes, cluster_size, file_len)?;

        // Refcount table.
        if h.refcount_table_clusters == 0 {
            return Err(invalid("refcount_table_clusters", 0, "the image has no refcount table"));
        }
        let reftable_bytes = u64::from(h.refcount_table_clusters) * cluster_size;
        if reftable_bytes > header::MAX_REFTABLE_BYTES {
            return Err(invalid(
                "refcount_table_clusters",
                h.refcount_table_clusters.into(),
                "refcount table larger than 8 MiB",
            ));
        }
        check_table(
            "refcount_table_offset",
            h.refcount_table_offset,
            reftable_bytes,
            cluster_size,
            file_len,
        )?;

        // Snapshot table.
        if h.nb_snapshots > header::MAX_SNAPSHOTS {
            return Err(invalid(
                "nb_snapshots",
                h.nb_snapshots.into(),
                "more than 65536 snapshots",
            ));
        }
        if h.nb_snapshots > 0 {
            // Each entry is at least 40 bytes.
            check_table("snapshots_offset", h.snapshots_offset, 40, cluster_size, file_len)?;
        }

        let l1 = read_table(&*storage, h.l1_table_offset, l1_bytes, "reading the L1 table")?;
        let reftable = read_table(
            &*storage,
            h.refcount_table_offset,
            reftable_bytes,
            "reading the refcount table",
        )?;

        let snapshots = snapshot::read_table(
            &*storage,
            h.snapshots_offset,
            h.nb_snapshots,
            h.cluster_bits,
            file_len,
        )?;

        let l2_tables = (options.l2_cache_bytes / cluster_size).clamp(1, 1 << 16) as usize;
        let ref_blocks = (options.refcount_cache_bytes / cluster_size).clamp(1, 1 << 16) as usize;
        let image = Qcow2Image {
            storage,
            writable: options.writable,
            write_intent: options.write_intent,
            backing: options.backing,
            cluster_bits: h.cluster_bits,
            size: AtomicU64::new(h.size),
            meta: Mutex::new(crate::write::WriteState::new(file_len.div_ceil(cluster_size))),
            claims: Mutex::new(HashSet::new()),
            claims_cv: std::sync::Condvar::new(),
            io_gate: RwLock::new(()),
            autoclear_done: std::sync::atomic::AtomicBool::new(false),
            changed: std::sync::atomic::AtomicBool::new(false),
            compression_type: h.compression_type,
            file_len: AtomicU64::new(file_len),
            state: RwLock::new(ImageState { header: h, l1, reftable, snapshots }),
            l2_cache: Mutex::new(MetaCache::new(l2_tables)),
            refblock_cache: Mutex::new(MetaCache::new(ref_blocks)),
            last_compressed: Mutex::new(None),
        };
        // QEMU drops a stale bitmaps extension as soon as it opens the image writable.
        image.drop_stale_bitmaps()?;
        Ok(image)
    }

    /// Opens the qcow2 image file at `path` with its backing chain (see
    /// [`open_file_chain`](crate::backing::open_file_chain)); read-only unless
    /// `writable` (backing images are always read-only).
    pub fn open_path(path: &Path, writable: bool) -> Result<Qcow2Image> {
        let mut seen = HashSet::new();
        if let Ok(canonical) = path.canonicalize() {
            seen.insert(canonical);
        }
        open_qcow2_layer(path, writable, 0, &mut seen)
    }

    pub(crate) fn state(&self) -> std::sync::RwLockReadGuard<'_, ImageState> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// A copy of the parsed header, with its extensions and backing file name.
    pub fn header(&self) -> Header {
        self.state().header.clone()
    }

    /// The header extensions, in on-disk order, as stored.
    pub fn extensions(&self) -> Vec<HeaderExtension> {
        self.state().header.extensions.clone()
    }

    /// The autoclear feature bits.
    pub fn autoclear_features(&self) -> u64 {
        self.state().header.autoclear_features
    }

    /// The compatible feature bits.
    pub fn compatible_features(&self) -> u64 {
        self.state().header.compatible_features
    }

    /// The incompatible feature bits.
    pub fn incompatible_features(&self) -> u64 {
        self.state().header.incompatible_features
    }

    /// The qcow2 version (2 or 3).
    pub fn version(&self) -> u32 {
        self.state().header.version
    }

    /// The virtual size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.size()
    }

    pub(crate) fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// log2 of the cluster size.
    pub fn cluster_bits(&self) -> u32 {
        self.cluster_bits
    }

    /// The refcount width in bits (1 to 64).
    pub fn refcount_bits(&self) -> u32 {
        self.state().header.refcount_bits()
    }

    /// The compression type (0 deflate, 1 zstd).
    pub fn compression_type(&self) -> u8 {
        self.compression_type
    }

    /// The backing file name as stored, if any.
    pub fn backing_file_name(&self) -> Option<Vec<u8>> {
        self.state().header.backing_file.clone()
    }

    /// The backing file format (from the backing format extension), if recorded.
    pub fn backing_format(&self) -> Option<String> {
        self.state().header.backing_format().map(str::to_owned)
    }

    /// The backing image reads fall through to, if any.
    pub fn backing(&self) -> Option<&Arc<dyn BackingImage>> {
        self.backing.as_ref()
    }

    /// Whether the image was opened for writing.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// The storage under the image.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// A copy of the active L1 table (raw entries).
    pub fn l1_table(&self) -> Vec<u64> {
        self.state().l1.clone()
    }

    /// A copy of the refcount table (raw entries).
    pub fn refcount_table(&self) -> Vec<u64> {
        self.state().reftable.clone()
    }

    /// The internal snapshots, in table order.
    pub fn snapshots(&self) -> Vec<Snapshot> {
        self.state().snapshots.clone()
    }

    /// The L1 table of `snapshot` (raw entries); its bounds were checked at open.
    pub fn snapshot_l1_table(&self, snapshot: &Snapshot) -> Result<Vec<u64>> {
        read_table(
            &*self.storage,
            snapshot.l1_table_offset,
            u64::from(snapshot.l1_size) * 8,
            "reading a snapshot L1 table",
        )
    }

    /// The raw entries of the L2 table at host `offset` (through the cache).
    pub fn l2_table_entries(&self, offset: u64) -> Result<Arc<[u64]>> {
        if !offset.is_multiple_of(self.cluster_size()) || offset < self.cluster_size() {
            return Err(Qcow2Error::corrupt(
                "L2 table",
                offset,
                "offset is unaligned or in the header",
            ));
        }
        self.check_in_file("L2 table", offset, offset, self.cluster_size())?;
        self.l2_table(offset)
    }

    /// The length of the image file.
    pub fn file_len(&self) -> Result<u64> {
        let len = self.storage.len().map_err(Qcow2Error::io("getting the file length", 0))?;
        self.file_len.store(len, Ordering::Relaxed);
        Ok(len)
    }

    /// Checks that `offset` lies in the file (re-reading the length if needed).
    pub(crate) fn check_in_file(
        &self,
        structure: &'static str,
        at: u64,
        offset: u64,
        len: u64,
    ) -> Result<()> {
        let end = offset.checked_add(len).ok_or(Qcow2Error::corrupt(
            structure,
            at,
            "offset overflows",
        ))?;
        if end <= self.file_len.load(Ordering::Relaxed) || end <= self.file_len()? {
            Ok(())
        } else {
            Err(Qcow2Error::corrupt(structure, at, "points past the end of the file"))
        }
    }

    /// The L2 table at `offset` (cached).
    pub(crate) fn l2_table(&self, offset: u64) -> Result<Arc<[u64]>> {
        if let Some(t) = lock(&self.l2_cache).get(offset) {
            return Ok(t);
        }
        let table: Arc<[u64]> =
            read_table(&*self.storage, offset, self.cluster_size(), "reading an L2 table")?.into();
        Ok(lock(&self.l2_cache).insert_clean(offset, table))
    }

    /// The mapping of guest cluster `index` (guest offset `index * cluster_size`).
    pub fn map_cluster(&self, index: u64) -> Result<ClusterMapping> {
        self.map_cluster_with(index, false)
            .and_then(|m| m.ok_or(Qcow2Error::corrupt("L2 table", 0, "not cached")))
    }

    /// Reads `buf.len()` bytes at `offset` if that needs no metadata I/O and no data I/O
    /// that could block (see [`Storage::read_at_nowait`]): `Ok(false)` otherwise, and
    /// then `buf` holds garbage. Data clusters whose L2 table is cached, zero clusters,
    /// and unallocated clusters without a backing image qualify.
    pub fn try_read_cached(&self, buf: &mut [u8], offset: u64) -> Result<bool> {
        self.check_range(offset, buf.len() as u64)?;
        let cs = self.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let in_cluster = pos & (cs - 1);
            let len = ((cs - in_cluster) as usize).min(buf.len() - done);
            let chunk = &mut buf[done..done + len];
            match self.map_cluster_with(pos >> self.cluster_bits, true)? {
                Some(ClusterMapping::Data { host }) => {
                    let at = host + in_cluster;
                    let ok = self
                        .storage
                        .read_at_nowait(chunk, at)
                        .map_err(Qcow2Error::io("reading data", at))?;
                    if !ok {
                        return Ok(false);
                    }
                }
                Some(ClusterMapping::Zero { .. }) => chunk.fill(0),
                Some(ClusterMapping::Unallocated) if self.backing.is_none() => chunk.fill(0),
                _ => return Ok(false),
            }
            done += len;
        }
        Ok(true)
    }

    /// [`map_cluster`](Self::map_cluster); with `cached_only`, `None` instead of reading
    /// an L2 table that is not in the cache.
    fn map_cluster_with(&self, index: u64, cached_only: bool) -> Result<Option<ClusterMapping>> {
        let cb = self.cluster_bits;
        let l2_bits = cb - 3;
        let l1_index = index >> l2_bits;
        let l2_index = index & ((1 << l2_bits) - 1);
        let (l1_entry, l1_offset) = {
            let st = self.state();
            match st.l1.get(l1_index as usize) {
                Some(&e) => (e, st.header.l1_table_offset + l1_index * 8),
                None => return Ok(Some(ClusterMapping::Unallocated)),
            }
        };
        let Some(l2_offset) = l2::l1_entry_l2_offset(l1_entry, cb, l1_offset)? else {
            return Ok(Some(ClusterMapping::Unallocated));
        };
        if l2_offset < self.cluster_size() {
            return Err(Qcow2Error::corrupt("L1 entry", l1_offset, "L2 table overlaps the header"));
        }
        self.check_in_file("L1 entry", l1_offset, l2_offset, self.cluster_size())?;
        let table = if cached_only {
            match lock(&self.l2_cache).get(l2_offset) {
                Some(t) => t,
                None => return Ok(None),
            }
        } else {
            self.l2_table(l2_offset)?
        };
        let entry_offset = l2_offset + l2_index * 8;
        let mapping = l2::decode_l2_entry(table[l2_index as usize], cb, entry_offset)?;
        match mapping {
            ClusterMapping::Data { host } => {
                if host < self.cluster_size() {
                    return Err(Qcow2Error::corrupt(
                        "L2 entry",
                        entry_offset,
                        "data cluster overlaps the header",
                    ));
                }
                self.check_in_file("L2 entry", entry_offset, host, 1)?;
            }
            ClusterMapping::Compressed { host, .. } => {
                if host < self.cluster_size() {
                    return Err(Qcow2Error::corrupt(
                        "L2 entry",
                        entry_offset,
                        "compressed cluster overlaps the header",
                    ));
                }
                self.check_in_file("L2 entry", entry_offset, host, 1)?;
            }
            ClusterMapping::Zero { .. } | ClusterMapping::Unallocated => {}
        }
        Ok(Some(mapping))
    }

    /// Whether the L1 entry covering guest cluster `index` maps no L2 table.
    fn l1_entry_is_zero(&self, index: u64) -> bool {
        let l1_index = index >> (self.cluster_bits - 3);
        self.state().l1.get(l1_index as usize).is_none_or(|e| e & l2::OFFSET_MASK == 0)
    }

    /// The run starting at guest `pos` (at most `max` bytes, within one L2 table) that
    /// maps the same way: the mapping of its first cluster and its length.
    fn extent(&self, pos: u64, max: u64) -> Result<(ClusterMapping, u64)> {
        let cs = self.cluster_size();
        let first = self.map_cluster(pos >> self.cluster_bits)?;
        let mut len = (cs - (pos & (cs - 1))).min(max);
        if matches!(first, ClusterMapping::Compressed { .. }) {
            return Ok((first, len));
        }
        let l2_span = cs << (self.cluster_bits - 3);
        let limit = max.min(l2_span - (pos & (l2_span - 1)));
        if first == ClusterMapping::Unallocated && self.l1_entry_is_zero(pos >> self.cluster_bits) {
            // No L2 table: the whole span is unallocated.
            return Ok((first, limit));
        }
        let mut next = (pos >> self.cluster_bits) + 1;
        while len < limit {
            let m = self.map_cluster(next)?;
            let k = (next - (pos >> self.cluster_bits)) * cs;
            let same = match (first, m) {
                (ClusterMapping::Unallocated, ClusterMapping::Unallocated) => true,
                (ClusterMapping::Zero { host: None }, ClusterMapping::Zero { host: None }) => true,
                (
                    ClusterMapping::Zero { host: Some(a) },
                    ClusterMapping::Zero { host: Some(b) },
                )
                | (ClusterMapping::Data { host: a }, ClusterMapping::Data { host: b }) => {
                    b == a + k
                }
                _ => false,
            };
            if !same {
                break;
            }
            len = (len + cs).min(limit);
            next += 1;
        }
        Ok((first, len))
    }

    pub(crate) fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(Qcow2Error::OutOfRange { offset, len, size: self.size() }),
        }
    }

    /// Reads `buf.len()` guest bytes at `offset`; the range must lie within the
    /// virtual size.
    ///
    /// Unallocated clusters read from the backing image (zeroes past its end) or as
    /// zeroes; zero clusters read as zeroes; compressed clusters are decompressed.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let cs = self.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (mapping, len) = self.extent(pos, (buf.len() - done) as u64)?;
            let chunk = &mut buf[done..done + len as usize];
            let in_cluster = pos & (cs - 1);
            match mapping {
                ClusterMapping::Unallocated => self.read_backing(chunk, pos)?,
                ClusterMapping::Zero { .. } => chunk.fill(0),
                ClusterMapping::Data { host } => {
                    let at = host + in_cluster;
                    self.storage.read_at(chunk, at).map_err(Qcow2Error::io("reading data", at))?;
                }
                ClusterMapping::Compressed { host, len: clen } => {
                    let data = self.decompressed(host, clen)?;
                    let start = in_cluster as usize;
                    chunk.copy_from_slice(&data[start..start + chunk.len()]);
                }
            }
            done += len as usize;
        }
        Ok(())
    }

    /// Reads from the backing image, zeroes past its end or without one.
    pub(crate) fn read_backing(&self, buf: &mut [u8], pos: u64) -> Result<()> {
        let Some(backing) = &self.backing else {
            buf.fill(0);
            return Ok(());
        };
        let blen = backing.len();
        let have = blen.saturating_sub(pos).min(buf.len() as u64) as usize;
        if have > 0 {
            backing.read_at(&mut buf[..have], pos)?;
        }
        buf[have..].fill(0);
        Ok(())
    }

    /// The decompressed cluster whose compressed data is `len` bytes at `host`.
    pub(crate) fn decompressed(&self, host: u64, len: u64) -> Result<Arc<[u8]>> {
        if let Some((at, data)) = &*lock(&self.last_compressed)
            && *at == host
        {
            return Ok(Arc::clone(data));
        }
        // `len` is at most 2^(cluster_bits - 8) sectors: two clusters.
        let mut input = vec![0u8; len as usize];
        self.storage
            .read_at(&mut input, host)
            .map_err(Qcow2Error::io("reading a compressed cluster", host))?;
        let mut out = vec![0u8; self.cluster_size() as usize];
        compress::decompress(self.compression_type, &input, &mut out, host)?;
        let out: Arc<[u8]> = out.into();
        *lock(&self.last_compressed) = Some((host, Arc::clone(&out)));
        Ok(out)
    }

    /// The status of the run of guest bytes starting at `offset` (at most `len` bytes,
    /// `len` > 0, within the virtual size) that all read the same way, through the
    /// backing chain.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        if len == 0 || offset >= self.size() {
            return Err(Qcow2Error::OutOfRange { offset, len, size: self.size() });
        }
        let len = len.min(self.size() - offset);
        let (mapping, run) = self.extent(offset, len)?;
        let in_cluster = offset & (self.cluster_size() - 1);
        let here = |state, offset, compressed| BlockStatus {
            state,
            allocated: true,
            depth: 0,
            offset,
            compressed,
            len: run,
        };
        Ok(match mapping {
            ClusterMapping::Data { host } => here(BlockState::Data, Some(host + in_cluster), false),
            ClusterMapping::Compressed { .. } => here(BlockState::Data, None, true),
            ClusterMapping::Zero { host } => {
                here(BlockState::Zero, host.map(|h| h + in_cluster), false)
            }
            ClusterMapping::Unallocated => match &self.backing {
                Some(b) if offset < b.len() => {
                    let s = b.block_status(offset, run.min(b.len() - offset))?;
                    BlockStatus { allocated: false, depth: s.depth + 1, ..s }
                }
                _ => BlockStatus {
                    state: BlockState::Unallocated,
                    allocated: false,
                    depth: 0,
                    offset: None,
                    compressed: false,
                    len: run,
                },
            },
        })
    }

    /// The refcount of the host cluster containing file offset `host_offset` (0 for a
    /// cluster past the refcount table or in an unallocated refcount block).
    pub fn refcount(&self, host_offset: u64) -> Result<u64> {
        let (table_index, block_index, entry, order, table_offset) = {
            let st = self.state();
            let order = st.header.refcount_order;
            let (ti, bi) =
                refcount::locate(host_offset >> self.cluster_bits, self.cluster_bits, order);
            let Some(&entry) = st.reftable.get(ti as usize) else {
                return Ok(0);
            };
            (ti, bi, entry, order, st.header.refcount_table_offset)
        };
        let entry_offset = table_offset + table_index * 8;
        let Some(block) = refcount::reftable_entry_block(entry, self.cluster_bits, entry_offset)?
        else {
            return Ok(0);
        };
        if block < self.cluster_size() {
            return Err(Qcow2Error::corrupt(
                "refcount table entry",
                entry_offset,
                "refcount block overlaps the header",
            ));
        }
        self.check_in_file("refcount table entry", entry_offset, block, self.cluster_size())?;
        let data = self.refcount_block(block)?;
        Ok(refcount::get(&data, block_index, order))
    }

    pub(crate) fn refcount_block(&self, offset: u64) -> Result<Arc<[u8]>> {
        if let Some(b) = lock(&self.refblock_cache).get(offset) {
            return Ok(b);
        }
        let mut data = vec![0u8; self.cluster_size() as usize];
        self.storage
            .read_at(&mut data, offset)
            .map_err(Qcow2Error::io("reading a refcount block", offset))?;
        let data: Arc<[u8]> = data.into();
        Ok(lock(&self.refblock_cache).insert_clean(offset, data))
    }
}

impl BackingImage for Qcow2Image {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        Qcow2Image::read_at(self, buf, offset)
    }

    fn len(&self) -> u64 {
        self.size()
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        Qcow2Image::block_status(self, offset, len)
    }
}

/// Reads and parses the header of the image on `storage` (`file_len` bytes long):
/// fields, extensions and backing file name. Features are not checked.
pub fn read_header(storage: &dyn Storage, file_len: u64) -> Result<Header> {
    let mut first = [0u8; header::V3_MIN_HEADER_LEN as usize];
    storage.read_at(&mut first, 0).map_err(Qcow2Error::io("reading the header", 0))?;
    let have = file_len.min(first.len() as u64) as usize;
    let fixed = Header::parse_fixed(&first[..have], file_len)?;
    let mut cluster0 = vec![0u8; fixed.cluster_size() as usize];
    storage.read_at(&mut cluster0, 0).map_err(Qcow2Error::io("reading the header", 0))?;
    let mut h = Header::parse(&cluster0, file_len)?;
    if h.backing_file_offset != 0 {
        let len = u64::from(h.backing_file_size);
        if h.backing_file_offset + len > file_len {
            return Err(invalid(
                "backing_file_offset",
                h.backing_file_offset,
                "the backing file name reaches past the end of the file",
            ));
        }
        let mut name = vec![0u8; len as usize];
        storage
            .read_at(&mut name, h.backing_file_offset)
            .map_err(Qcow2Error::io("reading the backing file name", h.backing_file_offset))?;
        h.backing_file = Some(name);
    }
    Ok(h)
}

/// Reads a table of big-endian u64 (`bytes` is bounded by the caller).
pub(crate) fn read_table(
    storage: &dyn Storage,
    offset: u64,
    bytes: u64,
    what: &'static str,
) -> Result<Vec<u64>> {
    let mut raw = vec![0u8; bytes as usize];
    storage.read_at(&mut raw, offset).map_err(Qcow2Error::io(what, offset))?;
    Ok(l2::parse_table(&raw))
}

/// Refuses the features this crate does not implement.
/// The feature checks [`Qcow2Image::open`] makes of a header (encryption, unknown and
/// unsupported incompatible features, the compression type, the corrupt bit for a
/// writable open, the dirty bit), without opening anything: a caller that opens an
/// image read-only for now can learn whether a writable open would be refused, and why.
pub fn check_open_features(header: &Header, writable: bool) -> Result<()> {
    check_features(header, writable)
}

fn check_features(h: &Header, writable: bool) -> Result<()> {
    match h.crypt_method {
        0 => {}
        1 => return Err(Qcow2Error::Encrypted { method: 1, name: "aes" }),
        2 => return Err(Qcow2Error::Encrypted { method: 2, name: "luks" }),
        m => return Err(Qcow2Error::Encrypted { method: m, name: "unknown" }),
    }
    let unsupported = |bit: u8| Qcow2Error::UnsupportedFeature {
        name: h.feature_name(FeatureKind::Incompatible, bit),
        kind: FeatureKind::Incompatible,
        bit,
    };
    let unknown = h.incompatible_features & !KNOWN_INCOMPAT;
    if unknown != 0 {
        return Err(unsupported(unknown.trailing_zeros() as u8));
    }
    if h.incompatible_features & header::INCOMPAT_EXTENDED_L2 != 0 {
        return Err(unsupported(4));
    }
    if h.incompatible_features & header::INCOMPAT_DATA_FILE != 0 {
        return Err(unsupported(2));
    }
    let compression_bit = h.incompatible_features & header::INCOMPAT_COMPRESSION != 0;
    match (compression_bit, h.compression_type) {
        (false, 0) => {}
        (true, header::COMPRESSION_ZSTD) => {}
        (true, 0) => {
            return Err(invalid(
                "compression_type",
                0,
                "the compression type bit is set but the type is deflate",
            ));
        }
        (false, t) => {
            return Err(invalid(
                "compression_type",
                t.into(),
                "a non-deflate compression type without the compression type bit",
            ));
        }
        (true, t) => return Err(Qcow2Error::UnsupportedCompression { value: t, name: "unknown" }),
    }
    if writable && h.incompatible_features & header::INCOMPAT_CORRUPT != 0 {
        return Err(Qcow2Error::MarkedCorrupt);
    }
    if h.incompatible_features & header::INCOMPAT_DIRTY != 0 {
        return Err(Qcow2Error::NeedsRefcountRepair);
    }
    Ok(())
}
