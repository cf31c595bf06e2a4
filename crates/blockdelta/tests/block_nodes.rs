//! Block nodes: `--blockdev` options with QEMU's error texts, the file and raw drivers,
//! and the write hook that feeds dirty bitmaps (spec 2.8).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use blockdelta::block::dirty_bitmap::AddBitmap;
use blockdelta::block::graph::BlockGraph;
use blockdelta::block::node::{BlockDriver, BlockStatus, Node, NodeOptions, ZeroFlags};

const MIB: u64 = 1 << 20;

fn image(dir: &tempfile::TempDir, size: u64) -> String {
    let path = dir.path().join("disk.img");
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    path.to_str().unwrap().to_string()
}

fn add_bitmap(node: &Node, name: &str) {
    node.bitmaps().add(&AddBitmap { name: name.into(), ..Default::default() }).unwrap();
}

fn count(node: &Node, name: &str) -> u64 {
    node.bitmaps().query().into_iter().find(|b| b.name.as_deref() == Some(name)).unwrap().count
}

#[test]
fn blockdev_errors_use_qemus_texts() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(&dir, MIB);
    let graph = BlockGraph::new();
    graph.add_from_str(&format!("driver=file,node-name=file0,filename={img}")).unwrap();
    let cases = [
        (format!("driver=file,node-name=a,filename={img},bogus=1"), "Parameter 'bogus' is unexpected".to_string()),
        ("driver=file,node-name=a".into(), "Parameter 'filename' is missing".into()),
        ("driver=nosuch,node-name=a".into(), "Parameter 'driver' does not accept value 'nosuch'".into()),
        ("driver=raw,node-name=a,file=nonode".into(), "Cannot find device='nonode' nor node-name='nonode'".into()),
        (
            format!("driver=raw,node-name=a,file.driver=file,file.filename={img},file.bogus=2"),
            "Parameter 'file.bogus' is unexpected".into(),
        ),
        (
            "driver=file,node-name=a,filename=/nonexistent/x".into(),
            "Could not open '/nonexistent/x': No such file or directory".into(),
        ),
        (
            format!("driver=file,node-name=a,filename={img},read-only=maybe"),
            "Parameter 'read-only' expects 'on' or 'off'".into(),
        ),
        (format!("driver=file,filename={img}"), "'node-name' must be specified for the root node".into()),
        (
            format!("driver=file,node-name=a,filename={img},detect-zeroes=unmap"),
            "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap".into(),
        ),
        (
            format!(r#"{{"driver":"file","node-name":"a","filename":"{img}","read-only":"on"}}"#),
            "Invalid parameter type for 'read-only', expected: boolean".into(),
        ),
        (format!("driver=file,node-name=9a,filename={img}"), "Invalid node-name: '9a'".into()),
        (format!("driver=file,node-name=file0,filename={img}"), "Duplicate nodes with node-name='file0'".into()),
        (
            "driver=raw,node-name=r,file=file0,offset=512,size=1000".into(),
            "Specified size is not multiple of 512".into(),
        ),
        (
            "driver=raw,node-name=r,file=file0,offset=1000000000".into(),
            "Offset (1000000000) cannot be greater than size of the containing file (1048576)".into(),
        ),
        (
            format!("driver=file,node-name=a,filename={img},discard=bogus"),
            "Parameter 'discard' does not accept value 'bogus'".into(),
        ),
    ];
    for (args, text) in cases {
        let err = graph.add_from_str(&args).unwrap_err();
        assert_eq!(err.to_string(), text, "--blockdev {args}");
    }
    assert_eq!(graph.nodes().len(), 1, "failed adds leave no node behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_and_raw_nodes_read_write_and_record() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(&dir, 4 * MIB);
    let graph = BlockGraph::new();
    let disk = graph
        .add_from_str(&format!(
            "driver=raw,node-name=disk0,offset=1048576,file.driver=file,file.filename={img}"
        ))
        .unwrap();
    assert_eq!(disk.len(), 3 * MIB);
    assert_eq!(graph.nodes().len(), 2, "the nested file node gets a generated name");
    let file = disk.children()[0].clone();
    assert!(file.name().starts_with('#'));
    add_bitmap(&disk, "b");
    add_bitmap(&file, "f");
    disk.write(vec![7u8; 4096], 131072 - 100, false).await.unwrap();
    assert_eq!(disk.read(131072 - 100, 4096).await.unwrap(), vec![7u8; 4096]);
    // The raw window shifts offsets into the file.
    assert_eq!(file.read(MIB + 131072 - 100, 4).await.unwrap(), vec![7u8; 4]);
    let on_disk = std::fs::read(&img).unwrap();
    assert_eq!(&on_disk[(MIB + 131072 - 100) as usize..][..4096], &[7u8; 4096][..]);
    // 4096 bytes across a 64 KiB boundary: two granules of disk0, two of the file node.
    assert_eq!(count(&disk, "b"), 2 * 65536);
    assert_eq!(count(&file, "f"), 2 * 65536);
    // Past the end: refused before the driver, nothing recorded.
    assert!(disk.write(vec![1u8; 512], 3 * MIB - 256, false).await.is_err());
    assert_eq!(count(&disk, "b"), 2 * 65536);
    disk.flush().await.unwrap();
}

#[tokio::test]
async fn readonly_bitmaps_and_read_only_nodes_refuse_writes_with_eperm() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(&dir, MIB);
    let graph = BlockGraph::new();
    let disk = graph.add_from_str(&format!("driver=file,node-name=d,filename={img}")).unwrap();
    let id = disk.bitmaps().add(&AddBitmap { name: "ro".into(), ..Default::default() }).unwrap();
    disk.bitmaps().set_readonly(id, true).unwrap();
    for result in [
        disk.write(vec![1; 512], 0, false).await,
        disk.write_zeroes(0, 512, ZeroFlags::default()).await,
        disk.discard(0, 512).await,
    ] {
        assert_eq!(result.unwrap_err().raw_os_error(), Some(1), "EPERM");
    }
    assert_eq!(count(&disk, "ro"), 0);
    disk.bitmaps().set_readonly(id, false).unwrap();
    disk.write(vec![1; 512], 0, false).await.unwrap();
    // A second node on the same file: without locking=off it would conflict, as in QEMU.
    let ro = graph
        .add_from_str(&format!("driver=file,node-name=r,filename={img},read-only=on,locking=off"))
        .unwrap();
    assert_eq!(ro.write(vec![1; 512], 0, false).await.unwrap_err().raw_os_error(), Some(1));
    assert_eq!(ro.read(0, 512).await.unwrap(), vec![1; 512]);
}

