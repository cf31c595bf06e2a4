//! The dirty-bitmap manager against QEMU 10.0.2's tables: permission checks per operation
//! and state (spec 2.3, 2.4), the successor operations (2.5) and the backup settlement
//! (5.4). Error texts are compared verbatim.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use blockdelta::block::dirty_bitmap::{
    AddBitmap, BitmapError, BitmapId, BitmapInfo, BitmapPersistence, BitmapRef, BitmapSyncMode,
    BitmapToStore, Checks, JobOutcome, NodeBitmaps, default_granularity,
};
use hbitmap::HBitmap;

const MIB: u64 = 1 << 20;
const DISK: u64 = 64 * MIB;
const GRAN: u64 = 64 * 1024;

/// A driver that stores bitmaps, as qcow2 will: records removals, can be told to fail.
#[derive(Default)]
struct FakeStore {
    /// What each store call wrote: (name, granularity, enabled, SHA-256 of the bits).
    stored: Mutex<Vec<(String, u32, bool, String)>>,
    removed: Mutex<Vec<String>>,
    fail_remove: bool,
    refuse: Option<String>,
}

impl BitmapPersistence for FakeStore {
    fn can_store(
        &self,
        name: &str,
        _granularity: u32,
        _existing: &[(&str, u32)],
    ) -> Result<(), String> {
        if name.len() > 1023 {
            return Err("Name length exceeds maximum (1023 characters)".into());
        }
        match &self.refuse {
            Some(reason) => Err(reason.clone()),
            None => Ok(()),
        }
    }

