//! `blockdelta backup --qmp SOCKET --node NODE` (push mode) against qemu-storage-daemon
//! and `blockdelta serve`: a full backup and incrementals while the disk is written
//! through NBD, restores of every point in time compared with copies of the disk taken
//! at that moment, and clients killed at random moments: `verify` accepts the repository
//! after each, and a final backup restores to the disk, so no write since the last good
//! backup left the bitmap.
//!
//! Fails, never skips, when a tool is missing (`scripts/test` installs them).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use testkit::SplitMix64;
use testkit::serde_json::{self, Value, json};

mod common_push;
use common_push::{Daemon, Kind, MIB, bd, compare, ok, push, restore_and_compare, s};

/// Full backup, then two incrementals, with writes, zero writes and discards between;
/// restores of each point in time equal the copies taken then; incrementals copy only
/// the dirty clusters; the daemon keeps exactly `b0` (no safety bitmap is left).
fn story(kind: Kind) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let repo = dir.join("repo");
    let mut d = Daemon::start(kind, dir, 128);
    d.io(&["write -P 1 0 8M".into(), "write -P 2 40M 3M".into(), "write -P 3 100M 64k".into()]);
    let full = push(&d, &repo, true);
    assert_eq!(full["kind"], "full");
    assert_eq!(full["bytes-copied"], 11 * MIB + 64 * 1024);
    d.reference(&dir.join("ref1.qcow2"));
    assert_eq!(d.bitmaps(), vec!["b0"]);

    d.io(&[
        "write -P 4 1M 1M".into(),
        "write -P 5 70M 4k".into(),
        "write -z 41M 512k".into(),
        "discard 100M 64k".into(),
    ]);
    let inc1 = push(&d, &repo, false);
    assert_eq!(inc1["parent"], "0001");
    // 1 MiB + one 64 KiB cluster of data; the zeroed and discarded clusters are zero
    // clusters in the image, not data.
    assert_eq!(inc1["bytes-copied"], MIB + 64 * 1024, "{inc1}");
    d.reference(&dir.join("ref2.qcow2"));

    d.io(&["write -P 6 127M 1M".into(), "write -P 7 3M 128k".into()]);
    let inc2 = push(&d, &repo, false);
    assert_eq!(inc2["parent"], "0002");
    assert_eq!(inc2["bytes-copied"], MIB + 128 * 1024, "{inc2}");
    d.reference(&dir.join("ref3.qcow2"));
    assert_eq!(d.bitmaps(), vec!["b0"]);

    ok(bd().args(["verify", "--repo", s(&repo)]).output().unwrap());
    for (id, r) in [("0001", "ref1"), ("0002", "ref2"), ("0003", "ref3")] {
        restore_and_compare(&repo, id, &dir.join(format!("{r}.qcow2")), dir);
    }
    assert!(scratch_images(&repo).is_empty(), "{:?}", scratch_images(&repo));
    // A second full backup starts a new chain and clears b0 at its point in time.
    d.io(&["write -P 8 50M 1M".into()]);
    let full2 = push(&d, &repo, true);
    assert_eq!(full2["kind"], "full");
    d.io(&["write -P 9 60M 64k".into()]);
    let inc3 = push(&d, &repo, false);
    assert_eq!(inc3["parent"], "0004");
    assert_eq!(inc3["bytes-copied"], 64 * 1024);
    d.reference(&dir.join("ref5.qcow2"));
    restore_and_compare(&repo, "0005", &dir.join("ref5.qcow2"), dir);
}

#[test]
fn push_to_qemu_storage_daemon() {
    story(Kind::Qsd);
}

#[test]
fn push_to_blockdelta_serve() {
    story(Kind::Serve);
}

