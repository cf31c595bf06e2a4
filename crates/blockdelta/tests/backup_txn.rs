//! `drive-backup` chains and backup transactions, `blockdelta serve` against
//! `qemu-storage-daemon`: the same commands (with `DIR` standing for each side's own
//! directory) give the same replies, events (timestamps removed), bitmaps (records and
//! SHA-256s) and backup contents.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use testkit::qsd::{DaemonBuilder, StorageDaemon};
use testkit::serde_json::{self, Value, json};
use testkit::{qemu_img, qemu_io};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Qemu,
    Blockdelta,
}

struct Side {
    daemon: StorageDaemon,
    dir: PathBuf,
    socket: PathBuf,
}

/// `DIR` in `value` replaced by `dir`.
fn with_dir(value: &Value, dir: &Path) -> Value {
    let text = value.to_string().replace("DIR", dir.to_str().unwrap());
    serde_json::from_str(&text).unwrap()
}

/// `dir` in `value` replaced by `DIR`.
fn without_dir(value: Value, dir: &Path) -> Value {
    let text = value.to_string().replace(dir.to_str().unwrap(), "DIR");
    serde_json::from_str(&text).unwrap()
}

impl Side {
    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }
    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_string()
    }
    fn reply(&mut self, command: &str, arguments: &Value) -> Value {
        let arguments = with_dir(arguments, &self.dir);
        let reply = match self.daemon.qmp().execute(command, arguments) {
            Ok(v) => json!({"return": v}),
            Err(e) => json!({"error": {"class": e.class, "desc": e.desc}}),
        };
        without_dir(reply, &self.dir)
    }
    fn events(&mut self) -> Vec<Value> {
        let events = self.daemon.qmp().take_events();
        events
            .into_iter()
            .map(|mut e| {
                e.as_object_mut().unwrap().remove("timestamp");
                without_dir(e, &self.dir)
            })
            .collect()
    }
    fn wait_event(&mut self, name: &str) -> Value {
        self.daemon.qmp().wait_event(name, Duration::from_secs(30))
    }
    /// Waits until no job is left (they all auto-dismiss) or every job is concluded.
    fn settle(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let jobs = self.daemon.execute_ok("query-jobs", json!({}));
            let done = jobs.as_array().unwrap().iter().all(|j| j["status"] == "concluded");
            if done {
                return;
            }
            assert!(Instant::now() < deadline, "jobs did not end: {jobs}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    /// The bitmaps of `node`, with the SHA-256 of the named ones.
    fn bitmaps(&mut self, node: &str) -> Value {
        let nodes = self.daemon.execute_ok("query-named-block-nodes", json!({}));
        let n = nodes.as_array().unwrap().iter().find(|n| n["node-name"] == node).unwrap();
        let mut list = n["dirty-bitmaps"].clone();
        for b in list.as_array_mut().into_iter().flatten() {
            if let Some(name) = b["name"].as_str().map(str::to_string) {
                let sha = self.daemon.execute_ok(
                    "x-debug-block-dirty-bitmap-sha256",
                    json!({"node": node, "name": name}),
                );
                b["sha256"] = sha["sha256"].clone();
            }
        }
        list
    }
    /// The nodes that are not the copy-before-write filter (blockdelta has none) or a
    /// backing file opened from a header, with generated names, sizes on disk and the
    /// backing depth and chain left out.
    fn nodes(&mut self) -> Vec<Value> {
        let nodes = self.daemon.execute_ok("query-named-block-nodes", json!({}));
        let mut out: Vec<Value> = nodes
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["drv"] != "copy-before-write")
            // Backing files QEMU opens as read-only generated nodes; blockdelta opens
            // a chain from the image's header without making nodes of it.
            .filter(|n| !(n["ro"] == true && n["node-name"].as_str().unwrap().starts_with('#')))
            .map(|n| {
                let mut n = n.clone();
                let name = n["node-name"].as_str().unwrap().to_string();
                if name.starts_with('#') {
                    n["node-name"] = json!("#blockN");
                }
                let o = n.as_object_mut().unwrap();
                o.remove("backing_file_depth");
                o.remove("dirty-bitmaps");
                let image = o["image"].as_object_mut().unwrap();
                image.remove("actual-size");
                // The bitmap directory on disk while the daemons run: blockdelta stores a
                // new crash-safe bitmap at once (in use), QEMU at close.
                if let Some(data) = image
                    .get_mut("format-specific")
                    .and_then(|f| f.get_mut("data"))
                    .and_then(Value::as_object_mut)
                {
                    data.remove("bitmaps");
                }
                // A host file's length depends on each program's cluster allocation.
                if image["format"] == "file" {
                    image.remove("virtual-size");
                }
                image.remove("backing-image");
                without_dir(n, &self.dir)
            })
            .collect();
        out.sort_by_key(|n| n.to_string());
        out
    }
    fn write(&self, export: &str, commands: &[&str]) {
        let mut args = vec!["-f".to_string(), "raw".into()];
        for c in commands {
            args.push("-c".into());
            args.push(c.to_string());
        }
        args.push(self.uri(export));
        qemu_io(&args).unwrap();
    }
    /// The guest contents of `export` now, as a raw file `name`.
    fn snapshot(&self, export: &str, name: &str) {
        qemu_img(["convert", "-f", "raw", "-O", "raw", &self.uri(export), &self.path(name)])
            .unwrap();
    }
}

