//! blockdelta's write-intent record: what makes a persistent bitmap survive a crash.
//!
//! QEMU trusts a stored bitmap only when it was stored at a clean close; a bitmap found
//! *in use* (flag bit 0 of its directory entry) is inconsistent. blockdelta keeps that
//! rule for every other program, and adds a record that lets itself trust an in-use
//! bitmap after a crash:
//!
//! - While blockdelta has the image open, a crash-safe bitmap is stored *open*: in use,
//!   with a data cluster allocated for every table entry (no all-zero entries), holding
//!   the bits of the last checkpoint.
//! - Before a write reaches a *region* (a power of two of at least eight granules,
//!   16 MiB by default) whose mark is not yet durable, blockdelta sets all of the
//!   region's bits in those data clusters, in place, and syncs the file. Setting bits
//!   only adds to what is stored, so the stored data is always the last checkpoint's
//!   bits plus every region written since: a superset of every write issued.
//! - A checkpoint writes the bitmap again to new clusters and switches the directory to
//!   them (see `bitmap_store`): that is how marks are cleared.
//!
//! # On disk
//!
//! A header extension of type [`EXT_INTENT`] ("bdin"), big-endian like the rest of qcow2:
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | version, 1 |
//! | 4..8 | number of entries |
//! | 8.. | entries, each 8-byte aligned |
//!
//! An entry:
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | `table_offset`: the bitmap table this record belongs to, 0 for none |
//! | 8..16 | `generation`: checkpoints of this bitmap so far |
//! | 16 | `region_bits`: log2 of the region size in bytes; 0: the bitmap is not crash-safe |
//! | 17..20 | reserved, 0 |
//! | 20..22 | name size (1 to 1023) |
//! | 22..24 | reserved, 0 |
//! | 24.. | the bitmap's name, padded with zeroes to 8 bytes |
//!
//! and autoclear feature bit [`AUTOCLEAR_INTENT`] (40). The qcow2 specification says
//! that a program which writes an image must first clear the autoclear bits it does not
//! know, and QEMU does so at every writable open (tried with 10.0.2); it keeps header
//! extensions it does not know. So the bit set means that nobody but blockdelta has
//! written the image since blockdelta set it, and the extension survives QEMU.
//!
//! # When an in-use bitmap is trusted
//!
//! All of: autoclear bits 0 (bitmaps) and 40 set; an entry of the same name with a
//! region size; and that entry's `table_offset` equal to the directory entry's. The
//! binding to the table catches a header torn between the bitmaps extension and this
//! one (either table is a superset, but only the one the entry names is known to be).
//! blockdelta zeroes the binding of every bitmap it does not trust when it opens the
//! image for writing, before it sets bit 40 again, so a bitmap another program left in
//! use can never become trusted later.

use crate::bitmaps::{MAX_BITMAPS, MAX_NAME_SIZE};
use crate::error::{Qcow2Error, Result};
use crate::header::Header;
use crate::image::Qcow2Image;

/// Header extension type of the record ("bdin").
pub const EXT_INTENT: u32 = 0x6264_696e;
/// Autoclear bit: no other program has written the image since blockdelta set it.
pub const AUTOCLEAR_INTENT: u64 = 1 << 40;
/// The record's format version.
pub const VERSION: u32 = 1;
/// Default region size: 16 MiB.
pub const DEFAULT_REGION_BITS: u8 = 24;
/// A region holds at least one byte of bits, so a mark never shares a byte with another.
pub const MIN_REGION_GRANULES_BITS: u8 = 3;

/// What blockdelta knows of one bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntentEntry {
    /// The bitmap's name.
    pub name: String,
    /// The table the marks went to; 0: none (the record is not trusted).
    pub table_offset: u64,
    /// Checkpoints so far.
    pub generation: u64,
    /// log2 of the region size; `None`: the bitmap is not crash-safe.
    pub region_bits: Option<u8>,
}

impl IntentEntry {
    fn encoded_len(&self) -> usize {
        (24 + self.name.len()).next_multiple_of(8)
    }
}

