//! The bitmaps extension as QEMU writes it: directories, flags and data read back
//! identically (SHA-256 equal to qemu-storage-daemon's), and corrupted directories give
//! errors that name the bitmap.

use std::path::Path;
use std::sync::Arc;

use hbitmap::HBitmap;
use qcow2::bitmaps::{self, BitmapsExtension, DirectoryEntry};
use qcow2::header::EXT_BITMAPS;
use qcow2::storage::{FileStorage, MemStorage, Storage};
use qcow2::{OpenOptions, Qcow2Image};
use testkit::qsd::StorageDaemon;
use testkit::serde_json::json;
use testkit::{SplitMix64, qemu_img, qemu_io};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

fn open(storage: Arc<dyn Storage>) -> Qcow2Image {
    Qcow2Image::open(storage, OpenOptions { ignore_backing: true, ..Default::default() }).unwrap()
}

/// The directory of an image, parsed.
fn directory(storage: &dyn Storage, image: &Qcow2Image) -> Result<Vec<DirectoryEntry>, String> {
    let header = image.header();
    let data = header.extension(EXT_BITMAPS).ok_or("no bitmaps extension")?;
    let ext = BitmapsExtension::parse(data, image.cluster_size()).map_err(|e| e.to_string())?;
    bitmaps::read_directory(storage, &ext, image.cluster_size(), image.virtual_size())
        .map_err(|e| e.to_string())
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn qemu_img_bitmaps_load_with_their_flags_and_bits() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d7.qcow2");
    let img_s = path_str(&img);
    qemu_img(["create", "-q", "-f", "qcow2", img_s, "64M"]).unwrap();
    qemu_img(["bitmap", "--add", img_s, "bitmap0"]).unwrap();
    qemu_img(["bitmap", "--add", "-g", "1M", img_s, "disabled1"]).unwrap();
    qemu_img(["bitmap", "--disable", img_s, "disabled1"]).unwrap();
    qemu_io(["-f", "qcow2", "-c", "write 576k 64k", "-c", "write 0 512", img_s]).unwrap();

    let storage: Arc<dyn Storage> = Arc::new(FileStorage::open(&img, false).unwrap());
    let image = open(storage.clone());
    let entries = directory(storage.as_ref(), &image).unwrap();
    let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["bitmap0", "disabled1"], "on-disk order");
    assert!(entries[0].auto() && !entries[0].in_use());
    assert!(!entries[1].auto() && !entries[1].in_use());
    assert_eq!((entries[0].granularity(), entries[1].granularity()), (65536, MIB));
    assert_eq!(entries[0].encoded_len() + entries[1].encoded_len(), 32 + 40);

    let bm0 = bitmaps::load_bitmap(storage.as_ref(), &entries[0], 65536, 64 * MIB).unwrap();
    let runs: Vec<_> = bm0.dirty_runs(0).collect();
    assert_eq!(runs, vec![0..65536, 9 * 65536..10 * 65536]);
    let bm1 = bitmaps::load_bitmap(storage.as_ref(), &entries[1], 65536, 64 * MIB).unwrap();
    assert!(bm1.is_empty());

    // Encoding the loaded entries gives QEMU's bytes back.
    let ext = BitmapsExtension::parse(image.header().extension(EXT_BITMAPS).unwrap(), 65536);
    let ext = ext.unwrap();
    let mut on_disk = vec![0u8; ext.directory_size as usize];
    storage.read_at(&mut on_disk, ext.directory_offset).unwrap();
    let mut encoded = Vec::new();
    entries.iter().for_each(|e| e.encode(&mut encoded));
    assert_eq!(encoded, on_disk);
    assert_eq!(ext.to_bytes().as_slice(), image.header().extension(EXT_BITMAPS).unwrap());
    // And the data clusters: only the dirty one, byte for byte.
    let table = bitmaps::read_table(storage.as_ref(), &entries[0], 65536).unwrap();
    let clusters = bitmaps::encode_clusters(&bm0, 65536).unwrap();
    assert_eq!(clusters.len(), table.len());
    let mut cluster = vec![0u8; 65536];
    storage.read_at(&mut cluster, table[0] & bitmaps::TABLE_OFFSET).unwrap();
    assert_eq!(clusters[0].as_deref(), Some(&cluster[..]));
}

