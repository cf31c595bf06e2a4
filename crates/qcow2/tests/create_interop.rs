//! Images written by `qcow2::create` against `qemu-img create -f qcow2`: byte for byte,
//! `qemu-img check` clean, `qemu-img info` equal, and reading back as zeroes (or as the
//! backing file).

mod read_support;

use std::path::Path;

use qcow2::create::{CreateOptions, create, create_file};
use qcow2::storage::MemStorage;
use read_support::*;
use testkit::serde_json::{self, Value};

fn qemu_create(path: &Path, o: &CreateOptions) {
    let mut opts = vec![format!("cluster_size={}", o.cluster_size)];
    opts.push(format!("refcount_bits={}", o.refcount_bits));
    if o.compat_v2 {
        opts.push("compat=0.10".into());
    }
    let mut args: Vec<String> = vec!["create".into(), "-q".into(), "-f".into(), "qcow2".into()];
    args.push("-o".into());
    args.push(opts.join(","));
    if let Some(b) = &o.backing_file {
        args.push("-b".into());
        args.push(b.clone());
        if let Some(f) = &o.backing_format {
            args.push("-F".into());
            args.push(f.clone());
        }
    }
    args.push(path.display().to_string());
    args.push(o.size.to_string());
    testkit::qemu_img(&args).unwrap();
}

fn json(args: &[&str]) -> Value {
    serde_json::from_str(&img(args)).unwrap()
}

/// `qemu-img info` of both files agree on every key except the file names and sizes
/// on disk.
fn assert_info_equal(a: &Path, b: &Path) {
    let strip = |mut v: Value| {
        let o = v.as_object_mut().unwrap();
        for k in
            ["filename", "actual-size", "children", "backing-filename", "full-backing-filename"]
        {
            o.remove(k);
        }
        v
    };
    let ia = strip(json(&["info", "--output=json", "-U", &a.display().to_string()]));
    let ib = strip(json(&["info", "--output=json", "-U", &b.display().to_string()]));
    assert_eq!(ia, ib, "qemu-img info differs for {} and {}", a.display(), b.display());
}

fn assert_check_clean(p: &Path) {
    let v = json(&["check", "--output=json", &p.display().to_string()]);
    assert_eq!(v["check-errors"], 0, "{}: {v}", p.display());
    assert!(v.get("leaks").is_none() && v.get("corruptions").is_none(), "{}: {v}", p.display());
    // Without locks: a descriptor of this thread may be inherited for a moment by a
    // `qemu-img` another test thread starts.
    let storage =
        qcow2::storage::FileOptions::new().locking(qcow2::storage::Locking::Off).open(p).unwrap();
    let ours = qcow2::check::check(&storage).unwrap();
    assert!(ours.is_clean(), "{}: {ours:?}", p.display());
    assert_eq!(Some(ours.image_end_offset), v["image-end-offset"].as_u64());
}

/// Creates with both and compares; returns whether the bytes are identical.
fn compare(d: &Dir, name: &str, o: CreateOptions) -> bool {
    let ours = d.path(&format!("{name}.ours.qcow2"));
    let theirs = d.path(&format!("{name}.qemu.qcow2"));
    qemu_create(&theirs, &o);
    let storage = qcow2::storage::FileOptions::new()
        .create_new(true)
        .locking(qcow2::storage::Locking::Off)
        .open(&ours)
        .unwrap();
    create(&storage, o.clone()).unwrap();
    drop(storage);
    assert_check_clean(&ours);
    assert_info_equal(&ours, &theirs);
    let a = std::fs::read(&ours).unwrap();
    let b = std::fs::read(&theirs).unwrap();
    if a != b {
        let first = a.iter().zip(&b).position(|(x, y)| x != y);
        eprintln!("{name}: lengths {} / {}, first difference at {first:?}", a.len(), b.len());
    }
    a == b
}

#[test]
fn byte_identical_to_qemu_img_create() {
    let d = Dir::new();
    let mut cases = vec![];
    for size in [0u64, 1, 1000, 1 << 20, 512 << 20, (512 << 20) + 1, 1 << 30, 100 << 30] {
        cases.push((format!("size{size}"), CreateOptions::new(size)));
    }
    for cs in [512u64, 1024, 4096, 8192, 65536, 1 << 20, 2 << 20] {
        for size in [1u64 << 30, 3 << 30] {
            cases.push((
                format!("cs{cs}_{size}"),
                CreateOptions { cluster_size: cs, ..CreateOptions::new(size) },
            ));
        }
    }
    for rb in [1u32, 2, 4, 8, 16, 32, 64] {
        for cs in [512u64, 65536] {
            cases.push((
                format!("rb{rb}_cs{cs}"),
                CreateOptions {
                    refcount_bits: rb,
                    cluster_size: cs,
                    ..CreateOptions::new(1 << 30)
                },
            ));
        }
    }
    cases.push(("v2".into(), CreateOptions { compat_v2: true, ..CreateOptions::new(1 << 30) }));
    cases.push((
        "v2_512".into(),
        CreateOptions { compat_v2: true, cluster_size: 512, ..CreateOptions::new(1 << 30) },
    ));
    let mut failed = vec![];
    for (name, o) in cases {
        if !compare(&d, &name, o) {
            failed.push(name);
        }
    }
    assert!(failed.is_empty(), "differ from qemu-img create: {failed:?}");
}

