//! `blockdelta check` against `qemu-img check` (QEMU 10.0.2) on copies of the same
//! images: clean, empty, fragmented, compressed, with bitmaps, leaky, corrupt, and
//! unreadable refcounts; without repair, with `-r leaks` and with `-r all`; human and
//! JSON output. Stdout, stderr (but for the program's name) and the exit code must be
//! the same, and after a repair `qemu-img check` must agree with the result.
//!
//! Fails, never skips, if `qemu-img`, `qemu-io` or `qemu-storage-daemon` is missing.

mod common;

use std::path::Path;

use common::{Copies, Layout, Outcome, add_leaks, blockdelta, qemu_bitmaps, qemu_img_path, run_in};
use testkit::{qemu_img, qemu_io};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Images with every kind of finding our check makes; returns (name, what -r all does:
/// true when blockdelta can repair everything qemu-img finds).
fn make_images(dir: &Path) -> Vec<(&'static str, bool)> {
    let p = |n: &str| dir.join(n);
    qemu_img(["create", "-q", "-f", "qcow2", s(&p("empty.qcow2")), "64M"]).unwrap();
    qemu_img(["create", "-q", "-f", "qcow2", s(&p("clean.qcow2")), "64M"]).unwrap();
    qemu_io(["-f", "qcow2", "-c", "write 0 1M", s(&p("clean.qcow2"))]).unwrap();
    // Guest clusters written out of order: 3 of 5 are fragmented.
    qemu_img(["create", "-q", "-f", "qcow2", s(&p("frag.qcow2")), "64M"]).unwrap();
    qemu_io([
        "-f",
        "qcow2",
        "-c",
        "write 1M 64k",
        "-c",
        "write 0 64k",
        "-c",
        "write 2M 128k",
        "-c",
        "write 64k 64k",
        s(&p("frag.qcow2")),
    ])
    .unwrap();
    qemu_img(["convert", "-c", "-O", "qcow2", s(&p("clean.qcow2")), s(&p("comp.qcow2"))]).unwrap();
    qemu_io(["-f", "qcow2", "-c", "write 4M 64k", s(&p("comp.qcow2"))]).unwrap();

    // Leaks: clusters past the last one used, with refcount 1.
    std::fs::copy(p("clean.qcow2"), p("leak.qcow2")).unwrap();
    add_leaks(&p("leak.qcow2"), 2);

    // Bitmaps with data (directory, tables, data clusters must count as referenced),
    // and a leak to repair next to them.
    let bm = p("bitmaps.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", s(&bm), "64M"]).unwrap();
    qemu_img(["bitmap", "--add", s(&bm), "b64k"]).unwrap();
    qemu_img(["bitmap", "--add", "-g", "512", s(&bm), "b512"]).unwrap();
    qemu_img(["bitmap", "--add", "-g", "2M", s(&bm), "b2m"]).unwrap();
    qemu_io(["-f", "qcow2", "-c", "write 0 100k", "-c", "write 40M 3M", s(&bm)]).unwrap();
    qemu_img(["bitmap", "--disable", s(&bm), "b2m"]).unwrap();
    std::fs::copy(&bm, p("bitmaps-leak.qcow2")).unwrap();
    add_leaks(&p("bitmaps-leak.qcow2"), 3);

    // A referenced data cluster with refcount 0 (needs a rebuild), and a leak.
    let all = p("zero-refcount.qcow2");
    std::fs::copy(p("frag.qcow2"), &all).unwrap();
    let layout = Layout::of(&all);
    layout.set_refcount(&all, layout.data(&all, 0) / 65536, 0);
    add_leaks(&all, 1);

    // Two L2 entries naming one cluster: refcount 1, two references; the other
    // cluster leaks.
    let dup = p("dup.qcow2");
    std::fs::copy(p("frag.qcow2"), &dup).unwrap();
    let layout = Layout::of(&dup);
    let second = common::read_be64(&dup, layout.l2 + 8);
    common::poke(&dup, layout.l2, &second.to_be_bytes());

    // The refcount block is at an offset no file has: every refcount is unreadable.
    let ce = p("check-errors.qcow2");
    std::fs::copy(p("frag.qcow2"), &ce).unwrap();
    let reftable = common::read_be64(&ce, 48);
    common::poke(&ce, reftable, &0x7fff_ffff_ffff_0000u64.to_be_bytes());

    vec![
        ("empty.qcow2", true),
        ("clean.qcow2", true),
        ("frag.qcow2", true),
        ("comp.qcow2", true),
        ("leak.qcow2", true),
        ("bitmaps.qcow2", true),
        ("bitmaps-leak.qcow2", true),
        ("zero-refcount.qcow2", false),
        ("dup.qcow2", false),
        ("check-errors.qcow2", false),
    ]
}

fn both(copies: &Copies, args: &[&str]) -> (Outcome, Outcome) {
    let ours = run_in(&blockdelta(), &[&["check"], args].concat(), &copies.ours);
    let qemu = run_in(&qemu_img_path(), &[&["check"], args].concat(), &copies.qemu);
    (ours, qemu)
}

