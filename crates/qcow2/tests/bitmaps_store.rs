//! Storing and removing persistent bitmaps: QEMU's tools see what was stored (flags,
//! SHA-256, count), `qemu-img check` stays clean, and a power cut at any flush leaves
//! either the old or the new set of bitmaps.

use std::path::Path;
use std::sync::Arc;

use hbitmap::HBitmap;
use qcow2::bitmap_store::{Intent, StoreError, StoreForm, StoredBitmap};
use qcow2::bitmaps::{self, BitmapsExtension, DirectoryEntry};
use qcow2::header::{AUTOCLEAR_BITMAPS, EXT_BITMAPS};
use qcow2::storage::{FileStorage, MemStorage, Storage, Survivors};
use qcow2::{OpenOptions, Qcow2Image};
use testkit::qsd::StorageDaemon;
use testkit::serde_json::{Value, json};
use testkit::{SplitMix64, qemu_img};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

fn open(storage: Arc<dyn Storage>, writable: bool) -> Qcow2Image {
    Qcow2Image::open(storage, OpenOptions { writable, ignore_backing: true, ..Default::default() })
        .unwrap()
}

fn open_file(path: &Path) -> (Arc<dyn Storage>, Qcow2Image) {
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::open(path, true).unwrap());
    let image = open(storage.clone(), true);
    (storage, image)
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn directory(storage: &dyn Storage, image: &Qcow2Image) -> Option<Vec<DirectoryEntry>> {
    let header = image.header();
    if header.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
        return None;
    }
    let data = header.extension(EXT_BITMAPS)?;
    let ext = BitmapsExtension::parse(data, image.cluster_size()).unwrap();
    Some(
        bitmaps::read_directory(storage, &ext, image.cluster_size(), image.virtual_size()).unwrap(),
    )
}

fn info(img: &str) -> Value {
    let out = qemu_img(["info", "--output=json", img]).unwrap();
    testkit::serde_json::from_str(&out).unwrap()
}

/// `(name, granularity, flags)` of `qemu-img info`, sorted by name.
fn info_bitmaps(img: &str) -> Vec<(String, u64, Vec<String>)> {
    let v = info(img);
    let list = v["format-specific"]["data"]["bitmaps"].as_array().cloned().unwrap_or_default();
    let mut out: Vec<_> = list
        .iter()
        .map(|b| {
            let flags =
                b["flags"].as_array().unwrap().iter().map(|f| f.as_str().unwrap().into()).collect();
            (b["name"].as_str().unwrap().to_string(), b["granularity"].as_u64().unwrap(), flags)
        })
        .collect();
    out.sort();
    out
}

/// `qemu-img check --output=json`: (corruptions, leaks).
fn qemu_check(img: &str) -> (u64, u64) {
    let out = std::process::Command::new(testkit::require_tool("qemu-img"))
        .args(["check", "--output=json", img])
        .output()
        .unwrap();
    let v: Value = testkit::serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    (n("corruptions") + n("check-errors"), n("leaks"))
}

fn assert_clean(img: &str) {
    assert_eq!(qemu_check(img), (0, 0), "qemu-img check {img}");
}

fn dirty(size: u64, gran_bits: u32, seed: u64, writes: usize) -> HBitmap {
    let mut b = HBitmap::new(size, gran_bits).unwrap();
    let mut rng = SplitMix64(seed);
    for _ in 0..writes {
        let len = 1 + rng.up_to(256 * KIB);
        let off = rng.up_to(size - len);
        b.set(off, len).unwrap();
    }
    b
}

/// Daemon view: name → (sha256, count).
fn daemon_view(img: &str, names: &[&str]) -> Vec<(String, u64)> {
    let mut daemon = StorageDaemon::qemu()
        .arg("--blockdev")
        .arg(format!("driver=file,node-name=file0,filename={img},read-only=on"))
        .arg("--blockdev")
        .arg("driver=qcow2,node-name=disk0,file=file0,read-only=on")
        .start()
        .unwrap();
    let nodes = daemon.execute_ok("query-named-block-nodes", json!({"flat": true}));
    let disk = nodes.as_array().unwrap().iter().find(|n| n["node-name"] == "disk0").unwrap();
    let list = disk["dirty-bitmaps"].as_array().cloned().unwrap_or_default();
    names
        .iter()
        .map(|name| {
            let reply = daemon.execute_ok(
                "x-debug-block-dirty-bitmap-sha256",
                json!({"node": "disk0", "name": name}),
            );
            let rec = list.iter().find(|b| b["name"] == *name).unwrap();
            (reply["sha256"].as_str().unwrap().to_string(), rec["count"].as_u64().unwrap())
        })
        .collect()
}

