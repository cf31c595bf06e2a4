//! Shared helpers for the read tests: QEMU's tools as oracles.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use qcow2::Qcow2Image;
use qcow2::backing::BlockState;
use qcow2::l2::{self, ClusterMapping};
use testkit::serde_json::{self, Value};

/// A temporary directory that lives as long as the value.
pub struct Dir {
    pub dir: tempfile::TempDir,
}

impl Dir {
    pub fn new() -> Dir {
        Dir { dir: tempfile::tempdir().unwrap() }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Runs `qemu-img ARGS`, panicking with its stderr on failure.
pub fn img(args: &[&str]) -> String {
    testkit::qemu_img(args).unwrap()
}

/// Runs `qemu-io -f FMT FILE -c CMD...`.
pub fn io(fmt: &str, file: &Path, cmds: &[&str]) {
    let mut args: Vec<String> = vec!["-f".into(), fmt.into(), file.display().to_string()];
    for c in cmds {
        args.push("-c".into());
        args.push((*c).into());
    }
    testkit::qemu_io(&args).unwrap();
}

/// Creates a qcow2 image with extra `-o` options and optional backing.
pub fn create(path: &Path, size: &str, opts: &str, backing: Option<(&Path, &str)>) {
    testkit::create_qcow2(path, size, opts, backing).unwrap();
}

/// The guest contents of `path` as `qemu-img convert -O raw` reads them.
pub fn qemu_contents(path: &Path) -> Vec<u8> {
    let out = tempfile::NamedTempFile::new().unwrap();
    let p = out.path().display().to_string();
    img(&["convert", "-O", "raw", &path.display().to_string(), &p]);
    std::fs::read(out.path()).unwrap()
}

/// Opens a qcow2 file with its backing chain, read-only.
pub fn open(path: &Path) -> Qcow2Image {
    Qcow2Image::open_path(path, false).unwrap()
}

/// Reads the whole image in pieces of varying length and alignment.
pub fn read_all(image: &Qcow2Image) -> Vec<u8> {
    let size = image.virtual_size();
    let mut out = vec![0u8; size as usize];
    let pieces = [1u64, 511, 4096, 65536 + 17, 1 << 20, 3 << 20];
    let mut at = 0;
    let mut i = 0;
    while at < size {
        let n = pieces[i % pieces.len()].min(size - at);
        image.read_at(&mut out[at as usize..(at + n) as usize], at).unwrap();
        at += n;
        i += 1;
    }
    out
}

/// Checks that the image reads exactly as QEMU reads it, in one read and in pieces.
pub fn assert_reads_like_qemu(path: &Path) -> Qcow2Image {
    let image = open(path);
    let expected = qemu_contents(path);
    assert_eq!(expected.len() as u64, image.virtual_size());
    let got = read_all(&image);
    assert!(got == expected, "{}: piecewise read differs from qemu-img convert", path.display());
    let mut whole = vec![0u8; expected.len()];
    image.read_at(&mut whole, 0).unwrap();
    assert!(whole == expected, "{}: whole read differs from qemu-img convert", path.display());
    image
}

/// Every host cluster the image references (header, tables, data), with a
/// description; checks each has a refcount of at least 1.
pub fn check_refcounts(image: &Qcow2Image) {
    let cs = image.cluster_size();
    let h = image.header();
    let mut used: Vec<(u64, &str)> = vec![(0, "header")];
    for i in 0..(u64::from(h.l1_size) * 8).div_ceil(cs) {
        used.push((h.l1_table_offset + i * cs, "L1 table"));
    }
    for i in 0..u64::from(h.refcount_table_clusters) {
        used.push((h.refcount_table_offset + i * cs, "refcount table"));
    }
    for e in image.refcount_table() {
        if e & !0x1ff != 0 {
            used.push((e & !0x1ff, "refcount block"));
        }
    }
    for e in image.l1_table() {
        if e & l2::OFFSET_MASK != 0 {
            used.push((e & l2::OFFSET_MASK, "L2 table"));
        }
    }
    // The snapshots' L1 tables, their L2 tables and the clusters these map.
    for snap in image.snapshots() {
        for i in 0..(u64::from(snap.l1_size) * 8).div_ceil(cs) {
            used.push((snap.l1_table_offset + i * cs, "snapshot L1 table"));
        }
        for e in image.snapshot_l1_table(&snap).unwrap() {
            let l2_offset = e & l2::OFFSET_MASK;
            if l2_offset == 0 {
                continue;
            }
            used.push((l2_offset, "snapshot L2 table"));
            for (i, &entry) in image.l2_table_entries(l2_offset).unwrap().iter().enumerate() {
                let at = l2_offset + i as u64 * 8;
                match l2::decode_l2_entry(entry, image.cluster_bits(), at).unwrap() {
                    ClusterMapping::Data { host } => used.push((host, "snapshot data")),
                    ClusterMapping::Compressed { host, .. } => {
                        used.push((host, "snapshot compressed"));
                    }
                    _ => {}
                }
            }
        }
    }
    for c in 0..image.virtual_size().div_ceil(cs) {
        match image.map_cluster(c).unwrap() {
            ClusterMapping::Data { host } => used.push((host, "data")),
            ClusterMapping::Zero { host: Some(host) } => used.push((host, "preallocated zero")),
            ClusterMapping::Compressed { host, len } => {
                used.push((host, "compressed"));
                // The data's last byte (the descriptor may count a sector past the
                // end of the file, which QEMU does not refcount).
                let last = (host + len - 1).min(image.file_len().unwrap() - 1);
                used.push((last, "compressed tail"));
            }
            _ => {}
        }
    }
    for (off, what) in used {
        let rc = image.refcount(off).unwrap();
        assert!(rc >= 1, "{what} cluster at {off:#x} has refcount {rc}");
        let max = if image.refcount_bits() == 64 {
            u64::MAX
        } else {
            (1u64 << image.refcount_bits()) - 1
        };
        assert!(rc <= max);
    }
    // Past the end of the file, nothing is referenced.
    let end = image.file_len().unwrap().div_ceil(cs) * cs;
    assert_eq!(image.refcount(end + 16 * cs).unwrap(), 0);
}

/// One `qemu-img map --output=json` entry.
#[derive(Debug, Clone, PartialEq)]
struct MapEntry {
    start: u64,
    length: u64,
    depth: u64,
    present: bool,
    zero: bool,
    data: bool,
    compressed: bool,
    offset: Option<u64>,
}

fn qemu_map(path: &Path) -> Vec<MapEntry> {
    let out = img(&["map", "--output=json", &path.display().to_string()]);
    let v: Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| MapEntry {
            start: e["start"].as_u64().unwrap(),
            length: e["length"].as_u64().unwrap(),
            depth: e["depth"].as_u64().unwrap(),
            present: e["present"].as_bool().unwrap(),
            zero: e["zero"].as_bool().unwrap(),
            data: e["data"].as_bool().unwrap(),
            compressed: e["compressed"].as_bool().unwrap_or(false),
            offset: e.get("offset").and_then(Value::as_u64),
        })
        .collect()
}

fn our_map(image: &Qcow2Image) -> Vec<MapEntry> {
    let mut out = Vec::new();
    let size = image.virtual_size();
    let mut at = 0;
    while at < size {
        let s = image.block_status(at, size - at).unwrap();
        assert!(s.len > 0 && s.len <= size - at);
        out.push(MapEntry {
            start: at,
            length: s.len,
            depth: s.depth.into(),
            present: s.state != BlockState::Unallocated,
            zero: s.state != BlockState::Data,
            data: s.state == BlockState::Data,
            compressed: s.compressed,
            offset: s.offset,
        });
        at += s.len;
    }
    out
}

/// Compares `block_status` with `qemu-img map --output=json`, range by range.
///
/// QEMU also asks the file system about data clusters (a data cluster over a hole
/// reads "zero": true), which `block_status` does not: for data, "zero" is ignored.
pub fn assert_map_like_qemu(path: &Path) {
    let image = open(path);
    let theirs = qemu_map(path);
    let ours = our_map(&image);
    let (mut i, mut j) = (0, 0);
    let mut at = 0;
    while i < theirs.len() && j < ours.len() {
        let (t, o) = (&theirs[i], &ours[j]);
        let t_end = t.start + t.length;
        let o_end = o.start + o.length;
        let end = t_end.min(o_end);
        let off = |e: &MapEntry| e.offset.map(|x| x + (at - e.start));
        let ctx = || format!("{}: at {at:#x}: qemu {t:?}, ours {o:?}", path.display());
        assert_eq!(t.depth, o.depth, "depth {}", ctx());
        assert_eq!(t.present, o.present, "present {}", ctx());
        assert_eq!(t.data, o.data, "data {}", ctx());
        if !t.data {
            assert_eq!(t.zero, o.zero, "zero {}", ctx());
        }
        assert_eq!(t.compressed, o.compressed, "compressed {}", ctx());
        assert_eq!(off(t), off(o), "offset {}", ctx());
        at = end;
        if t_end == end {
            i += 1;
        }
        if o_end == end {
            j += 1;
        }
    }
    assert_eq!(at, image.virtual_size(), "{}: maps cover different lengths", path.display());
}