    fn store(&self, bitmaps: &[BitmapToStore<'_>]) -> Result<(), String> {
        let mut stored = self.stored.lock().unwrap();
        stored.clear();
        for b in bitmaps {
            stored.push((b.name.to_string(), b.granularity, b.enabled, b.bits.sha256_hex()));
        }
        Ok(())
    }

    fn remove_stored(&self, name: &str) -> Result<(), String> {
        if self.fail_remove {
            return Err("Input/output error".into());
        }
        self.removed.lock().unwrap().push(name.to_string());
        Ok(())
    }
}

fn qcow2_node(store: Arc<FakeStore>) -> NodeBitmaps {
    NodeBitmaps::new("disk0", DISK, Some(65536), Some(store))
}

fn node() -> NodeBitmaps {
    qcow2_node(Arc::new(FakeStore::default()))
}

fn add(node: &NodeBitmaps, name: &str) -> BitmapId {
    node.add(&AddBitmap { name: name.into(), ..Default::default() }).unwrap()
}

fn info(node: &NodeBitmaps, name: &str) -> BitmapInfo {
    node.query().into_iter().find(|b| b.name.as_deref() == Some(name)).unwrap()
}

fn msg<T: std::fmt::Debug>(r: Result<T, BitmapError>) -> String {
    r.unwrap_err().to_string()
}

/// Clusters (64 KiB) that are dirty in the named bitmap.
fn clusters(node: &NodeBitmaps, name: &str) -> BTreeSet<u64> {
    let id = node.find(name).unwrap();
    node.with_bits(id, |b| {
        b.dirty_runs(0).flat_map(|r| r.start / GRAN..r.end.div_ceil(GRAN)).collect()
    })
    .unwrap()
}

fn write_clusters(node: &NodeBitmaps, list: &[u64]) {
    for c in list {
        node.set_dirty(c * GRAN, GRAN);
    }
}

fn set(list: &[u64]) -> BTreeSet<u64> {
    list.iter().copied().collect()
}

// ---------------------------------------------------------------------------------------
// Spec 2.3 / 2.4: which operation runs which check, on every state.

#[derive(Clone, Copy, Debug)]
enum State {
    Normal,
    Busy,
    Readonly,
    Inconsistent,
    BusyReadonly,
    ReadonlyInconsistent,
    Frozen,
}

const STATES: [State; 7] = [
    State::Normal,
    State::Busy,
    State::Readonly,
    State::Inconsistent,
    State::BusyReadonly,
    State::ReadonlyInconsistent,
    State::Frozen,
];

/// A node with bitmap `bm` in `state` (persistent, with two dirty clusters) and a plain
/// enabled bitmap `other`.
fn node_in_state(state: State) -> (NodeBitmaps, BitmapId) {
    let node = node();
    add(&node, "other");
    let id =
        node.add(&AddBitmap { name: "bm".into(), persistent: true, ..Default::default() }).unwrap();
    write_clusters(&node, &[3, 9]);
    match state {
        State::Normal => {}
        State::Busy => node.set_busy(id, true).unwrap(),
        State::Readonly => node.set_readonly(id, true).unwrap(),
        State::Inconsistent => node.set_inconsistent(id).unwrap(),
        State::BusyReadonly => {
            node.set_busy(id, true).unwrap();
            node.set_readonly(id, true).unwrap();
        }
        State::ReadonlyInconsistent => {
            node.set_readonly(id, true).unwrap();
            node.set_inconsistent(id).unwrap();
        }
        State::Frozen => {
            node.create_successor(id).unwrap();
        }
    }
    (node, id)
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Clear,
    ClearInTransaction,
    Remove,
    RemoveInTransaction,
    Enable,
    Disable,
    MergeInto,
    MergeFrom,
    Sha256,
    BackupLookup,
    BackupDefault,
    CreateSuccessor,
}

const OPS: [Op; 12] = [
    Op::Clear,
    Op::ClearInTransaction,
    Op::Remove,
    Op::RemoveInTransaction,
    Op::Enable,
    Op::Disable,
    Op::MergeInto,
    Op::MergeFrom,
    Op::Sha256,
    Op::BackupLookup,
    Op::BackupDefault,
    Op::CreateSuccessor,
];

fn run(node: &NodeBitmaps, id: BitmapId, op: Op) -> Result<(), BitmapError> {
    let none = |_: &str| None;
    match op {
        Op::Clear => node.clear("bm"),
        Op::ClearInTransaction => node.clear_with_backup("bm").map(drop),
        Op::Remove => node.remove("bm"),
        Op::RemoveInTransaction => node.prepare_remove("bm").map(|p| node.abort_remove(p).unwrap()),
        Op::Enable => node.enable("bm").map(drop),
        Op::Disable => node.disable("bm").map(drop),
        Op::MergeInto => node.merge("bm", &[BitmapRef::local("other")], &none),
        Op::MergeFrom => node.merge("other", &[BitmapRef::local("bm")], &none),
        Op::Sha256 => node.sha256("bm").map(drop),
        Op::BackupLookup => node.lookup("bm", Checks::ALLOW_RO).map(drop),
        Op::BackupDefault => node.lookup("bm", Checks::DEFAULT).map(drop),
        Op::CreateSuccessor => node.create_successor(id).map(drop),
    }
}

/// The expected outcome: `None` for success, or the error text (`B` busy, `R` readonly,
/// `I` inconsistent).
fn expected(op: Op, state: State) -> Option<char> {
    use State::*;
    let busy = matches!(state, Busy | BusyReadonly | Frozen);
    let ro = matches!(state, Readonly | BusyReadonly | ReadonlyInconsistent);
    let inc = matches!(state, Inconsistent | ReadonlyInconsistent);
    let checks = match op {
        Op::Clear | Op::ClearInTransaction | Op::MergeInto | Op::BackupDefault => Checks::DEFAULT,
        Op::Remove | Op::RemoveInTransaction => Checks::REMOVE,
        Op::Enable | Op::Disable | Op::MergeFrom | Op::BackupLookup => Checks::ALLOW_RO,
        Op::Sha256 => Checks::NONE,
        Op::CreateSuccessor => Checks { busy: true, readonly: false, inconsistent: false },
    };
    if checks.busy && busy {
        Some('B')
    } else if checks.readonly && ro {
        Some('R')
    } else if checks.inconsistent && inc {
        Some('I')
    } else {
        None
    }
}

#[test]
fn every_operation_runs_qemus_checks_in_qemus_order() {
    for state in STATES {
        for op in OPS {
            let (node, id) = node_in_state(state);
            let before = node.query();
            let sha_before = node.sha256("bm").unwrap();
            let got = run(&node, id, op);
            match expected(op, state) {
                None => assert!(got.is_ok(), "{op:?} on {state:?}: {got:?}"),
                Some(kind) => {
                    let text = match kind {
                        'B' => {
                            "Bitmap 'bm' is currently in use by another operation and cannot be used"
                        }
                        'R' => "Bitmap 'bm' is readonly and cannot be modified",
                        _ => "Bitmap 'bm' is inconsistent and cannot be used",
                    };
                    assert_eq!(msg(got), text, "{op:?} on {state:?}");
                    // A refused operation changes nothing.
                    assert_eq!(node.query(), before, "{op:?} on {state:?}");
                    assert_eq!(node.sha256("bm").unwrap(), sha_before, "{op:?} on {state:?}");
                }
            }
        }
    }
}

#[test]
fn inconsistent_error_carries_qemus_hint() {
    let (node, _) = node_in_state(State::Inconsistent);
    let err = node.clear("bm").unwrap_err();
    assert_eq!(err.hint(), Some("Try block-dirty-bitmap-remove to delete this bitmap from disk"));
    assert!(!err.to_string().contains("Try"), "the hint is not part of the QMP desc");
}

#[test]
fn inconsistent_bitmaps_are_disabled_reported_and_removable() {
    let store = Arc::new(FakeStore::default());
    let node = qcow2_node(store.clone());
    let id =
        node.add(&AddBitmap { name: "bm".into(), persistent: true, ..Default::default() }).unwrap();
    node.set_inconsistent(id).unwrap();
    let i = info(&node, "bm");
    assert!(i.inconsistent && !i.recording && i.persistent);
    node.set_dirty(0, MIB);
    assert_eq!(info(&node, "bm").count, 0, "an inconsistent bitmap records nothing");
    node.remove("bm").unwrap();
    assert_eq!(*store.removed.lock().unwrap(), vec!["bm".to_string()]);
    assert!(node.query().is_empty());
}

#[test]
fn unknown_names_give_qemus_texts() {
    let node = node();
    let none = |_: &str| None;
    for r in [
        node.clear("nosuch"),
        node.remove("nosuch"),
        node.enable("nosuch").map(drop),
        node.disable("nosuch").map(drop),
        node.sha256("nosuch").map(drop),
        node.merge("nosuch", &[], &none),
    ] {
        assert_eq!(msg(r), "Dirty bitmap 'nosuch' not found");
    }
}

// ---------------------------------------------------------------------------------------
// Add (spec 2.4, 2.6, 2.7, 2.11).

#[test]
fn add_checks_in_qemus_order_with_exact_texts() {
    let node = node();
    add(&node, "bm0");
    let req = |name: &str, granularity: Option<u64>, persistent: bool| AddBitmap {
        name: name.into(),
        granularity,
        persistent,
        disabled: false,
        intent: Default::default(),
    };
    // An empty name is reported before a bad granularity.
    assert_eq!(msg(node.add(&req("", Some(1000), false))), "Bitmap name cannot be empty");
    for bad in [0, 1, 256, 511, 1000, 64000, 3 << 20, 1 << 32, u64::MAX] {
        assert_eq!(
            msg(node.add(&req("x", Some(bad), false))),
            "Granularity must be power of 2 and at least 512",
            "granularity {bad}"
        );
    }
    // The granularity is checked before the name is found to exist.
    assert_eq!(
        msg(node.add(&req("bm0", Some(1000), false))),
        "Granularity must be power of 2 and at least 512"
    );
    assert_eq!(msg(node.add(&req("bm0", None, false))), "Bitmap already exists: bm0");
    let long = "b".repeat(1024);
    assert_eq!(msg(node.add(&req(&long, None, false))), format!("Bitmap name too long: {long}"));
    // Persistent: the driver's checks come first and carry the prefix.
    assert_eq!(
        msg(node.add(&req(&long, None, true))),
        format!(
            "Can't make bitmap '{long}' persistent in 'disk0': Name length exceeds maximum (1023 characters)"
        )
    );
    let refusing = NodeBitmaps::new(
        "disk1",
        DISK,
        Some(65536),
        Some(Arc::new(FakeStore {
            refuse: Some("Cannot store dirty bitmaps in qcow2 v2 files".into()),
            ..Default::default()
        })),
    );
    assert_eq!(
        msg(refusing.add(&req("p", None, true))),
        "Can't make bitmap 'p' persistent in 'disk1': Cannot store dirty bitmaps in qcow2 v2 files"
    );
    let file = NodeBitmaps::new("file0", DISK, None, None);
    assert_eq!(
        msg(file.add(&req("p3", None, true))),
        "Can't store persistent bitmaps to file0: Operation not supported"
    );
    // Failed adds left only bm0.
    assert_eq!(node.query().len(), 1);
    // The limits themselves are accepted.
    let max_name = "n".repeat(1023);
    node.add(&req(&max_name, Some(512), false)).unwrap();
    node.add(&req("huge", Some(1 << 31), false)).unwrap();
    assert_eq!(info(&node, "huge").granularity, 1 << 31);
    assert_eq!(info(&node, &max_name).granularity, 512);
}

#[test]
fn default_granularity_is_cluster_size_clamped() {
    for (cluster, want) in [
        (Some(512), 4096),
        (Some(4096), 4096),
        (Some(16384), 16384),
        (Some(65536), 65536),
        (Some(2 * MIB), 65536),
        (None, 65536),
    ] {
        assert_eq!(default_granularity(cluster), want);
        let node = NodeBitmaps::new("n", DISK, cluster, None);
        add(&node, "b");
        assert_eq!(info(&node, "b").granularity, want, "cluster {cluster:?}");
    }
}

#[test]
fn query_lists_newest_first_with_anonymous_bitmaps_unnamed() {
    let node = node();
    add(&node, "a");
    node.add(&AddBitmap {
        name: "p".into(),
        persistent: true,
        disabled: true,
        granularity: Some(131072),
        intent: Default::default(),
    })
    .unwrap();
    node.add_anonymous(65536, true).unwrap();
    add(&node, "c");
    let q = node.query();
    let names: Vec<_> = q.iter().map(|b| b.name.clone()).collect();
    assert_eq!(names, vec![Some("c".into()), None, Some("p".into()), Some("a".into())]);
    assert_eq!(
        q[2],
        BitmapInfo {
            name: Some("p".into()),
            count: 0,
            granularity: 131072,
            recording: false,
            busy: false,
            persistent: true,
            inconsistent: false,
        }
    );
    assert!(q[3].recording && !q[3].persistent);
}

// ---------------------------------------------------------------------------------------
// The write hook (spec 2.8) and count/SHA-256 semantics.

#[test]
fn writes_mark_enabled_bitmaps_only_and_round_outward() {
    let node = node();
    add(&node, "on");
    let off = node.add(&AddBitmap { name: "off".into(), disabled: true, ..Default::default() });
    off.unwrap();
    node.set_dirty(GRAN + 1, 512); // one 512-byte write dirties a whole 64 KiB bit
    assert_eq!(info(&node, "on").count, GRAN);
    assert_eq!(clusters(&node, "on"), set(&[1]));
    assert_eq!(info(&node, "off").count, 0);
    node.set_dirty(DISK - 1, 100); // clipped at the end of the node
    node.set_dirty(DISK + 10, 100); // entirely past the end: ignored
    assert_eq!(clusters(&node, "on"), set(&[1, 1023]));
    node.disable("on").unwrap();
    node.set_dirty(5 * GRAN, 1);
    node.enable("off").unwrap();
    node.set_dirty(7 * GRAN, 1);
    assert_eq!(clusters(&node, "on"), set(&[1, 1023]));
    assert_eq!(clusters(&node, "off"), set(&[7]));
}

#[test]
fn count_is_not_clipped_and_sha_matches_qemu() {
    // QEMU: a 66048-byte image at 64 KiB granularity with its last 512 bytes written
    // reports count 65536 and the SHA-256 of the word 2.
    let small = NodeBitmaps::new("disk0", 66048, None, None);
    add(&small, "bm0");
    small.set_dirty(65536, 512);
    assert_eq!(info(&small, "bm0").count, 65536);
    let mut word = HBitmap::new(64, 0).unwrap();
    word.set(1, 1).unwrap();
    assert_eq!(small.sha256("bm0").unwrap(), word.sha256_hex());
    // The vector of spec 10.4: bits 0, 16, 511, 512 of a 64 MiB disk.
    let disk = node();
    add(&disk, "bm0");
    write_clusters(&disk, &[0, 16, 511, 512]);
    assert_eq!(
        disk.sha256("bm0").unwrap(),
        "82ce47617b1c4f5ffb1c02e09acf4f3824947441f353fc178bbf3ab44755602e"
    );
}

#[test]
fn readonly_bitmaps_are_reported_for_the_write_path() {
    let node = node();
    let id = add(&node, "ro0");
    assert!(!node.has_readonly());
    node.set_readonly(id, true).unwrap();
    assert!(node.has_readonly());
    assert!(node.has_named());
}

// ---------------------------------------------------------------------------------------
// Remove, clear, enable, disable (spec 2.11, 3.3).

#[test]
fn remove_deletes_the_stored_copy_first_and_keeps_the_bitmap_on_failure() {
    let store = Arc::new(FakeStore::default());
    let node = qcow2_node(store.clone());
    node.add(&AddBitmap { name: "p".into(), persistent: true, ..Default::default() }).unwrap();
    add(&node, "t");
    node.remove("t").unwrap();
    assert!(store.removed.lock().unwrap().is_empty(), "transient bitmaps are not in the image");
    node.remove("p").unwrap();
    assert_eq!(*store.removed.lock().unwrap(), vec!["p".to_string()]);
    assert!(node.query().is_empty());

    let failing = qcow2_node(Arc::new(FakeStore { fail_remove: true, ..Default::default() }));
    failing.add(&AddBitmap { name: "p".into(), persistent: true, ..Default::default() }).unwrap();
    assert_eq!(msg(failing.remove("p")), "Failed to update bitmap extension: Input/output error");
    assert!(!info(&failing, "p").busy, "a failed remove leaves the bitmap usable");
}

#[test]
fn transactional_remove_prepares_commits_and_aborts() {
    let store = Arc::new(FakeStore::default());
    let node = qcow2_node(store.clone());
    let id = node.add(&AddBitmap { name: "p".into(), persistent: true, ..Default::default() });
    let id = id.unwrap();
    let pending = node.prepare_remove("p").unwrap();
    assert_eq!(store.removed.lock().unwrap().len(), 1, "the stored copy goes at prepare");
    assert!(info(&node, "p").busy);
    assert!(!node.will_store(id).unwrap());
    assert_eq!(
        msg(node.clear("p")),
        "Bitmap 'p' is currently in use by another operation and cannot be used"
    );
    node.abort_remove(pending).unwrap();
    assert!(!info(&node, "p").busy);
    assert!(node.will_store(id).unwrap(), "after abort it is stored again at close");
    let pending = node.prepare_remove("p").unwrap();
    node.commit_remove(pending).unwrap();
    assert!(node.find("p").is_none());
}

#[test]
fn clear_resets_and_the_transaction_form_restores() {
    let node = node();
    add(&node, "a");
    write_clusters(&node, &[1, 2, 700]);
    let backup = node.clear_with_backup("a").unwrap();
    assert_eq!(info(&node, "a").count, 0);
    node.set_dirty(5 * GRAN, 1);
    node.restore(backup).unwrap();
    assert_eq!(clusters(&node, "a"), set(&[1, 2, 700]));
    node.clear("a").unwrap();
    assert_eq!(info(&node, "a").count, 0);
    assert!(info(&node, "a").recording, "clear keeps the bitmap enabled");
}

#[test]
fn enable_and_disable_are_idempotent_and_report_the_old_state() {
    let node = node();
    let id = add(&node, "a");
    assert!(node.enable("a").unwrap());
    assert!(node.disable("a").unwrap());
    assert!(!node.disable("a").unwrap());
    assert!(!info(&node, "a").recording);
    // A transaction's abort puts the old state back.
    let was = node.enable("a").unwrap();
    node.set_enabled(id, was).unwrap();
    assert!(!info(&node, "a").recording);
}

// ---------------------------------------------------------------------------------------
// Merge (spec 2.10).

#[test]
fn merge_across_granularities_rounds_outward() {
    // Spec 10.3: bm1 (128 KiB) and bm0 (64 KiB) into an empty 64 KiB bitmap, and bm0 into
    // an empty 128 KiB bitmap, each give 524288 from 4 writes of 64 KiB at 0, 1M, 32M-64K, 32M.
    let node = node();
    let g = |name: &str, granularity| AddBitmap {
        name: name.into(),
        granularity: Some(granularity),
        ..Default::default()
    };
    node.add(&g("bm0", 65536)).unwrap();
    node.add(&g("bm1", 131072)).unwrap();
    write_clusters(&node, &[0, 16, 511, 512]);
    assert_eq!(info(&node, "bm0").count, 262144);
    assert_eq!(info(&node, "bm1").count, 524288);
    node.add(&AddBitmap { disabled: true, ..g("fine", 65536) }).unwrap();
    node.add(&AddBitmap { disabled: true, ..g("coarse", 131072) }).unwrap();
    let none = |_: &str| None;
    node.merge("fine", &[BitmapRef::local("bm1"), BitmapRef::local("bm0")], &none).unwrap();
    assert_eq!(info(&node, "fine").count, 524288);
    node.merge("coarse", &[BitmapRef::local("bm0")], &none).unwrap();
    assert_eq!(info(&node, "coarse").count, 524288);
    // Cumulative, and a target may name itself.
    node.merge("coarse", &[BitmapRef::local("coarse"), BitmapRef::local("fine")], &none).unwrap();
    assert_eq!(info(&node, "coarse").count, 524288);
}

#[test]
fn merge_is_all_or_nothing_with_errors_in_order() {
    let disk1 = Arc::new(NodeBitmaps::new("disk1", DISK, None, None));
    let small = Arc::new(NodeBitmaps::new("file0", 1376768, None, None));
    add(&disk1, "far");
    add(&small, "onfile");
    disk1.set_dirty(100 * GRAN, 1);
    let nodes = [disk1.clone(), small.clone()];
    let resolve = move |name: &str| nodes.iter().find(|n| n.node_name() == name).cloned();

    let node = node();
    add(&node, "t");
    add(&node, "a");
    write_clusters(&node, &[4]);
    node.disable("t").unwrap();
    let before = node.sha256("t").unwrap();
    let cases = [
        (
            vec![BitmapRef::local("a"), BitmapRef::local("nosuch")],
            "Dirty bitmap 'nosuch' not found",
        ),
        (vec![BitmapRef::local("a"), BitmapRef::on("nonode", "x")], "Node 'nonode' not found"),
        (
            vec![BitmapRef::on("disk1", "far"), BitmapRef::on("file0", "onfile")],
            "Bitmaps are of different sizes (destination size is 67108864, source size is 1376768) and can't be merged",
        ),
    ];
    for (sources, text) in cases {
        assert_eq!(msg(node.merge("t", &sources, &resolve)), text);
        assert_eq!(node.sha256("t").unwrap(), before, "a failed merge changes nothing");
    }
    // A busy source is refused too, and nothing is merged.
    let far = disk1.find("far").unwrap();
    disk1.set_busy(far, true).unwrap();
    assert_eq!(
        msg(node.merge("t", &[BitmapRef::local("a"), BitmapRef::on("disk1", "far")], &resolve)),
        "Bitmap 'far' is currently in use by another operation and cannot be used"
    );
    assert_eq!(node.sha256("t").unwrap(), before);
    disk1.set_busy(far, false).unwrap();
    // Sources on other nodes and readonly sources are fine.
    disk1.set_readonly(far, true).unwrap();
    let backup = node
        .merge_with_backup("t", &[BitmapRef::local("a"), BitmapRef::on("disk1", "far")], &resolve)
        .unwrap();
    assert_eq!(clusters(&node, "t"), set(&[4, 100]));
    node.restore(backup).unwrap();
    assert_eq!(node.sha256("t").unwrap(), before, "the transaction's abort restores the target");
    // Merging the other way locks the nodes in the same order: no deadlock.
    disk1.set_readonly(far, false).unwrap();
    let node = Arc::new(node);
    let back = node.clone();
    let resolve_back = move |name: &str| (name == "disk0").then(|| back.clone());
    disk1.merge("far", &[BitmapRef::on("disk0", "a")], &resolve_back).unwrap();
    assert_eq!(clusters(&disk1, "far"), set(&[4, 100]));
}

#[test]
fn merge_from_disabled_and_into_disabled_targets() {
    let node = node();
    add(&node, "src");
    write_clusters(&node, &[2]);
    node.disable("src").unwrap();
    node.add(&AddBitmap { name: "dst".into(), disabled: true, ..Default::default() }).unwrap();
    node.merge("dst", &[BitmapRef::local("src")], &|_| None).unwrap();
    assert_eq!(clusters(&node, "dst"), set(&[2]));
}

// ---------------------------------------------------------------------------------------
// Resize (spec 2.9).

#[test]
fn truncate_resizes_all_bitmaps_and_is_refused_while_in_use() {
    let node = node();
    let id = add(&node, "a");
    write_clusters(&node, &[1, 1000]);
    node.truncate(65 * MIB).unwrap();
    assert_eq!(node.length(), 65 * MIB);
    node.set_dirty(64 * MIB + 4096, 1); // past the old end
    assert_eq!(clusters(&node, "a"), set(&[1, 1000, 1024]));
    node.truncate(32 * MIB).unwrap();
    assert_eq!(clusters(&node, "a"), set(&[1]));
    node.create_successor(id).unwrap();
    assert!(node.truncate(64 * MIB).is_err());
    assert_eq!(node.length(), 32 * MIB);
}

// ---------------------------------------------------------------------------------------
// Successors (spec 2.5).

#[test]
fn create_successor_freezes_the_parent() {
    let node = node();
    let id = node.add(&AddBitmap { name: "bm".into(), persistent: true, ..Default::default() });
    let id = id.unwrap();
    write_clusters(&node, &[1]);
    let successor = node.create_successor(id).unwrap();
    let q = node.query();
    assert_eq!(q.len(), 2);
    assert_eq!(q[0].name, None, "the successor is anonymous and listed first");
    assert!(q[0].recording && !q[0].busy && !q[0].persistent);
    let parent = info(&node, "bm");
    assert!(parent.busy && parent.recording && parent.persistent, "{parent:?}");
    // New writes go to the successor only.
    write_clusters(&node, &[2]);
    assert_eq!(clusters(&node, "bm"), set(&[1]));
    assert_eq!(node.with_bits(successor, |b| b.count()).unwrap(), GRAN);
    // Busy is checked first; a successor without busy is its own error.
    assert_eq!(
        msg(node.create_successor(id)),
        "Bitmap 'bm' is currently in use by another operation and cannot be used"
    );
    node.set_busy(id, false).unwrap();
    assert_eq!(
        msg(node.create_successor(id)),
        "Cannot create a successor for a bitmap that already has one"
    );
    assert!(node.release(id).is_err(), "a frozen bitmap cannot be released");
}

#[test]
fn abdicate_hands_name_and_persistence_to_the_successor() {
    let node = node();
    let id = node.add(&AddBitmap { name: "bm".into(), persistent: true, ..Default::default() });
    let id = id.unwrap();
    assert_eq!(msg(node.abdicate(id)), "Cannot relinquish control if there's no successor present");
    write_clusters(&node, &[1]);
    let successor = node.create_successor(id).unwrap();
    write_clusters(&node, &[2]);
    assert_eq!(node.abdicate(id).unwrap(), successor);
    assert_eq!(node.find("bm"), Some(successor));
    let i = info(&node, "bm");
    assert!(i.persistent && i.recording && !i.busy);
    assert_eq!(clusters(&node, "bm"), set(&[2]));
    assert_eq!(node.query().len(), 1, "the parent is released");
}

#[test]
fn reclaim_merges_back_and_restores_the_enabled_state() {
    let node = node();
    let id = add(&node, "bm");
    assert_eq!(msg(node.reclaim(id)), "Cannot reclaim a successor when none is present");
    write_clusters(&node, &[1]);
    node.create_successor(id).unwrap();
    write_clusters(&node, &[2]);
    assert_eq!(node.reclaim(id).unwrap(), id);
    let i = info(&node, "bm");
    assert!(i.recording && !i.busy);
    assert_eq!(clusters(&node, "bm"), set(&[1, 2]));
    assert_eq!(node.query().len(), 1, "the successor is released");
    write_clusters(&node, &[3]);
    assert_eq!(clusters(&node, "bm"), set(&[1, 2, 3]), "recording again after reclaim");
}

#[test]
fn a_disabled_sync_bitmap_gets_a_disabled_successor() {
    let node = node();
    let id = node.add(&AddBitmap { name: "bm".into(), disabled: true, ..Default::default() });
    let id = id.unwrap();
    node.with_bits_mut(id, |b| b.set(GRAN, GRAN)).unwrap().unwrap();
    node.create_successor(id).unwrap();
    assert!(!info(&node, "bm").recording);
    write_clusters(&node, &[5]);
    let heir = node.abdicate(id).unwrap();
    let i = node.info(heir).unwrap();
    assert_eq!((i.count, i.recording), (0, false), "an empty, disabled bitmap");
}

#[test]
fn enable_successor_turns_recording_on() {
    let node = node();
    let id = node.add(&AddBitmap { name: "bm".into(), disabled: true, ..Default::default() });
    let id = id.unwrap();
    node.create_successor(id).unwrap();
    node.enable_successor(id).unwrap();
    assert!(info(&node, "bm").recording);
    write_clusters(&node, &[7]);
    node.reclaim(id).unwrap();
    assert_eq!(clusters(&node, "bm"), set(&[7]));
    assert!(info(&node, "bm").recording, "reclaim takes the successor's enabled state");
}

// ---------------------------------------------------------------------------------------
// Settlement (spec 5.4): bitmap-mode × outcome.

#[test]
fn settlement_table_of_backup_jobs() {
    let before: &[u64] = &[1, 2, 3]; // dirty when the job starts
    let during: &[u64] = &[3, 40]; // written while it runs
    let uncopied: &[u64] = &[2]; // left in the copy bitmap when it failed
    let union = |a: &[u64], b: &[u64]| a.iter().chain(b).copied().collect::<BTreeSet<u64>>();
    let table = [
        (BitmapSyncMode::OnSuccess, JobOutcome::Success, set(during)),
        (BitmapSyncMode::OnSuccess, JobOutcome::Failure, union(before, during)),
        (BitmapSyncMode::Never, JobOutcome::Success, union(before, during)),
        (BitmapSyncMode::Never, JobOutcome::Failure, union(before, during)),
        (BitmapSyncMode::Always, JobOutcome::Success, set(during)),
        (BitmapSyncMode::Always, JobOutcome::Failure, union(during, uncopied)),
    ];
    for (mode, outcome, want) in table {
        let node = node();
        let id = node.add(&AddBitmap { name: "bm".into(), persistent: true, ..Default::default() });
        let id = id.unwrap();
        add(&node, "bystander");
        write_clusters(&node, before);
        node.create_successor(id).unwrap();
        write_clusters(&node, during);
        let mut copy = HBitmap::new(DISK, 16).unwrap();
        for c in uncopied {
            copy.set(c * GRAN, GRAN).unwrap();
        }
        let heir = node.settle_backup_bitmap(id, mode, outcome, Some(&copy)).unwrap();
        assert_eq!(node.find("bm"), Some(heir));
        assert_eq!(clusters(&node, "bm"), want, "{} {outcome:?}", mode.as_str());
        let i = info(&node, "bm");
        assert!(i.persistent && i.recording && !i.busy, "{mode:?} {outcome:?}: {i:?}");
        assert_eq!(node.query().len(), 2, "no successor left behind");
        assert_eq!(clusters(&node, "bystander"), union(before, during), "others keep recording");
    }
}

#[test]
fn always_failure_without_a_copy_bitmap_keeps_only_new_writes() {
    // Cancel while pending: everything was copied, so only the writes made during the job
    // remain (iotest 257, "always with simulated failure").
    let node = node();
    let id = add(&node, "bm");
    write_clusters(&node, &[1, 2]);
    node.create_successor(id).unwrap();
    write_clusters(&node, &[9]);
    node.settle_backup_bitmap(id, BitmapSyncMode::Always, JobOutcome::Failure, None).unwrap();
    assert_eq!(clusters(&node, "bm"), set(&[9]));
}

// ---------------------------------------------------------------------------------------
// The promise: no write is lost while bitmaps are frozen and settled concurrently.

#[test]
fn concurrent_writes_are_never_lost_across_freeze_and_reclaim() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let node = Arc::new(NodeBitmaps::new("disk0", 4096 * GRAN, None, None));
    let id = add(&node, "bm");
    let running = Arc::new(AtomicUsize::new(4));
    let writers: Vec<_> = (0..4u64)
        .map(|t| {
            let (node, running) = (node.clone(), running.clone());
            std::thread::spawn(move || {
                // Each cluster is written exactly once, so a lost write stays lost.
                for i in 0..1024u64 {
                    node.set_dirty((i * 4 + t) * GRAN, GRAN);
                    std::thread::yield_now();
                }
                running.fetch_sub(1, Ordering::SeqCst);
            })
        })
        .collect();
    let mut rounds = 0u64;
    while running.load(Ordering::SeqCst) > 0 || rounds < 100 {
        let mode = if rounds.is_multiple_of(2) {
            BitmapSyncMode::OnSuccess
        } else {
            BitmapSyncMode::Never
        };
        node.create_successor(id).unwrap();
        std::thread::yield_now();
        node.settle_backup_bitmap(id, mode, JobOutcome::Failure, None).unwrap();
        rounds += 1;
    }
    for w in writers {
        w.join().unwrap();
    }
    assert_eq!(info(&node, "bm").count, 4096 * GRAN, "every write is in the bitmap");
    assert_eq!(node.query().len(), 1);
}

