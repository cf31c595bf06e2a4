//! Torture: writers, backups (full, incremental, a second full at the same time),
//! cancels, resizes, transactions and NBD exports, all at once, for a bounded time
//! (`TORTURE_SECONDS`, default 30; `scripts/torture` runs 600) under a watchdog.
//!
//! Every write is 4 KiB at the start of a 64 KiB granule and carries its sequence
//! number; each granule has one writer, so its sequence numbers only grow. After every
//! job the test checks:
//!
//! - **The union rule.** The bitmap the settlement leaves covers every write
//!   acknowledged since the last successful backup's instant: after a success, every
//!   write started after the job's command returned (its instant is no later); after a
//!   failure or cancel, every write since the previous success.
//! - **The chain.** The full backup overlaid with the incrementals since (each target's
//!   allocated clusters) reads, at every granule, a write that was current at the
//!   backup's instant: no older than the last write acknowledged before the command was
//!   sent, no newer than the last one started before it returned. A lost write shows
//!   as an older one, at this backup or the next.
//! - **Concurrent instants.** A second full backup started while an incremental runs
//!   reads the same way at its own instant.
//!
//! The watchdog aborts the process (the test fails) when no job has ended for 60 s: a
//! deadlock. Any panic in any thread fails the test.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use blockdelta::block::graph::BlockGraph;
use blockdelta::block::node::Node;
use blockdelta::export::ExportManager;
use blockdelta::qmp::Qmp;
use blockdelta::qmp::protocol::Command;
use serde_json::{Value, json};
use testkit::{SplitMix64, qemu_img};

const MIB: u64 = 1 << 20;
const GRANULE: u64 = 64 * 1024;
const WRITE: usize = 4096;
const WRITERS: u64 = 3;
const BITMAP: &str = "track";

/// Per granule: the sequence number of the last write started and of the last one
/// acknowledged.
#[derive(Default)]
struct Granules {
    issued: Vec<u64>,
    acked: Vec<u64>,
}

struct World {
    graph: Arc<BlockGraph>,
    node: Arc<Node>,
    dir: PathBuf,
    granules: Mutex<Granules>,
    stop: AtomicBool,
    /// Jobs ended so far (the watchdog's progress mark).
    jobs_ended: AtomicU64,
    writes: AtomicU64,
}

impl World {
    fn len_granules(&self) -> u64 {
        self.granules.lock().unwrap().issued.len() as u64
    }

    fn issued(&self) -> Vec<u64> {
        self.granules.lock().unwrap().issued.clone()
    }

    fn acked(&self) -> Vec<u64> {
        self.granules.lock().unwrap().acked.clone()
    }
}

fn write_payload(seq: u64) -> Vec<u8> {
    let mut buf = vec![(seq % 251) as u8 | 1; WRITE];
    buf[..8].copy_from_slice(&seq.to_le_bytes());
    buf
}

/// A writer thread: writes to its own granules (`g % WRITERS == id`).
fn writer(world: Arc<World>, id: u64) {
    let mut rng = SplitMix64(0x5eed + id);
    while !world.stop.load(SeqCst) {
        let n = world.len_granules();
        let slots = (n - id).div_ceil(WRITERS);
        let g = id + rng.up_to(slots).min(slots - 1) * WRITERS;
        let seq = {
            let mut st = world.granules.lock().unwrap();
            st.issued[g as usize] += 1;
            st.issued[g as usize]
        };
        world.node.write_blocking(&write_payload(seq), g * GRANULE, false).unwrap_or_else(|e| {
            panic!("write of granule {g} failed: {e}");
        });
        world.granules.lock().unwrap().acked[g as usize] = seq;
        world.writes.fetch_add(1, SeqCst);
        if rng.up_to(8) == 0 {
            thread::sleep(Duration::from_micros(200));
        }
    }
}

/// The tag (sequence number) each granule of `target` holds, for the granules
/// allocated in it (`None`: not allocated, so the chain below shows through).
fn target_tags(target: &Node, granules: u64) -> Vec<Option<u64>> {
    let mut tags = vec![None; granules as usize];
    let mut buf = [0u8; 8];
    for (g, tag) in tags.iter_mut().enumerate() {
        let at = g as u64 * GRANULE;
        let status = target.block_status_blocking(at, GRANULE).unwrap();
        if status.allocated {
            target.read_blocking(&mut buf, at).unwrap();
            *tag = Some(u64::from_le_bytes(buf));
        }
    }
    tags
}

