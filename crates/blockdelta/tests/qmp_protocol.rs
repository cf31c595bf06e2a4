//! The QMP protocol and the export commands, `blockdelta serve` against
//! `qemu-storage-daemon`: negotiation, malformed input, argument errors, `id` echo,
//! `nbd-server-start`/`block-export-add`/`block-export-del` with `BLOCK_EXPORT_DELETED`,
//! several monitors. Replies must be equal (the JSON parser's own wording aside, where
//! only the class must match) and the connection must stay usable after every error.

use std::path::Path;
use std::time::Duration;

use testkit::qsd::{DaemonBuilder, StorageDaemon};
use testkit::serde_json::{Value, json};
use testkit::{qemu_img, qemu_io};

fn start(builder: DaemonBuilder, dir: &Path, name: &str) -> StorageDaemon {
    let image = dir.join(format!("{name}.qcow2"));
    let p = image.to_str().unwrap();
    qemu_img(["create", "-q", "-f", "qcow2", p, "64M"]).unwrap();
    qemu_img(["bitmap", "--add", p, "en"]).unwrap();
    qemu_img(["bitmap", "--add", p, "dis"]).unwrap();
    qemu_io(["-f", "qcow2", "-c", "write 1M 64k", p]).unwrap();
    qemu_img(["bitmap", "--disable", p, "dis"]).unwrap();
    let second = builder.path("qmp2.sock");
    builder
        .arg("--blockdev")
        .arg(format!("driver=file,node-name=file0,filename={p}"))
        .arg("--blockdev")
        .arg("driver=qcow2,node-name=disk0,file=file0")
        .arg("--chardev")
        .arg(format!("socket,id=m2,path={},server=on,wait=off", second.display()))
        .arg("--monitor")
        .arg("chardev=m2")
        .start()
        .unwrap()
}

fn pair(dir: &Path) -> [StorageDaemon; 2] {
    [
        start(StorageDaemon::qemu(), dir, "q"),
        start(StorageDaemon::builder(env!("CARGO_BIN_EXE_blockdelta")).arg("serve"), dir, "b"),
    ]
}

/// Sends raw bytes and reads one reply.
fn raw(d: &mut StorageDaemon, bytes: &[u8]) -> Value {
    d.qmp().send_raw(bytes).unwrap();
    d.qmp().recv().unwrap()
}

fn reply(d: &mut StorageDaemon, command: &str, arguments: Value) -> Value {
    match d.qmp().execute(command, arguments) {
        Ok(v) => json!({"return": v}),
        Err(e) => json!({"error": {"class": e.class, "desc": e.desc}}),
    }
}

