//! Pull-mode backups over TCP (`nbd://127.0.0.1:PORT/EXPORT`): a full backup and an
//! incremental from `blockdelta serve` listening on 127.0.0.1 restore to the disk as it
//! was at each point.

use std::process::Command;

use testkit::qsd::StorageDaemon;
use testkit::serde_json::json;
use testkit::{qemu_img, qemu_io};

fn bd(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_blockdelta")).args(args).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn pull_backups_over_tcp() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let b = StorageDaemon::builder(env!("CARGO_BIN_EXE_blockdelta")).arg("serve");
    let dir = b.dir().to_owned();
    let image = dir.join("disk.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", image.to_str().unwrap(), "32M"]).unwrap();
    let mut d = b
        .arg("--blockdev")
        .arg(format!("driver=file,node-name=f0,filename={}", image.display()))
        .arg("--blockdev")
        .arg("driver=qcow2,node-name=disk0,file=f0")
        .arg("--nbd-server")
        .arg(format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port}"))
        .arg("--export")
        .arg("type=nbd,id=e0,node-name=disk0,name=disk0,writable=on")
        .start()
        .unwrap();
    let uri = format!("nbd://127.0.0.1:{port}/disk0");
    qemu_io(["-f", "raw", "-c", "write -P 1 0 2M", &uri]).unwrap();
    let repo = dir.join("repo");
    let r = repo.to_str().unwrap();
    // A full backup and, at the same instant, a bitmap for the next one (nothing writes
    // in between here, so the live disk is the point in time).
    d.execute_ok("block-dirty-bitmap-add", json!({"node": "disk0", "name": "b0"}));
    bd(&["backup", "--from", &uri, "--repo", r, "--full", "-q"]);
    let ref1 = dir.join("ref1.raw");
    qemu_img(["convert", "-f", "raw", "-O", "raw", &uri, ref1.to_str().unwrap()]).unwrap();
    qemu_io(["-f", "raw", "-c", "write -P 2 8M 64k", &uri]).unwrap();
    // Freeze the bitmap (disable) and export it read-only beside the disk.
    d.execute_ok("block-dirty-bitmap-disable", json!({"node": "disk0", "name": "b0"}));
    d.execute_ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e1", "node-name": "disk0", "name": "frozen",
               "bitmaps": ["b0"]}),
    );
    let frozen = format!("nbd://127.0.0.1:{port}/frozen");
    let out = bd(&[
        "backup", "--from", &frozen, "--bitmap", "b0", "--repo", r, "--disk", "disk0", "--json",
    ]);
    let inc: testkit::serde_json::Value = testkit::serde_json::from_str(&out).unwrap();
    assert_eq!(inc["bytes-read"], 65536, "{inc}");
    let ref2 = dir.join("ref2.raw");
    qemu_img(["convert", "-f", "raw", "-O", "raw", &uri, ref2.to_str().unwrap()]).unwrap();
    bd(&["verify", "--repo", r, "-q"]);
    for (id, reference) in [("0001", &ref1), ("0002", &ref2)] {
        let out = dir.join(format!("restored-{id}.raw"));
        bd(&[
            "restore",
            "--repo",
            r,
            "--disk",
            "disk0",
            "--at",
            id,
            "--to",
            out.to_str().unwrap(),
            "-q",
        ]);
        qemu_img([
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            out.to_str().unwrap(),
            reference.to_str().unwrap(),
        ])
        .unwrap();
    }
}
