//! Push backups after a daemon crash, against qemu-storage-daemon and `blockdelta
//! serve`: a persistent bitmap found in use when the daemon restarts is inconsistent
//! (for `blockdelta serve`, whose bitmaps are crash-safe, once another program wrote
//! the image after the crash; without that its chain just goes on, see
//! `serve_crash_keeps_the_chain`);
//! an incremental then fails plainly and changes nothing, `--full` replaces the bitmap
//! at its instant, and the chain goes on. Recovery never merges bits it cannot trust:
//! an inconsistent safety bitmap, or a fresh one of an interrupted full backup, makes
//! the next backup full. Pull mode: the daemon refuses to export the inconsistent
//! bitmap, and the client's message says to take a full backup.
//!
//! Fails, never skips, when a tool is missing (`scripts/test` installs them).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use testkit::qmp::QmpClient;
use testkit::serde_json::{self, Value, json};

mod common_push;
use common_push::{Daemon, Kind, SPARE_QMP, bd, ok, restore_and_compare, s};

const BITMAP: &str = "blockdelta";

/// `blockdelta backup` in push mode of `disk0` with the default bitmap.
fn backup(d: &Daemon, repo: &Path, extra: &[&str]) -> Output {
    bd().args(["backup", "--qmp", s(&d.qmp), "--node", "disk0", "--repo", s(repo)])
        .args(extra)
        .output()
        .unwrap()
}

fn backup_json(d: &Daemon, repo: &Path, full: bool) -> Value {
    let mut extra = vec!["--json"];
    if full {
        extra.push("--full");
    }
    serde_json::from_str(&ok(backup(d, repo, &extra))).unwrap()
}

/// The stderr of a run that must fail.
fn fails(out: Output) -> String {
    assert!(
        !out.status.success(),
        "expected a failure\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stderr).unwrap()
}

fn assert_contains(text: &str, parts: &[&str]) {
    for p in parts {
        assert!(text.contains(p), "{p:?} missing from: {text}");
    }
}

/// The record of bitmap `name` of `disk0`.
fn record(d: &mut Daemon, name: &str) -> Option<Value> {
    d.bitmap_records().into_iter().find(|b| b["name"] == name)
}

fn is_inconsistent(b: &Value) -> bool {
    b["inconsistent"] == true
}

/// Everything a refused backup must leave as it was.
#[derive(Debug, PartialEq)]
struct State {
    /// The disk's bitmap records (bits count, recording, inconsistent, ...).
    bitmaps: Vec<Value>,
    jobs: Value,
    /// Every node name, sorted.
    nodes: Vec<String>,
    /// Every file of the repository's disk directory, with its contents.
    files: BTreeMap<String, Vec<u8>>,
    /// `blockdelta list --json`.
    list: String,
}

/// Every object of the repository (not its locks, temporaries or scratch images) with
/// its contents, by path relative to the repository.
fn objects(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        if e.path().is_dir() {
            objects(root, &e.path(), out);
        } else {
            let rel = e.path().strip_prefix(root).unwrap().display().to_string();
            out.insert(rel, std::fs::read(e.path()).unwrap());
        }
    }
}

fn state(d: &mut Daemon, repo: &Path) -> State {
    let bitmaps = d.bitmap_records();
    let (jobs, nodes) = d.with_qmp(|q| {
        (
            q.execute_ok("query-jobs", Value::Null),
            q.execute_ok("query-named-block-nodes", Value::Null),
        )
    });
    let mut names: Vec<String> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node-name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    let mut files = BTreeMap::new();
    objects(repo, repo, &mut files);
    let list = ok(bd().args(["list", "--repo", s(repo), "--json"]).output().unwrap());
    State { bitmaps, jobs, nodes: names, files, list }
}