#[tokio::test]
async fn discard_is_recorded_only_when_passed_down() {
    // QEMU 10.0.2: with the default discard=ignore a discard changes nothing and dirties
    // nothing; with discard=unmap it does both. Write-zeroes always dirties.
    let dir = tempfile::tempdir().unwrap();
    let img = image(&dir, 4 * MIB);
    let graph = BlockGraph::new();
    let ignore =
        graph.add_from_str(&format!("driver=file,node-name=i,filename={img},locking=off")).unwrap();
    let unmap = graph
        .add_from_str(&format!("driver=file,node-name=u,filename={img},discard=unmap,locking=off"))
        .unwrap();
    for node in [&ignore, &unmap] {
        add_bitmap(node, "b");
        node.discard(0, 65536).await.unwrap();
        node.write_zeroes(MIB, 65536, ZeroFlags::default()).await.unwrap();
    }
    assert_eq!(count(&ignore, "b"), 65536);
    assert_eq!(count(&unmap, "b"), 131072);
}

#[tokio::test]
async fn detect_zeroes_turns_zero_writes_into_write_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(&dir, 4 * MIB);
    std::fs::write(&img, vec![0xffu8; 4 * MIB as usize]).unwrap();
    let graph = BlockGraph::new();
    let disk = graph
        .add_from_str(&format!(
            "driver=file,node-name=d,filename={img},discard=unmap,detect-zeroes=unmap"
        ))
        .unwrap();
    add_bitmap(&disk, "b");
    disk.write(vec![0u8; 65536], 0, false).await.unwrap();
    assert_eq!(disk.read(0, 65536).await.unwrap(), vec![0u8; 65536]);
    assert_eq!(count(&disk, "b"), 65536);
    // Unmapped: the file has a hole there now.
    let meta = std::fs::metadata(&img).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(meta.blocks() * 512 < 4 * MIB, "{} blocks", meta.blocks());
}

/// A driver whose writes fail after doing nothing.
struct FailingDriver {
    failed: AtomicBool,
}

impl BlockDriver for FailingDriver {
    fn driver_name(&self) -> &'static str {
        "failing"
    }
    fn len(&self) -> u64 {
        MIB
    }
    fn read(&self, buf: &mut [u8], _offset: u64) -> io::Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn write(&self, _buf: &[u8], _offset: u64, _fua: bool) -> io::Result<()> {
        self.failed.store(true, Ordering::SeqCst);
        Err(io::Error::from_raw_os_error(5))
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _flags: ZeroFlags) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(5))
    }
    fn discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(5))
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn block_status(&self, _offset: u64, len: u64) -> io::Result<BlockStatus> {
        Ok(BlockStatus { data: true, zero: false, allocated: true, depth: 1, len })
    }
}

#[tokio::test]
async fn failed_writes_still_dirty_the_bitmap() {
    let driver = FailingDriver { failed: AtomicBool::new(false) };
    let options = NodeOptions { discard_unmap: true, ..Default::default() };
    let node = Node::new("f", Box::new(driver), options, Vec::new());
    add_bitmap(&node, "b");
    assert_eq!(node.write(vec![1; 512], 0, false).await.unwrap_err().raw_os_error(), Some(5));
    assert!(node.write_zeroes(MIB / 2, 512, ZeroFlags::default()).await.is_err());
    assert!(node.discard(MIB - 512, 512).await.is_err());
    assert_eq!(count(&node, "b"), 3 * 65536, "a failed request may have changed the disk");
}

