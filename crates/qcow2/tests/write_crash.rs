//! Power loss at every flush point (and at every single storage operation of a short
//! workload) of a write workload on 512-byte-cluster images: allocating writes, copy-on-
//! write over a raw backing file, zero writes, discards, refcount block allocations, a
//! refcount table growth and an L1 table growth (resize). After each cut the image must
//! pass `qemu-img check` without corruption (leaks are allowed) and every byte written
//! before the last completed `flush()` (and not touched since) must read back.

mod write_support;

use std::sync::Arc;

use qcow2::storage::{History, MemStorage, Storage, Survivors};
use qcow2::{BackingImage, OpenOptions, Qcow2Image, RawImage};
use write_support::*;

const CS: u64 = 512;
const SIZE: u64 = 4 << 20;
const BACKING_LEN: u64 = 1 << 20;

/// One engine operation of the workload.
#[derive(Debug, Clone)]
enum Step {
    Write(u64, u64, u64),
    Zero(u64, u64, bool),
    Discard(u64, u64),
    Resize(u64),
    Flush,
}

struct Fixture {
    dir: tempfile::TempDir,
    base: Vec<u8>,
    backing: Arc<dyn BackingImage>,
    backing_data: Vec<u8>,
    /// The guest contents of `base`.
    initial: Vec<u8>,
}

fn fixture() -> Fixture {
    fixture_with(false)
}

/// With `snapshot`, QEMU writes data first and takes an internal snapshot, so that the
/// engine's writes meet shared clusters and shared L2 tables.
fn fixture_with(snapshot: bool) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let braw = dir.path().join("b.raw");
    let backing_data = pattern(0xb0, BACKING_LEN as usize);
    std::fs::write(&braw, &backing_data).unwrap();
    let p = dir.path().join("base.qcow2");
    create(&p, SIZE, "cluster_size=512,refcount_bits=64", Some((&braw, "raw")));
    if snapshot {
        let ps = p.display().to_string();
        let mut args = vec!["-f", "qcow2", &ps];
        args.extend(["-c", "write -P 0x5c 0 64k", "-c", "write -P 0x5d 1000k 200k"]);
        args.extend(["-c", "write -z 2M 32k"]);
        testkit::qemu_io(&args).unwrap();
        img(&["snapshot", "-c", "s1", &ps]);
    }
    let base = std::fs::read(&p).unwrap();
    let bstore: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(backing_data.clone()));
    let backing: Arc<dyn BackingImage> = Arc::new(RawImage::new(bstore).unwrap());
    let mut f = Fixture { dir, base, backing, backing_data, initial: Vec::new() };
    let image = open(&f, Arc::new(MemStorage::from_bytes(f.base.clone())), false);
    f.initial = vec![0u8; SIZE as usize];
    image.read_at(&mut f.initial, 0).unwrap();
    f
}

fn open(f: &Fixture, storage: Arc<dyn Storage>, writable: bool) -> Qcow2Image {
    let options =
        OpenOptions { writable, backing: Some(Arc::clone(&f.backing)), ..OpenOptions::default() };
    Qcow2Image::open(storage, options).unwrap()
}

/// What the workload guarantees: after engine flush k, the model; plus, for each
/// flush, the storage flush count when it completed.
struct Run {
    history: History,
    /// (storage flushes completed when the engine flush returned, model, size)
    flushed: Vec<(usize, Vec<u8>, u64)>,
    /// For each step after which a range was touched: (storage flush count before the
    /// step, touched range).
    touched: Vec<(usize, u64, u64)>,
    checked: std::cell::Cell<usize>,
}

