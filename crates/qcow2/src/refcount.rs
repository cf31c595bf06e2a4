//! Refcount table entries and refcount block entries of every width (1 to 64 bits).

use crate::error::{Qcow2Error, Result};

/// Bits 9..=63 of a refcount table entry: the refcount block offset.
pub const REFTABLE_OFFSET_MASK: u64 = !0x1ff;

/// Where the refcount of a host cluster is: (refcount table index, index in the block).
pub fn locate(host_cluster: u64, cluster_bits: u32, refcount_order: u32) -> (u64, u64) {
    // Entries per block = cluster_size * 8 / refcount_bits.
    let block_entries_bits = cluster_bits + 3 - refcount_order;
    (host_cluster >> block_entries_bits, host_cluster & ((1 << block_entries_bits) - 1))
}

/// Decodes a refcount table entry: the block offset, or `None` if not allocated.
pub fn reftable_entry_block(
    entry: u64,
    cluster_bits: u32,
    entry_offset: u64,
) -> Result<Option<u64>> {
    let off = entry & REFTABLE_OFFSET_MASK;
    if off == 0 {
        return Ok(None);
    }
    if off & ((1 << cluster_bits) - 1) != 0 {
        return Err(Qcow2Error::corrupt(
            "refcount table entry",
            entry_offset,
            "refcount block offset is unaligned",
        ));
    }
    Ok(Some(off))
}

/// Entry `index` of a refcount block of `1 << refcount_order`-bit entries.
///
/// Sub-byte widths count from the least significant bit of each byte; widths of a
/// byte or more are big-endian. `index` must be within the block.
pub fn get(block: &[u8], index: u64, refcount_order: u32) -> u64 {
    let bits = 1u64 << refcount_order;
    if bits < 8 {
        let bit = index * bits;
        let byte = block[(bit / 8) as usize];
        u64::from((byte >> (bit % 8)) & ((1u8 << bits) - 1))
    } else {
        let bytes = (bits / 8) as usize;
        let at = index as usize * bytes;
        block[at..at + bytes].iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    }
}

/// Sets entry `index` of a refcount block to `value` (which must fit the width).
pub fn set(block: &mut [u8], index: u64, refcount_order: u32, value: u64) {
    let bits = 1u64 << refcount_order;
    if bits < 8 {
        let bit = index * bits;
        let mask = ((1u8 << bits) - 1) << (bit % 8);
        let byte = &mut block[(bit / 8) as usize];
        *byte = (*byte & !mask) | (((value as u8) << (bit % 8)) & mask);
    } else {
        let bytes = (bits / 8) as usize;
        let at = index as usize * bytes;
        let be = value.to_be_bytes();
        block[at..at + bytes].copy_from_slice(&be[8 - bytes..]);
    }
}

/// The largest refcount representable with `1 << refcount_order` bits.
pub fn max_refcount(refcount_order: u32) -> u64 {
    if refcount_order >= 6 { u64::MAX } else { (1u64 << (1u32 << refcount_order)) - 1 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_every_width() {
        for order in 0..=6u32 {
            let mut block = vec![0u8; 512];
            let entries = (512 * 8) >> order;
            let max = max_refcount(order);
            for i in 0..entries {
                set(&mut block, i, order, (i * 7919) & max);
            }
            for i in 0..entries {
                assert_eq!(get(&block, i, order), (i * 7919) & max, "order {order} index {i}");
            }
        }
    }

    #[test]
    fn sub_byte_is_lsb_first() {
        let block = [0b0000_0010u8, 0];
        assert_eq!(get(&block, 1, 0), 1);
        assert_eq!(get(&block, 0, 1), 2);
        assert_eq!(locate(5, 9, 4), (0, 5));
        assert_eq!(locate(256, 9, 4), (1, 0));
    }
}
