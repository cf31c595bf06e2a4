//! `qcow2::check` against `qemu-img check --output=json`: images made by QEMU (clean),
//! images edited to leak or corrupt, and `repair_leaks` followed by `qemu-img check`.

mod read_support;

use std::path::Path;
use std::process::Command;

use qcow2::check::{CheckResult, check, check_file, repair_leaks};
use qcow2::storage::{FileOptions, FileStorage, Locking};
use read_support::*;
use testkit::serde_json::{self, Value};

/// `qemu-img check --output=json` (which exits non-zero when it finds problems).
fn qemu_check(p: &Path) -> Value {
    try_qemu_check(p).unwrap_or_else(|e| panic!("{e}"))
}

/// `qemu-img check --output=json`, or why it gave no result (it cannot open images
/// whose metadata it refuses, e.g. invalid bitmap tables).
fn try_qemu_check(p: &Path) -> Result<Value, String> {
    let out = Command::new(testkit::require_tool("qemu-img"))
        .args(["check", "--output=json", &p.display().to_string()])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&out.stderr)))
}

fn key(v: &Value, k: &str) -> u64 {
    v.get(k).map_or(0, |x| x.as_u64().unwrap())
}

/// Opens `p` without taking locks: with tests running in parallel threads, a file
/// descriptor of this thread can be inherited for a moment by a `qemu-img` another
/// thread starts, and its lock with it.
fn unlocked(p: &Path, writable: bool) -> FileStorage {
    FileOptions::new().write(writable).locking(Locking::Off).open(p).unwrap()
}

/// `check` on the file, with `filename` set as `check_file` sets it.
fn ours(p: &Path) -> CheckResult {
    let mut r = check(&unlocked(p, false)).unwrap();
    r.filename = p.display().to_string();
    r
}

/// Checks with both and compares every count; returns ours.
fn assert_check_like_qemu(p: &Path) -> CheckResult {
    let q = qemu_check(p);
    let ours = ours(p);
    let got = [
        ("check-errors", ours.check_errors),
        ("leaks", ours.leaks),
        ("corruptions", ours.corruptions),
        ("image-end-offset", ours.image_end_offset),
        ("total-clusters", ours.total_clusters),
        ("allocated-clusters", ours.allocated_clusters),
        ("fragmented-clusters", ours.fragmented_clusters),
        ("compressed-clusters", ours.compressed_clusters),
    ];
    for (k, v) in got {
        if v != key(&q, k) {
            let _ = std::fs::copy(p, std::env::temp_dir().join("check_interop_failed.qcow2"));
            let human = Command::new(testkit::require_tool("qemu-img"))
                .args(["check", &p.display().to_string()])
                .output()
                .unwrap();
            panic!(
                "{}: `{k}` differs; qemu: {q}\n{}\nours: {ours:#?}",
                p.display(),
                String::from_utf8_lossy(&human.stderr) + String::from_utf8_lossy(&human.stdout)
            );
        }
    }
    assert_eq!(ours.format, "qcow2");
    assert_eq!(ours.filename, p.display().to_string());
    ours
}

fn scribble(p: &Path) {
    io(
        "qcow2",
        p,
        &[
            "write -P 0x11 0 1k",
            "write -P 0x22 3000 70000",
            "write -P 0x33 1M 1536k",
            "write -z 1280k 256k",
            "write -P 0x44 7000k 12345",
            "discard 2M 64k",
            "write -c -P 0x55 4M 2M",
        ],
    );
}

#[test]
fn qemu_images_check_clean_with_the_same_counts() {
    let d = Dir::new();
    let mut n = 0;
    let mut make = |opts: &str| {
        n += 1;
        let p = d.path(&format!("i{n}.qcow2"));
        create(&p, "8M", opts, None);
        p
    };
    for opts in [
        "",
        "cluster_size=512",
        "cluster_size=4096",
        "cluster_size=2M",
        "refcount_bits=1",
        "refcount_bits=2",
        "refcount_bits=4",
        "refcount_bits=8",
        "refcount_bits=32",
        "refcount_bits=64",
        "cluster_size=512,refcount_bits=64",
        "compat=0.10",
        "compression_type=zstd",
    ] {
        let p = make(opts);
        let r = assert_check_like_qemu(&p);
        assert!(r.is_clean());
        scribble(&p);
        let r = assert_check_like_qemu(&p);
        assert!(r.is_clean(), "{opts}: {r:#?}");
        assert!(r.allocated_clusters > 0 && r.compressed_clusters > 0, "{opts}");
    }
}

