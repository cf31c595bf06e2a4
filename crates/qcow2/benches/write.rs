//! Write path benchmark: 4 KiB strided ("random") writes and 1 MiB sequential writes
//! into a fresh qcow2 image and into a fully allocated one (preallocation=metadata),
//! blockdelta's engine against `qemu-img bench -w` on the same kind of image, with
//! `-t none` (O_DIRECT) and `-t writeback`, in the same run.
//!
//! Run: `cargo bench -p qcow2 --bench write`. Criterion measures the engine; then a
//! table compares the engine with `qemu-img bench -d 1` (one request at a time, as the
//! engine's single-threaded loop) and prints the ratio engine time / QEMU time.
//! Both figures exclude the final flush and close (`qemu-img bench` reports the time to
//! complete the requests).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use qcow2::storage::{FileOptions, Storage};
use qcow2::{OpenOptions, Qcow2Image};

const IMAGE_SIZE: u64 = 4 << 30;

#[derive(Clone, Copy)]
struct Workload {
    name: &'static str,
    fresh: bool,
    size: u64,
    step: u64,
    count: u64,
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        name: "4k-strided-fresh",
        fresh: true,
        size: 4096,
        step: (1 << 20) + 4096,
        count: 4000,
    },
    Workload { name: "1m-seq-fresh", fresh: true, size: 1 << 20, step: 1 << 20, count: 256 },
    Workload {
        name: "4k-strided-allocated",
        fresh: false,
        size: 4096,
        step: (1 << 20) + 4096,
        count: 4000,
    },
    Workload { name: "1m-seq-allocated", fresh: false, size: 1 << 20, step: 1 << 20, count: 256 },
];

fn qemu_img() -> PathBuf {
    testkit::require_tool("qemu-img")
}

fn make_image(dir: &Path, fresh: bool) -> PathBuf {
    let p = dir.join(if fresh { "fresh.qcow2" } else { "alloc.qcow2" });
    let _ = std::fs::remove_file(&p);
    let mut cmd = Command::new(qemu_img());
    cmd.args(["create", "-q", "-f", "qcow2"]);
    if !fresh {
        cmd.args(["-o", "preallocation=metadata"]);
    }
    let ok = cmd.arg(&p).arg(IMAGE_SIZE.to_string()).status().unwrap().success();
    assert!(ok, "qemu-img create");
    p
}

/// The engine's time for the workload (image opened with O_DIRECT when `direct`).
fn engine_run(path: &Path, w: Workload, direct: bool) -> Duration {
    let storage: Arc<dyn Storage> =
        Arc::new(FileOptions::new().write(true).direct(direct).open(path).unwrap());
    let image = Qcow2Image::open(storage, OpenOptions { writable: true, ..OpenOptions::default() })
        .unwrap();
    // A 4 KiB-aligned buffer, as QEMU's: O_DIRECT needs no bounce buffer.
    let mut backing = vec![0xa5u8; w.size as usize + 4096];
    let skip = backing.as_ptr().align_offset(4096).min(4096);
    let buf = &mut backing[skip..skip + w.size as usize];
    let mut off = 0u64;
    let start = Instant::now();
    for _ in 0..w.count {
        image.write_at(buf, off).unwrap();
        off = (off + w.step) % IMAGE_SIZE;
    }
    let t = start.elapsed();
    image.close().unwrap();
    t
}

/// The engine's time with `threads` threads taking the requests in turn (as QEMU's
/// queue depth).
fn engine_run_threads(path: &Path, w: Workload, direct: bool, threads: u64) -> Duration {
    let storage: Arc<dyn Storage> =
        Arc::new(FileOptions::new().write(true).direct(direct).open(path).unwrap());
    let image = Qcow2Image::open(storage, OpenOptions { writable: true, ..OpenOptions::default() })
        .unwrap();
    let next = std::sync::atomic::AtomicU64::new(0);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut backing = vec![0xa5u8; w.size as usize + 4096];
                let skip = backing.as_ptr().align_offset(4096).min(4096);
                let buf = &mut backing[skip..skip + w.size as usize];
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= w.count {
                        break;
                    }
                    image.write_at(buf, (i * w.step) % IMAGE_SIZE).unwrap();
                }
            });
        }
    });
    let t = start.elapsed();
    image.close().unwrap();
    t
}

