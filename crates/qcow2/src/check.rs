//! Consistency check of a qcow2 image, as `qemu-img check` does it, and repair of
//! leaked clusters (`qemu-img check -r leaks`).
//!
//! [`check`] computes the expected refcount of every host cluster of the file from the
//! metadata that references it (header, active and snapshot L1/L2 tables, data and
//! compressed clusters, the snapshot table, the refcount table and blocks, the bitmaps
//! directory, tables and data) and compares it with the stored refcounts:
//!
//! - a *leak* is a cluster whose stored refcount is higher than expected;
//! - a *corruption* is a cluster whose stored refcount is lower than expected, an
//!   unaligned table or data offset, a region past the end of the file, or an L1/L2
//!   entry whose COPIED flag disagrees with the stored refcount (the flag must be set
//!   exactly when the refcount is 1), as QEMU reports them.
//!
//! Memory is bounded by the file length: one counter per host cluster, refused past
//! [`MAX_CHECK_CLUSTERS`], plus one table or block at a time.

use std::path::Path;

use crate::error::{FeatureKind, Qcow2Error, Result};
use crate::header::{self, AUTOCLEAR_BITMAPS, Header};
use crate::image::read_header;
use crate::l2::{COMPRESSED, COPIED, OFFSET_MASK};
use crate::refcount::{self, REFTABLE_OFFSET_MASK};
use crate::snapshot;
use crate::storage::{FileStorage, Storage};

/// Largest file, in clusters, that [`check`] accepts (its expected-refcount array takes
/// four bytes per cluster).
pub const MAX_CHECK_CLUSTERS: u64 = 1 << 26;
/// Most problems listed in [`CheckResult::problems`] (the counts are always complete).
pub const MAX_LISTED_PROBLEMS: usize = 4096;

/// Bits of an L1 entry that must be zero (0..=8 and 56..=62).
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Bits of a standard L2 entry that must be zero (1..=8 and 56..=61).
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// The kind of a problem found by [`check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// A leaked cluster: its stored refcount is higher than its references.
    Leak,
    /// A corruption: wrong metadata, or a refcount lower than the references.
    Corruption,
    /// The check itself could not read some metadata.
    CheckError,
}

/// One problem found by [`check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Its kind.
    pub kind: ProblemKind,
    /// The host offset concerned (a cluster, or the entry of a table).
    pub offset: u64,
    /// A description in the style of `qemu-img check`.
    pub message: String,
}

/// A cluster whose stored refcount differs from its references.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefcountMismatch {
    /// The host cluster index.
    pub cluster: u64,
    /// The stored refcount.
    pub stored: u64,
    /// The number of references found.
    pub expected: u64,
}

/// The result of [`check`], with the keys of `qemu-img check --output=json`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckResult {
    /// `filename`: the file checked (empty for [`check`] on a storage).
    pub filename: String,
    /// `format`: always "qcow2".
    pub format: &'static str,
    /// `check-errors`: metadata the check could not read.
    pub check_errors: u64,
    /// `leaks`: leaked clusters.
    pub leaks: u64,
    /// `corruptions`: corruptions.
    pub corruptions: u64,
    /// `leaks-fixed`: leaks repaired by [`repair_leaks`].
    pub leaks_fixed: u64,
    /// `image-end-offset`: the end of the last cluster in use (referenced or counted).
    pub image_end_offset: u64,
    /// `total-clusters`: guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// `allocated-clusters`: guest clusters allocated in the active image.
    pub allocated_clusters: u64,
    /// `fragmented-clusters`: allocated guest clusters not right after the previous
    /// allocated guest cluster in the file.
    pub fragmented_clusters: u64,
    /// `compressed-clusters`: compressed guest clusters of the active image.
    pub compressed_clusters: u64,
    /// The problems, in the order found (at most [`MAX_LISTED_PROBLEMS`]).
    pub problems: Vec<Problem>,
    /// The clusters whose stored refcount differs from the references (at most
    /// [`MAX_LISTED_PROBLEMS`]).
    pub mismatches: Vec<RefcountMismatch>,
}

impl CheckResult {
    /// Whether no leak, corruption or check error was found.
    pub fn is_clean(&self) -> bool {
        self.check_errors == 0 && self.leaks == 0 && self.corruptions == 0
    }

