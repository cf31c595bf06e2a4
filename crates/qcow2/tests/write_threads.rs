//! Concurrent writers on one image: each thread owns every fourth cluster (so threads
//! share L2 tables and refcount blocks but not clusters) and writes, zeroes, discards
//! and reads its clusters while another thread flushes. Every thread's reads match its
//! own model; at the end the image is clean and identical to the merged model.

mod write_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use qcow2::Qcow2Image;
use write_support::*;

const THREADS: u64 = 4;

#[test]
fn concurrent_writers_on_distinct_clusters() {
    for (cs, backing) in [(4096u64, false), (65536, true)] {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.qcow2");
        let size = 512 * cs;
        let mut model = vec![0u8; size as usize];
        if backing {
            let b = d.path().join("b.raw");
            let data = pattern(7, size as usize / 2);
            std::fs::write(&b, &data).unwrap();
            model[..data.len()].copy_from_slice(&data);
            create(&p, size, &format!("cluster_size={cs}"), Some((&b, "raw")));
        } else {
            create(&p, size, &format!("cluster_size={cs}"), None);
        }
        let image = Arc::new(Qcow2Image::open_path(&p, true).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let flusher = {
            let image = Arc::clone(&image);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    image.flush().unwrap();
                    std::thread::yield_now();
                }
            })
        };
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let image = Arc::clone(&image);
                let mut mine = model.clone();
                std::thread::spawn(move || {
                    let mut rng = testkit::SplitMix64(t + 100);
                    let n = size / cs;
                    for _ in 0..400 {
                        let c = rng.up_to(n / THREADS - 1) * THREADS + t;
                        let off = c * cs + rng.up_to(cs - 1) * (rng.up_to(1));
                        let len = 1 + rng.up_to(c * cs + cs - off - 1);
                        let range = off as usize..(off + len) as usize;
                        match rng.up_to(5) {
                            0 | 1 => {
                                let data = pattern(rng.next(), len as usize);
                                image.write_at(&data, off).unwrap();
                                mine[range].copy_from_slice(&data);
                            }
                            2 => {
                                image.write_zeroes(c * cs, cs, rng.up_to(1) == 1).unwrap();
                                mine[(c * cs) as usize..((c + 1) * cs) as usize].fill(0);
                            }
                            3 => {
                                image.discard(c * cs, cs).unwrap();
                                mine[(c * cs) as usize..((c + 1) * cs) as usize].fill(0);
                            }
                            _ => {
                                let mut buf = vec![0u8; len as usize];
                                image.read_at(&mut buf, off).unwrap();
                                assert!(buf == mine[range], "thread {t}: read at {off:#x}");
                            }
                        }
                    }
                    mine
                })
            })
            .collect();
        for (t, w) in workers.into_iter().enumerate() {
            let mine = w.join().unwrap();
            for c in (t as u64..size / cs).step_by(THREADS as usize) {
                let r = (c * cs) as usize..((c + 1) * cs) as usize;
                model[r.clone()].copy_from_slice(&mine[r]);
            }
        }
        stop.store(true, Ordering::Relaxed);
        flusher.join().unwrap();
        let image = Arc::into_inner(image).unwrap();
        let mut all = vec![0u8; size as usize];
        image.read_at(&mut all, 0).unwrap();
        assert!(all == model, "cs {cs}: merged contents");
        image.close().unwrap();
        assert_clean(&p, &format!("cs {cs}"));
        let raw = d.path().join("model.raw");
        std::fs::write(&raw, &model).unwrap();
        assert_same_as_raw(&p, &raw, &format!("cs {cs}"));
    }
}
