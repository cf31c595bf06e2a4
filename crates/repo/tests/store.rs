//! The repository as its commands use it: backups, dedup, encryption, retention, gc,
//! verify and restore, on a directory and in memory, with power cuts and concurrent
//! writers.

use std::collections::HashSet;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use repo::assemble::ingest;
use repo::backend::{Backend, Created, CutMode, LocalBackend, MemoryBackend};
use repo::chunk::ChunkId;
use repo::gc::{GcOptions, gc};
use repo::key::Keys;
use repo::prune::{KeepPolicy, PruneMode, prune};
use repo::repository::CreateOptions;
use repo::restore::{RestoreTarget, restore};
use repo::verify::verify;
use repo::writer::{BackupPlan, Basis};
use repo::{Error, NoProgress, Repository, Timestamp};

const CHUNK: u64 = 64 << 10;

/// A disk in memory.
#[derive(Clone)]
struct Disk(Vec<u8>);

impl Disk {
    /// Random-looking contents from `seed`, with a zero chunk every fourth and a chunk
    /// shared by every disk every fifth.
    fn new(chunks: usize, seed: u64) -> Disk {
        let mut d = vec![0u8; chunks * CHUNK as usize];
        for c in 0..chunks {
            if c % 4 == 1 {
                continue;
            }
            let s = if c % 5 == 0 { 999 } else { seed * 1000 + c as u64 };
            fill(&mut d[c * CHUNK as usize..(c + 1) * CHUNK as usize], s);
        }
        Disk(d)
    }

    /// Overwrites `len` bytes at `at` with data from `seed`.
    fn write(&mut self, at: usize, len: usize, seed: u64) {
        fill(&mut self.0[at..at + len], seed);
    }
}

fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for b in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        b.copy_from_slice(&bytes[..b.len()]);
    }
}

/// Backs `disk` up: a full backup copies every chunk; an incremental the chunks that
/// `dirty` (byte ranges) touch, each merged with the parent's chunk.
fn backup(
    repo: &Repository,
    name: &str,
    disk: &Disk,
    parent: Option<(u64, &[(usize, usize)])>,
) -> repo::Result<u64> {
    let basis = match parent {
        None => Basis::Full,
        Some((p, _)) => Basis::Incremental { parent: p },
    };
    let w = repo.begin_backup(BackupPlan {
        disk: name.into(),
        size: disk.0.len() as u64,
        basis,
        source: "test".into(),
        bitmap: None,
        time: Timestamp(1_800_000_000),
    })?;
    let cs = w.chunk_size() as usize;
    match parent {
        None => {
            for i in 0..w.chunk_count() {
                let at = i as usize * cs;
                w.put(i, &disk.0[at..at + w.chunk_len(i) as usize])?;
                w.add_bytes_read(w.chunk_len(i));
            }
        }
        Some((_, dirty)) => {
            let mut chunks: Vec<u64> = dirty
                .iter()
                .flat_map(|&(at, len)| (at / cs) as u64..(at + len).div_ceil(cs) as u64)
                .collect();
            chunks.sort();
            chunks.dedup();
            for i in chunks {
                let mut data = w.parent_chunk(i)?;
                let base = i as usize * cs;
                for &(at, len) in dirty {
                    let (s, e) = (at.max(base), (at + len).min(base + data.len()));
                    if s < e {
                        data[s - base..e - base].copy_from_slice(&disk.0[s..e]);
                        w.add_bytes_read((e - s) as u64);
                    }
                }
                w.put(i, &data)?;
            }
        }
    }
    Ok(w.commit()?.meta.id)
}

