//! Interop: many seeded cycles of add / write / remove / clear / enable / disable on the
//! persistent bitmaps of a qcow2 image that has a backing file, at granularities 512 B,
//! 4 KiB, 64 KiB, 2 MiB and 2 GiB, against a model of every bitmap's dirty set.
//!
//! While the image is open in blockdelta (read-write, with its backing), operations go
//! through the node's bitmap manager and writes through `Node::write_blocking`; while it
//! is closed, operations go through `blockdelta bitmap` or `qemu-img bitmap`. The image
//! is closed and reopened between steps (by `Node::close` or by dropping the node). At
//! the end `qemu-img info` lists the model's bitmaps with its flags and granularities,
//! `qemu-img check` and `blockdelta check` find no problem, qemu-storage-daemon loads
//! bitmaps whose records and SHA-256 equal the model's and blockdelta's, and the image
//! reads as the model's data (`qemu-img compare`).
//!
//! Fails, never skips, if `qemu-img`, `qemu-io` or `qemu-storage-daemon` is missing.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockdelta::block::dirty_bitmap::AddBitmap;
use blockdelta::block::graph::BlockGraph;
use blockdelta::block::node::Node;
use hbitmap::HBitmap;
use testkit::serde_json::{Value, json};
use testkit::{SplitMix64, qemu_img, qemu_io};

const MIB: u64 = 1 << 20;
/// Not a whole number of clusters, nor of most granularities: the last bit is partial.
const SIZE: u64 = 33 * MIB + 1536;
const GRANULARITIES: [u64; 5] = [512, 4096, 65536, 2 * MIB, 1 << 31];

/// What one bitmap should be.
#[derive(Debug, Clone)]
struct Model {
    name: String,
    granularity: u64,
    enabled: bool,
    /// One entry per granule: dirty or not.
    dirty: Vec<bool>,
}

impl Model {
    fn new(name: String, granularity: u64, enabled: bool) -> Self {
        Model {
            name,
            granularity,
            enabled,
            dirty: vec![false; SIZE.div_ceil(granularity) as usize],
        }
    }

    fn write(&mut self, offset: u64, len: u64) {
        if self.enabled {
            for g in offset / self.granularity..=(offset + len - 1) / self.granularity {
                self.dirty[g as usize] = true;
            }
        }
    }

    /// QEMU's `count`: dirty granules times the granularity.
    fn count(&self) -> u64 {
        self.dirty.iter().filter(|&&d| d).count() as u64 * self.granularity
    }

    /// The SHA-256 QEMU gives for these bits.
    fn sha256(&self) -> String {
        let mut bits = HBitmap::new(SIZE, self.granularity.trailing_zeros()).unwrap();
        for (g, _) in self.dirty.iter().enumerate().filter(|(_, d)| **d) {
            let start = g as u64 * self.granularity;
            bits.set(start, self.granularity.min(SIZE - start)).unwrap();
        }
        bits.sha256_hex()
    }
}

/// The image, blockdelta's open node (if open), and the model.
struct World {
    rng: SplitMix64,
    dir: PathBuf,
    top: PathBuf,
    /// In the order they were added.
    bitmaps: Vec<Model>,
    data: Vec<u8>,
    open: Option<(BlockGraph, Arc<Node>)>,
    next_name: usize,
    log: Vec<String>,
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

impl World {
    fn new(seed: u64, dir: &Path) -> World {
        let base = dir.join("base.qcow2");
        let top = dir.join("top.qcow2");
        qemu_img(["create", "-q", "-f", "qcow2", s(&base), &SIZE.to_string()]).unwrap();
        qemu_io([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 8M",
            "-c",
            "write -P 0x22 20M 4M",
            s(&base),
        ])
        .unwrap();
        testkit::create_qcow2(&top, &SIZE.to_string(), "", Some((&base, "qcow2"))).unwrap();
        let mut data = vec![0u8; SIZE as usize];
        data[..8 * MIB as usize].fill(0x11);
        data[20 * MIB as usize..24 * MIB as usize].fill(0x22);
        World {
            rng: SplitMix64(seed),
            dir: dir.to_path_buf(),
            top,
            bitmaps: Vec::new(),
            data,
            open: None,
            next_name: 0,
            log: Vec::new(),
        }
    }

