//! A differential harness for backup scenarios: `qemu-storage-daemon` and `blockdelta
//! serve` started with the same options on copies of the same images, driven by the same
//! QMP commands and NBD writes; replies, events (timestamps aside), bitmaps (records and
//! SHA-256) and, after quit, images are compared. A byte model of each guest disk gives
//! the reference a backup must equal (the source at the job's point in time).
//!
//! Fails, never skips, when a tool is missing (`testkit` panics then).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use testkit::qsd::{DaemonBuilder, StorageDaemon};
use testkit::serde_json::{Value, json};
use testkit::{qemu_img, qemu_io, require_tool};

/// Which program a side runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// qemu-storage-daemon, the oracle.
    Qemu,
    /// `blockdelta serve`.
    Blockdelta,
}

/// One daemon and its directory of images.
pub struct Side {
    /// Which program.
    pub kind: Kind,
    /// The running daemon.
    pub daemon: StorageDaemon,
    /// Where its images are.
    pub dir: PathBuf,
    /// Its NBD server's socket.
    pub socket: PathBuf,
}

impl Side {
    /// The reply to a command, error or not, as `{"return": …}` or `{"error": …}`.
    pub fn reply(&mut self, command: &str, arguments: Value) -> Value {
        match self.daemon.qmp().execute(command, arguments) {
            Ok(v) => json!({"return": v}),
            Err(e) => json!({"error": {"class": e.class, "desc": e.desc}}),
        }
    }

    /// Events so far, without timestamps.
    pub fn events(&mut self) -> Vec<Value> {
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

    /// `node`'s bitmap records, in order, with the SHA-256 of the named ones.
    pub fn bitmaps(&mut self, node: &str) -> Value {
        let nodes = self.daemon.execute_ok("query-named-block-nodes", json!({}));
        let Some(n) = nodes.as_array().unwrap().iter().find(|n| n["node-name"] == node) else {
            panic!("{:?}: no node {node}", self.kind)
        };
        let mut list = n.get("dirty-bitmaps").cloned().unwrap_or(json!([]));
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

    /// The NBD URI of export `name`.
    pub fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.socket.display())
    }

    /// Runs qemu-io `commands` on export `name`; they must succeed.
    pub fn io(&self, name: &str, commands: &[String]) {
        let mut args = vec!["-f".to_string(), "raw".into()];
        for c in commands {
            args.push("-c".into());
            args.push(c.clone());
        }
        args.push(self.uri(name));
        qemu_io(&args).unwrap_or_else(|e| panic!("{:?}: qemu-io {commands:?}: {e:#}", self.kind));
    }

    /// The status of job `id` (`"null"` once it is gone).
    pub fn job_status(&mut self, id: &str) -> String {
        let jobs = self.daemon.execute_ok("query-jobs", json!({}));
        jobs.as_array()
            .unwrap()
            .iter()
            .find(|j| j["id"] == id)
            .map_or("null".to_string(), |j| j["status"].as_str().unwrap().to_string())
    }

