//! The backup job's core without the job machinery: an incremental backup racing guest
//! writes copies exactly the bitmap's clusters as they were at the start, and the sync
//! bitmap is settled as QEMU settles it (success: only the writes made during the job;
//! cancel: nothing lost).

use std::sync::{Arc, Mutex};

use blockdelta::block::dirty_bitmap::AddBitmap;
use blockdelta::block::graph::BlockGraph;
use blockdelta::block::node::Node;
use blockdelta::jobs::backup::{Backup, BackupError, BackupJob, BackupOptions};
use blockdelta::jobs::{JobOptions, JobRegistry, JobType};
use hbitmap::HBitmap;
use serde_json::json;
use testkit::{SplitMix64, qemu_img};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const CLUSTER: u64 = 64 * 1024;

fn image(graph: &BlockGraph, dir: &std::path::Path, name: &str) -> Arc<Node> {
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

/// Writes `count` random ranges and records them in `model`.
fn writes(node: &Node, rng: &mut SplitMix64, count: usize, model: &mut HBitmap) {
    for _ in 0..count {
        let off = rng.up_to(SIZE / 512 - 300) * 512;
        let len = (1 + rng.up_to(255)) * 512;
        node.write_blocking(&vec![(rng.next() % 255 + 1) as u8; len as usize], off, false).unwrap();
        model.set(off, len).unwrap();
    }
}

fn options(sync: &str, bitmap: Option<&str>, mode: Option<&str>) -> BackupOptions {
    let mut v = json!({"job-id": "j0", "device": "src", "target": "dst", "sync": sync});
    if let Some(b) = bitmap {
        v["bitmap"] = json!(b);
    }
    if let Some(m) = mode {
        v["bitmap-mode"] = json!(m);
    }
    BackupOptions::from_value(v).unwrap()
}

/// An incremental backup of `src` (bitmap b0) to `dst`, racing 150 guest writes; with
/// `cancel`, the job is cancelled as soon as it runs.
fn scenario(cancel: bool) {
    let dir = tempfile::tempdir().unwrap();
    let graph = BlockGraph::new();
    let src = image(&graph, dir.path(), "src");
    let dst = image(&graph, dir.path(), "dst");
    src.bitmaps()
        .add(&AddBitmap { name: "b0".into(), granularity: Some(CLUSTER), ..Default::default() })
        .unwrap();
    let mut rng = SplitMix64(7);
    let mut before_model = HBitmap::new(SIZE, 16).unwrap();
    writes(&src, &mut rng, 100, &mut before_model);
    let point_in_time = read_all(&src);

    let events = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = {
        let events = events.clone();
        Arc::new(move |name: &'static str, data: serde_json::Value| {
            let status = data["status"].as_str().map(|s| format!(" {s}")).unwrap_or_default();
            events.lock().unwrap().push(format!("{name}{status}"));
        })
    };
    let registry = JobRegistry::new(sink);
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let backup = Backup::create(&graph, options("incremental", Some("b0"), None), |id| {
        registry.check_new_id(id)
    })
    .unwrap();
    let mut during_model = HBitmap::new(SIZE, 16).unwrap();
    rt.block_on(async {
        let job = registry
            .create(JobOptions::new("j0", JobType::Backup), BackupJob(Arc::new(backup)))
            .unwrap();
        job.start().unwrap();
        if cancel {
            job.cancel(true).await.unwrap();
        }
        let writer = {
            let src = src.clone();
            tokio::task::spawn_blocking(move || {
                let mut model = HBitmap::new(SIZE, 16).unwrap();
                writes(&src, &mut SplitMix64(99), 150, &mut model);
                model
            })
        };
        job.wait_finished().await;
        during_model.merge(&writer.await.unwrap()).unwrap();
    });
    let events = events.lock().unwrap().clone();
    let last = if cancel { "BLOCK_JOB_CANCELLED" } else { "BLOCK_JOB_COMPLETED" };
    assert!(events.iter().any(|e| e == last), "{events:?}");
    assert_eq!(events.last().map(String::as_str), Some("JOB_STATUS_CHANGE null"));

    let b0 = src.bitmaps().sha256("b0").unwrap();
    let target = read_all(&dst);
    if !cancel {
        // Every cluster of the bitmap holds the point-in-time data.
        for run in before_model.dirty_runs(0) {
            let r = run.start as usize..run.end as usize;
            assert!(target[r.clone()] == point_in_time[r], "cluster run {run:?}");
        }
        // The bitmap now holds exactly the writes made during the job.
        assert_eq!(b0, during_model.sha256_hex());
    } else {
        // Nothing lost: the original bits and the writes made during the job.
        let mut all = before_model.clone();
        all.merge(&during_model).unwrap();
        assert_eq!(b0, all.sha256_hex());
    }
    // The source is writable again without copy-before-write, and resizable.
    src.write_blocking(&[1; 512], 0, false).unwrap();
    assert!(src.bitmaps().query().iter().all(|b| !b.busy), "{:?}", src.bitmaps().query());
    src.resize_blocking(SIZE + MIB).unwrap();
}