struct MemTarget(Mutex<Vec<u8>>);
impl RestoreTarget for MemTarget {
    fn name(&self) -> String {
        "memory".into()
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.lock().unwrap()[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.lock().unwrap()[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

fn restored(repo: &Repository, disk: &str, id: u64) -> Vec<u8> {
    let b = repo.backup(disk, Some(id)).unwrap();
    let index = repo.read_index(&b).unwrap();
    // Garbage first: zero chunks must be written as zeroes, not skipped.
    let target = MemTarget(Mutex::new(vec![0xAA; index.meta.size as usize]));
    restore(repo, &index, &target, 3, &NoProgress).unwrap();
    target.0.into_inner().unwrap()
}

fn options(keys: Option<Keys>) -> CreateOptions {
    CreateOptions { chunk_size: CHUNK, keys, ..CreateOptions::default() }
}

fn chunk_objects(backend: &dyn Backend) -> usize {
    backend.list("chunks").unwrap().len()
}

fn both_kinds() -> Vec<Option<Keys>> {
    vec![None, Some(Keys::generate().unwrap())]
}

#[test]
fn backups_restore_every_point_in_time_and_share_chunks() {
    for keys in both_kinds() {
        let dir = tempfile::tempdir().unwrap();
        let backend: Arc<dyn Backend> = Arc::new(LocalBackend::open(dir.path()).unwrap());
        let repo = Repository::create(backend.clone(), options(keys.clone())).unwrap();
        let mut a = Disk::new(40, 1);
        let v1 = a.clone();
        assert_eq!(backup(&repo, "a", &a, None).unwrap(), 1);
        // 40 chunks: 10 zero, 6 shared (one object), 24 own.
        assert_eq!(chunk_objects(&*backend), 25);
        let dirty = [(100, 5000), (CHUNK as usize * 7 + 1, 10), (CHUNK as usize * 9 - 3, 6)];
        for &(at, len) in &dirty {
            a.write(at, len, at as u64 + 7);
        }
        assert_eq!(backup(&repo, "a", &a, Some((1, &dirty))).unwrap(), 2);
        // Chunks 0, 7, 8 and 9 (a zero chunk) changed: 4 new objects.
        assert_eq!(chunk_objects(&*backend), 29);
        let b = Disk::new(40, 2);
        backup(&repo, "b", &b, None).unwrap();
        // Disk b shares the common chunk and nothing else.
        assert_eq!(chunk_objects(&*backend), 29 + 24);
        assert_eq!(restored(&repo, "a", 1), v1.0);
        assert_eq!(restored(&repo, "a", 2), a.0);
        assert_eq!(restored(&repo, "b", 1), b.0);
        assert_eq!(repo.disks().unwrap(), ["a", "b"]);
        let two = repo.backup("a", None).unwrap().meta;
        assert_eq!((two.id, two.parent, two.new_chunks), (2, Some(1), 4));
        assert_eq!(two.bytes_read, 5000 + 10 + 6);
        let report = verify(&repo, &[], 2, &NoProgress).unwrap();
        assert!(report.ok(), "{report:?}");
        assert_eq!(report.chunks, 53);
        // Reopened, it reads the same.
        let again = Repository::open(backend.clone(), keys.clone()).unwrap();
        assert_eq!(restored(&again, "a", 2), a.0);
    }
}

#[test]
fn an_encrypted_repository_shows_nothing_without_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let backend: Arc<dyn Backend> = Arc::new(LocalBackend::open(dir.path()).unwrap());
    let keys = Keys::generate().unwrap();
    let repo = Repository::create(backend.clone(), options(Some(keys.clone()))).unwrap();
    let mut text = Disk(b"secret-disk-text ".repeat(CHUNK as usize / 17 * 3 + 200));
    text.0.truncate(CHUNK as usize * 3);
    backup(&repo, "payroll-db", &text, None).unwrap();
    for o in backend.list("").unwrap() {
        assert!(!o.key.contains("payroll"), "{} shows the disk's name", o.key);
        let bytes = backend.read(&o.key, 1 << 30).unwrap();
        assert!(!bytes.windows(11).any(|w| w == b"secret-disk"), "{} holds plaintext", o.key);
        assert!(!bytes.windows(7).any(|w| w == b"payroll"), "{} names the disk", o.key);
    }
    let plain_name = ChunkId(sha2_of(&text.0[..CHUNK as usize]));
    assert!(backend.stat(&plain_name.key()).unwrap().is_none(), "chunk names are the plain hash");
    assert!(matches!(Repository::open(backend.clone(), None), Err(Error::KeyMissing { .. })));
    let other = Keys::generate().unwrap();
    assert!(matches!(Repository::open(backend.clone(), Some(other)), Err(Error::WrongKey { .. })));
    let repo = Repository::open(backend, Some(keys)).unwrap();
    assert_eq!(repo.disks().unwrap(), ["payroll-db"]);
    assert_eq!(restored(&repo, "payroll-db", 1), text.0);
}

fn sha2_of(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

#[test]
fn forget_prune_and_gc_free_what_no_backup_needs() {
    let backend = Arc::new(MemoryBackend::new());
    let repo = Repository::create(backend.clone(), options(None)).unwrap();
    let mut d = Disk::new(12, 3);
    backup(&repo, "d", &d, None).unwrap();
    let mut versions = vec![(1, d.clone())];
    for v in 2..=6u64 {
        let dirty = [(CHUNK as usize * v as usize, 1000)];
        d.write(dirty[0].0, 1000, v);
        backup(&repo, "d", &d, Some((v - 1, &dirty))).unwrap();
        versions.push((v, d.clone()));
    }
    let before = chunk_objects(&*backend);
    let decisions =
        prune(&repo, "d", &KeepPolicy { last: 2, ..Default::default() }, PruneMode::DryRun)
            .unwrap();
    assert_eq!(decisions.iter().filter(|d| d.kept_by.is_empty()).count(), 4);
    assert_eq!(repo.backups("d").unwrap().len(), 6, "a dry run removes nothing");
    prune(&repo, "d", &KeepPolicy { last: 2, ..Default::default() }, PruneMode::Apply).unwrap();
    let left: Vec<u64> = repo.backups("d").unwrap().iter().map(|b| b.meta.id).collect();
    assert_eq!(left, [5, 6]);
    // A dry run counts what a collection would remove and writes no object.
    let objects = |b: &dyn Backend| {
        let mut l: Vec<_> = b.list("").unwrap().into_iter().map(|o| (o.key, o.modified)).collect();
        l.sort();
        l
    };
    let untouched = objects(&*backend);
    let dry = gc(&repo, &GcOptions { dry_run: true, ..Default::default() }, &NoProgress).unwrap();
    assert_eq!(objects(&*backend), untouched, "a dry run changed the repository");
    let report = gc(&repo, &GcOptions::default(), &NoProgress).unwrap();
    assert_eq!(dry.removed, report.removed, "dry run {dry:?}, then {report:?}");
    // Backups 5 and 6 no longer use the first versions of chunks 2, 3 and 4 (chunk 5
    // was zero, and backup 5 still has the first chunk 6).
    assert_eq!(report.removed, 3, "{report:?}");
    assert_eq!(chunk_objects(&*backend), before - report.removed as usize);
    for (v, disk) in versions.iter().filter(|(v, _)| *v >= 5) {
        assert_eq!(&restored(&repo, "d", *v), &disk.0);
    }
    repo.forget("d", 5).unwrap();
    gc(&repo, &GcOptions::default(), &NoProgress).unwrap();
    assert_eq!(restored(&repo, "d", 6), versions[5].1.0);
    assert!(verify(&repo, &[], 2, &NoProgress).unwrap().ok());
    // What is left is exactly what backup 6 names.
    let six = repo.read_index(&repo.backup("d", Some(6)).unwrap()).unwrap();
    let named: HashSet<ChunkId> = six.entries.iter().copied().filter(|c| !c.is_zero()).collect();
    assert_eq!(chunk_objects(&*backend), named.len());
    assert!(
        prune(&repo, "d", &KeepPolicy::default(), PruneMode::Apply).is_err(),
        "no rule: refused"
    );
}

#[test]
fn verify_names_a_damaged_chunk_and_every_backup_that_uses_it() {
    let backend = Arc::new(MemoryBackend::new());
    let repo = Repository::create(backend.clone(), options(None)).unwrap();
    let d = Disk::new(8, 4);
    backup(&repo, "x", &d, None).unwrap();
    backup(&repo, "x", &d, Some((1, &[]))).unwrap();
    backup(&repo, "y", &d, None).unwrap();
    let index = repo.read_index(&repo.backup("x", Some(1)).unwrap()).unwrap();
    let victim = index.entries[2];
    assert!(backend.tamper(&victim.key(), |b| {
        let n = b.len();
        b[n - 1] ^= 1;
    }));
    let missing = index.entries[3];
    backend.delete(&missing.key()).unwrap();
    let report = verify(&repo, &[], 2, &NoProgress).unwrap();
    assert!(!report.ok());
    assert_eq!(report.bad_chunks.len(), 2);
    for bad in &report.bad_chunks {
        assert!(bad.id == victim || bad.id == missing);
        assert_eq!(bad.used_by, [("x".to_string(), 1), ("x".to_string(), 2), ("y".to_string(), 1)]);
    }
    let text = report.bad_chunks.iter().map(|b| b.error.to_string()).collect::<Vec<_>>().join("; ");
    assert!(text.contains("missing") && text.contains("corrupt"), "{text}");
}

#[test]
fn two_backups_of_one_disk_cannot_run_at_once() {
    let backend = Arc::new(MemoryBackend::new());
    let repo = Repository::create(backend, options(None)).unwrap();
    let plan = BackupPlan {
        disk: "d".into(),
        size: CHUNK * 2,
        basis: Basis::Full,
        source: "s".into(),
        bitmap: None,
        time: Timestamp(0),
    };
    let first = repo.begin_backup(plan.clone()).unwrap();
    let err = repo.begin_backup(plan.clone()).unwrap_err();
    assert!(matches!(err, Error::Busy { .. }), "{err}");
    assert!(matches!(repo.forget("d", 1), Err(Error::Busy { .. })));
    first.put(0, &[1; CHUNK as usize]).unwrap();
    first.commit().unwrap();
    let mut other = plan;
    other.disk = "e".into();
    let _e = repo.begin_backup(other).unwrap();
    assert_eq!(repo.begin_backup(BackupPlan { disk: "d".into(), ..plan_of("d") }).unwrap().id(), 2);
}

fn plan_of(disk: &str) -> BackupPlan {
    BackupPlan {
        disk: disk.into(),
        size: CHUNK * 2,
        basis: Basis::Full,
        source: "s".into(),
        bitmap: None,
        time: Timestamp(0),
    }
}

#[test]
fn gc_keeps_the_chunks_of_a_backup_in_progress() {
    let backend = Arc::new(MemoryBackend::new());
    let repo = Repository::create(backend.clone(), options(None)).unwrap();
    let d = Disk::new(6, 5);
    backup(&repo, "d", &d, None).unwrap();
    repo.forget("d", 1).unwrap();
    // Old, unreferenced chunks now; a new backup starts and reuses two of them and
    // stores a new one, then gc runs before it commits.
    std::thread::sleep(Duration::from_millis(1100));
    let w = repo.begin_backup(plan_of("d")).unwrap();
    w.put(0, &d.0[..CHUNK as usize]).unwrap();
    let fresh = vec![7u8; CHUNK as usize];
    w.put(1, &fresh).unwrap();
    let report = gc(&repo, &GcOptions::default(), &NoProgress).unwrap();
    assert_eq!(report.live_writers, 1);
    let id = w.commit().unwrap().meta.id;
    assert!(verify(&repo, &[], 1, &NoProgress).unwrap().ok(), "gc removed a chunk the backup uses");
    let mut want = d.0[..CHUNK as usize * 2].to_vec();
    want[CHUNK as usize..].copy_from_slice(&fresh);
    assert_eq!(restored(&repo, "d", id), want);
    // The rest of backup 1's chunks were garbage and went.
    assert!(report.removed >= 2, "{report:?}");
}

#[test]
fn a_dead_writers_registration_does_not_hold_gc_back() {
    let dir = tempfile::tempdir().unwrap();
    let backend: Arc<dyn Backend> = Arc::new(LocalBackend::open(dir.path()).unwrap());
    let repo = Repository::create(backend.clone(), options(None)).unwrap();
    backend.create("writers/0123456789abcdef", br#"{"started":0,"pid":1}"#).unwrap();
    let report = gc(&repo, &GcOptions::default(), &NoProgress).unwrap();
    assert_eq!((report.stale_writers, report.live_writers), (1, 0));
    assert!(backend.list("writers").unwrap().is_empty());
}

/// Cuts the power after every change of a backup (and of a gc after a prune), in every
/// mode: the repository always opens, verifies, and holds either the backup whole or
/// not at all; nothing committed before is lost.
#[test]
fn a_power_cut_at_any_point_loses_at_most_the_backup_in_progress() {
    for keys in both_kinds() {
        let d1 = Disk::new(10, 6);
        let mut d2 = d1.clone();
        let dirty = [(CHUNK as usize * 3, 3000), (CHUNK as usize * 6 + 5, 100)];
        for &(at, len) in &dirty {
            d2.write(at, len, 42);
        }
        let scenario = |backend: &Arc<MemoryBackend>| -> repo::Result<()> {
            let repo = Repository::create(backend.clone(), options(keys.clone()))?;
            backup(&repo, "d", &d1, None)?;
            backup(&repo, "d", &d2, Some((1, &dirty)))?;
            prune(&repo, "d", &KeepPolicy { last: 1, ..Default::default() }, PruneMode::Apply)?;
            gc(&repo, &GcOptions::default(), &NoProgress)?;
            Ok(())
        };
        let probe = Arc::new(MemoryBackend::new());
        scenario(&probe).unwrap();
        let total = probe.changes();
        assert!(total > 20, "{total} changes");
        for cut in 0..=total {
            for mode in [CutMode::LoseUnsynced, CutMode::KeepUnsynced, CutMode::KeepEveryOther] {
                let backend = Arc::new(MemoryBackend::new());
                backend.cut_after(cut);
                let finished = scenario(&backend).is_ok();
                let after = Arc::new(backend.after_power_cut(mode));
                let Ok(repo) = Repository::open(after.clone(), keys.clone()) else {
                    // Only before the configuration was durable.
                    assert!(
                        after.list("backups").unwrap().is_empty(),
                        "cut {cut}: no config but backups"
                    );
                    continue;
                };
                let report = verify(&repo, &[], 1, &NoProgress).unwrap();
                assert!(report.ok(), "cut {cut} {mode:?}: {report:?}");
                let ids: Vec<u64> = match repo.backups("d") {
                    Ok(b) => b.iter().map(|b| b.meta.id).collect(),
                    Err(e) => panic!("cut {cut} {mode:?}: {e}"),
                };
                for id in &ids {
                    let want = if *id == 1 { &d1 } else { &d2 };
                    assert_eq!(
                        &restored(&repo, "d", *id),
                        &want.0,
                        "cut {cut} {mode:?} backup {id}"
                    );
                }
                if finished {
                    assert_eq!(ids, [2]);
                }
            }
        }
    }
}

/// Several threads back up their own disks, each with its own backend object (as
/// separate processes would), while gc runs again and again with no grace: every
/// backup verifies and restores.
#[test]
fn concurrent_backups_and_gc_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let open = || -> Arc<dyn Backend> { Arc::new(LocalBackend::open(dir.path()).unwrap()) };
    Repository::create(open(), options(None)).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let results: Mutex<Vec<(String, u64, Vec<u8>)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        let collector = s.spawn(|| {
            let repo = Repository::open(open(), None).unwrap();
            let mut runs = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match gc(&repo, &GcOptions::default(), &NoProgress) {
                    Ok(_) => runs += 1,
                    Err(Error::Busy { .. }) => {}
                    Err(e) => panic!("gc: {e}"),
                }
            }
            runs
        });
        let writers: Vec<_> = (0..3)
            .map(|w| {
                let results = &results;
                let open = &open;
                let stop = &stop;
                s.spawn(move || {
                    // A writer that panics stops the collector too, so the test fails
                    // instead of hanging.
                    struct StopOnPanic<'a>(&'a std::sync::atomic::AtomicBool);
                    impl Drop for StopOnPanic<'_> {
                        fn drop(&mut self) {
                            if std::thread::panicking() {
                                self.0.store(true, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                    }
                    let _guard = StopOnPanic(stop);
                    let repo = Repository::open(open(), None).unwrap();
                    let name = format!("disk{w}");
                    let mut d = Disk::new(16, 10 + w);
                    let mut last = backup(&repo, &name, &d, None).unwrap();
                    results.lock().unwrap().push((name.clone(), last, d.0.clone()));
                    for round in 0..12u64 {
                        let at = ((round * 7 + w) % 16) as usize * CHUNK as usize;
                        let dirty = [(at, 2000), (at / 2, 10)];
                        for &(a, l) in &dirty {
                            d.write(a, l, round * 100 + w);
                        }
                        last = backup(&repo, &name, &d, Some((last, &dirty))).unwrap();
                        results.lock().unwrap().push((name.clone(), last, d.0.clone()));
                        if round % 4 == 3 {
                            // Retention in the middle: old chunks become garbage.
                            prune(
                                &repo,
                                &name,
                                &KeepPolicy { last: 2, ..Default::default() },
                                PruneMode::Apply,
                            )
                            .unwrap();
                        }
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(collector.join().unwrap() > 0, "gc never ran");
    });
    let repo = Repository::open(open(), None).unwrap();
    let report = verify(&repo, &[], 2, &NoProgress).unwrap();
    assert!(report.ok(), "{report:?}");
    for (disk, id, data) in results.into_inner().unwrap() {
        if repo.backup(&disk, Some(id)).is_ok() {
            assert_eq!(restored(&repo, &disk, id), data, "{disk} {id}");
        }
    }
    gc(&repo, &GcOptions::default(), &NoProgress).unwrap();
    assert!(verify(&repo, &[], 2, &NoProgress).unwrap().ok());
}

/// The byte ranges given as pieces of at most `piece` bytes, last first.
fn pieces_of(disk: &Disk, ranges: &[(u64, u64)], piece: u64) -> Vec<repo::Result<(u64, Vec<u8>)>> {
    let mut v = Vec::new();
    for &(off, len) in ranges {
        let mut at = off;
        while at < off + len {
            let n = piece.min(off + len - at);
            v.push(Ok((at, disk.0[at as usize..(at + n) as usize].to_vec())));
            at += n;
        }
    }
    v.reverse();
    v
}

#[test]
fn ingest_builds_chunks_from_pieces_in_any_order() {
    let backend = Arc::new(MemoryBackend::new());
    let repo = Repository::create(backend.clone(), options(None)).unwrap();
    let d1 = Disk::new(12, 7);
    // A full backup of the allocated chunks only (every fourth is zero).
    let allocated: Vec<(u64, u64)> =
        (0..12u64).filter(|c| c % 4 != 1).map(|c| (c * CHUNK, CHUNK)).collect();
    let w = repo.begin_backup(plan_of_size("d", d1.0.len() as u64, Basis::Full)).unwrap();
    ingest(&w, &allocated, pieces_of(&d1, &allocated, 5000), 3).unwrap();
    let one = w.commit().unwrap().meta.id;
    assert_eq!(restored(&repo, "d", one), d1.0);
    // An incremental: ranges across chunk ends, one whole chunk, one in a zero chunk.
    let mut d2 = d1.clone();
    let dirty = [(CHUNK - 100, 300), (CHUNK * 3, CHUNK), (CHUNK * 5 + 7, 9), (CHUNK * 11 + 1, 50)];
    for &(at, len) in &dirty {
        d2.write(at as usize, len as usize, at);
    }
    let w = repo
        .begin_backup(plan_of_size("d", d2.0.len() as u64, Basis::Incremental { parent: one }))
        .unwrap();
    ingest(&w, &dirty, pieces_of(&d2, &dirty, 64), 2).unwrap();
    let two = w.commit().unwrap().meta;
    assert_eq!(restored(&repo, "d", two.id), d2.0);
    assert_eq!(restored(&repo, "d", one), d1.0);
    assert_eq!(two.new_chunks, 5, "chunks 0, 1, 3, 5 and 11");

    // Bad input is refused, and a failing store stops the ingest without hanging.
    let w = repo
        .begin_backup(plan_of_size("d", d2.0.len() as u64, Basis::Incremental { parent: one }))
        .unwrap();
    assert!(ingest(&w, &[(0, 10), (5, 10)], pieces_of(&d2, &[(0, 15)], 64), 1).is_err(), "overlap");
    assert!(
        ingest(&w, &[(0, 10)], pieces_of(&d2, &[(0, 20)], 64), 1).is_err(),
        "unannounced bytes"
    );
    assert!(
        ingest(&w, &[(0, 10), (CHUNK, 10)], pieces_of(&d2, &[(0, 10)], 64), 1).is_err(),
        "missing"
    );
    assert!(ingest(&w, &[(d2.0.len() as u64 - 5, 10)], Vec::new(), 1).is_err(), "past the end");
    drop(w);
    let w = repo.begin_backup(plan_of_size("d", d2.0.len() as u64, Basis::Full)).unwrap();
    backend.cut_after(3);
    let all = [(0, d2.0.len() as u64)];
    let err = ingest(&w, &all, pieces_of(&d2, &all, CHUNK / 2), 2).unwrap_err();
    assert!(err.to_string().contains("power"), "{err}");
}

fn plan_of_size(disk: &str, size: u64, basis: Basis) -> BackupPlan {
    BackupPlan { size, basis, ..plan_of(disk) }
}

#[test]
fn an_incremental_of_a_resized_disk_is_refused() {
    let backend = Arc::new(MemoryBackend::new());
    let repo = Repository::create(backend.clone(), options(None)).unwrap();
    let d = Disk::new(4, 8);
    let one = backup(&repo, "d", &d, None).unwrap();
    let before = backend.list("").unwrap().len();
    let grown = plan_of_size("d", d.0.len() as u64 + CHUNK, Basis::Incremental { parent: one });
    let err = repo.begin_backup(grown).unwrap_err().to_string();
    assert!(err.contains("take a full backup"), "{err}");
    assert_eq!(backend.list("").unwrap().len(), before, "a refused backup stores nothing");
}

#[test]
fn a_batch_shows_nothing_until_published_and_leaves_nothing_when_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let local = LocalBackend::open(dir.path()).unwrap();
    let memory = MemoryBackend::new();
    for backend in [&local as &dyn Backend, &memory] {
        backend.create("objects/a", b"old").unwrap();
        let batch = backend.batch();
        batch.add("objects/a", b"new").unwrap();
        batch.add("objects/b", b"bee").unwrap();
        assert_eq!(batch.pending(), (2, 6));
        assert!(backend.stat("objects/b").unwrap().is_none(), "visible before publish");
        let mut published = batch.publish().unwrap();
        published.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            published,
            [("objects/a".to_owned(), Created::Existed), ("objects/b".to_owned(), Created::New)]
        );
        assert_eq!(backend.read("objects/a", 10).unwrap(), b"old", "an existing object changed");
        assert_eq!(backend.read("objects/b", 10).unwrap(), b"bee");
        assert_eq!(batch.pending(), (0, 0));

        let dropped = backend.batch();
        dropped.add("objects/c", b"sea").unwrap();
        drop(dropped);
        assert!(backend.stat("objects/c").unwrap().is_none());
        assert!(dropped_nothing(dir.path()), "a temporary outlived its batch");
        assert!(backend.batch().add("../escape", b"x").is_err());
    }
}

fn dropped_nothing(root: &std::path::Path) -> bool {
    std::fs::read_dir(root.join(".tmp")).map(|d| d.count() == 0).unwrap_or(true)
}