    /// Polls until job `id` is in one of `statuses` (events stay queued).
    pub fn wait_job(&mut self, id: &str, statuses: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.job_status(id);
            if statuses.contains(&s.as_str()) {
                return;
            }
            assert!(Instant::now() < deadline, "{:?}: job {id} stuck in {s}", self.kind);
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// What a pair of daemons gets.
pub struct Setup {
    /// `--blockdev` values; `{DIR}` stands for the side's directory.
    pub blockdevs: Vec<String>,
    /// `(export id = export name, node)` pairs, exported writable.
    pub exports: Vec<(String, String)>,
}

/// The program a side runs.
pub fn builder(kind: Kind) -> DaemonBuilder {
    match kind {
        Kind::Qemu => StorageDaemon::qemu(),
        Kind::Blockdelta => StorageDaemon::builder(env!("CARGO_BIN_EXE_blockdelta")).arg("serve"),
    }
}

/// The two daemons, QEMU first.
pub struct Pair {
    /// `[qemu, blockdelta]`.
    pub sides: [Side; 2],
}

impl Pair {
    /// Makes `root/Qemu` and `root/Blockdelta`, runs `prepare` in each (to create the
    /// images), then starts both daemons with `setup`.
    pub fn start(root: &Path, prepare: impl Fn(&Path), setup: &Setup) -> Pair {
        Pair {
            sides: [Kind::Qemu, Kind::Blockdelta].map(|kind| {
                let dir = root.join(format!("{kind:?}"));
                std::fs::create_dir_all(&dir).unwrap();
                prepare(&dir);
                let b = builder(kind);
                let socket = b.path("nbd.sock");
                let mut b = b;
                for bd in &setup.blockdevs {
                    b = b.arg("--blockdev").arg(bd.replace("{DIR}", dir.to_str().unwrap()));
                }
                b = b
                    .arg("--nbd-server")
                    .arg(format!("addr.type=unix,addr.path={}", socket.display()));
                for (id, node) in &setup.exports {
                    b = b
                        .arg("--export")
                        .arg(format!("type=nbd,id={id},node-name={node},name={id},writable=on"));
                }
                let daemon = b.start().unwrap_or_else(|e| panic!("{kind:?}: {e:#}"));
                Side { kind, daemon, dir, socket }
            }),
        }
    }

    /// Runs `command` on both and requires equal replies; returns the reply.
    #[track_caller]
    pub fn same(&mut self, command: &str, arguments: Value) -> Value {
        let r: Vec<Value> =
            self.sides.iter_mut().map(|s| s.reply(command, arguments.clone())).collect();
        assert_eq!(r[0], r[1], "{command} {arguments}: QEMU, then blockdelta");
        r[0].clone()
    }

    /// Like [`Pair::same`], and the command must succeed.
    #[track_caller]
    pub fn ok(&mut self, command: &str, arguments: Value) -> Value {
        let r = self.same(command, arguments.clone());
        assert!(r.get("return").is_some(), "{command} {arguments}: {r}");
        r["return"].clone()
    }

    /// Like [`Pair::same`], and the command must fail with `desc`.
    #[track_caller]
    pub fn err(&mut self, command: &str, arguments: Value, desc: &str) {
        let r = self.same(command, arguments.clone());
        assert_eq!(r["error"]["desc"], desc, "{command} {arguments}: {r}");
    }

    /// Both sides' events so far must be equal; returns them.
    #[track_caller]
    pub fn same_events(&mut self, what: &str) -> Vec<Value> {
        let e: Vec<Vec<Value>> = self.sides.iter_mut().map(Side::events).collect();
        assert_eq!(e[0], e[1], "events {what}: QEMU, then blockdelta");
        e[0].clone()
    }

    /// Both sides' events so far, normalized, split by job (the order within each job
    /// must be equal; the interleaving of concurrent jobs is a matter of scheduling in
    /// either program); returns QEMU's, normalized.
    #[track_caller]
    pub fn same_events_per_job(
        &mut self,
        what: &str,
        normalize: impl Fn(&[Value]) -> Vec<Value>,
    ) -> Vec<Value> {
        let e: Vec<Vec<Value>> = self.sides.iter_mut().map(|s| normalize(&s.events())).collect();
        let split = |events: &[Value]| {
            let mut by_job: std::collections::BTreeMap<String, Vec<Value>> = Default::default();
            for ev in events {
                let data = &ev["data"];
                let job = data["id"].as_str().or(data["device"].as_str()).unwrap_or("");
                by_job.entry(job.to_string()).or_default().push(ev.clone());
            }
            by_job
        };
        assert_eq!(split(&e[0]), split(&e[1]), "events {what} per job: QEMU, then blockdelta");
        e[0].clone()
    }

    /// Both sides' bitmaps of `node` must be equal; returns them.
    #[track_caller]
    pub fn same_bitmaps(&mut self, node: &str, what: &str) -> Value {
        let b: Vec<Value> = self.sides.iter_mut().map(|s| s.bitmaps(node)).collect();
        assert_eq!(b[0], b[1], "bitmaps of {node} {what}: QEMU, then blockdelta");
        b[0].clone()
    }

    /// The named bitmap's record (after [`Pair::same_bitmaps`]).
    #[track_caller]
    pub fn bitmap(&mut self, node: &str, name: &str) -> Value {
        let all = self.same_bitmaps(node, &format!("({name})"));
        all.as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no bitmap {name} on {node}: {all}"))
    }

    /// Writes on export `name` of both (qemu-io `write -P` commands), and in `model`.
    pub fn write(&mut self, name: &str, model: &mut Model, writes: &[(u8, u64, u64)]) {
        let commands: Vec<String> =
            writes.iter().map(|(p, off, len)| format!("write -P {p:#x} {off} {len}")).collect();
        for s in &self.sides {
            s.io(name, &commands);
        }
        for &(p, off, len) in writes {
            model.write(p, off, len);
        }
    }

    /// Waits on both for job `id` to reach one of `statuses` (`"null"`: gone).
    pub fn wait_job(&mut self, id: &str, statuses: &[&str]) {
        for s in &mut self.sides {
            s.wait_job(id, statuses);
        }
    }

    /// Quits both (they must exit cleanly); returns their directories.
    pub fn quit(self) -> [PathBuf; 2] {
        self.sides.map(|s| {
            let dir = s.dir.clone();
            let kind = s.kind;
            let status = s.daemon.quit().unwrap_or_else(|e| panic!("{kind:?}: quit: {e:#}"));
            assert!(status.success(), "{kind:?} exited with {status}");
            dir
        })
    }
}

/// The guest contents of a disk, as bytes.
#[derive(Clone)]
pub struct Model(pub Vec<u8>);

impl Model {
    /// A disk of `size` zero bytes.
    pub fn new(size: u64) -> Model {
        Model(vec![0; size as usize])
    }
    /// What `write -P pattern off len` does.
    pub fn write(&mut self, pattern: u8, off: u64, len: u64) {
        self.0[off as usize..(off + len) as usize].fill(pattern);
    }
    /// Grows (or shrinks) the disk; new bytes read zero.
    pub fn resize(&mut self, size: u64) {
        self.0.resize(size as usize, 0);
    }
    /// Writes the model to `path` as a raw image.
    pub fn save(&self, path: &Path) {
        std::fs::write(path, &self.0).unwrap();
    }
}

/// Creates a qcow2 image of `size` (extra `-o` options allowed).
pub fn create_qcow2(path: &Path, size: &str, options: Option<&str>) {
    let p = path.to_str().unwrap();
    match options {
        Some(o) => qemu_img(["create", "-q", "-f", "qcow2", "-o", o, p, size]),
        None => qemu_img(["create", "-q", "-f", "qcow2", p, size]),
    }
    .unwrap();
}

/// Writes `writes` into image `path` of `format` offline, and into `model`.
pub fn write_offline(path: &Path, format: &str, model: &mut Model, writes: &[(u8, u64, u64)]) {
    let mut args = vec!["-f".to_string(), format.to_string()];
    for &(p, off, len) in writes {
        args.push("-c".into());
        args.push(format!("write -P {p:#x} {off} {len}"));
        model.write(p, off, len);
    }
    args.push(path.to_str().unwrap().to_string());
    qemu_io(&args).unwrap();
}

/// Whether qcow2 `image`, with its backing file set to `base` (unsafe rebase, as iotests
/// 124 and 257 do) if given, reads as the raw `reference`.
pub fn matches(image: &Path, base: Option<&Path>, reference: &Path) -> bool {
    let img = image.to_str().unwrap();
    if let Some(base) = base {
        qemu_img(["rebase", "-u", "-f", "qcow2", "-b", base.to_str().unwrap(), "-F", "qcow2", img])
            .unwrap();
    }
    let status = Command::new(require_tool("qemu-img"))
        .args(["compare", "-q", "-f", "qcow2", "-F", "raw", img, reference.to_str().unwrap()])
        .status()
        .unwrap();
    match status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!("qemu-img compare {img}: {status}"),
    }
}

/// Asserts that QEMU's and blockdelta's copies of `name` have the same guest contents.
#[track_caller]
pub fn same_image(dirs: &[PathBuf; 2], name: &str, format: &str) {
    let (a, b) = (dirs[0].join(name), dirs[1].join(name));
    let status = Command::new(require_tool("qemu-img"))
        .args(["compare", "-q", "-f", format, "-F", format])
        .args([&a, &b])
        .status()
        .unwrap();
    assert!(status.success(), "{name}: QEMU's and blockdelta's differ ({status})");
}
