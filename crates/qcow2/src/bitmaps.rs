//! The bitmaps extension: persistent dirty bitmaps inside a qcow2 image.
//!
//! Format: the "Bitmaps extension" of `docs/interop/qcow2.txt` (header extension
//! `0x23852875`, the bitmap directory, bitmap tables and data clusters). Limits and
//! error texts are QEMU 10.0.2's (`qemu-bitmaps-spec.md`, section 6). This module parses
//! and validates what is on disk and loads bitmap data into [`HBitmap`]s; it also encodes
//! directory entries and data clusters for the store step. It never writes.

use hbitmap::HBitmap;

use crate::storage::Storage;

/// Length of the extension's data.
pub const EXTENSION_LEN: usize = 24;
/// Most bitmaps in an image (QEMU's limit).
pub const MAX_BITMAPS: u32 = 65535;
/// Largest directory in bytes (QEMU's limit).
pub const MAX_DIRECTORY_SIZE: u64 = 1024 * 65535;
/// Most entries of one bitmap table (QEMU's limit).
pub const MAX_TABLE_SIZE: u32 = 0x800_0000;
/// Most bytes of bitmap data (QEMU's limit).
pub const MAX_PHYS_SIZE: u64 = 0x2000_0000;
/// Longest name in bytes.
pub const MAX_NAME_SIZE: usize = 1023;
/// Smallest and largest granularity (log2 of bytes) QEMU accepts.
pub const GRANULARITY_BITS: std::ops::RangeInclusive<u8> = 9..=31;

/// Directory entry flag: the bitmap was in use and may be inconsistent.
pub const FLAG_IN_USE: u32 = 1 << 0;
/// Directory entry flag: the bitmap tracks every write (QEMU's "enabled").
pub const FLAG_AUTO: u32 = 1 << 1;
/// Flags QEMU rejects (every bit but in_use and auto, including extra_data_compatible).
pub const RESERVED_FLAGS: u32 = 0xffff_fffc;
/// Bitmap type: dirty tracking bitmap.
pub const TYPE_DIRTY_TRACKING: u8 = 1;

/// Table entry bits that must be zero.
pub const TABLE_RESERVED: u64 = 0xff00_0000_0000_01fe;
/// Table entry bits holding the data cluster's offset.
pub const TABLE_OFFSET: u64 = 0x00ff_ffff_ffff_fe00;
/// Table entry bit 0 without an offset: the cluster reads as all ones.
pub const TABLE_ALL_ONES: u64 = 1;

