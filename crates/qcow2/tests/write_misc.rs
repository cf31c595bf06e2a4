//! Smaller write-path behaviours: resize (with and without moving the L1 table),
//! autoclear bits, read-only and out-of-range refusals, QEMU's mapping after discards
//! and zero writes, refcount block allocation with every refcount width.

mod write_support;

use std::path::Path;

use qcow2::l2::ClusterMapping;
use qcow2::{Qcow2Error, Qcow2Image};
use testkit::serde_json::{self, Value};
use write_support::*;

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn map(p: &Path) -> Vec<Value> {
    let out = img(&["map", "--output=json", "-f", "qcow2", &s(p)]);
    serde_json::from_str(&out).unwrap()
}

#[test]
fn resize_grows_and_moves_l1() {
    for (cs, new) in [(512u64, 64u64 << 20), (65536, 1 << 30), (65536, 300 << 30)] {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("r.qcow2");
        create(&p, 1 << 20, &format!("cluster_size={cs}"), None);
        let image = Qcow2Image::open_path(&p, true).unwrap();
        image.write_at(&pattern(1, 5000), 1000).unwrap();
        let old_l1 = image.header().l1_table_offset;
        image.resize(new).unwrap();
        assert_eq!(image.virtual_size(), new);
        image.write_at(&pattern(2, 7000), new - 7000).unwrap();
        let moved = image.header().l1_table_offset != old_l1;
        image.close().unwrap();
        assert_clean(&p, &format!("cs {cs} resize to {new}"));
        let info: Value =
            serde_json::from_str(&img(&["info", "--output=json", "-f", "qcow2", &s(&p)])).unwrap();
        assert_eq!(info["virtual-size"].as_u64(), Some(new));
        let image = Qcow2Image::open_path(&p, false).unwrap();
        let mut a = vec![0u8; 5000];
        image.read_at(&mut a, 1000).unwrap();
        assert_eq!(a, pattern(1, 5000));
        let mut b = vec![0u8; 7000];
        image.read_at(&mut b, new - 7000).unwrap();
        assert_eq!(b, pattern(2, 7000));
        if cs == 512 || new > 100 << 30 {
            assert!(moved, "cs {cs}: the L1 table had to move");
        }
        assert!(image.resize(new).is_err(), "read-only resize");
    }
}

/// A stored bitmap nobody loaded (not in use) would keep a table for the old size,
/// which QEMU then refuses to open: the resize is refused until it is marked in use.
#[test]
fn resize_with_unloaded_bitmaps_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("b.qcow2");
    create(&p, 1 << 20, "", None);
    img(&["bitmap", "--add", &s(&p), "b0"]);
    let image = Qcow2Image::open_path(&p, true).unwrap();
    let err = image.resize(4 << 20).unwrap_err();
    assert_eq!(
        err.to_string(),
        "unsupported request: resizing an image with persistent bitmaps that were not loaded (not in use)"
    );
    assert_eq!(image.virtual_size(), 1 << 20);
    // Loaded and marked in use (as the block layer does at a writable open): allowed.
    let header = image.header();
    let ext = qcow2::bitmaps::BitmapsExtension::parse(
        header.extension(qcow2::header::EXT_BITMAPS).unwrap(),
        image.cluster_size(),
    )
    .unwrap();
    let storage = image.storage().clone();
    let mut entries =
        qcow2::bitmaps::read_directory(storage.as_ref(), &ext, image.cluster_size(), 1 << 20)
            .unwrap();
    qcow2::bitmaps::mark_in_use(storage.as_ref(), &ext, &mut entries).unwrap();
    drop(storage);
    image.resize(4 << 20).unwrap();
    image.close().unwrap();
    assert_clean(&p, "resized with an in-use bitmap");
}

#[test]
fn shrinking_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("r.qcow2");
    create(&p, 1 << 20, "", None);
    let image = Qcow2Image::open_path(&p, true).unwrap();
    assert!(matches!(image.resize(1 << 19), Err(Qcow2Error::UnsupportedRequest(_))));
    assert!(matches!(
        image.write_at(&[1, 2, 3], (1 << 20) - 2),
        Err(Qcow2Error::OutOfRange { .. })
    ));
    assert!(matches!(image.write_zeroes(1 << 20, 1, false), Err(Qcow2Error::OutOfRange { .. })));
    image.close().unwrap();
    let ro = Qcow2Image::open_path(&p, false).unwrap();
    assert!(matches!(ro.write_at(&[1], 0), Err(Qcow2Error::ReadOnly)));
    assert!(matches!(ro.discard(0, 65536), Err(Qcow2Error::ReadOnly)));
}

