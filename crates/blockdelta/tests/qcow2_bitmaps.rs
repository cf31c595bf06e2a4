//! Persistent bitmaps of qcow2 nodes at open, against qemu-storage-daemon opening the
//! same file: the same records, in the same order, with the same SHA-256; a writable
//! open marks them in use on disk, as QEMU does.

use blockdelta::block::graph::BlockGraph;
use blockdelta::block::node::Node;
use testkit::qsd::StorageDaemon;
use testkit::serde_json::{Value, json};
use testkit::{qemu_img, qemu_io};

/// The image of spec 10.1: bm0 (64 KiB) and bm1 (128 KiB) enabled, bm2 disabled, with
/// writes recorded by qemu-io.
fn make_image(img: &str) {
    qemu_img(["create", "-q", "-f", "qcow2", img, "64M"]).unwrap();
    qemu_img(["bitmap", "--add", img, "bm0"]).unwrap();
    qemu_img(["bitmap", "--add", "-g", "128k", img, "bm1"]).unwrap();
    qemu_img(["bitmap", "--add", img, "bm2"]).unwrap();
    qemu_img(["bitmap", "--disable", img, "bm2"]).unwrap();
    qemu_io([
        "-f",
        "qcow2",
        "-c",
        "write 0 64k",
        "-c",
        "write 1M 64k",
        "-c",
        "write 32704k 128k",
        img,
    ])
    .unwrap();
}

/// Our query records in QEMU's JSON shape.
fn ours(node: &Node) -> Vec<Value> {
    node.bitmaps()
        .query()
        .into_iter()
        .map(|b| {
            let mut v = json!({"name": b.name, "count": b.count, "granularity": b.granularity,
                "recording": b.recording, "busy": b.busy, "persistent": b.persistent});
            if b.inconsistent {
                v["inconsistent"] = json!(true);
            }
            v
        })
        .collect()
}

fn qemu_records(daemon: &mut StorageDaemon) -> Vec<Value> {
    let nodes = daemon.execute_ok("query-named-block-nodes", json!({"flat": true}));
    let disk = nodes.as_array().unwrap().iter().find(|n| n["node-name"] == "disk0").unwrap();
    disk["dirty-bitmaps"].as_array().cloned().unwrap_or_default()
}

fn qemu_view(img: &str, read_only: bool) -> (Vec<Value>, Vec<String>) {
    let ro = if read_only { ",read-only=on" } else { "" };
    let mut daemon = StorageDaemon::qemu()
        .arg("--blockdev")
        .arg(format!("driver=file,node-name=file0,filename={img}{ro}"))
        .arg("--blockdev")
        .arg(format!("driver=qcow2,node-name=disk0,file=file0{ro}"))
        .start()
        .unwrap();
    let records = qemu_records(&mut daemon);
    let shas = records
        .iter()
        .map(|r| {
            let reply = daemon.execute_ok(
                "x-debug-block-dirty-bitmap-sha256",
                json!({"node": "disk0", "name": r["name"]}),
            );
            reply["sha256"].as_str().unwrap().to_string()
        })
        .collect();
    daemon.quit().unwrap();
    (records, shas)
}

fn open_ours(img: &str, read_only: bool) -> (BlockGraph, std::sync::Arc<Node>) {
    let graph = BlockGraph::new();
    let ro = if read_only { ",read-only=on" } else { "" };
    let node = graph
        .add_from_str(&format!(
            "driver=qcow2,node-name=disk0,file.driver=file,file.filename={img}{ro}"
        ))
        .unwrap();
    (graph, node)
}

fn names(records: &[Value]) -> Vec<String> {
    records.iter().map(|r| r["name"].as_str().unwrap_or("").to_string()).collect()
}

#[test]
fn read_only_open_loads_what_qemu_loads() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("demo.qcow2").to_str().unwrap().to_string();
    make_image(&img);
    let (qemu, qemu_shas) = qemu_view(&img, true);
    assert_eq!(names(&qemu), ["bm2", "bm1", "bm0"], "newest first: reverse directory order");
    let (_graph, node) = open_ours(&img, true);
    assert_eq!(ours(&node), qemu);
    let our_shas: Vec<String> =
        names(&qemu).iter().map(|n| node.bitmaps().sha256(n).unwrap()).collect();
    assert_eq!(our_shas, qemu_shas);
    // Loaded from a read-only node, they are readonly: they may not be changed.
    assert_eq!(
        node.bitmaps().clear("bm0").unwrap_err().to_string(),
        "Bitmap 'bm0' is readonly and cannot be modified"
    );
    assert!(node.bitmaps().has_readonly());
    // QEMU would accept a persistent bitmap here and lose it at close; blockdelta says no.
    let err = node
        .bitmaps()
        .add(&blockdelta::block::dirty_bitmap::AddBitmap {
            name: "p".into(),
            persistent: true,
            ..Default::default()
        })
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "Can't make bitmap 'p' persistent in 'disk0': the node is read-only, so the bitmap could never be stored"
    );
}

