//! Crash-safe bitmaps under simulated power loss: a workload of writes and checkpoints
//! runs through the graph (qcow2 node over a memory storage that records every change),
//! then the power is cut before every change in turn, with the unflushed changes all
//! lost, all kept, or torn sector by sector. After every cut, the image opens, passes
//! the check without corruption, and its bitmap is consistent and covers every write
//! that was issued (every finished write, and every unfinished one whose data landed);
//! the same holds after a cut during the recovery of such an image. Every eighth cut
//! also passes `qemu-img check`.

use std::sync::Arc;

use blockdelta::block::dirty_bitmap::{AddBitmap, IntentChoice};
use blockdelta::block::memory::StorageDriver;
use blockdelta::block::node::{Node, NodeOptions};
use blockdelta::block::qcow2::{Backing, Qcow2Driver};
use qcow2::storage::{MemStorage, Storage, Survivors};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 32 * MIB;
const GRANULE: u64 = 64 * 1024;

fn fresh_image() -> Vec<u8> {
    let storage = MemStorage::new();
    let opts = qcow2::create::CreateOptions { size: SIZE, ..Default::default() };
    qcow2::create::create(&storage, opts).unwrap();
    storage.to_bytes()
}

fn open(storage: Arc<dyn Storage>, writable: bool) -> Result<Arc<Node>, String> {
    let options = NodeOptions { read_only: !writable, ..NodeOptions::default() };
    let file = Node::new("f", Box::new(StorageDriver::new(storage)), options, vec![]);
    let driver = Qcow2Driver::open(file.clone(), Backing::None, writable)?;
    Node::open("d", Box::new(driver), options, vec![file])
}

/// One guest write of the workload: where, and the storage's change count before and
/// after it.
struct Issued {
    offset: u64,
    len: u64,
    pattern: u8,
    ops_before: usize,
    ops_after: usize,
}

/// Runs the workload on a recording storage; returns it and the writes.
fn workload() -> (Arc<MemStorage>, Vec<Issued>) {
    let storage = Arc::new(MemStorage::from_bytes(fresh_image()).with_history());
    let node = open(storage.clone(), true).unwrap();
    let add = AddBitmap {
        name: "b0".into(),
        granularity: Some(GRANULE),
        persistent: true,
        intent: IntentChoice::Region(MIB),
        ..AddBitmap::default()
    };
    node.bitmaps().add(&add).unwrap();
    node.bitmaps().checkpoint().unwrap();
    let mut issued = Vec::new();
    let mut rng = testkit::SplitMix64(41);
    for i in 0..24u64 {
        if i == 8 || i == 16 {
            node.bitmaps().checkpoint().unwrap();
        }
        let offset = rng.up_to(SIZE / 4096 - 16) * 4096;
        let len = 4096 * (1 + rng.up_to(15));
        let pattern = 1 + i as u8;
        let ops_before = storage.history().unwrap().op_count();
        node.write_blocking(&vec![pattern; len as usize], offset, false).unwrap();
        let ops_after = storage.history().unwrap().op_count();
        issued.push(Issued { offset, len, pattern, ops_before, ops_after });
        if i % 6 == 5 {
            node.flush_blocking().unwrap();
        }
    }
    (storage, issued)
}

/// Checks a crashed image: no corruption, the bitmap consistent and covering every
/// issued write. Returns the bitmap's dirty byte count.
fn check_recovered(bytes: Vec<u8>, issued: &[Issued], cut: usize, what: &str) -> u64 {
    let storage = MemStorage::from_bytes(bytes);
    let check = qcow2::check::check(&storage).unwrap();
    assert_eq!((check.corruptions, check.check_errors), (0, 0), "{what}: {check:?}");
    let node = open(Arc::new(storage), false).unwrap_or_else(|e| panic!("{what}: {e}"));
    let bitmaps = node.bitmaps();
    let Some(id) = bitmaps.find("b0") else {
        // Before the first checkpoint finished the bitmap is not on disk yet; no write
        // was issued then.
        assert!(issued.iter().all(|w| w.ops_before >= cut), "{what}: the bitmap is missing");
        return 0;
    };
    let info = bitmaps.info(id).unwrap();
    assert!(!info.inconsistent, "{what}: inconsistent");
    let mut data = Vec::new();
    for w in issued.iter().filter(|w| w.ops_before < cut) {
        let finished = w.ops_after <= cut;
        if !finished {
            // Unfinished: it must be covered if its data reached the disk.
            data.resize(w.len as usize, 0);
            node.read_blocking(&mut data, w.offset).unwrap();
            if !data.iter().all(|&b| b == w.pattern) {
                continue;
            }
        }
        let covered = bitmaps
            .with_bits(id, |bits| bits.next_clean(w.offset, w.offset + w.len).is_none())
            .unwrap();
        assert!(covered, "{what}: write {}+{} is not in the bitmap", w.offset, w.len);
    }
    info.count
}