fn mark_all_in_use(storage: &dyn Storage, image: &Qcow2Image) {
    let header = image.header();
    let ext = BitmapsExtension::parse(header.extension(EXT_BITMAPS).unwrap(), image.cluster_size())
        .unwrap();
    let mut entries = directory(storage, image).unwrap();
    bitmaps::mark_in_use(storage, &ext, &mut entries).unwrap();
}

#[test]
fn stored_bitmaps_read_back_in_qemu_and_replace_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("s.qcow2");
    let img_s = path_str(&img);
    let size = 256 * MIB + 3 * KIB;
    qemu_img(["create", "-q", "-f", "qcow2", img_s, &size.to_string()]).unwrap();
    qemu_img(["bitmap", "--add", img_s, "theirs"]).unwrap();

    let mut fine = dirty(size, 9, 1, 30); // sparse
    let mut mid = dirty(size, 16, 2, 3000); // dense
    let coarse = dirty(size, 21, 3, 10);
    fine.set(size - 1, 1).unwrap();
    {
        let (_s, image) = open_file(&img);
        image
            .store_bitmaps(&[
                StoredBitmap {
                    name: "fine",
                    granularity_bits: 9,
                    enabled: true,
                    bits: &fine,
                    form: StoreForm::Closed,
                    intent: Intent::Unchanged,
                },
                StoredBitmap {
                    name: "mid",
                    granularity_bits: 16,
                    enabled: true,
                    bits: &mid,
                    form: StoreForm::Closed,
                    intent: Intent::Unchanged,
                },
                StoredBitmap {
                    name: "coarse",
                    granularity_bits: 21,
                    enabled: false,
                    bits: &coarse,
                    form: StoreForm::Closed,
                    intent: Intent::Unchanged,
                },
            ])
            .unwrap();
        image.close().unwrap();
    }
    let auto = vec!["auto".to_string()];
    assert_eq!(
        info_bitmaps(img_s),
        vec![
            ("coarse".into(), 2 * MIB, vec![]),
            ("fine".into(), 512, auto.clone()),
            ("mid".into(), 64 * KIB, auto.clone()),
            ("theirs".into(), 64 * KIB, auto.clone()),
        ]
    );
    assert_clean(img_s);
    let want = |bs: &[&HBitmap]| -> Vec<(String, u64)> {
        bs.iter().map(|b| (b.sha256_hex(), b.count())).collect()
    };
    assert_eq!(daemon_view(img_s, &["fine", "mid", "coarse"]), want(&[&fine, &mid, &coarse]));

    // Store again after more dirt, as a loader would: entries marked in use first.
    let file_len_before = std::fs::metadata(&img).unwrap().len();
    for round in 0..3 {
        let extra = dirty(size, 9, 10 + round, 20);
        fine.merge(&extra).unwrap();
        mid.set(round * MIB, 5 * MIB).unwrap();
        let (s, image) = open_file(&img);
        mark_all_in_use(s.as_ref(), &image);
        let image = {
            drop(image);
            open(s.clone(), true)
        };
        assert!(directory(s.as_ref(), &image).unwrap().iter().all(DirectoryEntry::in_use));
        image
            .store_bitmaps(&[
                StoredBitmap {
                    name: "fine",
                    granularity_bits: 9,
                    enabled: true,
                    bits: &fine,
                    form: StoreForm::Closed,
                    intent: Intent::Unchanged,
                },
                StoredBitmap {
                    name: "mid",
                    granularity_bits: 16,
                    enabled: false,
                    bits: &mid,
                    form: StoreForm::Closed,
                    intent: Intent::Unchanged,
                },
            ])
            .unwrap();
        let entries = directory(s.as_ref(), &image).unwrap();
        let by = |n: &str| entries.iter().find(|e| e.name == n).unwrap().clone();
        assert!(!by("fine").in_use() && by("fine").auto());
        assert!(!by("mid").in_use() && !by("mid").auto());
        // Not named: kept as they were (in use, since we marked them).
        assert!(by("coarse").in_use() && by("theirs").in_use());
        image.close().unwrap();
        drop(s);
        assert_clean(img_s);
    }
    // Old clusters are reused: the file does not keep growing by whole bitmaps.
    let file_len_after = std::fs::metadata(&img).unwrap().len();
    assert!(file_len_after <= file_len_before + 2 * MIB, "{file_len_before} → {file_len_after}");
    assert_eq!(daemon_view(img_s, &["fine", "mid"]), want(&[&fine, &mid]));

    // A bitmap on disk and not in use is not overwritten.
    {
        let (_s, image) = open_file(&img);
        let err = image
            .store_bitmaps(&[StoredBitmap {
                name: "fine",
                granularity_bits: 9,
                enabled: true,
                bits: &fine,
                form: StoreForm::Closed,
                intent: Intent::Unchanged,
            }])
            .unwrap_err();
        assert!(matches!(err, StoreError::AlreadyExists(_)));
        assert_eq!(err.to_string(), "Bitmap 'fine' already exists in the image");
    }

    // Removing, then removing the last one drops the extension.
    for (k, name) in ["fine", "nonexistent", "theirs", "mid", "coarse"].iter().enumerate() {
        let (s, image) = open_file(&img);
        image.remove_stored_bitmap(name).unwrap();
        let left = directory(s.as_ref(), &image).map(|d| d.len()).unwrap_or(0);
        image.close().unwrap();
        drop(s);
        assert!(!info_bitmaps(img_s).iter().any(|b| b.0 == *name));
        assert_clean(img_s);
        let expected_left = [3, 3, 2, 1, 0][k];
        assert_eq!(left, expected_left);
    }
    let v = info(img_s);
    assert!(
        v["format-specific"]["data"].get("bitmaps").is_none() || info_bitmaps(img_s).is_empty()
    );
    let (_s, image) = open_file(&img);
    assert!(image.header().extension(EXT_BITMAPS).is_none());
    assert_eq!(image.autoclear_features() & AUTOCLEAR_BITMAPS, 0);
}

