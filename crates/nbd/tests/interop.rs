//! Interop tests with QEMU's and libnbd's tools as clients.

mod common;

use std::process::Command;

use common::{Fixture, SIZE};
use testkit::serde_json::Value;

fn json(s: &str) -> Vec<Value> {
    testkit::serde_json::from_str::<Vec<Value>>(s).unwrap()
}

#[test]
fn qemu_io_write_read_zero_discard() {
    let f = Fixture::start();
    let out = testkit::qemu_io([
        "-f",
        "raw",
        &f.uri("disk"),
        "-c",
        "write -P 0xab 0 64k",
        "-c",
        "read -P 0xab 0 64k",
        "-c",
        "write -P 0xcd 100000 5000",
        "-c",
        "read -P 0xcd 100000 5000",
        "-c",
        "write -z 1M 128k",
        "-c",
        "read -P 0 1M 128k",
        "-c",
        "write -P 0x11 2M 64k",
        "-c",
        "discard 2M 64k",
        "-c",
        "read -P 0 2M 64k",
        "-c",
        "flush",
    ])
    .unwrap();
    assert!(!out.contains("fail"), "{out}");
    let data = f.disk.contents();
    assert!(data[..65536].iter().all(|&b| b == 0xab));
    assert!(data[100000..105000].iter().all(|&b| b == 0xcd));
    assert!(data[2 << 20..(2 << 20) + 65536].iter().all(|&b| b == 0));
    // Blocks 0, 1 (100000..105000), 16, 17 (1M..1M+128k) and 32 are dirty.
    assert_eq!(f.disk.dirty_blocks(), vec![0, 1, 16, 17, 32]);
}

#[test]
fn qemu_io_read_only_export_refuses_writes() {
    let f = Fixture::start();
    let err = testkit::qemu_io(["-f", "raw", "-r", &f.uri("ro"), "-c", "read -P 0 0 64k"]).unwrap();
    assert!(!err.contains("fail"), "{err}");
    // Opening read-write fails: QEMU checks the READ_ONLY transmission flag.
    let r = testkit::qemu_io(["-f", "raw", &f.uri("ro"), "-c", "write 0 64k"]);
    assert!(r.is_err(), "{r:?}");
}

#[test]
fn qemu_img_convert_to_and_from_export() {
    let f = Fixture::start();
    let src = f.path("src.raw");
    testkit::qemu_img(["create", "-f", "raw", src.to_str().unwrap(), &SIZE.to_string()]).unwrap();
    testkit::qemu_io([
        "-f",
        "raw",
        src.to_str().unwrap(),
        "-c",
        "write -P 0x5a 0 300k",
        "-c",
        "write -P 0x77 3M 1M",
    ])
    .unwrap();
    testkit::qemu_img([
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        src.to_str().unwrap(),
        &f.uri("disk"),
    ])
    .unwrap();
    let want = std::fs::read(&src).unwrap();
    assert!(f.disk.contents() == want);
    let back = f.path("back.raw");
    testkit::qemu_img([
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &f.uri("disk"),
        back.to_str().unwrap(),
    ])
    .unwrap();
    assert!(std::fs::read(&back).unwrap() == want);
    let cmp = testkit::qemu_img([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        src.to_str().unwrap(),
        &f.uri("disk"),
    ])
    .unwrap();
    assert!(cmp.contains("identical"), "{cmp}");
}

#[test]
fn qemu_img_map_allocation_and_dirty_bitmap() {
    let f = Fixture::start();
    testkit::qemu_io([
        "-f",
        "raw",
        &f.uri("disk"),
        "-c",
        "write -P 1 0 64k",
        "-c",
        "write -P 2 1M 192k",
    ])
    .unwrap();
    let map =
        json(&testkit::qemu_img(["map", "--output=json", "-f", "raw", &f.uri("disk")]).unwrap());
    let data: Vec<(u64, u64, bool)> = map
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        data,
        vec![
            (0, 65536, true),
            (65536, (1 << 20) - 65536, false),
            (1 << 20, 196608, true),
            ((1 << 20) + 196608, SIZE as u64 - (1 << 20) - 196608, false)
        ],
        "{map:?}"
    );
    // The zero flag follows the hole flag.
    assert_eq!(map[1]["zero"], true);
    assert_eq!(map[0]["zero"], false);

    // The dirty bitmap, through QEMU's x-dirty-bitmap hack: dirty extents read as
    // "data": false, clean ones as data.
    f.disk.clear_dirty();
    testkit::qemu_io(["-f", "raw", &f.uri("disk"), "-c", "write -P 3 2M 4k"]).unwrap();
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export=disk,x-dirty-bitmap=qemu:dirty-bitmap:bm",
        f.sock.display()
    );
    let map = json(&testkit::qemu_img(["map", "--output=json", "--image-opts", &opts]).unwrap());
    let dirty: Vec<(u64, u64)> = map
        .iter()
        .filter(|e| e["data"] == false)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(dirty, vec![(2 << 20, 65536)], "{map:?}");
}