fn command(name: &str, arguments: Value) -> Command {
    let Value::Object(arguments) = arguments else { panic!("arguments must be an object") };
    Command { name: name.into(), arguments, id: None }
}

struct Driver {
    world: Arc<World>,
    qmp: Arc<Qmp>,
    rng: SplitMix64,
    next: u64,
    /// The chain's tag per granule (0: never written).
    chain: Vec<u64>,
    /// `issued` when the last successful backup's command returned.
    base: Vec<u64>,
    have_full: bool,
    stats: Stats,
}

#[derive(Debug, Default)]
struct Stats {
    full: u64,
    incremental: u64,
    cancelled: u64,
    side_full: u64,
    resizes: u64,
    refused_resizes: u64,
    exports: u64,
    transactions: u64,
    union_checks: u64,
}

impl Driver {
    async fn ok(&self, name: &str, arguments: Value) -> Value {
        self.qmp
            .execute(command(name, arguments.clone()))
            .await
            .unwrap_or_else(|e| panic!("{name} {arguments}: {e:?}"))
    }

    /// A new target image of the node's current size, added as node `t{n}`.
    async fn new_target(&mut self) -> String {
        self.next += 1;
        let name = format!("t{}", self.next);
        let path = self.world.dir.join(format!("{name}.qcow2"));
        let size = self.world.node.len().to_string();
        qemu_img(["create", "-q", "-f", "qcow2", path.to_str().unwrap(), &size]).unwrap();
        self.ok(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": name,
                   "file": {"driver": "file", "filename": path.to_str().unwrap()}}),
        )
        .await;
        name
    }

    async fn drop_target(&self, name: &str) {
        self.ok("blockdev-del", json!({"node-name": name})).await;
        let _ = std::fs::remove_file(self.world.dir.join(format!("{name}.qcow2")));
    }

    /// Waits for job `id` (started with `auto-dismiss: false`) to conclude, dismisses
    /// it; `true` if it completed without error.
    async fn wait_end(&mut self, id: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let jobs = self.ok("query-jobs", json!({})).await;
            let job = jobs.as_array().unwrap().iter().find(|j| j["id"] == id).cloned();
            let job = job.unwrap_or_else(|| panic!("job {id} vanished: {jobs}"));
            if job["status"] == "concluded" {
                self.ok("job-dismiss", json!({"id": id})).await;
                self.world.jobs_ended.fetch_add(1, SeqCst);
                return job.get("error").is_none();
            }
            assert!(Instant::now() < deadline, "job {id} did not end: {job}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The union rule: `BITMAP` covers every granule acknowledged past `since`.
    fn check_union(&mut self, since: &[u64], what: &str) {
        let acked = self.world.acked();
        let bitmaps = self.world.node.bitmaps();
        let id = bitmaps.find(BITMAP).expect("the tracking bitmap exists");
        let missing: Vec<usize> = bitmaps
            .with_bits(id, |bits| {
                (0..acked.len())
                    .filter(|&g| {
                        let base = since.get(g).copied().unwrap_or(0);
                        acked[g] > base && !bits.get(g as u64 * GRANULE)
                    })
                    .collect()
            })
            .unwrap();
        assert!(missing.is_empty(), "{what}: the bitmap misses granules {missing:?}");
        self.stats.union_checks += 1;
    }

    /// The chain rule for tags read at an instant between `lo` and `hi`.
    fn check_instant(tags: &[u64], lo: &[u64], hi: &[u64], what: &str) {
        for g in 0..lo.len() {
            assert!(
                lo[g] <= tags[g] && tags[g] <= hi[g],
                "{what}: granule {g} reads write {} (acknowledged before: {}, started before \
                 the reply: {})",
                tags[g],
                lo[g],
                hi[g]
            );
        }
    }

    async fn round(&mut self) {
        let full = !self.have_full || self.rng.up_to(12) == 0;
        let target = self.new_target().await;
        let job = format!("j{}", self.next);
        let speed = if self.rng.up_to(3) == 0 { 16 * MIB } else { 0 };
        let side = !full && self.rng.up_to(3) == 0;
        let side_target = if side { Some(self.new_target().await) } else { None };
        let export = if self.rng.up_to(3) == 0 {
            self.stats.exports += 1;
            let id = format!("e{}", self.next);
            self.ok(
                "block-export-add",
                json!({"type": "nbd", "id": id, "node-name": "d", "name": id}),
            )
            .await;
            Some(id)
        } else {
            None
        };
        let lo = self.world.acked();
        if full {
            // A new chain: the bitmap starts at the full backup's instant.
            let mut actions = Vec::new();
            if self.world.node.bitmaps().find(BITMAP).is_some() {
                actions.push(json!({"type": "block-dirty-bitmap-clear",
                                    "data": {"node": "d", "name": BITMAP}}));
            } else {
                actions.push(json!({"type": "block-dirty-bitmap-add",
                                    "data": {"node": "d", "name": BITMAP, "granularity": GRANULE}}));
            }
            actions.push(json!({"type": "blockdev-backup",
                                "data": {"job-id": job, "device": "d", "target": target,
                                         "sync": "full", "speed": speed, "auto-dismiss": false}}));
            self.ok("transaction", json!({"actions": actions})).await;
            self.stats.transactions += 1;
        } else if self.rng.up_to(2) == 0 {
            // In a transaction with a checkpoint bitmap, QEMU's incremental pattern.
            let cp = format!("cp{}", self.next);
            self.ok(
                "transaction",
                json!({"actions": [
                    {"type": "block-dirty-bitmap-add", "data": {"node": "d", "name": cp}},
                    {"type": "blockdev-backup", "data": {"job-id": job, "device": "d",
                        "target": target, "sync": "incremental", "bitmap": BITMAP,
                        "speed": speed, "auto-dismiss": false}},
                ]}),
            )
            .await;
            self.stats.transactions += 1;
            self.ok("block-dirty-bitmap-remove", json!({"node": "d", "name": cp})).await;
        } else {
            self.ok(
                "blockdev-backup",
                json!({"job-id": job, "device": "d", "target": target, "sync": "incremental",
                       "bitmap": BITMAP, "speed": speed, "auto-dismiss": false}),
            )
            .await;
        }
        let hi = self.world.issued();
        let side_job = format!("s{}", self.next);
        let (side_lo, side_hi) = match &side_target {
            Some(t) => {
                let lo = self.world.acked();
                self.ok(
                    "blockdev-backup",
                    json!({"job-id": side_job, "device": "d", "target": t, "sync": "full",
                           "auto-dismiss": false}),
                )
                .await;
                (lo, self.world.issued())
            }
            None => (Vec::new(), Vec::new()),
        };
        // A resize while a job runs is refused and changes nothing.
        if self.rng.up_to(4) == 0 {
            let len = self.world.node.len();
            let r = self
                .qmp
                .execute(command("block_resize", json!({"node-name": "d", "size": len + MIB})))
                .await;
            assert!(r.is_err(), "a resize during a backup was accepted");
            assert_eq!(self.world.node.len(), len);
            self.stats.refused_resizes += 1;
        }
        // A cancelled full would leave the cleared bitmap: only incrementals are cancelled.
        let cancel = !full && self.rng.up_to(3) == 0;
        if cancel {
            tokio::time::sleep(Duration::from_millis(self.rng.up_to(20))).await;
            let _ = self.qmp.execute(command("block-job-cancel", json!({"device": job}))).await;
        }
        let succeeded = self.wait_end(&job).await;
        if succeeded {
            let tags = target_tags(&self.world.graph.find(&target).unwrap(), lo.len() as u64);
            if full {
                self.chain = vec![0; lo.len()];
            }
            self.chain.resize(lo.len(), 0);
            for (g, t) in tags.into_iter().enumerate() {
                if let Some(t) = t {
                    self.chain[g] = t;
                }
            }
            let what = format!("{} backup {job}", if full { "full" } else { "incremental" });
            Self::check_instant(&self.chain, &lo, &hi, &what);
            self.base = hi;
            self.have_full = true;
            if full {
                self.stats.full += 1;
            } else {
                self.stats.incremental += 1;
            }
            self.check_union(&self.base.clone(), &format!("after {what}"));
        } else {
            self.stats.cancelled += 1;
            if self.have_full {
                self.check_union(&self.base.clone(), &format!("after the failed {job}"));
            } else {
                // No chain yet: the next round starts one.
                self.have_full = false;
            }
        }
        if let Some(t) = &side_target {
            assert!(self.wait_end(&side_job).await, "side backup {side_job} failed");
            let tags = target_tags(&self.world.graph.find(t).unwrap(), side_lo.len() as u64);
            let tags: Vec<u64> = tags.into_iter().map(|t| t.unwrap_or(0)).collect();
            Self::check_instant(&tags, &side_lo, &side_hi, &format!("side backup {side_job}"));
            self.stats.side_full += 1;
            self.drop_target(t).await;
        }
        if let Some(id) = export {
            self.ok("block-export-del", json!({"id": id})).await;
        }
        self.drop_target(&target).await;
        // Between backups, sometimes grow the disk: the bitmaps grow with it.
        if self.rng.up_to(5) == 0 && self.world.node.len() < 96 * MIB {
            let len = self.world.node.len() + MIB;
            // Writers see the new granules only once the node has them.
            self.ok("block_resize", json!({"node-name": "d", "size": len})).await;
            let mut st = self.world.granules.lock().unwrap();
            st.issued.resize((len / GRANULE) as usize, 0);
            st.acked.resize((len / GRANULE) as usize, 0);
            self.stats.resizes += 1;
        }
    }
}

fn watchdog(world: Arc<World>, limit: Duration) {
    thread::spawn(move || {
        let mut last = (world.jobs_ended.load(SeqCst), Instant::now());
        while !world.stop.load(SeqCst) {
            thread::sleep(Duration::from_millis(500));
            let now = world.jobs_ended.load(SeqCst);
            if now != last.0 {
                last = (now, Instant::now());
            } else if last.1.elapsed() > limit {
                eprintln!("torture: no job ended for {limit:?}: deadlock; aborting");
                std::process::abort();
            }
        }
    });
}

fn setup(dir: &Path) -> Arc<World> {
    let path = dir.join("d.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", path.to_str().unwrap(), "64M"]).unwrap();
    let graph = Arc::new(BlockGraph::new());
    let node = graph
        .add_from_str(&format!(
            "driver=qcow2,node-name=d,file.driver=file,file.filename={}",
            path.display()
        ))
        .unwrap();
    let n = (node.len() / GRANULE) as usize;
    Arc::new(World {
        graph,
        node,
        dir: dir.to_path_buf(),
        granules: Mutex::new(Granules { issued: vec![0; n], acked: vec![0; n] }),
        stop: AtomicBool::new(false),
        jobs_ended: AtomicU64::new(0),
        writes: AtomicU64::new(0),
    })
}