fn start(root: &Path, kind: Kind, prepare: &dyn Fn(&Path) -> Vec<String>) -> Side {
    let dir = root.join(format!("{kind:?}"));
    std::fs::create_dir_all(&dir).unwrap();
    let args = prepare(&dir);
    let builder: DaemonBuilder = match kind {
        Kind::Qemu => StorageDaemon::qemu(),
        Kind::Blockdelta => StorageDaemon::builder(env!("CARGO_BIN_EXE_blockdelta")).arg("serve"),
    };
    let socket = builder.path("nbd.sock");
    let daemon = builder
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", socket.display()))
        .args(args)
        .start()
        .unwrap_or_else(|e| panic!("{kind:?}: {e:#}"));
    Side { daemon, dir, socket }
}

fn both(root: &Path, prepare: &dyn Fn(&Path) -> Vec<String>) -> [Side; 2] {
    [Kind::Qemu, Kind::Blockdelta].map(|kind| start(root, kind, prepare))
}

/// Equal lists, or a panic naming the first records that differ.
#[track_caller]
fn assert_same_list(a: &[Value], b: &[Value], what: &str) {
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x, y, "{what}: first difference");
    }
    assert_eq!(a.len(), b.len(), "{what}: {a:?} vs {b:?}");
}

/// The events of one job, without the pause/resume pairs after its start: QEMU's other
/// jobs drain the graph when they start or finish, which pauses every running job for
/// a moment; blockdelta drains only the nodes involved, so those pairs are an artifact
/// of QEMU's global drains, not a state the job is observed in.
fn job_events(events: &[Value], job: &str) -> Vec<Value> {
    let of = |e: &Value| {
        e["data"]["id"].as_str().or_else(|| e["data"]["device"].as_str()).unwrap_or("") == job
    };
    let mine: Vec<Value> = events.iter().filter(|e| of(e)).cloned().collect();
    let status = |e: &Value| e["data"]["status"].as_str().unwrap_or("").to_string();
    let mut out: Vec<Value> = Vec::new();
    let mut i = 0;
    while i < mine.len() {
        // created, running, paused, running is the start (the transaction's drain).
        let started = out.len() >= 4;
        if started
            && status(&mine[i]) == "paused"
            && mine.get(i + 1).is_some_and(|n| status(n) == "running")
        {
            i += 2;
            continue;
        }
        out.push(mine[i].clone());
        i += 1;
    }
    out
}

