//! The chunk store through the `blockdelta` commands: encrypted repositories and key
//! files, retention (`prune`, `forget`) and `gc`, several backup processes of different
//! disks with a `gc` running, restores to a block device. Sources are `qemu-nbd`
//! exports of qcow2 images; restores are compared with `qemu-img compare`.
//!
//! Fails, never skips, when a tool is missing (`scripts/test` installs them).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use testkit::serde_json::{self, Value};
use testkit::{qemu_img, qemu_io, require_tool};

mod common_push;
use common_push::{MIB, ok, s};

/// `blockdelta`, with no key or passphrase from the environment the tests run in.
fn bd() -> Command {
    let mut c = common_push::bd();
    c.env_remove("BLOCKDELTA_KEYFILE").env_remove("BLOCKDELTA_PASSPHRASE");
    c
}

fn fails(out: Output) -> String {
    assert!(!out.status.success(), "succeeded: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8(out.stderr).unwrap()
}

/// `qemu-nbd` serving `image` read-only as export `name`.
struct Nbd {
    child: Child,
    uri: String,
}

impl Nbd {
    fn start(dir: &Path, image: &Path, name: &str) -> Nbd {
        let socket = dir.join(format!("{name}.sock"));
        let _ = std::fs::remove_file(&socket);
        let child = Command::new(require_tool("qemu-nbd"))
            .args(["-r", "-t", "-f", "qcow2", "-x", name, "-k", s(&socket), s(image)])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while !socket.exists() {
            assert!(start.elapsed() < Duration::from_secs(10), "qemu-nbd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Nbd { child, uri: format!("nbd+unix:///{name}?socket={}", s(&socket)) }
    }
}

impl Drop for Nbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn image(dir: &Path, name: &str, mib: u64, writes: &[String]) -> PathBuf {
    let p = dir.join(format!("{name}.qcow2"));
    qemu_img(["create", "-q", "-f", "qcow2", s(&p), &format!("{mib}M")]).unwrap();
    write(&p, writes);
    p
}

fn write(image: &Path, writes: &[String]) {
    let mut args = vec!["-f".to_string(), "qcow2".into()];
    for w in writes {
        args.extend(["-c".into(), w.clone()]);
    }
    args.push(s(image).into());
    qemu_io(&args).unwrap();
}

fn compare(restored: &Path, reference: &Path) {
    let out = qemu_img(["compare", "-f", "raw", "-F", "qcow2", s(restored), s(reference)]).unwrap();
    assert!(out.contains("Images are identical"), "{out}");
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn chunk_count(repo: &Path) -> usize {
    let mut v = Vec::new();
    if repo.join("chunks").exists() {
        files_under(&repo.join("chunks"), &mut v);
    }
    v.len()
}

#[test]
fn an_encrypted_repository_needs_its_key_and_shows_nothing_without_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let key = dir.join("repo.key");
    let repo = dir.join("repo");
    ok(bd()
        .args(["key", "create", s(&key), "--kdf-memory", "8", "--kdf-iterations", "1"])
        .env("BLOCKDELTA_PASSPHRASE", "s3cret")
        .output()
        .unwrap());
    ok(bd()
        .args(["init", "--repo", s(&repo), "--keyfile", s(&key)])
        .env("BLOCKDELTA_PASSPHRASE", "s3cret")
        .output()
        .unwrap());
    // Plaintext a reader would recognise, in the disk and in its name.
    let img = image(dir, "payroll", 16, &["write -P 0x41 0 3M".into()]);
    let nbd = Nbd::start(dir, &img, "payroll");
    let backup = |extra: &[&str]| {
        bd().args(["backup", "--from", &nbd.uri, "--repo", s(&repo), "--full", "-q"])
            .args(extra)
            .env("BLOCKDELTA_KEYFILE", &key)
            .env("BLOCKDELTA_PASSPHRASE", "s3cret")
            .output()
            .unwrap()
    };
    ok(backup(&[]));
    let mut files = Vec::new();
    files_under(&repo, &mut files);
    for f in &files {
        let name = f.strip_prefix(&repo).unwrap().display().to_string();
        assert!(!name.contains("payroll"), "{name} shows the disk's name");
        let bytes = std::fs::read(f).unwrap();
        assert!(!bytes.windows(8).any(|w| w == b"AAAAAAAA"), "{name} holds plaintext");
        assert!(!bytes.windows(7).any(|w| w == b"payroll"), "{name} names the disk");
    }
    // Without the key: every command says the key is missing.
    for args in [
        vec!["list", "--repo", s(&repo)],
        vec!["verify", "--repo", s(&repo)],
        vec!["gc", "--repo", s(&repo)],
        vec!["restore", "--repo", s(&repo), "--disk", "payroll", "--to", "/nonexistent/x"],
    ] {
        let err = fails(bd().args(&args).output().unwrap());
        assert!(err.contains("encrypted") && err.contains("--keyfile"), "{args:?}: {err}");
    }
    let err = fails(
        bd().args(["backup", "--from", &nbd.uri, "--repo", s(&repo), "--full"]).output().unwrap(),
    );
    assert!(err.contains("encrypted"), "{err}");
    // Another key, or the wrong passphrase.
    let other = dir.join("other.key");
    ok(bd().args(["key", "create", s(&other)]).output().unwrap());
    let err =
        fails(bd().args(["list", "--repo", s(&repo), "--keyfile", s(&other)]).output().unwrap());
    assert!(err.contains("does not belong"), "{err}");
    let err = fails(
        bd().args(["list", "--repo", s(&repo), "--keyfile", s(&key)])
            .env("BLOCKDELTA_PASSPHRASE", "nope")
            .output()
            .unwrap(),
    );
    assert!(err.contains("wrong passphrase"), "{err}");
    // With it: list, verify, restore.
    let with_key = |args: &[&str]| {
        bd().args(args)
            .env("BLOCKDELTA_KEYFILE", &key)
            .env("BLOCKDELTA_PASSPHRASE", "s3cret")
            .output()
            .unwrap()
    };
    let list: Value =
        serde_json::from_str(&ok(with_key(&["list", "--repo", s(&repo), "--json"]))).unwrap();
    assert_eq!(list["backups"][0]["disk"], "payroll");
    assert_eq!(list["encrypted"], true);
    ok(with_key(&["verify", "--repo", s(&repo)]));
    let raw = dir.join("restored.raw");
    ok(with_key(&["restore", "--repo", s(&repo), "--disk", "payroll", "--to", s(&raw), "-q"]));
    compare(&raw, &img);
    // A key for a repository that has none is refused.
    let plain = dir.join("plain");
    ok(bd().args(["init", "--repo", s(&plain)]).output().unwrap());
    let err =
        fails(bd().args(["list", "--repo", s(&plain), "--keyfile", s(&other)]).output().unwrap());
    assert!(err.contains("not encrypted"), "{err}");
    // init refuses a directory that is not empty, and changes nothing there.
    let err = fails(bd().args(["init", "--repo", s(&repo)]).output().unwrap());
    assert!(err.contains("not empty"), "{err}");
}

#[test]
fn prune_forget_and_gc_free_space_and_keep_what_they_should() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let repo = dir.join("repo");
    let mut references = Vec::new();
    let img = image(dir, "d", 32, &["write -P 1 0 8M".into()]);
    for round in 0..5u64 {
        if round > 0 {
            // The same MiB each time: each backup has its own version of that chunk.
            write(&img, &[format!("write -P {} {} 1M", round + 10, 4 * MIB)]);
        }
        let nbd = Nbd::start(dir, &img, "d");
        ok(bd()
            .args(["backup", "--from", &nbd.uri, "--repo", s(&repo), "--full", "-q"])
            .output()
            .unwrap());
        let r = dir.join(format!("ref{round}.qcow2"));
        std::fs::copy(&img, &r).unwrap();
        references.push(r);
    }
    let ids = |repo: &Path| -> Vec<String> {
        let v: Value = serde_json::from_str(&ok(bd()
            .args(["list", "--repo", s(repo), "--json"])
            .output()
            .unwrap()))
        .unwrap();
        v["backups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ids(&repo), ["0001", "0002", "0003", "0004", "0005"]);
    let err = fails(bd().args(["prune", "--repo", s(&repo)]).output().unwrap());
    assert!(err.contains("--keep-last"), "{err}");
    let dry = ok(bd()
        .args(["prune", "--repo", s(&repo), "--keep-last", "2", "--dry-run"])
        .output()
        .unwrap());
    assert_eq!(dry.matches("would remove").count(), 3, "{dry}");
    assert_eq!(ids(&repo).len(), 5, "a dry run removes nothing");
    ok(bd().args(["prune", "--repo", s(&repo), "--keep-last", "2"]).output().unwrap());
    assert_eq!(ids(&repo), ["0004", "0005"]);
    let before = chunk_count(&repo);
    let gc: Value = serde_json::from_str(&ok(bd()
        .args(["gc", "--repo", s(&repo), "--json"])
        .output()
        .unwrap()))
    .unwrap();
    // The versions of rounds 1 and 2 are in no kept backup (round 0's is the chunk of
    // every other MiB of pattern 1, which they all share).
    assert_eq!(gc["removed"], 2, "{gc}");
    assert_eq!(chunk_count(&repo), before - 2);
    ok(bd().args(["verify", "--repo", s(&repo)]).output().unwrap());
    for (id, r) in [("0004", &references[3]), ("0005", &references[4])] {
        let raw = dir.join(format!("r{id}.raw"));
        ok(bd()
            .args(["restore", "--repo", s(&repo), "--disk", "d", "--at", id, "--to", s(&raw), "-q"])
            .output()
            .unwrap());
        compare(&raw, r);
    }
    ok(bd()
        .args(["forget", "--repo", s(&repo), "--disk", "d", "--backup", "0005"])
        .output()
        .unwrap());
    let err = fails(
        bd().args(["forget", "--repo", s(&repo), "--disk", "d", "--backup", "0005"])
            .output()
            .unwrap(),
    );
    assert!(err.contains("no backup 0005"), "{err}");
    let gc: Value = serde_json::from_str(&ok(bd()
        .args(["gc", "--repo", s(&repo), "--json"])
        .output()
        .unwrap()))
    .unwrap();
    assert_eq!(gc["removed"], 1, "round 4's MiB: {gc}");
    let raw = dir.join("last.raw");
    ok(bd()
        .args(["restore", "--repo", s(&repo), "--disk", "d", "--to", s(&raw), "-q"])
        .output()
        .unwrap());
    compare(&raw, &references[3]);
}

/// Backups of three disks from three processes at once, again and again, with `gc`
/// running in a loop beside them: all succeed, and every backup restores.
#[test]
fn concurrent_backup_processes_and_gc() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let repo = dir.join("repo");
    ok(bd().args(["init", "--repo", s(&repo), "--chunk-size", "256K"]).output().unwrap());
    let disks: Vec<(String, PathBuf)> = (0..3)
        .map(|i| {
            let name = format!("vm{i}");
            let img = image(
                dir,
                &name,
                24,
                &[format!("write -P {} 0 6M", i + 1), "write -P 9 12M 2M".into()],
            );
            (name, img)
        })
        .collect();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let collections = std::thread::scope(|sc| {
        let collector = sc.spawn(|| {
            let mut runs = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = bd().args(["gc", "--repo", s(&repo), "-q"]).output().unwrap();
                let err = String::from_utf8_lossy(&out.stderr).into_owned();
                assert!(out.status.success() || err.contains("busy"), "gc: {err}");
                runs += 1;
            }
            runs
        });
        let workers: Vec<_> = disks
            .iter()
            .map(|(name, img)| {
                let repo = &repo;
                sc.spawn(move || {
                    let mut refs = Vec::new();
                    for round in 0..4u64 {
                        write(
                            img,
                            &[format!(
                                "write -P {} {} 512k",
                                20 + round,
                                round * 3 * MIB + 256 * 1024
                            )],
                        );
                        let nbd = Nbd::start(dir, img, name);
                        ok(bd()
                            .args(["backup", "--from", &nbd.uri, "--repo", s(repo), "--full", "-q"])
                            .output()
                            .unwrap());
                        let r = dir.join(format!("{name}-{round}.qcow2"));
                        std::fs::copy(img, &r).unwrap();
                        refs.push((format!("{:04}", round + 1), r));
                        if round == 2 {
                            ok(bd()
                                .args([
                                    "prune",
                                    "--repo",
                                    s(repo),
                                    "--disk",
                                    name,
                                    "--keep-last",
                                    "1",
                                ])
                                .output()
                                .unwrap());
                            refs.clear();
                        }
                    }
                    refs
                })
            })
            .collect();
        let refs: Vec<_> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let runs = collector.join().unwrap();
        (refs, runs)
    });
    let (refs, runs) = collections;
    assert!(runs > 0);
    ok(bd().args(["verify", "--repo", s(&repo)]).output().unwrap());
    for ((name, _), refs) in disks.iter().zip(refs) {
        for (id, r) in refs {
            let raw = dir.join(format!("{name}-{id}.raw"));
            ok(bd()
                .args([
                    "restore",
                    "--repo",
                    s(&repo),
                    "--disk",
                    name,
                    "--at",
                    &id,
                    "--to",
                    s(&raw),
                    "-q",
                ])
                .output()
                .unwrap());
            compare(&raw, &r);
        }
    }
}

/// A restore to a block device (a loop device) writes in place, zero chunks too, and
/// needs --force.
#[test]
fn restore_to_a_block_device() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let repo = dir.join("repo");
    let img = image(dir, "d", 8, &["write -P 7 1M 2M".into()]);
    let nbd = Nbd::start(dir, &img, "d");
    ok(bd()
        .args(["backup", "--from", &nbd.uri, "--repo", s(&repo), "--full", "-q"])
        .output()
        .unwrap());
    // The device starts full of other bytes, which the zero chunks must overwrite.
    let backing = dir.join("device.img");
    std::fs::write(&backing, vec![0x5a; 9 * MIB as usize]).unwrap();
    let losetup = require_tool("losetup");
    let out = Command::new(&losetup).args(["--find", "--show", s(&backing)]).output().unwrap();
    assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
    let device = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    struct Detach(PathBuf, PathBuf);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new(&self.0).arg("-d").arg(&self.1).status();
        }
    }
    let _detach = Detach(losetup, device.clone());
    let err = fails(
        bd().args(["restore", "--repo", s(&repo), "--disk", "d", "--to", s(&device)])
            .output()
            .unwrap(),
    );
    assert!(err.contains("--force"), "{err}");
    ok(bd()
        .args(["restore", "--repo", s(&repo), "--disk", "d", "--to", s(&device), "--force", "-q"])
        .output()
        .unwrap());
    assert!(device.exists(), "the device node is still there");
    let back = std::fs::read(&backing).unwrap();
    let want_raw = dir.join("want.raw");
    qemu_img(["convert", "-f", "qcow2", "-O", "raw", s(&img), s(&want_raw)]).unwrap();
    let want = std::fs::read(&want_raw).unwrap();
    assert_eq!(&back[..want.len()], &want[..], "the device holds the disk");
    assert!(back[want.len()..].iter().all(|&b| b == 0x5a), "past the disk's end nothing changed");
}