fn run(f: &Fixture, steps: &[Step]) -> Run {
    let mem = Arc::new(MemStorage::from_bytes(f.base.clone()).with_history());
    let image = open(f, mem.clone(), true);
    let mut model = f.initial.clone();
    assert_eq!(model[..BACKING_LEN as usize][70_000], f.backing_data[70_000]);
    let mut size = SIZE;
    let mut flushed = vec![(0, model.clone(), size)];
    let mut touched = Vec::new();
    let fc = |m: &MemStorage| m.flush_count() as usize;
    for (i, step) in steps.iter().enumerate() {
        let before = fc(&mem);
        match *step {
            Step::Write(off, len, seed) => {
                let data = pattern(seed, len as usize);
                image.write_at(&data, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
                touched.push((before, off, len));
            }
            Step::Zero(off, len, unmap) => {
                image.write_zeroes(off, len, unmap).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
                touched.push((before, off, len));
            }
            Step::Discard(off, len) => {
                image.discard(off, len).unwrap();
                let first = off.div_ceil(CS) * CS;
                let last = (off + len) / CS * CS;
                if first < last {
                    model[first as usize..last as usize].fill(0);
                }
                touched.push((before, off, len));
            }
            Step::Resize(new) => {
                image.resize(new).unwrap();
                touched.push((before, size, new - size));
                model.resize(new as usize, 0);
                size = new;
            }
            Step::Flush => {
                image.flush().unwrap();
                flushed.push((fc(&mem), model.clone(), size));
            }
        }
        let _ = i;
    }
    image.close().unwrap();
    flushed.push((fc(&mem), model.clone(), size));
    Run { history: mem.history().unwrap(), flushed, touched, checked: 0.into() }
}

/// Checks the image after a power cut with `done` storage flushes completed.
fn verify(f: &Fixture, r: &Run, storage: MemStorage, done: usize, what: &str) {
    let bytes = storage.to_bytes();
    let p = f.dir.path().join("crashed.qcow2");
    std::fs::write(&p, &bytes).unwrap();
    assert_consistent(&p, what);
    // The last engine flush that completed before the cut.
    let (_, model, size) = r.flushed.iter().rev().find(|(n, _, _)| *n <= done).unwrap();
    let flush_done = r.flushed.iter().rev().find(|(n, _, _)| *n <= done).unwrap().0;
    // Ranges touched by steps that started after that flush returned.
    let uncertain: Vec<(u64, u64)> = r
        .touched
        .iter()
        .filter(|(before, _, _)| *before >= flush_done)
        .map(|&(_, off, len)| (off, off + len))
        .collect();
    let image = open(f, Arc::new(storage), false);
    assert!(
        image.virtual_size() >= *size,
        "{what}: size {} < flushed {size}",
        image.virtual_size()
    );
    let mut got = vec![0u8; *size as usize];
    image.read_at(&mut got, 0).unwrap();
    if got != *model {
        for (i, (&g, &m)) in got.iter().zip(model.iter()).enumerate() {
            let i = i as u64;
            if g != m && !uncertain.iter().any(|&(a, b)| (a..b).contains(&i)) {
                panic!("{what}: byte {i:#x} reads {g:#x}, flushed {m:#x}");
            }
        }
    }
    r.checked.set(r.checked.get() + 1);
}

fn survivors() -> Vec<Survivors<'static>> {
    vec![
        Survivors::None,
        Survivors::All,
        Survivors::Random(1),
        Survivors::Random(2),
        Survivors::Torn(3),
        Survivors::Torn(4),
    ]
}

/// Allocating writes, COW over the backing file, zero writes, discards.
fn basic_steps() -> Vec<Step> {
    vec![
        Step::Write(0, 4096, 1),
        Step::Flush,
        Step::Write(1000, 100, 2),
        Step::Write(8192 + 7, 1500, 3),
        Step::Flush,
        Step::Zero(64 << 10, 8192, false),
        Step::Zero(300, 2000, true),
        Step::Discard(0, 1024),
        Step::Discard(2 << 20, 4096),
        Step::Flush,
        Step::Write(2000, 3000, 4),
        Step::Zero(3 << 20, 1 << 20, false),
        Step::Flush,
    ]
}

