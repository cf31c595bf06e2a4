//! Stress (blockdelta only): guest writes through NBD from several threads while
//! drive-backup incrementals are started, paused, resumed, re-rated, cancelled (running
//! or pending) and finalized over and over. The promise checked: no write is ever
//! missed. After every job the bitmap equals a model of the writes since the last
//! successful backup (its SHA-256 against `x-debug-block-dirty-bitmap-sha256`), and
//! every successful backup, read with its chain, is the source at its point in time.
//! A watchdog fails the test instead of hanging if anything deadlocks.

use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use hbitmap::HBitmap;
use testkit::SplitMix64;
use testkit::qsd::StorageDaemon;
use testkit::serde_json::{Value, json};
use testkit::{qemu_img, qemu_io};

const SIZE: u64 = 16 << 20;
const GRANULARITY: u32 = 16;
const ITERATIONS: usize = 8;

struct Harness {
    daemon: StorageDaemon,
    socket: String,
}

impl Harness {
    fn qmp(&mut self, command: &str, args: Value) -> Value {
        self.daemon.execute_ok(command, args)
    }
    fn status(&mut self, job: &str) -> Option<String> {
        let jobs = self.qmp("query-jobs", json!({}));
        jobs.as_array()
            .unwrap()
            .iter()
            .find(|j| j["id"] == job)
            .map(|j| j["status"].as_str().unwrap().to_string())
    }
    fn wait_status(&mut self, job: &str, want: &[&str]) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = self.status(job);
            if s.as_deref().is_none_or(|s| want.contains(&s)) {
                return s;
            }
            assert!(Instant::now() < deadline, "{job} stuck in {s:?}");
            thread::sleep(Duration::from_millis(10));
        }
    }
    fn sha(&mut self) -> String {
        let r =
            self.qmp("x-debug-block-dirty-bitmap-sha256", json!({"node": "disk0", "name": "bm0"}));
        r["sha256"].as_str().unwrap().to_string()
    }
    fn uri(&self) -> String {
        format!("nbd+unix:///disk0?socket={}", self.socket)
    }
}

