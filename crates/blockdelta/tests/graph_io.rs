//! The I/O gate and drained sections, in the library: a transaction is one point in time
//! for every write, and copy-before-write cannot deadlock with a drain.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::thread;
use std::time::Duration;

use blockdelta::block::dirty_bitmap::AddBitmap;
use blockdelta::block::graph::BlockGraph;
use blockdelta::block::node::{
    BlockDriver, BlockStatus, Node, NodeOptions, ZeroFlags, drain_nodes,
};
use blockdelta::export::ExportManager;
use blockdelta::jobs::block_copy::{BlockCopy, CopyBeforeWrite, InitialCopy};
use blockdelta::qmp::Qmp;
use blockdelta::qmp::protocol::Command;
use serde_json::{Value, json};
use testkit::qemu_img;

const MIB: u64 = 1 << 20;
const CLUSTER: u64 = 64 * 1024;

fn count(node: &Node, name: &str) -> u64 {
    let list = node.bitmaps().query();
    list.iter().find(|b| b.name.as_deref() == Some(name)).map_or(0, |b| b.count)
}

fn command(name: &str, arguments: Value) -> Command {
    let Value::Object(arguments) = arguments else { panic!("arguments must be an object") };
    Command { name: name.into(), arguments, id: None }
}

/// A writer that starts between two actions of a transaction lands before all of them
/// or after all of them: here after, since the transaction's nodes are drained. Without
/// the drain the write would fall between `disable a` and `add b`, in neither bitmap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_write_falls_between_two_actions_of_a_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", path.to_str().unwrap(), "64M"]).unwrap();
    let graph = Arc::new(BlockGraph::new());
    let node = graph
        .add_from_str(&format!(
            "driver=qcow2,node-name=d,file.driver=file,file.filename={}",
            path.display()
        ))
        .unwrap();
    node.bitmaps()
        .add(&AddBitmap {
            name: "a".into(),
            granularity: None,
            persistent: false,
            disabled: false,
            intent: Default::default(),
        })
        .unwrap();
    let exports = Arc::new(ExportManager::new(graph.clone()));
    let qmp = Qmp::new(graph.clone(), exports, Arc::new(tokio::sync::Notify::new()));
    let (started, writer_started) = mpsc::channel();
    let writer_started = Mutex::new(writer_started);
    let writer = Arc::new(Mutex::new(None));
    let hook_writer = writer.clone();
    let hook_node = node.clone();
    qmp.set_transaction_hook(Some(Arc::new(move |i| {
        if i != 0 {
            return;
        }
        let node = hook_node.clone();
        let started = started.clone();
        *hook_writer.lock().unwrap() = Some(thread::spawn(move || {
            started.send(()).unwrap();
            node.write_blocking(&[7u8; 4096], 8 * MIB, false).unwrap();
        }));
        writer_started.lock().unwrap().recv().unwrap();
        // Give the write every chance to land now, between the two actions.
        thread::sleep(Duration::from_millis(200));
    })));
    let actions = json!({"actions": [
        {"type": "block-dirty-bitmap-disable", "data": {"node": "d", "name": "a"}},
        {"type": "block-dirty-bitmap-add", "data": {"node": "d", "name": "b"}},
    ]});
    qmp.execute(command("transaction", actions)).await.unwrap();
    let handle = writer.lock().unwrap().take().expect("the hook ran");
    handle.join().unwrap();
    assert_eq!(count(&node, "a"), 0, "the write landed before the transaction: retry");
    assert_eq!(count(&node, "b"), CLUSTER, "the write fell between the two actions");
}

/// A memory disk whose block status can be held, to stop a copier between its block
/// status query and its read.
struct HeldDriver {
    data: Mutex<Vec<u8>>,
    hold: Mutex<bool>,
    released: Condvar,
    held_once: AtomicBool,
}

impl HeldDriver {
    fn release(&self) {
        *self.hold.lock().unwrap() = false;
        self.released.notify_all();
    }
}

/// The node's driver: a handle on the shared [`HeldDriver`].
struct Held(Arc<HeldDriver>);

impl std::ops::Deref for Held {
    type Target = HeldDriver;
    fn deref(&self) -> &HeldDriver {
        &self.0
    }
}

