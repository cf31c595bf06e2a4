//! The write path against an in-memory byte model: random writes, zero writes,
//! discards, reads, flushes and reopens on qcow2 images of several cluster sizes,
//! with and without a backing file (qcow2 or raw), v3 and v2. Every read must match
//! the model; at the end `qemu-img check` must be clean (no corruption, no leak) and
//! `qemu-img compare` must find the image identical to the model.

mod write_support;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use qcow2::Qcow2Image;
use write_support::*;

#[derive(Debug, Clone)]
enum Op {
    Write { a: u64, b: u64, seed: u64 },
    Zero { a: u64, b: u64, unmap: bool },
    Discard { a: u64, b: u64 },
    Read { a: u64, b: u64 },
    Flush,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(a, b, seed)| Op::Write { a, b, seed }),
        2 => (any::<u64>(), any::<u64>(), any::<bool>()).prop_map(|(a, b, unmap)| Op::Zero { a, b, unmap }),
        2 => (any::<u64>(), any::<u64>()).prop_map(|(a, b)| Op::Discard { a, b }),
        5 => (any::<u64>(), any::<u64>()).prop_map(|(a, b)| Op::Read { a, b }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Backing {
    None,
    Raw,
    Qcow2,
}

#[derive(Debug, Clone, Copy)]
struct Cfg {
    cluster: u64,
    size: u64,
    opts: &'static str,
    backing: Backing,
    v2: bool,
    /// Start from compressed data with an internal snapshot (no backing file): every
    /// cluster is compressed and shared with the snapshot; at the end the snapshot must
    /// still hold the initial data.
    snapshot: bool,
}

/// A guest range from two random numbers: often cluster-aligned, sometimes ending just
/// before a boundary, sometimes anywhere.
fn range(cfg: &Cfg, a: u64, b: u64) -> (u64, u64) {
    let cs = cfg.cluster;
    let n = cfg.size.div_ceil(cs);
    let off = match a % 4 {
        0 => (a >> 2) % n * cs,
        1 => ((a >> 2) % n * cs + cs).saturating_sub(1 + (a >> 40) % 600),
        _ => (a >> 2) % cfg.size,
    }
    .min(cfg.size - 1);
    let len = match b % 4 {
        0 => (1 + (b >> 2) % 3) * cs,
        1 => 1 + (b >> 2) % 700,
        _ => 1 + (b >> 2) % (2 * cs),
    };
    (off, len.min(cfg.size - off))
}

/// Opens the image writable, retrying while a `qemu-img` forked by a parallel test
/// still shares the descriptor of the previous open (and so its lock).
fn open(p: &Path) -> Qcow2Image {
    let mut tries = 0;
    loop {
        match Qcow2Image::open_path(p, true) {
            Ok(image) => return image,
            Err(e) if tries < 100 && e.to_string().contains("lock") => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("opening {p:?}: {e}"),
        }
    }
}

fn run_case(cfg: &Cfg, ops: &[Op]) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.qcow2");
    let cs = cfg.cluster;
    let mut model = vec![0u8; cfg.size as usize];
    let mut opts = format!("cluster_size={cs}");
    if !cfg.opts.is_empty() {
        opts.push(',');
        opts.push_str(cfg.opts);
    }
    if cfg.v2 {
        opts.push_str(",compat=0.10");
    }
    // The backing file is shorter than the image and not cluster-aligned.
    let bsize = (cfg.size - cs / 2 - 512) / 512 * 512;
    let braw = dir.path().join("b.raw");
    if cfg.backing != Backing::None {
        let data = pattern(0xbacc, bsize as usize);
        std::fs::write(&braw, &data).unwrap();
        model[..bsize as usize].copy_from_slice(&data);
    }
    // Compressible (two random bits a byte), so that `convert -c` does compress.
    let initial: Vec<u8> = pattern(0x5a, cfg.size as usize).iter().map(|b| b & 3).collect();
    match cfg.backing {
        Backing::None if cfg.snapshot => {
            let raw = dir.path().join("initial.raw");
            std::fs::write(&raw, &initial).unwrap();
            img(&["convert", "-q", "-c", "-O", "qcow2", "-o", &opts, &s(&raw), &s(&p)]);
            img(&["snapshot", "-c", "s1", &s(&p)]);
            let map = img(&["map", "--output=json", &s(&p)]);
            assert!(map.contains("\"compressed\": true"), "{map}");
            model.copy_from_slice(&initial);
        }
        Backing::None => create(&p, cfg.size, &opts, None),
        Backing::Raw => create(&p, cfg.size, &opts, Some((&braw, "raw"))),
        Backing::Qcow2 => {
            let bq = dir.path().join("b.qcow2");
            let c = format!("cluster_size={}", (cs * 2).min(2 << 20));
            img(&["convert", "-q", "-O", "qcow2", "-o", &c, &s(&braw), &s(&bq)]);
            // Leave a hole in the backing image.
            write_support::img(&["resize", "-q", "-f", "qcow2", &s(&bq), &bsize.to_string()]);
            create(&p, cfg.size, &opts, Some((&bq, "qcow2")));
        }
    }
    let mut image = Some(open(&p));
    let mut buf = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let im = image.as_ref().unwrap();
        match *op {
            Op::Write { a, b, seed } => {
                let (off, len) = range(cfg, a, b);
                let data = pattern(seed, len as usize);
                im.write_at(&data, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            Op::Zero { a, b, unmap } => {
                let (off, len) = range(cfg, a, b);
                im.write_zeroes(off, len, unmap).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Discard { a, b } => {
                let (off, len) = range(cfg, a, b);
                im.discard(off, len).unwrap();
                if !(cfg.v2 && cfg.backing != Backing::None) {
                    let end = off + len;
                    let first = off.div_ceil(cs) * cs;
                    let last = if end == cfg.size { end } else { end / cs * cs };
                    if first < last {
                        model[first as usize..last as usize].fill(0);
                    }
                }
            }
            Op::Read { a, b } => {
                let (off, len) = range(cfg, a, b);
                buf.resize(len as usize, 0xee);
                im.read_at(&mut buf, off).unwrap();
                let want = &model[off as usize..(off + len) as usize];
                if buf != want {
                    let at = buf.iter().zip(want).position(|(x, y)| x != y).unwrap();
                    panic!("{cfg:?}: op {i}: read {off:#x}+{len:#x} differs at +{at:#x}");
                }
            }
            Op::Flush => im.flush().unwrap(),
            Op::Reopen => {
                image.take().unwrap().close().unwrap();
                image = Some(open(&p));
            }
        }
    }
    let im = image.take().unwrap();
    let mut all = vec![0u8; cfg.size as usize];
    im.read_at(&mut all, 0).unwrap();
    assert!(all == model, "{cfg:?}: final contents differ from the model");
    im.close().unwrap();
    let raw = dir.path().join("model.raw");
    std::fs::write(&raw, &model).unwrap();
    assert_clean(&p, &format!("{cfg:?}"));
    assert_same_as_raw(&p, &raw, &format!("{cfg:?}"));
    if cfg.snapshot {
        img(&["snapshot", "-a", "s1", &s(&p)]);
        assert_clean(&p, &format!("{cfg:?} after snapshot -a"));
        std::fs::write(&raw, &initial).unwrap();
        assert_same_as_raw(&p, &raw, &format!("{cfg:?} snapshot contents"));
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

static OPS: AtomicUsize = AtomicUsize::new(0);

fn run(cfg: Cfg, seed: u8, len: usize) {
    let config =
        Config { cases: 2, failure_persistence: None, max_shrink_iters: 300, ..Config::default() };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &[seed; 32]));
    runner
        .run(&proptest::collection::vec(op(), len), |ops| {
            run_case(&cfg, &ops);
            OPS.fetch_add(ops.len(), Ordering::Relaxed);
            Ok(())
        })
        .unwrap();
    eprintln!("{cfg:?}: {} operations so far", OPS.load(Ordering::Relaxed));
}

const OPS_PER_CASE: usize = 900;

#[test]
fn model_512() {
    let size = 2048 * 512;
    run(
        Cfg {
            cluster: 512,
            size,
            opts: "refcount_bits=64",
            backing: Backing::None,
            v2: false,
            snapshot: false,
        },
        1,
        OPS_PER_CASE,
    );
    run(
        Cfg { cluster: 512, size, opts: "", backing: Backing::Qcow2, v2: false, snapshot: false },
        2,
        OPS_PER_CASE,
    );
    run(
        Cfg {
            cluster: 512,
            size,
            opts: "refcount_bits=2",
            backing: Backing::Raw,
            v2: false,
            snapshot: false,
        },
        3,
        OPS_PER_CASE,
    );
}

#[test]
fn model_4k() {
    let size = 256 * 4096 + 1024;
    run(
        Cfg { cluster: 4096, size, opts: "", backing: Backing::Raw, v2: false, snapshot: false },
        4,
        OPS_PER_CASE,
    );
    run(
        Cfg {
            cluster: 4096,
            size,
            opts: "refcount_bits=1",
            backing: Backing::None,
            v2: false,
            snapshot: false,
        },
        5,
        OPS_PER_CASE,
    );
    run(
        Cfg { cluster: 4096, size, opts: "", backing: Backing::Qcow2, v2: true, snapshot: false },
        6,
        OPS_PER_CASE,
    );
}

#[test]
fn model_64k() {
    let size = 64 << 16;
    run(
        Cfg { cluster: 65536, size, opts: "", backing: Backing::Qcow2, v2: false, snapshot: false },
        7,
        OPS_PER_CASE,
    );
    run(
        Cfg { cluster: 65536, size, opts: "", backing: Backing::None, v2: false, snapshot: false },
        8,
        OPS_PER_CASE,
    );
    run(
        Cfg { cluster: 65536, size, opts: "", backing: Backing::None, v2: true, snapshot: false },
        9,
        OPS_PER_CASE,
    );
    run(
        Cfg {
            cluster: 65536,
            size: size + 512,
            opts: "",
            backing: Backing::Raw,
            v2: true,
            snapshot: false,
        },
        10,
        OPS_PER_CASE,
    );
}

#[test]
fn model_compressed_with_snapshot() {
    let size = 256 * 4096;
    let c = |cluster| Cfg {
        cluster,
        size,
        opts: "",
        backing: Backing::None,
        v2: false,
        snapshot: true,
    };
    run(c(4096), 13, OPS_PER_CASE);
    run(c(65536), 14, OPS_PER_CASE);
}

#[test]
fn model_2m() {
    run(
        Cfg {
            cluster: 2 << 20,
            size: 8 << 21,
            opts: "",
            backing: Backing::None,
            v2: false,
            snapshot: false,
        },
        11,
        OPS_PER_CASE,
    );
    run(
        Cfg {
            cluster: 2 << 20,
            size: (6 << 21) + 512,
            opts: "",
            backing: Backing::Raw,
            v2: false,
            snapshot: false,
        },
        12,
        OPS_PER_CASE,
    );
}
