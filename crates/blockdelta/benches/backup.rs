//! Backup benchmark: `blockdelta serve` against `qemu-storage-daemon`, same machine, same
//! run. Each daemon backs up the same fully written qcow2 image (4 GiB by default):
//! a full backup anchored by a new bitmap (`transaction` of `block-dirty-bitmap-add` and
//! `blockdev-backup sync=full`), then 1 % of the clusters are rewritten through NBD and
//! an incremental runs, then 10 % and another incremental. Times are from the
//! `blockdev-backup` command to `BLOCK_JOB_COMPLETED`; targets are fresh qcow2 images on
//! the same file system. Run with `scripts/bench-backup` (or `cargo bench -p blockdelta
//! --bench backup -- [SIZE_GIB] [ROUNDS]`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nbd::client::{Client, ClientOptions};
use testkit::qsd::{DaemonBuilder, StorageDaemon};
use testkit::serde_json::json;
use testkit::{SplitMix64, qemu_img, qemu_io};

const CLUSTER: u64 = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Qemu,
    Blockdelta,
}

struct Times {
    full: f64,
    inc1: f64,
    inc10: f64,
}

fn builder(kind: Kind) -> DaemonBuilder {
    match kind {
        Kind::Qemu => StorageDaemon::qemu(),
        Kind::Blockdelta => {
            let exe = std::env::var("BLOCKDELTA").unwrap_or_else(|_| {
                concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/release/blockdelta").into()
            });
            StorageDaemon::builder(exe).arg("serve")
        }
    }
}

/// Rewrites `fraction` of the clusters, spread at random, through the NBD export.
fn dirty(socket: &Path, size: u64, fraction: f64, seed: u64) {
    let clusters = size / CLUSTER;
    let count = (clusters as f64 * fraction) as u64;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let options = ClientOptions { export: "disk0".into(), ..Default::default() };
        let mut c = Client::connect_unix(socket, &options).await.unwrap();
        let mut rng = SplitMix64(seed);
        let data = vec![0x5a; CLUSTER as usize];
        for _ in 0..count {
            let at = rng.up_to(clusters - 1) * CLUSTER;
            c.write(at, &data, false).await.unwrap();
        }
        c.flush().await.unwrap();
        c.disconnect().await.unwrap();
    });
}

fn backup(d: &mut StorageDaemon, args: testkit::serde_json::Value, transaction: bool) -> f64 {
    let start = Instant::now();
    if transaction {
        d.execute_ok(
            "transaction",
            json!({"actions": [
                {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "b0"}},
                {"type": "blockdev-backup", "data": args},
            ]}),
        );
    } else {
        d.execute_ok("blockdev-backup", args);
    }
    let done = d.qmp().wait_event("BLOCK_JOB_COMPLETED", Duration::from_secs(3600));
    let elapsed = start.elapsed().as_secs_f64();
    assert!(done["data"].get("error").is_none(), "backup failed: {done}");
    elapsed
}

fn run(kind: Kind, source: &Path, work: &Path, size: u64, round: u64) -> Times {
    let targets: Vec<PathBuf> = (0..3).map(|i| work.join(format!("t{i}.qcow2"))).collect();
    for t in &targets {
        let _ = std::fs::remove_file(t);
        qemu_img(["create", "-q", "-f", "qcow2", t.to_str().unwrap(), &size.to_string()]).unwrap();
    }
    let b = builder(kind);
    let socket = b.path("nbd.sock");
    let mut b = b
        .arg("--blockdev")
        .arg(format!("driver=file,node-name=file0,filename={}", source.display()))
        .arg("--blockdev")
        .arg("driver=qcow2,node-name=disk0,file=file0");
    for (i, t) in targets.iter().enumerate() {
        b = b
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=tf{i},filename={}", t.display()))
            .arg("--blockdev")
            .arg(format!("driver=qcow2,node-name=t{i},file=tf{i}"));
    }
    let mut d = b
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", socket.display()))
        .arg("--export")
        .arg("type=nbd,id=e0,node-name=disk0,name=disk0,writable=on")
        .start()
        .unwrap();
    let full = backup(
        &mut d,
        json!({"job-id": "full", "device": "disk0", "target": "t0", "sync": "full"}),
        true,
    );
    dirty(&socket, size, 0.01, round);
    let inc1 = backup(
        &mut d,
        json!({"job-id": "inc1", "device": "disk0", "target": "t1", "sync": "incremental", "bitmap": "b0"}),
        false,
    );
    dirty(&socket, size, 0.10, round + 1000);
    let inc10 = backup(
        &mut d,
        json!({"job-id": "inc10", "device": "disk0", "target": "t2", "sync": "incremental", "bitmap": "b0"}),
        false,
    );
    d.quit().unwrap();
    for t in &targets {
        let _ = std::fs::remove_file(t);
    }
    Times { full, inc1, inc10 }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; numbers are ours.
    let args: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let gib = args.first().copied().unwrap_or(4);
    let rounds = args.get(1).copied().unwrap_or(3);
    let size = gib << 30;
    let work = tempfile::Builder::new()
        .prefix("bench-backup-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let source = work.path().join("source.qcow2");
    let s = source.to_str().unwrap();
    qemu_img(["create", "-q", "-f", "qcow2", s, &size.to_string()]).unwrap();
    // qemu-io writes at most 2 GiB per command.
    let mut fill = vec!["-f".to_string(), "qcow2".into()];
    for g in 0..gib {
        fill.push("-c".into());
        fill.push(format!("write -P 7 {} 1G", g << 30));
    }
    fill.push(s.into());
    qemu_io(&fill).unwrap();
    let mut results: Vec<(Kind, Vec<Times>)> =
        vec![(Kind::Qemu, Vec::new()), (Kind::Blockdelta, Vec::new())];
    for round in 0..rounds {
        for (kind, times) in &mut results {
            times.push(run(*kind, &source, work.path(), size, round));
        }
    }
    println!("{gib} GiB image, {rounds} rounds, median seconds");
    println!("{:<22} {:>10} {:>12} {:>8}", "measure", "qemu_s", "blockdelta_s", "ratio");
    let pick = |i: usize, f: &dyn Fn(&Times) -> f64| median(results[i].1.iter().map(f).collect());
    type Measure<'a> = (&'a str, &'a dyn Fn(&Times) -> f64);
    let measures: [Measure; 3] =
        [("full", &|t| t.full), ("incremental 1%", &|t| t.inc1), ("incremental 10%", &|t| t.inc10)];
    for (name, f) in measures {
        let (q, b) = (pick(0, f), pick(1, f));
        println!("{name:<22} {q:>10.3} {b:>12.3} {:>8.2}", q / b);
    }
    let (full, inc1) = (pick(1, &|t| t.full), pick(1, &|t| t.inc1));
    println!("blockdelta: 1% incremental / full = {:.1}%", 100.0 * inc1 / full);
}
