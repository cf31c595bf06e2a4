//! Helpers shared by the differential tests of the `blockdelta` command against
//! `qemu-img`: running both on copies of the same files, and reading and patching
//! images.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use testkit::qsd::StorageDaemon;
use testkit::serde_json::{self, Value, json};

/// What a command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Exit code (-1 if killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error, with the program's name prefix and QEMU's generated node names
    /// (`#block123`) made the same for both programs.
    pub stderr: String,
}

/// Replaces `#block` followed by digits with `#blockN`.
fn normalize_node_names(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("#block") {
        out.push_str(&rest[..i + 6]);
        rest = &rest[i + 6..];
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits > 0 {
            out.push('N');
        }
        rest = &rest[digits..];
    }
    out.push_str(rest);
    out
}

/// Runs `program args` in `dir` and collects what it did.
pub fn run_in(program: &Path, args: &[&str], dir: &Path) -> Outcome {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    let stderr = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(|line| {
            let rest =
                line.strip_prefix("blockdelta: ").or_else(|| line.strip_prefix("qemu-img: "));
            let text = rest.map_or_else(|| line.to_string(), |r| format!("PROG: {r}"));
            normalize_node_names(&text) + "\n"
        })
        .collect();
    Outcome {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
    }
}

/// `blockdelta` (the binary under test).
pub fn blockdelta() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_blockdelta"))
}

/// `qemu-img` (the test fails if it is missing).
pub fn qemu_img_path() -> PathBuf {
    testkit::require_tool("qemu-img")
}

/// Two copies of the files of `from` (not directories): `ours` and `qemu`, to run each
/// program on its own copy under the same names.
pub struct Copies {
    /// Where blockdelta runs.
    pub ours: PathBuf,
    /// Where qemu-img runs.
    pub qemu: PathBuf,
}

impl Copies {
    /// Fresh copies of every file in `from`, in `work/ours` and `work/qemu`.
    pub fn new(from: &Path, work: &Path) -> Copies {
        let copies = Copies { ours: work.join("ours"), qemu: work.join("qemu") };
        for dir in [&copies.ours, &copies.qemu] {
            if dir.exists() {
                std::fs::remove_dir_all(dir).unwrap();
            }
            std::fs::create_dir_all(dir).unwrap();
            for entry in std::fs::read_dir(from).unwrap() {
                let entry = entry.unwrap();
                if entry.file_type().unwrap().is_file() {
                    std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
                }
            }
        }
        copies
    }
}

/// The `bitmaps` list of `qemu-img info --output=json` (`null` when there is none).
pub fn info_bitmaps(image: &Path) -> Value {
    let out = testkit::qemu_img(["info", "-U", "--output=json", image.to_str().unwrap()]).unwrap();
    let info: Value = serde_json::from_str(&out).unwrap();
    info["format-specific"]["data"]["bitmaps"].clone()
}

/// `qemu-img check IMAGE`'s exit code and output.
pub fn qemu_check(image: &Path) -> Outcome {
    run_in(&qemu_img_path(), &["check", image.to_str().unwrap()], Path::new("."))
}

/// Every bitmap of a qcow2 image as qemu-storage-daemon loads it (read-only): its
/// `query-named-block-nodes` record and `x-debug-block-dirty-bitmap-sha256`, by name.
pub fn qemu_bitmaps(image: &Path) -> Vec<(String, Value, String)> {
    let mut daemon = StorageDaemon::qemu()
        .arg("--blockdev")
        .arg(format!("driver=file,node-name=file0,filename={},read-only=on", image.display()))
        .arg("--blockdev")
        .arg("driver=qcow2,node-name=disk0,file=file0,read-only=on")
        .start()
        .unwrap();
    let nodes = daemon.execute_ok("query-named-block-nodes", json!({"flat": true}));
    let disk = nodes.as_array().unwrap().iter().find(|n| n["node-name"] == "disk0").unwrap();
    let records = disk["dirty-bitmaps"].as_array().cloned().unwrap_or_default();
    let mut out: Vec<(String, Value, String)> = records
        .into_iter()
        .map(|r| {
            let name = r["name"].as_str().unwrap().to_string();
            let sha = daemon.execute_ok(
                "x-debug-block-dirty-bitmap-sha256",
                json!({"node": "disk0", "name": name}),
            );
            (name, r, sha["sha256"].as_str().unwrap().to_string())
        })
        .collect();
    daemon.quit().unwrap();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Reads a big-endian u64 of a file.
pub fn read_be64(path: &Path, offset: u64) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    let at = offset as usize;
    u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap())
}

/// Writes `bytes` at `offset` of a file (growing it if needed).
pub fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(bytes, offset).unwrap();
}

/// Where a qcow2 image (64 KiB clusters, 16-bit refcounts, one refcount block) keeps
/// things, read from its header.
pub struct Layout {
    /// The first refcount block.
    pub refblock: u64,
    /// The L2 table of guest cluster 0.
    pub l2: u64,
}

impl Layout {
    /// Reads the layout of `image`.
    pub fn of(image: &Path) -> Layout {
        let reftable = read_be64(image, 48);
        let refblock = read_be64(image, reftable) & 0x00ff_ffff_ffff_fe00;
        let l1 = read_be64(image, 40);
        let l2 = read_be64(image, l1) & 0x00ff_ffff_ffff_fe00;
        Layout { refblock, l2 }
    }

    /// Sets the stored refcount of host cluster `cluster`.
    pub fn set_refcount(&self, image: &Path, cluster: u64, refcount: u16) {
        poke(image, self.refblock + 2 * cluster, &refcount.to_be_bytes());
    }

    /// The host offset of guest cluster `index` (an L2 entry, flags masked).
    pub fn data(&self, image: &Path, index: u64) -> u64 {
        read_be64(image, self.l2 + 8 * index) & 0x00ff_ffff_ffff_fe00
    }
}

/// Adds `count` clusters of 64 KiB at the end of `image`, each with refcount 1 and
/// referenced by nothing: leaked clusters.
pub fn add_leaks(image: &Path, count: u64) {
    let layout = Layout::of(image);
    let len = std::fs::metadata(image).unwrap().len();
    let first = len.div_ceil(65536);
    let file = std::fs::OpenOptions::new().write(true).open(image).unwrap();
    file.set_len((first + count) * 65536).unwrap();
    for c in first..first + count {
        layout.set_refcount(image, c, 1);
    }
}
