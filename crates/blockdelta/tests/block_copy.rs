//! The block-copy engine: a background copy racing guest writes gives the target exactly
//! the source as it was when the copy started (point in time), for every initial mode.

use std::sync::Arc;
use std::thread;

use blockdelta::block::graph::BlockGraph;
use blockdelta::block::node::Node;
use blockdelta::jobs::block_copy::{BlockCopy, CopyBeforeWrite, InitialCopy};
use hbitmap::HBitmap;
use testkit::{SplitMix64, qemu_img};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 32 * MIB;
const CLUSTER: u64 = 64 * 1024;

fn open(graph: &BlockGraph, dir: &std::path::Path, name: &str) -> Arc<Node> {
    let path = dir.join(format!("{name}.qcow2"));
    qemu_img(["create", "-q", "-f", "qcow2", path.to_str().unwrap(), &SIZE.to_string()]).unwrap();
    graph
        .add_from_str(&format!(
            "driver=qcow2,node-name={name},file.driver=file,file.filename={}",
            path.display()
        ))
        .unwrap()
}

fn read_all(node: &Node) -> Vec<u8> {
    let mut buf = vec![0u8; SIZE as usize];
    node.read_blocking(&mut buf, 0).unwrap();
    buf
}

/// Random writes of random length, some zero writes.
fn scribble(node: &Node, rng: &mut SplitMix64, count: usize) {
    for i in 0..count {
        let off = rng.up_to(SIZE / 512 - 300) * 512;
        let len = (1 + rng.up_to(255)) * 512;
        if i % 7 == 0 {
            node.write_zeroes_blocking(off, len, Default::default()).unwrap();
        } else {
            let byte = (rng.next() % 255 + 1) as u8;
            node.write_blocking(&vec![byte; len as usize], off, false).unwrap();
        }
    }
}

fn run_backup(initial: &str) {
    let dir = tempfile::tempdir().unwrap();
    let graph = BlockGraph::new();
    let source = open(&graph, dir.path(), "src");
    let target = open(&graph, dir.path(), "dst");
    let mut rng = SplitMix64(0xb10c);
    scribble(&source, &mut rng, 200);
    // The "bitmap" mode copies the clusters of a few dirty runs only.
    let mut bits = HBitmap::new(SIZE, 16).unwrap();
    for _ in 0..20 {
        bits.set(rng.up_to(SIZE / CLUSTER - 4) * CLUSTER, (1 + rng.up_to(3)) * CLUSTER).unwrap();
    }
    let mode = match initial {
        "bitmap" => InitialCopy::Bitmap(&bits),
        _ => InitialCopy::All,
    };
    let before = read_all(&source);
    let copy = Arc::new(BlockCopy::new(source.clone(), target.clone(), CLUSTER, mode).unwrap());
    let step = source.drained(|| source.add_before_write(Arc::new(CopyBeforeWrite(copy.clone()))));

    // sync=none has no background copy.
    let background = {
        let copy = copy.clone();
        let run = initial != "none";
        thread::spawn(move || {
            while run && let Some(range) = copy.claim_next() {
                copy.copy_claimed(range).unwrap();
            }
        })
    };
    let writers: Vec<_> = (0..3)
        .map(|t| {
            let source = source.clone();
            thread::spawn(move || scribble(&source, &mut SplitMix64(t + 100), 150))
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    background.join().unwrap();
    assert!(source.drained(|| source.remove_before_write(step)));

    let after = read_all(&target);
    let now = read_all(&source);
    assert_ne!(now, before, "the guest writes changed the source");
    for c in 0..SIZE / CLUSTER {
        let r = (c * CLUSTER) as usize..((c + 1) * CLUSTER) as usize;
        let expected_copied = match initial {
            "all" => true,
            "bitmap" => bits.get(c * CLUSTER),
            _ => now[r.clone()] != before[r.clone()],
        };
        if expected_copied {
            assert!(
                after[r.clone()] == before[r.clone()],
                "{initial}: cluster {c} is not the point-in-time data"
            );
        } else if initial == "bitmap" {
            // Never copied, unless a guest write forced a copy-before-write.
            assert!(
                after[r.clone()].iter().all(|&b| b == 0) || after[r.clone()] == before[r.clone()],
                "{initial}: cluster {c} holds data from neither time"
            );
        }
    }
    if initial != "none" {
        assert_eq!(copy.remaining(), 0, "{initial}");
    }
}

#[test]
fn full_copy_racing_writes_is_the_point_in_time() {
    run_backup("all");
}

#[test]
fn bitmap_copy_racing_writes_is_the_point_in_time() {
    run_backup("bitmap");
}

/// sync=none: only copy-before-write copies, and exactly the clusters written.
#[test]
fn copy_before_write_alone_keeps_the_old_data_of_written_clusters() {
    run_backup("none");
}

/// sync=top copies what the top layer holds and nothing that reads through to the
/// backing file; the copy's length counts only those clusters.
#[test]
fn top_copies_only_what_the_top_layer_holds() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    let b = base.to_str().unwrap();
    qemu_img(["create", "-q", "-f", "qcow2", b, &SIZE.to_string()]).unwrap();
    testkit::qemu_io(["-f", "qcow2", "-c", "write -P 9 0 4M", b]).unwrap();
    qemu_img(["create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", top.to_str().unwrap()])
        .unwrap();
    testkit::qemu_io([
        "-f",
        "qcow2",
        "-c",
        "write -P 3 1M 128k",
        "-c",
        "write -P 4 8M 64k",
        top.to_str().unwrap(),
    ])
    .unwrap();
    let graph = BlockGraph::new();
    let source = graph
        .add_from_str(&format!(
            "driver=qcow2,node-name=src,file.driver=file,file.filename={}",
            top.display()
        ))
        .unwrap();
    let target = open(&graph, dir.path(), "dst");
    let copy = source.drained(|| {
        BlockCopy::new(source.clone(), target.clone(), CLUSTER, InitialCopy::AllocatedInTop)
            .unwrap()
    });
    assert_eq!(copy.remaining(), 3 * CLUSTER);
    while let Some(range) = copy.claim_next() {
        copy.copy_claimed(range).unwrap();
    }
    let t = read_all(&target);
    assert!(t[(1 << 20)..(1 << 20) + 131072].iter().all(|&x| x == 3));
    assert!(t[(8 << 20)..(8 << 20) + 65536].iter().all(|&x| x == 4));
    assert!(t[0..65536].iter().all(|&x| x == 0), "base data must not be copied");
}