/// Writes from `threads` threads at once (each one qemu-io with a few writes); returns
/// the ranges written, all complete when this returns.
fn guest_writes(uri: &str, seed: u64, threads: u64) -> Vec<(u64, u64)> {
    let done = Arc::new(Mutex::new(Vec::new()));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (uri, done) = (uri.to_string(), done.clone());
            thread::spawn(move || {
                let mut rng = SplitMix64(seed * 31 + t);
                let mut args = vec!["-f".to_string(), "raw".into()];
                let mut ranges = Vec::new();
                for _ in 0..4 {
                    let len = (1 + rng.up_to(16)) * 4096;
                    let off = rng.up_to((SIZE - len) / 512) * 512;
                    let pattern = 1 + rng.up_to(250);
                    args.push("-c".into());
                    args.push(format!("write -P {pattern} {off} {len}"));
                    ranges.push((off, len));
                }
                args.push(uri);
                qemu_io(&args).unwrap();
                done.lock().unwrap().extend(ranges);
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    Arc::try_unwrap(done).unwrap().into_inner().unwrap()
}

fn model_sha(model: &[(u64, u64)]) -> String {
    let mut bits = HBitmap::new(SIZE, GRANULARITY).unwrap();
    for &(off, len) in model {
        bits.set(off, len).unwrap();
    }
    bits.sha256_hex()
}

fn body(dir: &Path) {
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    qemu_img(["create", "-q", "-f", "qcow2", &p("disk.qcow2"), "16M"]).unwrap();
    qemu_io(["-f", "qcow2", "-c", "write -P 1 0 1M", &p("disk.qcow2")]).unwrap();
    let builder = StorageDaemon::builder(env!("CARGO_BIN_EXE_blockdelta")).arg("serve");
    let socket = builder.path("nbd.sock").to_str().unwrap().to_string();
    let daemon = builder
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={socket}"))
        .arg("--blockdev")
        .arg(format!("driver=file,node-name=file0,filename={}", p("disk.qcow2")))
        .arg("--blockdev")
        .arg("driver=qcow2,node-name=disk0,file=file0")
        .arg("--export")
        .arg("type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on")
        .start()
        .unwrap();
    let mut h = Harness { daemon, socket };

    // The anchor: a new bitmap and a full backup at one point in time.
    h.qmp(
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "bm0"}},
            {"type": "drive-backup", "data": {"job-id": "full", "device": "disk0",
             "target": p("full.qcow2"), "sync": "full", "auto-finalize": false}},
        ]}),
    );
    qemu_img(["convert", "-f", "raw", "-O", "raw", &h.uri(), &p("pit-full.raw")]).unwrap();
    let mut model: Vec<(u64, u64)> = guest_writes(&h.uri(), 1000, 3);
    h.wait_status("full", &["pending"]);
    h.qmp("job-finalize", json!({"id": "full"}));
    h.wait_status("full", &[]);
    // Only writes after the point in time are in the bitmap now.
    assert_eq!(h.sha(), model_sha(&model), "after the full backup");

    let mut chain = vec![("full.qcow2".to_string(), "pit-full.raw".to_string())];
    for i in 0..ITERATIONS {
        let image = format!("inc{i}.qcow2");
        let backing = p(&chain.last().unwrap().0);
        qemu_img(["create", "-q", "-f", "qcow2", "-b", &backing, "-F", "qcow2", &p(&image)])
            .unwrap();
        let job = format!("inc{i}");
        h.qmp(
            "drive-backup",
            json!({"job-id": job, "device": "disk0", "target": p(&image), "mode": "existing",
                   "format": "qcow2", "sync": "incremental", "bitmap": "bm0",
                   "speed": 256 << 10, "auto-finalize": false}),
        );
        let pit = format!("pit{i}.raw");
        qemu_img(["convert", "-f", "raw", "-O", "raw", &h.uri(), &p(&pit)]).unwrap();
        // Writes during the job, while it is poked: pause, re-rate, resume.
        let uri = h.uri();
        let writer = thread::spawn(move || guest_writes(&uri, i as u64, 3));
        if h.status(&job).as_deref() == Some("running") {
            let _ = h.daemon.qmp().execute("job-pause", json!({"id": job}));
            let _ = h
                .daemon
                .qmp()
                .execute("block-job-set-speed", json!({"device": job, "speed": 1 << 20}));
            let _ = h.daemon.qmp().execute("job-resume", json!({"id": job}));
        }
        let during = writer.join().unwrap();
        let outcome = i % 4;
        match outcome {
            // Cancel while (probably) still running.
            0 => {
                h.qmp("job-cancel", json!({"id": job}));
            }
            // Cancel in pending (the data is all copied: still a failure).
            1 => {
                let _ = h
                    .daemon
                    .qmp()
                    .execute("block-job-set-speed", json!({"device": job, "speed": 0}));
                h.wait_status(&job, &["pending"]);
                h.qmp("job-cancel", json!({"id": job}));
            }
            // Success.
            _ => {
                let _ = h
                    .daemon
                    .qmp()
                    .execute("block-job-set-speed", json!({"device": job, "speed": 0}));
                h.wait_status(&job, &["pending"]);
                h.qmp("job-finalize", json!({"id": job}));
            }
        }
        h.wait_status(&job, &[]);
        if outcome < 2 {
            // Reclaimed: every write since the last successful backup is still there.
            model.extend(during);
            assert_eq!(h.sha(), model_sha(&model), "iteration {i}: after cancel");
            std::fs::remove_file(p(&image)).unwrap();
        } else {
            // Abdicated: only the writes after the point in time.
            model = during;
            assert_eq!(h.sha(), model_sha(&model), "iteration {i}: after success");
            chain.push((image, pit));
        }
    }
    // A last incremental, with no writes after it: the chain restores the source.
    let last = format!("inc{ITERATIONS}.qcow2");
    let backing = p(&chain.last().unwrap().0);
    qemu_img(["create", "-q", "-f", "qcow2", "-b", &backing, "-F", "qcow2", &p(&last)]).unwrap();
    h.qmp(
        "drive-backup",
        json!({"job-id": "last", "device": "disk0", "target": p(&last), "mode": "existing",
               "format": "qcow2", "sync": "incremental", "bitmap": "bm0"}),
    );
    h.wait_status("last", &[]);
    assert_eq!(h.sha(), model_sha(&[]), "after the last incremental");
    assert!(h.daemon.quit().unwrap().success());
    for (image, pit) in &chain {
        qemu_img(["compare", "-f", "qcow2", "-F", "raw", &p(image), &p(pit)])
            .unwrap_or_else(|e| panic!("{image} is not its point in time: {e}"));
    }
    qemu_img(["compare", "-f", "qcow2", "-F", "qcow2", &p(&last), &p("disk.qcow2")])
        .unwrap_or_else(|e| panic!("the restored chain is not the source: {e}"));
}

#[test]
fn no_write_is_missed_under_job_churn() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().to_path_buf();
    let (tx, rx) = mpsc::channel();
    let worker = thread::spawn(move || {
        let result = std::panic::catch_unwind(|| body(&dir));
        let _ = tx.send(());
        if let Err(e) = result {
            std::panic::resume_unwind(e);
        }
    });
    // The watchdog: a deadlock fails the test instead of hanging it.
    match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(()) => worker.join().unwrap(),
        Err(_) => panic!("backup stress did not finish within 120 s: deadlock?"),
    }
}