#[test]
fn protocol_errors_match_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let mut ds = pair(dir.path());
    // Malformed messages, each followed by a working command on the same connection.
    let cases: &[&[u8]] = &[
        b"[1]\n",
        b"{\"exec\": \"x\"}\n",
        b"{\"execute\": 1}\n",
        b"{\"execute\": \"query-version\", \"arguments\": []}\n",
        b"{\"execute\": \"query-version\", \"foo\": 1}\n",
        b"{\"execute\": \"nosuch\", \"id\": \"x1\"}\n",
        b"{\"execute\": \"qmp_capabilities\", \"id\": 5}\n",
        b"{\"execute\": \"query-version\", \"arguments\": {\"a\": 1}}\n",
        b"{\"execute\": \"block-dirty-bitmap-add\", \"arguments\": {\"node\": 1, \"name\": \"b\"}}\n",
        b"{\"execute\": \"block-dirty-bitmap-add\", \"arguments\": {\"node\": \"disk0\"}}\n",
        b"{\"execute\": \"x-debug-block-dirty-bitmap-sha256\", \"arguments\": {\"node\": \"n\", \"name\": \"b\"}}\n",
    ];
    for case in cases {
        let replies: Vec<Value> = ds.iter_mut().map(|d| raw(d, case)).collect();
        assert_eq!(replies[0], replies[1], "{}", String::from_utf8_lossy(case));
        for d in &mut ds {
            d.execute_ok("query-named-block-nodes", json!({}));
        }
    }
    // Malformed JSON: the class matches (the parser's wording is its own).
    let replies: Vec<Value> = ds.iter_mut().map(|d| raw(d, b"{bad json}\n")).collect();
    for r in &replies {
        assert_eq!(r["error"]["class"], "GenericError", "{r}");
        assert!(r["error"]["desc"].as_str().unwrap().starts_with("JSON parse error"), "{r}");
    }
    for d in &mut ds {
        d.execute_ok("query-named-block-nodes", json!({}));
    }
    // Before negotiation, on a fresh connection.
    for d in &mut ds {
        let q = d.connect_qmp(false).unwrap();
        let greeting = q.greeting().clone();
        assert_eq!(greeting["QMP"]["capabilities"], json!(["oob"]));
        assert_eq!(
            greeting["QMP"]["version"]["qemu"],
            json!({"major": 10, "minor": 0, "micro": 2})
        );
        q.send_raw(b"{\"execute\": \"query-version\"}\n").unwrap();
        assert_eq!(
            q.recv().unwrap(),
            json!({"error": {"class": "CommandNotFound",
                              "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}})
        );
        q.negotiate().unwrap();
    }
    // A second monitor serves its own client while the first is connected.
    for d in &mut ds {
        let mut second =
            testkit::qmp::QmpClient::connect(d.path("qmp2.sock"), Duration::from_secs(10)).unwrap();
        let v = second.execute("query-version", Value::Null).unwrap();
        assert_eq!(v["qemu"]["major"], 10);
        d.execute_ok("query-named-block-nodes", json!({}));
    }
}

#[test]
fn export_commands_match_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let mut ds = pair(dir.path());
    let sockets: Vec<String> =
        ds.iter().map(|d| d.path("nbd.sock").display().to_string()).collect();
    let steps = |socket: &str| -> Vec<(&'static str, Value)> {
        vec![
            ("block-export-add", json!({"type": "nbd", "id": "e0", "node-name": "disk0"})),
            ("nbd-server-start", json!({"addr": {"type": "unix", "data": {"path": socket}}})),
            ("nbd-server-start", json!({"addr": {"type": "unix", "data": {"path": socket}}})),
            (
                "block-export-add",
                json!({"type": "nbd", "id": "e1", "node-name": "disk0", "name": "d1",
                       "writable": false, "bitmaps": ["en"]}),
            ),
            (
                "block-export-add",
                json!({"type": "nbd", "id": "e1", "node-name": "disk0", "name": "d1",
                       "writable": false, "bitmaps": ["nosuch"]}),
            ),
            (
                "block-export-add",
                json!({"type": "nbd", "id": "e1", "node-name": "disk0", "name": "d1",
                       "writable": false, "bitmaps": ["dis", {"node": "disk0", "name": "en"}],
                       "allocation-depth": true}),
            ),
            (
                "block-export-add",
                json!({"type": "nbd", "id": "e1", "node-name": "disk0", "name": "d2"}),
            ),
            (
                "block-export-add",
                json!({"type": "nbd", "id": "e2", "node-name": "disk0", "name": "d1"}),
            ),
            ("block-export-add", json!({"type": "nbd", "id": "e2", "node-name": "nope"})),
            ("query-block-exports", json!({})),
            ("block-dirty-bitmap-remove", json!({"node": "disk0", "name": "dis"})),
            ("block-export-del", json!({"id": "nope"})),
            ("block-export-del", json!({"id": "e1"})),
            ("query-block-exports", json!({})),
            ("block-dirty-bitmap-disable", json!({"node": "disk0", "name": "dis"})),
            ("nbd-server-stop", json!({})),
            ("nbd-server-stop", json!({})),
        ]
    };
    let all: Vec<Vec<(&str, Value)>> = sockets.iter().map(|s| steps(s)).collect();
    // `i` indexes the step of every daemon's list at once.
    #[allow(clippy::needless_range_loop)]
    for i in 0..all[0].len() {
        let mut replies = Vec::new();
        for (k, d) in ds.iter_mut().enumerate() {
            let (command, args) = &all[k][i];
            replies.push(reply(d, command, args.clone()));
            if *command == "block-export-del" && replies[k].get("return").is_some() {
                d.qmp().wait_event("BLOCK_EXPORT_DELETED", Duration::from_secs(10));
            }
        }
        assert_eq!(replies[0], replies[1], "{} {}", all[0][i].0, all[0][i].1);
        let events: Vec<Vec<Value>> = ds
            .iter_mut()
            .map(|d| {
                d.qmp()
                    .take_events()
                    .into_iter()
                    .map(|mut e| {
                        e.as_object_mut().unwrap().remove("timestamp");
                        e
                    })
                    .collect()
            })
            .collect();
        assert_eq!(events[0], events[1], "events after {}", all[0][i].0);
    }
}