/// Full backup 0001 of a disk with data, a clean restart (the bitmap is stored), a
/// write, a crash and a restart: the bitmap is inconsistent. Returns the daemon and
/// the copy of the disk at 0001.
fn crashed_after_full(kind: Kind, dir: &Path, repo: &Path, write_before_crash: bool) -> Daemon {
    let d = Daemon::start(kind, dir, 64);
    d.io(&["write -P 1 0 4M".into(), "write -P 2 20M 1M".into()]);
    let full = backup_json(&d, repo, true);
    assert_eq!(full["kind"], "full");
    assert_eq!(full["bitmap"], BITMAP);
    d.reference(&dir.join("ref-0001.qcow2"));
    d.quit();
    let mut d = Daemon::open(kind, dir);
    let b = record(&mut d, BITMAP).expect("the bitmap survives a clean restart");
    assert!(!is_inconsistent(&b) && b["persistent"] == true && b["recording"] == true, "{b}");
    if write_before_crash {
        // Tracked only in memory: the crash loses it from the bitmap, not from the disk.
        d.io(&["write -P 3 8M 2M".into()]);
    }
    d.kill();
    Daemon::foreign_open(dir);
    let mut d = Daemon::open(kind, dir);
    let b = record(&mut d, BITMAP).expect("the bitmap is still in the image");
    assert!(is_inconsistent(&b), "{kind:?}: {b}");
    d
}

/// The whole story: crash, refused incremental that changes nothing, `--full`, more
/// incrementals (one after a clean restart), verify, restore of every point in time.
fn crash_story(kind: Kind) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let repo = dir.join("repo");
    let mut d = crashed_after_full(kind, dir, &repo, true);

    let before = state(&mut d, &repo);
    let err = fails(backup(&d, &repo, &[]));
    assert_contains(
        &err,
        &[
            "change tracking was lost",
            "'blockdelta'",
            "inconsistent",
            "the daemon stopped without saving it",
            "take a full backup (--full)",
        ],
    );
    assert_eq!(state(&mut d, &repo), before, "{kind:?}: a refused incremental changed something");
    // The same in JSON mode: a failure is a failure.
    fails(backup(&d, &repo, &["--json"]));
    assert_eq!(state(&mut d, &repo), before);

    // --full replaces the bitmap at its instant.
    let full = backup_json(&d, &repo, true);
    assert_eq!((full["id"].as_str(), full["kind"].as_str()), (Some("0002"), Some("full")));
    assert_eq!(full["parent"], Value::Null);
    d.reference(&dir.join("ref-0002.qcow2"));
    let records = d.bitmap_records();
    assert_eq!(records.len(), 1, "{records:?}");
    let b = &records[0];
    assert!(b["name"] == BITMAP && !is_inconsistent(b), "{b}");
    assert!(b["persistent"] == true && b["recording"] == true && b["granularity"] == 65536, "{b}");
    assert_eq!(b["count"], 0, "nothing was written since the full backup: {b}");

    // The new bitmap holds exactly the writes after the full backup.
    d.io(&["write -P 4 30M 64k".into(), "write -P 5 1M 128k".into()]);
    let inc = backup_json(&d, &repo, false);
    assert_eq!((inc["id"].as_str(), inc["parent"].as_str()), (Some("0003"), Some("0002")));
    assert_eq!(inc["bytes-copied"], 192 * 1024, "{inc}");
    d.reference(&dir.join("ref-0003.qcow2"));

    // It is persistent: the chain survives a clean restart again.
    d.io(&["write -P 6 40M 64k".into()]);
    d.quit();
    let mut d = Daemon::open(kind, dir);
    assert!(!is_inconsistent(&record(&mut d, BITMAP).unwrap()));
    d.io(&["write -P 7 50M 64k".into()]);
    let inc = backup_json(&d, &repo, false);
    assert_eq!((inc["id"].as_str(), inc["parent"].as_str()), (Some("0004"), Some("0003")));
    assert_eq!(inc["bytes-copied"], 128 * 1024, "{inc}");
    d.reference(&dir.join("ref-0004.qcow2"));
    assert_eq!(d.bitmaps(), vec![BITMAP]);

    ok(bd().args(["verify", "--repo", s(&repo)]).output().unwrap());
    for id in ["0001", "0002", "0003", "0004"] {
        restore_and_compare(&repo, id, &dir.join(format!("ref-{id}.qcow2")), dir);
    }
}

