//! Images made by QEMU read back as QEMU reads them: cluster sizes, refcount widths,
//! compressed and zero clusters, internal snapshots, v2 images; `block_status` against
//! `qemu-img map`.

mod read_support;

use qcow2::Qcow2Image;
use qcow2::l2::ClusterMapping;
use read_support::*;

/// A mix of writes: partial clusters, unaligned ranges, zero writes, a discard.
fn scribble(path: &std::path::Path) {
    io(
        "qcow2",
        path,
        &[
            "write -P 0x11 0 1k",
            "write -P 0x22 3000 70000",
            "write -P 0x33 1M 1536k",
            "write -z 1280k 256k",
            "write -z 5M 1M",
            "write -P 0x44 7000k 12345",
            "discard 2M 64k",
        ],
    );
}

#[test]
fn cluster_sizes() {
    let d = Dir::new();
    for cs in ["512", "4096", "65536", "2M"] {
        let p = d.path(&format!("cs{cs}.qcow2"));
        create(&p, "8M", &format!("cluster_size={cs}"), None);
        scribble(&p);
        let image = assert_reads_like_qemu(&p);
        assert_eq!(image.cluster_size(), qcow2_size(cs));
        assert_eq!(image.version(), 3);
        check_refcounts(&image);
        assert_map_like_qemu(&p);
    }
}

fn qcow2_size(s: &str) -> u64 {
    if s == "2M" { 2 << 20 } else { s.parse().unwrap() }
}

#[test]
fn zero_clusters_are_zero_flagged_and_read_as_zeroes() {
    let d = Dir::new();
    let p = d.path("z.qcow2");
    create(&p, "4M", "", None);
    io("qcow2", &p, &["write -P 0x5a 0 4M", "write -z 64k 128k", "write -z -u 1M 64k"]);
    let image = assert_reads_like_qemu(&p);
    assert!(matches!(image.map_cluster(1).unwrap(), ClusterMapping::Zero { .. }));
    assert!(matches!(image.map_cluster(2).unwrap(), ClusterMapping::Zero { .. }));
    assert!(matches!(image.map_cluster(16).unwrap(), ClusterMapping::Zero { host: None }));
    let mut buf = vec![1u8; 200_000];
    image.read_at(&mut buf, 60_000).unwrap();
    assert!(buf[..5536].iter().all(|&b| b == 0x5a));
    assert!(buf[5536..5536 + 131072].iter().all(|&b| b == 0));
    assert!(buf[5536 + 131072..].iter().all(|&b| b == 0x5a));
    check_refcounts(&image);
    assert_map_like_qemu(&p);
}

fn compressible_raw(path: &std::path::Path, size: usize) {
    let mut data = vec![0u8; size];
    let mut rng = testkit::SplitMix64(1);
    for (i, b) in data.iter_mut().enumerate() {
        // Runs of text-like bytes, some random clusters, zero gaps.
        let block = i / 40_000;
        *b = match block % 4 {
            0 => b"qcow2 compressed cluster "[i % 25],
            1 => rng.next() as u8,
            2 => 0,
            _ => (i / 7) as u8,
        };
    }
    std::fs::write(path, data).unwrap();
}

#[test]
fn compressed_images() {
    let d = Dir::new();
    let raw = d.path("src.raw");
    compressible_raw(&raw, 3 << 20);
    for cs in ["512", "4096", "65536", "2M"] {
        let p = d.path(&format!("c{cs}.qcow2"));
        img(&[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            &format!("cluster_size={cs}"),
            &raw.display().to_string(),
            &p.display().to_string(),
        ]);
        let image = assert_reads_like_qemu(&p);
        assert_eq!(read_all(&image), std::fs::read(&raw).unwrap());
        let compressed = (0..image.virtual_size().div_ceil(image.cluster_size()))
            .filter(|&c| matches!(image.map_cluster(c).unwrap(), ClusterMapping::Compressed { .. }))
            .count();
        assert!(compressed > 0, "cluster size {cs}: no compressed cluster");
        check_refcounts(&image);
        assert_map_like_qemu(&p);
    }
}

