//! `blockdelta backup` (pull mode), `restore`, `verify` and `list` against real NBD
//! servers: qemu-storage-daemon, `qemu-nbd -B` and `blockdelta serve`. Restored images
//! are compared with copies of the disk taken at each backup's point in time
//! (`qemu-img compare`); incrementals must read only the dirty granules; a damaged
//! repository must be reported naming the object and left unchanged; backups killed at
//! random moments must never leave a repository that `verify` rejects.
//!
//! Fails, never skips, when a tool is missing (`scripts/test` installs them).

use std::collections::BTreeMap;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use testkit::qsd::{DaemonBuilder, StorageDaemon};
use testkit::serde_json::{self, Value};
use testkit::{SplitMix64, qemu_img, qemu_io, require_tool};

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

fn bd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_blockdelta"))
}

fn run_bd(args: &[&str]) -> Output {
    bd().args(args).output().unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// An NBD server exporting `image` (qcow2) read-only as export `disk0` with `bitmaps`.
enum Server {
    Daemon(Box<StorageDaemon>),
    Nbd(Child),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Qsd,
    QemuNbd,
    Serve,
}

struct Running {
    server: Option<Server>,
    uri: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        match self.server.take() {
            Some(Server::Daemon(d)) => {
                d.quit().unwrap();
            }
            Some(Server::Nbd(mut c)) => {
                c.kill().unwrap();
                c.wait().unwrap();
            }
            None => {}
        }
    }
}

