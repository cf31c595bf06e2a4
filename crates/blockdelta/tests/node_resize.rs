//! Resizing block nodes (spec 2.9, 6.5): file, raw and qcow2 drivers, the bitmap rules
//! and their error texts against qemu-storage-daemon's `block_resize`, and the bitmaps
//! of a grown qcow2 node as QEMU's tools read them back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use blockdelta::block::dirty_bitmap::AddBitmap;
use blockdelta::block::graph::BlockGraph;
use blockdelta::block::node::{BlockDriver, BlockStatus, Node, NodeOptions, ZeroFlags};
use blockdelta::block::qcow2::{Backing, Qcow2Driver};
use testkit::qsd::StorageDaemon;
use testkit::serde_json::{Value, json};
use testkit::{SplitMix64, qemu_img, qemu_io, require_tool};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

fn path_str(p: &std::path::Path) -> String {
    p.to_str().unwrap().to_string()
}

fn raw_file(dir: &tempfile::TempDir, name: &str, size: u64) -> String {
    let path = dir.path().join(name);
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    path_str(&path)
}

fn file_len(path: &str) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

fn add(node: &Node, name: &str) {
    node.bitmaps().add(&AddBitmap { name: name.into(), ..Default::default() }).unwrap();
}

fn count(node: &Node, name: &str) -> u64 {
    node.bitmaps().query().into_iter().find(|b| b.name.as_deref() == Some(name)).unwrap().count
}

fn dirty_groups(node: &Node, name: &str) -> Vec<u64> {
    let id = node.bitmaps().find(name).unwrap();
    node.bitmaps()
        .with_bits(id, |bits| {
            let g = 1u64 << bits.granularity();
            (0..bits.size().div_ceil(g)).filter(|&i| bits.get(i * g)).collect()
        })
        .unwrap()
}

fn open_qcow2(img: &str, read_only: bool) -> (BlockGraph, Arc<Node>) {
    let graph = BlockGraph::new();
    let ro = if read_only { ",read-only=on" } else { "" };
    let node = graph
        .add_from_str(&format!(
            "driver=qcow2,node-name=disk0,file.driver=file,file.filename={img}{ro}"
        ))
        .unwrap();
    (graph, node)
}

/// What qemu-storage-daemon answers to `block_resize` of `node` to `size`, with
/// `blockdevs` opened and, before it, the QMP commands `setup`.
fn qemu_resize(blockdevs: &[String], setup: &[(&str, Value)], node: &str, size: u64) -> String {
    let mut builder = StorageDaemon::qemu();
    for b in blockdevs {
        builder = builder.arg("--blockdev").arg(b);
    }
    let mut daemon = builder.start().unwrap();
    let socket = daemon.path("nbd.sock");
    for (command, args) in setup {
        let mut args = args.clone();
        if *command == "nbd-server-start" {
            args = json!({"addr": {"type": "unix", "data": {"path": socket}}});
        }
        daemon.execute_ok(command, args);
    }
    let reply = daemon.qmp().execute("block_resize", json!({"node-name": node, "size": size}));
    daemon.quit().unwrap();
    match reply {
        Ok(_) => String::new(),
        Err(e) => e.desc,
    }
}

fn qcow2_blockdevs(img: &str, ro: bool) -> Vec<String> {
    let ro = if ro { ",read-only=on" } else { "" };
    vec![
        format!("driver=file,node-name=file0,filename={img}{ro}"),
        format!("driver=qcow2,node-name=disk0,file=file0{ro}"),
    ]
}

/// `qemu-img check --output=json`: (corruptions + check errors, leaks).
fn qemu_check(img: &str) -> (u64, u64) {
    let out = std::process::Command::new(require_tool("qemu-img"))
        .args(["check", "--output=json", img])
        .output()
        .unwrap();
    let v: Value = testkit::serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    (n("corruptions") + n("check-errors"), n("leaks"))
}