    fn problem(&mut self, kind: ProblemKind, offset: u64, message: String) {
        match kind {
            ProblemKind::Leak => self.leaks += 1,
            ProblemKind::Corruption => self.corruptions += 1,
            ProblemKind::CheckError => self.check_errors += 1,
        }
        if self.problems.len() < MAX_LISTED_PROBLEMS {
            self.problems.push(Problem { kind, offset, message });
        }
    }
}

fn invalid(field: &'static str, value: u64, reason: &'static str) -> Qcow2Error {
    Qcow2Error::InvalidHeader { field, value, reason }
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The state of one check.
struct Checker<'a> {
    storage: &'a dyn Storage,
    h: Header,
    cs: u64,
    file_len: u64,
    /// Host clusters of the file (rounded up).
    nb: u64,
    expected: Vec<u32>,
    reftable: Vec<u64>,
    res: CheckResult,
    /// The last refcount block read: (offset, data).
    block: Option<(u64, Vec<u8>)>,
    /// Set when a refcount block was found unaligned: QEMU then marks the image
    /// corrupt and reads no more refcounts.
    fatal: bool,
    /// Told the fraction done (0.0 to 1.0) as the walk advances.
    progress: &'a mut dyn FnMut(f64),
}

impl Checker<'_> {
    /// Reads `len` bytes at `offset` (which lie within the file).
    fn read(&mut self, offset: u64, len: u64, what: &'static str) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        match self.storage.read_at(&mut buf, offset) {
            Ok(()) => Some(buf),
            Err(e) => {
                self.res.problem(
                    ProblemKind::CheckError,
                    offset,
                    format!("ERROR reading {what} at {offset:#x}: {e}"),
                );
                None
            }
        }
    }

    /// Counts one reference to every cluster `[offset, offset + len)` touches.
    /// Returns false (and reports a corruption) when the region is past the file.
    fn add(&mut self, offset: u64, len: u64) -> bool {
        if len == 0 {
            return true;
        }
        let last = offset.checked_add(len - 1).map(|l| l / self.cs);
        match last {
            Some(last) if last < self.nb => {
                for c in offset / self.cs..=last {
                    let e = &mut self.expected[c as usize];
                    *e = e.saturating_add(1);
                }
                true
            }
            _ => {
                self.res.problem(
                    ProblemKind::Corruption,
                    offset,
                    format!(
                        "ERROR: counting reference for region exceeding the end of the file by \
                         one cluster or more: offset {offset:#x} size {len:#x}"
                    ),
                );
                false
            }
        }
    }

    /// Reads a table of u64 entries that was counted (so it lies in the file).
    fn table(&mut self, offset: u64, entries: u64, what: &'static str) -> Option<Vec<u64>> {
        let raw = self.read(offset, entries * 8, what)?;
        Some(crate::l2::parse_table(&raw))
    }

    /// Counts the L2 tables and clusters of an L1 table; `active` also counts the
    /// allocation statistics.
    fn walk_l1(&mut self, l1: &[u64], active: bool) {
        let cb = self.h.cluster_bits;
        for (i, &e) in l1.iter().enumerate() {
            // The active L2 tables are most of the reading: they are 90% of the work.
            if active && i % 64 == 0 {
                (self.progress)(0.9 * i as f64 / l1.len() as f64);
            }
            // Contiguity is judged within one L2 table.
            let mut prev: Option<u64> = None;
            if e & L1_RESERVED != 0 {
                self.res.problem(
                    ProblemKind::Corruption,
                    e & OFFSET_MASK,
                    format!("ERROR found L1 entry with reserved bits set: {e:x}"),
                );
            }
            // Any non-zero entry is followed, even one whose offset is 0 (QEMU then
            // reads the header cluster as the L2 table).
            let l2_offset = e & OFFSET_MASK;
            if e == 0 {
                continue;
            }
            if !l2_offset.is_multiple_of(self.cs) {
                self.res.problem(
                    ProblemKind::Corruption,
                    l2_offset,
                    format!(
                        "ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry \
                         corrupted"
                    ),
                );
            }
            if !self.add(l2_offset, self.cs) {
                continue;
            }
            let Some(l2) = self.table(l2_offset, self.cs / 8, "an L2 table") else {
                continue;
            };
            for entry in l2 {
                if entry & COMPRESSED != 0 {
                    let x = 62 - (cb - 8);
                    let host = entry & ((1u64 << x) - 1);
                    let sectors = ((entry >> x) & ((1u64 << (cb - 8)) - 1)) + 1;
                    let start = host & !511;
                    if entry & COPIED != 0 {
                        self.res.problem(
                            ProblemKind::Corruption,
                            host,
                            format!(
                                "ERROR: coffset=0x{host:x}: copied flag must never be set for \
                                 compressed clusters"
                            ),
                        );
                    }
                    if active {
                        self.res.allocated_clusters += 1;
                        self.res.compressed_clusters += 1;
                        // Compressed clusters always count as fragmented, and the next
                        // data cluster is compared with the one before them.
                        self.res.fragmented_clusters += 1;
                    }
                    self.add(start, sectors * 512);
                    continue;
                }
                if entry & L2_RESERVED != 0 {
                    self.res.problem(
                        ProblemKind::Corruption,
                        l2_offset,
                        format!("ERROR found l2 entry with reserved bits set: {entry:x}"),
                    );
                }
                let off = entry & OFFSET_MASK;
                if off == 0 {
                    continue;
                }
                if active {
                    self.res.allocated_clusters += 1;
                    if prev.is_some_and(|p| p + self.cs != off) {
                        self.res.fragmented_clusters += 1;
                    }
                    prev = Some(off);
                }
                if !off.is_multiple_of(self.cs) {
                    self.res.problem(
                        ProblemKind::Corruption,
                        off,
                        format!(
                            "ERROR offset={off:x}: Data cluster is not properly aligned; L2 entry \
                             corrupted."
                        ),
                    );
                }
                self.add(off, self.cs);
            }
        }
    }

    /// The stored refcount of host cluster `c` (0 when it has no refcount block, or
    /// when the block lies past the end of the file), `None` when it cannot be read:
    /// the block is at an offset no file can have, or is unaligned. An unaligned block
    /// marks the image corrupt, as QEMU does, and no refcount can be read after that.
    fn stored(&mut self, c: u64) -> Option<u64> {
        if self.fatal {
            return None;
        }
        let (ti, bi) = refcount::locate(c, self.h.cluster_bits, self.h.refcount_order);
        let Some(&entry) = self.reftable.get(ti as usize) else {
            return Some(0);
        };
        let off = entry & REFTABLE_OFFSET_MASK;
        if off == 0 {
            return Some(0);
        }
        if !off.is_multiple_of(self.cs) {
            self.fatal = true;
            return None;
        }
        if off.checked_add(self.cs).is_none_or(|end| end > i64::MAX as u64) {
            return None;
        }
        if off >= self.file_len {
            return Some(0);
        }
        if self.block.as_ref().is_none_or(|(o, _)| *o != off) {
            let mut data = vec![0u8; self.cs as usize];
            self.storage.read_at(&mut data, off).ok()?;
            self.block = Some((off, data));
        }
        self.block.as_ref().map(|(_, d)| refcount::get(d, bi, self.h.refcount_order))
    }

    /// Counts the bitmaps extension: directory, bitmap tables, data clusters.
    fn walk_bitmaps(&mut self) {
        if self.h.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
            return;
        }
        let Some(ext) = self.h.bitmaps_extension().map(<[u8]>::to_vec) else {
            return;
        };
        if ext.len() < 24 {
            self.res.problem(
                ProblemKind::Corruption,
                0,
                "ERROR bitmaps extension is too short".to_owned(),
            );
            return;
        }
        let nb_bitmaps = be32(&ext, 0);
        let dir_size = be64(&ext, 8);
        let dir_offset = be64(&ext, 16);
        if nb_bitmaps == 0 {
            return;
        }
        if dir_size > crate::bitmaps::MAX_DIRECTORY_SIZE || !dir_offset.is_multiple_of(self.cs) {
            self.res.problem(
                ProblemKind::Corruption,
                dir_offset,
                "ERROR bitmap directory is invalid".to_owned(),
            );
            return;
        }
        if !self.add(dir_offset, dir_size) {
            return;
        }
        let Some(dir) = self.read(dir_offset, dir_size, "the bitmap directory") else {
            return;
        };
        let mut at = 0usize;
        for _ in 0..nb_bitmaps {
            if at + 24 > dir.len() {
                self.res.problem(
                    ProblemKind::Corruption,
                    dir_offset,
                    "ERROR bitmap directory is truncated".to_owned(),
                );
                return;
            }
            let table_offset = be64(&dir, at);
            let table_size = u64::from(be32(&dir, at + 8));
            let name_size = u64::from(u16::from_be_bytes([dir[at + 18], dir[at + 19]]));
            let extra_size = u64::from(be32(&dir, at + 20));
            at += (24 + name_size + extra_size).div_ceil(8) as usize * 8;
            if !table_offset.is_multiple_of(self.cs)
                || table_size > u64::from(crate::bitmaps::MAX_TABLE_SIZE)
            {
                self.res.problem(
                    ProblemKind::Corruption,
                    table_offset,
                    "ERROR bitmap table is invalid".to_owned(),
                );
                continue;
            }
            if !self.add(table_offset, table_size * 8) {
                continue;
            }
            let Some(table) = self.table(table_offset, table_size, "a bitmap table") else {
                continue;
            };
            for e in table {
                let off = e & crate::bitmaps::TABLE_OFFSET;
                if off != 0 {
                    self.add(off, self.cs);
                }
            }
        }
    }
}