#[test]
fn writes_during_a_successful_backup_are_exactly_the_new_bitmap() {
    let node = Arc::new(NodeBitmaps::new("disk0", 4096 * GRAN, None, None));
    let id = add(&node, "bm");
    write_clusters(&node, &[0, 1, 2]);
    node.create_successor(id).unwrap();
    let writer = {
        let node = node.clone();
        std::thread::spawn(move || {
            for i in (10..4000u64).step_by(7) {
                node.set_dirty(i * GRAN, 1);
            }
        })
    };
    writer.join().unwrap();
    node.settle_backup_bitmap(id, BitmapSyncMode::OnSuccess, JobOutcome::Success, None).unwrap();
    let want: BTreeSet<u64> = (10..4000u64).step_by(7).collect();
    assert_eq!(clusters(&node, "bm"), want);
}

// ---------------------------------------------------------------------------------------
// Storing (spec 6.4): which bitmaps go to the image, and with which bits.

#[test]
fn store_writes_persistent_bitmaps_and_keeps_a_frozen_ones_new_writes() {
    let store = Arc::new(FakeStore::default());
    let node = qcow2_node(store.clone());
    let persistent = |name: &str, disabled| AddBitmap {
        name: name.into(),
        persistent: true,
        disabled,
        ..Default::default()
    };
    node.add(&persistent("on", false)).unwrap();
    node.add(&persistent("off", true)).unwrap();
    add(&node, "transient");
    let broken = node.add(&persistent("broken", false)).unwrap();
    node.set_inconsistent(broken).unwrap();
    let ro = node.add(&persistent("ro", false)).unwrap();
    node.set_readonly(ro, true).unwrap();
    let frozen = node.add(&persistent("frozen", false)).unwrap();
    write_clusters(&node, &[1]);
    node.create_successor(frozen).unwrap();
    write_clusters(&node, &[2]); // only in the successor so far
    assert_eq!(node.store_persistent().unwrap(), 3);
    let stored = store.stored.lock().unwrap().clone();
    let names: Vec<&str> = stored.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(names, ["frozen", "off", "on"], "persistent, consistent, writable ones");
    let mut both = HBitmap::new(DISK, 16).unwrap();
    both.set(GRAN, 2 * GRAN).unwrap();
    assert_eq!(stored[0].3, both.sha256_hex(), "a frozen bitmap is stored with its successor");
    assert!(stored[0].2, "and as enabled, as it was before the freeze");
    assert!(!stored[1].2 && stored[2].2);
    // A node without persistence stores nothing.
    let plain = NodeBitmaps::new("file0", DISK, None, None);
    assert_eq!(plain.store_persistent().unwrap(), 0);
}