#[test]
fn file_node_grows_and_shrinks_with_its_bitmaps_as_qemu_does() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_file(&dir, "f.img", MIB);
    let graph = BlockGraph::new();
    let node = graph.add_from_str(&format!("driver=file,node-name=f,filename={img}")).unwrap();
    add(&node, "b");
    node.write_blocking(&[1; 4096], 512 * KIB, false).unwrap();
    assert_eq!(dirty_groups(&node, "b"), [8]);

    // Grow: the file, the node and the bitmaps follow; old bits stay, new ones are clean.
    node.resize_blocking(4 * MIB).unwrap();
    assert_eq!(file_len(&img), 4 * MIB);
    assert_eq!(node.len(), 4 * MIB);
    assert_eq!(node.bitmaps().length(), 4 * MIB);
    assert_eq!(dirty_groups(&node, "b"), [8]);
    node.write_blocking(&[2; 512], 3 * MIB, false).unwrap();
    assert_eq!(dirty_groups(&node, "b"), [8, 48]);
    let mut buf = vec![0; 512];
    node.read_blocking(&mut buf, 3 * MIB).unwrap();
    assert_eq!(buf, [2; 512]);

    // Shrink, to a length that is not a multiple of 512 (QEMU's file driver takes it).
    node.resize_blocking(1000).unwrap();
    assert_eq!((file_len(&img), node.len(), node.bitmaps().length()), (1000, 1000, 1000));
    assert_eq!(count(&node, "b"), 0, "the bits past the new end are gone");
    assert!(node.write_blocking(&[3; 512], 1000, false).is_err(), "past the new end");
    node.write_blocking(&[3; 8], 992, false).unwrap();
    assert_eq!(dirty_groups(&node, "b"), [0]);
    node.resize_blocking(0).unwrap();
    assert_eq!((file_len(&img), node.len(), node.bitmaps().length()), (0, 0, 0));

    // QEMU's file driver does the same to the same file.
    let theirs = raw_file(&dir, "q.img", MIB);
    let err = qemu_resize(&[format!("driver=file,node-name=f,filename={theirs}")], &[], "f", 1000);
    assert_eq!(err, "");
    assert_eq!(file_len(&theirs), 1000);
}

#[test]
fn raw_node_resizes_its_file_child_as_qemu_does() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_file(&dir, "r.img", MIB);
    let graph = BlockGraph::new();
    let file = graph.add_from_str(&format!("driver=file,node-name=f,filename={img}")).unwrap();
    add(&file, "fb");
    let raw = graph.add_from_str("driver=raw,node-name=r,file=f,offset=4096").unwrap();
    add(&raw, "rb");
    raw.write_blocking(&[9; 512], 0, false).unwrap();
    raw.resize_blocking(128 * KIB).unwrap();
    // QEMU: the child becomes offset + size long (verified: 135168 bytes).
    let theirs = raw_file(&dir, "q.img", MIB);
    let err = qemu_resize(
        &[
            format!("driver=file,node-name=f,filename={theirs}"),
            "driver=raw,node-name=r,file=f,offset=4096".into(),
        ],
        &[],
        "r",
        128 * KIB,
    );
    assert_eq!(err, "");
    assert_eq!(file_len(&img), file_len(&theirs));
    assert_eq!(file_len(&img), 4096 + 128 * KIB);
    assert_eq!((raw.len(), raw.bitmaps().length()), (128 * KIB, 128 * KIB));
    assert_eq!((file.len(), file.bitmaps().length()), (4096 + 128 * KIB, 4096 + 128 * KIB));
    assert_eq!(dirty_groups(&raw, "rb"), [0]);
    assert_eq!(dirty_groups(&file, "fb"), [0], "the write reached the file at 4096");

    // A busy bitmap on the child refuses the parent's resize, and nothing changes.
    let id = file.bitmaps().find("fb").unwrap();
    file.bitmaps().set_busy(id, true).unwrap();
    let err = raw.resize_blocking(256 * KIB).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Bitmap 'fb' is currently in use by another operation and cannot be used"
    );
    assert_eq!((raw.len(), raw.bitmaps().length()), (128 * KIB, 128 * KIB));
    assert_eq!(file_len(&img), 4096 + 128 * KIB);

    // With `size`, the window is fixed.
    let fixed = graph.add_from_str("driver=raw,node-name=r2,file=f,size=65536").unwrap();
    let ours = fixed.resize_blocking(128 * KIB).unwrap_err().to_string();
    let theirs_err = qemu_resize(
        &[
            format!("driver=file,node-name=f,filename={theirs}"),
            "driver=raw,node-name=r2,file=f,size=65536".into(),
        ],
        &[],
        "r2",
        128 * KIB,
    );
    assert_eq!(ours, theirs_err);
    assert_eq!(ours, "Cannot resize fixed-size raw disks");
}