#[test]
fn incremental_backup_success_leaves_only_new_writes_in_the_bitmap() {
    scenario(false);
}

#[test]
fn cancelled_incremental_backup_reclaims_every_bit() {
    scenario(true);
}

/// The accept/reject matrix of iotest 257's `test_backup_api` (spec 3.4), with QEMU's
/// texts.
#[test]
fn backup_arguments_are_checked_in_qemus_order() {
    let dir = tempfile::tempdir().unwrap();
    let graph = BlockGraph::new();
    let src = image(&graph, dir.path(), "src");
    image(&graph, dir.path(), "dst");
    src.bitmaps().add(&AddBitmap { name: "b0".into(), ..Default::default() }).unwrap();
    let e1 = |s: &str| format!("must provide a valid bitmap name for '{s}' sync mode");
    let e2 = "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'";
    let e3 = "Bitmap 'nope' could not be found";
    let e4 = "Bitmap sync mode must be given when providing a bitmap";
    let e5 = "sync mode 'none' does not produce meaningful bitmap outputs";
    let e6 = |s: &str| {
        format!(
            "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode '{s}'"
        )
    };
    let e7 = "Cannot specify bitmap sync mode without a bitmap";
    for sync in ["incremental", "bitmap", "full", "top", "none"] {
        for (bitmap, mode) in [
            (None, None),
            (None, Some("on-success")),
            (Some("nope"), None),
            (Some("nope"), Some("always")),
            (Some("b0"), None),
            (Some("b0"), Some("on-success")),
            (Some("b0"), Some("always")),
            (Some("b0"), Some("never")),
        ] {
            let expected: Option<String> = match (sync, bitmap, mode) {
                ("incremental" | "bitmap", None, _) => Some(e1(sync)),
                ("incremental", Some(_), Some("always" | "never")) => Some(e2.into()),
                (_, Some("nope"), _) => Some(e3.into()),
                ("incremental", Some("b0"), _) => None,
                (_, Some("b0"), None) => Some(e4.into()),
                ("none", Some("b0"), _) => Some(e5.into()),
                ("full" | "top", Some("b0"), Some("never")) => Some(e6(sync)),
                (_, Some("b0"), _) => None,
                (_, None, Some(_)) => Some(e7.into()),
                (_, None, None) => None,
                _ => unreachable!(),
            };
            let result = Backup::create(&graph, options(sync, bitmap, mode), |_| Ok(()));
            match (result, expected) {
                (Ok(b), None) => {
                    b.abort().unwrap();
                    b.clean();
                }
                (Err(e), Some(text)) => {
                    assert_eq!(e.to_string(), text, "{sync} {bitmap:?} {mode:?}")
                }
                (r, e) => panic!(
                    "{sync} {bitmap:?} {mode:?}: got {:?}, expected {e:?}",
                    r.map(|_| ()).map_err(|e: BackupError| e.to_string())
                ),
            }
        }
    }
}
