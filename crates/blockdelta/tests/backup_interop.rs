//! Backups driven over QMP, `blockdelta serve` against `qemu-storage-daemon`: the same
//! commands on copies of the same images give the same replies, the same events (in
//! order, timestamps aside), the same bitmaps (records and SHA-256s), and backups with
//! the same contents, which are the source as it was when each job was created.

use std::path::{Path, PathBuf};
use std::time::Duration;

use testkit::qsd::{DaemonBuilder, StorageDaemon};
use testkit::serde_json::{Value, json};
use testkit::{qemu_img, qemu_io};

const SIZE: &str = "64M";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Qemu,
    Blockdelta,
}

struct Side {
    kind: Kind,
    daemon: StorageDaemon,
    dir: PathBuf,
    socket: PathBuf,
}

impl Side {
    fn uri(&self) -> String {
        format!("nbd+unix:///disk0?socket={}", self.socket.display())
    }
    fn image(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    /// The reply to a command, error or not.
    fn reply(&mut self, command: &str, arguments: Value) -> Value {
        match self.daemon.qmp().execute(command, arguments) {
            Ok(v) => json!({"return": v}),
            Err(e) => json!({"error": {"class": e.class, "desc": e.desc}}),
        }
    }
    /// Events so far, without timestamps.
    fn events(&mut self) -> Vec<Value> {
        self.daemon
            .qmp()
            .take_events()
            .into_iter()
            .map(|mut e| {
                e.as_object_mut().unwrap().remove("timestamp");
                e
            })
            .collect()
    }
    /// Waits until job `id` has left `query-jobs` (dismissed: its `null` event was
    /// sent), then sends one more command: its reply comes after that event. The job
    /// thread and the monitor are different threads in blockdelta, so the event of a
    /// job that ends while a command runs can follow that command's reply.
    fn gone(&mut self, id: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let jobs = self.daemon.execute_ok("query-jobs", json!({}));
            if !jobs.as_array().unwrap().iter().any(|j| j["id"] == id) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "job {id} never went: {jobs}");
            std::thread::sleep(Duration::from_millis(5));
        }
        self.daemon.execute_ok("query-version", json!({}));
    }
    fn wait_event(&mut self, name: &str) -> Value {
        self.daemon.qmp().wait_event(name, Duration::from_secs(30))
    }
    /// disk0's bitmaps (records in order) with the SHA-256 of the named ones.
    fn bitmaps(&mut self) -> Value {
        let nodes = self.daemon.execute_ok("query-named-block-nodes", json!({}));
        let disk = nodes.as_array().unwrap().iter().find(|n| n["node-name"] == "disk0").unwrap();
        let mut list = disk["dirty-bitmaps"].clone();
        for b in list.as_array_mut().into_iter().flatten() {
            if let Some(name) = b["name"].as_str().map(str::to_string) {
                let sha = self.daemon.execute_ok(
                    "x-debug-block-dirty-bitmap-sha256",
                    json!({"node": "disk0", "name": name}),
                );
                b["sha256"] = sha["sha256"].clone();
            }
        }
        list
    }
    fn write(&self, commands: &[&str]) {
        let mut args = vec!["-f".to_string(), "raw".into()];
        for c in commands {
            args.push("-c".into());
            args.push(c.to_string());
        }
        args.push(self.uri());
        qemu_io(&args).unwrap();
    }
}