/// Enough allocation to need new refcount blocks (64 clusters per block with 64-bit
/// refcounts) and a bigger refcount table (one cluster: 64 blocks, 2 MiB of file),
/// then a resize that moves the L1 table.
fn growth_steps() -> Vec<Step> {
    let mut v = basic_steps();
    for k in 0..20u64 {
        let off = ((k * 160) << 10) % (SIZE - (128 << 10));
        v.push(Step::Write(off + 3, 128 << 10, 100 + k));
        if k % 3 == 2 {
            v.push(Step::Flush);
        }
        if k % 5 == 4 {
            v.push(Step::Discard(off, 64 << 10));
            v.push(Step::Zero(off + (64 << 10), 16 << 10, true));
        }
    }
    v.push(Step::Flush);
    v.push(Step::Resize(40 << 20));
    v.push(Step::Write((40 << 20) - 5000, 4000, 999));
    v.push(Step::Write(100, 10, 1000));
    v.push(Step::Flush);
    v
}

#[test]
fn power_cut_at_every_flush() {
    let f = fixture();
    let r = run(&f, &growth_steps());
    let flushes = r.history.flush_count();
    let mut checked = 0;
    for n in 0..=flushes {
        for s in survivors() {
            let storage = r.history.power_cut_at_flush(n, s).unwrap();
            verify(&f, &r, storage, n, &format!("cut at flush {n} of {flushes}, {s:?}"));
            checked += 1;
        }
    }
    eprintln!("{checked} power cuts checked ({flushes} flush points)");
    // The workload did grow the refcount table and moved the L1 table.
    let end = r.history.power_cut_at_flush(flushes, Survivors::None).unwrap();
    let image = open(&f, Arc::new(end), false);
    let h = image.header();
    assert!(h.refcount_table_clusters > 1, "refcount table grew: {h:?}");
    assert!(h.l1_size > 128, "L1 table grew: {h:?}");
    assert_eq!(image.virtual_size(), 40 << 20);
}

#[test]
fn power_cut_at_every_op() {
    let f = fixture();
    let r = run(&f, &basic_steps());
    let ops = r.history.op_count();
    let entries = r.history.entries();
    let mut checked = 0;
    for i in 0..=ops {
        // Storage flushes done before op i.
        let mut seen = 0;
        let mut done = 0;
        for e in entries {
            match e {
                qcow2::storage::Entry::Op(_) => {
                    if seen == i {
                        break;
                    }
                    seen += 1;
                }
                qcow2::storage::Entry::Flush => done += 1,
            }
        }
        for s in [Survivors::None, Survivors::All, Survivors::Torn(i as u64)] {
            let storage = r.history.power_cut_at_op(i, s).unwrap();
            verify(&f, &r, storage, done, &format!("cut at op {i} of {ops}, {s:?}"));
            checked += 1;
        }
    }
    eprintln!("{checked} power cuts checked ({ops} storage operations)");
}

#[test]
fn power_cut_with_internal_snapshot() {
    let f = fixture_with(true);
    let r = run(&f, &basic_steps());
    let flushes = r.history.flush_count();
    for n in 0..=flushes {
        for s in survivors() {
            let storage = r.history.power_cut_at_flush(n, s).unwrap();
            verify(&f, &r, storage, n, &format!("snapshot: cut at flush {n} of {flushes}, {s:?}"));
        }
    }
    eprintln!("{} power cuts checked ({flushes} flush points)", r.checked.get());
    // The snapshot still holds what QEMU wrote.
    let end = r.history.power_cut_at_flush(flushes, Survivors::None).unwrap();
    let p = f.dir.path().join("final.qcow2");
    std::fs::write(&p, end.to_bytes()).unwrap();
    assert_clean(&p, "snapshot: final");
    img(&["snapshot", "-a", "s1", &p.display().to_string()]);
    let image = open(&f, Arc::new(MemStorage::from_bytes(std::fs::read(&p).unwrap())), false);
    let mut back = vec![0u8; SIZE as usize];
    image.read_at(&mut back, 0).unwrap();
    assert!(back == f.initial, "snapshot contents after the writes");
}