#[test]
fn compressed_writes_then_overwrites() {
    let d = Dir::new();
    let p = d.path("cw.qcow2");
    create(&p, "2M", "cluster_size=4096", None);
    io(
        "qcow2",
        &p,
        &[
            "write -c -P 0x61 0 64k",
            "write -c -P 0x62 128k 4k",
            "write -P 0x63 8k 100",
            "write -c -z 256k 64k",
        ],
    );
    let image = assert_reads_like_qemu(&p);
    check_refcounts(&image);
    assert_map_like_qemu(&p);
}

#[test]
fn zstd_compression() {
    let d = Dir::new();
    let raw = d.path("src.raw");
    compressible_raw(&raw, 1 << 20);
    let p = d.path("zstd.qcow2");
    img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "compression_type=zstd",
        &raw.display().to_string(),
        &p.display().to_string(),
    ]);
    let image = assert_reads_like_qemu(&p);
    assert_eq!(image.compression_type(), 1);
    assert_eq!(read_all(&image), std::fs::read(&raw).unwrap());
}

#[test]
fn refcount_widths() {
    let d = Dir::new();
    for bits in [1u32, 2, 4, 8, 16, 32, 64] {
        let p = d.path(&format!("r{bits}.qcow2"));
        create(&p, "4M", &format!("refcount_bits={bits},cluster_size=4096"), None);
        io("qcow2", &p, &["write -P 0x71 0 300k", "write -P 0x72 1M 64k", "write -z 2M 8k"]);
        if bits > 1 {
            img(&["snapshot", "-c", "snap", &p.display().to_string()]);
            io("qcow2", &p, &["write -P 0x73 4k 4k"]);
        }
        let image = assert_reads_like_qemu(&p);
        assert_eq!(image.refcount_bits(), bits);
        check_refcounts(&image);
        if bits > 1 {
            // Clusters shared with the snapshot have refcount 2, the rewritten one 1.
            let ClusterMapping::Data { host } = image.map_cluster(0).unwrap() else { panic!() };
            assert_eq!(image.refcount(host).unwrap(), 2, "refcount_bits={bits}");
            let ClusterMapping::Data { host } = image.map_cluster(1).unwrap() else { panic!() };
            assert_eq!(image.refcount(host).unwrap(), 1, "refcount_bits={bits}");
        } else {
            let ClusterMapping::Data { host } = image.map_cluster(0).unwrap() else { panic!() };
            assert_eq!(image.refcount(host).unwrap(), 1);
        }
    }
}

#[test]
fn internal_snapshots() {
    let d = Dir::new();
    let p = d.path("snap.qcow2");
    create(&p, "4M", "", None);
    let ps = p.display().to_string();
    io("qcow2", &p, &["write -P 0x01 0 1M"]);
    img(&["snapshot", "-c", "one", &ps]);
    io("qcow2", &p, &["write -P 0x02 512k 1M", "write -z 0 64k"]);
    img(&["snapshot", "-c", "two", &ps]);
    io("qcow2", &p, &["write -P 0x03 3M 4k", "discard 768k 64k"]);
    let image = assert_reads_like_qemu(&p);
    assert_eq!(image.header().nb_snapshots, 2);
    let snaps = image.snapshots();
    assert_eq!(snaps.len(), 2);
    assert_eq!((&snaps[0].name[..], &snaps[1].name[..]), (&b"one"[..], &b"two"[..]));
    assert_eq!(snaps[0].disk_size(), Some(4 << 20));
    assert_eq!(snaps[0].vm_state_size(), 0);
    // The snapshot's data as QEMU reads it (`qemu-img convert -l`).
    let out = d.path("one.raw");
    img(&["convert", "-O", "raw", "-l", "snapshot.name=one", &ps, &out.display().to_string()]);
    let expected = std::fs::read(&out).unwrap();
    let l1 = image.snapshot_l1_table(&snaps[0]).unwrap();
    let l2 = image.l2_table_entries(l1[0] & qcow2::l2::OFFSET_MASK).unwrap();
    let ClusterMapping::Data { host } =
        qcow2::l2::decode_l2_entry(l2[0], image.cluster_bits(), 0).unwrap()
    else {
        panic!("snapshot cluster 0 is not data");
    };
    let mut buf = vec![0u8; 65536];
    image.storage().read_at(&mut buf, host).unwrap();
    assert_eq!(buf, expected[..65536]);
    check_refcounts(&image);
    assert_map_like_qemu(&p);
}

