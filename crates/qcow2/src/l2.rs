//! L1 and L2 table entries, and a bounded cache of parsed L2 tables.

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::{Qcow2Error, Result};

/// Bits 9..=55: the host offset in an L1 entry or a standard L2 entry.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1/L2 bit 63: the refcount is exactly one ("copied").
pub const COPIED: u64 = 1 << 63;
/// L2 bit 62: compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// Standard L2 bit 0: the cluster reads as zeroes.
pub const ZERO: u64 = 1;

/// What an L2 entry says about one guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterMapping {
    /// Not allocated in this image: read from the backing file, or zeroes.
    Unallocated,
    /// Reads as zeroes; `host` is a preallocated cluster if any.
    Zero {
        /// Host offset of a preallocated cluster (not used for reads).
        host: Option<u64>,
    },
    /// Data at `host` (cluster-aligned).
    Data {
        /// Host offset of the cluster.
        host: u64,
    },
    /// Compressed data: `len` bytes from `host` (not aligned), which decompress to
    /// one cluster. `len` covers whole 512-byte sectors and may include the start of
    /// the next compressed cluster.
    Compressed {
        /// Host offset of the compressed data.
        host: u64,
        /// Number of bytes to read.
        len: u64,
    },
}

/// Decodes an L1 entry: the L2 table offset, or `None` when unallocated.
///
/// `entry_offset` is where the entry lives, for the error.
pub fn l1_entry_l2_offset(entry: u64, cluster_bits: u32, entry_offset: u64) -> Result<Option<u64>> {
    let off = entry & OFFSET_MASK;
    if off == 0 {
        return Ok(None);
    }
    if off & ((1 << cluster_bits) - 1) != 0 {
        return Err(Qcow2Error::corrupt("L1 entry", entry_offset, "L2 table offset is unaligned"));
    }
    Ok(Some(off))
}

/// Decodes a (standard, 64-bit) L2 entry.
pub fn decode_l2_entry(entry: u64, cluster_bits: u32, entry_offset: u64) -> Result<ClusterMapping> {
    if entry & COMPRESSED != 0 {
        // x = 62 - (cluster_bits - 8): bits 0..x are the offset, x..62 the sector count.
        let x = 62 - (cluster_bits - 8);
        let host = entry & ((1u64 << x) - 1);
        if host >> 56 != 0 {
            return Err(Qcow2Error::corrupt(
                "L2 entry",
                entry_offset,
                "compressed cluster offset has bits beyond 55 set",
            ));
        }
        let sectors = ((entry >> x) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
        let len = sectors * 512 - (host & 511);
        return Ok(ClusterMapping::Compressed { host, len });
    }
    let off = entry & OFFSET_MASK;
    if off & ((1 << cluster_bits) - 1) != 0 {
        return Err(Qcow2Error::corrupt("L2 entry", entry_offset, "cluster offset is unaligned"));
    }
    if entry & ZERO != 0 {
        return Ok(ClusterMapping::Zero { host: (off != 0).then_some(off) });
    }
    if off == 0 {
        return Ok(ClusterMapping::Unallocated);
    }
    Ok(ClusterMapping::Data { host: off })
}

/// Parses a big-endian table of u64 entries.
pub fn parse_table(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}

/// A bounded cache of tables (L2 tables, refcount blocks) keyed by their host offset.
///
/// Evicts the least recently used table when full. Tables are shared (`Arc`), so a
/// reader keeps its copy after an eviction. The write path updates an entry by
/// replacing the table ([`TableCache::insert`]) after writing it to the file, or
/// drops it ([`TableCache::remove`]).
#[derive(Debug)]
pub struct TableCache<T: ?Sized> {
    capacity: usize,
    tick: u64,
    map: HashMap<u64, (Arc<T>, u64)>,
}

impl<T: ?Sized> TableCache<T> {
    /// A cache holding at most `capacity` tables (at least one).
    pub fn new(capacity: usize) -> Self {
        TableCache { capacity: capacity.max(1), tick: 0, map: HashMap::new() }
    }

    /// The table at `offset`, if cached.
    pub fn get(&mut self, offset: u64) -> Option<Arc<T>> {
        self.tick += 1;
        let tick = self.tick;
        self.map.get_mut(&offset).map(|(t, used)| {
            *used = tick;
            Arc::clone(t)
        })
    }

    /// Caches `table` at `offset`, evicting the least recently used if full.
    pub fn insert(&mut self, offset: u64, table: Arc<T>) {
        self.tick += 1;
        if !self.map.contains_key(&offset)
            && self.map.len() >= self.capacity
            && let Some(&victim) =
                self.map.iter().min_by_key(|(_, (_, used))| *used).map(|(k, _)| k)
        {
            self.map.remove(&victim);
        }
        self.map.insert(offset, (table, self.tick));
    }

    /// Drops the table at `offset`.
    pub fn remove(&mut self, offset: u64) {
        self.map.remove(&offset);
    }

    /// Drops every table.
    pub fn clear(&mut self) {
        self.map.clear();
    }

    /// Number of cached tables.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The most tables the cache holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}
