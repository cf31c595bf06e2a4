//! The internal snapshot table.
//!
//! Entries are kept with their extra data as stored, so that the table can be
//! rewritten without losing fields this crate does not know.

use crate::error::{Qcow2Error, Result};
use crate::header::MAX_L1_BYTES;
use crate::storage::Storage;

/// Largest extra data of one entry accepted (QEMU's limit).
pub const MAX_EXTRA_DATA: u32 = 1024;
/// Largest snapshot table accepted, in bytes (64 MiB, as QEMU).
pub const MAX_TABLE_BYTES: u64 = 64 << 20;

/// One internal snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in the snapshot's L1 table.
    pub l1_size: u32,
    /// Unique ID string, as stored.
    pub id: Vec<u8>,
    /// Name, as stored.
    pub name: Vec<u8>,
    /// Seconds since the Epoch when the snapshot was taken.
    pub date_sec: u32,
    /// Nanoseconds part of that time.
    pub date_nsec: u32,
    /// Guest run time at the snapshot, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// The 32-bit VM state size field (bytes 32..36).
    pub vm_state_size32: u32,
    /// The extra data, as stored (bytes 40.. of the entry).
    pub extra_data: Vec<u8>,
}

impl Snapshot {
    /// The VM state size: the 64-bit field of the extra data when present.
    pub fn vm_state_size(&self) -> u64 {
        self.extra_u64(0).unwrap_or(self.vm_state_size32.into())
    }

    /// The virtual disk size at the snapshot, when recorded in the extra data.
    pub fn disk_size(&self) -> Option<u64> {
        self.extra_u64(8)
    }

    fn extra_u64(&self, at: usize) -> Option<u64> {
        let b = self.extra_data.get(at..at + 8)?;
        Some(u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
    }

    /// Length of the entry on disk (padded to a multiple of 8).
    pub fn entry_len(&self) -> u64 {
        (40 + self.extra_data.len() + self.id.len() + self.name.len()).div_ceil(8) as u64 * 8
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Reads `count` snapshot entries at `offset`, checking every length against the file.
pub fn read_table(
    storage: &dyn Storage,
    offset: u64,
    count: u32,
    cluster_bits: u32,
    file_len: u64,
) -> Result<Vec<Snapshot>> {
    let corrupt = |at, reason| Qcow2Error::corrupt("snapshot table", at, reason);
    let mut out = Vec::new();
    let mut at = offset;
    let read = |buf: &mut [u8], at: u64| -> Result<()> {
        if at.checked_add(buf.len() as u64).is_none_or(|end| end > file_len) {
            return Err(corrupt(at, "entry reaches past the end of the file"));
        }
        storage.read_at(buf, at).map_err(Qcow2Error::io("reading the snapshot table", at))
    };
    for _ in 0..count {
        if at - offset > MAX_TABLE_BYTES {
            return Err(corrupt(offset, "snapshot table larger than 64 MiB"));
        }
        let mut fixed = [0u8; 40];
        read(&mut fixed, at)?;
        let l1_table_offset = u64::from_be_bytes(fixed[0..8].try_into().unwrap_or_default());
        let l1_size = be32(&fixed, 8);
        let id_len = u16::from_be_bytes([fixed[12], fixed[13]]);
        let name_len = u16::from_be_bytes([fixed[14], fixed[15]]);
        let extra_len = be32(&fixed, 36);
        if extra_len > MAX_EXTRA_DATA {
            return Err(corrupt(at, "extra data larger than 1024 bytes"));
        }
        if l1_table_offset & ((1 << cluster_bits) - 1) != 0 {
            return Err(corrupt(at, "snapshot L1 table offset is unaligned"));
        }
        if u64::from(l1_size) > MAX_L1_BYTES / 8 {
            return Err(corrupt(at, "snapshot L1 table larger than 32 MiB"));
        }
        if l1_size > 0
            && (l1_table_offset < 1 << cluster_bits
                || l1_table_offset.checked_add(u64::from(l1_size) * 8).is_none_or(|e| e > file_len))
        {
            return Err(corrupt(at, "snapshot L1 table outside the file or over the header"));
        }
        let mut var = vec![0u8; extra_len as usize + id_len as usize + name_len as usize];
        read(&mut var, at + 40)?;
        let (extra, rest) = var.split_at(extra_len as usize);
        let (id, name) = rest.split_at(id_len as usize);
        let snap = Snapshot {
            l1_table_offset,
            l1_size,
            id: id.to_vec(),
            name: name.to_vec(),
            date_sec: be32(&fixed, 16),
            date_nsec: be32(&fixed, 20),
            vm_clock_nsec: u64::from_be_bytes(fixed[24..32].try_into().unwrap_or_default()),
            vm_state_size32: be32(&fixed, 32),
            extra_data: extra.to_vec(),
        };
        at += snap.entry_len();
        out.push(snap);
    }
    Ok(out)
}