/// The header keeps every byte but the bitmaps extension and the autoclear field: a
/// feature name table and a backing file name survive.
#[test]
fn header_rewrite_keeps_other_fields_and_extensions() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let img = dir.path().join("top.qcow2");
    let img_s = path_str(&img);
    qemu_img(["create", "-q", "-f", "qcow2", path_str(&base), "64M"]).unwrap();
    testkit::create_qcow2(&img, "64M", "", Some((&base, "qcow2"))).unwrap();
    let before = std::fs::read(&img).unwrap()[..4096].to_vec();
    let size = 64 * MIB;
    let bits = dirty(size, 16, 5, 10);
    {
        let (_s, image) = open_file(&img);
        let h0 = image.header();
        assert!(h0.backing_file.is_some() && !h0.feature_names().is_empty());
        image
            .store_bitmaps(&[StoredBitmap {
                name: "b",
                granularity_bits: 16,
                enabled: true,
                bits: &bits,
                form: StoreForm::Closed,
                intent: Intent::Unchanged,
            }])
            .unwrap();
        let h1 = image.header();
        assert_eq!(h1.backing_file, h0.backing_file);
        assert_eq!(h1.backing_format(), h0.backing_format());
        image.close().unwrap();
    }
    let after = std::fs::read(&img).unwrap()[..4096].to_vec();
    // Same fixed fields but autoclear (88..96).
    assert_eq!(before[..8], after[..8]);
    assert_eq!(before[16..88], after[16..88]);
    assert_eq!(before[96..104], after[96..104]);
    let hl = u32::from_be_bytes(before[100..104].try_into().unwrap()) as usize;
    assert_eq!(before[104..hl], after[104..hl]);
    // The extension area: the old one is a prefix of the new one (before its end
    // marker), then the bitmaps extension.
    let ext_end = |b: &[u8]| {
        let mut at = hl;
        loop {
            let t = u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
            let l = u32::from_be_bytes(b[at + 4..at + 8].try_into().unwrap()) as usize;
            if t == 0 {
                return at;
            }
            at += 8 + l.next_multiple_of(8);
        }
    };
    let (e0, e1) = (ext_end(&before), ext_end(&after));
    assert_eq!(before[hl..e0], after[hl..e0]);
    assert_eq!(e1 - e0, 8 + 24);
    assert_eq!(u32::from_be_bytes(after[e0..e0 + 4].try_into().unwrap()), EXT_BITMAPS);
    // The backing name moved by the size of the new extension, unchanged.
    let boff = |b: &[u8]| u64::from_be_bytes(b[8..16].try_into().unwrap()) as usize;
    let blen = u32::from_be_bytes(before[16..20].try_into().unwrap()) as usize;
    assert_eq!(boff(&after), boff(&before) + 32);
    assert_eq!(before[boff(&before)..][..blen], after[boff(&after)..][..blen]);
    let v = info(img_s);
    assert_eq!(v["backing-filename"].as_str(), Some(path_str(&base)));
    assert_eq!(info_bitmaps(img_s).len(), 1);
    assert_clean(img_s);
    // Removing it gives back the original header (autoclear included).
    {
        let (_s, image) = open_file(&img);
        image.remove_stored_bitmap("b").unwrap();
        image.close().unwrap();
    }
    let last = std::fs::read(&img).unwrap();
    assert_eq!(before[..boff(&before) + blen], last[..boff(&before) + blen]);
    assert_clean(img_s);
}