/// Refusals change nothing: an incremental without a bitmap, or into an empty
/// repository; a failing transaction leaves no node or file behind.
#[test]
fn refusals_leave_daemon_and_repository_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let repo = dir.join("repo");
    let mut d = Daemon::start(Kind::Serve, dir, 16);
    let qmp = d.qmp.clone();
    let base = ["backup", "--qmp", s(&qmp), "--node", "disk0", "--repo", s(&repo)];
    let out = bd().args(base).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("take a full backup first"));
    ok(bd().args(base).args(["--full", "-q"]).output().unwrap());
    let out = bd().args(base).args(["--bitmap", "nope"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no dirty bitmap 'nope'"));
    let out = bd()
        .args(["backup", "--qmp", s(&qmp), "--node", "nonode", "--repo", s(&repo)])
        .args(["--disk", "disk0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no block node 'nonode'"));
    // The bitmap busy (exported): the transaction fails; the target is removed again.
    d.with_qmp(|q| {
        q.execute_ok(
            "block-export-add",
            json!({"type": "nbd", "id": "e1", "node-name": "disk0", "name": "x",
                   "writable": true, "bitmaps": ["blockdelta"]}),
        );
    });
    let out = bd().args(base).output().unwrap();
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(scratch_images(&repo).is_empty(), "{:?}", scratch_images(&repo));
    assert!(!repo.join("backups/disk0/0002.idx").exists());
    let nodes = d.with_qmp(|q| q.execute_ok("query-named-block-nodes", Value::Null));
    assert!(!nodes.to_string().contains("bdt-"), "{nodes}");
    assert_eq!(d.bitmaps(), vec!["blockdelta"]);
    d.with_qmp(|q| q.execute_ok("block-export-del", json!({"id": "e1"})));
    ok(bd().args(["verify", "--repo", s(&repo)]).output().unwrap());
}

/// Clients killed at random moments, with new writes before each: `verify` accepts the
/// repository every time; every backup that was committed restores to the disk as it
/// was when its client started; a final backup restores to the disk as it is, so the
/// bitmap kept every write since the last committed backup; no safety bitmap, orphan
/// job or node is left.
fn killed(kind: Kind, rounds: u64) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let repo = dir.join("repo");
    let mut d = Daemon::start(kind, dir, 96);
    let mut cmds = Vec::new();
    for i in 0..40u64 {
        cmds.push(format!("write -P {} {} 1M", i + 1, i * 2 * MIB + MIB));
    }
    d.io(&cmds);
    let qmp = d.qmp.clone();
    let args = |full: bool| {
        let mut a = vec!["backup", "--qmp", s(&qmp), "--node", "disk0", "--repo", s(&repo)]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>();
        a.extend(["--bitmap".into(), "b0".into(), "-q".into()]);
        if full {
            a.push("--full".into());
        }
        a
    };
    let t = Instant::now();
    ok(bd().args(args(true)).output().unwrap());
    let full_time = t.elapsed();
    d.io(&["write -P 200 5M 2M".into()]);
    let t = Instant::now();
    ok(bd().args(args(false)).output().unwrap());
    let inc_time = t.elapsed();

    let mut rng = SplitMix64(7 + kind as u64);
    let mut references: Vec<(String, PathBuf)> = Vec::new();
    let (mut interrupted, mut pending_seen) = (0, 0);
    let mut reach = 1.5f64;
    // Kill until `rounds` clients were really interrupted (a kill after the end does not
    // count), with a bound so that a machine too fast or too slow cannot loop.
    let mut round = 0;
    while interrupted < rounds && round < rounds * 4 {
        round += 1;
        // New writes, so that losing any bit shows in the final comparison.
        let mut w = Vec::new();
        for _ in 0..3 {
            let off = rng.up_to(95 * 16) * 64 * 1024 + rng.up_to(7) * 4096;
            w.push(format!("write -P {} {off} {}", 1 + rng.up_to(250), 4096 * (1 + rng.up_to(40))));
        }
        d.io(&w);
        let reference = dir.join(format!("ref-round{round}.qcow2"));
        d.reference(&reference);
        let next_id = format!(
            "{:04}",
            std::fs::read_dir(repo.join("backups/disk0"))
                .unwrap()
                .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".idx"))
                .count()
                + 1
        );
        let full = round % 5 == 0;
        let mut child =
            bd().args(args(full)).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let time = if full { full_time } else { inc_time };
        // Up to `reach` times the first uninterrupted run's time (1.5 at first: recovery
        // of the previous kill makes runs longer). Run times vary (checkpoints, load), so
        // a client that finished before its kill shortens the window, and one killed
        // lengthens it again, up to 1.5: kills keep landing inside runs.
        let micros = rng.up_to((time.as_micros() as f64 * reach) as u64 + 1);
        std::thread::sleep(Duration::from_micros(micros));
        child.kill().unwrap();
        if child.wait().unwrap().success() {
            reach *= 0.8;
        } else {
            interrupted += 1;
            reach = (reach * 1.1).min(1.5);
        }
        if repo.join("backups/disk0").join(format!("{next_id}.idx")).exists() {
            references.push((next_id, reference));
        }
        if d.bitmaps().iter().any(|b| b.starts_with("blockdelta-pending/")) {
            pending_seen += 1;
        }
        let out = bd().args(["verify", "--repo", s(&repo)]).output().unwrap();
        assert!(
            out.status.success(),
            "{kind:?} round {round} (killed after {micros} µs): verify failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!(
        "{kind:?}: {interrupted} of {round} clients interrupted, {pending_seen} left a safety \
         bitmap, {} committed",
        references.len()
    );
    assert!(interrupted >= rounds, "only {interrupted} of {round} backups were interrupted");
    assert!(pending_seen >= 1, "no kill landed between the transaction and the commit");

    // The final backup holds every write: restore equals the disk now.
    d.io(&["write -P 251 90M 64k".into()]);
    ok(bd().args(args(false)).output().unwrap());
    ok(bd().args(["verify", "--repo", s(&repo)]).output().unwrap());
    let now = dir.join("ref-final.qcow2");
    d.reference(&now);
    let raw = dir.join("final.raw");
    ok(bd()
        .args(["restore", "--repo", s(&repo), "--disk", "disk0", "--to", s(&raw), "-q"])
        .output()
        .unwrap());
    compare(&raw, &now);
    for (id, r) in &references {
        restore_and_compare(&repo, id, r, dir);
    }
    assert_eq!(d.bitmaps(), vec!["b0"]);
    let (jobs, nodes) = d.with_qmp(|q| {
        (
            q.execute_ok("query-jobs", Value::Null),
            q.execute_ok("query-named-block-nodes", Value::Null),
        )
    });
    assert_eq!(jobs, json!([]));
    assert!(!nodes.to_string().contains("bdt-"), "{nodes}");
    // The last backup removed the scratch images killed clients left.
    assert!(scratch_images(&repo).is_empty(), "{:?}", scratch_images(&repo));
}

