//! Creating a new, empty qcow2 image, laid out as `qemu-img create -f qcow2` lays it
//! out with the same options.
//!
//! The layout was derived from the images QEMU writes (not from its code):
//!
//! - cluster 0: the header; for version 3 a 112-byte header (compression type byte
//!   and padding), then the backing format extension (when a backing format is
//!   given), the feature name table (version 3 with clusters of at least 8 KiB only),
//!   the end marker, and the backing file name right after the end marker;
//! - cluster 1: the refcount table (one cluster), cluster 2: the first refcount block;
//! - cluster 3: the L1 table (when the virtual size is not zero), zero-filled; the file
//!   ends with the L1 table's last entry;
//! - the refcount blocks needed to count the L1 table's clusters, allocated after it
//!   in the order QEMU allocates them (a block that cannot count itself first gets the
//!   block that counts it). When the one-cluster refcount table cannot hold them
//!   (small clusters, wide refcounts, large disks), the table is moved to a new area
//!   past the first uncovered refcount block, with the blocks that count that area.

use std::path::Path;

use crate::error::{Qcow2Error, Result};
use crate::header::{
    EXT_BACKING_FORMAT, EXT_FEATURE_TABLE, MAGIC, MAX_BACKING_NAME_LEN, MAX_CLUSTER_BITS,
    MAX_L1_BYTES, MIN_CLUSTER_BITS,
};
use crate::refcount;
use crate::storage::{FileStorage, Storage};

/// Largest virtual size accepted (QEMU's limit for qcow2 images).
pub const MAX_VIRTUAL_SIZE: u64 = i64::MAX as u64 & !511;

/// The options of a new image (`qemu-img create -f qcow2 -o ...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size in bytes; rounded up to a multiple of 512 as QEMU does.
    pub size: u64,
    /// Cluster size in bytes: a power of two from 512 B to 2 MiB (default 64 KiB).
    pub cluster_size: u64,
    /// Refcount width in bits: a power of two from 1 to 64 (default 16). Version 2
    /// images only support 16.
    pub refcount_bits: u32,
    /// Version 2 (`compat=0.10`) instead of version 3 (`compat=1.1`).
    pub compat_v2: bool,
    /// The backing file name, stored as is (`-b`).
    pub backing_file: Option<String>,
    /// The backing file format (`-F`), stored in the backing format extension.
    pub backing_format: Option<String>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 64 << 10,
            refcount_bits: 16,
            compat_v2: false,
            backing_file: None,
            backing_format: None,
        }
    }
}

impl CreateOptions {
    /// Default options for a disk of `size` bytes.
    pub fn new(size: u64) -> Self {
        CreateOptions { size, ..CreateOptions::default() }
    }
}

fn invalid(field: &'static str, value: u64, reason: &'static str) -> Qcow2Error {
    Qcow2Error::InvalidHeader { field, value, reason }
}

/// The feature name table as QEMU writes it: (type, bit, name).
const FEATURE_NAMES: [(u8, u8, &str); 8] = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

/// Smallest cluster size with which QEMU writes the feature name table.
const FEATURE_TABLE_MIN_CLUSTER: u64 = 8192;

/// The refcount metadata of the new image, as cluster indices.
struct Layout {
    /// Entries per refcount block.
    rb: u64,
    /// Entries per refcount table cluster.
    tpc: u64,
    /// First cluster of the refcount table.
    table_at: u64,
    /// Clusters of the refcount table.
    table_clusters: u64,
    /// Refcount block cluster by table index (0: none).
    blocks: Vec<u64>,
    /// Whether each cluster has a refcount of 1.
    used: Vec<bool>,
    /// Where the next free cluster search starts.
    next: u64,
    /// Refcount tables given up when the table moved: (first cluster, entries). QEMU
    /// leaves their bytes in the file.
    stale: Vec<(u64, Vec<u64>)>,
}

/// The result of counting one more cluster.
enum Step {
    Done,
    /// The refcount table moved: the allocation must be redone.
    Retry,
}

/// Most clusters the simulated layout may track (the L1 table is at most 32 MiB, so a
/// legitimate layout stays far below this).
const MAX_LAYOUT_CLUSTERS: u64 = 1 << 24;

impl Layout {
    fn is_used(&self, c: u64) -> bool {
        self.used.get(c as usize).copied().unwrap_or(false)
    }

