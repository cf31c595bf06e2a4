//! `check` and `repair_leaks` on damaged input: random corruption of images made by
//! QEMU never panics, and absurd file sizes are refused instead of allocated.

mod read_support;

use std::io;

use qcow2::check::{MAX_CHECK_CLUSTERS, check, repair_leaks};
use qcow2::create::{CreateOptions, create};
use qcow2::storage::{MemStorage, Storage};
use read_support::*;
use testkit::SplitMix64;

/// Images with every kind of metadata: compressed clusters, snapshots, bitmaps, small
/// clusters, narrow and wide refcounts.
fn seeds() -> Vec<Vec<u8>> {
    let d = Dir::new();
    let mut out = vec![];
    for (i, opts) in ["cluster_size=512", "refcount_bits=1,cluster_size=4096", "refcount_bits=64"]
        .into_iter()
        .enumerate()
    {
        let p = d.path(&format!("s{i}.qcow2"));
        read_support::create(&p, "2M", opts, None);
        let ps = p.display().to_string();
        img(&["bitmap", "--add", &ps, "b"]);
        io("qcow2", &p, &["write -P 1 0 100k", "write -c -P 2 1M 64k"]);
        if i != 1 {
            img(&["snapshot", "-c", "s", &ps]);
            io("qcow2", &p, &["write -P 3 32k 64k"]);
        }
        out.push(std::fs::read(&p).unwrap());
    }
    out
}

#[test]
fn random_damage_never_panics() {
    let seeds = seeds();
    let mut rng = SplitMix64(0x00c0_ffee);
    for round in 0..3000 {
        let mut bytes = seeds[round % seeds.len()].clone();
        // Damage metadata-heavy areas more often: the first clusters and 8-byte words.
        for _ in 0..1 + rng.up_to(8) {
            let len = bytes.len() as u64;
            let at = if rng.up_to(2) == 0 { rng.up_to(len.min(1 << 12)) } else { rng.up_to(len) };
            let at = (at.min(len - 8) & !7) as usize;
            match rng.up_to(4) {
                0 => bytes[at] ^= 1 << rng.up_to(7),
                1 => bytes[at..at + 8].copy_from_slice(&rng.next().to_be_bytes()),
                2 => bytes[at..at + 8].copy_from_slice(&(rng.up_to(len * 2) & !511).to_be_bytes()),
                _ => bytes.truncate(at.max(1)),
            }
            if bytes.len() < 8 {
                break;
            }
        }
        let storage = MemStorage::from_bytes(bytes);
        if check(&storage).is_ok() {
            // Repairing damaged images may do anything to them but panic.
            let _ = repair_leaks(&storage);
            let _ = check(&storage);
        }
    }
}

/// Storage that claims to be huge and reads as zeroes past its bytes.
struct Huge(MemStorage, u64);

impl Storage for Huge {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, _: &[u8], _: u64) -> io::Result<()> {
        Err(io::Error::other("read-only"))
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64) -> io::Result<()> {
        Err(io::Error::other("read-only"))
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.1)
    }
    fn set_len(&self, _: u64) -> io::Result<()> {
        Err(io::Error::other("read-only"))
    }
}

#[test]
fn absurd_file_sizes_are_refused() {
    let m = MemStorage::new();
    create(&m, CreateOptions { cluster_size: 512, ..CreateOptions::new(1 << 20) }).unwrap();
    let huge = Huge(m, (MAX_CHECK_CLUSTERS + 1) * 512);
    assert!(check(&huge).is_err());
    assert!(repair_leaks(&huge).is_err());
    // Just below the limit is checked (the extra clusters are neither used nor leaked).
    let m = MemStorage::new();
    create(&m, CreateOptions::new(1 << 20)).unwrap();
    let r = check(&Huge(m, 1 << 30)).unwrap();
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(r.image_end_offset, 0x40000);
}

#[test]
fn garbage_is_an_error() {
    for bytes in [vec![], vec![0u8; 100], b"QFI\xfb".to_vec(), vec![0xff; 4096]] {
        assert!(check(&MemStorage::from_bytes(bytes)).is_err());
    }
}