    fn node(&mut self) -> Arc<Node> {
        if self.open.is_none() {
            let graph = BlockGraph::new();
            let node = graph
                .add_from_str(&format!(
                    "driver=qcow2,node-name=top,file.driver=file,file.filename={}",
                    self.top.display()
                ))
                .unwrap();
            self.log.push("open".into());
            self.open = Some((graph, node));
        }
        self.open.as_ref().unwrap().1.clone()
    }

    /// Closes the image: by `Node::close` (a store error fails the test), or by dropping
    /// the node, which closes it too.
    fn close(&mut self) {
        let Some((graph, node)) = self.open.take() else { return };
        if self.rng.up_to(1) == 0 {
            // Stored once: the drop below does not store again.
            node.close().unwrap();
            self.log.push("close".into());
        } else {
            self.log.push("drop".into());
        }
        drop(node);
        drop(graph);
    }

    fn pick(&mut self) -> usize {
        self.rng.up_to(self.bitmaps.len() as u64 - 1) as usize
    }

    fn add(&mut self) {
        let granularity = GRANULARITIES[self.next_name % GRANULARITIES.len()];
        let name = format!("bm{}", self.next_name);
        self.next_name += 1;
        let enabled = self.rng.up_to(3) != 0;
        if let Some((_, node)) = &self.open {
            node.bitmaps()
                .add(&AddBitmap {
                    name: name.clone(),
                    granularity: Some(granularity),
                    persistent: true,
                    disabled: !enabled,
                    intent: Default::default(),
                })
                .unwrap();
            self.log.push(format!("add {name} {granularity} enabled={enabled}"));
        } else {
            let g = granularity.to_string();
            let mut args = vec!["--add", "-g", &g];
            if !enabled {
                args.push("--disable");
            }
            self.offline_named(&args, &name);
        }
        self.bitmaps.push(Model::new(name, granularity, enabled));
    }

    /// Runs `bitmap ARGS top.qcow2 NAME` on the closed image, with blockdelta or
    /// qemu-img.
    fn offline_named(&mut self, args: &[&str], name: &str) {
        let ours = self.rng.up_to(1) == 0;
        let program = if ours { common::blockdelta() } else { common::qemu_img_path() };
        let mut full = vec!["bitmap"];
        full.extend_from_slice(args);
        full.extend(["top.qcow2", name]);
        let out = common::run_in(&program, &full, &self.dir);
        assert_eq!(out.code, 0, "{program:?} {full:?}: {out:?}\nsteps: {:?}", self.log);
        self.log.push(format!("{} {full:?}", if ours { "blockdelta" } else { "qemu-img" }));
    }

    /// remove, clear, enable or disable bitmap `i`.
    fn op(&mut self, op: &str, i: usize) {
        let name = self.bitmaps[i].name.clone();
        if let Some((_, node)) = &self.open {
            let b = node.bitmaps();
            match op {
                "remove" => b.remove(&name).unwrap(),
                "clear" => b.clear(&name).unwrap(),
                "enable" => drop(b.enable(&name).unwrap()),
                _ => drop(b.disable(&name).unwrap()),
            }
            self.log.push(format!("{op} {name}"));
        } else {
            self.offline_named(&[&format!("--{op}")], &name);
        }
        match op {
            "remove" => drop(self.bitmaps.remove(i)),
            "clear" => self.bitmaps[i].dirty.fill(false),
            "enable" => self.bitmaps[i].enabled = true,
            _ => self.bitmaps[i].enabled = false,
        }
    }

    fn write(&mut self) {
        let node = self.node();
        for _ in 0..=self.rng.up_to(2) {
            let offset = self.rng.up_to(SIZE - 1);
            let len = 1 + self.rng.up_to((2 * MIB).min(SIZE - offset) - 1);
            let byte = (self.rng.next() as u8) | 1;
            let buf = vec![byte; len as usize];
            node.write_blocking(&buf, offset, false).unwrap();
            self.data[offset as usize..(offset + len) as usize].fill(byte);
            for b in &mut self.bitmaps {
                b.write(offset, len);
            }
            self.log.push(format!("write {offset}+{len}"));
        }
    }