#[test]
fn writable_open_marks_bitmaps_in_use_until_they_are_stored_at_close() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("demo.qcow2").to_str().unwrap().to_string();
    make_image(&img);
    let info = |img: &str| -> Value {
        let out = qemu_img(["info", "-U", "--output=json", img]).unwrap();
        testkit::serde_json::from_str(&out).unwrap()
    };
    let flags = |info: &Value| -> Vec<Value> {
        info["format-specific"]["data"]["bitmaps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["flags"].clone())
            .collect()
    };
    let (qemu_before, _) = qemu_view(&img, true);
    let (graph, node) = open_ours(&img, false);
    // As QEMU shows while it has the image open read-write (spec 10.2): a crash now
    // would leave them in use, hence inconsistent, never stale.
    assert_eq!(
        flags(&info(&img)),
        [json!(["in-use", "auto"]), json!(["in-use", "auto"]), json!(["in-use"])]
    );
    assert_eq!(node.bitmaps().query().len(), 3);
    assert!(!node.bitmaps().has_readonly());
    drop(node);
    drop(graph);
    // Stored at close: in use no more, same bits as before.
    assert_eq!(flags(&info(&img)), [json!(["auto"]), json!(["auto"]), json!([])]);
    let (qemu_after, _) = qemu_view(&img, true);
    let sorted = |v: &[Value]| {
        let mut v = v.to_vec();
        v.sort_by_key(|r| r["name"].as_str().unwrap_or("").to_string());
        v
    };
    assert_eq!(sorted(&qemu_after), sorted(&qemu_before));
    let check = qemu_img(["check", &img]).unwrap();
    assert!(check.contains("No errors were found"), "{check}");
}

/// `block-dirty-bitmap-add` with `persistent` on qcow2 v3 and v2 and on raw nodes: the
/// same answer as qemu-storage-daemon, error texts included.
#[test]
fn persistent_adds_are_checked_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let path = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    qemu_img(["create", "-q", "-f", "qcow2", &path("v3.qcow2"), "64M"]).unwrap();
    qemu_img(["bitmap", "--add", &path("v3.qcow2"), "bm0"]).unwrap();
    qemu_img(["create", "-q", "-f", "qcow2", "-o", "compat=0.10", &path("v2.qcow2"), "64M"])
        .unwrap();
    qemu_img(["create", "-q", "-f", "qcow2", &path("big.qcow2"), "4T"]).unwrap();
    std::fs::File::create(path("raw.img")).unwrap().set_len(1 << 20).unwrap();
    let long = "n".repeat(1024);
    let cases: Vec<(&str, &str, Value)> = vec![
        ("v3.qcow2", "qcow2", json!({"name": "p", "persistent": true})),
        ("v3.qcow2", "qcow2", json!({"name": "bm0", "persistent": true})),
        ("v3.qcow2", "qcow2", json!({"name": long, "persistent": true})),
        (
            "v3.qcow2",
            "qcow2",
            json!({"name": "g", "persistent": true, "granularity": 2147483648u64}),
        ),
        ("v2.qcow2", "qcow2", json!({"name": "p", "persistent": true})),
        ("v2.qcow2", "qcow2", json!({"name": "t"})),
        ("big.qcow2", "qcow2", json!({"name": "fine", "persistent": true, "granularity": 512})),
        ("big.qcow2", "qcow2", json!({"name": "ok", "persistent": true, "granularity": 65536})),
        ("raw.img", "raw", json!({"name": "p", "persistent": true})),
    ];
    for (image, driver, args) in cases {
        let img = path(image);
        let mut daemon = StorageDaemon::qemu()
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=file0,filename={img}"))
            .arg("--blockdev")
            .arg(format!("driver={driver},node-name=disk0,file=file0"))
            .start()
            .unwrap();
        let mut qemu_args = args.clone();
        qemu_args["node"] = json!("disk0");
        let qemu = daemon.qmp().execute("block-dirty-bitmap-add", qemu_args).map_err(|e| e.desc);
        // Leave the image as it was: remove what QEMU added before it stores it.
        if qemu.is_ok() {
            let name = args["name"].clone();
            daemon.execute_ok("block-dirty-bitmap-remove", json!({"node": "disk0", "name": name}));
        }
        daemon.quit().unwrap();

        let graph = BlockGraph::new();
        let node = graph
            .add_from_str(&format!(
                "driver={driver},node-name=disk0,file.driver=file,file.filename={img}"
            ))
            .unwrap();
        let request = blockdelta::block::dirty_bitmap::AddBitmap {
            name: args["name"].as_str().unwrap().to_string(),
            granularity: args["granularity"].as_u64(),
            persistent: args["persistent"].as_bool().unwrap_or(false),
            disabled: false,
            intent: Default::default(),
        };
        let ours = node.bitmaps().add(&request).map(|_| json!({})).map_err(|e| e.to_string());
        assert_eq!(ours, qemu, "{image}: {args}");
    }
}

