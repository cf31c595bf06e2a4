//! `blockdelta bitmap` against `qemu-img bitmap` (QEMU 10.0.2) on copies of the same
//! images: every command-line error, every operation and its failures, actions in
//! command-line order, merges within and across images. Stdout, stderr (but for the
//! program's name and QEMU's generated node numbers) and the exit code must be the same.
//! After a success both copies must hold the same bitmaps (`qemu-img info`), pass
//! `qemu-img check`, and, where bits can differ, give the same SHA-256 in
//! qemu-storage-daemon. After a refusal blockdelta must have left every image byte for
//! byte as it was (qemu-img rewrites the bitmap directory, and keeps what the actions
//! before the failing one did), and so after a success that changes nothing.
//!
//! Fails, never skips, if `qemu-img`, `qemu-io` or `qemu-storage-daemon` is missing.

mod common;

use std::path::Path;

use sha2::{Digest, Sha256};

use common::{Copies, blockdelta, info_bitmaps, qemu_bitmaps, qemu_img_path, run_in};
use testkit::{qemu_img, qemu_io};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// base: a (64 KiB) and fine (512 B) with writes recorded; src: s (1 MiB) with a write;
/// small: 32 MiB with s; inc: base plus bad, all left in use (inconsistent); v2: a
/// qcow2 v2 image; raw.img.
fn make_images(dir: &Path) {
    let p = |n: &str| dir.join(n);
    let base = p("base.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", s(&base), "64M"]).unwrap();
    qemu_img(["bitmap", "--add", s(&base), "a"]).unwrap();
    qemu_img(["bitmap", "--add", "-g", "512", s(&base), "fine"]).unwrap();
    qemu_io(["-f", "qcow2", "-c", "write 100k 3k", "-c", "write 50M 1M", s(&base)]).unwrap();
    let src = p("src.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", s(&src), "64M"]).unwrap();
    qemu_img(["bitmap", "--add", "-g", "1M", s(&src), "s"]).unwrap();
    qemu_io(["-f", "qcow2", "-c", "write 5M 1k", "-c", "write 63M 1M", s(&src)]).unwrap();
    let small = p("small.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", s(&small), "32M"]).unwrap();
    qemu_img(["bitmap", "--add", s(&small), "s"]).unwrap();
    let inc = p("inc.qcow2");
    std::fs::copy(&base, &inc).unwrap();
    qemu_img(["bitmap", "--add", s(&inc), "bad"]).unwrap();
    // qemu-io aborts with the image open read-write: its bitmaps stay in use.
    let status = std::process::Command::new(testkit::require_tool("qemu-io"))
        .args(["-f", "qcow2", "-c", "write 0 64k", "-c", "abort", s(&inc)])
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success());
    qemu_img(["create", "-q", "-f", "qcow2", "-o", "compat=0.10", s(&p("v2.qcow2")), "64M"])
        .unwrap();
    std::fs::File::create(p("raw.img")).unwrap().set_len(64 << 20).unwrap();
}

const IMAGES: [&str; 6] =
    ["base.qcow2", "src.qcow2", "small.qcow2", "inc.qcow2", "v2.qcow2", "raw.img"];