#[test]
fn version_2_images() {
    let d = Dir::new();
    let p = d.path("v2.qcow2");
    create(&p, "4M", "compat=0.10", None);
    io("qcow2", &p, &["write -P 0x21 0 200k", "write -z 64k 64k", "write -c -P 0x22 1M 64k"]);
    let image = assert_reads_like_qemu(&p);
    assert_eq!(image.version(), 2);
    assert_eq!(image.header().header_length, 72);
    assert_eq!(image.refcount_bits(), 16);
    check_refcounts(&image);
    assert_map_like_qemu(&p);
    drop(image);

    // A zero flag cannot appear in v2, but reads as zeroes if it does.
    let image = open(&p);
    let l2 = image.l1_table()[0] & qcow2::l2::OFFSET_MASK;
    drop(image);
    let mut bytes = std::fs::read(&p).unwrap();
    let e = l2 as usize; // entry of cluster 0
    bytes[e + 7] |= 1;
    std::fs::write(&p, &bytes).unwrap();
    let image = open(&p);
    assert!(matches!(image.map_cluster(0).unwrap(), ClusterMapping::Zero { host: Some(_) }));
    let mut buf = vec![1u8; 65536];
    image.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn header_accessors_and_extensions() {
    let d = Dir::new();
    let base = d.path("base.qcow2");
    create(&base, "1M", "", None);
    let p = d.path("top.qcow2");
    create(&p, "3M", "lazy_refcounts=on", Some((&base, "qcow2")));
    let image = open(&p);
    let h = image.header();
    assert_eq!(image.virtual_size(), 3 << 20);
    assert_eq!(h.backing_file.as_deref(), Some(base.display().to_string().as_bytes()));
    assert_eq!(image.backing_format().as_deref(), Some("qcow2"));
    assert_eq!(image.compatible_features() & 1, 1);
    assert_eq!(image.incompatible_features(), 0);
    let names = h.feature_names();
    assert!(names.iter().any(|f| f.name == "lazy refcounts"));
    assert!(names.iter().any(|f| f.name == "dirty bit"));
    // Every extension is kept with its data; the known ones are recognised.
    let types: Vec<u32> = h.extensions.iter().map(|e| e.ext_type).collect();
    assert!(types.contains(&qcow2::header::EXT_BACKING_FORMAT));
    assert!(types.contains(&qcow2::header::EXT_FEATURE_TABLE));
    assert_eq!(image.backing().unwrap().len(), 1 << 20);
    // Reading past the virtual size is an error, not a panic.
    let mut buf = [0u8; 16];
    assert!(image.read_at(&mut buf, (3 << 20) - 8).is_err());
    assert!(image.read_at(&mut buf, u64::MAX - 4).is_err());
    assert!(image.block_status(3 << 20, 1).is_err());
    image.read_at(&mut [], 3 << 20).unwrap();
}

#[test]
fn bitmaps_extension_and_autoclear_bits_are_kept() {
    let d = Dir::new();
    let p = d.path("bm.qcow2");
    create(&p, "4M", "", None);
    img(&["bitmap", "--add", &p.display().to_string(), "b0"]);
    io("qcow2", &p, &["write -P 0x31 0 64k"]);
    let image = assert_reads_like_qemu(&p);
    assert_eq!(image.autoclear_features() & 1, 1);
    let h = image.header();
    let ext = h.bitmaps_extension().unwrap();
    assert_eq!(ext.len(), 24);
    assert_eq!(u32::from_be_bytes(ext[..4].try_into().unwrap()), 1);
    // The extensions are those in the file, byte for byte.
    let bytes = std::fs::read(&p).unwrap();
    let mut at = h.header_length as usize;
    for e in &h.extensions {
        assert_eq!(u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()), e.ext_type);
        let len = u32::from_be_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        assert_eq!(&bytes[at + 8..at + 8 + len], &e.data[..]);
        at += 8 + len.div_ceil(8) * 8;
    }
    check_refcounts(&image);
}