/// Two disks with the same content: the second full backup stores almost nothing, and
/// `list` reports the sharing. `--at` takes ids with or without leading zeros.
#[test]
fn identical_disks_are_stored_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let repo = dir.join("repo");
    // Random data (incompressible), so that only deduplication can save anything.
    let data = dir.join("random.bin");
    let mut bytes = vec![0u8; 12 * MIB as usize];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for b in bytes.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes());
    }
    std::fs::write(&data, &bytes).unwrap();
    let mut stats = Vec::new();
    for name in ["a", "b"] {
        let img = dir.join(format!("{name}.qcow2"));
        qemu_img(["convert", "-f", "raw", "-O", "qcow2", s(&data), s(&img)]).unwrap();
        let nbd = Nbd::start(dir, &img, name);
        let out = ok(bd()
            .args(["backup", "--from", &nbd.uri, "--repo", s(&repo), "--full", "--json"])
            .output()
            .unwrap());
        stats.push(serde_json::from_str::<Value>(&out).unwrap());
    }
    let first = stats[0]["new-stored-bytes"].as_u64().unwrap();
    let second = stats[1]["new-stored-bytes"].as_u64().unwrap();
    assert!(first >= 12 * MIB, "{}", stats[0]);
    assert!(second * 20 < first, "the second disk stored {second} bytes of {first}");
    let list: Value = serde_json::from_str(&ok(bd()
        .args(["list", "--repo", s(&repo), "--json"])
        .output()
        .unwrap()))
    .unwrap();
    let dedup = list["dedup-ratio"].as_f64().unwrap();
    assert!((1.95..=2.05).contains(&dedup), "{list}");
    assert!(list["stored-bytes"].as_u64().unwrap() < 13 * MIB, "{list}");
    let text = ok(bd().args(["list", "--repo", s(&repo)]).output().unwrap());
    assert!(text.contains("deduplication 2.00x"), "{text}");
    for at in ["1", "0001", "00001"] {
        let raw = dir.join(format!("b-{at}.raw"));
        ok(bd()
            .args(["restore", "--repo", s(&repo), "--disk", "b", "--at", at, "--to", s(&raw), "-q"])
            .output()
            .unwrap());
        assert_eq!(std::fs::read(&raw).unwrap(), bytes);
    }
}