/// The SHA-256 of a whole file.
fn file_sha256(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs `bitmap ARGS` with both programs on fresh copies and compares what they print;
/// returns blockdelta's outcome and the copies.
fn run_both(images: &Path, work: &Path, args: &[&str]) -> (common::Outcome, Copies) {
    let copies = Copies::new(images, work);
    let full = [&["bitmap"], args].concat();
    let ours = run_in(&blockdelta(), &full, &copies.ours);
    let qemu = run_in(&qemu_img_path(), &full, &copies.qemu);
    assert_eq!(ours, qemu, "bitmap {args:?}");
    (ours, copies)
}

/// Every image of blockdelta's copy is byte for byte the original.
fn assert_untouched(images: &Path, copies: &Copies, args: &[&str]) {
    for image in IMAGES {
        assert_eq!(
            file_sha256(&copies.ours.join(image)),
            file_sha256(&images.join(image)),
            "bitmap {args:?} changed {image}"
        );
    }
}

/// A refused `bitmap ARGS`: the same texts and exit code as qemu-img's, and no image
/// changed by blockdelta. Returns the exit code.
fn compare_refused(images: &Path, work: &Path, args: &[&str]) -> i32 {
    let (ours, copies) = run_both(images, work, args);
    assert_untouched(images, &copies, args);
    ours.code
}

/// Runs `bitmap ARGS` with both programs on fresh copies and compares everything.
/// `shas`: also compare every bitmap's SHA-256 of the qcow2 images in qemu-storage-daemon.
fn compare(images: &Path, work: &Path, args: &[&str], shas: bool) -> i32 {
    let (ours, copies) = run_both(images, work, args);
    for image in IMAGES {
        let (o, q) = (copies.ours.join(image), copies.qemu.join(image));
        assert_eq!(info_bitmaps(&o), info_bitmaps(&q), "bitmap {args:?}: {image}");
        if image.ends_with(".qcow2") {
            let check = common::qemu_check(&o);
            assert_eq!(check.code, 0, "bitmap {args:?}: {image}: {check:?}");
            if shas && image != "v2.qcow2" {
                assert_eq!(qemu_bitmaps(&o), qemu_bitmaps(&q), "bitmap {args:?}: {image}");
            }
        }
    }
    ours.code
}

#[test]
fn command_line_errors_are_qemu_img_s() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    make_images(&images);
    let work = dir.path().join("work");
    let long = "n".repeat(1024);
    let cases: Vec<Vec<&str>> = vec![
        vec!["base.qcow2", "a"],
        vec!["-g", "64k", "base.qcow2", "a"],
        vec!["--clear", "-g", "64k", "base.qcow2", "a"],
        vec!["--clear", "-g", "64k", "-F", "qcow2", "-b", "z", "base.qcow2", "a"],
        vec!["--clear", "-F", "qcow2", "-b", "z", "base.qcow2", "a"],
        vec!["--clear", "-b", "src.qcow2", "base.qcow2", "a"],
        vec!["--merge", "s", "-F", "qcow2", "base.qcow2", "a"],
        vec!["--add", "-F", "qcow2", "base.qcow2", "x"],
        vec!["--add", "base.qcow2"],
        vec!["--add", "base.qcow2", "a", "c"],
        vec!["--clear", "-g", "1x", "base.qcow2", "a"],
        vec!["--add", "-g", "1x", "base.qcow2", "g"],
        vec!["--add", "-g", "-1", "base.qcow2", "g"],
        vec!["--add", "-g", "64kB", "base.qcow2", "g"],
        vec!["--add", "-g", "16E", "base.qcow2", "g"],
        vec!["--add", "-g", "1000", "base.qcow2", "g"],
        vec!["--add", "-g", "256", "base.qcow2", "g"],
        vec!["--add", "-g", "1.5k", "base.qcow2", "g"],
        vec!["--add", "-g", "4G", "base.qcow2", "g"],
        vec!["--add", "nosuch.qcow2", "x"],
        vec!["--add", "base.qcow2", ""],
        vec!["--add", "base.qcow2", &long],
        vec!["--enable", "base.qcow2", ""],
        vec!["--remove", "base.qcow2", "nosuch"],
        vec!["--clear", "--enable", "base.qcow2", "nosuch"],
        vec!["--merge", "nosuch", "base.qcow2", "a"],
        vec!["--merge", "a", "base.qcow2", "nosuch"],
        vec!["--add", "base.qcow2", "a"],
        vec!["--add", "--add", "base.qcow2", "x"],
        vec!["--remove", "--remove", "base.qcow2", "a"],
        vec!["--add", "v2.qcow2", "x"],
        vec!["--remove", "v2.qcow2", "x"],
        vec!["--add", "raw.img", "x"],
        vec!["--clear", "raw.img", "x"],
        vec!["--add", "-f", "raw", "base.qcow2", "x"],
        vec!["--add", "-f", "qcow2", "raw.img", "x"],
        vec!["--clear", "inc.qcow2", "bad"],
        vec!["--enable", "inc.qcow2", "a"],
        vec!["--disable", "inc.qcow2", "bad"],
        vec!["--merge", "bad", "inc.qcow2", "a"],
        vec!["--add", "inc.qcow2", "c", "--merge", "bad"],
        vec!["--merge", "bad", "-b", "inc.qcow2", "base.qcow2", "a"],
        vec!["--merge", "s", "-b", "small.qcow2", "base.qcow2", "a"],
        vec!["--merge", "s", "-b", "nosuch.qcow2", "base.qcow2", "a"],
        vec!["--add", "--merge", "s", "-b", "nosuch.qcow2", "base.qcow2", "n"],
        vec!["--merge", "s", "-b", "nosuch1.qcow2", "nosuch2.qcow2", "x"],
        vec!["--merge", "a", "-b", "base.qcow2", "base.qcow2", "fine"],
        vec!["--merge", "s", "--merge", "t", "-b", "src.qcow2", "base.qcow2", "a"],
        vec!["--merge", "s", "-b", "src.qcow2", "-F", "raw", "base.qcow2", "a"],
        vec!["--merge", "s", "-b", "src.qcow2", "base.qcow2", "nosuch"],
        // Every kind of refusal once more, some after actions that succeeded (which
        // qemu-img keeps, and blockdelta must not).
        vec!["--enable", "base.qcow2", "nosuch"],
        vec!["--disable", "base.qcow2", "nosuch"],
        vec!["--clear", "base.qcow2", "nosuch"],
        vec!["--merge", "a", "base.qcow2", "nosuch"],
        vec!["--add", "--disable", "--merge", "nosuch", "base.qcow2", "n"],
        vec!["--clear", "--merge", "nosuch", "base.qcow2", "a"],
        vec!["--remove", "--add", "-g", "256", "base.qcow2", "a"],
        vec!["--remove", "--merge", "fine", "base.qcow2", "a"],
        vec!["--add", "-g", "4G", "base.qcow2", "a"],
        vec!["--disable", "--add", "base.qcow2", "fine"],
        vec!["--clear", "--merge", "s", "-b", "small.qcow2", "base.qcow2", "a"],
        vec!["--clear", "--merge", "nosuch", "-b", "src.qcow2", "base.qcow2", "a"],
        vec!["--remove", "--remove", "inc.qcow2", "bad"],
        vec!["--add", "small.qcow2", "t", "--merge", "s", "-b", "src.qcow2"],
    ];
    for args in &cases {
        let code = compare_refused(&images, &work, args);
        assert_eq!(code, 1, "bitmap {args:?} should fail");
    }
    // One error text in full, hint included.
    let copies = Copies::new(&images, &work);
    let out = run_in(&blockdelta(), &["bitmap", "--clear", "inc.qcow2", "bad"], &copies.ours);
    assert_eq!(
        out.stderr,
        "PROG: Operation clear on bitmap bad failed: Bitmap 'bad' is inconsistent and cannot \
         be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk\n"
    );
}

