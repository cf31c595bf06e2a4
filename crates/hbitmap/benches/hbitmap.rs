//! Benchmarks of the hierarchical bitmap at the scale of a 16 TiB disk tracked at 64 KiB
//! granularity: 2^44 items, 2^28 bits (32 MiB of bottom level).
//!
//! Run with `cargo bench -p hbitmap`. Besides criterion's figures, the run prints the
//! memory use and a direct merge-versus-OR-loop comparison measured in the same process.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::Criterion;
use hbitmap::HBitmap;

/// log2 of the items per bit: 64 KiB.
const G: u32 = 16;
/// Bits of the big bitmaps.
const BITS: u64 = 1 << 28;
/// Items of the big bitmaps.
const SIZE: u64 = BITS << G;
const MIB: u64 = 1 << 20;

/// xorshift64*: a fixed-seed generator, cheap enough to run inside a timed loop.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Whether the command line's filters (if any) may select benchmarks named `name`. Used
/// only to skip the expensive untimed setup of benchmarks that the filters exclude; each
/// filter is split at `|` and matched as a substring.
fn selected(name: &str) -> bool {
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    filters.is_empty()
        || filters.iter().flat_map(|f| f.split('|')).any(|f| name.contains(f) || f.contains(name))
}

fn big() -> HBitmap {
    HBitmap::new(SIZE, G).expect("2^28 bits")
}

/// A big bitmap holding random words (each bit dirty with probability 1/2).
fn random_big(seed: u64) -> HBitmap {
    let mut bm = big();
    let mut rng = Rng(seed);
    let chunk = 1u64 << 24 << G; // 2^24 bits = 2 MiB of words per call
    let mut buf = vec![0u8; (1 << 24) / 8];
    for start in (0..SIZE).step_by(chunk as usize) {
        for word in buf.chunks_exact_mut(8) {
            word.copy_from_slice(&rng.next().to_le_bytes());
        }
        bm.deserialize_part(&buf, start, chunk).expect("aligned chunk");
    }
    bm
}

/// Memory of an empty 2^28-bit bitmap against its bits.
fn report_memory() {
    let bm = big();
    let heap = bm.heap_bytes();
    let bits_bytes = BITS / 8;
    println!(
        "memory: 2^28 bits (2^44 items at granularity 16): heap_bytes = {heap} B, \
         bits / 8 = {bits_bytes} B, ratio = {:.5} (goal <= 1.02)",
        heap as f64 / bits_bytes as f64
    );
}

fn bench_next_dirty_empty(c: &mut Criterion) {
    let bm = big();
    c.bench_function("next_dirty/empty_2^28_bits_from_0", |b| {
        b.iter(|| black_box(&bm).next_dirty(black_box(0), u64::MAX))
    });
}

fn bench_set_1mib(c: &mut Criterion) {
    let mut bm = big();
    let mut rng = Rng(0x5eed);
    c.bench_function("set/1MiB_at_64KiB_granularity_random_x", |b| {
        b.iter_custom(|iters| {
            // Keep the bitmap at most half full between samples (not timed).
            if bm.dirty_bits() > BITS / 2 {
                bm.reset_all();
            }
            let start = Instant::now();
            for _ in 0..iters {
                let x = rng.next() % (SIZE - MIB);
                bm.set(black_box(x), MIB).expect("in range");
            }
            start.elapsed()
        })
    });
    // A 1 TiB disk at 64 KiB (2^24 bits, 2 MiB of words, which stays in the cache), x
    // random: the cost of the set itself for a disk of a common size.
    let tib = 1u64 << 40;
    let mut small = HBitmap::new(tib, G).expect("2^24 bits");
    c.bench_function("set/1MiB_at_64KiB_granularity_random_x_1TiB_disk", |b| {
        b.iter_custom(|iters| {
            if small.dirty_bits() > small.bits() / 2 {
                small.reset_all();
            }
            let start = Instant::now();
            for _ in 0..iters {
                let x = rng.next() % (tib - MIB);
                small.set(black_box(x), MIB).expect("in range");
            }
            start.elapsed()
        })
    });
    // The same with x advancing steadily (1 MiB + 4 KiB per call): the words touched are
    // next to the previous ones, so this is the cost without a cache miss.
    let mut bm = big();
    let mut x = 0u64;
    c.bench_function("set/1MiB_at_64KiB_granularity_sequential_x", |b| {
        b.iter_custom(|iters| {
            if bm.dirty_bits() > BITS / 2 {
                bm.reset_all();
            }
            let start = Instant::now();
            for _ in 0..iters {
                x = (x + MIB + 4096) % (SIZE - MIB);
                bm.set(black_box(x), MIB).expect("in range");
            }
            start.elapsed()
        })
    });
    // Reference for the random case: OR one bit into a random word of a plain 2^22-word
    // vector (the cache and TLB miss that any bitmap of this size pays).
    let mut words = vec![0u64; (BITS / 64) as usize];
    let mut rng = Rng(0x5eed);
    c.bench_function("set/reference_random_word_or_2^22_words", |b| {
        b.iter(|| {
            let i = (rng.next() % (BITS / 64)) as usize;
            words[black_box(i)] |= 1;
        })
    });
    // The same where each index depends on the word read before (as one `set` after
    // another effectively does: a set is too long for the CPU to overlap two misses).
    let mut last = 0u64;
    c.bench_function("set/reference_random_word_or_dependent", |b| {
        b.iter(|| {
            let i = ((rng.next() ^ (last & 2)) % (BITS / 64)) as usize;
            last = words[i];
            words[i] = last | 1;
        })
    });
}