/// A full round trip: bitmaps added and dirtied through a blockdelta node are stored at
/// close; QEMU then sees the same flags, counts and SHA-256; blockdelta loads them back
/// consistent; a removed one is gone from the image. `qemu-img check` stays clean.
#[tokio::test]
async fn bitmaps_stored_at_close_are_what_qemu_loads() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2").to_str().unwrap().to_string();
    qemu_img(["create", "-q", "-f", "qcow2", &img, "64M"]).unwrap();
    qemu_img(["bitmap", "--add", &img, "old"]).unwrap();
    let (graph, node) = open_ours(&img, false);
    let add = |name: &str, granularity: u64, disabled: bool| {
        node.bitmaps()
            .add(&blockdelta::block::dirty_bitmap::AddBitmap {
                name: name.into(),
                granularity: Some(granularity),
                persistent: true,
                disabled,
                intent: Default::default(),
            })
            .unwrap()
    };
    add("fine", 512, false);
    add("coarse", 2 << 20, false);
    add("paused", 65536, true);
    add("gone", 65536, false);
    node.write(vec![7; 5000], 3 << 20, false).await.unwrap();
    node.write(vec![8; 512], (64 << 20) - 512, false).await.unwrap();
    node.bitmaps().remove("gone").unwrap();
    let before = ours(&node);
    let shas: Vec<String> =
        names(&before).iter().map(|n| node.bitmaps().sha256(n).unwrap()).collect();
    drop(node);
    drop(graph);

    let check = qemu_img(["check", &img]).unwrap();
    assert!(check.contains("No errors were found"), "{check}");
    let (qemu, qemu_shas) = qemu_view(&img, true);
    let mut expected = before.clone();
    for r in &mut expected {
        r["busy"] = json!(false);
    }
    // QEMU loads in directory order: the same set; compare by name.
    let by_name = |v: &[Value]| {
        let mut v = v.to_vec();
        v.sort_by_key(|r| r["name"].as_str().unwrap_or("").to_string());
        v
    };
    assert_eq!(by_name(&qemu), by_name(&expected));
    let mut pairs_ours: Vec<_> = names(&before).into_iter().zip(shas).collect();
    let mut pairs_qemu: Vec<_> = names(&qemu).into_iter().zip(qemu_shas).collect();
    pairs_ours.sort();
    pairs_qemu.sort();
    assert_eq!(pairs_ours, pairs_qemu);
    assert!(!names(&qemu).contains(&"gone".to_string()));

    // And blockdelta loads them back, consistent.
    let (_graph, node) = open_ours(&img, true);
    assert_eq!(by_name(&ours(&node)), by_name(&qemu));
}

/// Autoclear bit 0 cleared by a program without bitmap support: qemu-storage-daemon
/// and blockdelta both load no bitmap; a read-only node leaves the header alone, a
/// writable one drops the extension (`qemu-img info` then lists no bitmaps, with no
/// warning), and a new persistent bitmap can be stored afterwards.
#[test]
fn stale_bitmaps_are_dropped_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("stale.qcow2").to_str().unwrap().to_string();
    make_image(&img);
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[95] &= !1; // autoclear bit 0
    std::fs::write(&img, &bytes).unwrap();
    let (qemu, _) = qemu_view(&img, true);
    assert!(qemu.is_empty(), "QEMU loads none: {qemu:?}");
    {
        let (_graph, node) = open_ours(&img, true);
        assert!(ours(&node).is_empty());
    }
    assert_eq!(std::fs::read(&img).unwrap(), bytes, "a read-only open changes nothing");
    {
        let (_graph, node) = open_ours(&img, false);
        assert!(ours(&node).is_empty());
        // Already on disk at open, before any write or store.
        let now = std::fs::read(&img).unwrap();
        let storage = qcow2::storage::MemStorage::from_bytes(now.clone());
        let header = qcow2::image::read_header(&storage, now.len() as u64).unwrap();
        assert!(header.extension(qcow2::header::EXT_BITMAPS).is_none());
        let add = blockdelta::block::dirty_bitmap::AddBitmap {
            name: "fresh".into(),
            persistent: true,
            ..Default::default()
        };
        node.bitmaps().add(&add).unwrap();
    }
    let out = std::process::Command::new(testkit::require_tool("qemu-img"))
        .args(["info", "--output=json", &img])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("warning"), "{stderr}");
    let info: Value = testkit::serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        info["format-specific"]["data"]["bitmaps"],
        json!([{"flags": ["auto"], "name": "fresh", "granularity": 65536}])
    );
}