#[test]
fn unknown_autoclear_bits_are_cleared_on_first_write() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("a.qcow2");
    create(&p, 1 << 20, "", None);
    // Set autoclear bits 0 (bitmaps), 1 and 5.
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[88..96].copy_from_slice(&0b10_0011u64.to_be_bytes());
    std::fs::write(&p, &bytes).unwrap();
    let image = Qcow2Image::open_path(&p, true).unwrap();
    assert_eq!(image.autoclear_features(), 0b10_0011);
    image.write_at(b"x", 0).unwrap();
    assert_eq!(image.autoclear_features(), 1);
    image.close().unwrap();
    let bytes = std::fs::read(&p).unwrap();
    assert_eq!(u64::from_be_bytes(bytes[88..96].try_into().unwrap()), 1);
}

#[test]
fn discard_and_zero_map_like_qemu() {
    // The same operations through qemu-io and through the engine give the same map.
    let d = tempfile::tempdir().unwrap();
    let b = d.path().join("b.raw");
    std::fs::write(&b, pattern(3, 1 << 20)).unwrap();
    for (opts, backing) in [("", false), ("", true), ("compat=0.10", false), ("compat=0.10", true)]
    {
        let ours = d.path().join("ours.qcow2");
        let theirs = d.path().join("theirs.qcow2");
        for p in [&ours, &theirs] {
            let _ = std::fs::remove_file(p);
            create(p, 1 << 20, opts, backing.then_some((b.as_path(), "raw")));
        }
        let k = 65536;
        let image = Qcow2Image::open_path(&ours, true).unwrap();
        image.write_at(&[7u8; 512 << 10], 0).unwrap();
        image.discard(0, 2 * k).unwrap();
        image.write_zeroes(2 * k, k, false).unwrap();
        image.write_zeroes(3 * k, k, true).unwrap();
        image.discard(8 * k, k).unwrap();
        image.write_zeroes(9 * k, k, false).unwrap();
        image.close().unwrap();
        let mut args: Vec<String> = vec!["-f".into(), "qcow2".into(), s(&theirs)];
        for c in [
            "write -P 7 0 512k",
            "discard 0 128k",
            "write -z 128k 64k",
            "write -z -u 192k 64k",
            "discard 512k 64k",
            "write -z 576k 64k",
        ] {
            args.push("-c".into());
            args.push(c.into());
        }
        testkit::qemu_io(&args).unwrap();
        let strip = |v: Vec<Value>| -> Vec<(u64, u64, bool, bool, bool, bool)> {
            v.iter()
                .map(|e| {
                    (
                        e["start"].as_u64().unwrap(),
                        e["length"].as_u64().unwrap(),
                        e["present"].as_bool().unwrap(),
                        e["zero"].as_bool().unwrap(),
                        e["data"].as_bool().unwrap(),
                        e.get("offset").is_some(),
                    )
                })
                .collect()
        };
        assert_eq!(strip(map(&ours)), strip(map(&theirs)), "opts {opts:?} backing {backing}");
        assert_clean(&ours, opts);
    }
}

#[test]
fn refcount_blocks_of_every_width() {
    for bits in [1u32, 2, 4, 8, 16, 32, 64] {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("w.qcow2");
        create(&p, 8 << 20, &format!("cluster_size=512,refcount_bits={bits}"), None);
        let image = Qcow2Image::open_path(&p, true).unwrap();
        let data = pattern(u64::from(bits), 3 << 20);
        image.write_at(&data, 4 << 20).unwrap();
        image.write_at(&data[..1000], 100).unwrap();
        assert!(matches!(image.map_cluster(0).unwrap(), ClusterMapping::Data { .. }));
        image.close().unwrap();
        assert_clean(&p, &format!("refcount_bits={bits}"));
        let raw = d.path().join("m.raw");
        let mut model = vec![0u8; 8 << 20];
        model[4 << 20..7 << 20].copy_from_slice(&data);
        model[100..1100].copy_from_slice(&data[..1000]);
        std::fs::write(&raw, &model).unwrap();
        assert_same_as_raw(&p, &raw, &format!("refcount_bits={bits}"));
    }
}