#[test]
fn open_on_memory_storage() {
    let d = Dir::new();
    let p = d.path("m.qcow2");
    create(&p, "1M", "cluster_size=4096", None);
    io("qcow2", &p, &["write -P 0x41 4095 2"]);
    let bytes = std::fs::read(&p).unwrap();
    let image = Qcow2Image::open(
        std::sync::Arc::new(qcow2::storage::MemStorage::from_bytes(bytes)),
        qcow2::OpenOptions { l2_cache_bytes: 0, ..Default::default() },
    )
    .unwrap();
    let mut buf = [0u8; 4];
    image.read_at(&mut buf, 4094).unwrap();
    assert_eq!(buf, [0, 0x41, 0x41, 0]);
}

#[test]
fn concurrent_reads_with_a_one_table_cache() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Qcow2Image>();
    let d = Dir::new();
    let p = d.path("cc.qcow2");
    create(&p, "2M", "cluster_size=512", None);
    io("qcow2", &p, &["write -P 0x51 0 300k", "write -c -P 0x52 400k 64k", "write -z 100k 50k"]);
    let expected = qemu_contents(&p);
    let storage: std::sync::Arc<dyn qcow2::storage::Storage> =
        std::sync::Arc::new(qcow2::storage::FileStorage::open(&p, false).unwrap());
    let image = Qcow2Image::open(
        storage,
        qcow2::OpenOptions { l2_cache_bytes: 1, refcount_cache_bytes: 1, ..Default::default() },
    )
    .unwrap();
    std::thread::scope(|s| {
        for t in 0..3u64 {
            let (image, expected) = (&image, &expected);
            s.spawn(move || {
                let mut rng = testkit::SplitMix64(t);
                for _ in 0..2000 {
                    let x = rng.next();
                    let at = x % (2 << 20);
                    let len = (x >> 32) % 5000 % ((2 << 20) - at) + 1;
                    let mut buf = vec![0u8; len as usize];
                    image.read_at(&mut buf, at).unwrap();
                    assert!(buf == expected[at as usize..(at + len) as usize], "at {at} len {len}");
                    assert!(image.refcount(at % 700_000).unwrap() <= u64::from(u16::MAX));
                }
            });
        }
    });
}

#[test]
fn shrunk_and_large_sparse_images() {
    let d = Dir::new();
    // After a shrink QEMU keeps the larger L1 table: it must still open.
    let p = d.path("shrunk.qcow2");
    create(&p, "8G", "", None);
    io("qcow2", &p, &["write -P 0x0a 7G 64k", "write -P 0x0b 1000 5000"]);
    img(&["resize", "-q", "--shrink", &p.display().to_string(), "1G"]);
    let image = open(&p);
    assert!(u64::from(image.header().l1_size) > 2);
    assert_eq!(image.virtual_size(), 1 << 30);
    let mut buf = vec![0u8; 8192];
    image.read_at(&mut buf, 0).unwrap();
    assert!(buf[1000..6000].iter().all(|&b| b == 0x0b) && buf[..1000].iter().all(|&b| b == 0));
    assert_map_like_qemu(&p);
    // A large sparse image: block_status walks it quickly.
    let p = d.path("big.qcow2");
    create(&p, "4T", "", None);
    io("qcow2", &p, &["write -P 0x0c 3T 64k"]);
    assert_map_like_qemu(&p);
}