/// `qemu-img bench`'s time for the workload with queue depth `depth`.
fn qemu_run_depth(path: &Path, w: Workload, cache: &str, depth: u64) -> Duration {
    let out = Command::new(qemu_img())
        .args(["bench", "-w", "-f", "qcow2", "-d", &depth.to_string(), "--pattern", "165"])
        .args(["-t", cache])
        .args(["-c", &w.count.to_string(), "-s", &w.size.to_string(), "-S", &w.step.to_string()])
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "qemu-img bench: {text}{}", String::from_utf8_lossy(&out.stderr));
    let secs: f64 = text
        .split("Run completed in ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse qemu-img bench output: {text}"));
    Duration::from_secs_f64(secs)
}

/// `qemu-img bench`'s time for the workload, one request at a time.
fn qemu_run(path: &Path, w: Workload, cache: &str) -> Duration {
    qemu_run_depth(path, w, cache, 1)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir_in(
        std::env::var_os("BENCH_DIR").unwrap_or_else(|| std::env::temp_dir().into()),
    )
    .unwrap();
    let mut group = c.benchmark_group("qcow2-write");
    group.sample_size(10).measurement_time(Duration::from_secs(5));
    for w in WORKLOADS {
        for (cache, direct) in [("none", true), ("writeback", false)] {
            group.bench_function(format!("{}/{cache}", w.name), |b| {
                b.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| engine_run(&make_image(dir.path(), w.fresh), w, direct))
                        .sum()
                })
            });
        }
    }
    group.finish();

    println!(
        "\nengine vs qemu-img bench -d 1 (median of 3 runs; ratio = engine / qemu, < 1 is faster)"
    );
    println!(
        "{:<24} {:<10} {:>12} {:>12} {:>8}",
        "workload", "cache", "engine", "qemu-img", "ratio"
    );
    for w in WORKLOADS {
        for (cache, direct) in [("none", true), ("writeback", false)] {
            let mut ours = Vec::new();
            let mut theirs = Vec::new();
            for _ in 0..3 {
                ours.push(engine_run(&make_image(dir.path(), w.fresh), w, direct));
                theirs.push(qemu_run(&make_image(dir.path(), w.fresh), w, cache));
            }
            let (a, b) = (median(ours), median(theirs));
            println!(
                "{:<24} {:<10} {:>10.1}ms {:>10.1}ms {:>8.2}",
                w.name,
                cache,
                a.as_secs_f64() * 1e3,
                b.as_secs_f64() * 1e3,
                a.as_secs_f64() / b.as_secs_f64()
            );
        }
    }
}

/// 4 KiB writes with O_DIRECT at queue depth 16: QEMU's asynchronous requests against
/// 16 engine threads (on however many cores the machine has).
fn depth_table() {
    let dir = tempfile::tempdir_in(
        std::env::var_os("BENCH_DIR").unwrap_or_else(|| std::env::temp_dir().into()),
    )
    .unwrap();
    println!(
        "\nqueue depth 16, -t none: engine with 16 threads vs qemu-img bench -d 16 (median of 3)"
    );
    println!("{:<24} {:>12} {:>12} {:>8}", "workload", "engine", "qemu-img", "ratio");
    for w in WORKLOADS.iter().filter(|w| w.size == 4096) {
        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        for _ in 0..3 {
            ours.push(engine_run_threads(&make_image(dir.path(), w.fresh), *w, true, 16));
            theirs.push(qemu_run_depth(&make_image(dir.path(), w.fresh), *w, "none", 16));
        }
        let (a, b) = (median(ours), median(theirs));
        println!(
            "{:<24} {:>10.1}ms {:>10.1}ms {:>8.2}",
            w.name,
            a.as_secs_f64() * 1e3,
            b.as_secs_f64() * 1e3,
            a.as_secs_f64() / b.as_secs_f64()
        );
    }
}

fn bench_depth(_: &mut Criterion) {
    depth_table();
}

criterion_group!(benches, bench, bench_depth);
criterion_main!(benches);
