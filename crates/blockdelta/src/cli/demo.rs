//! `blockdelta demo`: the whole backup story on a 1 GiB disk in a temporary directory.
//!
//! `blockdelta serve` exports a new qcow2 disk over NBD and QMP; the demo writes through
//! NBD (keeping a model of every 4 KiB block), takes a push-mode full backup, writes
//! more, takes a pull-mode incremental (a bitmap frozen while a second bitmap starts
//! tracking, exported read-only), writes more, takes a push-mode incremental, verifies
//! the repository, restores every point in time and compares each restore with the
//! model's copy of that moment; then shows what the chunk store shares (deduplication
//! and compression), prunes the oldest backup, collects its chunks, and restores the
//! backups kept again. Exit 0 only when every check passed.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use blockdelta::repo::pull::{PullOptions, pull_backup};
use blockdelta::repo::push::{PushOptions, push_backup};
use blockdelta::repo::restore::{RestoreFormat, RestoreOptions, restore};
use blockdelta::repo::{NoProgress, Repository};
use qmp_client::QmpClient;
use repo::backend::LocalBackend;
use repo::repository::CreateOptions;
use serde_json::json;

use super::progress::human_bytes;

const SIZE: u64 = 1 << 30;
const BLOCK: u64 = 4096;

/// The arguments of `blockdelta demo` (none needed).
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Keep the temporary directory (disk, repository, restores) and print its path.
    #[arg(long)]
    keep: bool,
}

/// The disk's content: the seed of every written 4 KiB block (unwritten blocks are 0).
type Model = BTreeMap<u64, u8>;

fn block_data(index: u64, seed: u8, buf: &mut [u8]) {
    buf.fill(seed);
    buf[..8].copy_from_slice(&index.to_le_bytes());
}

/// A small deterministic generator (SplitMix64).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Writes `count` runs of 1..=`max_blocks` blocks at random places; returns the bytes.
async fn write_random(
    nbd: &mut nbd::Client<nbd::Stream>,
    model: &mut Model,
    rng: &mut Rng,
    count: u64,
    max_blocks: u64,
) -> anyhow::Result<u64> {
    let mut bytes = 0;
    for _ in 0..count {
        let n = 1 + rng.next() % max_blocks;
        let first = rng.next() % (SIZE / BLOCK - n);
        let seed = (1 + rng.next() % 255) as u8;
        let mut buf = vec![0u8; (n * BLOCK) as usize];
        for i in 0..n {
            let s = (i * BLOCK) as usize;
            block_data(first + i, seed, &mut buf[s..s + BLOCK as usize]);
            model.insert(first + i, seed);
        }
        nbd.write(first * BLOCK, &buf, false).await.context("NBD write")?;
        bytes += n * BLOCK;
    }
    nbd.flush().await.context("NBD flush")?;
    Ok(bytes)
}

/// Compares a restored raw file with the model; the first difference, if any.
fn compare(path: &Path, model: &Model) -> anyhow::Result<Option<String>> {
    let f = std::fs::File::open(path)?;
    if f.metadata()?.len() != SIZE {
        return Ok(Some(format!("size {} != {SIZE}", f.metadata()?.len())));
    }
    let chunk = 4 << 20;
    let mut buf = vec![0u8; chunk as usize];
    let mut want = vec![0u8; BLOCK as usize];
    for off in (0..SIZE).step_by(chunk as usize) {
        f.read_exact_at(&mut buf, off)?;
        for (i, got) in buf.chunks(BLOCK as usize).enumerate() {
            let index = off / BLOCK + i as u64;
            match model.get(&index) {
                Some(&seed) => block_data(index, seed, &mut want),
                None => want.fill(0),
            }
            if got != want.as_slice() {
                return Ok(Some(format!("block at byte {} differs", index * BLOCK)));
            }
        }
    }
    Ok(None)
}