/// Both daemons on copies of: disk0 (qcow2 with persistent bitmap bm0 holding two dirty
/// clusters), targets t0..t3 (fresh qcow2), disk0 exported writable over NBD.
fn both(root: &Path) -> [Side; 2] {
    [Kind::Qemu, Kind::Blockdelta].map(|kind| {
        let dir = root.join(format!("{kind:?}"));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("disk.qcow2");
        let p = disk.to_str().unwrap();
        qemu_img(["create", "-q", "-f", "qcow2", p, SIZE]).unwrap();
        qemu_img(["bitmap", "--add", p, "bm0"]).unwrap();
        qemu_io(["-f", "qcow2", "-c", "write -P 1 0 64k", "-c", "write -P 2 1M 64k", p]).unwrap();
        let builder: DaemonBuilder = match kind {
            Kind::Qemu => StorageDaemon::qemu(),
            Kind::Blockdelta => {
                StorageDaemon::builder(env!("CARGO_BIN_EXE_blockdelta")).arg("serve")
            }
        };
        let socket = builder.path("nbd.sock");
        let mut b = builder
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=file0,filename={p}"))
            .arg("--blockdev")
            .arg("driver=qcow2,node-name=disk0,file=file0");
        for t in 0..4 {
            let target = dir.join(format!("t{t}.qcow2"));
            qemu_img(["create", "-q", "-f", "qcow2", target.to_str().unwrap(), SIZE]).unwrap();
            b = b
                .arg("--blockdev")
                .arg(format!("driver=file,node-name=tf{t},filename={}", target.display()))
                .arg("--blockdev")
                .arg(format!("driver=qcow2,node-name=t{t},file=tf{t}"));
        }
        let daemon = b
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", socket.display()))
            .arg("--export")
            .arg("type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on")
            .start()
            .unwrap_or_else(|e| panic!("{kind:?}: {e:#}"));
        Side { kind, daemon, dir, socket }
    })
}

/// Runs `command` on both and requires equal replies; returns the reply.
fn same(sides: &mut [Side; 2], command: &str, arguments: Value) -> Value {
    let replies: Vec<Value> =
        sides.iter_mut().map(|s| s.reply(command, arguments.clone())).collect();
    assert_eq!(replies[0], replies[1], "{command} {arguments}");
    replies[0].clone()
}

fn same_events(sides: &mut [Side; 2], what: &str) -> Vec<Value> {
    let events: Vec<Vec<Value>> = sides.iter_mut().map(Side::events).collect();
    assert_eq!(events[0], events[1], "events {what}");
    events[0].clone()
}

fn same_bitmaps(sides: &mut [Side; 2], what: &str) -> Value {
    let b: Vec<Value> = sides.iter_mut().map(Side::bitmaps).collect();
    assert_eq!(b[0], b[1], "bitmaps {what}");
    b[0].clone()
}

/// A copy of the guest contents of a node's image, as raw, read by qemu-img.
fn raw_copy(image: &Path, out: &Path) {
    qemu_img([
        "convert",
        "-U",
        "-f",
        "qcow2",
        "-O",
        "raw",
        image.to_str().unwrap(),
        out.to_str().unwrap(),
    ])
    .unwrap();
}

