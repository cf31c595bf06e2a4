//! Helpers shared by the push-mode tests (`repo_push.rs`, `repo_crash_recover.rs`): a
//! daemon (qemu-storage-daemon or `blockdelta serve`) with one qcow2 disk exported over
//! NBD, writes and reference copies through NBD, `blockdelta` runs, restores compared
//! with references.
//!
//! Fails, never skips, when a tool is missing (`testkit` panics then).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use testkit::qsd::{DaemonBuilder, StorageDaemon};
use testkit::serde_json::{self, Value};
use testkit::{qemu_img, qemu_io};

pub const MIB: u64 = 1 << 20;

pub fn bd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_blockdelta"))
}

/// The stdout of a run that must succeed.
pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Qsd,
    Serve,
}

/// The name of a second QMP monitor's socket in the test directory (see
/// [`Daemon::open_with_spare_monitor`]).
pub const SPARE_QMP: &str = "qmp-spare.sock";

/// A daemon with `disk0` (qcow2 `DIR/disk.qcow2` over a file node `f0`, writable)
/// exported over NBD, its QMP monitor free for the client under test.
pub struct Daemon {
    d: Option<StorageDaemon>,
    pub uri: String,
    pub qmp: PathBuf,
}

impl Daemon {
    /// A new `size_mib` MiB image, served.
    pub fn start(kind: Kind, dir: &Path, size_mib: u64) -> Daemon {
        let image = dir.join("disk.qcow2");
        qemu_img(["create", "-q", "-f", "qcow2", s(&image), &format!("{size_mib}M")]).unwrap();
        Daemon::open(kind, dir)
    }

    /// After a crash: another program opens `dir/disk.qcow2` for writing (qemu-io,
    /// which writes nothing but clears the autoclear bits it does not know). For
    /// `blockdelta serve` this is what makes its crash-safe bitmaps inconsistent; for
    /// qemu-storage-daemon they are so already.
    pub fn foreign_open(dir: &Path) {
        let image = dir.join("disk.qcow2");
        testkit::qemu_io(["-c", "flush", image.to_str().unwrap()]).unwrap();
    }

    /// A daemon on the existing `dir/disk.qcow2`.
    pub fn open(kind: Kind, dir: &Path) -> Daemon {
        Daemon::open_with(kind, dir, &[])
    }

    /// Like [`Daemon::open`], with a second QMP monitor on `DIR/qmp-spare.sock`, from
    /// which a test can watch the daemon while the client under test holds the first.
    pub fn open_with_spare_monitor(kind: Kind, dir: &Path) -> Daemon {
        let spare = dir.join(SPARE_QMP);
        let _ = std::fs::remove_file(&spare);
        let chardev = format!("socket,path={},server=on,wait=off,id=qmp-spare", s(&spare));
        Daemon::open_with(kind, dir, &["--chardev", &chardev, "--monitor", "chardev=qmp-spare"])
    }

    fn open_with(kind: Kind, dir: &Path, extra: &[&str]) -> Daemon {
        let image = dir.join("disk.qcow2");
        let socket = dir.join("nbd.sock");
        // A daemon that was killed leaves its socket behind.
        let _ = std::fs::remove_file(&socket);
        let b: DaemonBuilder = match kind {
            Kind::Qsd => StorageDaemon::qemu(),
            Kind::Serve => StorageDaemon::builder(env!("CARGO_BIN_EXE_blockdelta")).arg("serve"),
        };
        let mut d = b
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=f0,filename={}", s(&image)))
            .arg("--blockdev")
            .arg("driver=qcow2,node-name=disk0,file=f0")
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", s(&socket)))
            .arg("--export")
            .arg("type=nbd,id=e0,node-name=disk0,name=disk0,writable=on")
            .args(extra)
            .start()
            .unwrap_or_else(|e| panic!("{kind:?}: {e:#}"));
        let qmp = d.qmp_socket();
        d.disconnect_qmp();
        Daemon { d: Some(d), uri: format!("nbd+unix:///disk0?socket={}", s(&socket)), qmp }
    }

    /// Runs `f` on a QMP connection of the test's own, closed afterwards.
    pub fn with_qmp<T>(&mut self, f: impl FnOnce(&mut StorageDaemon) -> T) -> T {
        let d = self.d.as_mut().unwrap();
        d.connect_qmp(true).unwrap();
        let r = f(d);
        d.disconnect_qmp();
        r
    }

    /// The disk node's bitmap records (`query-named-block-nodes`), named ones only
    /// (a running job's successor is anonymous).
    pub fn bitmap_records(&mut self) -> Vec<Value> {
        self.with_qmp(|d| {
            let nodes = d.execute_ok("query-named-block-nodes", Value::Null);
            let n = nodes.as_array().unwrap().iter().find(|n| n["node-name"] == "disk0").unwrap();
            n["dirty-bitmaps"]
                .as_array()
                .map(|a| a.iter().filter(|b| b["name"].is_string()).cloned().collect())
                .unwrap_or_default()
        })
    }

    /// The names of the disk node's bitmaps.
    pub fn bitmaps(&mut self) -> Vec<String> {
        self.bitmap_records().iter().map(|b| b["name"].as_str().unwrap().to_owned()).collect()
    }

    pub fn io(&self, cmds: &[String]) {
        let mut args = vec!["-f".to_string(), "raw".to_string()];
        for c in cmds {
            args.push("-c".into());
            args.push(c.clone());
        }
        args.push(self.uri.clone());
        qemu_io(&args).unwrap();
    }

    /// A copy of the disk as it is now (qcow2).
    pub fn reference(&self, path: &Path) {
        qemu_img(["convert", "-f", "raw", "-O", "qcow2", &self.uri, s(path)]).unwrap();
    }

    /// A clean stop (QMP `quit`): the daemon stores its persistent bitmaps.
    pub fn quit(mut self) {
        let mut d = self.d.take().unwrap();
        d.connect_qmp(true).unwrap();
        let status = d.quit().unwrap();
        assert!(status.success(), "quit: {status}");
    }

    /// A crash: SIGKILL, nothing saved.
    pub fn kill(mut self) {
        let d = self.d.take().unwrap();
        d.kill().unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut d) = self.d.take() {
            d.connect_qmp(true).unwrap();
            d.quit().unwrap();
        }
    }
}

/// `blockdelta backup` in push mode of `disk0` with bitmap `b0`; its JSON report.
pub fn push(d: &Daemon, repo: &Path, full: bool) -> Value {
    let mut args = vec!["backup", "--qmp", s(&d.qmp), "--node", "disk0", "--repo", s(repo)];
    args.extend(["--bitmap", "b0", "--json"]);
    if full {
        args.push("--full");
    }
    serde_json::from_str(&ok(bd().args(&args).output().unwrap())).unwrap()
}

pub fn compare(restored: &Path, reference: &Path) {
    let out = qemu_img(["compare", "-f", "raw", "-F", "qcow2", s(restored), s(reference)]).unwrap();
    assert!(out.contains("Images are identical"), "{out}");
}

/// Restores backup `id` of `disk0` to a raw file and compares it with `reference`.
pub fn restore_and_compare(repo: &Path, id: &str, reference: &Path, dir: &Path) {
    let raw = dir.join(format!("restored-{id}.raw"));
    let _ = std::fs::remove_file(&raw);
    ok(bd()
        .args(["restore", "--repo", s(repo), "--disk", "disk0", "--at", id, "--to", s(&raw), "-q"])
        .output()
        .unwrap());
    compare(&raw, reference);
    std::fs::remove_file(&raw).unwrap();
}