/// iotest 124's point and iotest 246's: bits set before growing stay set, the new
/// range is clean until written, and at close the bitmaps are stored at the new size,
/// where QEMU reads the same bits back.
#[test]
fn grown_qcow2_stores_its_bitmaps_at_the_new_size() {
    let dir = tempfile::tempdir().unwrap();
    let img = path_str(&dir.path().join("g.qcow2"));
    // 4 KiB clusters: the L1 table (512 entries per cluster, 2 MiB each) must move.
    qemu_img(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", &img, "64M"]).unwrap();
    qemu_img(["bitmap", "--add", "-g", "64k", &img, "b0"]).unwrap();
    qemu_img(["bitmap", "--add", "-g", "128k", &img, "b1"]).unwrap();
    qemu_io(["-f", "qcow2", "-c", "write -P 5 1M 64k", &img]).unwrap();
    qemu_img(["bitmap", "--disable", &img, "b1"]).unwrap();
    let new_len = 2 * GIB;
    let (b0_sha, b1_sha, b0_count, b1_count) = {
        let (_graph, node) = open_qcow2(&img, false);
        node.write_blocking(&[6; 4096], 10 * MIB, false).unwrap();
        assert_eq!(dirty_groups(&node, "b0"), [16, 160]);
        node.resize_blocking(new_len).unwrap();
        assert_eq!((node.len(), node.bitmaps().length()), (new_len, new_len));
        assert_eq!(dirty_groups(&node, "b0"), [16, 160], "bits before the old end stay");
        node.write_blocking(&[7; 4096], 1536 * MIB, false).unwrap();
        assert_eq!(dirty_groups(&node, "b0"), [16, 160, 24576]);
        assert_eq!(dirty_groups(&node, "b1"), [8], "disabled: unchanged");
        let b = node.bitmaps();
        (b.sha256("b0").unwrap(), b.sha256("b1").unwrap(), count(&node, "b0"), count(&node, "b1"))
    };
    // Closed: clean image, bitmaps stored and no longer in use, at the new size.
    assert_eq!(qemu_check(&img), (0, 0));
    let info: Value =
        testkit::serde_json::from_str(&qemu_img(["info", "--output=json", &img]).unwrap()).unwrap();
    assert_eq!(info["virtual-size"], json!(new_len));
    assert_eq!(
        info["format-specific"]["data"]["bitmaps"],
        json!([
            {"flags": ["auto"], "name": "b0", "granularity": 65536},
            {"flags": [], "name": "b1", "granularity": 131072},
        ])
    );
    let mut daemon = StorageDaemon::qemu()
        .arg("--blockdev")
        .arg(format!("driver=file,node-name=file0,filename={img},read-only=on"))
        .arg("--blockdev")
        .arg("driver=qcow2,node-name=disk0,file=file0,read-only=on")
        .start()
        .unwrap();
    let sha = |d: &mut StorageDaemon, name: &str| {
        let r = d.execute_ok(
            "x-debug-block-dirty-bitmap-sha256",
            json!({"node": "disk0", "name": name}),
        );
        r["sha256"].as_str().unwrap().to_string()
    };
    assert_eq!(sha(&mut daemon, "b0"), b0_sha);
    assert_eq!(sha(&mut daemon, "b1"), b1_sha);
    let nodes = daemon.execute_ok("query-named-block-nodes", json!({"flat": true}));
    let disk = nodes.as_array().unwrap().iter().find(|n| n["node-name"] == "disk0").unwrap();
    let counts: Vec<(String, u64)> = disk["dirty-bitmaps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["name"].as_str().unwrap().into(), b["count"].as_u64().unwrap()))
        .collect();
    assert_eq!(counts, [("b1".into(), b1_count), ("b0".into(), b0_count)]);
    assert_eq!(b0_count, 3 * 65536);
    daemon.quit().unwrap();
    // Our own reopen agrees, and the data written on both sides of the old end is there.
    let (_graph, node) = open_qcow2(&img, true);
    assert_eq!((node.len(), node.bitmaps().length()), (new_len, new_len));
    assert_eq!(node.bitmaps().sha256("b0").unwrap(), b0_sha);
    let mut buf = vec![0; 4096];
    node.read_blocking(&mut buf, 1536 * MIB).unwrap();
    assert_eq!(buf, [7; 4096]);
}

#[test]
fn busy_bitmap_refuses_the_resize_with_qemus_text() {
    let dir = tempfile::tempdir().unwrap();
    let img = path_str(&dir.path().join("b.qcow2"));
    let other = path_str(&dir.path().join("o.qcow2"));
    qemu_img(["create", "-q", "-f", "qcow2", &img, "64M"]).unwrap();
    qemu_img(["bitmap", "--add", &img, "b"]).unwrap();
    qemu_img(["create", "-q", "-f", "qcow2", &other, "64M"]).unwrap();
    // QEMU: the bitmap is busy while an NBD export of another node publishes it (an
    // export of the node itself would refuse by permissions first).
    let mut blockdevs = qcow2_blockdevs(&img, false);
    blockdevs.push(format!("driver=file,node-name=file1,filename={other}"));
    blockdevs.push("driver=qcow2,node-name=disk1,file=file1".into());
    let theirs = qemu_resize(
        &blockdevs,
        &[
            ("nbd-server-start", json!({})),
            (
                "block-export-add",
                json!({"type": "nbd", "id": "e0", "node-name": "disk1", "name": "x",
                       "bitmaps": [{"node": "disk0", "name": "b"}]}),
            ),
        ],
        "disk0",
        128 * MIB,
    );
    assert_eq!(theirs, "Bitmap 'b' is currently in use by another operation and cannot be used");

    let (_graph, node) = open_qcow2(&img, false);
    let id = node.bitmaps().find("b").unwrap();
    node.bitmaps().set_busy(id, true).unwrap();
    assert_eq!(node.resize_blocking(128 * MIB).unwrap_err().to_string(), theirs);
    assert_eq!((node.len(), node.bitmaps().length()), (64 * MIB, 64 * MIB));
    node.bitmaps().set_busy(id, false).unwrap();
    // Readonly (QEMU only has those on read-only nodes, refused before): DEFAULT check.
    node.bitmaps().set_readonly(id, true).unwrap();
    assert_eq!(
        node.resize_blocking(128 * MIB).unwrap_err().to_string(),
        "Bitmap 'b' is readonly and cannot be modified"
    );
    node.bitmaps().set_readonly(id, false).unwrap();

    // A transient busy bitmap, and a frozen one: QEMU 10.0.2 aborts on an assertion
    // after resizing (verified on a file node); blockdelta refuses up front.
    add(&node, "t");
    let t = node.bitmaps().find("t").unwrap();
    node.bitmaps().set_busy(t, true).unwrap();
    assert_eq!(
        node.resize_blocking(128 * MIB).unwrap_err().to_string(),
        "Bitmap 't' is currently in use by another operation and cannot be used"
    );
    node.bitmaps().set_busy(t, false).unwrap();
    node.bitmaps().create_successor(t).unwrap();
    assert_eq!(
        node.resize_blocking(128 * MIB).unwrap_err().to_string(),
        "Bitmap 't' is currently in use by another operation and cannot be used"
    );
    assert_eq!((node.len(), node.bitmaps().length()), (64 * MIB, 64 * MIB));
    node.bitmaps().reclaim(t).unwrap();
    node.resize_blocking(128 * MIB).unwrap();
    assert_eq!((node.len(), node.bitmaps().length()), (128 * MIB, 128 * MIB));
}

#[test]
fn qcow2_refusals_use_qemus_texts() {
    let dir = tempfile::tempdir().unwrap();
    // Inconsistent: QEMU aborted with the bitmap in use.
    let img = path_str(&dir.path().join("i.qcow2"));
    qemu_img(["create", "-q", "-f", "qcow2", &img, "64M"]).unwrap();
    qemu_img(["bitmap", "--add", &img, "b"]).unwrap();
    let _ = std::process::Command::new(require_tool("qemu-io"))
        .args(["-f", "qcow2", "-c", "write 0 64k", "-c", "abort", &img])
        .output()
        .unwrap();
    let theirs = qemu_resize(&qcow2_blockdevs(&img, false), &[], "disk0", 128 * MIB);
    assert_eq!(theirs, "Bitmap 'b' is inconsistent and cannot be used");
    let unaligned = qemu_resize(&qcow2_blockdevs(&img, false), &[], "disk0", 128 * MIB - 100);
    assert_eq!(unaligned, "The new size must be a multiple of 512");
    let read_only = qemu_resize(&qcow2_blockdevs(&img, true), &[], "disk0", 128 * MIB);
    assert_eq!(read_only, "Image is read-only");
    {
        let (_graph, node) = open_qcow2(&img, false);
        assert_eq!(node.resize_blocking(128 * MIB).unwrap_err().to_string(), theirs);
        // The driver's precondition comes before the bitmaps, as in QEMU.
        assert_eq!(node.resize_blocking(128 * MIB - 100).unwrap_err().to_string(), unaligned);
        assert_eq!((node.len(), node.bitmaps().length()), (64 * MIB, 64 * MIB));
        // Once the bitmap is removed, the resize goes through.
        node.bitmaps().remove("b").unwrap();
        node.resize_blocking(128 * MIB).unwrap();
        // QEMU can shrink a qcow2 image; blockdelta cannot yet, and says so.
        assert_eq!(
            node.resize_blocking(64 * MIB).unwrap_err().to_string(),
            "qcow2 doesn't support shrinking images yet"
        );
        assert_eq!((node.len(), node.bitmaps().length()), (128 * MIB, 128 * MIB));
    }
    assert_eq!(qemu_check(&img), (0, 0));
    {
        let (_graph, node) = open_qcow2(&img, true);
        assert_eq!(node.resize_blocking(256 * MIB).unwrap_err().to_string(), read_only);
    }

    // A bitmap stored in the image but not in the node's memory: here a node built
    // without taking the bitmaps its driver loaded.
    let img = path_str(&dir.path().join("n.qcow2"));
    qemu_img(["create", "-q", "-f", "qcow2", &img, "64M"]).unwrap();
    qemu_img(["bitmap", "--add", &img, "b"]).unwrap();
    let graph = BlockGraph::new();
    let file = graph.add_from_str(&format!("driver=file,node-name=file0,filename={img}")).unwrap();
    let driver = Qcow2Driver::open(file.clone(), Backing::None, true).unwrap();
    let node = Node::new("disk0", Box::new(driver), NodeOptions::default(), vec![file]);
    assert!(node.bitmaps().query().is_empty());
    assert_eq!(
        node.resize_blocking(128 * MIB).unwrap_err().to_string(),
        "Cannot resize qcow2 with persistent bitmaps that were not loaded into memory"
    );
    assert_eq!(node.len(), 64 * MIB);
}

/// Writers run while the node grows step by step, then shrinks back: a request is
/// checked and done at one length (a write checked before a shrink and done after it
/// would extend the file again), every write lands in the bitmap unless a shrink cut it
/// off, and the node's, the bitmaps' and the file's lengths agree at the end.
#[test]
fn resize_under_concurrent_writes() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_file(&dir, "c.img", MIB);
    let graph = BlockGraph::new();
    let node = graph.add_from_str(&format!("driver=file,node-name=f,filename={img}")).unwrap();
    let bitmap = AddBitmap { name: "b".into(), granularity: Some(4096), ..Default::default() };
    node.bitmaps().add(&bitmap).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3)
        .map(|t| {
            let node = node.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut rng = SplitMix64(t + 1);
                let mut written = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    // Anywhere below the length seen now; the node may have shrunk by
                    // the time the request runs, and must then refuse it.
                    let len = node.len();
                    let off = rng.up_to(len / 4096) * 4096;
                    if node.write_blocking(&[1; 4096], off, false).is_ok() {
                        written.push(off / 4096);
                    }
                }
                written
            })
        })
        .collect();
    let steps: Vec<u64> = (1..=64).chain((0..64).rev()).collect();
    for step in steps {
        node.resize_blocking(MIB + step * 64 * KIB).unwrap();
        assert_eq!(node.len(), node.bitmaps().length());
        std::thread::yield_now();
    }
    stop.store(true, Ordering::Relaxed);
    let mut written: Vec<u64> = writers.into_iter().flat_map(|w| w.join().unwrap()).collect();
    assert!(written.iter().any(|&g| g >= 256), "writes landed past the first length");
    written.retain(|&g| g < MIB / 4096);
    written.sort_unstable();
    written.dedup();
    assert_eq!(dirty_groups(&node, "b"), written);
    assert_eq!((node.len(), node.bitmaps().length(), file_len(&img)), (MIB, MIB, MIB));
}

