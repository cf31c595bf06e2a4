//! Requests travel the graph, and each backup keeps its own instant: `blockdelta serve`
//! against `qemu-storage-daemon` on the same graphs.
//!
//! - A bitmap on the `file` node under a qcow2 node records the qcow2 node's data and
//!   metadata writes (QEMU: the format driver's I/O is a request of its child).
//! - Two backups of one source run at once; the one that ends first takes only its own
//!   copy-before-write step away, so the other still gets the source as it was at its
//!   own start, whatever is written after.

mod common_backup;

use std::path::Path;
use std::time::Duration;

use common_backup::{Model, Pair, Setup, create_qcow2, matches};
use testkit::serde_json::{Value, json};

const MIB: u64 = 1 << 20;

fn count(pair: &mut Pair, side: usize, node: &str, name: &str) -> u64 {
    let list = pair.sides[side].bitmaps(node);
    let b = list.as_array().unwrap().iter().find(|b| b["name"] == name).unwrap().clone();
    b["count"].as_u64().unwrap()
}

#[test]
fn a_bitmap_on_the_file_node_records_the_format_nodes_writes() {
    let root = tempfile::tempdir().unwrap();
    let setup = Setup {
        blockdevs: vec![
            "driver=file,node-name=f,filename={DIR}/d.qcow2".into(),
            "driver=qcow2,node-name=d,file=f".into(),
        ],
        exports: vec![("d".into(), "d".into())],
    };
    let mut pair =
        Pair::start(root.path(), |dir| create_qcow2(&dir.join("d.qcow2"), "64M", None), &setup);
    pair.ok("block-dirty-bitmap-add", json!({"node": "f", "name": "fb"}));
    pair.ok("block-dirty-bitmap-add", json!({"node": "d", "name": "db"}));
    let mut model = Model::new(64 * MIB);
    pair.write("d", &mut model, &[(0x5a, MIB, 64 * 1024)]);
    for s in &pair.sides {
        s.io("d", &["flush".to_string()]);
    }
    let mut counts = Vec::new();
    for side in 0..2 {
        let kind = pair.sides[side].kind;
        let on_file = count(&mut pair, side, "f", "fb");
        let on_format = count(&mut pair, side, "d", "db");
        assert_eq!(on_format, 64 * 1024, "{kind:?}: the format node's bitmap");
        // The data cluster, plus the metadata the allocation wrote (L2 table, refcount
        // block, L1 table).
        assert!(
            on_file >= 2 * 64 * 1024,
            "{kind:?}: the file node's bitmap holds {on_file} bytes after a 64 KiB write"
        );
        counts.push(on_file);
    }
    eprintln!(
        "file-node bitmap after one 64 KiB write: QEMU {}, blockdelta {}",
        counts[0], counts[1]
    );
    // A second write into the same, now allocated, cluster touches only the data.
    for side in 0..2 {
        let name = json!({"node": "f", "name": "fb"});
        pair.sides[side].daemon.execute_ok("block-dirty-bitmap-clear", name);
    }
    pair.write("d", &mut model, &[(0x6b, MIB + 4096, 4096)]);
    for side in 0..2 {
        let kind = pair.sides[side].kind;
        let on_file = count(&mut pair, side, "f", "fb");
        assert!(on_file >= 4096, "{kind:?}: a rewrite of allocated data is not recorded");
    }
    let dirs = pair.quit();
    for dir in &dirs {
        model.save(&dir.join("model.raw"));
        assert!(matches(&dir.join("d.qcow2"), None, &dir.join("model.raw")));
    }
}

