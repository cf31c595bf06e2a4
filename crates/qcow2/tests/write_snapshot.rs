//! Writes through the engine on images with internal snapshots (shared clusters and
//! shared L2 tables, refcount 2) and with compressed clusters: the snapshot stays intact
//! (`qemu-img snapshot -a` on a copy gives the old contents back), `qemu-img check` is
//! clean (so the COPIED flags match the refcounts), and the new contents are as written.

mod write_support;

use std::path::Path;

use qcow2::Qcow2Image;
use write_support::*;

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn io(p: &Path, cmds: &[&str]) {
    let mut args: Vec<String> = vec!["-f".into(), "qcow2".into(), s(p)];
    for c in cmds {
        args.push("-c".into());
        args.push((*c).into());
    }
    testkit::qemu_io(&args).unwrap();
}

fn raw_contents(p: &Path, out: &Path) -> Vec<u8> {
    img(&["convert", "-O", "raw", &s(p), &s(out)]);
    std::fs::read(out).unwrap()
}

/// Engine writes over `p`, mirrored in `model`.
fn scribble(p: &Path, model: &mut [u8], cs: u64) {
    let image = Qcow2Image::open_path(p, true).unwrap();
    let mut write = |off: u64, len: u64, seed: u64| {
        let data = pattern(seed, len as usize);
        image.write_at(&data, off).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
    };
    write(100, 10, 1);
    write(cs * 3, cs, 2);
    write(cs * 5 - 7, 20, 3);
    write(1 << 20, 300_000, 4);
    write(3 << 20, cs / 2, 5);
    image.flush().unwrap();
    write(150, 1000, 6);
    image.write_zeroes(cs * 8, cs * 2, false).unwrap();
    model[(cs * 8) as usize..(cs * 10) as usize].fill(0);
    image.write_zeroes(cs * 12, cs, true).unwrap();
    model[(cs * 12) as usize..(cs * 13) as usize].fill(0);
    image.discard(cs * 20, cs * 3).unwrap();
    model[(cs * 20) as usize..(cs * 23) as usize].fill(0);
    let mut back = vec![0u8; model.len()];
    image.read_at(&mut back, 0).unwrap();
    assert!(back == model, "engine reads what it wrote");
    image.close().unwrap();
}

#[test]
fn snapshot_stays_intact() {
    for cs in [512u64, 65536] {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.qcow2");
        create(&p, 4 << 20, &format!("cluster_size={cs}"), None);
        io(&p, &["write -P 0x11 0 2M", "write -P 0x22 3M 512k", "write -z 2M 64k"]);
        img(&["snapshot", "-c", "s1", &s(&p)]);
        let before = raw_contents(&p, &d.path().join("before.raw"));
        let mut model = before.clone();
        scribble(&p, &mut model, cs);
        assert_clean(&p, &format!("cs {cs} after writes"));
        let raw = d.path().join("model.raw");
        std::fs::write(&raw, &model).unwrap();
        assert_same_as_raw(&p, &raw, &format!("cs {cs} new contents"));
        // A second round over the now unshared clusters (in place).
        let mut model2 = model.clone();
        scribble(&p, &mut model2, cs);
        assert_clean(&p, &format!("cs {cs} after second writes"));
        let copy = d.path().join("copy.qcow2");
        std::fs::copy(&p, &copy).unwrap();
        img(&["snapshot", "-a", "s1", &s(&copy)]);
        assert_clean(&copy, &format!("cs {cs} after snapshot -a"));
        let back = raw_contents(&copy, &d.path().join("back.raw"));
        assert!(back == before, "cs {cs}: the snapshot's contents changed");
        // The snapshot can be deleted afterwards and the image stays clean.
        img(&["snapshot", "-d", "s1", &s(&p)]);
        assert_clean(&p, &format!("cs {cs} after snapshot -d"));
    }
}

#[test]
fn compressed_clusters_are_copied_on_write() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.qcow2");
    create(&src, 4 << 20, "", None);
    io(&src, &["write -P 0x33 0 4M"]);
    let p = d.path().join("c.qcow2");
    img(&["convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096", &s(&src), &s(&p)]);
    let mut model = raw_contents(&p, &d.path().join("before.raw"));
    scribble(&p, &mut model, 4096);
    assert_clean(&p, "compressed");
    let raw = d.path().join("model.raw");
    std::fs::write(&raw, &model).unwrap();
    assert_same_as_raw(&p, &raw, "compressed");
}
