//! The bitmaps extension and directory parsers on arbitrary bytes: the first 24 bytes
//! are the extension's data, the rest the directory; then, for each entry that parses,
//! its table and data as if the input were the image file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2::bitmaps::{self, BitmapsExtension};
use qcow2::storage::MemStorage;

fuzz_target!(|data: &[u8]| {
    if data.len() < bitmaps::EXTENSION_LEN {
        return;
    }
    let (ext_bytes, rest) = data.split_at(bitmaps::EXTENSION_LEN);
    let cluster_size = 512;
    let disk_len = 64 << 20;
    let Ok(mut ext) = BitmapsExtension::parse(ext_bytes, cluster_size) else { return };
    // Point the directory at the rest of the input, placed at one cluster in.
    ext.directory_offset = cluster_size;
    ext.directory_size = ext.directory_size.min(rest.len() as u64);
    let mut image = vec![0u8; cluster_size as usize];
    image.extend_from_slice(rest);
    let storage = MemStorage::from_bytes(image);
    let Ok(entries) = bitmaps::read_directory(&storage, &ext, cluster_size, disk_len) else {
        return;
    };
    for entry in &entries {
        let _ = bitmaps::load_bitmap(&storage, entry, cluster_size, disk_len);
    }
});