fn serve(kind: Kind, dir: &Path, image: &Path, bitmap: Option<&str>) -> Running {
    let socket = dir.join(format!("{kind:?}.sock"));
    let _ = std::fs::remove_file(&socket);
    match kind {
        Kind::Qsd | Kind::Serve => {
            let b: DaemonBuilder = match kind {
                Kind::Qsd => StorageDaemon::qemu(),
                _ => StorageDaemon::builder(env!("CARGO_BIN_EXE_blockdelta")).arg("serve"),
            };
            let mut export = "type=nbd,id=e0,node-name=disk0,name=disk0".to_string();
            if let Some(bm) = bitmap {
                export.push_str(&format!(",bitmaps.0={bm}"));
            }
            let d = b
                .arg("--blockdev")
                .arg(format!("driver=file,node-name=f0,filename={},read-only=on", s(image)))
                .arg("--blockdev")
                .arg("driver=qcow2,node-name=disk0,file=f0,read-only=on")
                .arg("--nbd-server")
                .arg(format!("addr.type=unix,addr.path={}", s(&socket)))
                .arg("--export")
                .arg(export)
                .start()
                .unwrap_or_else(|e| panic!("{kind:?}: {e:#}"));
            Running {
                server: Some(Server::Daemon(Box::new(d))),
                uri: format!("nbd+unix:///disk0?socket={}", s(&socket)),
            }
        }
        Kind::QemuNbd => {
            let mut c = Command::new(require_tool("qemu-nbd"));
            c.args(["-r", "-t", "-f", "qcow2", "-x", "disk0", "-k", s(&socket)]);
            if let Some(bm) = bitmap {
                c.args(["-B", bm]);
            }
            let child = c.arg(image).stdin(Stdio::null()).spawn().unwrap();
            let start = Instant::now();
            while !socket.exists() {
                assert!(start.elapsed() < Duration::from_secs(10), "qemu-nbd did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
            Running {
                server: Some(Server::Nbd(child)),
                uri: format!("nbd+unix:///disk0?socket={}", s(&socket)),
            }
        }
    }
}

fn qio(image: &Path, cmds: &[String]) {
    let mut args = vec!["-f".to_string(), "qcow2".to_string()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(s(image).to_string());
    qemu_io(&args).unwrap();
}

fn backup_json(uri: &str, repo: &Path, bitmap: Option<&str>, full: bool) -> Value {
    let mut args = vec!["backup", "--from", uri, "--repo", s(repo), "--json"];
    if let Some(b) = bitmap {
        args.extend(["--bitmap", b]);
    }
    if full {
        args.push("--full");
    }
    serde_json::from_str(&ok(run_bd(&args))).unwrap()
}

fn compare(restored: &Path, fmt: &str, reference: &Path) {
    let out = qemu_img(["compare", "-f", fmt, "-F", "qcow2", s(restored), s(reference)]).unwrap();
    assert!(out.contains("Images are identical"), "{out}");
}

/// The whole story against one server: full, two incrementals (writes, zero writes,
/// discards, a bitmap with 64 KiB and one with 256 KiB granularity), list, verify, and
/// restores of every point in time in both formats.
fn story(kind: Kind) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let image = dir.join("disk.qcow2");
    let repo = dir.join("repo");
    qemu_img(["create", "-q", "-f", "qcow2", s(&image), "200M"]).unwrap();
    qio(
        &image,
        &[
            "write -P 1 0 1M".into(),
            "write -P 2 10M 3M".into(),
            "write -z 20M 1M".into(),
            "write -P 5 199M 1M".into(),
        ],
    );
    qemu_img(["bitmap", "--add", s(&image), "b0"]).unwrap();
    let s0 = dir.join("s0.qcow2");
    std::fs::copy(&image, &s0).unwrap();
    {
        let r = serve(kind, dir, &image, None);
        let j = backup_json(&r.uri, &repo, None, true);
        assert_eq!(j["kind"], "full");
        assert_eq!(j["id"], "0001");
        assert_eq!(j["bytes-read"], 5 * MIB, "the full backup reads only allocated data");
    }

    // Increment 1: 64 KiB granules. Writes at unaligned offsets dirty whole granules.
    let mut rng = SplitMix64(kind as u64 + 7);
    let mut cmds = vec![
        "write -P 3 512k 64k".to_string(),
        "write -P 4 40M 100k".to_string(),
        "write -z 10M 64k".to_string(),
        "discard 11M 128k".to_string(),
    ];
    for _ in 0..40 {
        let c = rng.up_to(3200);
        cmds.push(format!("write -P {} {} 4k", 10 + c % 200, c * 64 * KIB + 4096));
    }
    qio(&image, &cmds);
    qemu_img(["bitmap", "--disable", s(&image), "b0"]).unwrap();
    qemu_img(["bitmap", "--add", "-g", "256k", s(&image), "b1"]).unwrap();
    let s1 = dir.join("s1.qcow2");
    std::fs::copy(&image, &s1).unwrap();
    {
        let r = serve(kind, dir, &image, Some("b0"));
        let dirty = dirty_bytes(&r.uri, "b0");
        let j = backup_json(&r.uri, &repo, Some("b0"), false);
        assert_eq!(j["kind"], "incremental");
        assert_eq!(j["parent"], "0001");
        let read = j["bytes-read"].as_u64().unwrap();
        assert!(read <= dirty && read > 0, "read {read} bytes, dirty granules {dirty}");
    }

    // Increment 2: 256 KiB granules, another bitmap.
    qio(
        &image,
        &[
            "write -P 7 0 4k".into(),
            "write -z 10M 2M".into(),
            "write -P 8 150M 5M".into(),
            "discard 199M 1M".into(),
        ],
    );
    qemu_img(["bitmap", "--disable", s(&image), "b1"]).unwrap();
    let s2 = dir.join("s2.qcow2");
    std::fs::copy(&image, &s2).unwrap();
    {
        let r = serve(kind, dir, &image, Some("b1"));
        let dirty = dirty_bytes(&r.uri, "b1");
        let j = backup_json(&r.uri, &repo, Some("b1"), false);
        assert_eq!(j["parent"], "0002");
        let read = j["bytes-read"].as_u64().unwrap();
        assert!(read <= dirty, "read {read} bytes, dirty granules {dirty}");
    }

    let list: Value =
        serde_json::from_str(&ok(run_bd(&["list", "--repo", s(&repo), "--json"]))).unwrap();
    let ids: Vec<_> = list["backups"].as_array().unwrap().iter().map(|b| b["id"].clone()).collect();
    assert_eq!(ids, ["0001", "0002", "0003"]);
    ok(run_bd(&["verify", "--repo", s(&repo)]));
    // Every backup is a complete index; an incremental stores only the chunks it
    // changed, and never more bytes than those chunks hold.
    let rows = list["backups"].as_array().unwrap();
    for r in rows {
        assert_eq!(r["size"], 200 * MIB);
        assert!(r["new-stored-bytes"].as_u64().unwrap() <= r["new-bytes"].as_u64().unwrap() + 4096);
    }
    assert!(rows[2]["new-chunks"].as_u64().unwrap() <= 8, "{}", rows[2]);

    for (at, reference) in [("0001", &s0), ("0002", &s1), ("0003", &s2)] {
        let raw = dir.join(format!("r{at}.raw"));
        ok(run_bd(&[
            "restore",
            "--repo",
            s(&repo),
            "--disk",
            "disk0",
            "--at",
            at,
            "--to",
            s(&raw),
            "-q",
        ]));
        compare(&raw, "raw", reference);
        // Sparse: far less allocated than the 200 MiB virtual size.
        let blocks = std::fs::metadata(&raw).unwrap().blocks() * 512;
        assert!(blocks < 20 * MIB, "{at}: {blocks} bytes allocated");
        let q = dir.join(format!("r{at}.qcow2"));
        ok(run_bd(&[
            "restore",
            "--repo",
            s(&repo),
            "--disk",
            "disk0",
            "--at",
            at,
            "--to",
            s(&q),
            "--format",
            "qcow2",
            "-q",
        ]));
        compare(&q, "qcow2", reference);
        let out = qemu_img(["check", s(&q)]).unwrap();
        assert!(out.contains("No errors"), "{out}");
    }

    // An existing file is never written without --force.
    let target = dir.join("r0003.raw");
    std::fs::write(&target, b"keep").unwrap();
    let out = run_bd(&["restore", "--repo", s(&repo), "--disk", "disk0", "--to", s(&target)]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("r0003.raw"));
    assert_eq!(std::fs::read(&target).unwrap(), b"keep");
    ok(run_bd(&["restore", "--repo", s(&repo), "--disk", "disk0", "--to", s(&target), "--force"]));
    compare(&target, "raw", &s2);
}

/// The dirty bytes of `bitmap` as the server reports them (nbdinfo --map).
fn dirty_bytes(uri: &str, bitmap: &str) -> u64 {
    let out = Command::new(require_tool("nbdinfo"))
        .args([format!("--map=qemu:dirty-bitmap:{bitmap}"), "--json".into(), uri.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"].as_u64() == Some(1))
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

#[test]
fn pull_from_qemu_storage_daemon() {
    story(Kind::Qsd);
}

#[test]
fn pull_from_qemu_nbd() {
    story(Kind::QemuNbd);
}

#[test]
fn pull_from_blockdelta_serve() {
    story(Kind::Serve);
}

/// Every file of the repository with its contents.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            m.extend(snapshot(&p));
        } else {
            m.insert(p.clone(), std::fs::read(&p).unwrap());
        }
    }
    m
}

/// A repository with a full backup and an incremental, and the image left with a
/// disabled bitmap ready for another incremental.
fn make_repo(dir: &Path) -> (PathBuf, PathBuf) {
    let image = dir.join("disk.qcow2");
    let repo = dir.join("repo");
    qemu_img(["create", "-q", "-f", "qcow2", s(&image), "130M"]).unwrap();
    qio(&image, &["write -P 1 0 2M".into(), "write -P 2 70M 1M".into()]);
    qemu_img(["bitmap", "--add", s(&image), "b0"]).unwrap();
    {
        let r = serve(Kind::Qsd, dir, &image, None);
        backup_json(&r.uri, &repo, None, true);
    }
    qio(&image, &["write -P 3 1M 64k".into(), "write -P 4 100M 64k".into()]);
    qemu_img(["bitmap", "--disable", s(&image), "b0"]).unwrap();
    {
        let r = serve(Kind::Qsd, dir, &image, Some("b0"));
        backup_json(&r.uri, &repo, Some("b0"), false);
    }
    ok(run_bd(&["verify", "--repo", s(&repo)]));
    (image, repo)
}

/// The name (hex) of the chunk that holds the disk's first MiB in `repo`: the chunk
/// whose bytes are that MiB (pattern 1 over 0..1M, 3 over 1M..1M+64k... the first
/// chunk of the default 1 MiB is all pattern 1).
fn chunk_of_first_mib(repo: &Path) -> String {
    use sha2::Digest;
    let name = repo::key::hex(&sha2::Sha256::digest(vec![1u8; MIB as usize]));
    assert!(repo.join(format!("chunks/{}/{name}", &name[..2])).exists(), "no chunk {name}");
    name
}

#[test]
fn broken_repositories_are_reported_and_left_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let (image, repo) = make_repo(tmp.path());
    // The chunk holding the first MiB of the disk, which both backups name.
    let first_chunk = chunk_of_first_mib(&repo);
    let first_chunk_key = format!("chunks/{}/{first_chunk}", &first_chunk[..2]);
    type Damage = (&'static str, &'static str, bool, fn(&Path, &str));
    // (case, what stderr names, whether an incremental backup must fail too, damage)
    let cases: [Damage; 5] = [
        ("missing chunk", "missing", false, |r, c| std::fs::remove_file(r.join(c)).unwrap()),
        ("damaged chunk", "corrupt", false, |r, c| {
            let p = r.join(c);
            let len = std::fs::metadata(&p).unwrap().len();
            let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
            f.write_all_at(b"\xee", len - 1).unwrap();
        }),
        ("truncated index", "backups/disk0/0002.idx", true, |r, _| {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(r.join("backups/disk0/0002.idx"))
                .unwrap();
            let len = f.metadata().unwrap().len();
            f.set_len(len / 2).unwrap();
        }),
        ("damaged index metadata", "backups/disk0/0002.idx", true, |r, _| {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(r.join("backups/disk0/0002.idx"))
                .unwrap();
            f.write_all_at(b"X", 40).unwrap();
        }),
        ("missing config", "not a blockdelta repository", true, |r, _| {
            std::fs::remove_file(r.join("config")).unwrap()
        }),
    ];
    let pristine = tmp.path().join("pristine");
    Command::new("cp").args(["-a", s(&repo), s(&pristine)]).status().unwrap();
    for (name, file, backup_fails, damage) in cases {
        std::fs::remove_dir_all(&repo).unwrap();
        Command::new("cp").args(["-a", s(&pristine), s(&repo)]).status().unwrap();
        damage(&repo, &first_chunk_key);
        let before = snapshot(&repo);
        let restored = tmp.path().join("restored.raw");
        let r = serve(Kind::Qsd, tmp.path(), &image, Some("b0"));
        let attempts: Vec<Vec<String>> = vec![
            vec!["verify".into(), "--repo".into(), s(&repo).into()],
            vec![
                "restore".into(),
                "--repo".into(),
                s(&repo).into(),
                "--disk".into(),
                "disk0".into(),
                "--to".into(),
                s(&restored).into(),
            ],
            vec![
                "backup".into(),
                "--from".into(),
                r.uri.clone(),
                "--bitmap".into(),
                "b0".into(),
                "--repo".into(),
                s(&repo).into(),
            ],
        ];
        for args in attempts {
            // A backup reads its parent's index, and only the parent's chunks it
            // completes: checking every chunk would defeat incrementals. Damaged chunks
            // are for verify and restore to find.
            if !backup_fails && args[0] == "backup" {
                continue;
            }
            let out = bd().args(&args).output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{name}: {} succeeded", args[0]);
            assert!(err.contains(file), "{name}: {}: stderr does not name {file}: {err}", args[0]);
            assert!(!restored.exists(), "{name}: a restore file was left");
            assert!(snapshot(&repo) == before, "{name}: {} changed the repository", args[0]);
        }
        drop(r);
    }
}

#[test]
fn killed_backups_never_leave_a_repository_verify_rejects() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (image, repo) = make_repo(dir);
    // More data, so that a backup takes long enough to be killed in every phase.
    let mut cmds = Vec::new();
    for i in 0..48u64 {
        cmds.push(format!("write -P {} {} 1M", i + 1, i * 2 * MIB + 3 * MIB));
    }
    qio(&image, &cmds);
    qemu_img(["bitmap", "--disable", s(&image), "b0"]).unwrap();
    let r = serve(Kind::Serve, dir, &image, Some("b0"));
    let args = |full: bool| {
        let mut a = vec!["backup", "--from", &r.uri, "--bitmap", "b0", "--repo", s(&repo), "-q"]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>();
        if full {
            a.push("--full".into());
        }
        a
    };
    // How long uninterrupted backups take.
    let t = Instant::now();
    ok(bd().args(args(true)).output().unwrap());
    let full_time = t.elapsed();
    let t = Instant::now();
    ok(bd().args(args(false)).output().unwrap());
    let inc_time = t.elapsed();
    let mut rng = SplitMix64(2026);
    let mut interrupted = 0;
    // Kill until 20 backups were really interrupted (a kill that comes after the end
    // does not count), with a bound so that a machine too fast or too slow cannot loop.
    let mut round = 0;
    while interrupted < 20 && round < 120 {
        round += 1;
        let full = round % 3 == 0;
        let mut child =
            bd().args(args(full)).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let time = if full { full_time } else { inc_time };
        let micros = rng.up_to(time.as_micros() as u64 + 1);
        std::thread::sleep(Duration::from_micros(micros));
        child.kill().unwrap();
        let status = child.wait().unwrap();
        if !status.success() {
            interrupted += 1;
        }
        let out = run_bd(&["verify", "--repo", s(&repo)]);
        assert!(
            out.status.success(),
            "round {round} (killed after {micros} µs): verify failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(interrupted >= 20, "only {interrupted} of {round} backups were interrupted");
    // The repository still takes backups, and the newest restores to the disk.
    ok(bd().args(args(false)).output().unwrap());
    ok(run_bd(&["verify", "--repo", s(&repo)]));
    // Killed backups leave registrations and unreferenced chunks; gc removes them.
    let gc: Value =
        serde_json::from_str(&ok(run_bd(&["gc", "--repo", s(&repo), "--json"]))).unwrap();
    assert_eq!(gc["missing"], 0, "{gc}");
    assert!(std::fs::read_dir(repo.join("writers")).map(|d| d.count()).unwrap_or(0) == 0, "{gc}");
    ok(run_bd(&["verify", "--repo", s(&repo)]));
    let raw = dir.join("final.raw");
    ok(run_bd(&["restore", "--repo", s(&repo), "--disk", "disk0", "--to", s(&raw), "-q"]));
    drop(r);
    compare(&raw, "raw", &image);
}

/// `verify` accepts `repo`, or the test fails saying `when`.
fn verified(repo: &Path, when: &str) {
    let out = run_bd(&["verify", "--repo", s(repo)]);
    assert!(
        out.status.success(),
        "{when}: verify failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `args` and kills it after a random part of `typical`; whether the kill came
/// before it ended.
fn run_killed(args: &[&str], typical: Duration, rng: &mut SplitMix64) -> bool {
    let mut child = bd().args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    std::thread::sleep(Duration::from_micros(rng.up_to(typical.as_micros() as u64 + 1)));
    child.kill().unwrap();
    !child.wait().unwrap().success()
}

/// How long `args` takes uninterrupted (it must succeed).
fn timed_ok(args: &[&str]) -> Duration {
    let t = Instant::now();
    ok(run_bd(args));
    t.elapsed()
}

/// `prune` and `gc` killed at random moments, 20 of each really interrupted, never leave
/// a repository that `verify` rejects, and the backups that remain restore to the disk
/// as it was. Each round adds a backup of changed data, so that every prune has a
/// backup to drop and every gc has chunks to delete.
#[test]
fn killed_prunes_and_gcs_never_leave_a_repository_verify_rejects() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let image = dir.join("disk.qcow2");
    let repo = dir.join("repo");
    qemu_img(["create", "-q", "-f", "qcow2", s(&image), "64M"]).unwrap();
    let mut rng = SplitMix64(4242);
    let prune = ["prune", "--repo", s(&repo), "--keep-last", "2"];
    let gc = ["gc", "--repo", s(&repo), "--grace", "0"];
    let (mut pruned, mut collected, mut round) = (0, 0, 0);
    let mut copies: Vec<PathBuf> = Vec::new();
    while (pruned < 20 || collected < 20) && round < 150 {
        round += 1;
        // New data in 16 places, then a full backup of it (its own chunks).
        let cmds: Vec<String> = (0..16u64)
            .map(|k| format!("write -P {} {} 256k", (round * 16 + k) % 250 + 1, k * 4 * MIB))
            .collect();
        qio(&image, &cmds);
        {
            let r = serve(Kind::Serve, dir, &image, None);
            ok(run_bd(&["backup", "--from", &r.uri, "--repo", s(&repo), "--full", "-q"]));
        }
        let copy = dir.join(format!("disk-{round}.qcow2"));
        std::fs::copy(&image, &copy).unwrap();
        copies.push(copy);
        if round < 3 {
            continue;
        }
        // Measured on a copy, killed on the real one: the copy's run shows how long a
        // prune or gc of this repository takes.
        let probe = dir.join("probe");
        let _ = std::fs::remove_dir_all(&probe);
        ok(Command::new("cp").args(["-a", s(&repo), s(&probe)]).output().unwrap());
        let on_probe = |a: &[&str]| -> Vec<String> {
            a.iter()
                .map(|x| if *x == s(&repo) { s(&probe).to_owned() } else { x.to_string() })
                .collect()
        };
        let t_prune = timed_ok(&on_probe(&prune).iter().map(String::as_str).collect::<Vec<_>>());
        let t_gc = timed_ok(&on_probe(&gc).iter().map(String::as_str).collect::<Vec<_>>());
        if pruned < 20 && run_killed(&prune, t_prune, &mut rng) {
            pruned += 1;
        }
        verified(&repo, &format!("round {round}, after a killed prune"));
        // Whatever the kill left, a prune completes.
        ok(run_bd(&prune));
        if collected < 20 && run_killed(&gc, t_gc, &mut rng) {
            collected += 1;
        }
        verified(&repo, &format!("round {round}, after a killed gc"));
    }
    assert!(pruned >= 20 && collected >= 20, "interrupted {pruned} prunes, {collected} gcs");
    // A gc to the end frees what the killed ones left; the kept backups (the last two)
    // restore to the disk as it was at each.
    ok(run_bd(&gc));
    ok(run_bd(&["verify", "--repo", s(&repo)]));
    let list: Value =
        serde_json::from_str(&ok(run_bd(&["list", "--repo", s(&repo), "--json"]))).unwrap();
    let backups = list["backups"].as_array().unwrap();
    assert_eq!(backups.len(), 2, "{list}");
    for (b, copy) in backups.iter().zip(&copies[copies.len() - 2..]) {
        let id = b["id"].as_str().unwrap();
        let raw = dir.join(format!("restored-{id}.raw"));
        ok(run_bd(&[
            "restore",
            "--repo",
            s(&repo),
            "--disk",
            "disk0",
            "--at",
            id,
            "--to",
            s(&raw),
            "-q",
        ]));
        compare(&raw, "raw", copy);
    }
}

/// One byte flipped at a random place in any object, chunk or index, one object at a
/// time: `verify` fails naming the object (and for a chunk every backup that uses it),
/// and restoring an affected backup fails naming it too.
#[test]
fn a_flipped_byte_in_any_object_is_found_and_named() {
    let tmp = tempfile::tempdir().unwrap();
    let (_image, repo) = make_repo(tmp.path());
    // Who uses which chunk, read with the library from the undamaged repository.
    let users: BTreeMap<String, Vec<String>> = {
        let backend = std::sync::Arc::new(repo::backend::LocalBackend::open(&repo).unwrap());
        let r = repo::Repository::open(backend, None).unwrap();
        let mut users: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for b in r.backups("disk0").unwrap() {
            for id in r.read_index(&b).unwrap().entries.iter().filter(|id| !id.is_zero()) {
                let list = users.entry(id.to_string()).or_default();
                let name = repo::format_id(b.meta.id);
                if !list.contains(&name) {
                    list.push(name);
                }
            }
        }
        users
    };
    let mut objects = Vec::new();
    for sub in ["chunks", "backups"] {
        files_under(&repo.join(sub), &mut objects);
    }
    assert!(objects.len() >= users.len() + 2, "{objects:?}");
    let pristine = tmp.path().join("pristine");
    ok(Command::new("cp").args(["-a", s(&repo), s(&pristine)]).output().unwrap());
    let mut rng = SplitMix64(77);
    for object in &objects {
        std::fs::remove_dir_all(&repo).unwrap();
        ok(Command::new("cp").args(["-a", s(&pristine), s(&repo)]).output().unwrap());
        let key = object.strip_prefix(&repo).unwrap().to_str().unwrap().to_owned();
        let mut bytes = std::fs::read(object).unwrap();
        let at = (rng.next() % bytes.len() as u64) as usize;
        bytes[at] ^= 1u8 << (rng.next() % 8);
        std::fs::write(object, &bytes).unwrap();
        let out = run_bd(&["verify", "--repo", s(&repo)]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{key} (byte {at}): verify found nothing");
        assert!(err.contains(&key), "{key} (byte {at}): verify does not name it: {err}");
        // The backups affected: a chunk's users, or the backup of a damaged index.
        let affected: Vec<String> = match key.strip_prefix("backups/disk0/") {
            Some(idx) => vec![idx.trim_end_matches(".idx").to_owned()],
            None => {
                let name = key.rsplit('/').next().unwrap();
                let list = users.get(name).cloned().unwrap_or_default();
                for id in &list {
                    assert!(
                        err.contains(&format!("disk0 {id}")),
                        "{key}: verify does not name {id}: {err}"
                    );
                }
                list
            }
        };
        assert!(!affected.is_empty(), "{key}: no backup uses it");
        for id in affected {
            let raw = tmp.path().join("restored.raw");
            let out = run_bd(&[
                "restore",
                "--repo",
                s(&repo),
                "--disk",
                "disk0",
                "--at",
                &id,
                "--to",
                s(&raw),
            ]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{key}: restore of {id} succeeded");
            assert!(err.contains(&key), "{key}: restore of {id} does not name it: {err}");
            assert!(!raw.exists(), "{key}: restore of {id} left a file");
        }
    }
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}