/// What is wrong with the bitmaps of an image. `Display` is QEMU's text where QEMU has
/// one, naming the bitmap where there is one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BitmapsError {
    /// The extension is not 24 bytes.
    #[error("bitmaps_ext: Invalid extension length")]
    ExtensionLength,
    /// The extension's reserved field is not zero.
    #[error("bitmaps_ext: reserved field is not zero")]
    ExtensionReserved,
    /// More bitmaps than QEMU supports.
    #[error("bitmaps_ext: Image has {0} bitmaps, exceeding the QEMU supported maximum of 65535")]
    TooManyBitmaps(u32),
    /// The extension says there are no bitmaps.
    #[error("found bitmaps extension with zero bitmaps")]
    ZeroBitmaps,
    /// The directory offset is not cluster-aligned (or is zero).
    #[error("bitmaps_ext: invalid bitmap directory offset")]
    DirectoryOffset,
    /// The directory is larger than QEMU supports.
    #[error(
        "bitmaps_ext: bitmap directory size ({0}) exceeds the maximum supported size (67107840)"
    )]
    DirectoryTooBig(u64),
    /// The directory size is zero.
    #[error("Requested bitmap directory size is zero")]
    DirectoryEmpty,
    /// The directory lies (partly) past the end of the file.
    #[error("the bitmap directory ({size} bytes at {offset:#x}) is past the end of the file")]
    DirectoryOutside {
        /// Offset of the directory.
        offset: u64,
        /// Its size.
        size: u64,
    },
    /// Reading failed.
    #[error("Failed to read {what}: {source}")]
    Io {
        /// What was being read.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// The directory has more entries than the extension says.
    #[error("More bitmaps found than specified in header extension")]
    MoreBitmaps,
    /// The directory has fewer entries than the extension says.
    #[error("Less bitmaps found than specified in header extension")]
    LessBitmaps,
    /// An entry has extra data.
    #[error("Bitmap extra data is not supported")]
    ExtraData,
    /// An entry runs past the end of the directory.
    #[error("Broken bitmap directory: entry {index} ({name}) runs past its end")]
    BrokenDirectory {
        /// Which entry (from 0).
        index: usize,
        /// As much of its name as the directory holds.
        name: String,
    },
    /// An entry breaks a constraint.
    #[error("Bitmap '{name}' doesn't satisfy the constraints: {reason}")]
    Constraints {
        /// The bitmap.
        name: String,
        /// Which constraint.
        reason: String,
    },
    /// Two entries have the same name.
    #[error("Bitmap '{0}' appears twice in the bitmap directory")]
    DuplicateName(String),
    /// A table entry is invalid or points outside the file.
    #[error("Could not read bitmap_table table from image for bitmap '{name}': {reason}")]
    Table {
        /// The bitmap.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The table's size does not match the disk.
    #[error("Could not read bitmap '{name}' from image: {reason}")]
    Data {
        /// The bitmap.
        name: String,
        /// What is wrong.
        reason: String,
    },
}

/// The bitmaps header extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitmapsExtension {
    /// Number of bitmaps in the directory.
    pub nb_bitmaps: u32,
    /// Bytes of the directory.
    pub directory_size: u64,
    /// File offset of the directory.
    pub directory_offset: u64,
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

impl BitmapsExtension {
    /// Parses and checks the extension's data, in QEMU's order.
    pub fn parse(data: &[u8], cluster_size: u64) -> Result<Self, BitmapsError> {
        if data.len() != EXTENSION_LEN {
            return Err(BitmapsError::ExtensionLength);
        }
        let ext = BitmapsExtension {
            nb_bitmaps: be32(&data[0..4]),
            directory_size: be64(&data[8..16]),
            directory_offset: be64(&data[16..24]),
        };
        if be32(&data[4..8]) != 0 {
            return Err(BitmapsError::ExtensionReserved);
        }
        if ext.nb_bitmaps > MAX_BITMAPS {
            return Err(BitmapsError::TooManyBitmaps(ext.nb_bitmaps));
        }
        if ext.nb_bitmaps == 0 {
            return Err(BitmapsError::ZeroBitmaps);
        }
        if ext.directory_offset == 0 || !ext.directory_offset.is_multiple_of(cluster_size) {
            return Err(BitmapsError::DirectoryOffset);
        }
        if ext.directory_size > MAX_DIRECTORY_SIZE {
            return Err(BitmapsError::DirectoryTooBig(ext.directory_size));
        }
        Ok(ext)
    }

    /// The extension's 24 bytes.
    pub fn to_bytes(&self) -> [u8; EXTENSION_LEN] {
        let mut out = [0u8; EXTENSION_LEN];
        out[0..4].copy_from_slice(&self.nb_bitmaps.to_be_bytes());
        out[8..16].copy_from_slice(&self.directory_size.to_be_bytes());
        out[16..24].copy_from_slice(&self.directory_offset.to_be_bytes());
        out
    }
}

/// One entry of the bitmap directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectoryEntry {
    /// File offset of the bitmap table.
    pub table_offset: u64,
    /// Entries in the bitmap table.
    pub table_size: u32,
    /// Flags ([`FLAG_IN_USE`], [`FLAG_AUTO`]).
    pub flags: u32,
    /// Bitmap type ([`TYPE_DIRTY_TRACKING`]).
    pub bitmap_type: u8,
    /// log2 of the bytes of guest data per bit.
    pub granularity_bits: u8,
    /// The name.
    pub name: String,
}

/// Bytes of a directory entry's fixed part.
const ENTRY_HEADER: usize = 24;

impl DirectoryEntry {
    /// Whether the in_use flag is set.
    pub fn in_use(&self) -> bool {
        self.flags & FLAG_IN_USE != 0
    }

    /// Whether the auto flag is set (the bitmap is enabled).
    pub fn auto(&self) -> bool {
        self.flags & FLAG_AUTO != 0
    }

