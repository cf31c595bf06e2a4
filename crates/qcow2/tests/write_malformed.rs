//! Writing to damaged images never panics: random bytes of a valid image (its header
//! fields, tables and data) are overwritten, and every image that still opens writable
//! takes writes, zero writes, discards, reads, a resize and flushes, each of which may
//! fail with an error but must not panic or hang.

mod write_support;

use std::sync::Arc;

use qcow2::storage::{MemStorage, Storage};
use qcow2::{OpenOptions, Qcow2Image};
use write_support::*;

fn damaged_images_do_not_panic(opts: &str, cmds: &[&str], rounds: u64) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("m.qcow2");
    create(&p, 1 << 20, opts, None);
    let ps = p.display().to_string();
    let mut args = vec!["-f", "qcow2", ps.as_str()];
    for c in cmds {
        args.extend(["-c", c]);
    }
    testkit::qemu_io(&args).unwrap();
    img(&["snapshot", "-c", "s", &ps]);
    testkit::qemu_io(["-f", "qcow2", &ps, "-c", "write -P 9 4k 8k"]).unwrap();
    let good = std::fs::read(&p).unwrap();
    let mut opened = 0;
    for seed in 0..rounds {
        let mut rng = testkit::SplitMix64(seed);
        let mut bytes = good.clone();
        for _ in 0..1 + rng.up_to(3) {
            // Mostly metadata: the header and the first clusters.
            let limit = if rng.up_to(1) == 0 { 4096 } else { bytes.len() as u64 };
            let at = rng.up_to(limit - 8) as usize;
            let n = 1 + rng.up_to(7) as usize;
            for b in &mut bytes[at..at + n] {
                *b = rng.next() as u8;
            }
        }
        let t0 = std::time::Instant::now();
        let storage: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(bytes));
        let options = OpenOptions { writable: true, ignore_backing: true, ..Default::default() };
        let Ok(image) = Qcow2Image::open(storage, options) else {
            continue;
        };
        opened += 1;
        let size = image.virtual_size();
        let pick = |rng: &mut testkit::SplitMix64| {
            let off = rng.up_to(size.saturating_sub(1));
            (off, 1 + rng.up_to((size - off).min(200_000) - 1))
        };
        for _ in 0..20 {
            let (off, len) = pick(&mut rng);
            let _ = match rng.up_to(5) {
                0 | 1 => image.write_at(&pattern(seed, len as usize), off),
                2 => image.write_zeroes(off, len, rng.up_to(1) == 1),
                3 => image.discard(off, len),
                4 => image.read_at(&mut vec![0u8; len as usize], off),
                _ => image.flush(),
            };
        }
        let _ = image.resize(size + (1 << 20));
        let _ = image.write_at(b"end", size);
        let _ = image.flush();
        let len = image.storage().len().unwrap();
        assert!(len < 64 << 20, "seed {seed}: the file grew to {len} bytes");
        assert!(t0.elapsed().as_secs() < 5, "seed {seed}: {:?}", t0.elapsed());
    }
    assert!(opened > rounds / 4, "only {opened} of {rounds} damaged images opened");
}

#[test]
fn damaged_512_byte_clusters() {
    damaged_images_do_not_panic(
        "cluster_size=512",
        &["write -P 1 0 64k", "write -z 100k 8k", "write -P 2 300k 20k"],
        1000,
    );
}

#[test]
fn damaged_64k_clusters_refcount_bits_2() {
    damaged_images_do_not_panic("refcount_bits=2", &["write -P 1 0 300k", "discard 64k 64k"], 1000);
}