#[test]
fn operations_leave_what_qemu_img_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    make_images(&images);
    let work = dir.path().join("work");
    let cases: Vec<Vec<&str>> = vec![
        vec!["--add", "base.qcow2", "b"],
        vec!["--add", "-g", "0", "base.qcow2", "g"],
        vec!["--clear", "-g", "0", "base.qcow2", "a"],
        vec!["--add", "-g", "2G", "base.qcow2", "g"],
        vec!["--add", "-g", "0x200", "base.qcow2", "g"],
        vec!["--add", "-g", "64k", "--remove", "base.qcow2", "g"],
        vec![
            "--add",
            "--disable",
            "--enable",
            "--clear",
            "--remove",
            "--add",
            "-g",
            "1M",
            "--disable",
            "base.qcow2",
            "y",
        ],
        vec!["--add", "-g", "64k", "-g", "1M", "base.qcow2", "z"],
        vec!["--clear", "base.qcow2", "a"],
        vec!["--disable", "base.qcow2", "fine"],
        vec!["--disable", "--enable", "base.qcow2", "fine"],
        vec!["--remove", "base.qcow2", "fine"],
        vec!["--add", "base.qcow2", "c", "--merge", "fine", "--merge", "a"],
        vec!["--add", "-g", "512", "base.qcow2", "c", "--merge", "a"],
        vec!["--merge", "fine", "base.qcow2", "a"],
        vec!["--merge", "s", "-b", "src.qcow2", "base.qcow2", "fine"],
        vec!["--add", "--merge", "s", "-b", "src.qcow2", "-F", "qcow2", "base.qcow2", "n"],
        vec!["--merge", "s", "-b", "small.qcow2", "-b", "src.qcow2", "base.qcow2", "a"],
        vec!["--merge", "fine", "-b", "base.qcow2", "src.qcow2", "s"],
        vec!["--remove", "inc.qcow2", "bad"],
        vec!["--remove", "--add", "-g", "4k", "--merge", "a", "-b", "base.qcow2", "inc.qcow2", "a"],
    ];
    for args in &cases {
        let code = compare(&images, &work, args, true);
        assert_eq!(code, 0, "bitmap {args:?} should succeed");
    }
}