#[test]
fn crash_then_full_then_incrementals_qemu_storage_daemon() {
    crash_story(Kind::Qsd);
}

#[test]
fn crash_then_full_then_incrementals_blockdelta_serve() {
    crash_story(Kind::Serve);
}

/// A `--full` after a crash whose client is killed while its job runs, once the new
/// bitmap and its fresh safety bitmap exist: the new bitmap only tracks writes since
/// that uncommitted full backup, so recovery must not let an incremental build on
/// backup 0001 with it. The next incremental fails plainly and removes both bitmaps;
/// a full backup then starts again. With `full_next`, the next run is that full backup
/// itself: it cancels the orphan job, whose id (backup 0002's) it reuses, and must not
/// take the orphan's cancellation for the end of its own job.
fn killed_full_after_crash(kind: Kind, full_next: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let repo = dir.join("repo");
    let d = crashed_after_full(kind, dir, &repo, true);
    d.quit(); // the inconsistent bitmap stays in use on disk: still inconsistent next time
    let mut d = Daemon::open_with_spare_monitor(kind, dir);
    assert!(is_inconsistent(&record(&mut d, BITMAP).unwrap()));
    // Data enough for a job of several seconds at 1 MiB/s.
    d.io(&["write -P 8 32M 16M".into()]);

    let mut child = bd()
        .args(["backup", "--qmp", s(&d.qmp), "--node", "disk0", "--repo", s(&repo)])
        .args(["--full", "--speed", "1048576", "-q"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut spare = QmpClient::connect(dir.join(SPARE_QMP), Duration::from_secs(10)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let seen = loop {
        let nodes = spare.execute("query-named-block-nodes", Value::Null).unwrap();
        let disk = nodes.as_array().unwrap().iter().find(|n| n["node-name"] == "disk0").unwrap();
        let bitmaps = disk["dirty-bitmaps"].as_array().cloned().unwrap_or_default();
        let jobs = spare.execute("query-jobs", Value::Null).unwrap();
        let running = jobs.as_array().unwrap().iter().any(|j| j["status"] == "running");
        let new_name = bitmaps.iter().any(|b| b["name"] == BITMAP && !is_inconsistent(b));
        let fresh = bitmaps.iter().any(|b| {
            b["name"].as_str().is_some_and(|n| {
                n.starts_with("blockdelta-pending/disk0/0002/") && n.ends_with("-fresh/blockdelta")
            })
        });
        if running && new_name && fresh {
            break bitmaps;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{kind:?}: the client ended ({status}) before it could be killed: {bitmaps:?}");
        }
        assert!(Instant::now() < deadline, "{kind:?}: never saw the job running: {bitmaps:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    child.kill().unwrap();
    assert!(!child.wait().unwrap().success());
    drop(spare);
    assert!(!repo.join("backups/disk0/0002.idx").exists(), "{seen:?}");

    if !full_next {
        refused_after_killed_full(kind, &mut d, &repo);
    }
    let full = backup_json(&d, &repo, true);
    assert_eq!((full["id"].as_str(), full["kind"].as_str()), (Some("0002"), Some("full")));
    d.reference(&dir.join("ref-0002.qcow2"));
    d.io(&["write -P 9 60M 64k".into()]);
    let inc = backup_json(&d, &repo, false);
    assert_eq!(inc["parent"], "0002");
    assert_eq!(inc["bytes-copied"], 64 * 1024, "{inc}");
    d.reference(&dir.join("ref-0003.qcow2"));
    assert_eq!(d.bitmaps(), vec![BITMAP]);
    ok(bd().args(["verify", "--repo", s(&repo)]).output().unwrap());
    for id in ["0001", "0002", "0003"] {
        restore_and_compare(&repo, id, &dir.join(format!("ref-{id}.qcow2")), dir);
    }
    let scratch: Vec<_> =
        std::fs::read_dir(repo.join(".push")).map(|d| d.collect()).unwrap_or_default();
    assert!(scratch.is_empty(), "leftovers: {scratch:?}");
}

/// After the killed full backup: an incremental is refused, says why, and leaves no
/// bitmap that could be trusted.
fn refused_after_killed_full(kind: Kind, d: &mut Daemon, repo: &Path) {
    let err = fails(backup(d, repo, &[]));
    assert_contains(
        &err,
        &[
            "change tracking was lost",
            "full backup 0002 was interrupted before it was committed",
            "take a full backup (--full)",
        ],
    );
    // Both bitmaps are gone (the job was cancelled, its target deleted): nothing left
    // that an incremental could trust.
    assert_eq!(d.bitmaps(), Vec::<String>::new(), "{kind:?}");
    let (jobs, nodes) = d.with_qmp(|q| {
        (
            q.execute_ok("query-jobs", Value::Null),
            q.execute_ok("query-named-block-nodes", Value::Null),
        )
    });
    assert_eq!(jobs, json!([]));
    assert!(!nodes.to_string().contains("bdt-"), "{nodes}");
    // And it stays refused.
    let err = fails(backup(d, repo, &[]));
    assert_contains(&err, &["no dirty bitmap 'blockdelta'", "take a full backup (--full)"]);
}

#[test]
fn killed_full_after_crash_is_never_merged_back_qemu_storage_daemon() {
    killed_full_after_crash(Kind::Qsd, false);
}

#[test]
fn killed_full_after_crash_is_never_merged_back_blockdelta_serve() {
    killed_full_after_crash(Kind::Serve, false);
}

#[test]
fn full_right_after_a_killed_full_qemu_storage_daemon() {
    killed_full_after_crash(Kind::Qsd, true);
}

#[test]
fn full_right_after_a_killed_full_blockdelta_serve() {
    killed_full_after_crash(Kind::Serve, true);
}

const SAFETY: &str = "blockdelta-pending/disk0/0002/1.1/blockdelta";

/// A safety bitmap left by a client killed after its transaction (made here by hand,
/// as that client would: NAME's granularity and persistence, NAME merged in), stored
/// by a clean stop, then a crash: it is inconsistent, so recovery cannot merge it back.
/// With NAME inconsistent too, NAME is left as it is (unusable); with NAME re-created
/// by hand (consistent but missing the lost bits), NAME is removed. Either way the next
/// incremental fails and says why, and a full backup starts again.
fn inconsistent_safety_bitmap(kind: Kind, recreate_name: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let repo = dir.join("repo");
    let mut d = Daemon::start(kind, dir, 64);
    d.io(&["write -P 1 0 4M".into()]);
    backup_json(&d, &repo, true);
    d.io(&["write -P 2 8M 64k".into()]);
    d.with_qmp(|q| {
        q.execute_ok(
            "transaction",
            json!({"actions": [
                {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": SAFETY,
                    "granularity": 65536, "persistent": true}},
                {"type": "block-dirty-bitmap-merge", "data": {"node": "disk0",
                    "target": SAFETY, "bitmaps": [BITMAP]}}]}),
        );
    });
    d.quit();
    let d = Daemon::open(kind, dir);
    d.io(&["write -P 3 12M 64k".into()]);
    d.kill();
    Daemon::foreign_open(dir);
    let mut d = Daemon::open(kind, dir);
    let records = d.bitmap_records();
    assert_eq!(records.len(), 2, "{records:?}");
    assert!(records.iter().all(is_inconsistent), "{kind:?}: {records:?}");
    if recreate_name {
        d.with_qmp(|q| {
            q.execute_ok("block-dirty-bitmap-remove", json!({"node": "disk0", "name": BITMAP}));
            q.execute_ok(
                "block-dirty-bitmap-add",
                json!({"node": "disk0", "name": BITMAP, "persistent": true}),
            );
        });
    }

    let err = fails(backup(&d, &repo, &[]));
    assert_contains(
        &err,
        &[
            "change tracking was lost",
            &format!("safety bitmap '{SAFETY}' of an interrupted backup is inconsistent"),
            "take a full backup (--full)",
        ],
    );
    let records = d.bitmap_records();
    if recreate_name {
        assert_eq!(records, Vec::<Value>::new(), "{kind:?}: NAME must be removed");
        let err = fails(backup(&d, &repo, &[]));
        assert_contains(&err, &["no dirty bitmap 'blockdelta'", "--full"]);
    } else {
        assert_eq!(records.len(), 1, "{records:?}");
        assert!(records[0]["name"] == BITMAP && is_inconsistent(&records[0]), "{records:?}");
        let err = fails(backup(&d, &repo, &[]));
        assert_contains(&err, &["change tracking was lost", "is inconsistent", "--full"]);
    }

    let full = backup_json(&d, &repo, true);
    assert_eq!((full["id"].as_str(), full["kind"].as_str()), (Some("0002"), Some("full")));
    d.io(&["write -P 4 16M 64k".into()]);
    let inc = backup_json(&d, &repo, false);
    assert_eq!(inc["bytes-copied"], 64 * 1024, "{inc}");
    d.reference(&dir.join("ref-0003.qcow2"));
    restore_and_compare(&repo, "0003", &dir.join("ref-0003.qcow2"), dir);
    assert_eq!(d.bitmaps(), vec![BITMAP]);
    ok(bd().args(["verify", "--repo", s(&repo)]).output().unwrap());
}

#[test]
fn inconsistent_safety_bitmap_makes_the_next_backup_full_qemu_storage_daemon() {
    inconsistent_safety_bitmap(Kind::Qsd, false);
    inconsistent_safety_bitmap(Kind::Qsd, true);
}

#[test]
fn inconsistent_safety_bitmap_makes_the_next_backup_full_blockdelta_serve() {
    inconsistent_safety_bitmap(Kind::Serve, false);
    inconsistent_safety_bitmap(Kind::Serve, true);
}

/// The other way round: NAME inconsistent, but a consistent safety bitmap holds every
/// write since the newest backup (here: a crash with no write since backup 0001, then a
/// safety bitmap added, as a client killed after its transaction leaves it, and a
/// write). Recovery rebuilds NAME from it and the incremental holds exactly that write.
fn consistent_safety_bitmap_rebuilds_name(kind: Kind) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let repo = dir.join("repo");
    let mut d = crashed_after_full(kind, dir, &repo, false);
    d.with_qmp(|q| {
        q.execute_ok(
            "block-dirty-bitmap-add",
            json!({"node": "disk0", "name": SAFETY, "granularity": 65536, "persistent": true}),
        );
    });
    d.io(&["write -P 5 24M 128k".into()]);
    let out = backup(&d, &repo, &["--json"]);
    let inc: Value = serde_json::from_str(&ok(out)).unwrap();
    assert_eq!(inc["parent"], "0001");
    assert_eq!(inc["bytes-copied"], 128 * 1024, "{inc}");
    let recovered = inc["recovered"].to_string();
    assert_contains(&recovered, &[&format!("merged back from {SAFETY}")]);
    d.reference(&dir.join("ref-0002.qcow2"));
    let records = d.bitmap_records();
    assert_eq!(records.len(), 1, "{records:?}");
    assert!(records[0]["name"] == BITMAP && !is_inconsistent(&records[0]), "{records:?}");
    ok(bd().args(["verify", "--repo", s(&repo)]).output().unwrap());
    restore_and_compare(&repo, "0001", &dir.join("ref-0001.qcow2"), dir);
    restore_and_compare(&repo, "0002", &dir.join("ref-0002.qcow2"), dir);
}

#[test]
fn consistent_safety_bitmap_rebuilds_inconsistent_bitmap_qemu_storage_daemon() {
    consistent_safety_bitmap_rebuilds_name(Kind::Qsd);
}

#[test]
fn consistent_safety_bitmap_rebuilds_inconsistent_bitmap_blockdelta_serve() {
    consistent_safety_bitmap_rebuilds_name(Kind::Serve);
}

/// Pull mode after a crash: the daemon refuses to export the inconsistent bitmap; over
/// an export without it, an incremental fails and says to take a full backup, and a
/// full backup that names the bitmap says to export it or leave it out; the repository
/// is unchanged.
fn pull_after_crash(kind: Kind) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let repo = dir.join("repo");
    let mut d = crashed_after_full(kind, dir, &repo, true);
    let refused = d.with_qmp(|q| {
        q.qmp().execute(
            "block-export-add",
            json!({"type": "nbd", "id": "pull", "node-name": "disk0", "name": "pull",
                   "bitmaps": [BITMAP]}),
        )
    });
    let e = refused.expect_err("an inconsistent bitmap was exported");
    assert!(e.desc.contains("inconsistent"), "{kind:?}: {e}");
    d.with_qmp(|q| {
        q.execute_ok(
            "block-export-add",
            json!({"type": "nbd", "id": "pull", "node-name": "disk0", "name": "pull"}),
        )
    });
    let before = state(&mut d, &repo);
    let uri = d.uri.replace("///disk0?", "///pull?");
    let pull = |extra: &[&str]| {
        bd().args(["backup", "--from", &uri, "--bitmap", BITMAP, "--disk", "disk0"])
            .args(["--repo", s(&repo)])
            .args(extra)
            .output()
            .unwrap()
    };
    let err = fails(pull(&[]));
    assert_contains(
        &err,
        &[
            "no dirty bitmap 'blockdelta'",
            "qemu:dirty-bitmap:blockdelta",
            "inconsistent",
            "change tracking was lost",
            "take a full backup (--full)",
        ],
    );
    let err = fails(pull(&["--full"]));
    assert_contains(&err, &["no dirty bitmap 'blockdelta'", "leave out --bitmap"]);
    assert_eq!(state(&mut d, &repo), before);
    d.with_qmp(|q| q.execute_ok("block-export-del", json!({"id": "pull"})));
}

#[test]
fn pull_after_crash_qemu_storage_daemon() {
    pull_after_crash(Kind::Qsd);
}

#[test]
fn pull_after_crash_blockdelta_serve() {
    pull_after_crash(Kind::Serve);
}

/// `blockdelta serve`'s bitmaps are crash-safe: full backup, writes, `kill -9`, restart,
/// and the next backup is an incremental that holds every write since the full one
/// (restored, it equals the disk), with no full backup in between.
#[test]
fn serve_crash_keeps_the_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let repo = dir.join("repo");
    let d = Daemon::start(Kind::Serve, dir, 64);
    d.io(&["write -P 1 0 4M".into()]);
    assert_eq!(backup_json(&d, &repo, true)["kind"], "full");
    let crash_safe = |d: &mut Daemon| {
        d.with_qmp(|q| q.execute_ok("x-blockdelta-query-crash-safe", json!({"node": "disk0"})))
    };
    // The client's bitmap is crash-safe by default; one added with x-crash-safe=false
    // is not.
    let mut d = d;
    d.with_qmp(|q| {
        q.execute_ok(
            "block-dirty-bitmap-add",
            json!({"node": "disk0", "name": "plain", "persistent": true, "x-crash-safe": false}),
        )
    });
    assert_eq!(
        crash_safe(&mut d),
        json!([{"name": BITMAP, "intent-granularity": 16 * MIB, "stored": true}])
    );
    d.io(&["write -P 2 8M 1M".into(), "write -P 3 40M 64k".into()]);
    d.kill();
    let mut d = Daemon::open(Kind::Serve, dir);
    let b = record(&mut d, BITMAP).expect("the bitmap survives the crash");
    assert!(!is_inconsistent(&b) && b["recording"] == true, "{b}");
    let inc = backup_json(&d, &repo, false);
    assert_eq!(inc["kind"], "incremental", "{inc}");
    assert_eq!(inc["parent"], "0001", "{inc}");
    // At least what was written; at most the regions marked (16 MiB each, two here).
    let copied = inc["bytes-copied"].as_u64().unwrap();
    assert!((MIB + 64 * 1024..=32 * MIB).contains(&copied), "{inc}");
    d.reference(&dir.join("ref-0002.qcow2"));
    restore_and_compare(&repo, "0002", &dir.join("ref-0002.qcow2"), dir);
    ok(bd().args(["verify", "--repo", s(&repo)]).output().unwrap());
}

const MIB: u64 = 1 << 20;