/// Per job, equal events (see [`job_events`]); globally, the same order from the first
/// `aborting` on (the transaction-wide abort is one deterministic sequence), while
/// before it independent jobs may finish in any order.
#[track_caller]
fn same_job_events(sides: &mut [Side; 2], jobs: &[&str], what: &str) -> Vec<Value> {
    let events: Vec<Vec<Value>> = sides.iter_mut().map(Side::events).collect();
    for job in jobs {
        let (a, b) = (job_events(&events[0], job), job_events(&events[1], job));
        assert_same_list(&a, &b, &format!("{what}: events of {job}"));
    }
    let abort_phase = |ev: &[Value]| -> Vec<Value> {
        let start = ev.iter().position(|e| e["data"]["status"] == "aborting").unwrap_or(ev.len());
        ev[start..]
            .iter()
            .filter(|e| e["data"]["status"] != "paused" && e["data"]["status"] != "running")
            .cloned()
            .collect()
    };
    assert_same_list(&abort_phase(&events[0]), &abort_phase(&events[1]), what);
    events[0].clone()
}

#[track_caller]
fn same(sides: &mut [Side; 2], command: &str, arguments: Value) -> Value {
    let replies: Vec<Value> = sides.iter_mut().map(|s| s.reply(command, &arguments)).collect();
    assert_eq!(replies[0], replies[1], "{command} {arguments}");
    replies[0].clone()
}

#[track_caller]
fn same_events(sides: &mut [Side; 2], what: &str) -> Vec<Value> {
    let events: Vec<Vec<Value>> = sides.iter_mut().map(Side::events).collect();
    assert_eq!(events[0], events[1], "events {what}");
    events[0].clone()
}

#[track_caller]
fn same_bitmaps(sides: &mut [Side; 2], node: &str, what: &str) -> Value {
    let b: Vec<Value> = sides.iter_mut().map(|s| s.bitmaps(node)).collect();
    assert_eq!(b[0], b[1], "bitmaps of {node} {what}");
    b[0].clone()
}

fn settle(sides: &mut [Side; 2]) {
    for s in sides.iter_mut() {
        s.settle();
    }
}

fn compare(a: &str, fa: &str, b: &str, fb: &str) {
    qemu_img(["compare", "-f", fa, "-F", fb, a, b]).unwrap_or_else(|e| panic!("{a} vs {b}: {e}"));
}

/// disk0: a 16M qcow2 over base.qcow2 (data in both layers), exported writable.
fn chain_setup(dir: &Path) -> Vec<String> {
    let base = dir.join("base.qcow2");
    let disk = dir.join("disk.qcow2");
    let (b, d) = (base.to_str().unwrap(), disk.to_str().unwrap());
    qemu_img(["create", "-q", "-f", "qcow2", b, "16M"]).unwrap();
    qemu_io(["-f", "qcow2", "-c", "write -P 7 4M 256k", b]).unwrap();
    qemu_img(["create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", d]).unwrap();
    qemu_io(["-f", "qcow2", "-c", "write -P 1 0 64k", d]).unwrap();
    vec![
        "--blockdev".into(),
        format!("driver=file,node-name=file0,filename={d}"),
        "--blockdev".into(),
        "driver=qcow2,node-name=disk0,file=file0".into(),
        "--export".into(),
        "type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on".into(),
    ]
}