/// The push scratch images in the repository's default scratch directory.
fn scratch_images(repo: &std::path::Path) -> Vec<PathBuf> {
    match std::fs::read_dir(repo.join(".push")) {
        Ok(d) => d.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}

#[test]
fn killed_push_backups_never_lose_a_write_blockdelta_serve() {
    killed(Kind::Serve, 20);
}

#[test]
fn killed_push_backups_never_lose_a_write_qemu_storage_daemon() {
    killed(Kind::Qsd, 20);
}

/// The bitmap a push `--full` adds is persistent on qcow2: after a clean restart of the
/// daemon the next incremental still has it, copies only what changed, and restores to
/// the disk at that point.
fn chain_survives_restart(kind: Kind) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let repo = dir.join("repo");
    let d = Daemon::start(kind, dir, 64);
    d.io(&["write -P 1 0 4M".into()]);
    push(&d, &repo, true);
    d.io(&["write -P 2 10M 64k".into()]);
    drop(d); // quit: the bitmap is stored in the image
    let mut d = Daemon::open(kind, dir);
    assert_eq!(d.bitmaps(), vec!["b0"], "{kind:?}");
    d.io(&["write -P 3 20M 64k".into()]);
    let inc = push(&d, &repo, false);
    assert_eq!(inc["bytes-copied"], 2 * 64 * 1024, "{kind:?}: {inc}");
    d.reference(&dir.join("ref.qcow2"));
    restore_and_compare(&repo, "0002", &dir.join("ref.qcow2"), dir);
}

#[test]
fn chain_survives_restart_of_blockdelta_serve() {
    chain_survives_restart(Kind::Serve);
}

#[test]
fn chain_survives_restart_of_qemu_storage_daemon() {
    chain_survives_restart(Kind::Qsd);
}

/// `--speed` reaches the daemon's job: an incremental of 2 MiB at 1 MiB/s cannot finish
/// in under a second (a lower bound the rate limit guarantees, not a timing goal).
#[test]
fn push_speed_limits_the_job() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let repo = dir.join("repo");
    let d = Daemon::start(Kind::Serve, dir, 64);
    push(&d, &repo, true);
    d.io(&["write -P 5 8M 2M".into()]);
    let started = std::time::Instant::now();
    let out = bd()
        .args(["backup", "--qmp", s(&d.qmp), "--node", "disk0", "--repo", s(&repo)])
        .args(["--bitmap", "b0", "--speed", "1048576", "--json"])
        .output()
        .unwrap();
    let inc: Value = serde_json::from_str(&ok(out)).unwrap();
    assert_eq!(inc["bytes-copied"], 2 * MIB);
    assert!(started.elapsed() >= std::time::Duration::from_secs(1), "{:?}", started.elapsed());
}