/// Why the record could not be read: it is then ignored (no in-use bitmap is trusted).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("blockdelta's write-intent record is invalid: {0}")]
pub struct IntentError(pub String);

/// The extension: an entry per bitmap blockdelta has seen.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IntentRecord {
    /// The entries, in no particular order, names unique.
    pub entries: Vec<IntentEntry>,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl IntentRecord {
    /// Parses the extension's data. Every length is checked against `data`, so a
    /// damaged record costs nothing but its own rejection.
    pub fn parse(data: &[u8]) -> Result<Self, IntentError> {
        let bad = |what: &str| Err(IntentError(what.to_string()));
        if data.len() < 8 {
            return bad("shorter than its fixed part");
        }
        if be32(data, 0) != VERSION {
            return bad("unknown version");
        }
        let count = be32(data, 4);
        if count > MAX_BITMAPS {
            return bad("too many entries");
        }
        let mut entries: Vec<IntentEntry> = Vec::with_capacity(count.min(1024) as usize);
        let mut at = 8usize;
        for _ in 0..count {
            if data.len() < at + 24 {
                return bad("an entry runs past the end");
            }
            let name_size = usize::from(be16(data, at + 20));
            if name_size == 0 || name_size > MAX_NAME_SIZE {
                return bad("an entry's name size is out of range");
            }
            let len = (24 + name_size).next_multiple_of(8);
            if data.len() < at + len {
                return bad("an entry's name runs past the end");
            }
            let Ok(name) = std::str::from_utf8(&data[at + 24..at + 24 + name_size]) else {
                return bad("an entry's name is not UTF-8");
            };
            if entries.iter().any(|e| e.name == name) {
                return bad("a name appears twice");
            }
            let region_bits = data[at + 16];
            if region_bits != 0 && !(9 + MIN_REGION_GRANULES_BITS..=62).contains(&region_bits) {
                return bad("a region size is out of range");
            }
            entries.push(IntentEntry {
                name: name.to_string(),
                table_offset: be64(data, at),
                generation: be64(data, at + 8),
                region_bits: (region_bits != 0).then_some(region_bits),
            });
            at += len;
        }
        Ok(IntentRecord { entries })
    }

    /// The record in `header`: `None` without the extension; `Err` when it is invalid.
    pub fn from_header(header: &Header) -> Option<Result<Self, IntentError>> {
        header.extension(EXT_INTENT).map(Self::parse)
    }

    /// The extension's data.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b =
            Vec::with_capacity(8 + self.entries.iter().map(|e| e.encoded_len()).sum::<usize>());
        b.extend_from_slice(&VERSION.to_be_bytes());
        b.extend_from_slice(&(self.entries.len() as u32).to_be_bytes());
        for e in &self.entries {
            b.extend_from_slice(&e.table_offset.to_be_bytes());
            b.extend_from_slice(&e.generation.to_be_bytes());
            b.push(e.region_bits.unwrap_or(0));
            b.extend_from_slice(&[0; 3]);
            b.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
            b.extend_from_slice(&[0; 2]);
            b.extend_from_slice(e.name.as_bytes());
            b.resize(b.len().next_multiple_of(8), 0);
        }
        b
    }

    /// The entry of bitmap `name`.
    pub fn get(&self, name: &str) -> Option<&IntentEntry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// Whether the in-use bitmap `name`, whose table is at `table_offset`, can be
    /// trusted after a crash in a header with autoclear bits `autoclear` (see the
    /// module documentation).
    pub fn trusts(&self, autoclear: u64, name: &str, table_offset: u64) -> bool {
        let bits = crate::header::AUTOCLEAR_BITMAPS | AUTOCLEAR_INTENT;
        autoclear & bits == bits
            && table_offset != 0
            && self
                .get(name)
                .is_some_and(|e| e.region_bits.is_some() && e.table_offset == table_offset)
    }
}