    /// blockdelta's open node agrees with the model.
    fn check_open(&self) {
        let Some((_, node)) = &self.open else { return };
        let records = node.bitmaps().query();
        assert_eq!(records.len(), self.bitmaps.len(), "steps: {:?}", self.log);
        for m in &self.bitmaps {
            let r = records.iter().find(|r| r.name.as_deref() == Some(&m.name)).unwrap();
            assert_eq!(
                (r.granularity as u64, r.recording, r.count, r.persistent),
                (m.granularity, m.enabled, m.count(), true),
                "{}: steps {:?}",
                m.name,
                self.log
            );
            assert_eq!(node.bitmaps().sha256(&m.name).unwrap(), m.sha256(), "{}", m.name);
        }
    }
}

fn run_cycles(seed: u64, steps: usize) {
    let dir = tempfile::tempdir().unwrap();
    let mut w = World::new(seed, dir.path());
    // Every granularity from the start, some added online and some offline.
    for i in 0..GRANULARITIES.len() {
        if i == 2 {
            w.node();
        }
        w.add();
    }
    w.write();
    for _ in 0..steps {
        let roll = w.rng.up_to(99);
        if w.bitmaps.is_empty() || (roll < 12 && w.bitmaps.len() < 7) {
            w.add();
        } else if roll < 45 {
            w.write();
        } else if roll < 60 {
            if w.open.is_some() { w.close() } else { drop(w.node()) }
        } else {
            let op = ["remove", "clear", "enable", "disable"][(roll % 4) as usize];
            let i = w.pick();
            w.op(op, i);
        }
        w.check_open();
    }
    w.close();

    // qemu-img sees the model's bitmaps with the same flags. (Not necessarily in the
    // order they were added: qemu-img's store can move an entry it rewrites.)
    let mut models = w.bitmaps.clone();
    models.sort_by(|a, b| a.name.cmp(&b.name));
    let expected: Vec<Value> = models
        .iter()
        .map(|m| {
            let flags: Vec<&str> = if m.enabled { vec!["auto"] } else { vec![] };
            json!({"flags": flags, "name": m.name, "granularity": m.granularity})
        })
        .collect();
    let listed = common::info_bitmaps(&w.top);
    let mut listed = listed.as_array().cloned().unwrap_or_default();
    listed.sort_by_key(|b| b["name"].as_str().unwrap_or("").to_string());
    assert_eq!(listed, expected, "steps: {:?}", w.log);

    // No leak, no corruption, for QEMU and for us.
    let check = common::qemu_check(&w.top);
    assert_eq!(check.code, 0, "{check:?}");
    assert!(check.stdout.starts_with("No errors were found on the image.\n"), "{check:?}");
    let ours = common::run_in(&common::blockdelta(), &["check", "top.qcow2"], dir.path());
    assert_eq!(ours.code, 0, "{ours:?}");

    // QEMU loads the same bits as the model and as blockdelta.
    let qemu = common::qemu_bitmaps(&w.top);
    assert_eq!(qemu.len(), w.bitmaps.len());
    let graph = BlockGraph::new();
    let node = graph
        .add_from_str(&format!(
            "driver=qcow2,node-name=top,file.driver=file,file.filename={},read-only=on",
            w.top.display()
        ))
        .unwrap();
    for (name, record, sha) in &qemu {
        let m = w.bitmaps.iter().find(|m| &m.name == name).unwrap();
        assert_eq!(
            (record["granularity"].as_u64(), record["recording"].as_bool()),
            (Some(m.granularity), Some(m.enabled)),
            "{name}: {record}"
        );
        assert_eq!(record["count"].as_u64(), Some(m.count()), "{name}: {record}");
        assert_eq!(record["persistent"], json!(true));
        assert_eq!(sha, &m.sha256(), "{name}: QEMU's bits differ from the model's");
        assert_eq!(&node.bitmaps().sha256(name).unwrap(), sha, "{name}: ours differ from QEMU's");
    }
    drop(node);
    drop(graph);

    // And the data written through the backing chain is what the model wrote.
    let expected_raw = dir.path().join("expected.raw");
    std::fs::write(&expected_raw, &w.data).unwrap();
    qemu_img(["compare", "-f", "qcow2", "-F", "raw", s(&w.top), s(&expected_raw)]).unwrap();
}

#[test]
fn cycles_seed_1() {
    run_cycles(1, 60);
}

#[test]
fn cycles_seed_2() {
    run_cycles(0x5eed_0002, 60);
}

#[test]
fn cycles_seed_3() {
    run_cycles(0xb17_3a95, 60);
}

#[test]
fn cycles_seed_4() {
    run_cycles(0x0dd_ba11, 60);
}