/// A power cut at every flush of a store (replacing a bitmap and adding one) and of a
/// remove leaves an image that checks without corruption and has the old or the new
/// set of bitmaps, never a mix.
#[test]
fn power_cut_during_store_and_remove() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("c.qcow2");
    let img_s = path_str(&img);
    let size = 32 * MIB;
    qemu_img(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", img_s, "32M"]).unwrap();
    qemu_img(["bitmap", "--add", img_s, "old"]).unwrap();
    qemu_img(["bitmap", "--add", "-g", "4096", img_s, "kept"]).unwrap();
    let base = std::fs::read(&img).unwrap();

    let a = dirty(size, 9, 21, 40);
    let b = dirty(size, 12, 22, 40);
    type Set = Vec<(String, u32, Option<String>)>; // name, flags, sha of loaded data
    let snapshot = |storage: &dyn Storage, image: &Qcow2Image| -> Set {
        let mut out: Set = directory(storage, image)
            .unwrap_or_default()
            .into_iter()
            .map(|e| {
                let sha = (!e.in_use()).then(|| {
                    bitmaps::load_bitmap(storage, &e, image.cluster_size(), size)
                        .unwrap()
                        .sha256_hex()
                });
                (e.name.clone(), e.flags, sha)
            })
            .collect();
        out.sort();
        out
    };

    // Each scenario: (what it does, ) run on a history-recording copy.
    #[allow(clippy::type_complexity)]
    let scenarios: Vec<(&str, Box<dyn Fn(&Qcow2Image, &dyn Storage)>)> = vec![
        (
            "store",
            Box::new(|image: &Qcow2Image, storage: &dyn Storage| {
                mark_all_in_use(storage, image);
                image
                    .store_bitmaps(&[
                        StoredBitmap {
                            name: "old",
                            granularity_bits: 9,
                            enabled: true,
                            bits: &a,
                            form: StoreForm::Closed,
                            intent: Intent::Unchanged,
                        },
                        StoredBitmap {
                            name: "new",
                            granularity_bits: 12,
                            enabled: false,
                            bits: &b,
                            form: StoreForm::Closed,
                            intent: Intent::Unchanged,
                        },
                    ])
                    .unwrap();
            }),
        ),
        (
            "remove",
            Box::new(|image: &Qcow2Image, _storage: &dyn Storage| {
                image.remove_stored_bitmap("old").unwrap();
            }),
        ),
    ];
    let mut checked = 0;
    for (what, op) in &scenarios {
        // The state before: the image as qemu-img left it, opened once.
        let mem = Arc::new(MemStorage::from_bytes(base.clone()).with_history());
        let image = open(mem.clone(), true);
        let old_set = snapshot(mem.as_ref(), &image);
        // mark_in_use (for the store) makes the "old" set the in-use variant.
        op(&image, mem.as_ref());
        let new_set = snapshot(mem.as_ref(), &image);
        image.close().unwrap();
        let history = mem.history().unwrap();
        let flushes = history.flush_count();
        let (mut seen_old, mut seen_new) = (false, false);
        let in_use_set: Set =
            old_set.iter().map(|(n, f, _)| (n.clone(), f | bitmaps::FLAG_IN_USE, None)).collect();
        for n in 0..=flushes {
            for s in [
                Survivors::None,
                Survivors::All,
                Survivors::Random(n as u64 * 31 + 7),
                Survivors::Torn(n as u64 * 17 + 3),
            ] {
                let cut = Arc::new(history.power_cut_at_flush(n, s).unwrap());
                let label = format!("{what}: cut at flush {n}/{flushes}");
                let image = open(cut.clone(), false);
                let result = qcow2::check::check(cut.as_ref()).unwrap();
                assert_eq!(result.corruptions, 0, "{label}: {:?}", result.problems);
                assert_eq!(result.check_errors, 0, "{label}: {:?}", result.problems);
                let got = snapshot(cut.as_ref(), &image);
                // The store first marks the old entries in use (mark_in_use), clearing
                // autoclear bit 0 for a moment (no consistent bitmaps then).
                let marking = *what == "store" && (got == in_use_set || got.is_empty());
                let ok = got == old_set || got == new_set || marking;
                seen_old |= got == old_set || marking;
                seen_new |= got == new_set;
                assert!(ok, "{label}: {got:?}\nold {old_set:?}\nnew {new_set:?}");
                checked += 1;
                if n == flushes || n % 4 == 0 {
                    let f = dir.path().join("cut.qcow2");
                    std::fs::write(&f, cut.durable_bytes()).unwrap();
                    let (corrupt, _leaks) = qemu_check(path_str(&f));
                    assert_eq!(corrupt, 0, "{label}: qemu-img check");
                }
            }
        }
        assert!(seen_old && seen_new, "{what}: both outcomes occur");
        eprintln!("{what}: {flushes} flush points");
    }
    eprintln!("{checked} power cuts checked");
}

