//! QMP block-node commands (`blockdev-add`, `blockdev-del`, `query-named-block-nodes`,
//! `query-block`, `block_resize`) against qemu-storage-daemon: both daemons start with
//! the same options on copies of the same images, get the same commands, and their
//! replies must be equal once generated node names and paths are normalized.
//!
//! Fails, never skips, when a tool is missing.

use std::path::Path;

use testkit::qsd::{DaemonBuilder, StorageDaemon};
use testkit::serde_json::{Value, json};
use testkit::{qemu_img, qemu_io};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Qemu,
    Blockdelta,
}

fn builder(kind: Kind) -> DaemonBuilder {
    match kind {
        Kind::Qemu => StorageDaemon::qemu(),
        Kind::Blockdelta => StorageDaemon::builder(env!("CARGO_BIN_EXE_blockdelta")).arg("serve"),
    }
}

/// Replaces `#block` + digits with `#blockN` and the image directory with `DIR`.
fn normalize(value: &Value, dir: &str) -> Value {
    match value {
        Value::String(s) => {
            let s = s.replace(dir, "DIR");
            let mut out = String::new();
            let mut rest = s.as_str();
            while let Some(i) = rest.find("#block") {
                out.push_str(&rest[..i + 6]);
                rest = &rest[i + 6..];
                let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
                out.push('N');
                rest = &rest[digits..];
            }
            out.push_str(rest);
            Value::String(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(|v| normalize(v, dir)).collect()),
        Value::Object(map) => {
            // The length of the host file under a qcow2 image: blockdelta stores its
            // crash-safe bitmaps at open (every data cluster allocated), QEMU at close.
            let qcow2_file = map.get("format").is_some_and(|f| f == "file")
                && map
                    .get("filename")
                    .and_then(Value::as_str)
                    .is_some_and(|f| f.ends_with(".qcow2"));
            Value::Object(
                map.iter()
                    // Host allocation legitimately differs between the two programs.
                    .filter(|(k, _)| k.as_str() != "actual-size")
                    .filter(|(k, _)| !(qcow2_file && k.as_str() == "virtual-size"))
                    .map(|(k, v)| (k.clone(), normalize(v, dir)))
                    .collect(),
            )
        }
        other => other.clone(),
    }
}

fn prepare(dir: &Path) {
    let q = dir.join("disk.qcow2");
    let q = q.to_str().unwrap();
    qemu_img(["create", "-q", "-f", "qcow2", q, "4M"]).unwrap();
    qemu_io(["-f", "qcow2", "-c", "write -P 1 0 64k", q]).unwrap();
    qemu_img(["bitmap", "--add", q, "bm0"]).unwrap();
    qemu_img(["bitmap", "--add", "--disable", "-g", "128k", q, "bm1"]).unwrap();
    std::fs::write(dir.join("r.raw"), vec![0u8; 1 << 20]).unwrap();
    std::fs::write(dir.join("s.raw"), vec![0u8; 1 << 20]).unwrap();
}

/// Runs `commands` on `kind` and returns the normalized replies (`return` or `error`).
fn replies(kind: Kind, root: &Path, commands: &[(&str, Value)]) -> Vec<Value> {
    let dir = root.join(format!("{kind:?}"));
    std::fs::create_dir_all(&dir).unwrap();
    prepare(&dir);
    let d = dir.to_str().unwrap().to_string();
    let mut b = builder(kind);
    let socket = b.path("nbd.sock");
    for bd in [
        format!("driver=file,node-name=f0,filename={d}/disk.qcow2"),
        "driver=qcow2,node-name=disk0,file=f0".to_string(),
        format!("driver=file,node-name=f1,filename={d}/r.raw,cache.direct=on"),
        "driver=raw,node-name=r1,file=f1,detect-zeroes=on".to_string(),
        // With rules, QEMU names the node `json:{...}` (its full options); without, as here,
        // `blkdebug::FILE`. blockdelta has the second form only.
        "driver=blkdebug,node-name=dbg,image=r1".to_string(),
    ] {
        b = b.arg("--blockdev").arg(bd);
    }
    b = b
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", socket.display()))
        .arg("--export")
        .arg("type=nbd,id=e0,node-name=disk0");
    let mut daemon = b.start().unwrap_or_else(|e| panic!("{kind:?}: {e:#}"));
    let mut out = Vec::new();
    for (command, args) in commands {
        let args = normalize(args, "DIR");
        let args = replace_dir(&args, &d);
        let reply = match daemon.qmp().execute(command, args) {
            Ok(v) => json!({"return": v}),
            Err(e) => json!({"error": {"class": e.class, "desc": e.desc}}),
        };
        out.push(normalize(&reply, &d));
    }
    daemon.quit().unwrap();
    out
}

/// Puts the real directory where a command's arguments say `DIR`.
fn replace_dir(value: &Value, dir: &str) -> Value {
    match value {
        Value::String(s) => Value::String(s.replace("DIR", dir)),
        Value::Array(items) => Value::Array(items.iter().map(|v| replace_dir(v, dir)).collect()),
        Value::Object(map) => {
            Value::Object(map.iter().map(|(k, v)| (k.clone(), replace_dir(v, dir))).collect())
        }
        other => other.clone(),
    }
}

#[test]
fn block_node_commands_answer_as_qemu() {
    let commands: Vec<(&str, Value)> = vec![
        ("query-named-block-nodes", json!({"flat": true})),
        ("query-named-block-nodes", json!({})),
        ("query-block", json!({})),
        ("query-block", json!({"x": 1})),
        ("block-dirty-bitmap-add", json!({"node": "r1", "name": "t0"})),
        ("blockdev-add", json!({"driver": "file", "node-name": "f0", "filename": "DIR/r.raw"})),
        (
            "blockdev-add",
            json!({"driver": "raw", "node-name": "r9",
                                "file": {"driver": "file", "filename": "DIR/s.raw"}}),
        ),
        ("blockdev-add", json!({"driver": "raw", "file": "f1"})),
        ("blockdev-add", json!({"driver": "raw", "node-name": "bad", "file": "nope"})),
        ("blockdev-add", json!({"driver": "raw", "node-name": "bad", "file": "f1", "x": 1})),
        ("query-named-block-nodes", json!({"flat": true})),
        ("blockdev-del", json!({})),
        ("blockdev-del", json!({"node-name": "nope"})),
        ("blockdev-del", json!({"node-name": "f0"})),
        ("blockdev-del", json!({"node-name": "disk0"})),
        ("blockdev-del", json!({"node-name": "r9"})),
        ("query-named-block-nodes", json!({"flat": true})),
        ("block_resize", json!({"node-name": "f1", "size": 2097152})),
        ("block_resize", json!({"device": "f1", "size": 2097152})),
        ("block_resize", json!({"size": 2097152})),
        ("block_resize", json!({"node-name": "zz", "size": 2097152})),
        ("block_resize", json!({"device": "r1", "node-name": "r1", "size": 3145728})),
        ("block_resize", json!({"node-name": "r1", "size": -1})),
        ("block_resize", json!({"node-name": "disk0", "size": 8388608})),
        ("query-named-block-nodes", json!({"flat": true})),
        ("block-export-del", json!({"id": "e0"})),
        ("blockdev-del", json!({"node-name": "disk0"})),
        ("blockdev-del", json!({"node-name": "f0"})),
        ("blockdev-del", json!({"node-name": "dbg"})),
        ("blockdev-del", json!({"node-name": "r1"})),
        ("query-named-block-nodes", json!({"flat": true})),
    ];
    let root = tempfile::tempdir().unwrap();
    let qemu = replies(Kind::Qemu, root.path(), &commands);
    let ours = replies(Kind::Blockdelta, root.path(), &commands);
    for (((command, args), q), o) in commands.iter().zip(&qemu).zip(&ours) {
        assert_eq!(q, o, "{command} {args}");
    }
}