    fn set_used(&mut self, c: u64, used: bool) -> Result<()> {
        if c >= MAX_LAYOUT_CLUSTERS {
            return Err(invalid("size", c, "the image metadata would be too large"));
        }
        if self.used.len() <= c as usize {
            self.used.resize(c as usize + 1, false);
        }
        self.used[c as usize] = used;
        Ok(())
    }

    fn block(&self, idx: u64) -> u64 {
        self.blocks.get(idx as usize).copied().unwrap_or(0)
    }

    fn table_len(&self) -> u64 {
        self.table_clusters * self.tpc
    }

    /// Allocates one cluster without counting it.
    fn alloc1(&mut self) -> u64 {
        while self.is_used(self.next) {
            self.next += 1;
        }
        let c = self.next;
        self.next += 1;
        c
    }

    /// Sets the refcount of cluster `c` to 1, allocating its refcount block if needed.
    fn count(&mut self, c: u64, depth: u32) -> Result<Step> {
        if depth > 16 {
            return Err(invalid("size", c, "refcount block allocation does not converge"));
        }
        let idx = c / self.rb;
        if idx >= self.table_len() || self.block(idx) == 0 {
            let nb = self.alloc1();
            if nb / self.rb != idx {
                // The new block lives in another block's range: count it first.
                if let Step::Retry = self.count(nb, depth + 1)? {
                    return Ok(Step::Retry);
                }
                if idx >= self.table_len() {
                    self.set_used(nb, false)?;
                    self.grow(c, None)?;
                    return Ok(Step::Retry);
                }
            } else if idx >= self.table_len() {
                self.grow(c, Some((idx, nb)))?;
                return Ok(Step::Retry);
            }
            self.install(idx, nb)?;
        }
        self.set_used(c, true)?;
        Ok(Step::Done)
    }

    fn install(&mut self, idx: u64, cluster: u64) -> Result<()> {
        if self.blocks.len() <= idx as usize {
            self.blocks.resize(idx as usize + 1, 0);
        }
        self.blocks[idx as usize] = cluster;
        self.set_used(cluster, true)
    }

    /// Moves the refcount table to a new area with its own refcount blocks, while
    /// counting cluster `ci`; `pending` is a self-counting block to keep.
    fn grow(&mut self, ci: u64, pending: Option<(u64, u64)>) -> Result<()> {
        let first = ci / self.rb + 1;
        let mut area_blocks = first.div_ceil(self.rb);
        let table_clusters = loop {
            let entries = first + area_blocks;
            let t = (entries + entries.div_ceil(2)).div_ceil(self.tpc);
            let need = (area_blocks + t).div_ceil(self.rb);
            if need <= area_blocks {
                break t;
            }
            area_blocks = need;
        };
        if table_clusters * self.tpc * 8 > crate::header::MAX_REFTABLE_BYTES {
            return Err(invalid("size", ci, "the refcount table would exceed 8 MiB"));
        }
        let start = first * self.rb;
        let old: Vec<u64> =
            (0..self.table_len().min(self.blocks.len() as u64)).map(|i| self.block(i)).collect();
        self.stale.push((self.table_at, old));
        for i in 0..self.table_clusters {
            self.set_used(self.table_at + i, false)?;
        }
        self.next = self.next.min(self.table_at);
        for i in 0..area_blocks {
            self.install(first + i, start + i)?;
        }
        self.table_at = start + area_blocks;
        self.table_clusters = table_clusters;
        for i in 0..table_clusters {
            self.set_used(self.table_at + i, true)?;
        }
        if let Some((idx, nb)) = pending {
            self.install(idx, nb)?;
        }
        Ok(())
    }
}