#[test]
fn snapshots_backing_and_bitmaps() {
    let d = Dir::new();
    let p = d.path("s.qcow2");
    create(&p, "8M", "", None);
    scribble(&p);
    img(&["snapshot", "-c", "one", &p.display().to_string()]);
    io("qcow2", &p, &["write -P 0x66 0 256k", "write -c -P 0x67 6M 64k", "discard 1M 64k"]);
    img(&["snapshot", "-c", "two", &p.display().to_string()]);
    io("qcow2", &p, &["write -P 0x68 64k 64k"]);
    assert!(assert_check_like_qemu(&p).is_clean());
    img(&["snapshot", "-d", "one", &p.display().to_string()]);
    assert!(assert_check_like_qemu(&p).is_clean());

    let o = d.path("o.qcow2");
    create(&o, "8M", "cluster_size=4096", Some((&p, "qcow2")));
    io("qcow2", &o, &["write -P 0x70 100k 300k"]);
    assert!(assert_check_like_qemu(&o).is_clean());

    let b = d.path("b.qcow2");
    create(&b, "64M", "", None);
    let bs = b.display().to_string();
    img(&["bitmap", "--add", &bs, "bm0"]);
    img(&["bitmap", "--add", "-g", "512", &bs, "bm1"]);
    io("qcow2", &b, &["write -P 1 0 1M", "write -P 2 30M 5M"]);
    img(&["bitmap", "--add", &bs, "bm2"]);
    io("qcow2", &b, &["write -P 3 60M 1M"]);
    let r = assert_check_like_qemu(&b);
    assert!(r.is_clean(), "{r:#?}");
    assert!(qcow2::Qcow2Image::open_path(&b, false).unwrap().autoclear_features() & 1 == 1);
}

/// Edits `p` at `offset` with a big-endian value of `width` bytes.
fn poke(p: &Path, offset: u64, width: usize, value: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(&value.to_be_bytes()[8 - width..], offset).unwrap();
}

/// An 4 MiB image with clusters at: 0 header, 1 reftable, 2 refblock, 3 L1, 4 L2,
/// 5-6 guest 0-1, 7 guest 16, 8 guest 8 (as qemu-io allocates them).
fn base(d: &Dir, name: &str) -> std::path::PathBuf {
    let p = d.path(name);
    create(&p, "4M", "", None);
    io("qcow2", &p, &["write -P 1 0 128k", "write -P 2 1M 64k", "write -P 3 512k 64k"]);
    p
}

/// An edit: (file offset, width in bytes, big-endian value).
type Edit = (u64, usize, u64);

#[test]
fn leaks_and_corruptions_count_like_qemu() {
    let d = Dir::new();
    let cases: Vec<(&str, Vec<Edit>, Option<u64>)> = vec![
        ("leak_refcount_2", vec![(0x20010, 2, 2)], None),
        ("leak_beyond_eof_clean", vec![(0x20018, 2, 1)], None),
        ("leak_at_end", vec![(0x20012, 2, 1)], Some(0xa0000)),
        ("refcount_too_low", vec![(0x2000a, 2, 0)], None),
        ("header_refcount_0", vec![(0x20000, 2, 0)], None),
        ("refblock_refcount_3", vec![(0x20004, 2, 3)], None),
        ("l2_not_copied", vec![(0x40000, 8, 0x50000)], None),
        ("l2_unaligned", vec![(0x40000, 8, 0x8000_0000_0005_0200)], None),
        ("l2_past_end", vec![(0x40000, 8, 0x8000_0000_0010_0000)], None),
        ("l2_past_end_partial", vec![(0x40000, 8, 0x8000_0000_0009_0000)], Some(0x90100)),
        ("l1_not_copied", vec![(0x30000, 8, 0x40000)], None),
        ("l1_unaligned", vec![(0x30000, 8, 0x8000_0000_0004_0200)], None),
        ("l1_past_end", vec![(0x30000, 8, 0x8000_0000_0100_0000)], None),
        ("double_reference", vec![(0x40008, 8, 0x8000_0000_0005_0000)], None),
        ("refblock_unaligned", vec![(0x10008, 8, 0x20200)], None),
        ("refblock_outside", vec![(0x10008, 8, 0x1000_0000)], None),
        ("zero_alloc_clean", vec![(0x40000, 8, 0x8000_0000_0005_0001)], None),
        ("compressed_copied", vec![(0x40000, 8, 0xc000_0000_0005_0000)], None),
    ];
    let mut failures = vec![];
    for (name, edits, len) in cases {
        let p = base(&d, &format!("{name}.qcow2"));
        if let Some(len) = len {
            std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(len).unwrap();
        }
        for (off, w, v) in edits {
            poke(&p, off, w, v);
        }
        let r = std::panic::catch_unwind(|| assert_check_like_qemu(&p));
        match r {
            Ok(r) => assert!(!r.is_clean() || name.ends_with("clean"), "{name}"),
            Err(_) => failures.push(name),
        }
    }
    assert!(failures.is_empty(), "differ from qemu-img check: {failures:?}");
}