/// `qemu-img check` of a crashed image: no corruption, no check error (leaks, from a
/// cut during an allocation, are allowed: exit status 0 or 3).
fn qemu_check(bytes: &[u8], what: &str) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), bytes).unwrap();
    let out = std::process::Command::new(testkit::require_tool("qemu-img"))
        .args(["check", "-f", "qcow2", file.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "{what}: qemu-img check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn power_cuts_never_lose_an_issued_write() {
    let (storage, issued) = workload();
    let history = storage.history().unwrap();
    let ops = history.op_count();
    eprintln!("{ops} changes, {} writes", issued.len());
    let mut counts = Vec::new();
    for cut in 0..=ops {
        for (k, survivors) in
            [Survivors::None, Survivors::All, Survivors::Torn(cut as u64)].into_iter().enumerate()
        {
            let what = format!("cut before change {cut} of {ops}, survivors {k}");
            let crashed = history.power_cut_at_op(cut, survivors).unwrap();
            if cut % 8 == 0 && k != 1 {
                qemu_check(&crashed.to_bytes(), &what);
            }
            counts.push(check_recovered(crashed.to_bytes(), &issued, cut, &what));
        }
    }
    // Marks are coarse but bounded: never more than the regions the writes touched
    // since the last checkpoint, plus the stored bits (at most everything written).
    let written: u64 = issued.iter().map(|w| w.len).sum();
    let regions = issued.len() as u64 * 2 * MIB;
    assert!(counts.iter().all(|&c| c <= written.next_multiple_of(MIB) + regions));
    assert!(counts.iter().any(|&c| c > 0));
}

/// A cut while a crashed image is being recovered (the writable open stores the
/// bitmaps again): the next open still finds every issued write.
#[test]
fn power_cuts_during_recovery_lose_nothing() {
    let (storage, issued) = workload();
    let history = storage.history().unwrap();
    let ops = history.op_count();
    for cut in (ops / 3..=ops).step_by(7) {
        let crashed = history.power_cut_at_op(cut, Survivors::None).unwrap();
        let recovering = Arc::new(MemStorage::from_bytes(crashed.to_bytes()).with_history());
        let node = open(recovering.clone(), true).unwrap();
        drop(node); // closes: stores the bitmap closed
        let again = recovering.history().unwrap();
        for cut2 in 0..=again.op_count() {
            let what = format!("cut {cut}, then {cut2} during recovery");
            let bytes = again.power_cut_at_op(cut2, Survivors::None).unwrap().to_bytes();
            check_recovered(bytes, &issued, cut, &what);
        }
    }
}

/// Another program's writes bypass the marks: blockdelta then reports the bitmap
/// inconsistent instead of trusting the record.
#[test]
fn a_foreign_writer_makes_the_bitmap_inconsistent() {
    let (storage, issued) = workload();
    // Cut after the last write, before the close stores the bitmap.
    let cut = issued.last().unwrap().ops_after;
    let crashed =
        Arc::new(storage.history().unwrap().power_cut_at_op(cut, Survivors::All).unwrap());
    {
        let node = open(crashed.clone(), false).unwrap();
        let id = node.bitmaps().find("b0").unwrap();
        assert!(!node.bitmaps().info(id).unwrap().inconsistent, "trusted before");
    }
    // A writer that does not keep the record: qcow2's engine without `write_intent`.
    let image = qcow2::Qcow2Image::open(
        crashed.clone(),
        qcow2::OpenOptions { writable: true, ..Default::default() },
    )
    .unwrap();
    image.write_at(&[7u8; 4096], 20 * MIB).unwrap();
    image.close().unwrap();
    let node = open(crashed, false).unwrap();
    let id = node.bitmaps().find("b0").unwrap();
    assert!(node.bitmaps().info(id).unwrap().inconsistent);
}

/// Removing a crash-safe bitmap frees its stored clusters, which new data may then
/// take: no write-intent mark may reach them afterwards, even while the removal is
/// still pending in a transaction. Every write reads back intact.
#[test]
fn no_mark_reaches_the_clusters_of_a_removed_bitmap() {
    let storage = Arc::new(MemStorage::from_bytes(fresh_image()));
    let node = open(storage, true).unwrap();
    let add = AddBitmap {
        name: "b0".into(),
        granularity: Some(GRANULE),
        persistent: true,
        intent: IntentChoice::Region(MIB),
        ..AddBitmap::default()
    };
    node.bitmaps().add(&add).unwrap();
    node.bitmaps().checkpoint().unwrap();
    // The L2 table exists before the removal, so the freed bitmap data cluster (the
    // lowest freed) becomes guest data, read from disk, not a cached table.
    node.write_blocking(&vec![9u8; GRANULE as usize], 0, false).unwrap();
    let pending = node.bitmaps().prepare_remove("b0").unwrap();
    assert!(node.bitmaps().crash_safe_bitmaps().is_empty(), "still marked while pending");
    // One write per 1 MiB region, each its first: allocations reuse the freed clusters.
    let writes: Vec<(u64, u8)> = (1..SIZE / MIB).map(|r| (r * MIB, 1 + r as u8)).collect();
    for &(offset, pattern) in &writes {
        node.write_blocking(&vec![pattern; GRANULE as usize], offset, false).unwrap();
    }
    node.bitmaps().commit_remove(pending).unwrap();
    let mut data = vec![0u8; GRANULE as usize];
    for &(offset, pattern) in &writes {
        node.read_blocking(&mut data, offset).unwrap();
        assert!(data.iter().all(|&b| b == pattern), "the write at {offset} was overwritten");
    }
    assert!(node.bitmaps().query().is_empty());
}