/// drive-backup's refusals, in QEMU's order and words (some come after the image was
/// created, which stays, as in QEMU).
#[test]
fn drive_backup_errors_match_qemu() {
    let root = tempfile::tempdir().unwrap();
    let mut sides = both(root.path(), &chain_setup);
    for s in &sides {
        qemu_img(["create", "-q", "-f", "qcow2", &s.path("q8.qcow2"), "8M"]).unwrap();
        qemu_img(["create", "-q", "-f", "raw", &s.path("r16.raw"), "16M"]).unwrap();
        std::fs::write(s.path("junk.txt"), "hello\n").unwrap();
    }
    let cases = [
        json!({"job-id": "j", "device": "disk0", "target": "DIR/nodir/t.qcow2", "sync": "full"}),
        json!({"job-id": "j", "device": "disk0", "target": "DIR/t.qcow2", "sync": "full", "mode": "existing"}),
        json!({"job-id": "j", "device": "disk0", "target": "DIR/t.qcow2", "sync": "full", "format": "nosuch"}),
        json!({"job-id": "j", "device": "disk0", "target": "DIR/t.qcow2", "sync": "full", "format": "nosuch", "mode": "existing"}),
        json!({"job-id": "j", "device": "disk0", "target": "DIR/t.qcow2", "sync": "full", "format": "blkdebug"}),
        json!({"job-id": "j", "device": "disk0", "target": "DIR/t2.qcow2", "sync": "incremental", "bitmap": "nob"}),
        json!({"device": "disk0", "target": "DIR/t3.qcow2", "sync": "full"}),
        json!({"job-id": "j", "device": "nosuch", "target": "DIR/t4.qcow2", "sync": "full"}),
        json!({"job-id": "j", "device": "disk0", "target": "DIR/disk.qcow2", "sync": "full"}),
        json!({"job-id": "j", "device": "disk0", "target": "DIR/t5.qcow2", "sync": "full", "mode": "bogus"}),
        json!({"job-id": "j", "device": "disk0", "target": "DIR/t6.qcow2"}),
        json!({"job-id": "j", "device": "disk0", "target": "DIR/t7.qcow2", "sync": "full", "speed": -1}),
        json!({"job-id": "j", "device": "disk0", "target": "", "sync": "full"}),
        json!({"job-id": "j", "device": "disk0", "target": "DIR/q8.qcow2", "sync": "full", "mode": "existing"}),
        json!({"job-id": "j", "device": "disk0", "target": "DIR/r16.raw", "sync": "full", "mode": "existing", "format": "qcow2"}),
        json!({"job-id": "j", "device": "disk0", "target": "DIR/junk.txt", "sync": "full", "mode": "existing"}),
        json!({"job-id": "j", "device": "disk0", "target": "DIR/t8.qcow2", "sync": "none", "bitmap": "x", "bitmap-mode": "always"}),
    ];
    for case in cases {
        let r = same(&mut sides, "drive-backup", case.clone());
        assert!(r.get("error").is_some(), "{case}: {r}");
        // In a transaction, the same error; nothing else happens.
        let txn = json!({"actions": [{"type": "drive-backup", "data": case}]});
        same(&mut sides, "transaction", txn);
    }
    same_events(&mut sides, "refusals");
    let nodes: Vec<Vec<Value>> = sides.iter_mut().map(Side::nodes).collect();
    assert_eq!(nodes[0], nodes[1]);
    // The images created before the refusal exist on both sides, and only those.
    let listing = |dir: &Path| {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with("qcow2") || n.ends_with("raw"))
            .collect();
        names.sort();
        names
    };
    assert_eq!(listing(&sides[0].dir), listing(&sides[1].dir));
    assert!(listing(&sides[1].dir).contains(&"t2.qcow2".to_string()));
    let [q, b] = sides;
    let (qd, bd) = (q.path("disk.qcow2"), b.path("disk.qcow2"));
    assert!(q.daemon.quit().unwrap().success());
    assert!(b.daemon.quit().unwrap().success());
    // The source was not touched by the refused attempt to create over it.
    compare(&qd, "qcow2", &bd, "qcow2");
}

