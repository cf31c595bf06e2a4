//! Interop: after writes through an NBD export of a real `qemu-storage-daemon`, the
//! bitmap's `x-debug-block-dirty-bitmap-sha256` and its query record (from
//! `query-named-block-nodes`) equal what blockdelta's bitmap manager computes when its
//! write hook sees the same writes.
//!
//! Fails, never skips, if `qemu-storage-daemon`, `qemu-io` or `qemu-img` is missing.

use blockdelta::block::dirty_bitmap::{AddBitmap, NodeBitmaps};
use hbitmap::HBitmap;
use testkit::qsd::StorageDaemon;
use testkit::serde_json::json;
use testkit::{SplitMix64, nbd_unix_uri, qemu_img, qemu_io};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// The granularities checked, each as its own bitmap on the same disk.
const GRANULARITIES: [u64; 4] = [512, 4 * KIB, 64 * KIB, 2 * MIB];

#[derive(Clone, Copy, Debug)]
enum Format {
    Raw,
    Qcow2,
}

/// One disk, bitmaps at some granularities, and batches of writes (`(offset, length)`);
/// QEMU and the model are compared before the first batch and after each one.
struct Scenario<'a> {
    name: &'a str,
    format: Format,
    size: u64,
    granularities: &'a [u64],
    batches: Vec<Vec<(u64, u64)>>,
}

fn bitmap_name(granularity: u64) -> String {
    format!("bm{granularity}")
}

fn run_scenario(scenario: &Scenario) {
    let Scenario { name, format, size, granularities, ref batches } = *scenario;
    let builder = StorageDaemon::qemu();
    let image = builder.path("disk.img");
    let nbd = builder.path("nbd.sock");
    let driver = match format {
        Format::Raw => {
            std::fs::File::create(&image).unwrap().set_len(size).unwrap();
            "raw"
        }
        Format::Qcow2 => {
            qemu_img(["create", "-q", "-f", "qcow2", image.to_str().unwrap(), &size.to_string()])
                .unwrap();
            "qcow2"
        }
    };
    let mut daemon = builder
        .arg("--blockdev")
        .arg(format!("driver=file,node-name=file0,filename={}", image.display()))
        .arg("--blockdev")
        .arg(format!("driver={driver},node-name=disk0,file=file0"))
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", nbd.display()))
        .arg("--export")
        .arg("type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on")
        .start()
        .unwrap();

    let model = NodeBitmaps::new("disk0", size, None, None);
    for &granularity in granularities {
        let bits = HBitmap::new(size, granularity.trailing_zeros()).unwrap().bits();
        assert_ne!(bits % 64, 0, "{name}: {bits} bits at granularity {granularity}");
        daemon.execute_ok(
            "block-dirty-bitmap-add",
            json!({"node": "disk0", "name": bitmap_name(granularity), "granularity": granularity}),
        );
        model
            .add(&AddBitmap {
                name: bitmap_name(granularity),
                granularity: Some(granularity),
                ..Default::default()
            })
            .unwrap();
    }
    check(&mut daemon, name, "before any write", size, granularities, &model);

    let uri = nbd_unix_uri(&nbd, "disk0");
    for (i, batch) in batches.iter().enumerate() {
        let mut args = vec!["-f".to_owned(), "raw".to_owned()];
        for &(offset, len) in batch {
            assert!(len > 0 && offset + len <= size, "{name}: write {offset}+{len}");
            args.push("-c".to_owned());
            args.push(format!("write -q -P {} {offset} {len}", i % 255 + 1));
            model.set_dirty(offset, len);
        }
        args.push(uri.clone());
        qemu_io(&args).unwrap();
        let when = if batch.len() <= 10 {
            format!("after batch {i}: {batch:?}")
        } else {
            format!("after batch {i} ({} writes)", batch.len())
        };
        check(&mut daemon, name, &when, size, granularities, &model);
    }
    assert!(daemon.quit().unwrap().success());
}

/// Compares QEMU's query record and SHA-256 of each bitmap with blockdelta's.
fn check(
    daemon: &mut StorageDaemon,
    scenario: &str,
    when: &str,
    size: u64,
    granularities: &[u64],
    model: &NodeBitmaps,
) {
    let ours = model.query();
    let nodes = daemon.execute_ok("query-named-block-nodes", json!({"flat": true}));
    let disk = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|node| node["node-name"] == "disk0")
        .unwrap_or_else(|| panic!("no node disk0 in {nodes}"));
    assert_eq!(disk["image"]["virtual-size"], size, "{scenario}: virtual size");
    let bitmaps = disk["dirty-bitmaps"].as_array().unwrap();
    for &granularity in granularities {
        let name = bitmap_name(granularity);
        let mine = ours.iter().find(|b| b.name.as_deref() == Some(name.as_str())).unwrap();
        let info = bitmaps
            .iter()
            .find(|b| b["name"] == name.as_str())
            .unwrap_or_else(|| panic!("{scenario}: no bitmap {name} in {bitmaps:?}"));
        assert_eq!(info["granularity"], u64::from(mine.granularity), "{scenario}: {name}");
        assert_eq!(info["count"].as_u64(), Some(mine.count), "{scenario}: count of {name} {when}");
        for (key, value) in
            [("recording", mine.recording), ("busy", mine.busy), ("persistent", mine.persistent)]
        {
            assert_eq!(info[key].as_bool(), Some(value), "{scenario}: {key} of {name}");
        }
        assert!(info.get("inconsistent").is_none(), "{scenario}: {name} is consistent");
        let sha = daemon.execute_ok(
            "x-debug-block-dirty-bitmap-sha256",
            json!({"node": "disk0", "name": name}),
        );
        assert_eq!(
            sha["sha256"].as_str(),
            Some(model.sha256(&name).unwrap().as_str()),
            "{scenario}: sha256 of {name} {when}"
        );
    }
}

