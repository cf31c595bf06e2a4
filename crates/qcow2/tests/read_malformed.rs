//! Malformed images: every header field and table entry corrupted in turn gives an
//! error, never a panic or an unbounded allocation.

mod read_support;

use std::sync::Arc;

use qcow2::l2::{self, ClusterMapping};
use qcow2::storage::MemStorage;
use qcow2::{OpenOptions, Qcow2Error, Qcow2Image};
use read_support::*;

const CS: u64 = 4096;

struct Fixture {
    bytes: Vec<u8>,
    l1_offset: u64,
    l2_offset: u64,
    /// Offset of the L2 entry of a data cluster, a compressed cluster, a zero cluster.
    data_entry: u64,
    compressed_entry: u64,
    reftable_offset: u64,
    /// Offset of the first header extension.
    first_ext: u64,
}

/// A v3 image with 4 KiB clusters: data, a compressed cluster, a zero cluster.
fn fixture() -> Fixture {
    let d = Dir::new();
    let base = d.path("base.qcow2");
    create(&base, "4M", "", None);
    let p = d.path("good.qcow2");
    create(&p, "4M", "cluster_size=4096", Some((&base, "qcow2")));
    io("qcow2", &p, &["write -P 0x61 0 8k", "write -c -P 0x62 64k 4k", "write -z 128k 4k"]);
    let mut bytes = std::fs::read(&p).unwrap();
    // Lay out the extensions ourselves (QEMU writes a feature name table only in some
    // cases): backing format, a feature name table, the end, the backing file name.
    let hl = u32::from_be_bytes(bytes[100..104].try_into().unwrap()) as usize;
    let bfo = get64(&bytes, 8) as usize;
    let bfs = u32::from_be_bytes(bytes[16..20].try_into().unwrap()) as usize;
    let name = bytes[bfo..bfo + bfs].to_vec();
    let mut area = Vec::new();
    area.extend_from_slice(&qcow2::header::EXT_BACKING_FORMAT.to_be_bytes());
    area.extend_from_slice(&5u32.to_be_bytes());
    area.extend_from_slice(b"qcow2\0\0\0");
    let features: [(u8, u8, &str); 3] =
        [(0, 0, "dirty bit"), (0, 4, "extended L2 entries"), (1, 0, "lazy refcounts")];
    area.extend_from_slice(&qcow2::header::EXT_FEATURE_TABLE.to_be_bytes());
    area.extend_from_slice(&(48 * features.len() as u32).to_be_bytes());
    for (kind, bit, n) in features {
        let mut e = [0u8; 48];
        e[0] = kind;
        e[1] = bit;
        e[2..2 + n.len()].copy_from_slice(n.as_bytes());
        area.extend_from_slice(&e);
    }
    area.extend_from_slice(&[0u8; 8]);
    bytes[hl..CS as usize].fill(0);
    bytes[hl..hl + area.len()].copy_from_slice(&area);
    let new_bfo = hl + area.len();
    bytes[new_bfo..new_bfo + bfs].copy_from_slice(&name);
    put64(&mut bytes, 8, new_bfo as u64);
    let image = open_mem(bytes.clone(), false).unwrap();
    let h = image.header();
    let l2_offset = image.l1_table()[0] & l2::OFFSET_MASK;
    assert!(matches!(image.map_cluster(16).unwrap(), ClusterMapping::Compressed { .. }));
    assert!(matches!(image.map_cluster(32).unwrap(), ClusterMapping::Zero { .. }));
    Fixture {
        bytes,
        l1_offset: h.l1_table_offset,
        l2_offset,
        data_entry: l2_offset,
        compressed_entry: l2_offset + 16 * 8,
        reftable_offset: h.refcount_table_offset,
        first_ext: h.header_length.into(),
    }
}

fn open_mem(bytes: Vec<u8>, writable: bool) -> Result<Qcow2Image, Qcow2Error> {
    Qcow2Image::open(
        Arc::new(MemStorage::from_bytes(bytes)),
        OpenOptions { writable, ignore_backing: true, ..Default::default() },
    )
}

fn put32(b: &mut [u8], at: u64, v: u32) {
    b[at as usize..at as usize + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], at: u64, v: u64) {
    b[at as usize..at as usize + 8].copy_from_slice(&v.to_be_bytes());
}

fn update64(b: &mut [u8], at: u64, f: impl FnOnce(u64) -> u64) {
    let v = f(get64(b, at));
    put64(b, at, v);
}