/// The bytes of the first cluster: header, extensions, backing file name.
fn header_cluster(opts: &CreateOptions, h: &HeaderFields) -> Result<Vec<u8>> {
    let cs = opts.cluster_size;
    let mut b = Vec::with_capacity(1024);
    b.extend_from_slice(&MAGIC.to_be_bytes());
    b.extend_from_slice(&(if opts.compat_v2 { 2u32 } else { 3u32 }).to_be_bytes());
    b.extend_from_slice(&[0; 12]); // backing file offset and size, set below
    b.extend_from_slice(&h.cluster_bits.to_be_bytes());
    b.extend_from_slice(&h.size.to_be_bytes());
    b.extend_from_slice(&0u32.to_be_bytes()); // crypt_method
    b.extend_from_slice(&h.l1_size.to_be_bytes());
    b.extend_from_slice(&h.l1_offset.to_be_bytes());
    b.extend_from_slice(&h.reftable_offset.to_be_bytes());
    b.extend_from_slice(&h.reftable_clusters.to_be_bytes());
    b.extend_from_slice(&0u32.to_be_bytes()); // nb_snapshots
    b.extend_from_slice(&0u64.to_be_bytes()); // snapshots_offset
    if !opts.compat_v2 {
        b.extend_from_slice(&[0; 24]); // incompatible, compatible, autoclear features
        b.extend_from_slice(&opts.refcount_bits.trailing_zeros().to_be_bytes());
        b.extend_from_slice(&112u32.to_be_bytes()); // header_length
        b.extend_from_slice(&[0; 8]); // compression type (deflate) and padding
    }
    let ext = |b: &mut Vec<u8>, ty: u32, data: &[u8]| {
        b.extend_from_slice(&ty.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        b.resize(b.len().next_multiple_of(8), 0);
    };
    if let Some(fmt) = &opts.backing_format {
        ext(&mut b, EXT_BACKING_FORMAT, fmt.as_bytes());
    }
    if !opts.compat_v2 && cs >= FEATURE_TABLE_MIN_CLUSTER {
        let mut table = Vec::with_capacity(48 * FEATURE_NAMES.len());
        for (kind, bit, name) in FEATURE_NAMES {
            let at = table.len();
            table.resize(at + 48, 0);
            table[at] = kind;
            table[at + 1] = bit;
            table[at + 2..at + 2 + name.len()].copy_from_slice(name.as_bytes());
        }
        ext(&mut b, EXT_FEATURE_TABLE, &table);
    }
    b.extend_from_slice(&[0; 8]); // end of the extensions
    if let Some(name) = &opts.backing_file {
        let at = b.len() as u64;
        b[8..16].copy_from_slice(&at.to_be_bytes());
        b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        b.extend_from_slice(name.as_bytes());
    }
    if b.len() as u64 > cs {
        return Err(invalid(
            "backing_file_size",
            opts.backing_file.as_ref().map_or(0, |n| n.len() as u64),
            "the header and backing file name do not fit in the first cluster",
        ));
    }
    b.resize(cs as usize, 0);
    Ok(b)
}

struct HeaderFields {
    cluster_bits: u32,
    size: u64,
    l1_size: u32,
    l1_offset: u64,
    reftable_offset: u64,
    reftable_clusters: u32,
}

fn validate(opts: &CreateOptions) -> Result<()> {
    let cs = opts.cluster_size;
    if !cs.is_power_of_two() || !(1u64 << MIN_CLUSTER_BITS..=1u64 << MAX_CLUSTER_BITS).contains(&cs)
    {
        return Err(invalid(
            "cluster_bits",
            cs,
            "cluster size must be a power of two, 512 B to 2 MiB",
        ));
    }
    let rb = opts.refcount_bits;
    if !rb.is_power_of_two() || rb > 64 {
        return Err(invalid(
            "refcount_order",
            rb.into(),
            "refcount width must be 1 to 64, a power of two",
        ));
    }
    if opts.compat_v2 && rb != 16 {
        return Err(invalid("refcount_order", rb.into(), "version 2 images need 16-bit refcounts"));
    }
    if opts.size > MAX_VIRTUAL_SIZE {
        return Err(invalid("size", opts.size, "virtual size too large"));
    }
    if let Some(name) = &opts.backing_file {
        if name.is_empty() || name.len() > MAX_BACKING_NAME_LEN as usize {
            return Err(invalid(
                "backing_file_size",
                name.len() as u64,
                "the backing file name must have 1 to 1023 bytes",
            ));
        }
    } else if opts.backing_format.is_some() {
        return Err(invalid("backing_file_offset", 0, "a backing format without a backing file"));
    }
    if let Some(fmt) = &opts.backing_format
        && (fmt.is_empty() || fmt.len() > 1023)
    {
        return Err(invalid(
            "backing_format",
            fmt.len() as u64,
            "format name must have 1 to 1023 bytes",
        ));
    }
    Ok(())
}

/// Writes a new, empty qcow2 image on `storage` (whose previous contents are
/// discarded), as `qemu-img create -f qcow2` does with the same options.
pub fn create(storage: &dyn Storage, opts: CreateOptions) -> Result<()> {
    validate(&opts)?;
    let cs = opts.cluster_size;
    let cluster_bits = cs.trailing_zeros();
    let size = opts.size.next_multiple_of(512);
    let refcount_order = opts.refcount_bits.trailing_zeros();
    let l2_span = cs * (cs / 8);
    let l1_size = size.div_ceil(l2_span);
    if l1_size * 8 > MAX_L1_BYTES {
        return Err(invalid("size", size, "virtual size needs an L1 table larger than 32 MiB"));
    }
    let l1_clusters = (l1_size * 8).div_ceil(cs);

    let rb = (cs * 8) >> refcount_order;
    let mut layout = Layout {
        rb,
        tpc: cs / 8,
        table_at: 1,
        table_clusters: 1,
        blocks: vec![2],
        used: vec![true; 3],
        next: 3,
        stale: Vec::new(),
    };
    let mut l1_start = 0;
    if l1_clusters > 0 {
        let mut tries = 0;
        'again: loop {
            tries += 1;
            if tries > 8 {
                return Err(invalid("size", size, "refcount table growth does not converge"));
            }
            // The L1 table takes the first run of free clusters.
            let mut start = layout.next;
            let mut c = start;
            while c < start + l1_clusters {
                if layout.is_used(c) {
                    start = c + 1;
                }
                c += 1;
            }
            layout.next = start + l1_clusters;
            l1_start = start;
            for c in start..start + l1_clusters {
                if let Step::Retry = layout.count(c, 0)? {
                    for c in start..start + l1_clusters {
                        if layout.is_used(c) {
                            layout.set_used(c, false)?;
                        }
                    }
                    layout.next = layout.next.min(start);
                    continue 'again;
                }
            }
            break;
        }
    }
    let l1_offset = l1_start * cs;

    let fields = HeaderFields {
        cluster_bits,
        size,
        l1_size: l1_size as u32,
        l1_offset,
        reftable_offset: layout.table_at * cs,
        reftable_clusters: layout.table_clusters as u32,
    };
    let header = header_cluster(&opts, &fields)?;

    let io = |context| Qcow2Error::io(context, 0);
    storage.set_len(0).map_err(io("truncating the new image"))?;
    storage.write_at(&header, 0).map_err(Qcow2Error::io("writing the header", 0))?;
    // Tables given up when the table moved, then the refcount table.
    for (at, entries) in &layout.stale {
        let mut old = vec![0u8; entries.len() * 8];
        for (i, &b) in entries.iter().enumerate() {
            old[i * 8..i * 8 + 8].copy_from_slice(&(b * cs).to_be_bytes());
        }
        storage
            .write_at(&old, at * cs)
            .map_err(Qcow2Error::io("writing the refcount table", at * cs))?;
    }
    let mut table = vec![0u8; (layout.table_clusters * cs) as usize];
    for (i, &b) in layout.blocks.iter().enumerate() {
        if b != 0 {
            table[i * 8..i * 8 + 8].copy_from_slice(&(b * cs).to_be_bytes());
        }
    }
    let table_offset = layout.table_at * cs;
    storage
        .write_at(&table, table_offset)
        .map_err(Qcow2Error::io("writing the refcount table", table_offset))?;
    // Refcount blocks.
    let mut end = table_offset + table.len() as u64;
    for (i, &b) in layout.blocks.iter().enumerate() {
        if b == 0 {
            continue;
        }
        let mut block = vec![0u8; cs as usize];
        let first = i as u64 * rb;
        for j in 0..rb {
            if layout.is_used(first + j) {
                refcount::set(&mut block, j, refcount_order, 1);
            }
        }
        storage
            .write_at(&block, b * cs)
            .map_err(Qcow2Error::io("writing a refcount block", b * cs))?;
        end = end.max((b + 1) * cs);
    }
    if l1_size > 0 {
        end = end.max(l1_offset + l1_size * 8);
    }
    storage.set_len(end).map_err(io("setting the length of the new image"))?;
    storage.flush().map_err(io("flushing the new image"))?;
    Ok(())
}

/// Creates the image file at `path` (which must not exist) with [`create`].
pub fn create_file(path: &Path, opts: CreateOptions) -> Result<()> {
    let storage =
        FileStorage::create(path).map_err(Qcow2Error::io("creating the image file", 0))?;
    create(&storage, opts)
}