/// Disk of 130 MiB + 211.5 KiB: at every granularity the bit count is not a multiple of
/// 64, and at 4 KiB and up the last granule is partial (512 bytes to 3.5 KiB of it).
const EDGE_SIZE: u64 = 65 * 2 * MIB + 3 * 64 * KIB + 5 * 4 * KIB + 3 * 512;

#[test]
fn edge_cases_qcow2() {
    let s = EDGE_SIZE;
    let mut word_boundaries = Vec::new();
    for g in GRANULARITIES {
        // Straddles the first 64-bit word boundary of the bitmap at granularity g.
        word_boundaries.push((64 * g - 1, 2));
    }
    run_scenario(&Scenario {
        name: "edge cases (qcow2)",
        format: Format::Qcow2,
        size: s,
        granularities: &GRANULARITIES,
        batches: vec![
            // Unaligned starts and ends, tiny writes, granule-crossing writes.
            vec![
                (1, 1),
                (511, 2),
                (4095, 4098),
                (65535, 3),
                (2 * MIB - 1, 2),
                (3 * 2 * MIB + 12345, 70000),
                (5 * MIB + 513, 511),
            ],
            // Adjacent writes, and overlapping and contained ones.
            vec![
                (10 * MIB, 4096),
                (10 * MIB + 4096, 4096),
                (11 * MIB + 100, 900),
                (11 * MIB + 1000, 24),
                (20 * MIB, 100_000),
                (20 * MIB + 50_000, 100_000),
                (20 * MIB + 10, 10),
                (10 * MIB + 2048, 4096),
            ],
            // The last byte, and the partial last granule.
            vec![(s - 1, 1)],
            vec![(s - 3000, 1000), (s - 4096 - 512, 512)],
            word_boundaries,
            // A large write across several 2 MiB granules, unaligned at both ends.
            vec![(40 * MIB + 1, 5 * MIB + 3)],
            // Already-dirty areas again: nothing changes.
            vec![(1, 1), (s - 1, 1), (20 * MIB + 1, 3)],
        ],
    });
}

/// A disk of 64 granules plus one sector at each granularity: the bitmap is one full
/// word plus a single bit, which only the last bytes of the disk set.
#[test]
fn single_bit_tail_word_raw() {
    for g in GRANULARITIES {
        let size = 64 * g + 512;
        run_scenario(&Scenario {
            name: &format!("64 granules + 512 bytes at {g} (raw)"),
            format: Format::Raw,
            size,
            granularities: &[g],
            batches: vec![
                vec![(size - 1, 1)],
                vec![(0, 1)],
                vec![(64 * g - 1, 1)],
                vec![(g, 64 * g - g), (size - 512, 512)],
            ],
        });
    }
}

/// 100 MiB + 471.5 KiB: bit counts not multiples of 64, partial last granules.
const RANDOM_SIZE: u64 = 100 * MIB + 7 * 64 * KIB + 3 * 4 * KIB + 3 * 512;

fn random_writes(seed: u64, count: usize, size: u64) -> Vec<(u64, u64)> {
    let mut rng = SplitMix64(seed);
    (0..count)
        .map(|_| {
            let len = match rng.next() % 10 {
                0..=5 => 1 + rng.up_to(8 * KIB - 1),
                6..=8 => 1 + rng.up_to(256 * KIB - 1),
                _ => 1 + rng.up_to(4 * MIB - 1),
            };
            let offset = rng.next() % (size - len + 1);
            if rng.next().is_multiple_of(8) {
                // Sector-aligned now and then, as real guests write.
                let offset = offset / 512 * 512;
                (offset, (len.div_ceil(512) * 512).min(size - offset))
            } else {
                (offset, len)
            }
        })
        .collect()
}

#[test]
fn random_writes_qcow2() {
    let mut writes = random_writes(0x0005_eedb_10cd_e17a, 200, RANDOM_SIZE);
    // Make sure the tail is covered too.
    writes.push((RANDOM_SIZE - 700, 700));
    run_scenario(&Scenario {
        name: "200 random writes (qcow2)",
        format: Format::Qcow2,
        size: RANDOM_SIZE,
        granularities: &GRANULARITIES,
        batches: writes.chunks(50).map(<[_]>::to_vec).collect(),
    });
}

#[test]
fn random_writes_raw_one_check() {
    // The same in raw format, with another seed, checked once at the end.
    let writes = random_writes(42, 200, RANDOM_SIZE);
    run_scenario(&Scenario {
        name: "200 random writes (raw)",
        format: Format::Raw,
        size: RANDOM_SIZE,
        granularities: &GRANULARITIES,
        batches: vec![writes],
    });
}