fn get64(b: &[u8], at: u64) -> u64 {
    u64::from_be_bytes(b[at as usize..at as usize + 8].try_into().unwrap())
}

/// Reads the whole image (at most 64 MiB) and asks the status of every range.
fn read_everything(image: &Qcow2Image) -> Result<(), Qcow2Error> {
    let size = image.virtual_size().min(64 << 20);
    let mut buf = vec![0u8; size as usize];
    image.read_at(&mut buf, 0)?;
    let mut at = 0;
    while at < size {
        at += image.block_status(at, size - at)?.len;
    }
    Ok(())
}

/// Applies `mutate` to the fixture and expects the open to fail with an error whose
/// message contains `needle`.
fn open_fails(f: &Fixture, needle: &str, mutate: impl FnOnce(&mut Vec<u8>)) {
    let mut b = f.bytes.clone();
    mutate(&mut b);
    match open_mem(b, false) {
        Ok(_) => panic!("open succeeded; expected an error containing {needle:?}"),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains(needle), "error {msg:?} does not contain {needle:?}");
        }
    }
}

/// Applies `mutate`; the open succeeds and reading fails with `needle`.
fn read_fails(f: &Fixture, needle: &str, mutate: impl FnOnce(&mut Vec<u8>)) {
    let mut b = f.bytes.clone();
    mutate(&mut b);
    let image = open_mem(b, false).unwrap();
    match read_everything(&image) {
        Ok(()) => panic!("read succeeded; expected an error containing {needle:?}"),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains(needle), "error {msg:?} does not contain {needle:?}");
        }
    }
}

#[test]
fn the_fixture_is_valid() {
    let f = fixture();
    let image = open_mem(f.bytes.clone(), true).unwrap();
    read_everything(&image).unwrap();
}

#[test]
fn truncated_files() {
    let f = fixture();
    for len in [0usize, 3, 4, 8, 71, 72, 100, 103] {
        let mut b = f.bytes.clone();
        b.truncate(len);
        let e = open_mem(b, false).unwrap_err();
        assert!(
            matches!(e, Qcow2Error::Truncated { .. } | Qcow2Error::BadMagic { .. }),
            "{len}: {e}"
        );
    }
    for len in [104usize, 200, 4096, 8192, f.l1_offset as usize + 8] {
        let mut b = f.bytes.clone();
        b.truncate(len);
        assert!(open_mem(b, false).is_err(), "truncated to {len}");
    }
    // Data past the end of a truncated file: an error, not zeroes.
    let mut b = f.bytes.clone();
    let host = get64(&b, f.data_entry) & l2::OFFSET_MASK;
    let tables_end = (f.l2_offset + CS).max(f.reftable_offset + CS) as usize;
    if host as usize >= tables_end {
        b.truncate(host as usize);
        let image = open_mem(b, false).unwrap();
        assert!(read_everything(&image).is_err());
    }
}

#[test]
fn magic_and_version() {
    let f = fixture();
    open_fails(&f, "not a qcow2 image", |b| b[0] = b'X');
    open_fails(&f, "version 1", |b| put32(b, 4, 1));
    open_fails(&f, "version 4", |b| put32(b, 4, 4));
    open_fails(&f, "version 0", |b| put32(b, 4, 0));
}

#[test]
fn cluster_bits() {
    let f = fixture();
    for bits in [0u32, 8, 22, 63, 64, u32::MAX] {
        open_fails(&f, "cluster_bits", |b| put32(b, 20, bits));
    }
}

#[test]
fn header_length() {
    let f = fixture();
    open_fails(&f, "header_length", |b| put32(b, 100, 100));
    open_fails(&f, "header_length", |b| put32(b, 100, 0));
    open_fails(&f, "header_length", |b| put32(b, 100, 108));
    open_fails(&f, "header_length", |b| put32(b, 100, CS as u32 + 8));
    open_fails(&f, "header_length", |b| put32(b, 100, u32::MAX));
}