/// iotest 124's basic chain and spec 10.3's manual finalize: a full backup anchored by
/// a transaction, writes, an incremental with auto-finalize off (the bitmap busy while
/// pending, finalize and dismiss refused or accepted as QEMU does), more writes and a
/// cancelled incremental that reclaims.
#[test]
fn full_then_incremental_backups_match_qemu() {
    let root = tempfile::tempdir().unwrap();
    let mut sides = both(root.path());
    same_events(&mut sides, "at start");

    // Anchor: a new bitmap and a full backup, atomically.
    same(
        &mut sides,
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-clear", "data": {"node": "disk0", "name": "bm0"}},
            {"type": "blockdev-backup", "data": {"job-id": "full0", "device": "disk0", "target": "t0", "sync": "full"}},
        ]}),
    );
    for s in &mut sides {
        s.wait_event("JOB_STATUS_CHANGE");
        while s
            .daemon
            .qmp()
            .try_wait_event("BLOCK_JOB_COMPLETED", Duration::from_secs(30))
            .unwrap()
            .is_none()
        {}
        s.gone("full0");
    }
    same_events(&mut sides, "full backup");
    same_bitmaps(&mut sides, "after the full backup");

    // Guest writes, then an incremental that waits for finalize.
    for s in &sides {
        s.write(&["write -P 3 2M 64k", "write -P 4 10M 128k", "write -P 5 63M 4k"]);
    }
    same_bitmaps(&mut sides, "after writes");
    for s in &mut sides {
        let point_in_time = s.image("pit.raw");
        let r = s.reply(
            "blockdev-backup",
            json!({"job-id": "inc1", "device": "disk0", "target": "t1", "sync": "incremental",
                   "bitmap": "bm0", "auto-finalize": false, "auto-dismiss": false}),
        );
        assert_eq!(r, json!({"return": {}}), "{:?}", s.kind);
        // The reference: the source now (the point in time), read through NBD.
        qemu_img(["convert", "-f", "raw", "-O", "raw", &s.uri(), point_in_time.to_str().unwrap()])
            .unwrap();
        s.wait_event("BLOCK_JOB_PENDING");
    }
    same_events(&mut sides, "incremental until pending");
    // Writes while the job is pending go to the successor.
    for s in &sides {
        s.write(&["write -P 6 20M 64k"]);
    }
    same_bitmaps(&mut sides, "pending");
    let jobs = same(&mut sides, "query-jobs", json!({}));
    assert_eq!(jobs["return"][0]["status"], "pending");
    same(&mut sides, "query-block-jobs", json!({}));
    for (command, args) in [
        ("block-dirty-bitmap-remove", json!({"node": "disk0", "name": "bm0"})),
        ("block-dirty-bitmap-clear", json!({"node": "disk0", "name": "bm0"})),
        ("block-dirty-bitmap-enable", json!({"node": "disk0", "name": "bm0"})),
        ("block-dirty-bitmap-disable", json!({"node": "disk0", "name": "bm0"})),
        ("block-dirty-bitmap-add", json!({"node": "disk0", "name": "bm0"})),
        ("block-dirty-bitmap-merge", json!({"node": "disk0", "target": "bm0", "bitmaps": ["bm0"]})),
        (
            "blockdev-backup",
            json!({"job-id": "inc2", "device": "disk0", "target": "t2", "sync": "incremental", "bitmap": "bm0"}),
        ),
        ("job-dismiss", json!({"id": "inc1"})),
        ("job-complete", json!({"id": "inc1"})),
        ("block-job-cancel", json!({"device": "nosuch"})),
        ("job-cancel", json!({"id": "nosuch"})),
    ] {
        let r = same(&mut sides, command, args);
        assert!(r.get("error").is_some(), "{command}: {r}");
    }
    same(&mut sides, "job-finalize", json!({"id": "inc1"}));
    same_events(&mut sides, "finalize");
    same(&mut sides, "job-dismiss", json!({"id": "inc1"}));
    same_events(&mut sides, "dismiss");
    let after = same_bitmaps(&mut sides, "after the incremental");
    assert!(
        after.as_array().unwrap().iter().any(|b| b["name"] == "bm0" && b["count"] == 65536),
        "{after}"
    );

    // A cancelled incremental reclaims: every bit stays.
    same(
        &mut sides,
        "blockdev-backup",
        json!({"job-id": "inc3", "device": "disk0", "target": "t3", "sync": "bitmap",
               "bitmap": "bm0", "bitmap-mode": "on-success", "auto-finalize": false}),
    );
    for s in &mut sides {
        s.wait_event("BLOCK_JOB_PENDING");
    }
    same_events(&mut sides, "third job pending");
    same(&mut sides, "job-cancel", json!({"id": "inc3"}));
    for s in &mut sides {
        s.wait_event("BLOCK_JOB_CANCELLED");
        s.gone("inc3");
    }
    same_events(&mut sides, "cancel");
    let reclaimed = same_bitmaps(&mut sides, "after cancel");
    assert!(
        reclaimed.as_array().unwrap().iter().any(|b| b["name"] == "bm0" && b["count"] == 65536),
        "{reclaimed}"
    );

    // The backups' images are equal between the two programs, and clean.
    let [q, b] = sides;
    let dirs = (q.dir.clone(), b.dir.clone());
    assert!(q.daemon.quit().unwrap().success());
    assert!(b.daemon.quit().unwrap().success());
    // (Read once the daemons are gone: a running daemon caches image metadata.)
    // The incremental holds the point-in-time data of what changed since the full.
    for (kind, dir) in [(Kind::Qemu, &dirs.0), (Kind::Blockdelta, &dirs.1)] {
        let t1 = dir.join("t1.raw");
        raw_copy(&dir.join("t1.qcow2"), &t1);
        let pit = std::fs::read(dir.join("pit.raw")).unwrap();
        let inc = std::fs::read(&t1).unwrap();
        for (off, len) in [(2 << 20, 64 << 10), (10 << 20, 128 << 10), (63 << 20, 4096)] {
            let r = off..off + len;
            assert!(inc[r.clone()] == pit[r], "{:?}: incremental at {off}", kind);
        }
        // The write made while pending is not in it.
        assert!(inc[20 << 20..(20 << 20) + 4096].iter().all(|&b| b == 0), "{:?}", kind);
    }

    for t in ["t0.qcow2", "t1.qcow2", "disk.qcow2"] {
        let (a, c) = (dirs.0.join(t), dirs.1.join(t));
        qemu_img([
            "compare",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            a.to_str().unwrap(),
            c.to_str().unwrap(),
        ])
        .unwrap();
        qemu_img(["check", c.to_str().unwrap()]).unwrap();
    }
}