/// A chain as libvirt builds it with drive-backup: a full backup anchored with a new
/// bitmap, then incrementals into existing qcow2 images whose backing file is the
/// previous backup (what the job does not write reads through). Each backup image,
/// read with its chain, is the source at its point in time. Also sync=top (a new image
/// over the source's backing file; only the top layer is copied and counted) and
/// sync=none (the source is the target's backing node), and the target node's record
/// while a job runs and its removal at finalize.
#[test]
fn drive_backup_chain_matches_qemu() {
    let root = tempfile::tempdir().unwrap();
    let mut sides = both(root.path(), &chain_setup);
    let before = sides.each_nodes();

    same(
        &mut sides,
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "bm0", "persistent": true}},
            {"type": "drive-backup", "data": {"job-id": "full", "device": "disk0", "target": "DIR/full.qcow2", "sync": "full"}},
        ]}),
    );
    for s in &sides {
        s.snapshot("disk0", "pit0.raw");
    }
    settle(&mut sides);
    same_events(&mut sides, "full");
    same_bitmaps(&mut sides, "disk0", "after the full backup");

    let mut previous = "full.qcow2";
    for (i, writes) in [
        ["write -P 2 1M 64k", "write -P 3 4M 64k", "write -P 4 15M 4k"],
        ["write -P 5 1M 4k", "write -P 6 8M 192k", "write -z 4M 128k"],
    ]
    .iter()
    .enumerate()
    {
        let (image, pit) = (format!("inc{i}.qcow2"), format!("pit{}.raw", i + 1));
        for s in &sides {
            s.write("disk0", writes);
            let backing = s.path(previous);
            qemu_img([
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                &backing,
                "-F",
                "qcow2",
                &s.path(&image),
            ])
            .unwrap();
        }
        same_bitmaps(&mut sides, "disk0", "after writes");
        same(
            &mut sides,
            "drive-backup",
            json!({"job-id": "inc", "device": "disk0", "target": format!("DIR/{image}"),
                   "sync": "incremental", "bitmap": "bm0", "mode": "existing",
                   "format": "qcow2", "auto-finalize": false}),
        );
        for s in &mut sides {
            s.snapshot("disk0", &pit);
            s.wait_event("BLOCK_JOB_PENDING");
        }
        // The target is a node with a generated name, discard=unmap, detect-zeroes=unmap.
        let nodes: Vec<Vec<Value>> = sides.iter_mut().map(Side::nodes).collect();
        assert_same_list(&nodes[0], &nodes[1], "nodes while pending");
        assert!(
            nodes[0].iter().any(|n| n["node-name"] == "#blockN"
                && n["detect_zeroes"] == "unmap"
                && n["file"] == format!("DIR/{image}")),
            "{nodes:?}"
        );
        // A write while pending goes to the successor, not into this backup.
        for s in &sides {
            s.write("disk0", &["write -P 9 12M 64k"]);
        }
        same_bitmaps(&mut sides, "disk0", "pending");
        same(&mut sides, "job-finalize", json!({"id": "inc"}));
        settle(&mut sides);
        same_events(&mut sides, "incremental");
        same_bitmaps(&mut sides, "disk0", "after the incremental");
        assert_eq!(sides.each_nodes(), before, "the target node is gone after finalize");
        previous = if i == 0 { "inc0.qcow2" } else { "inc1.qcow2" };
    }

    // sync=top: a new image over the source's backing file; only the top is copied.
    same(
        &mut sides,
        "drive-backup",
        json!({"job-id": "top", "device": "disk0", "target": "DIR/top.qcow2", "sync": "top"}),
    );
    for s in &sides {
        s.snapshot("disk0", "pit-top.raw");
    }
    settle(&mut sides);
    let events = same_events(&mut sides, "sync=top");
    let completed = events.iter().find(|e| e["event"] == "BLOCK_JOB_COMPLETED").unwrap();
    assert!(completed["data"]["len"].as_u64().unwrap() < 16 << 20, "{completed}");

    // sync=none: the source is the target's backing node until the job is cancelled.
    same(
        &mut sides,
        "drive-backup",
        json!({"job-id": "fleece", "device": "disk0", "target": "DIR/fleece.qcow2", "sync": "none"}),
    );
    let nodes: Vec<Vec<Value>> = sides.iter_mut().map(Side::nodes).collect();
    assert_same_list(&nodes[0], &nodes[1], "nodes while fleecing");
    same(&mut sides, "job-cancel", json!({"id": "fleece"}));
    settle(&mut sides);
    same_events(&mut sides, "sync=none");
    assert_eq!(sides.each_nodes(), before);

    let [q, b] = sides;
    let dirs = [q.dir.clone(), b.dir.clone()];
    assert!(q.daemon.quit().unwrap().success());
    assert!(b.daemon.quit().unwrap().success());
    for dir in &dirs {
        let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
        compare(&p("full.qcow2"), "qcow2", &p("pit0.raw"), "raw");
        compare(&p("inc0.qcow2"), "qcow2", &p("pit1.raw"), "raw");
        compare(&p("inc1.qcow2"), "qcow2", &p("pit2.raw"), "raw");
        compare(&p("top.qcow2"), "qcow2", &p("pit-top.raw"), "raw");
        let info = qemu_img(["info", &p("top.qcow2")]).unwrap();
        assert!(info.contains(&format!("backing file: {}", p("base.qcow2"))), "{info}");
        let info = qemu_img(["info", &p("fleece.qcow2")]).unwrap();
        assert!(info.contains(&format!("backing file: {}", p("disk.qcow2"))), "{info}");
    }
    // blockdelta's images are sound and hold what QEMU's hold.
    for image in ["full.qcow2", "inc0.qcow2", "inc1.qcow2", "top.qcow2", "fleece.qcow2"] {
        let (a, c) = (dirs[0].join(image), dirs[1].join(image));
        qemu_img(["check", c.to_str().unwrap()]).unwrap();
        if image != "fleece.qcow2" {
            compare(a.to_str().unwrap(), "qcow2", c.to_str().unwrap(), "qcow2");
        }
    }
}