#[test]
fn virtual_size_and_l1() {
    let f = fixture();
    open_fails(&f, "size", |b| put64(b, 24, u64::MAX));
    open_fails(&f, "size", |b| put64(b, 24, 1 << 62));
    open_fails(&f, "l1_size", |b| put64(b, 24, 1 << 40));
    open_fails(&f, "l1_size", |b| put32(b, 36, 0));
    open_fails(&f, "l1_size", |b| put32(b, 36, 0x0100_0000));
    open_fails(&f, "l1_size", |b| put32(b, 36, u32::MAX));
    open_fails(&f, "past the end", |b| put32(b, 36, 0x0040_0000));
    open_fails(&f, "l1_table_offset", |b| put64(b, 40, 0));
    open_fails(&f, "l1_table_offset", |b| put64(b, 40, f.l1_offset + 512));
    open_fails(&f, "l1_table_offset", |b| put64(b, 40, 1 << 50));
    open_fails(&f, "l1_table_offset", |b| put64(b, 40, !(CS - 1)));
    // A larger L1 table than needed (QEMU grows it for VM state) is accepted.
    let mut b = f.bytes.clone();
    put32(&mut b, 36, 4);
    put64(&mut b, 24, 1 << 20);
    read_everything(&open_mem(b, false).unwrap()).unwrap();
}

#[test]
fn refcount_table_fields() {
    let f = fixture();
    open_fails(&f, "refcount_table_offset", |b| put64(b, 48, 0));
    open_fails(&f, "refcount_table_offset", |b| put64(b, 48, f.reftable_offset + 8));
    open_fails(&f, "refcount_table_offset", |b| put64(b, 48, 1 << 55));
    open_fails(&f, "refcount_table_clusters", |b| put32(b, 56, 0));
    open_fails(&f, "refcount_table_clusters", |b| put32(b, 56, u32::MAX));
    open_fails(&f, "refcount_table_offset", |b| put32(b, 56, 1000));
    open_fails(&f, "refcount_order", |b| put32(b, 96, 7));
    open_fails(&f, "refcount_order", |b| put32(b, 96, u32::MAX));
}

#[test]
fn snapshot_fields() {
    let f = fixture();
    open_fails(&f, "nb_snapshots", |b| put32(b, 60, 70_000));
    open_fails(&f, "snapshots_offset", |b| {
        put32(b, 60, 1);
        put64(b, 64, 1 << 40);
    });
    open_fails(&f, "snapshots_offset", |b| {
        put32(b, 60, 1);
        put64(b, 64, 0);
    });
}

#[test]
fn snapshot_entries() {
    let f = fixture();
    // A snapshot table in a cluster appended to the file.
    let with_entry = |l1_offset: u64, l1_size: u32, id_len: u16, extra_len: u32| {
        let mut b = f.bytes.clone();
        b.resize((b.len() as u64).div_ceil(CS) as usize * CS as usize, 0);
        let at = b.len() as u64;
        b.resize(b.len() + CS as usize, 0);
        put64(&mut b, at, l1_offset);
        put32(&mut b, at + 8, l1_size);
        b[at as usize + 12..at as usize + 14].copy_from_slice(&id_len.to_be_bytes());
        b[at as usize + 14..at as usize + 16].copy_from_slice(&3u16.to_be_bytes());
        put32(&mut b, at + 36, extra_len);
        put32(&mut b, 60, 1);
        put64(&mut b, 64, at);
        b
    };
    let image = open_mem(with_entry(f.l1_offset, 2, 1, 16), false).unwrap();
    let snaps = image.snapshots();
    assert_eq!((snaps.len(), snaps[0].l1_size, snaps[0].extra_data.len()), (1, 2, 16));
    assert_eq!(image.snapshot_l1_table(&snaps[0]).unwrap(), image.l1_table()[..2]);
    let bad = [
        (with_entry(f.l1_offset, 2, 1, 2000), "extra data"),
        (with_entry(f.l1_offset + 8, 2, 1, 16), "unaligned"),
        (with_entry(f.l1_offset, 0x0100_0000, 1, 16), "larger than 32 MiB"),
        (with_entry(f.l1_offset, 0x0010_0000, 1, 16), "outside the file"),
        (with_entry(0, 2, 1, 16), "over the header"),
        (with_entry(f.l1_offset, 2, u16::MAX, 16), "past the end of the file"),
    ];
    for (b, needle) in bad {
        let e = open_mem(b, false).unwrap_err().to_string();
        assert!(e.contains(needle), "{e:?} does not contain {needle:?}");
    }
    // More snapshots than the table holds: the next entries are past the end.
    let mut b = with_entry(f.l1_offset, 2, 1, 16);
    put32(&mut b, 60, 1000);
    assert!(open_mem(b, false).is_err());
}