#[test]
fn check_agrees_with_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    let list = make_images(&images);
    let mut seen_codes = std::collections::BTreeSet::new();
    for (image, repairable) in &list {
        for repair in [None, Some("leaks"), Some("all")] {
            for output in ["human", "json"] {
                let copies = Copies::new(&images, &dir.path().join("work"));
                let mut args = vec![format!("--output={output}")];
                if let Some(r) = repair {
                    args.extend(["-r".to_string(), r.to_string()]);
                }
                args.push(image.to_string());
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let (ours, qemu) = both(&copies, &args);
                let what = format!("check {args:?}");
                if repair == Some("all") && !repairable {
                    // qemu-img rebuilds refcounts; blockdelta refuses and changes nothing.
                    assert_eq!(ours.code, 1, "{what}: {ours:?}");
                    assert!(
                        ours.stderr.contains("blockdelta repairs only leaked clusters"),
                        "{what}: {ours:?}"
                    );
                    assert_eq!(
                        std::fs::read(copies.ours.join(image)).unwrap(),
                        std::fs::read(images.join(image)).unwrap(),
                        "{what}: the image changed"
                    );
                    continue;
                }
                assert_eq!(ours, qemu, "{what}");
                seen_codes.insert(ours.code);
                if repair.is_some() {
                    // Whatever we left, qemu-img finds the same as on its own copy.
                    let after_ours = common::qemu_check(&copies.ours.join(image));
                    let after_qemu = common::qemu_check(&copies.qemu.join(image));
                    assert_eq!(after_ours.code, after_qemu.code, "{what}: {after_ours:?}");
                }
            }
        }
    }
    // Every exit code of qemu-img check was met: clean, failed, corrupt, leaky.
    assert_eq!(seen_codes.into_iter().collect::<Vec<_>>(), [0, 1, 2, 3]);
}

#[test]
fn leak_repair_keeps_bitmaps_whole() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    make_images(&images);
    let img = images.join("bitmaps-leak.qcow2");
    let before = qemu_bitmaps(&img);
    assert_eq!(before.len(), 3);
    let out = run_in(&blockdelta(), &["check", "-r", "leaks", "bitmaps-leak.qcow2"], &images);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("    3 leaked clusters\n"), "{out:?}");
    let after = common::qemu_check(&img);
    assert_eq!(after.code, 0, "{after:?}");
    assert!(after.stdout.starts_with("No errors were found on the image.\n"), "{after:?}");
    assert_eq!(qemu_bitmaps(&img), before, "the repair changed a bitmap");
}

#[test]
fn check_refuses_like_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    std::fs::File::create(images.join("raw.img")).unwrap().set_len(1 << 20).unwrap();
    qemu_img(["create", "-q", "-f", "qcow2", s(&images.join("a.qcow2")), "1M"]).unwrap();
    let copies = Copies::new(&images, &dir.path().join("work"));
    let cases: &[&[&str]] = &[
        &["raw.img"],
        &["--output=json", "raw.img"],
        &["-f", "raw", "a.qcow2"],
        &["-f", "qcow2", "raw.img"],
        &["nosuch.qcow2"],
        &["-U", "-r", "leaks", "a.qcow2"],
        &["-q", "a.qcow2"],
        &["-q", "--output=json", "a.qcow2"],
    ];
    for args in cases {
        let (ours, qemu) = both(&copies, args);
        assert_eq!(ours, qemu, "check {args:?}");
    }
    let (ours, _) = both(&copies, &["raw.img"]);
    assert_eq!(ours.code, 63);
    assert_eq!(ours.stderr, "PROG: This image format does not support checks\n");

    // While qemu-storage-daemon has the image open read-write, a check needs -U, and a
    // repair is refused: the same lock messages as qemu-img.
    let img = copies.ours.join("a.qcow2");
    let img_qemu = copies.qemu.join("a.qcow2");
    let _daemons: Vec<_> = [&img, &img_qemu]
        .into_iter()
        .map(|img| {
            testkit::qsd::StorageDaemon::qemu()
                .arg("--blockdev")
                .arg(format!("driver=file,node-name=f,filename={}", img.display()))
                .arg("--blockdev")
                .arg("driver=qcow2,node-name=d,file=f")
                .start()
                .unwrap()
        })
        .collect();
    for args in [&["a.qcow2"][..], &["-r", "leaks", "a.qcow2"], &["-U", "a.qcow2"]] {
        let (ours, qemu) = both(&copies, args);
        assert_eq!(ours, qemu, "check {args:?} on a busy image");
    }
}

/// `-p` shows progress on stderr, ending at 100%, and changes nothing else.
#[test]
fn progress_goes_to_stderr_and_leaves_the_report_alone() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("p.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", s(&image), "2G"]).unwrap();
    qemu_io(["-f", "qcow2", "-c", "write 0 1M", "-c", "write 1G 1M", s(&image)]).unwrap();
    let plain = run_in(&blockdelta(), &["check", s(&image)], dir.path());
    let with = run_in(&blockdelta(), &["check", "-p", s(&image)], dir.path());
    assert_eq!(plain.stdout, with.stdout);
    assert_eq!(plain.code, with.code);
    assert!(plain.stderr.is_empty(), "{}", plain.stderr);
    assert!(with.stderr.contains("    (0.00/100%)\r"), "{:?}", with.stderr);
    assert!(with.stderr.contains("(100.00/100%)"), "{:?}", with.stderr);
}