trait EachNodes {
    fn each_nodes(&mut self) -> Vec<Value>;
}

impl EachNodes for [Side; 2] {
    /// The node records, equal on both sides.
    fn each_nodes(&mut self) -> Vec<Value> {
        let nodes: Vec<Vec<Value>> = self.iter_mut().map(Side::nodes).collect();
        assert_same_list(&nodes[0], &nodes[1], "nodes");
        nodes[0].clone()
    }
}

/// Three sources (d0, d1 qcow2; d2 raw over blkdebug failing a read at `fail_at`),
/// three targets, each source exported; bitmap `b` on each with the same writes.
fn group_setup(dir: &Path, fail_at: u64) -> Vec<String> {
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    let mut args = Vec::new();
    for i in 0..2 {
        qemu_img(["create", "-q", "-f", "qcow2", &p(&format!("d{i}.qcow2")), "16M"]).unwrap();
        args.push("--blockdev".to_string());
        args.push(format!("driver=file,node-name=f{i},filename={}", p(&format!("d{i}.qcow2"))));
        args.push("--blockdev".into());
        args.push(format!("driver=qcow2,node-name=d{i},file=f{i}"));
    }
    qemu_img(["create", "-q", "-f", "raw", &p("d2.raw"), "16M"]).unwrap();
    args.push("--blockdev".into());
    args.push(
        json!({"driver": "raw", "node-name": "d2", "file": {"driver": "blkdebug",
               "node-name": "dbg2", "image": {"driver": "file", "filename": p("d2.raw")},
               "inject-error": [{"event": "read_aio", "errno": 5, "sector": fail_at / 512,
                                 "once": true, "immediately": false}]}})
        .to_string(),
    );
    for i in 0..3 {
        let t = p(&format!("t{i}.qcow2"));
        qemu_img(["create", "-q", "-f", "qcow2", &t, "16M"]).unwrap();
        args.push("--blockdev".into());
        args.push(format!("driver=file,node-name=tf{i},filename={t}"));
        args.push("--blockdev".into());
        args.push(format!("driver=qcow2,node-name=t{i},file=tf{i}"));
    }
    for i in 0..3 {
        args.push("--export".into());
        args.push(format!("type=nbd,id=e{i},node-name=d{i},name=d{i},writable=on"));
    }
    args
}

fn group_start(root: &Path, fail_at: u64) -> [Side; 2] {
    let mut sides = both(root, &|dir| group_setup(dir, fail_at));
    same(
        &mut sides,
        "transaction",
        json!({"actions": (0..3).map(|i| json!({"type": "block-dirty-bitmap-add",
                "data": {"node": format!("d{i}"), "name": "b"}})).collect::<Vec<_>>()}),
    );
    for s in &sides {
        for i in 0..3 {
            s.write(
                &format!("d{i}"),
                &["write -P 1 0 64k", "write -P 2 8M 64k", "write -P 3 12M 128k"],
            );
        }
    }
    same_events(&mut sides, "set-up");
    sides
}

fn all_bitmaps(sides: &mut [Side; 2]) -> Vec<Value> {
    (0..3).map(|i| same_bitmaps(sides, &format!("d{i}"), "")).collect()
}

fn incremental(i: usize, extra: Value) -> Value {
    let mut data = json!({"job-id": format!("j{i}"), "device": format!("d{i}"),
                          "target": format!("t{i}"), "sync": "incremental", "bitmap": "b"});
    for (k, v) in extra.as_object().unwrap() {
        data[k] = v.clone();
    }
    json!({"type": "blockdev-backup", "data": data})
}