#[test]
fn repair_leaks_then_qemu_check_is_clean() {
    let d = Dir::new();
    for (i, rb) in ["16", "2", "64"].into_iter().enumerate() {
        let p = d.path(&format!("r{i}.qcow2"));
        create(&p, "4M", &format!("refcount_bits={rb}"), None);
        io("qcow2", &p, &["write -P 1 0 128k", "write -P 2 1M 64k"]);
        // Leak: make a snapshot and drop its entry from the header (the snapshot's
        // clusters and the raised refcounts stay).
        img(&["snapshot", "-c", "s", &p.display().to_string()]);
        poke(&p, 60, 4, 0);
        let before = assert_check_like_qemu(&p);
        assert!(before.leaks > 0, "{before:#?}");
        let storage = unlocked(&p, true);
        let after = repair_leaks(&storage).unwrap();
        drop(storage);
        assert_eq!(after.leaks_fixed, before.leaks);
        assert_eq!(after.leaks, 0);
        let q = qemu_check(&p);
        assert_eq!(key(&q, "leaks"), 0, "{q}");
        // COPIED flags are not repaired by `-r leaks`.
        assert_eq!(key(&q, "corruptions"), after.corruptions, "{q}");
        assert_check_like_qemu(&p);
    }
    // A plain leak is repaired completely.
    let p = base(&d, "plain.qcow2");
    poke(&p, 0x20010, 2, 3);
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(0xa0000).unwrap();
    poke(&p, 0x20012, 2, 1);
    let storage = unlocked(&p, true);
    let after = repair_leaks(&storage).unwrap();
    drop(storage);
    assert!(after.leaks_fixed == 2 && after.is_clean(), "{after:#?}");
    assert!(assert_check_like_qemu(&p).is_clean());
}

/// Sets the stored refcount of host cluster `cluster` of the image file `p`.
fn set_refcount(p: &Path, cluster: u64, value: u64) {
    let storage = unlocked(p, true);
    let len = qcow2::storage::Storage::len(&storage).unwrap();
    let h = qcow2::image::read_header(&storage, len).unwrap();
    let (ti, bi) = qcow2::refcount::locate(cluster, h.cluster_bits, h.refcount_order);
    let mut e = [0u8; 8];
    let at = h.refcount_table_offset + ti * 8;
    qcow2::storage::Storage::read_at(&storage, &mut e, at).unwrap();
    let block = u64::from_be_bytes(e) & qcow2::refcount::REFTABLE_OFFSET_MASK;
    if block == 0 || !block.is_multiple_of(h.cluster_size()) || block >= len {
        return; // an earlier edit moved the block
    }
    let mut data = vec![0u8; h.cluster_size() as usize];
    qcow2::storage::Storage::read_at(&storage, &mut data, block).unwrap();
    let max = qcow2::refcount::max_refcount(h.refcount_order);
    qcow2::refcount::set(&mut data, bi, h.refcount_order, value.min(max));
    qcow2::storage::Storage::write_at(&storage, &data, block).unwrap();
}