/// Bitmaps at many granularities, written by qemu-io, load with the same SHA-256 that
/// qemu-storage-daemon reports for them.
#[test]
fn loaded_bitmaps_hash_like_qemu_storage_daemon() {
    let size = 100 * MIB + 7 * 64 * KIB + 1536;
    let granularities = [512u64, 4 * KIB, 64 * KIB, 2 * MIB, 1 << 30];
    let builder = StorageDaemon::qemu();
    let img = builder.path("disk.qcow2");
    let img_s = path_str(&img).to_string();
    qemu_img(["create", "-q", "-f", "qcow2", &img_s, &size.to_string()]).unwrap();
    for g in granularities {
        qemu_img(["bitmap", "--add", "-g", &g.to_string(), &img_s, &format!("b{g}")]).unwrap();
    }
    let mut rng = SplitMix64(7);
    let mut args = vec!["-f".to_string(), "qcow2".to_string()];
    let mut expected: Vec<HBitmap> =
        granularities.iter().map(|g| HBitmap::new(size, g.trailing_zeros()).unwrap()).collect();
    for _ in 0..150 {
        let len = 1 + rng.up_to(300 * KIB);
        let offset = rng.up_to(size - len);
        args.extend(["-c".to_string(), format!("write -q {offset} {len}")]);
        expected.iter_mut().for_each(|b| b.set(offset, len).unwrap());
    }
    args.extend(["-c".to_string(), format!("write -q {} 1", size - 1), img_s.clone()]);
    expected.iter_mut().for_each(|b| b.set(size - 1, 1).unwrap());
    qemu_io(&args).unwrap();

    let storage: Arc<dyn Storage> = Arc::new(FileStorage::open(&img, false).unwrap());
    let image = open(storage.clone());
    let entries = directory(storage.as_ref(), &image).unwrap();
    let mut ours = Vec::new();
    for (g, want) in granularities.iter().zip(&expected) {
        let entry = entries.iter().find(|e| e.name == format!("b{g}")).unwrap();
        let bitmap =
            bitmaps::load_bitmap(storage.as_ref(), entry, image.cluster_size(), size).unwrap();
        assert_eq!(bitmap.sha256_hex(), want.sha256_hex(), "granularity {g}");
        ours.push(bitmap.sha256_hex());
    }
    drop(image);
    drop(storage);

    let mut daemon = builder
        .arg("--blockdev")
        .arg(format!("driver=file,node-name=file0,filename={img_s}"))
        .arg("--blockdev")
        .arg("driver=qcow2,node-name=disk0,file=file0,read-only=on")
        .start()
        .unwrap();
    for (g, sha) in granularities.iter().zip(&ours) {
        let reply = daemon.execute_ok(
            "x-debug-block-dirty-bitmap-sha256",
            json!({"node": "disk0", "name": format!("b{g}")}),
        );
        assert_eq!(reply["sha256"].as_str(), Some(sha.as_str()), "granularity {g}");
    }
}

#[test]
fn a_killed_writer_leaves_bitmaps_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    let img_s = path_str(&img);
    qemu_img(["create", "-q", "-f", "qcow2", img_s, "16M"]).unwrap();
    qemu_img(["bitmap", "--add", img_s, "b"]).unwrap();
    // qemu-io aborts without storing: the bitmap stays marked in use.
    let _ = std::process::Command::new(testkit::require_tool("qemu-io"))
        .args(["-f", "qcow2", "-c", "write 0 64k", "-c", "abort", img_s])
        .output()
        .unwrap();
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::open(&img, false).unwrap());
    let image = open(storage.clone());
    let entries = directory(storage.as_ref(), &image).unwrap();
    assert!(entries[0].in_use(), "{:?}", entries[0]);
}

/// A valid image with two bitmaps, in memory, and where its pieces are.
struct Layout {
    bytes: Vec<u8>,
    /// Offset of the bitmaps extension's data in the file.
    ext_at: usize,
    /// Offset of the directory.
    dir_at: usize,
}