/// Runs `blockdelta ARGS` on a terminal (`script(1)` gives it a pseudo-terminal, with no
/// passphrase variable), typing each answer once its prompt has appeared; returns
/// whether it succeeded and what the terminal showed.
fn on_terminal(dir: &Path, args: &[&str], answers: &[&str]) -> (bool, String) {
    use std::io::{Read, Write};
    let program = bd().get_program().to_owned();
    let line = std::iter::once(s(Path::new(&program)).to_owned())
        .chain(args.iter().map(|a| a.to_string()))
        .collect::<Vec<_>>()
        .join(" ");
    let mut child = Command::new(require_tool("script"))
        .args(["-qec", &line, "/dev/null"])
        .current_dir(dir)
        .env_remove("BLOCKDELTA_KEYFILE")
        .env_remove("BLOCKDELTA_PASSPHRASE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let shown = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let shown = shown.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                shown.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    let mut stdin = child.stdin.take().unwrap();
    for (i, answer) in answers.iter().enumerate() {
        let start = Instant::now();
        loop {
            let text = shown.lock().unwrap().clone();
            if text.matches("Passphrase for").count() + text.matches("Again: ").count() > i {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "no prompt {i}: {text:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        writeln!(stdin, "{answer}").unwrap();
    }
    let status = child.wait().unwrap();
    drop(stdin);
    reader.join().unwrap();
    let text = shown.lock().unwrap().clone();
    (status.success(), text)
}

#[test]
fn a_passphrase_is_asked_for_on_a_terminal_and_never_echoed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pass = "correct horse 7 battery";
    let (ok_, shown) = on_terminal(d, &["key", "create", "--kdf-memory", "8", "k"], &[pass, pass]);
    assert!(ok_, "{shown}");
    assert!(shown.contains("sealed under a passphrase"), "{shown}");
    assert!(!shown.contains(pass), "the passphrase was echoed: {shown:?}");
    let file = std::fs::read_to_string(d.join("k")).unwrap();
    assert!(file.contains("\"kdf\"") && !file.contains("horse"), "{file}");

    // No terminal and no variable: a clear error, nothing made.
    let out = bd()
        .args(["init", "--repo", s(&d.join("r")), "--keyfile", s(&d.join("k"))])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = fails(out);
    assert!(err.contains("BLOCKDELTA_PASSPHRASE") && err.contains("terminal"), "{err}");
    assert!(!d.join("r").exists());

    let (ok_, shown) = on_terminal(d, &["init", "--repo", "r", "--keyfile", "k"], &[pass]);
    assert!(ok_ && shown.contains("encrypted"), "{shown}");
    let (ok_, shown) = on_terminal(d, &["list", "--repo", "r", "--keyfile", "k"], &["nope"]);
    assert!(!ok_ && shown.contains("wrong passphrase"), "{shown}");
    // The variable still works without a terminal.
    let out = bd()
        .args(["list", "--repo", s(&d.join("r")), "--keyfile", s(&d.join("k"))])
        .env("BLOCKDELTA_PASSPHRASE", pass)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    ok(out);

    // A new passphrase typed twice differently makes no key file; an empty one makes an
    // unsealed key.
    let (ok_, shown) = on_terminal(d, &["key", "create", "k2"], &["one", "two"]);
    assert!(!ok_ && shown.contains("the passphrases differ"), "{shown}");
    assert!(!d.join("k2").exists());
    let (ok_, shown) = on_terminal(d, &["key", "create", "k3"], &[""]);
    assert!(ok_ && !shown.contains("sealed"), "{shown}");
    assert!(!std::fs::read_to_string(d.join("k3")).unwrap().contains("\"kdf\""));
}