    /// Granularity in bytes.
    pub fn granularity(&self) -> u64 {
        1u64 << self.granularity_bits
    }

    /// Bytes of the encoded entry (padded to 8).
    pub fn encoded_len(&self) -> usize {
        (ENTRY_HEADER + self.name.len()).next_multiple_of(8)
    }

    /// Appends the encoded entry to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&self.table_offset.to_be_bytes());
        out.extend_from_slice(&self.table_size.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.push(self.bitmap_type);
        out.push(self.granularity_bits);
        out.extend_from_slice(&(self.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out.resize(start + self.encoded_len(), 0);
    }

    /// QEMU's constraints on an entry, for a disk of `disk_len` bytes.
    pub fn check_constraints(&self, cluster_size: u64, disk_len: u64) -> Result<(), BitmapsError> {
        let fail = |reason: &str| {
            Err(BitmapsError::Constraints { name: self.name.clone(), reason: reason.to_string() })
        };
        if self.table_size == 0 || self.table_size > MAX_TABLE_SIZE {
            return fail("invalid bitmap table size");
        }
        if self.table_offset == 0 || !self.table_offset.is_multiple_of(cluster_size) {
            return fail("bitmap table offset is not cluster-aligned");
        }
        if !GRANULARITY_BITS.contains(&self.granularity_bits) {
            return fail("granularity is outside 512 B to 2 GiB");
        }
        if self.flags & RESERVED_FLAGS != 0 {
            return fail("reserved flags are set");
        }
        if self.name.is_empty() || self.name.len() > MAX_NAME_SIZE {
            return fail("invalid name length");
        }
        if self.bitmap_type != TYPE_DIRTY_TRACKING {
            return fail("not a dirty tracking bitmap");
        }
        if u64::from(self.table_size) * cluster_size > MAX_PHYS_SIZE {
            return fail("the bitmap data is larger than 512 MiB");
        }
        // A stale in-use bitmap from before a resize may be too small; its data is not
        // used anyway.
        if !self.in_use()
            && u64::from(self.table_size) < table_size(disk_len, self.granularity(), cluster_size)
        {
            return fail("the bitmap table does not cover the disk");
        }
        Ok(())
    }
}

/// Entries of the bitmap table for a disk of `disk_len` bytes at `granularity` bytes
/// per bit, with `cluster_size`-byte data clusters.
pub fn table_size(disk_len: u64, granularity: u64, cluster_size: u64) -> u64 {
    disk_len.div_ceil(granularity).div_ceil(8).div_ceil(cluster_size)
}

/// Parses and checks the directory's bytes against the extension.
pub fn parse_directory(
    bytes: &[u8],
    ext: &BitmapsExtension,
    cluster_size: u64,
    disk_len: u64,
) -> Result<Vec<DirectoryEntry>, BitmapsError> {
    let mut entries: Vec<DirectoryEntry> = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        if entries.len() as u64 >= u64::from(ext.nb_bitmaps) {
            return Err(BitmapsError::MoreBitmaps);
        }
        let index = entries.len();
        let Some(fixed) = bytes.get(at..at + ENTRY_HEADER) else {
            return Err(BitmapsError::BrokenDirectory {
                index,
                name: "no room for its header".into(),
            });
        };
        let name_size = usize::from(u16::from_be_bytes([fixed[18], fixed[19]]));
        let extra_size = be32(&fixed[20..24]);
        if extra_size != 0 {
            return Err(BitmapsError::ExtraData);
        }
        let name_end = at + ENTRY_HEADER + name_size;
        let entry_end = (ENTRY_HEADER + name_size).next_multiple_of(8) + at;
        if entry_end > bytes.len() {
            let partial = &bytes[(at + ENTRY_HEADER).min(bytes.len())..name_end.min(bytes.len())];
            let name =
                format!("name '{}…'", String::from_utf8_lossy(&partial[..partial.len().min(64)]));
            return Err(BitmapsError::BrokenDirectory { index, name });
        }
        let name = String::from_utf8_lossy(&bytes[at + ENTRY_HEADER..name_end]).into_owned();
        let entry = DirectoryEntry {
            table_offset: be64(&fixed[0..8]),
            table_size: be32(&fixed[8..12]),
            flags: be32(&fixed[12..16]),
            bitmap_type: fixed[16],
            granularity_bits: fixed[17],
            name,
        };
        entry.check_constraints(cluster_size, disk_len)?;
        if entries.iter().any(|e| e.name == entry.name) {
            return Err(BitmapsError::DuplicateName(entry.name));
        }
        entries.push(entry);
        at = entry_end;
    }
    if (entries.len() as u64) < u64::from(ext.nb_bitmaps) {
        return Err(BitmapsError::LessBitmaps);
    }
    Ok(entries)
}

/// Reads and checks the directory the extension points at.
pub fn read_directory(
    storage: &dyn Storage,
    ext: &BitmapsExtension,
    cluster_size: u64,
    disk_len: u64,
) -> Result<Vec<DirectoryEntry>, BitmapsError> {
    if ext.directory_size == 0 {
        return Err(BitmapsError::DirectoryEmpty);
    }
    let file_len = storage
        .len()
        .map_err(|source| BitmapsError::Io { what: "the image length".into(), source })?;
    if ext.directory_offset.checked_add(ext.directory_size).is_none_or(|end| end > file_len) {
        return Err(BitmapsError::DirectoryOutside {
            offset: ext.directory_offset,
            size: ext.directory_size,
        });
    }
    // Bounded by MAX_DIRECTORY_SIZE (checked when the extension was parsed).
    let mut bytes = vec![0u8; ext.directory_size as usize];
    storage
        .read_at(&mut bytes, ext.directory_offset)
        .map_err(|source| BitmapsError::Io { what: "bitmap directory".into(), source })?;
    parse_directory(&bytes, ext, cluster_size, disk_len)
}

/// Reads and checks a bitmap's table: reserved bits clear, data clusters aligned and
/// inside the file.
pub fn read_table(
    storage: &dyn Storage,
    entry: &DirectoryEntry,
    cluster_size: u64,
) -> Result<Vec<u64>, BitmapsError> {
    let fail = |reason: String| BitmapsError::Table { name: entry.name.clone(), reason };
    let file_len = storage
        .len()
        .map_err(|source| BitmapsError::Io { what: "the image length".into(), source })?;
    let bytes_len = u64::from(entry.table_size) * 8;
    if entry.table_offset.checked_add(bytes_len).is_none_or(|end| end > file_len) {
        return Err(fail(format!(
            "the table at {:#x} is past the end of the file",
            entry.table_offset
        )));
    }
    // Bounded: table_size <= MAX_TABLE_SIZE and the table lies inside the file.
    let mut bytes = vec![0u8; bytes_len as usize];
    storage.read_at(&mut bytes, entry.table_offset).map_err(|source| BitmapsError::Io {
        what: format!("bitmap table of '{}'", entry.name),
        source,
    })?;
    let table: Vec<u64> = bytes.chunks_exact(8).map(be64).collect();
    for (i, &e) in table.iter().enumerate() {
        let offset = e & TABLE_OFFSET;
        if e & TABLE_RESERVED != 0 || (offset != 0 && e & TABLE_ALL_ONES != 0) {
            return Err(fail(format!("entry {i} ({e:#x}) has reserved bits set")));
        }
        if offset != 0 && (!offset.is_multiple_of(cluster_size) || offset + cluster_size > file_len)
        {
            return Err(fail(format!(
                "entry {i} points to {offset:#x}, outside the image's clusters"
            )));
        }
    }
    Ok(table)
}

/// Loads a bitmap's data (the entry must not be in use) for a disk of `disk_len` bytes.
pub fn load_bitmap(
    storage: &dyn Storage,
    entry: &DirectoryEntry,
    cluster_size: u64,
    disk_len: u64,
) -> Result<HBitmap, BitmapsError> {
    let table = read_table(storage, entry, cluster_size)?;
    let needed = table_size(disk_len, entry.granularity(), cluster_size);
    if table.len() as u64 != needed {
        return Err(BitmapsError::Data {
            name: entry.name.clone(),
            reason: format!("the table has {} entries, the disk needs {needed}", table.len()),
        });
    }
    let data_error = |e: hbitmap::HBitmapError| BitmapsError::Data {
        name: entry.name.clone(),
        reason: e.to_string(),
    };
    let mut bitmap =
        HBitmap::new(disk_len, u32::from(entry.granularity_bits)).map_err(data_error)?;
    let items_per_cluster = cluster_size * 8 * entry.granularity();
    let mut buf = vec![0u8; cluster_size as usize];
    for (i, &e) in table.iter().enumerate() {
        let start = i as u64 * items_per_cluster;
        let len = items_per_cluster.min(disk_len - start);
        let offset = e & TABLE_OFFSET;
        if offset != 0 {
            storage.read_at(&mut buf, offset).map_err(|source| BitmapsError::Io {
                what: format!("data of bitmap '{}'", entry.name),
                source,
            })?;
            let bytes = bitmap.serialization_size(start, len).map_err(data_error)? as usize;
            bitmap.deserialize_part(&buf[..bytes], start, len).map_err(data_error)?;
        } else if e & TABLE_ALL_ONES != 0 {
            bitmap.deserialize_ones(start, len).map_err(data_error)?;
        }
    }
    Ok(bitmap)
}

/// A bitmap's data clusters for storing: one per table entry, `None` where the cluster
/// would be all zeroes (table entry 0, nothing written).
pub fn encode_clusters(
    bitmap: &HBitmap,
    cluster_size: u64,
) -> Result<Vec<Option<Vec<u8>>>, hbitmap::HBitmapError> {
    let items_per_cluster = (cluster_size * 8) << bitmap.granularity();
    let size = bitmap.size();
    let count = table_size(size, 1 << bitmap.granularity(), cluster_size);
    let mut clusters = Vec::new();
    for i in 0..count {
        let start = i * items_per_cluster;
        let len = items_per_cluster.min(size - start);
        if bitmap.next_dirty(start, start + len).is_none() {
            clusters.push(None);
            continue;
        }
        let mut buf = vec![0u8; cluster_size as usize];
        let bytes = bitmap.serialization_size(start, len)? as usize;
        bitmap.serialize_part(&mut buf[..bytes], start, len)?;
        clusters.push(Some(buf));
    }
    Ok(clusters)
}

/// Offset of `autoclear_features` in a v3 header.
const AUTOCLEAR_OFFSET: u64 = 88;

/// Marks every entry of the directory in use, in place, as a writer that loaded the
/// bitmaps must before it changes the disk: autoclear bit 0 is cleared (so a crash in
/// between leaves the bitmaps inconsistent rather than wrong), the directory rewritten at
/// the same place, then the bit set again, with a flush after each step.
pub fn mark_in_use(
    storage: &dyn Storage,
    ext: &BitmapsExtension,
    entries: &mut [DirectoryEntry],
) -> Result<(), BitmapsError> {
    let io = |what: &str| {
        let what = what.to_string();
        move |source| BitmapsError::Io { what: what.clone(), source }
    };
    if entries.iter().all(DirectoryEntry::in_use) {
        return Ok(());
    }
    let mut autoclear = [0u8; 8];
    storage.read_at(&mut autoclear, AUTOCLEAR_OFFSET).map_err(io("the header"))?;
    let autoclear = u64::from_be_bytes(autoclear);
    let without = autoclear & !crate::header::AUTOCLEAR_BITMAPS;
    storage.write_at(&without.to_be_bytes(), AUTOCLEAR_OFFSET).map_err(io("the header"))?;
    storage.flush().map_err(io("the header"))?;
    let mut directory = Vec::with_capacity(ext.directory_size as usize);
    for entry in entries.iter_mut() {
        entry.flags |= FLAG_IN_USE;
        entry.encode(&mut directory);
    }
    storage.write_at(&directory, ext.directory_offset).map_err(io("bitmap directory"))?;
    storage.flush().map_err(io("bitmap directory"))?;
    let with = without | crate::header::AUTOCLEAR_BITMAPS;
    storage.write_at(&with.to_be_bytes(), AUTOCLEAR_OFFSET).map_err(io("the header"))?;
    storage.flush().map_err(io("the header"))
}
