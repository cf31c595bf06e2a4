//! A bitmaps extension with autoclear bit 0 clear (a program without bitmap support
//! wrote the image): a writable open drops the extension from the header as QEMU 10.0.2
//! does (same extension list, same leaked clusters, nothing else changed), a read-only
//! open changes nothing, and a power cut during the rewrite leaves the old header or
//! the new one.

use std::path::Path;
use std::sync::Arc;

use qcow2::header::{AUTOCLEAR_BITMAPS, EXT_BITMAPS, Header};
use qcow2::storage::{FileStorage, MemStorage, Storage, Survivors};
use qcow2::{OpenOptions, Qcow2Image};
use testkit::serde_json::Value;
use testkit::{qemu_img, qemu_io, require_tool};

fn open(storage: Arc<dyn Storage>, writable: bool) -> Qcow2Image {
    Qcow2Image::open(storage, OpenOptions { writable, ignore_backing: true, ..Default::default() })
        .unwrap()
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn header(bytes: &[u8]) -> Header {
    let storage = MemStorage::from_bytes(bytes.to_vec());
    qcow2::image::read_header(&storage, bytes.len() as u64).unwrap()
}

fn ext_types(h: &Header) -> Vec<u32> {
    h.extensions.iter().map(|e| e.ext_type).collect()
}

/// Clears autoclear bit 0 (byte 95 of a version 3 header), as a program that does not
/// know the bit would have left it.
fn clear_autoclear_bit0(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[95] &= !1;
    std::fs::write(path, bytes).unwrap();
}

/// `qemu-img check --output=json`: (corruptions + check errors, leaks).
fn qemu_check(img: &str) -> (u64, u64) {
    let out = std::process::Command::new(require_tool("qemu-img"))
        .args(["check", "--output=json", img])
        .output()
        .unwrap();
    let v: Value = testkit::serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    (n("corruptions") + n("check-errors"), n("leaks"))
}

/// `qemu-img info` of `img`: (bitmaps listed, backing file name, stderr).
fn qemu_info(img: &str) -> (usize, Option<String>, String) {
    let out = std::process::Command::new(require_tool("qemu-img"))
        .args(["info", "--output=json", img])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = testkit::serde_json::from_slice(&out.stdout).unwrap();
    let bitmaps = v["format-specific"]["data"]["bitmaps"].as_array().map_or(0, Vec::len);
    let backing = v["backing-filename"].as_str().map(str::to_string);
    (bitmaps, backing, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Makes a stale image at `img` (optionally over `backing`; `v2` downgrades it with
/// `qemu-img amend`, which leaves the extension in a header without autoclear bits).
fn make_stale(img: &Path, backing: Option<&Path>, v2: bool) {
    let s = path_str(img);
    match backing {
        Some(b) => {
            qemu_img(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", path_str(b), s]).unwrap()
        }
        None => qemu_img(["create", "-q", "-f", "qcow2", s, "64M"]).unwrap(),
    };
    qemu_img(["bitmap", "--add", s, "b0"]).unwrap();
    qemu_img(["bitmap", "--add", "-g", "128k", s, "b1"]).unwrap();
    qemu_io(["-f", "qcow2", "-c", "write -P 7 1M 64k", s]).unwrap();
    if v2 {
        qemu_img(["amend", "-q", "-f", "qcow2", "-o", "compat=0.10", s]).unwrap();
    } else {
        clear_autoclear_bit0(img);
    }
    let h = header(&std::fs::read(img).unwrap());
    assert!(h.extension(EXT_BITMAPS).is_some());
    assert_eq!(h.autoclear_features & AUTOCLEAR_BITMAPS, 0);
}

/// The same stale image opened writable by qemu-io and by us: the same header
/// extensions, the same leaked clusters, the same data and backing file.
fn compare_with_qemu(backing: bool, v2: bool) {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    if backing {
        qemu_img(["create", "-q", "-f", "qcow2", path_str(&base), "64M"]).unwrap();
        qemu_io(["-f", "qcow2", "-c", "write -P 3 0 2M", path_str(&base)]).unwrap();
    }
    let theirs = dir.path().join("theirs.qcow2");
    make_stale(&theirs, backing.then_some(base.as_path()), v2);
    let ours = dir.path().join("ours.qcow2");
    std::fs::copy(&theirs, &ours).unwrap();
    let stale = std::fs::read(&theirs).unwrap();
    // QEMU's check ignores the stale extension already, so it reports the bitmaps'
    // clusters as leaked before any open.
    let (stale_corrupt, stale_leaks) = qemu_check(path_str(&theirs));
    assert_eq!(stale_corrupt, 0);

    // QEMU: a writable open with no write at all rewrites the header.
    qemu_io(["-f", "qcow2", "-c", "read -P 7 1M 64k", path_str(&theirs)]).unwrap();
    // Us: the same.
    {
        let storage: Arc<dyn Storage> = Arc::new(FileStorage::open(&ours, true).unwrap());
        let image = open(storage, true);
        assert!(!image.has_stale_bitmaps());
        assert!(image.header().extension(EXT_BITMAPS).is_none());
        image.close().unwrap();
    }

    let q = header(&std::fs::read(&theirs).unwrap());
    let o = header(&std::fs::read(&ours).unwrap());
    let label = format!("backing {backing}, v2 {v2}");
    assert!(q.extension(EXT_BITMAPS).is_none(), "{label}: QEMU dropped the extension");
    assert_eq!(ext_types(&o), ext_types(&q), "{label}: extension lists");
    assert!(ext_types(&header(&stale)).contains(&EXT_BITMAPS));
    assert_eq!(o.autoclear_features, q.autoclear_features, "{label}");
    assert_eq!(o.backing_file, q.backing_file, "{label}");
    assert_eq!(o.backing_format(), q.backing_format(), "{label}");
    // Every other header field is as it was.
    let s = header(&stale);
    assert_eq!(
        (o.size, o.l1_table_offset, o.refcount_table_offset, o.incompatible_features),
        (s.size, s.l1_table_offset, s.refcount_table_offset, s.incompatible_features),
        "{label}"
    );

    // QEMU leaks the old directory, tables and data clusters; so do we, the same count.
    let (q_corrupt, q_leaks) = qemu_check(path_str(&theirs));
    let (o_corrupt, o_leaks) = qemu_check(path_str(&ours));
    assert_eq!(q_corrupt, 0, "{label}");
    assert_eq!(o_corrupt, 0, "{label}");
    assert!(q_leaks > 0, "{label}: QEMU leaks the bitmap clusters");
    assert_eq!(q_leaks, stale_leaks, "{label}: QEMU frees none of them");
    assert_eq!(o_leaks, q_leaks, "{label}: leaked clusters");

    // No bitmaps and no warning any more; data and backing intact.
    let (n, backing_name, stderr) = qemu_info(path_str(&ours));
    assert_eq!(n, 0, "{label}");
    assert!(!stderr.contains("warning"), "{label}: {stderr}");
    assert_eq!(backing_name, qemu_info(path_str(&theirs)).1, "{label}");
    let out = qemu_io(["-f", "qcow2", "-r", "-c", "read -P 7 1M 64k", path_str(&ours)]).unwrap();
    assert!(!out.contains("verification failed"), "{label}: {out}");
    if backing {
        let out = qemu_io(["-f", "qcow2", "-r", "-c", "read -P 3 0 1M", path_str(&ours)]).unwrap();
        assert!(!out.contains("verification failed"), "{label}: {out}");
    }
    // And bitmaps can be added again afterwards, by QEMU.
    qemu_img(["bitmap", "--add", path_str(&ours), "again"]).unwrap_or_else(|e| {
        assert!(v2, "{label}: {e}");
        String::new()
    });
}

#[test]
fn writable_open_drops_the_stale_extension_as_qemu_does() {
    compare_with_qemu(false, false);
}

#[test]
fn writable_open_drops_the_stale_extension_with_a_backing_file() {
    compare_with_qemu(true, false);
}

#[test]
fn writable_open_drops_the_stale_extension_of_a_v2_image() {
    compare_with_qemu(false, true);
}

#[test]
fn read_only_open_leaves_the_stale_extension() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ro.qcow2");
    make_stale(&img, None, false);
    let before = std::fs::read(&img).unwrap();
    {
        let storage: Arc<dyn Storage> = Arc::new(FileStorage::open(&img, false).unwrap());
        let image = open(storage, false);
        assert!(image.has_stale_bitmaps());
        assert!(!image.drop_stale_bitmaps().unwrap(), "read-only: nothing to do");
        assert!(image.stored_bitmap_names().unwrap().is_empty(), "stale bitmaps are not listed");
    }
    assert_eq!(std::fs::read(&img).unwrap(), before);
}

/// A power cut at any point of the writable open leaves a header with the stale
/// extension (the next writable open drops it) or without it; never a corrupt image.
#[test]
fn power_cut_during_the_header_rewrite() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", path_str(&base), "64M"]).unwrap();
    let img = dir.path().join("pc.qcow2");
    make_stale(&img, Some(&base), false);
    let stale = std::fs::read(&img).unwrap();
    let old_types = ext_types(&header(&stale));

    let mem = Arc::new(MemStorage::from_bytes(stale.clone()).with_history());
    open(mem.clone(), true).close().unwrap();
    let new_types = ext_types(&header(&mem.durable_bytes()));
    assert_ne!(old_types, new_types);
    let history = mem.history().unwrap();
    assert!(history.flush_count() >= 1, "the rewrite is flushed");
    let (mut seen_old, mut seen_new, mut checked) = (false, false, 0);
    for n in 0..=history.flush_count() {
        for s in [Survivors::None, Survivors::All, Survivors::Torn(n as u64 * 13 + 5)] {
            let cut = Arc::new(history.power_cut_at_flush(n, s).unwrap());
            let label = format!("cut at flush {n}");
            let types = ext_types(&header(&cut.to_bytes()));
            seen_old |= types == old_types;
            seen_new |= types == new_types;
            assert!(types == old_types || types == new_types, "{label}: {types:x?}");
            let result = qcow2::check::check(cut.as_ref()).unwrap();
            assert_eq!(result.corruptions, 0, "{label}: {:?}", result.problems);
            assert_eq!(result.check_errors, 0, "{label}: {:?}", result.problems);
            // The next writable open finishes the job.
            let image = open(cut.clone(), true);
            assert!(image.header().extension(EXT_BITMAPS).is_none(), "{label}");
            image.close().unwrap();
            checked += 1;
        }
    }
    assert!(seen_old && seen_new, "both outcomes occur");
    eprintln!("{checked} power cuts checked");
}