/// A rate-limited full backup copies one cluster and then waits; set-speed shows in the
/// queries; a cancel ends it with the same offset in both programs, and the bitmap it
/// synchronizes (always) keeps what was not copied.
#[test]
fn rate_limited_backup_cancelled_matches_qemu() {
    let root = tempfile::tempdir().unwrap();
    let mut sides = both(root.path());
    for s in &sides {
        s.write(&["write -P 9 0 8M"]);
    }
    same(
        &mut sides,
        "blockdev-backup",
        json!({"job-id": "slow", "device": "disk0", "target": "t0", "sync": "full",
               "bitmap": "bm0", "bitmap-mode": "always", "speed": 4096}),
    );
    std::thread::sleep(Duration::from_millis(500));
    same(&mut sides, "block-job-set-speed", json!({"device": "slow", "speed": 2048}));
    same(&mut sides, "block-job-set-speed", json!({"device": "slow", "speed": -1}));
    let jobs = same(&mut sides, "query-block-jobs", json!({}));
    assert_eq!(jobs["return"][0]["speed"], 2048);
    assert_eq!(jobs["return"][0]["offset"], 65536, "{jobs}");
    same(&mut sides, "block-job-cancel", json!({"device": "slow"}));
    for s in &mut sides {
        s.wait_event("BLOCK_JOB_CANCELLED");
        s.gone("slow");
    }
    same_events(&mut sides, "rate-limited job");
    let bitmaps = same_bitmaps(&mut sides, "after the cancelled always-mode job");
    let bm0 = bitmaps.as_array().unwrap().iter().find(|b| b["name"] == "bm0").unwrap().clone();
    // Everything but the first cluster is still to copy.
    assert_eq!(bm0["count"], (64 << 20) - 65536, "{bm0}");
}

/// A drive-backup target is closed at finalize: with auto-dismiss off, the concluded
/// job no longer holds the target's lock, so other programs can open it (QEMU releases it
/// at finalize too).
#[test]
fn finished_drive_backup_releases_its_target() {
    let root = tempfile::tempdir().unwrap();
    let [_, mut b] = both(root.path());
    let target = b.image("drive.qcow2");
    let r = b.reply(
        "drive-backup",
        json!({"job-id": "d0", "device": "disk0", "target": target.to_str().unwrap(),
               "sync": "full", "format": "qcow2", "auto-dismiss": false}),
    );
    assert_eq!(r, json!({"return": {}}));
    b.wait_event("BLOCK_JOB_COMPLETED");
    let jobs = b.reply("query-jobs", json!({}));
    assert_eq!(jobs["return"][0]["status"], "concluded", "{jobs}");
    // Without -U: this fails while any process holds the image's write lock.
    qemu_img(["info", target.to_str().unwrap()]).unwrap();
    qemu_img(["check", target.to_str().unwrap()]).unwrap();
}