/// Random refcount edits on images with snapshots, compressed clusters and bitmaps:
/// the same leak and corruption counts as `qemu-img check`, and `repair_leaks` leaves
/// exactly the corruptions.
#[test]
fn random_refcount_edits_count_like_qemu() {
    let d = Dir::new();
    let mut rng = testkit::SplitMix64(31337);
    for (n, opts) in [
        "cluster_size=4096",
        "cluster_size=512,refcount_bits=8",
        "refcount_bits=64",
        "compat=0.10,cluster_size=1024",
    ]
    .into_iter()
    .enumerate()
    {
        let p = d.path(&format!("base{n}.qcow2"));
        create(&p, "4M", opts, None);
        let ps = p.display().to_string();
        let v2 = opts.contains("compat=0.10");
        if !v2 {
            img(&["bitmap", "--add", &ps, "bm"]);
        }
        io("qcow2", &p, &["write -P 1 0 200k", "write -c -P 2 1M 64k"]);
        img(&["snapshot", "-c", "one", &ps]);
        io("qcow2", &p, &["write -P 3 16k 64k", "write -P 4 3M 100k"]);
        let clusters = std::fs::metadata(&p)
            .unwrap()
            .len()
            .div_ceil(qcow2::Qcow2Image::open_path(&p, false).unwrap().cluster_size());
        let image = qcow2::Qcow2Image::open_path(&p, false).unwrap();
        let cs = image.cluster_size();
        let h = image.header();
        let l2_tables: Vec<u64> = image
            .l1_table()
            .iter()
            .map(|e| e & qcow2::l2::OFFSET_MASK)
            .filter(|&o| o != 0)
            .collect();
        // Entries of the snapshot's L1 table, and of the bitmap tables.
        let snap = &image.snapshots()[0];
        let snap_l1 = (snap.l1_table_offset, u64::from(snap.l1_size));
        let storage = unlocked(&p, false);
        let bitmap_tables: Vec<(u64, u64)> = match h.bitmaps_extension() {
            None => vec![],
            Some(ext) => {
                let ext = qcow2::bitmaps::BitmapsExtension::parse(ext, cs).unwrap();
                qcow2::bitmaps::read_directory(&storage, &ext, cs, image.virtual_size())
                    .unwrap()
                    .iter()
                    .map(|e| (e.table_offset, u64::from(e.table_size)))
                    .collect()
            }
        };
        drop(storage);
        drop(image);
        for k in 0..80 {
            let q = d.path(&format!("e{n}_{k}.qcow2"));
            std::fs::copy(&p, &q).unwrap();
            let mut reftable_edited = false;
            for _ in 0..1 + rng.up_to(3) {
                if rng.up_to(1) == 0 {
                    set_refcount(&q, rng.up_to(clusters - 1), rng.up_to(3));
                    continue;
                }
                // Edit an entry of an active L2 table, of the L1 table or of the
                // refcount table.
                let (at, l1) = match rng.up_to(7) {
                    5 => (snap_l1.0 + 8 * rng.up_to(snap_l1.1 - 1), true),
                    6 if !bitmap_tables.is_empty() => {
                        let (t, n) =
                            bitmap_tables[rng.up_to(bitmap_tables.len() as u64 - 1) as usize];
                        (t + 8 * rng.up_to(n - 1), true)
                    }
                    0..=2 => {
                        let table = l2_tables[rng.up_to(l2_tables.len() as u64 - 1) as usize];
                        (table + 8 * rng.up_to(cs / 8 - 1), false)
                    }
                    3 => (h.l1_table_offset + 8 * rng.up_to(u64::from(h.l1_size) - 1), true),
                    _ => {
                        reftable_edited = true;
                        (h.refcount_table_offset + 8 * rng.up_to(2), true)
                    }
                };
                let mut e = [0u8; 8];
                use std::os::unix::fs::FileExt;
                std::fs::File::open(&q).unwrap().read_exact_at(&mut e, at).unwrap();
                let old = u64::from_be_bytes(e);
                let new = match rng.up_to(4) {
                    0 => old ^ (1 << 63),
                    1 => (1 << 63) | (rng.up_to(clusters + 2) * cs),
                    2 => rng.up_to(clusters + 2) * cs,
                    3 if l1 => old | 0x200,
                    3 => old | 0x100,
                    _ => old ^ 1,
                };
                poke(&q, at, 8, new);
            }
            if try_qemu_check(&q).is_err() {
                continue;
            }
            let before = assert_check_like_qemu(&q);
            if reftable_edited {
                // Repairing through misplaced refcount blocks rewrites whatever they
                // point at, as QEMU would.
                continue;
            }
            let storage = unlocked(&q, true);
            let after = repair_leaks(&storage).unwrap();
            drop(storage);
            assert_eq!(after.leaks_fixed, before.leaks);
            assert_eq!(after.leaks, 0);
            let r = assert_check_like_qemu(&q);
            assert_eq!(r.corruptions, after.corruptions);
        }
    }
}

/// The LUKS header of an encrypted image is referenced by the crypto extension; an
/// image with extended L2 entries is refused rather than miscounted.
#[test]
fn encrypted_and_unsupported_layouts() {
    let d = Dir::new();
    let p = d.path("enc.qcow2");
    let ps = p.display().to_string();
    let secret = "secret,id=sec0,data=123456";
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        secret,
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        &ps,
        "4M",
    ]);
    let opts = format!("driver=qcow2,file.filename={ps},encrypt.key-secret=sec0");
    testkit::qemu_io(["--object", secret, "--image-opts", &opts, "-c", "write -P 1 0 100k"])
        .unwrap();
    let q: Value = serde_json::from_str(&img(&[
        "check",
        "--output=json",
        "--object",
        secret,
        "--image-opts",
        &opts,
    ]))
    .unwrap();
    let ours = check_file(&p).unwrap();
    assert!(ours.is_clean(), "{ours:#?}");
    assert_eq!(ours.image_end_offset, key(&q, "image-end-offset"));
    assert_eq!(ours.allocated_clusters, key(&q, "allocated-clusters"));

    let x = d.path("x.qcow2");
    create(&x, "4M", "extended_l2=on", None);
    assert!(matches!(check_file(&x), Err(qcow2::Qcow2Error::UnsupportedFeature { bit: 4, .. })));
}