#[tokio::test]
async fn qcow2_nodes_read_qemu_images_through_their_backing_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let (base, top) = (path("base.raw"), path("top.qcow2"));
    std::fs::write(&base, vec![0x11u8; 2 * MIB as usize]).unwrap();
    testkit::qemu_img(["create", "-q", "-f", "qcow2", "-F", "raw", "-b", "base.raw", &top])
        .unwrap();
    testkit::qemu_io([
        "-f",
        "qcow2",
        "-c",
        "write -P 0x22 65536 4096",
        "-c",
        "write -z 1M 64k",
        &top,
    ])
    .unwrap();
    let graph = BlockGraph::new();
    let disk = graph
        .add_from_str(&format!("driver=qcow2,node-name=disk0,file.driver=file,file.filename={top}"))
        .unwrap();
    assert_eq!(disk.driver_name(), "qcow2");
    assert_eq!(disk.len(), 2 * MIB);
    let data = disk.read(0, 2 * MIB as usize).await.unwrap();
    let mut want = vec![0x11u8; 2 * MIB as usize];
    want[65536..69632].fill(0x22);
    want[MIB as usize..(MIB + 65536) as usize].fill(0);
    assert!(data == want, "reads go through to the backing file where the top has nothing");
    let top_status = disk.block_status(65536, 4096).await.unwrap();
    assert!(top_status.data && top_status.allocated && top_status.depth == 1, "{top_status:?}");
    let below = disk.block_status(0, 65536).await.unwrap();
    assert!(below.data && !below.allocated && below.depth == 2, "{below:?}");
    let zero = disk.block_status(MIB, 65536).await.unwrap();
    assert!(zero.zero && !zero.data && zero.allocated, "{zero:?}");
    // The default granularity is the cluster size (64 KiB).
    add_bitmap(&disk, "b");
    assert_eq!(disk.bitmaps().query()[0].granularity, 65536);
    // With backing=null the backing file is ignored.
    let graph = BlockGraph::new();
    let alone = graph
        .add(
            testkit::serde_json::json!({"driver": "qcow2", "node-name": "alone", "read-only": true,
                "backing": null, "file": {"driver": "file", "filename": top, "locking": "off"}}),
            blockdelta::block::options::Syntax::Json,
        )
        .unwrap();
    assert_eq!(alone.read(0, 4).await.unwrap(), vec![0; 4]);
    // A file that is not qcow2: the error says so, and no node stays behind.
    let err = graph
        .add_from_str(&format!(
            "driver=qcow2,node-name=bad,file.driver=file,file.filename={base},file.locking=off"
        ))
        .unwrap_err();
    assert!(err.to_string().contains("not a qcow2 image"), "{err}");
    assert_eq!(graph.nodes().len(), 2, "{:?}", graph.nodes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qcow2_nodes_write_images_qemu_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let (ours, theirs, base) = (path("ours.qcow2"), path("theirs.qcow2"), path("base.raw"));
    std::fs::write(&base, vec![0x33u8; 4 * MIB as usize]).unwrap();
    for img in [&ours, &theirs] {
        testkit::qemu_img(["create", "-q", "-f", "qcow2", "-F", "raw", "-b", &base, img]).unwrap();
    }
    // The same requests through a blockdelta node and through qemu-io.
    let graph = BlockGraph::new();
    let disk = graph
        .add_from_str(&format!(
            "driver=qcow2,node-name=disk0,discard=unmap,file.driver=file,file.filename={ours}"
        ))
        .unwrap();
    add_bitmap(&disk, "b");
    disk.write(vec![0x44; 5000], 70_000, false).await.unwrap();
    disk.write_zeroes(MIB, 3 * 65536, ZeroFlags::default()).await.unwrap();
    disk.discard(2 * MIB, 65536).await.unwrap();
    disk.write(vec![0x55; 512], 4 * MIB - 512, true).await.unwrap();
    disk.flush().await.unwrap();
    assert_eq!(count(&disk, "b"), (1 + 3 + 1 + 1) * 65536);
    drop(disk);
    drop(graph);
    testkit::qemu_io([
        "-f",
        "qcow2",
        "-c",
        "write -P 0x44 70000 5000",
        "-c",
        "write -z 1M 192k",
        "-c",
        "discard 2M 64k",
        "-c",
        "write -P 0x55 4193792 512",
        &theirs,
    ])
    .unwrap();
    let check = testkit::qemu_img(["check", &ours]).unwrap();
    assert!(check.contains("No errors were found"), "{check}");
    let compare =
        testkit::qemu_img(["compare", "-f", "qcow2", "-F", "qcow2", &ours, &theirs]).unwrap();
    assert!(compare.contains("Images are identical"), "{compare}");
}