impl BlockDriver for Held {
    fn driver_name(&self) -> &'static str {
        "raw"
    }
    fn len(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = self.data.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write(&self, buf: &[u8], offset: u64, _fua: bool) -> io::Result<()> {
        self.data.lock().unwrap()[offset as usize..offset as usize + buf.len()]
            .copy_from_slice(buf);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _flags: ZeroFlags) -> io::Result<()> {
        self.data.lock().unwrap()[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len, ZeroFlags::default())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn block_status(&self, _offset: u64, len: u64) -> io::Result<BlockStatus> {
        let mut hold = self.hold.lock().unwrap();
        if *hold {
            self.held_once.store(true, Ordering::SeqCst);
        }
        while *hold {
            hold = self.released.wait(hold).unwrap();
        }
        Ok(BlockStatus { data: true, zero: false, allocated: true, depth: 1, len })
    }
}

fn memory_node(name: &str, size: usize, fill: u8, hold: bool) -> (Arc<Node>, Arc<HeldDriver>) {
    let driver = Arc::new(HeldDriver {
        data: Mutex::new(vec![fill; size]),
        hold: Mutex::new(hold),
        released: Condvar::new(),
        held_once: AtomicBool::new(false),
    });
    (Node::new(name, Box::new(Held(driver.clone())), NodeOptions::default(), Vec::new()), driver)
}

/// Waits for `done` with a deadline; a deadlock shows as a timeout (its threads leak).
fn within(what: &str, done: &mpsc::Receiver<()>, seconds: u64) {
    done.recv_timeout(Duration::from_secs(seconds))
        .unwrap_or_else(|_| panic!("{what}: no progress in {seconds} s (deadlock)"));
}

/// The cycle the old gate had: a guest write held in copy-before-write waits for a
/// cluster the copier is copying; a drain waits for the guest write; the copier's next
/// request must not wait for the drain.
#[test]
fn copy_before_write_and_a_drain_do_not_deadlock() {
    let (source, source_driver) = memory_node("src", MIB as usize, 0x11, true);
    let (target, _) = memory_node("dst", MIB as usize, 0, false);
    let copy = Arc::new(
        BlockCopy::new(source.clone(), target.clone(), CLUSTER, InitialCopy::All).unwrap(),
    );
    let step = source.drained(|| source.add_before_write(Arc::new(CopyBeforeWrite(copy.clone()))));

    // The copier claims cluster 0 and stops in its block status query.
    let (copied_tx, copied) = mpsc::channel();
    {
        let copy = copy.clone();
        thread::spawn(move || {
            let range = copy.claim_next_at_most(CLUSTER).unwrap();
            assert_eq!(range, 0..CLUSTER);
            copy.copy_claimed(range).unwrap();
            copied_tx.send(()).unwrap();
        });
    }
    while !source_driver.held_once.load(Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(5));
    }
    // A guest write to cluster 0 waits for that copy inside copy-before-write.
    let (wrote_tx, wrote) = mpsc::channel();
    {
        let source = source.clone();
        thread::spawn(move || {
            source.write_blocking(&[0x22; 4096], 0, false).unwrap();
            wrote_tx.send(()).unwrap();
        });
    }
    thread::sleep(Duration::from_millis(100));
    // A drain (as a new backup's set-up or a transaction takes one) waits for the write.
    let (drained_tx, drained) = mpsc::channel();
    {
        let source = source.clone();
        thread::spawn(move || {
            let section = drain_nodes(std::slice::from_ref(&source));
            drained_tx.send(()).unwrap();
            drop(section);
        });
    }
    thread::sleep(Duration::from_millis(100));
    assert!(drained.try_recv().is_err(), "the drain ended with a write in flight");
    // Now the copier goes on: its read and its write to the target must not wait.
    source_driver.release();
    within("the copy", &copied, 10);
    within("the guest write", &wrote, 10);
    within("the drain", &drained, 10);
    assert!(source.drained(|| source.remove_before_write(step)));
    let mut old = vec![0u8; CLUSTER as usize];
    target.read_blocking(&mut old, 0).unwrap();
    assert!(old.iter().all(|&b| b == 0x11), "the target lost the point in time");
    let mut now = vec![0u8; 4096];
    source.read_blocking(&mut now, 0).unwrap();
    assert!(now.iter().all(|&b| b == 0x22));
}

/// Writes through a qcow2 node are requests of its file node: a bitmap there records
/// data and metadata, and grows with the file.
#[test]
fn a_file_nodes_bitmap_sees_the_qcow2_nodes_writes_and_grows_with_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", path.to_str().unwrap(), "64M"]).unwrap();
    let graph = BlockGraph::new();
    let file = graph
        .add_from_str(&format!("driver=file,node-name=f,filename={}", path.display()))
        .unwrap();
    let node = graph.add_from_str("driver=qcow2,node-name=d,file=f").unwrap();
    let before = file.len();
    file.bitmaps()
        .add(&AddBitmap {
            name: "fb".into(),
            granularity: None,
            persistent: false,
            disabled: false,
            intent: Default::default(),
        })
        .unwrap();
    node.write_blocking(&[1u8; 65536], 16 * MIB, false).unwrap();
    node.flush_blocking().unwrap();
    let grown = file.len();
    assert!(grown > before, "the allocation grew the file ({before} -> {grown})");
    assert_eq!(file.bitmaps().length(), grown, "the file node's bitmaps follow its length");
    let dirty = count(&file, "fb");
    assert!(dirty >= 2 * CLUSTER, "data and metadata: {dirty} bytes recorded");
    // The new clusters, past the old end of the file, are dirty.
    let id = file.bitmaps().find("fb").unwrap();
    let past_old_end = file
        .bitmaps()
        .with_bits(id, |bits| bits.dirty_runs(0).any(|run| run.end > before))
        .unwrap();
    assert!(past_old_end, "the clusters the write allocated are not recorded");
}

/// A closed qcow2 node with `cache.no-flush` has written its metadata to the file even
/// while a reference to it lives on (a finished job's): another program reading the
/// file finds every write. `no-flush` skips only the flush to the disk.
#[test]
fn closing_a_no_flush_qcow2_node_writes_its_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", path.to_str().unwrap(), "64M"]).unwrap();
    let graph = BlockGraph::new();
    let node = graph
        .add_from_str(&format!(
            "driver=qcow2,node-name=t,cache.no-flush=on,file.driver=file,file.filename={}",
            path.display()
        ))
        .unwrap();
    for k in 0..16u64 {
        node.write_blocking(&[k as u8 + 1; 65536], k * 3 * MIB, false).unwrap();
    }
    // As blockdev-del does: out of the graph, and every removed node closed.
    for removed in graph.remove("t", &[]).unwrap() {
        removed.close().unwrap();
    }
    let image = qcow2::Qcow2Image::open_path(&path, false).unwrap();
    for k in 0..16u64 {
        let mut buf = vec![0u8; 65536];
        image.read_at(&mut buf, k * 3 * MIB).unwrap();
        assert!(buf.iter().all(|&b| b == k as u8 + 1), "write {k} is not in the file");
    }
    drop(node);
}