#[test]
fn encryption_and_features() {
    let f = fixture();
    open_fails(&f, "encryption (crypt_method 1: aes)", |b| put32(b, 32, 1));
    open_fails(&f, "encryption (crypt_method 2: luks)", |b| put32(b, 32, 2));
    open_fails(&f, "crypt_method 7", |b| put32(b, 32, 7));
    open_fails(&f, "unknown incompatible feature bit 5", |b| put64(b, 72, 1 << 5));
    open_fails(&f, "unknown incompatible feature bit 63", |b| put64(b, 72, 1 << 63));
    open_fails(&f, "extended L2 entries", |b| put64(b, 72, 1 << 4));
    open_fails(&f, "external data file", |b| put64(b, 72, 1 << 2));
    open_fails(&f, "needs refcount repair", |b| put64(b, 72, 1));
    open_fails(&f, "compression_type", |b| put64(b, 72, 1 << 3));
    open_fails(&f, "compression_type", |b| b[104] = 1);
    open_fails(&f, "compression type unknown (2)", |b| {
        put64(b, 72, 1 << 3);
        b[104] = 2;
    });
    // Unknown compatible and autoclear bits are fine.
    let mut b = f.bytes.clone();
    put64(&mut b, 80, u64::MAX);
    put64(&mut b, 88, 1 << 40);
    let image = open_mem(b, true).unwrap();
    assert_eq!(image.autoclear_features(), 1 << 40);
    // The corrupt bit refuses writable opens only.
    let mut b = f.bytes.clone();
    put64(&mut b, 72, 1 << 1);
    assert!(matches!(open_mem(b.clone(), true), Err(Qcow2Error::MarkedCorrupt)));
    read_everything(&open_mem(b, false).unwrap()).unwrap();
}

#[test]
fn feature_names_come_from_the_table() {
    let f = fixture();
    let h = open_mem(f.bytes.clone(), false).unwrap().header();
    // Find the feature table in the file and rename incompatible bit 4 to bit 9.
    let mut at = f.first_ext;
    loop {
        let t = u32::from_be_bytes(f.bytes[at as usize..at as usize + 4].try_into().unwrap());
        let len = u32::from_be_bytes(f.bytes[at as usize + 4..at as usize + 8].try_into().unwrap());
        if t == qcow2::header::EXT_FEATURE_TABLE {
            break;
        }
        assert_ne!(t, 0, "no feature table");
        at += 8 + u64::from(len).div_ceil(8) * 8;
    }
    let names = h.feature_names();
    let i = names.iter().position(|n| n.name == "extended L2 entries").unwrap() as u64;
    open_fails(&f, "extended L2 entries (incompatible bit 9)", |b| {
        b[(at + 8 + i * 48 + 1) as usize] = 9;
        put64(b, 72, 1 << 9);
    });
}

#[test]
fn extensions() {
    let f = fixture();
    open_fails(&f, "overflows the header extension area", |b| put32(b, f.first_ext + 4, u32::MAX));
    open_fails(&f, "overflows the header extension area", |b| {
        put32(b, f.first_ext + 4, (CS - f.first_ext - 7) as u32);
    });
    // An unknown extension is kept byte for byte.
    let mut b = f.bytes.clone();
    let bfo = get64(&b, 8) as usize;
    b[bfo..bfo + 1023].fill(0);
    put64(&mut b, 8, 0);
    put32(&mut b, 16, 0);
    let h = open_mem(b.clone(), false).unwrap().header();
    let mut end = f.first_ext;
    for e in &h.extensions {
        end += 8 + (e.data.len() as u64).div_ceil(8) * 8;
    }
    put32(&mut b, end, 0x1234_5678);
    put32(&mut b, end + 4, 5);
    b[end as usize + 8..end as usize + 13].copy_from_slice(b"hello");
    let h = open_mem(b.clone(), false).unwrap().header();
    let last = h.extensions.last().unwrap();
    assert_eq!((last.ext_type, &last.data[..]), (0x1234_5678, &b"hello"[..]));
    // A bad backing format extension.
    put32(&mut b, end, qcow2::header::EXT_BACKING_FORMAT);
    put32(&mut b, end + 4, 2000);
    assert!(open_mem(b, false).is_err());
}