/// Spec 10.3's failure run as QEMU's own tests build it: the source is qcow2 over
/// blkdebug over the file, with a read error armed for the host sector of the second
/// dirty cluster; a bitmap-mode=always backup fails after copying the first, and the
/// bitmap keeps only the cluster not copied, in both programs.
#[test]
fn qcow2_over_blkdebug_read_error_matches_qemu() {
    let root = tempfile::tempdir().unwrap();
    let sides: Vec<(Kind, StorageDaemon, PathBuf)> = [Kind::Qemu, Kind::Blockdelta]
        .into_iter()
        .map(|kind| {
            let dir = root.path().join(format!("{kind:?}"));
            std::fs::create_dir_all(&dir).unwrap();
            let disk = dir.join("d3.qcow2");
            let p = disk.to_str().unwrap();
            qemu_img(["create", "-q", "-f", "qcow2", p, SIZE]).unwrap();
            qemu_img(["bitmap", "--add", p, "bm0"]).unwrap();
            qemu_io(["-f", "qcow2", "-c", "write -P 1 0 64k", "-c", "write -P 2 1M 64k", p])
                .unwrap();
            let target = dir.join("t.qcow2");
            qemu_img(["create", "-q", "-f", "qcow2", target.to_str().unwrap(), SIZE]).unwrap();
            let builder: DaemonBuilder = match kind {
                Kind::Qemu => StorageDaemon::qemu(),
                Kind::Blockdelta => {
                    StorageDaemon::builder(env!("CARGO_BIN_EXE_blockdelta")).arg("serve")
                }
            };
            let d = builder
                .arg("--blockdev")
                .arg(format!("driver=file,node-name=tfile,filename={}", target.display()))
                .arg("--blockdev")
                .arg("driver=qcow2,node-name=tgt0,file=tfile")
                .start()
                .unwrap();
            (kind, d, disk)
        })
        .collect();
    let mut replies = Vec::new();
    let mut events = Vec::new();
    let mut bitmaps = Vec::new();
    let mut completions = Vec::new();
    for (kind, mut d, disk) in sides {
        let add = json!({"node-name": "disk0", "driver": "qcow2",
            "file": {"driver": "blkdebug", "image": {"driver": "file", "filename": disk.to_str().unwrap()},
                     "inject-error": [{"event": "read_aio", "errno": 5, "sector": 1024,
                                       "once": true, "immediately": false}]}});
        d.execute_ok("blockdev-add", add);
        let r = d.qmp().execute(
            "blockdev-backup",
            json!({"job-id": "job0", "device": "disk0", "target": "tgt0", "sync": "bitmap",
                   "bitmap": "bm0", "bitmap-mode": "always", "x-perf": {"max-workers": 1}}),
        );
        replies.push(format!("{r:?}"));
        let mut done = d.qmp().wait_event("BLOCK_JOB_COMPLETED", Duration::from_secs(30));
        done.as_object_mut().unwrap().remove("timestamp");
        completions.push(done);
        d.execute_ok("query-version", json!({}));
        let evs: Vec<Value> = d
            .qmp()
            .take_events()
            .into_iter()
            .map(|mut e| {
                e.as_object_mut().unwrap().remove("timestamp");
                e
            })
            .collect();
        events.push(evs);
        let nodes = d.execute_ok("query-named-block-nodes", json!({}));
        let disk0 = nodes.as_array().unwrap().iter().find(|n| n["node-name"] == "disk0").unwrap();
        bitmaps.push(disk0["dirty-bitmaps"].clone());
        assert!(d.quit().unwrap().success(), "{kind:?}");
    }
    assert_eq!(replies[0], replies[1]);
    assert_eq!(events[0], events[1]);
    assert_eq!(bitmaps[0], bitmaps[1]);
    assert_eq!(completions[0], completions[1]);
    let completed = &completions[1];
    assert_eq!(completed["data"]["error"], "Input/output error", "{completed}");
    assert_eq!(bitmaps[1][0]["count"], 65536, "{}", bitmaps[1]);
}