/// A grouped transaction of three incrementals that all reach PENDING; cancelling one
/// aborts all: every job is cancelled, every bitmap keeps its bits plus the writes made
/// meanwhile (reclaim), and the events come in QEMU's order.
#[test]
fn grouped_cancel_of_one_job_aborts_all() {
    let root = tempfile::tempdir().unwrap();
    let mut sides = group_start(root.path(), 1 << 30);
    let before = all_bitmaps(&mut sides);
    let manual = json!({"auto-finalize": false});
    same(
        &mut sides,
        "transaction",
        json!({"actions": (0..3).map(|i| incremental(i, manual.clone())).collect::<Vec<_>>(),
               "properties": {"completion-mode": "grouped"}}),
    );
    for s in &mut sides {
        for _ in 0..3 {
            s.wait_event("BLOCK_JOB_PENDING");
        }
    }
    for s in &sides {
        s.write("d1", &["write -P 4 4M 64k"]);
    }
    same(&mut sides, "job-cancel", json!({"id": "j1"}));
    settle(&mut sides);
    let events = same_job_events(&mut sides, &["j0", "j1", "j2"], "cancel");
    assert_eq!(events.iter().filter(|e| e["event"] == "BLOCK_JOB_CANCELLED").count(), 3);
    let after = all_bitmaps(&mut sides);
    assert_eq!(after[0], before[0]);
    assert_eq!(after[2], before[2]);
    assert_eq!(after[1][0]["count"], 327680, "{}", after[1]);
}

/// A grouped transaction where one job fails (a read error on d2's last dirty area,
/// after the others have finished and wait): all are aborted; the failed job reports
/// the error, the others are cancelled; every bitmap is reclaimed.
#[test]
fn grouped_failure_aborts_all() {
    let root = tempfile::tempdir().unwrap();
    let mut sides = group_start(root.path(), 12 << 20);
    let before = all_bitmaps(&mut sides);
    let slow = json!({"speed": 65536, "x-perf": {"max-workers": 1}});
    let actions: Vec<Value> =
        (0..3).map(|i| incremental(i, if i == 2 { slow.clone() } else { json!({}) })).collect();
    same(
        &mut sides,
        "transaction",
        json!({"actions": actions, "properties": {"completion-mode": "grouped"}}),
    );
    settle(&mut sides);
    let events = same_job_events(&mut sides, &["j0", "j1", "j2"], "grouped failure");
    let completed: Vec<&Value> =
        events.iter().filter(|e| e["event"] == "BLOCK_JOB_COMPLETED").collect();
    assert_eq!(completed.len(), 1);
    assert_eq!(completed[0]["data"]["error"], "Input/output error");
    assert_eq!(events.iter().filter(|e| e["event"] == "BLOCK_JOB_CANCELLED").count(), 2);
    assert_eq!(all_bitmaps(&mut sides), before);
}

/// The same failure with completion-mode individual: the other jobs succeed (their
/// bitmaps are emptied), only the failed job's bitmap keeps its bits. Independent jobs
/// end in any order, so each job's events are compared on their own.
#[test]
fn individual_failure_spares_the_others() {
    let root = tempfile::tempdir().unwrap();
    let mut sides = group_start(root.path(), 12 << 20);
    let before = all_bitmaps(&mut sides);
    let slow = json!({"speed": 65536, "x-perf": {"max-workers": 1}});
    let actions: Vec<Value> =
        (0..3).map(|i| incremental(i, if i == 2 { slow.clone() } else { json!({}) })).collect();
    same(
        &mut sides,
        "transaction",
        json!({"actions": actions, "properties": {"completion-mode": "individual"}}),
    );
    settle(&mut sides);
    same_job_events(&mut sides, &["j0", "j1", "j2"], "individual");
    let after = all_bitmaps(&mut sides);
    assert_eq!(after[0][0]["count"], 0);
    assert_eq!(after[1][0]["count"], 0);
    assert_eq!(after[2], before[2]);
}