/// Checks the qcow2 image on `storage` like `qemu-img check` (without repairing).
///
/// Fails only when the image cannot be checked at all: unreadable header, header
/// fields that QEMU would refuse to open, or a file of more than
/// [`MAX_CHECK_CLUSTERS`] clusters.
pub fn check(storage: &dyn Storage) -> Result<CheckResult> {
    Ok(run(storage, &mut |_| {})?.res)
}

/// [`check`], telling `progress` the fraction done (0.0 to 1.0) as it goes.
pub fn check_with_progress(
    storage: &dyn Storage,
    progress: &mut dyn FnMut(f64),
) -> Result<CheckResult> {
    let res = run(storage, progress)?.res;
    progress(1.0);
    Ok(res)
}

/// [`check`] on the image file at `path` (opened read-only); `filename` is set.
pub fn check_file(path: &Path) -> Result<CheckResult> {
    let storage = FileStorage::open(path, false).map_err(Qcow2Error::io("opening the image", 0))?;
    let mut res = check(&storage)?;
    res.filename = path.display().to_string();
    Ok(res)
}

fn run<'a>(storage: &'a dyn Storage, progress: &'a mut dyn FnMut(f64)) -> Result<Checker<'a>> {
    let file_len = storage.len().map_err(Qcow2Error::io("getting the file length", 0))?;
    let h = read_header(storage, file_len)?;
    // Layouts whose references this check cannot count.
    let unsupported = h.incompatible_features
        & !(header::INCOMPAT_DIRTY | header::INCOMPAT_CORRUPT | header::INCOMPAT_COMPRESSION);
    if unsupported != 0 {
        let bit = unsupported.trailing_zeros() as u8;
        return Err(Qcow2Error::UnsupportedFeature {
            name: h.feature_name(FeatureKind::Incompatible, bit),
            kind: FeatureKind::Incompatible,
            bit,
        });
    }
    let cs = h.cluster_size();
    let nb = file_len.div_ceil(cs);
    if nb > MAX_CHECK_CLUSTERS {
        return Err(invalid("size", file_len, "the file has too many clusters to be checked"));
    }
    if u64::from(h.l1_size) * 8 > header::MAX_L1_BYTES {
        return Err(invalid("l1_size", h.l1_size.into(), "L1 table larger than 32 MiB"));
    }
    let reftable_bytes = u64::from(h.refcount_table_clusters) * cs;
    if reftable_bytes > header::MAX_REFTABLE_BYTES || reftable_bytes == 0 {
        return Err(invalid(
            "refcount_table_clusters",
            h.refcount_table_clusters.into(),
            "refcount table empty or larger than 8 MiB",
        ));
    }
    let in_file = |off: u64, len: u64| {
        off.is_multiple_of(cs) && off.checked_add(len).is_some_and(|e| e <= file_len)
    };
    if !in_file(h.refcount_table_offset, reftable_bytes) || h.refcount_table_offset == 0 {
        return Err(invalid(
            "refcount_table_offset",
            h.refcount_table_offset,
            "refcount table unaligned or past the end of the file",
        ));
    }
    let l1_bytes = u64::from(h.l1_size) * 8;
    if l1_bytes > 0 && (!in_file(h.l1_table_offset, l1_bytes) || h.l1_table_offset == 0) {
        return Err(invalid(
            "l1_table_offset",
            h.l1_table_offset,
            "L1 table unaligned or past the end of the file",
        ));
    }
    if h.nb_snapshots > header::MAX_SNAPSHOTS {
        return Err(invalid("nb_snapshots", h.nb_snapshots.into(), "more than 65536 snapshots"));
    }
    let snapshots = snapshot::read_table(
        storage,
        h.snapshots_offset,
        h.nb_snapshots,
        h.cluster_bits,
        file_len,
    )?;

    let mut c = Checker {
        storage,
        cs,
        file_len,
        nb,
        expected: vec![0u32; nb as usize],
        reftable: Vec::new(),
        res: CheckResult { format: "qcow2", ..CheckResult::default() },
        block: None,
        fatal: false,
        progress,
        h,
    };
    c.res.total_clusters = c.h.size.div_ceil(cs);
    c.reftable = c
        .table(c.h.refcount_table_offset, reftable_bytes / 8, "the refcount table")
        .unwrap_or_default();

    // Header (with the encryption header it points to), active L1 and L2 tables.
    c.add(0, cs);
    if let Some(crypto) = c.h.extension(header::EXT_CRYPTO)
        && crypto.len() >= 16
    {
        let (offset, len) = (be64(crypto, 0), be64(crypto, 8));
        c.add(offset, len);
    }
    c.add(c.h.l1_table_offset, l1_bytes);
    let l1 = if l1_bytes > 0 {
        c.table(c.h.l1_table_offset, l1_bytes / 8, "the L1 table").unwrap_or_default()
    } else {
        Vec::new()
    };
    c.walk_l1(&l1, true);

    // Snapshots.
    if !snapshots.is_empty() {
        let table_len: u64 = snapshots.iter().map(snapshot::Snapshot::entry_len).sum();
        c.add(c.h.snapshots_offset, table_len);
    }
    for s in &snapshots {
        let bytes = u64::from(s.l1_size) * 8;
        if !c.add(s.l1_table_offset, bytes) || bytes == 0 {
            continue;
        }
        if let Some(sl1) = c.table(s.l1_table_offset, bytes / 8, "a snapshot L1 table") {
            c.walk_l1(&sl1, false);
        }
    }

    // Bitmaps (before the refcount blocks, which are checked as they are counted).
    c.walk_bitmaps();

    // Refcount table and blocks.
    c.add(c.h.refcount_table_offset, reftable_bytes);
    for i in 0..c.reftable.len() {
        let off = c.reftable[i] & REFTABLE_OFFSET_MASK;
        if c.reftable[i] & !REFTABLE_OFFSET_MASK != 0 {
            c.res.problem(
                ProblemKind::Corruption,
                c.h.refcount_table_offset + i as u64 * 8,
                format!("ERROR refcount table entry {i} has reserved bits set"),
            );
            continue;
        }
        if off == 0 {
            continue;
        }
        if !off.is_multiple_of(cs) {
            c.res.problem(
                ProblemKind::Corruption,
                off,
                format!("ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"),
            );
        } else if off / cs >= nb {
            c.res.problem(
                ProblemKind::Corruption,
                off,
                format!("ERROR refcount block {i} is outside image"),
            );
        } else {
            c.add(off, cs);
            // Referenced exactly once so far: by this entry. (Blocks are checked as
            // they are counted, so a block named twice is reported at its second entry.)
            let n = c.expected[(off / cs) as usize];
            if n != 1 {
                c.res.problem(
                    ProblemKind::Corruption,
                    off,
                    format!("ERROR refcount block {i} refcount={n}"),
                );
            }
        }
    }

    // Compare with the stored refcounts.
    let mut last_used = None;
    for i in 0..nb {
        let Some(stored) = c.stored(i) else {
            c.res.problem(
                ProblemKind::CheckError,
                i * cs,
                format!("Can't get refcount for cluster {i}: Input/output error"),
            );
            continue;
        };
        let expected = u64::from(c.expected[i as usize]);
        if stored > 0 || expected > 0 {
            last_used = Some(i);
        }
        if stored == expected {
            continue;
        }
        if c.res.mismatches.len() < MAX_LISTED_PROBLEMS {
            c.res.mismatches.push(RefcountMismatch { cluster: i, stored, expected });
        }
        if stored < expected {
            c.res.problem(
                ProblemKind::Corruption,
                i * cs,
                format!("ERROR cluster {i} refcount={stored} reference={expected}"),
            );
        } else {
            c.res.problem(
                ProblemKind::Leak,
                i * cs,
                format!("Leaked cluster {i} refcount={stored} reference={expected}"),
            );
        }
    }
    c.res.image_end_offset = (last_used.unwrap_or(0) + 1) * cs;
    if c.fatal {
        // QEMU stops the check here.
        return Ok(c);
    }

    // COPIED flags of the active tables against the stored refcounts.
    for (i, &e) in l1.iter().enumerate() {
        let l2_offset = e & OFFSET_MASK;
        if l2_offset == 0 {
            continue;
        }
        // When the refcount of an L2 table cannot be read, the table is skipped; when
        // that of a data cluster cannot, the check ends (QEMU reports that the check
        // failed, with the counts so far).
        let Some(rc) = c.stored(l2_offset / cs) else {
            continue;
        };
        if (rc == 1) != (e & COPIED != 0) {
            c.res.problem(
                ProblemKind::Corruption,
                c.h.l1_table_offset + i as u64 * 8,
                format!("ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={rc}"),
            );
        }
        if l2_offset / cs >= nb {
            continue;
        }
        let mut raw = vec![0u8; cs as usize];
        if storage.read_at(&mut raw, l2_offset).is_err() {
            continue;
        }
        for entry in crate::l2::parse_table(&raw) {
            let off = entry & OFFSET_MASK;
            if entry & COMPRESSED != 0 || off == 0 {
                continue;
            }
            let Some(rc) = c.stored(off / cs) else {
                continue;
            };
            if (rc == 1) != (entry & COPIED != 0) {
                c.res.problem(
                    ProblemKind::Corruption,
                    off,
                    format!("ERROR OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={rc}"),
                );
            }
        }
    }
    Ok(c)
}