struct Server {
    child: Child,
}
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for(path: &Path) -> anyhow::Result<()> {
    let start = Instant::now();
    while !path.exists() {
        if start.elapsed() > Duration::from_secs(10) {
            bail!("{} did not appear", path.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

struct Row {
    step: &'static str,
    written: u64,
    read: u64,
    stored: u64,
    time: Duration,
    id: u64,
    model: Model,
}

/// The store's side: what the backups share, then retention: the oldest backup pruned,
/// its chunks collected, and the backups kept restored again after the collection.
fn retention(repo: &Repository, dir: &Path, rows: &[Row]) -> anyhow::Result<bool> {
    let st = repo.stats()?;
    println!(
        "store: {} of backups in {} distinct chunks ({}), {} stored: deduplication {:.1}x, \
         compression {:.1}x",
        human_bytes(st.logical_bytes),
        st.chunks,
        human_bytes(st.unique_bytes),
        human_bytes(st.stored_bytes()),
        st.dedup_ratio(),
        st.compression_ratio()
    );
    let policy = repo::prune::KeepPolicy { last: 2, ..Default::default() };
    let decisions = repo::prune::prune(repo, "disk0", &policy, repo::prune::PruneMode::Apply)?;
    let removed = decisions.iter().filter(|d| d.kept_by.is_empty()).count();
    let gc = repo::gc::gc(repo, &repo::gc::GcOptions::default(), &NoProgress)?;
    println!(
        "prune --keep-last 2: {removed} backup removed; gc: {} chunks ({}) freed",
        gc.removed,
        human_bytes(gc.removed_bytes)
    );
    let mut ok = true;
    for row in rows.iter().rev().take(2) {
        let (same, verdict) = restore_and_compare(repo, dir, row);
        ok &= same;
        println!("restore of backup {} after gc: {verdict}", repo::format_id(row.id));
    }
    Ok(ok)
}

/// Restores `row`'s backup to a raw file in `dir`, compares it with the model of that
/// moment and removes it: whether it is the same, and what to print.
fn restore_and_compare(repo: &Repository, dir: &Path, row: &Row) -> (bool, String) {
    let to = dir.join(format!("restore-{}.raw", row.id));
    let opts = RestoreOptions {
        disk: "disk0".into(),
        at: Some(row.id),
        to: to.clone(),
        format: RestoreFormat::Raw,
        force: true,
        jobs: repo::pool::default_jobs(),
    };
    let t = Instant::now();
    let outcome = restore(repo, &opts, &NoProgress)
        .map_err(anyhow::Error::from)
        .and_then(|_| compare(&to, &row.model));
    let _ = std::fs::remove_file(&to);
    match outcome {
        Ok(None) => (true, format!("identical ({:.2} s)", t.elapsed().as_secs_f64())),
        Ok(Some(diff)) => (false, format!("DIFFERS: {diff}")),
        Err(e) => (false, format!("FAILED: {e:#}")),
    }
}

/// Runs `blockdelta demo`.
pub fn run(args: &DemoArgs) -> anyhow::Result<ExitCode> {
    let dir = std::env::temp_dir().join(format!("blockdelta-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = story(&dir);
    if args.keep {
        println!("kept {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn story(dir: &Path) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let disk = dir.join("disk.qcow2");
    qcow2::create::create_file(&disk, qcow2::create::CreateOptions::new(SIZE))?;
    let nbd_sock = dir.join("nbd.sock");
    let qmp_sock = dir.join("qmp.sock");
    println!("1 GiB qcow2 disk {}, served by `blockdelta serve`", disk.display());
    let child = Command::new(std::env::current_exe()?)
        .arg("serve")
        .arg("--blockdev")
        .arg(format!("driver=file,node-name=file0,filename={}", disk.display()))
        .args(["--blockdev", "driver=qcow2,node-name=disk0,file=file0"])
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", nbd_sock.display()))
        .args(["--export", "type=nbd,id=e0,node-name=disk0,name=disk0,writable=on"])
        .arg("--chardev")
        .arg(format!("socket,id=m0,path={},server=on,wait=off", qmp_sock.display()))
        .args(["--monitor", "chardev=m0"])
        .stdin(Stdio::null())
        .spawn()
        .context("starting blockdelta serve")?;
    let _server = Server { child };
    wait_for(&nbd_sock)?;
    wait_for(&qmp_sock)?;

    let repo_dir = dir.join("repo");
    std::fs::create_dir_all(&repo_dir)?;
    let repo = Repository::create(
        std::sync::Arc::new(LocalBackend::open(&repo_dir)?),
        CreateOptions::default(),
    )?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut nbd = rt.block_on(nbd::client::Client::connect(
        &nbd::uri::Target::Unix(nbd_sock.clone()),
        &nbd::client::ClientOptions {
            export: "disk0".into(),
            meta_contexts: vec![],
            extended_headers: true,
        },
    ))?;
    let mut rng = Rng(2026);
    let mut model = Model::new();
    let mut rows = Vec::new();

    // 1. Writes, then a push-mode full backup that adds bitmap "demo".
    let written = rt.block_on(write_random(&mut nbd, &mut model, &mut rng, 512, 64))?;
    let mut push = PushOptions::new(&qmp_sock, "disk0", repo_dir.join(".push"));
    push.full = true;
    push.bitmap = Some("demo".into());
    let t = Instant::now();
    let r = push_backup(&repo, &push, &NoProgress)?;
    rows.push(Row {
        step: "full (push)",
        written,
        read: r.backup.meta.bytes_read,
        stored: r.backup.meta.new_stored_bytes,
        time: t.elapsed(),
        id: r.backup.meta.id,
        model: model.clone(),
    });

    // 2. More writes, then a pull-mode incremental: in one transaction "demo" is frozen
    // (disabled) and "demo2" starts tracking; "demo" is exported read-only and read.
    let written = rt.block_on(write_random(&mut nbd, &mut model, &mut rng, 200, 16))?;
    let t = Instant::now();
    let mut q = QmpClient::connect(&qmp_sock, Duration::from_secs(30))?;
    q.execute(
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "demo2"}},
            {"type": "block-dirty-bitmap-disable", "data": {"node": "disk0", "name": "demo"}}]}),
    )?;
    // The pull reads the live disk: the demo writes nothing until it is done, which is
    // the quiesced disk that pull mode asks for.
    q.execute(
        "block-export-add",
        json!({"type": "nbd", "id": "pull", "node-name": "disk0", "name": "pull",
               "bitmaps": ["demo"]}),
    )?;
    let mut pull = PullOptions::new(format!("nbd+unix:///pull?socket={}", nbd_sock.display()));
    pull.bitmap = Some("demo".into());
    pull.disk = Some("disk0".into());
    let r = pull_backup(&repo, &pull, &NoProgress)?;
    q.execute("block-export-del", json!({"id": "pull"}))?;
    // The bitmap stays busy until the export's last connection is gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    while q.execute("block-dirty-bitmap-remove", json!({"node": "disk0", "name": "demo"})).is_err()
    {
        if Instant::now() > deadline {
            bail!("bitmap 'demo' stayed busy after its export was removed");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(q);
    rows.push(Row {
        step: "incremental (pull)",
        written,
        read: r.backup.meta.bytes_read,
        stored: r.backup.meta.new_stored_bytes,
        time: t.elapsed(),
        id: r.backup.meta.id,
        model: model.clone(),
    });

    // 3. More writes, then a push-mode incremental from "demo2".
    let written = rt.block_on(write_random(&mut nbd, &mut model, &mut rng, 100, 32))?;
    let mut push = PushOptions::new(&qmp_sock, "disk0", repo_dir.join(".push"));
    push.bitmap = Some("demo2".into());
    let t = Instant::now();
    let r = push_backup(&repo, &push, &NoProgress)?;
    rows.push(Row {
        step: "incremental (push)",
        written,
        read: r.backup.meta.bytes_read,
        stored: r.backup.meta.new_stored_bytes,
        time: t.elapsed(),
        id: r.backup.meta.id,
        model: model.clone(),
    });
    let _ = rt.block_on(nbd.disconnect());

    // 4. Verify, then restore every point in time and compare.
    let v = repo::verify::verify(&repo, &[], repo::pool::default_jobs(), &NoProgress)?;
    let mut all_ok = v.ok();
    for e in &v.bad_indexes {
        println!("verify: {e}");
    }
    for b in &v.bad_chunks {
        println!("verify: {}; used by {}", b.error, repo::verify::describe_users(&b.used_by));
    }
    println!();
    println!(
        "{:<20} {:>6} {:>12} {:>12} {:>12} {:>9}  restore of that point in time",
        "backup", "id", "written", "read", "stored", "time"
    );
    for row in &rows {
        let (same, verdict) = restore_and_compare(&repo, dir, row);
        all_ok &= same;
        println!(
            "{:<20} {:>6} {:>12} {:>12} {:>12} {:>7.2} s  {verdict}",
            row.step,
            repo::format_id(row.id),
            human_bytes(row.written),
            human_bytes(row.read),
            human_bytes(row.stored),
            row.time.as_secs_f64()
        );
    }
    println!(
        "(read: whole 64 KiB clusters, the bitmaps' granularity, around each 4 KiB write; \
         stored: the new chunks, compressed)"
    );
    println!(
        "\nverify: {} backups, {} chunks, {} problems",
        v.indexes,
        v.chunks,
        v.bad_indexes.len() + v.bad_chunks.len(),
    );
    all_ok &= retention(&repo, dir, &rows)?;
    println!("total {:.1} s", started.elapsed().as_secs_f64());
    if all_ok {
        println!("every check passed");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("SOME CHECKS FAILED");
        Ok(ExitCode::FAILURE)
    }
}