/// 1 TiB at 64 KiB granularity (2 MiB of bits) with sparse dirt: only the non-zero data
/// clusters are written. Prints the time of store + load.
#[test]
fn one_tib_sparse_store_and_load() {
    let size = 1u64 << 40;
    let mem = Arc::new(MemStorage::new());
    qcow2::create::create(
        mem.as_ref(),
        qcow2::create::CreateOptions { size, ..Default::default() },
    )
    .unwrap();
    let image = open(mem.clone(), true);
    let mut bits = HBitmap::new(size, 16).unwrap();
    let mut rng = SplitMix64(99);
    // Dirt in the first 100 GiB and the last GiB: 5 of the 32 data clusters.
    bits.set(size - 1, 1).unwrap();
    for _ in 0..100 {
        let off = rng.up_to(100 << 30);
        bits.set(off, 1 + rng.up_to(MIB)).unwrap();
    }
    let len_before = mem.len().unwrap();
    let t = std::time::Instant::now();
    image
        .store_bitmaps(&[StoredBitmap {
            name: "big",
            granularity_bits: 16,
            enabled: true,
            bits: &bits,
            form: StoreForm::Closed,
            intent: Intent::Unchanged,
        }])
        .unwrap();
    let stored = t.elapsed();
    let entries = directory(mem.as_ref(), &image).unwrap();
    let loaded =
        bitmaps::load_bitmap(mem.as_ref(), &entries[0], image.cluster_size(), size).unwrap();
    let total = t.elapsed();
    assert_eq!(loaded.sha256_hex(), bits.sha256_hex());
    let table = bitmaps::read_table(mem.as_ref(), &entries[0], image.cluster_size()).unwrap();
    let nonzero = table.iter().filter(|&&e| e != 0).count();
    assert_eq!(table.len(), 32);
    assert_eq!(nonzero, 5);
    let grown = mem.len().unwrap() - len_before;
    // Data clusters + 1 table + 1 directory (+ possibly refcount metadata).
    assert!(grown <= (nonzero as u64 + 4) * image.cluster_size(), "grew by {grown}");
    eprintln!(
        "1 TiB / 64 KiB granularity: store {stored:?}, store+load {total:?}, {nonzero} of {} data clusters written",
        table.len()
    );
}

/// A header that has no room for the bitmaps extension in its first cluster: the
/// store fails before allocating anything (no leak), and the image is unchanged.
#[test]
fn header_without_room_fails_cleanly() {
    let make = |name_len: usize| {
        let mem = Arc::new(MemStorage::new());
        qcow2::create::create(
            mem.as_ref(),
            qcow2::create::CreateOptions {
                size: 16 * MIB,
                cluster_size: 512,
                backing_file: Some("b".repeat(name_len)),
                ..Default::default()
            },
        )
        .unwrap();
        mem
    };
    let probe = open(make(8), false).header();
    let used = probe.backing_file_offset as usize + 8;
    let name_len = 512 - (used - 8) - 16;
    let mem = make(name_len);
    let before = mem.durable_bytes();
    let image = open(mem.clone(), true);
    let bits = dirty(16 * MIB, 16, 1, 5);
    let err = image
        .store_bitmaps(&[StoredBitmap {
            name: "b",
            granularity_bits: 16,
            enabled: true,
            bits: &bits,
            form: StoreForm::Closed,
            intent: Intent::Unchanged,
        }])
        .unwrap_err();
    assert!(matches!(err, StoreError::HeaderTooBig), "{err}");
    image.close().unwrap();
    let result = qcow2::check::check(mem.as_ref()).unwrap();
    assert!(result.is_clean(), "{result:?}");
    assert_eq!(mem.durable_bytes()[..512], before[..512]);
}