/// An in-memory driver whose writes wait for a go-ahead, to hold a request in flight.
struct GatedDriver {
    data: std::sync::Mutex<Vec<u8>>,
    entered: std::sync::mpsc::SyncSender<()>,
    go: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

impl BlockDriver for GatedDriver {
    fn driver_name(&self) -> &'static str {
        "gated"
    }
    fn len(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn check_resize(&self, _new_len: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn resize(&self, new_len: u64) -> std::io::Result<()> {
        self.data.lock().unwrap().resize(new_len as usize, 0);
        Ok(())
    }
    fn read(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let data = self.data.lock().unwrap();
        buf.copy_from_slice(&data[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write(&self, buf: &[u8], offset: u64, _fua: bool) -> std::io::Result<()> {
        self.entered.send(()).unwrap();
        self.go.lock().unwrap().recv().unwrap();
        // Like pwrite on a file: a write past the end extends it.
        let mut data = self.data.lock().unwrap();
        let end = offset as usize + buf.len();
        if data.len() < end {
            data.resize(end, 0);
        }
        data[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _flags: ZeroFlags) -> std::io::Result<()> {
        self.write(&vec![0; len as usize], offset, false)
    }
    fn discard(&self, _offset: u64, _len: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn block_status(&self, _offset: u64, len: u64) -> std::io::Result<BlockStatus> {
        Ok(BlockStatus { data: true, zero: false, allocated: true, depth: 1, len })
    }
}

/// A resize waits for the requests in flight: a write checked against the old length
/// finishes before the node shrinks, so it cannot extend the node again afterwards.
#[test]
fn resize_waits_for_requests_in_flight() {
    let (entered_tx, entered_rx) = std::sync::mpsc::sync_channel(1);
    let (go_tx, go_rx) = std::sync::mpsc::channel();
    let driver = GatedDriver {
        data: std::sync::Mutex::new(vec![0; MIB as usize]),
        entered: entered_tx,
        go: std::sync::Mutex::new(go_rx),
    };
    let node = Node::new("g", Box::new(driver), NodeOptions::default(), Vec::new());
    add(&node, "b");
    let writer = {
        let node = node.clone();
        std::thread::spawn(move || node.write_blocking(&[5; 4096], MIB - 4096, false))
    };
    entered_rx.recv().unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let resizer = {
        let node = node.clone();
        let done = done.clone();
        std::thread::spawn(move || {
            let r = node.resize_blocking(512 * KIB);
            done.store(true, Ordering::SeqCst);
            r
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(!done.load(Ordering::SeqCst), "the resize waits for the write in flight");
    go_tx.send(()).unwrap();
    writer.join().unwrap().unwrap();
    resizer.join().unwrap().unwrap();
    assert_eq!((node.len(), node.bitmaps().length()), (512 * KIB, 512 * KIB));
    assert_eq!(count(&node, "b"), 0, "the write's bit was cut off with the range");
}

#[tokio::test]
async fn async_resize() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_file(&dir, "a.img", MIB);
    let graph = BlockGraph::new();
    let node = graph.add_from_str(&format!("driver=file,node-name=f,filename={img}")).unwrap();
    add(&node, "b");
    node.write(vec![1; 512], 0, false).await.unwrap();
    node.resize(2 * MIB).await.unwrap();
    assert_eq!((node.len(), node.bitmaps().length(), file_len(&img)), (2 * MIB, 2 * MIB, 2 * MIB));
    assert_eq!(dirty_groups(&node, "b"), [0]);
    let other = raw_file(&dir, "ro.img", MIB);
    let ro = graph
        .add_from_str(&format!("driver=file,node-name=r,filename={other},read-only=on"))
        .unwrap();
    assert_eq!(ro.resize(MIB).await.unwrap_err().to_string(), "Image is read-only");
}
