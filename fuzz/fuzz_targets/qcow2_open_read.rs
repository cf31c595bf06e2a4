//! Fuzz target: any input, taken as a qcow2 image in memory, must open (or fail to
//! open) read-only, read, report block status and check without panicking, hanging
//! or allocating without bound.

#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use qcow2::storage::{MemStorage, Storage};
use qcow2::{OpenOptions, Qcow2Image};

fuzz_target!(|data: &[u8]| {
    let storage = Arc::new(MemStorage::from_bytes(data.to_vec()));
    // The check works on the raw storage, whether or not the image opens.
    let _ = qcow2::check::check(&*storage);
    let options = OpenOptions { ignore_backing: true, ..OpenOptions::default() };
    let Ok(image) = Qcow2Image::open(Arc::clone(&storage) as Arc<dyn Storage>, options) else {
        return;
    };
    let size = image.virtual_size();
    let cluster = image.cluster_size();
    let mut buf = vec![0u8; 2 * cluster.min(1 << 16) as usize];
    // A few ranges: the start, a cluster boundary, the end, and one chosen by the input.
    let chosen = data
        .get(..8)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or_default()) % size.max(1));
    for offset in [0, cluster.saturating_sub(7), size.saturating_sub(buf.len() as u64), chosen] {
        let len = (buf.len() as u64).min(size.saturating_sub(offset)) as usize;
        if len > 0 {
            let _ = image.read_at(&mut buf[..len], offset);
        }
        if offset < size {
            let _ = image.block_status(offset, size - offset);
        }
    }
    for index in 0..4 {
        let _ = image.map_cluster(index);
    }
});