/// Small clusters with large disks: the refcount table must grow. QEMU's layout is
/// reproduced for the cases below.
#[test]
fn refcount_table_growth() {
    let d = Dir::new();
    let mut failed = vec![];
    for (rb, size) in [
        (16u32, 32u64 << 30),
        (16, 64 << 30),
        (64, 8 << 30),
        (64, 16 << 30),
        (32, 16 << 30),
        (8, 64 << 30),
        (64, 64 << 30),
        (16, 128 << 30),
    ] {
        let o = CreateOptions { refcount_bits: rb, cluster_size: 512, ..CreateOptions::new(size) };
        let name = format!("grow_rb{rb}_{size}");
        if !compare(&d, &name, o) {
            failed.push(name);
        }
    }
    assert!(failed.is_empty(), "differ from qemu-img create: {failed:?}");
}

#[test]
fn backing_files() {
    let d = Dir::new();
    let base = d.path("base.qcow2");
    read_support::create(&base, "4M", "", None);
    io("qcow2", &base, &["write -P 0x5a 0 1M", "write -P 0x33 3M 4k"]);
    let raw = d.path("base.raw");
    std::fs::write(&raw, vec![0x77u8; 4 << 20]).unwrap();
    let mut failed = vec![];
    for (i, (b, f, cs, v2)) in [
        ("base.qcow2", "qcow2", 65536u64, false),
        ("base.raw", "raw", 65536, false),
        ("base.qcow2", "qcow2", 4096, false),
        ("base.qcow2", "qcow2", 512, false),
        ("base.qcow2", "qcow2", 65536, true),
    ]
    .into_iter()
    .enumerate()
    {
        let o = CreateOptions {
            cluster_size: cs,
            compat_v2: v2,
            backing_file: Some(b.to_owned()),
            backing_format: Some(f.to_owned()),
            ..CreateOptions::new(4 << 20)
        };
        let name = format!("overlay{i}");
        // qemu-img resolves the backing name relative to the overlay's directory.
        if !compare(&d, &name, o) {
            failed.push(name.clone());
        }
        let p = d.path(&format!("{name}.ours.qcow2"));
        let image = assert_reads_like_qemu(&p);
        let backing = if f == "raw" { vec![0x77u8; 4 << 20] } else { qemu_contents(&base) };
        assert_eq!(read_all(&image), backing);
    }
    assert!(failed.is_empty(), "differ from qemu-img create: {failed:?}");
}

#[test]
fn new_images_read_as_zeroes_and_accept_qemu_writes() {
    let d = Dir::new();
    let p = d.path("n.qcow2");
    create_file(&p, CreateOptions::new(8 << 20)).unwrap();
    let image = assert_reads_like_qemu(&p);
    assert!(read_all(&image).iter().all(|&b| b == 0));
    drop(image);
    io("qcow2", &p, &["write -P 0x42 1M 3M", "write -c -P 0x43 6M 64k"]);
    assert_check_clean(&p);
    assert_reads_like_qemu(&p);
}

#[test]
fn create_in_memory_and_errors() {
    let m = MemStorage::new();
    m.write_at(&[0xffu8; 4096], 1 << 20).unwrap();
    create(&m, CreateOptions::new(1 << 20)).unwrap();
    assert_eq!(m.len().unwrap(), 0x30008);
    let r = qcow2::check::check(&m).unwrap();
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(r.total_clusters, 16);
    let bad = [
        CreateOptions { cluster_size: 256, ..CreateOptions::new(1) },
        CreateOptions { cluster_size: 3 << 10, ..CreateOptions::new(1) },
        CreateOptions { cluster_size: 4 << 20, ..CreateOptions::new(1) },
        CreateOptions { refcount_bits: 128, ..CreateOptions::new(1) },
        CreateOptions { refcount_bits: 3, ..CreateOptions::new(1) },
        CreateOptions { compat_v2: true, refcount_bits: 8, ..CreateOptions::new(1) },
        CreateOptions { size: u64::MAX, ..CreateOptions::new(1) },
        CreateOptions { cluster_size: 512, ..CreateOptions::new(1 << 40) },
        CreateOptions { backing_file: Some("x".repeat(1024)), ..CreateOptions::new(1) },
        CreateOptions {
            cluster_size: 512,
            backing_file: Some("x".repeat(600)),
            ..CreateOptions::new(1)
        },
        CreateOptions { backing_format: Some("raw".into()), ..CreateOptions::new(1) },
    ];
    for o in bad {
        assert!(create(&MemStorage::new(), o.clone()).is_err(), "{o:?}");
    }
}

use qcow2::storage::Storage;
