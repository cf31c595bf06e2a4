//! Backing chains: qcow2 over qcow2 over raw, with overrides at every level and
//! backing images shorter than the image above them.

mod read_support;

use std::sync::Arc;

use qcow2::{BackingImage, OpenOptions, Qcow2Error, Qcow2Image, RawImage};
use read_support::*;

/// base.raw (2 MiB) <- mid.qcow2 (4 MiB, absolute backing name) <- top.qcow2 (6 MiB,
/// relative backing name).
fn chain(d: &Dir) -> std::path::PathBuf {
    let base = d.path("base.raw");
    img(&["create", "-q", "-f", "raw", &base.display().to_string(), "2M"]);
    io("raw", &base, &["write -P 0xb0 0 1M", "write -P 0xb1 1536k 100k"]);
    let mid = d.path("mid.qcow2");
    create(&mid, "4M", "cluster_size=4096", Some((&base, "raw")));
    io(
        "qcow2",
        &mid,
        &[
            "write -P 0xc0 256k 64k",
            "write -P 0xc1 1000 10",
            "write -z 512k 64k",
            "write -P 0xc2 3M 64k",
            "write -P 0xc3 2000k 100k",
        ],
    );
    let top = d.path("top.qcow2");
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        &top.display().to_string(),
        "6M",
    ]);
    io(
        "qcow2",
        &top,
        &[
            "write -P 0xd0 300k 8k",
            "write -z 0 32k",
            "write -P 0xd1 520k 3",
            "write -c -P 0xd2 1M 64k",
            "write -P 0xd3 5M 4k",
            "write -z 3M 64k",
        ],
    );
    top
}

#[test]
fn three_deep_chain_reads_like_qemu() {
    let d = Dir::new();
    let top = chain(&d);
    let image = assert_reads_like_qemu(&top);
    assert_eq!(image.backing_format().as_deref(), Some("qcow2"));
    let mid = image.backing().unwrap();
    assert_eq!(mid.len(), 4 << 20);
    check_refcounts(&image);
    assert_map_like_qemu(&top);
    assert_map_like_qemu(&d.path("mid.qcow2"));
}

#[test]
fn backing_supplied_by_the_caller() {
    let d = Dir::new();
    let base = d.path("base.raw");
    std::fs::write(&base, vec![0xeeu8; 100_000]).unwrap();
    let top = d.path("top.qcow2");
    create(&top, "1M", "cluster_size=4096", Some((&base, "raw")));
    io("qcow2", &top, &["write -P 0x01 8k 4k"]);
    let storage = || -> Arc<dyn qcow2::storage::Storage> {
        Arc::new(qcow2::storage::FileStorage::open(&top, false).unwrap())
    };
    // Without a backing image the open fails, unless asked to ignore it.
    assert!(matches!(
        Qcow2Image::open(storage(), OpenOptions::default()),
        Err(Qcow2Error::Backing { .. })
    ));
    let alone =
        Qcow2Image::open(storage(), OpenOptions { ignore_backing: true, ..Default::default() })
            .unwrap();
    let mut buf = vec![0u8; 1 << 20];
    alone.read_at(&mut buf, 0).unwrap();
    assert!(buf[..8192].iter().all(|&b| b == 0));
    let raw: Arc<dyn BackingImage> = Arc::new(RawImage::open(&base).unwrap());
    let image =
        Qcow2Image::open(storage(), OpenOptions { backing: Some(raw), ..Default::default() })
            .unwrap();
    image.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, qemu_contents(&top));
    assert!(buf[..8192].iter().all(|&b| b == 0xee));
    assert!(buf[100_000..].iter().all(|&b| b == 0));
}

#[test]
fn backing_loops_and_missing_files_are_errors() {
    let d = Dir::new();
    let a = d.path("a.qcow2");
    let b = d.path("b.qcow2");
    create(&b, "1M", "", None);
    create(&a, "1M", "", Some((&b, "qcow2")));
    img(&["rebase", "-u", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", &b.display().to_string()]);
    let err = Qcow2Image::open_path(&a, false).unwrap_err();
    assert!(err.to_string().contains("loop"), "{err}");

    let s = d.path("self.qcow2");
    create(&s, "1M", "", None);
    img(&[
        "rebase",
        "-u",
        "-f",
        "qcow2",
        "-b",
        "self.qcow2",
        "-F",
        "qcow2",
        &s.display().to_string(),
    ]);
    assert!(Qcow2Image::open_path(&s, false).is_err());

    let m = d.path("m.qcow2");
    create(&m, "1M", "", None);
    img(&["rebase", "-u", "-f", "qcow2", "-b", "gone.raw", "-F", "raw", &m.display().to_string()]);
    let err = Qcow2Image::open_path(&m, false).unwrap_err();
    assert!(err.to_string().contains("gone.raw"), "{err}");

    let f = d.path("f.qcow2");
    create(&f, "1M", "", None);
    img(&["rebase", "-u", "-f", "qcow2", "-b", "b.qcow2", "-F", "vmdk", &f.display().to_string()]);
    let err = Qcow2Image::open_path(&f, false).unwrap_err();
    assert!(err.to_string().contains("vmdk"), "{err}");
}

#[test]
fn deep_chain_is_limited() {
    let d = Dir::new();
    let mut prev = d.path("l0.qcow2");
    create(&prev, "64k", "", None);
    for i in 1..=66 {
        let p = d.path(&format!("l{i}.qcow2"));
        img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            &format!("l{}.qcow2", i - 1),
            "-F",
            "qcow2",
            &p.display().to_string(),
            "64k",
        ]);
        prev = p;
    }
    let err = Qcow2Image::open_path(&prev, false).unwrap_err();
    assert!(err.to_string().contains("deeper"), "{err}");
    assert!(Qcow2Image::open_path(&d.path("l60.qcow2"), false).is_ok());
}