/// A 2^28-bit bitmap with a run of 1..8 bits every ~256 bits; returns it and its run
/// count.
fn scattered_runs() -> (HBitmap, usize) {
    let mut bm = big();
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    let mut bit = 0u64;
    loop {
        bit += 200 + rng.next() % 112; // gaps of 200..311 bits, 256 on average
        let len = 1 + rng.next() % 8;
        if bit + len > BITS {
            break;
        }
        bm.set(bit << G, len << G).expect("in range");
        bit += len;
    }
    let runs = bm.dirty_runs(0).count();
    (bm, runs)
}

fn bench_dirty_runs(c: &mut Criterion) {
    if !selected("dirty_runs") {
        return;
    }
    let (bm, runs) = scattered_runs();
    println!("dirty_runs: {runs} scattered runs in 2^28 bits");
    assert!(runs >= 1_000_000);
    let mut group = c.benchmark_group("dirty_runs");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(8));
    group.bench_function("iterate_1M_scattered_runs", |b| {
        b.iter(|| {
            let mut total = 0u64;
            for run in black_box(&bm).dirty_runs(0) {
                total += run.end - run.start;
            }
            total
        })
    });
    group.finish();
}

/// The reference: OR one `Vec<u64>` of 2^22 words into another.
fn or_loop(dst: &mut [u64], src: &[u64]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d |= *s;
    }
}

fn random_words(seed: u64) -> Vec<u64> {
    let mut rng = Rng(seed);
    (0..BITS / 64).map(|_| rng.next()).collect()
}

fn bench_merge(c: &mut Criterion) {
    if !selected("merge") {
        return;
    }
    let mut dst = random_big(1);
    let src = random_big(2);
    let mut a = random_words(3);
    let b_words = random_words(4);

    // Same-process comparison: median of 21 timed runs each.
    let median = |f: &mut dyn FnMut()| {
        let mut times: Vec<Duration> = (0..21)
            .map(|_| {
                let start = Instant::now();
                f();
                start.elapsed()
            })
            .collect();
        times.sort();
        times[times.len() / 2]
    };
    let t_merge = median(&mut || dst.merge(black_box(&src)).expect("same size"));
    let t_or = median(&mut || or_loop(black_box(&mut a), black_box(&b_words)));
    println!(
        "merge: 2^28 bits, equal granularity: merge {:.3} ms, OR loop over 2^22 words {:.3} ms, \
         ratio {:.2} (goal <= 2)",
        t_merge.as_secs_f64() * 1e3,
        t_or.as_secs_f64() * 1e3,
        t_merge.as_secs_f64() / t_or.as_secs_f64()
    );

    let mut group = c.benchmark_group("merge_2^28_bits");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(6));
    group.bench_function("hbitmap_merge", |b| {
        b.iter(|| dst.merge(black_box(&src)).expect("same size"))
    });
    group.bench_function("reference_or_loop_2^22_words", |b| {
        b.iter(|| or_loop(black_box(&mut a), black_box(&b_words)))
    });
    group.finish();
}

fn main() {
    report_memory();
    let mut c = Criterion::default().configure_from_args();
    bench_next_dirty_empty(&mut c);
    bench_set_1mib(&mut c);
    bench_dirty_runs(&mut c);
    bench_merge(&mut c);
    c.final_summary();
}