/// Repairs leaked clusters like `qemu-img check -r leaks`: lowers the stored refcount
/// of every cluster whose refcount is higher than its references to the number of
/// references, then checks again.
///
/// Refcount blocks are rewritten in place, and only to decrease refcounts, so a crash
/// in the middle leaves at most some leaks unrepaired. Clusters whose refcount is too
/// low (corruptions) are left alone. The result is that of the check after the repair,
/// with [`CheckResult::leaks_fixed`] set.
pub fn repair_leaks(storage: &dyn Storage) -> Result<CheckResult> {
    let mut no_progress = |_| {};
    let c = run(storage, &mut no_progress)?;
    let mut fixed = 0;
    if c.res.leaks > 0 {
        let cs = c.cs;
        let order = c.h.refcount_order;
        let rb = (cs * 8) >> order;
        for (ti, &entry) in c.reftable.iter().enumerate() {
            let off = entry & REFTABLE_OFFSET_MASK;
            if off == 0 || !off.is_multiple_of(cs) || off / cs >= c.nb {
                continue;
            }
            let first = ti as u64 * rb;
            if first >= c.nb {
                break;
            }
            let mut block = vec![0u8; cs as usize];
            storage
                .read_at(&mut block, off)
                .map_err(Qcow2Error::io("reading a refcount block", off))?;
            let mut changed = false;
            for j in 0..rb.min(c.nb - first) {
                let stored = refcount::get(&block, j, order);
                let expected = u64::from(c.expected[(first + j) as usize]);
                if stored > expected {
                    refcount::set(&mut block, j, order, expected);
                    fixed += 1;
                    changed = true;
                }
            }
            if changed {
                storage
                    .write_at(&block, off)
                    .map_err(Qcow2Error::io("writing a refcount block", off))?;
            }
        }
        storage.flush().map_err(Qcow2Error::io("flushing the repaired refcounts", 0))?;
    }
    drop(c);
    let mut res = check(storage)?;
    res.leaks_fixed = fixed;
    Ok(res)
}