/// A command whose actions all succeed but leave the bitmaps as they were writes
/// nothing (qemu-img rewrites the directory all the same).
#[test]
fn a_command_that_changes_nothing_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    make_images(&images);
    let work = dir.path().join("work");
    let cases: Vec<Vec<&str>> = vec![
        vec!["--enable", "base.qcow2", "a"],
        vec!["--disable", "--enable", "base.qcow2", "fine"],
        vec!["--add", "-g", "64k", "--remove", "base.qcow2", "g"],
        vec!["--add", "--remove", "--add", "-g", "1M", "--remove", "base.qcow2", "g"],
        vec!["--clear", "small.qcow2", "s"],
        vec!["--merge", "a", "base.qcow2", "a"],
    ];
    for args in &cases {
        let code = compare(&images, &work, args, false);
        assert_eq!(code, 0, "bitmap {args:?} should succeed");
        let (_, copies) = run_both(&images, &work, args);
        assert_untouched(&images, &copies, args);
    }
}

/// While another process has the image open, both refuse it with the same message.
#[test]
fn a_busy_image_is_refused_like_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    make_images(&images);
    let copies = Copies::new(&images, &dir.path().join("work"));
    let _daemons: Vec<_> = [&copies.ours, &copies.qemu]
        .into_iter()
        .map(|d| {
            testkit::qsd::StorageDaemon::qemu()
                .arg("--blockdev")
                .arg(format!("driver=file,node-name=f,filename={}", d.join("src.qcow2").display()))
                .arg("--blockdev")
                .arg("driver=qcow2,node-name=d,file=f")
                .start()
                .unwrap()
        })
        .collect();
    for args in [
        &["bitmap", "--add", "src.qcow2", "x"][..],
        &["bitmap", "--merge", "s", "-b", "src.qcow2", "base.qcow2", "a"],
    ] {
        let ours = run_in(&blockdelta(), args, &copies.ours);
        let qemu = run_in(&qemu_img_path(), args, &copies.qemu);
        assert_eq!(ours, qemu, "{args:?}");
        assert_eq!(ours.code, 1);
        assert!(ours.stderr.contains("lock\nIs another process using the image"), "{ours:?}");
    }
}