/// Where a region's bits lie in a bitmap's stored data: `(data cluster index, byte
/// offset in that cluster, bytes)`, the last byte possibly partial (see
/// [`region_spans`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// Index into the bitmap table.
    pub cluster: u64,
    /// Byte offset inside the data cluster.
    pub offset: u64,
    /// Whole bytes to set to 0xff.
    pub full_bytes: u64,
    /// The bits of one more byte after them (the disk ends inside it), or 0.
    pub last_byte: u8,
}

/// The spans of stored bitmap data that region `region` covers, for a disk of
/// `disk_len` bytes, granules of `2^granularity_bits` bytes, regions of
/// `2^region_bits` bytes (at least eight granules) and clusters of `cluster_size`
/// bytes. Bits past the disk's end stay clear, as the format requires.
pub fn region_spans(
    disk_len: u64,
    granularity_bits: u8,
    region_bits: u8,
    cluster_size: u64,
    region: u64,
) -> Vec<Span> {
    debug_assert!(region_bits >= granularity_bits + MIN_REGION_GRANULES_BITS);
    let nbits = disk_len.div_ceil(1 << granularity_bits);
    let per_region = 1u64 << (region_bits - granularity_bits);
    let first = region.saturating_mul(per_region);
    let end = first.saturating_add(per_region).min(nbits);
    let bits_per_cluster = cluster_size * 8;
    let mut spans = Vec::new();
    let mut bit = first;
    while bit < end {
        let cluster = bit / bits_per_cluster;
        let cluster_end = ((cluster + 1) * bits_per_cluster).min(end);
        let offset = (bit % bits_per_cluster) / 8;
        let bits = cluster_end - bit;
        let rest = (bits % 8) as u32;
        spans.push(Span {
            cluster,
            offset,
            full_bytes: bits / 8,
            last_byte: if rest == 0 { 0 } else { ((1u16 << rest) - 1) as u8 },
        });
        bit = cluster_end;
    }
    spans
}

/// The region size a crash-safe bitmap of `2^granularity_bits`-byte granules gets when
/// none is asked for: 16 MiB, or eight granules when those are larger.
pub fn default_region_bits(granularity_bits: u8) -> u8 {
    DEFAULT_REGION_BITS.max(granularity_bits + MIN_REGION_GRANULES_BITS)
}

/// Checks a region size asked for: a power of two, at least eight granules.
pub fn check_region_size(region: u64, granularity_bits: u8) -> Result<u8, String> {
    if !region.is_power_of_two() {
        return Err("x-intent-granularity must be a power of 2".into());
    }
    let bits = region.trailing_zeros() as u8;
    if bits < granularity_bits + MIN_REGION_GRANULES_BITS {
        return Err(format!(
            "x-intent-granularity must be at least 8 times the granularity ({} bytes)",
            8u64 << granularity_bits
        ));
    }
    if bits > 62 {
        return Err("x-intent-granularity is too large".into());
    }
    Ok(bits)
}

impl Qcow2Image {
    /// Marks `regions` of an open-form bitmap whose data clusters are `clusters` (in
    /// table order; see [`crate::bitmap_store::OpenTable`]): sets their bits in place.
    /// Not durable until [`sync_storage`](Self::sync_storage). The clusters must be
    /// live or about to be (the caller owns that ordering), and every region inside
    /// the disk.
    pub fn write_intent_marks(
        &self,
        clusters: &[u64],
        granularity_bits: u8,
        region_bits: u8,
        regions: &[u64],
    ) -> Result<()> {
        if !self.writable() {
            return Err(Qcow2Error::ReadOnly);
        }
        if region_bits < granularity_bits + MIN_REGION_GRANULES_BITS {
            return Err(Qcow2Error::UnsupportedRequest("a region smaller than eight granules"));
        }
        let ones = vec![0xffu8; self.cluster_size() as usize + 1];
        for &region in regions {
            for span in region_spans(
                self.size(),
                granularity_bits,
                region_bits,
                self.cluster_size(),
                region,
            ) {
                let Some(&base) = clusters.get(span.cluster as usize).filter(|&&c| c != 0) else {
                    return Err(Qcow2Error::UnsupportedRequest("marking a bitmap not stored open"));
                };
                let mut bytes = ones[..span.full_bytes as usize].to_vec();
                if span.last_byte != 0 {
                    bytes.push(span.last_byte);
                }
                self.swrite(&bytes, base + span.offset, "marking a write-intent region")?;
            }
        }
        Ok(())
    }