#[test]
fn torture() {
    let seconds: u64 =
        std::env::var("TORTURE_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
    let dir = tempfile::tempdir().unwrap();
    let world = setup(dir.path());
    // As `blockdelta serve` runs: one event-loop thread, block I/O on the blocking pool.
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let exports = Arc::new(ExportManager::new(world.graph.clone()));
    let qmp = Arc::new(Qmp::new(
        world.graph.clone(),
        exports.clone(),
        Arc::new(tokio::sync::Notify::new()),
    ));
    let writers: Vec<_> = (0..WRITERS)
        .map(|id| {
            let world = world.clone();
            thread::spawn(move || writer(world, id))
        })
        .collect();
    watchdog(world.clone(), Duration::from_secs(60));
    let socket = dir.path().join("nbd.sock");
    let stats = runtime.block_on(async {
        let start = json!({"addr": {"type": "unix", "data": {"path": socket.to_str().unwrap()}}});
        qmp.execute(command("nbd-server-start", start)).await.unwrap();
        let mut driver = Driver {
            world: world.clone(),
            qmp: qmp.clone(),
            rng: SplitMix64(0x0702_707e),
            next: 0,
            chain: Vec::new(),
            base: Vec::new(),
            have_full: false,
            stats: Stats::default(),
        };
        let deadline = Instant::now() + Duration::from_secs(seconds);
        while Instant::now() < deadline {
            driver.round().await;
        }
        driver.stats
    });
    world.stop.store(true, SeqCst);
    for w in writers {
        w.join().expect("a writer panicked");
    }
    exports.shutdown();
    drop(qmp);
    drop(runtime);
    eprintln!("torture: {seconds} s, {} writes, {stats:?}", world.writes.load(SeqCst));
    assert!(stats.full >= 1 && stats.incremental >= 1, "too few backups: {stats:?}");
    assert!(stats.union_checks >= 2, "{stats:?}");
}