fn layout() -> Layout {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("c.qcow2");
    let img_s = path_str(&img);
    qemu_img(["create", "-q", "-f", "qcow2", img_s, "64M"]).unwrap();
    qemu_img(["bitmap", "--add", img_s, "alpha"]).unwrap();
    qemu_img(["bitmap", "--add", img_s, "beta"]).unwrap();
    qemu_io(["-f", "qcow2", "-c", "write 1M 64k", img_s]).unwrap();
    let bytes = std::fs::read(&img).unwrap();
    // Header extensions start at header_length (bytes 100..104).
    let mut at = u32::from_be_bytes(bytes[100..104].try_into().unwrap()) as usize;
    loop {
        let ty = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
        let len = u32::from_be_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        assert_ne!(ty, 0, "no bitmaps extension");
        if ty == EXT_BITMAPS {
            let ext_at = at + 8;
            let dir_at = u64::from_be_bytes(bytes[ext_at + 16..ext_at + 24].try_into().unwrap());
            return Layout { bytes, ext_at, dir_at: dir_at as usize };
        }
        at += 8 + len.next_multiple_of(8);
    }
}

fn put_be32(bytes: &mut [u8], at: usize, v: u32) {
    bytes[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put_be64(bytes: &mut [u8], at: usize, v: u64) {
    bytes[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

#[test]
fn corrupted_directories_give_clear_errors_and_change_nothing() {
    let base = layout();
    // The second entry starts after "alpha" (24 + 5 bytes, padded to 32).
    let second = base.dir_at + 32;
    let ext = base.ext_at;
    let file_end = base.bytes.len() as u64;
    type Corrupt = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Corrupt, &str)> = vec![
        (
            "more entries than counted",
            Box::new(move |b| put_be32(b, ext, 1)),
            "More bitmaps found than specified in header extension",
        ),
        (
            "fewer entries than counted",
            Box::new(move |b| put_be32(b, ext, 3)),
            "Less bitmaps found than specified in header extension",
        ),
        (
            "zero bitmaps",
            Box::new(move |b| put_be32(b, ext, 0)),
            "found bitmaps extension with zero bitmaps",
        ),
        (
            "directory offset out of the file",
            Box::new(move |b| put_be64(b, ext + 16, file_end.next_multiple_of(65536) + 65536)),
            "past the end of the file",
        ),
        (
            "unaligned directory offset",
            Box::new(move |b| put_be64(b, ext + 16, 4096 + 8)),
            "invalid bitmap directory offset",
        ),
        (
            "name length overflowing the entry",
            Box::new(move |b| b[second + 18..second + 20].copy_from_slice(&60000u16.to_be_bytes())),
            "Broken bitmap directory: entry 1 (name 'beta",
        ),
        (
            "table pointing outside the file",
            Box::new(move |b| put_be64(b, second, file_end.next_multiple_of(65536) * 4)),
            "for bitmap 'beta'",
        ),
        (
            "duplicate names",
            Box::new(move |b| b[second + 24..second + 28].copy_from_slice(b"alph")),
            "",
        ),
        (
            "reserved flag",
            Box::new(move |b| put_be32(b, second + 12, 1 << 5)),
            "Bitmap 'beta' doesn't satisfy the constraints",
        ),
        (
            "extra data",
            Box::new(move |b| put_be32(b, second + 20, 8)),
            "Bitmap extra data is not supported",
        ),
        (
            "granularity out of range",
            Box::new(move |b| b[second + 17] = 40),
            "Bitmap 'beta' doesn't satisfy the constraints",
        ),
    ];
    for (what, corrupt, text) in cases {
        let mut bytes = base.bytes.clone();
        corrupt(&mut bytes);
        if what == "duplicate names" {
            // "beta" -> "alph" + "a" would need 5 bytes; use the same length instead.
            bytes[second + 18..second + 20].copy_from_slice(&5u16.to_be_bytes());
            bytes[second + 24..second + 29].copy_from_slice(b"alpha");
        }
        let mem = Arc::new(MemStorage::from_bytes(bytes.clone()));
        let image = open(mem.clone());
        let mut err = directory(mem.as_ref(), &image).err();
        if err.is_none() {
            // The directory parses; the table is what is broken.
            let entries = directory(mem.as_ref(), &image).unwrap();
            err = entries
                .iter()
                .map(|e| bitmaps::load_bitmap(mem.as_ref(), e, 65536, 64 * MIB))
                .find_map(|r| r.err())
                .map(|e| e.to_string());
        }
        let err = err.unwrap_or_else(|| panic!("{what}: no error"));
        let text = if what == "duplicate names" { "Bitmap 'alpha' appears twice" } else { text };
        assert!(err.contains(text), "{what}: {err}");
        assert_eq!(mem.to_bytes(), bytes, "{what}: the image changed");
    }
}