    /// Makes what was written to the image's storage durable (a sync of the file, not
    /// a flush of the image's caches).
    pub fn sync_storage(&self) -> Result<()> {
        self.sflush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_and_rejects_damage() {
        let r = IntentRecord {
            entries: vec![
                IntentEntry {
                    name: "b0".into(),
                    table_offset: 65536,
                    generation: 3,
                    region_bits: Some(24),
                },
                IntentEntry {
                    name: "plain".into(),
                    table_offset: 0,
                    generation: 0,
                    region_bits: None,
                },
            ],
        };
        let bytes = r.to_bytes();
        assert_eq!(bytes.len() % 8, 0);
        assert_eq!(IntentRecord::parse(&bytes).unwrap(), r);
        // Every truncation is refused, none panics.
        for len in 0..bytes.len() {
            assert!(IntentRecord::parse(&bytes[..len]).is_err(), "{len}");
        }
        let mut twice = r.clone();
        twice.entries[1].name = "b0".into();
        assert!(IntentRecord::parse(&twice.to_bytes()).is_err());
        let mut huge = bytes.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(IntentRecord::parse(&huge).is_err());
    }

    #[test]
    fn trust_needs_both_bits_a_region_size_and_the_same_table() {
        let r = IntentRecord {
            entries: vec![IntentEntry {
                name: "b0".into(),
                table_offset: 65536,
                generation: 1,
                region_bits: Some(24),
            }],
        };
        let both = crate::header::AUTOCLEAR_BITMAPS | AUTOCLEAR_INTENT;
        assert!(r.trusts(both, "b0", 65536));
        assert!(!r.trusts(crate::header::AUTOCLEAR_BITMAPS, "b0", 65536));
        assert!(!r.trusts(AUTOCLEAR_INTENT, "b0", 65536));
        assert!(!r.trusts(both, "b0", 131072));
        assert!(!r.trusts(both, "b1", 65536));
        let mut plain = r.clone();
        plain.entries[0].region_bits = None;
        assert!(!plain.trusts(both, "b0", 65536));
    }

    #[test]
    fn spans_cover_the_region_and_stop_at_the_disk_end() {
        // 64 KiB granules, 16 MiB regions: 256 bits = 32 bytes per region.
        let s = region_spans(1 << 30, 16, 24, 65536, 2);
        assert_eq!(s, vec![Span { cluster: 0, offset: 64, full_bytes: 32, last_byte: 0 }]);
        // The disk ends 3 granules into the region: one partial byte.
        let s = region_spans((16 << 20) + 3 * 65536, 16, 24, 65536, 1);
        assert_eq!(s, vec![Span { cluster: 0, offset: 32, full_bytes: 0, last_byte: 0b111 }]);
        // 512-byte granules, 16 MiB regions, 512-byte clusters: 4 KiB of bits over 8
        // clusters.
        let s = region_spans(1 << 30, 9, 24, 512, 1);
        assert_eq!(s.len(), 8);
        assert!(s.iter().all(|x| x.offset == 0 && x.full_bytes == 512));
        assert_eq!(s[0].cluster, 8);
        // A region past the end has no spans.
        assert!(region_spans(1 << 20, 16, 24, 65536, 1).is_empty());
    }

    #[test]
    fn region_sizes() {
        assert_eq!(default_region_bits(16), 24);
        assert_eq!(default_region_bits(23), 26);
        assert_eq!(check_region_size(1 << 24, 16), Ok(24));
        assert!(check_region_size(3 << 20, 16).is_err());
        assert!(check_region_size(1 << 18, 16).is_err());
        assert_eq!(check_region_size(1 << 19, 16), Ok(19));
    }
}