#[test]
fn nbdinfo_list_and_map() {
    let f = Fixture::start();
    let nbdinfo = testkit::require_tool("nbdinfo");
    let list = testkit::run(Command::new(&nbdinfo).args(["--list", "--json", &f.uri("")])).unwrap();
    let v: Value = testkit::serde_json::from_str(&list).unwrap();
    let exports = v["exports"].as_array().unwrap();
    let names: Vec<&str> = exports.iter().map(|e| e["export-name"].as_str().unwrap()).collect();
    assert_eq!(names, ["disk", "ro"], "{list}");
    let disk = &exports[0];
    assert_eq!(disk["export-size"], SIZE as u64);
    assert_eq!(disk["description"], "test disk");
    let ctx: Vec<&str> =
        disk["contexts"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    assert_eq!(ctx, ["base:allocation", "qemu:dirty-bitmap:bm"], "{list}");
    assert_eq!(exports[1]["is_read_only"], true, "{list}");

    testkit::qemu_io(["-f", "raw", &f.uri("disk"), "-c", "write -P 9 128k 64k"]).unwrap();
    let map =
        testkit::run(Command::new(&nbdinfo).args(["--map=qemu:dirty-bitmap:bm", &f.uri("disk")]))
            .unwrap();
    let lines: Vec<Vec<String>> =
        map.lines().map(|l| l.split_whitespace().map(str::to_owned).collect()).collect();
    let rest = (SIZE - 196608).to_string();
    let want = vec![
        vec!["0", "131072", "0", "clean"],
        vec!["131072", "65536", "1", "dirty"],
        vec!["196608", rest.as_str(), "0", "clean"],
    ];
    assert_eq!(lines, want, "{map}");
    let map = testkit::run(Command::new(&nbdinfo).args(["--map", &f.uri("disk")])).unwrap();
    assert!(
        map.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["131072", "65536", "0", "data"]),
        "{map}"
    );
}

#[test]
fn nbdcopy_to_and_from_export() {
    let f = Fixture::start();
    let nbdcopy = testkit::require_tool("nbdcopy");
    let src = f.path("src.raw");
    let mut data = vec![0u8; SIZE];
    let mut rng = testkit::SplitMix64(7);
    for chunk in data[..1 << 20].chunks_mut(8) {
        chunk.copy_from_slice(&rng.next().to_le_bytes());
    }
    data[3 << 20..(3 << 20) + 4096].fill(0xee);
    std::fs::write(&src, &data).unwrap();
    testkit::run(Command::new(&nbdcopy).args([src.to_str().unwrap(), &f.uri("disk")])).unwrap();
    assert!(f.disk.contents() == data);
    let out = f.path("out.raw");
    testkit::run(Command::new(&nbdcopy).args([&f.uri("disk"), out.to_str().unwrap()])).unwrap();
    assert!(std::fs::read(&out).unwrap() == data);
}

#[test]
fn qemu_io_over_tcp() {
    let f = Fixture::start();
    let server = nbd::Server::new(f.exports.clone());
    let handle = f.rt.block_on(server.listen_tcp("127.0.0.1:0")).unwrap();
    let addr = handle.local_addr().unwrap();
    let uri = format!("nbd://{addr}/disk");
    testkit::qemu_io([
        "-f",
        "raw",
        &uri,
        "-c",
        "write -P 0x42 512k 4k",
        "-c",
        "read -P 0x42 512k 4k",
    ])
    .unwrap();
    assert!(f.disk.contents()[512 << 10..(512 << 10) + 4096].iter().all(|&b| b == 0x42));
    handle.stop();
}

#[test]
fn qemu_io_concurrent_aio() {
    let f = Fixture::start();
    let mut args = vec!["-f".to_string(), "raw".into(), f.uri("disk")];
    for i in 0..16 {
        args.push("-c".into());
        args.push(format!("aio_write -P {} {}k 64k", i + 1, i * 64));
    }
    args.extend(["-c".into(), "aio_flush".into()]);
    for i in 0..16 {
        args.push("-c".into());
        args.push(format!("read -P {} {}k 64k", i + 1, i * 64));
    }
    let out = testkit::qemu_io(&args).unwrap();
    assert!(!out.contains("fail"), "{out}");
}