#[test]
fn concurrent_backups_of_one_source_each_keep_their_instant() {
    let root = tempfile::tempdir().unwrap();
    let setup = Setup {
        blockdevs: vec![
            "driver=qcow2,node-name=src,file.driver=file,file.filename={DIR}/src.qcow2".into(),
            "driver=qcow2,node-name=t1,file.driver=file,file.filename={DIR}/t1.qcow2".into(),
            "driver=qcow2,node-name=t2,file.driver=file,file.filename={DIR}/t2.qcow2".into(),
            "driver=qcow2,node-name=t3,file.driver=file,file.filename={DIR}/t3.qcow2".into(),
        ],
        exports: vec![("src".into(), "src".into())],
    };
    let prepare = |dir: &Path| {
        for name in ["src", "t1", "t2", "t3"] {
            create_qcow2(&dir.join(format!("{name}.qcow2")), "64M", None);
        }
    };
    let mut pair = Pair::start(root.path(), prepare, &setup);
    let mut model = Model::new(64 * MIB);
    pair.write("src", &mut model, &[(0x11, 0, 4 * MIB), (0x12, 32 * MIB, 2 * MIB)]);
    let at_j1 = model.clone();
    // j1 crawls: it has copied almost nothing when the others end.
    pair.ok(
        "blockdev-backup",
        json!({"job-id": "j1", "device": "src", "target": "t1", "sync": "full", "speed": 65536}),
    );
    pair.write("src", &mut model, &[(0x21, 32 * MIB, MIB), (0x22, 48 * MIB, MIB)]);
    let at_j2 = model.clone();
    pair.ok(
        "blockdev-backup",
        json!({"job-id": "j2", "device": "src", "target": "t2", "sync": "full"}),
    );
    pair.wait_job("j2", &["null"]);
    // Written after j2's end: j1 must still copy the old contents first.
    pair.write("src", &mut model, &[(0x31, 32 * MIB, 2 * MIB), (0x32, 48 * MIB + 4096, 8192)]);
    let at_j3 = model.clone();
    pair.ok(
        "blockdev-backup",
        json!({"job-id": "j3", "device": "src", "target": "t3", "sync": "full"}),
    );
    pair.wait_job("j3", &["null"]);
    pair.write("src", &mut model, &[(0x41, 0, 8 * MIB), (0x42, 32 * MIB, 4 * MIB)]);
    pair.ok("block-job-set-speed", json!({"device": "j1", "speed": 0}));
    pair.wait_job("j1", &["null"]);
    for s in &mut pair.sides {
        let events = s.events();
        let completed: Vec<_> =
            events.iter().filter(|e| e["event"] == "BLOCK_JOB_COMPLETED").collect();
        assert_eq!(completed.len(), 3, "{:?}: {events:?}", s.kind);
        for e in completed {
            assert!(e["data"].get("error").is_none(), "{:?}: {e}", s.kind);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let dirs = pair.quit();
    for (dir, kind) in dirs.iter().zip(["QEMU", "blockdelta"]) {
        for (target, reference) in [("t1", &at_j1), ("t2", &at_j2), ("t3", &at_j3)] {
            let raw = dir.join(format!("{target}.ref"));
            reference.save(&raw);
            assert!(
                matches(&dir.join(format!("{target}.qcow2")), None, &raw),
                "{kind}: {target} is not the source at its job's start"
            );
        }
        model.save(&dir.join("now.raw"));
        assert!(matches(&dir.join("src.qcow2"), None, &dir.join("now.raw")), "{kind}: source");
    }
}

/// `cache.no-flush` on a format node reaches its file node, as in QEMU: a push
/// backup's scratch image is added so, and without it closing the image would flush
/// the file (writing the whole image to the disk for nothing).
#[test]
fn a_file_node_inherits_no_flush_from_its_format_node() {
    let root = tempfile::tempdir().unwrap();
    let setup = Setup { blockdevs: Vec::new(), exports: Vec::new() };
    let mut pair =
        Pair::start(root.path(), |dir| create_qcow2(&dir.join("s.qcow2"), "1M", None), &setup);
    let caches: Vec<Value> = pair
        .sides
        .iter_mut()
        .map(|s| {
            let file = s.dir.join("s.qcow2");
            let add = s.reply(
                "blockdev-add",
                json!({"driver": "qcow2", "node-name": "s", "cache": {"no-flush": true},
                       "file": {"driver": "file", "node-name": "sf", "filename": file}}),
            );
            assert!(add.get("return").is_some(), "{:?}: {add}", s.kind);
            let nodes = s.reply("query-named-block-nodes", json!({}));
            let node = |name: &str| {
                nodes["return"].as_array().unwrap().iter().find(|n| n["node-name"] == name).unwrap()
                    ["cache"]
                    .clone()
            };
            json!([node("s"), node("sf")])
        })
        .collect();
    assert_eq!(caches[0], caches[1], "QEMU, then blockdelta");
    assert_eq!(caches[1][1]["no-flush"], true, "{}", caches[1]);
}

/// `cache.no-flush` skips only the flush to the disk: closing a qcow2 node still
/// writes its cached metadata into the file, or the image loses its mappings. This is
/// push mode's scratch image: a backup job writes it, `blockdev-del` closes it, and
/// another process reads it.
#[test]
fn a_no_flush_image_keeps_its_writes_when_closed() {
    let root = tempfile::tempdir().unwrap();
    let setup = Setup {
        blockdevs: vec![
            "driver=file,node-name=f,filename={DIR}/d.qcow2".into(),
            "driver=qcow2,node-name=d,file=f".into(),
        ],
        exports: vec![("d".into(), "d".into())],
    };
    let prepare = |dir: &Path| {
        create_qcow2(&dir.join("d.qcow2"), "256M", None);
        create_qcow2(&dir.join("t.qcow2"), "256M", None);
    };
    let mut pair = Pair::start(root.path(), prepare, &setup);
    let mut model = Model::new(256 * MIB);
    let writes: Vec<(u8, u64, u64)> =
        (0..64u64).map(|k| (1 + k as u8, (k * 37 % 256) * MIB + 4096 * k, 64 * 1024)).collect();
    pair.write("d", &mut model, &writes);
    for s in &mut pair.sides {
        let target = s.dir.join("t.qcow2");
        let r = s.reply(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "t", "cache": {"no-flush": true},
                   "file": {"driver": "file", "filename": target}}),
        );
        assert!(r.get("return").is_some(), "{:?}: {r}", s.kind);
    }
    pair.ok(
        "blockdev-backup",
        json!({"job-id": "j", "device": "d", "target": "t", "sync": "full"}),
    );
    pair.wait_job("j", &["concluded", "null"]);
    pair.ok("blockdev-del", json!({"node-name": "t"}));
    let reference = root.path().join("model.raw");
    model.save(&reference);
    for s in &pair.sides {
        let target = s.dir.join("t.qcow2");
        assert!(matches(&target, None, &reference), "{:?}: the image lost writes", s.kind);
    }
}