#[test]
fn backing_file_name() {
    let f = fixture();
    open_fails(&f, "backing_file_offset", |b| {
        put64(b, 8, CS + 8);
        put32(b, 16, 4);
    });
    open_fails(&f, "longer than 1023", |b| {
        put64(b, 8, 2048);
        put32(b, 16, 1024);
    });
    open_fails(&f, "backing_file_offset", |b| {
        put64(b, 8, 16);
        put32(b, 16, 4);
    });
    open_fails(&f, "backing_file_size", |b| put32(b, 16, 0));
    // A name that fits is read; without a backing image supplied the open fails.
    let mut b = f.bytes.clone();
    put64(&mut b, 8, 3000);
    put32(&mut b, 16, 8);
    b[3000..3008].copy_from_slice(b"base.img");
    assert!(matches!(
        Qcow2Image::open(Arc::new(MemStorage::from_bytes(b.clone())), OpenOptions::default()),
        Err(Qcow2Error::Backing { .. })
    ));
    let image = open_mem(b, false).unwrap();
    assert_eq!(image.backing_file_name().as_deref(), Some(&b"base.img"[..]));
}

#[test]
fn l1_entries() {
    let f = fixture();
    let l1 = f.l1_offset;
    read_fails(&f, "unaligned", |b| put64(b, l1, f.l2_offset | 0x200));
    read_fails(&f, "past the end of the file", |b| put64(b, l1, 1 << 50));
    read_fails(&f, "past the end of the file", |b| put64(b, l1, l2::OFFSET_MASK & !(CS - 1)));
}

#[test]
fn l2_entries() {
    let f = fixture();
    let e = f.data_entry;
    read_fails(&f, "unaligned", |b| update64(b, e, |v| v | 0x200));
    read_fails(&f, "past the end of the file", |b| put64(b, e, (1 << 63) | (1 << 50)));
    read_fails(&f, "past the end of the file", |b| put64(b, e, l2::OFFSET_MASK & !(CS - 1)));
    let c = f.compressed_entry;
    // 4 KiB clusters: x = 58, so offset bits 56 and 57 must be zero.
    read_fails(&f, "bits beyond 55", |b| update64(b, c, |v| v | (1 << 56)));
    read_fails(&f, "past the end of the file", |b| {
        update64(b, c, |v| (1 << 62) | (v & !((1 << 58) - 1) & !(1 << 62)) | (1 << 45));
    });
    read_fails(&f, "decompress", |b| {
        let host = get64(b, c) & ((1 << 58) - 1);
        let end = b.len().min(host as usize + 64);
        b[host as usize..end].fill(0xff);
    });
    // A compressed descriptor with the largest sector count reads past the end of
    // the data, which is fine as long as the stream itself is whole.
    let mut b = f.bytes.clone();
    update64(&mut b, c, |v| v | (0xf << 58));
    read_everything(&open_mem(b, false).unwrap()).unwrap();
}

#[test]
fn refcount_entries() {
    let f = fixture();
    let mut b = f.bytes.clone();
    update64(&mut b, f.reftable_offset, |v| v | 0x200);
    let image = open_mem(b, false).unwrap();
    assert!(image.refcount(0).unwrap_err().to_string().contains("unaligned"));
    let mut b = f.bytes.clone();
    put64(&mut b, f.reftable_offset, 1 << 50);
    let image = open_mem(b, false).unwrap();
    assert!(image.refcount(0).is_err());
    let mut b = f.bytes.clone();
    put64(&mut b, f.reftable_offset, 0);
    assert_eq!(open_mem(b, false).unwrap().refcount(0).unwrap(), 0);
}

/// Random corruption of the header cluster and the tables never panics.
#[test]
fn random_corruption_never_panics() {
    let f = fixture();
    let mut rng = testkit::SplitMix64(0x9e37_79b9_7f4a_7c15);
    let mut rnd = move || rng.next();
    let regions = [(0u64, 512u64), (f.l1_offset, 64), (f.l2_offset, 512), (f.reftable_offset, 64)];
    for _ in 0..600 {
        let mut b = f.bytes.clone();
        for _ in 0..1 + rnd() % 4 {
            let (start, len) = regions[(rnd() % regions.len() as u64) as usize];
            let at = (start + rnd() % len) as usize;
            match rnd() % 3 {
                0 => b[at] ^= 1 << (rnd() % 8),
                1 => b[at] = rnd() as u8,
                _ => b[at] = 0xff,
            }
        }
        if let Ok(image) = open_mem(b, false) {
            let _ = read_everything(&image);
            let _ = image.refcount(rnd() % (1 << 20));
        }
    }
}
