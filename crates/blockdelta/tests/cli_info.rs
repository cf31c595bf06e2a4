//! `blockdelta info` against `qemu-img info` on images made by QEMU: every key both
//! print agrees, in JSON, with and without `--backing-chain`; the human form too.

use std::path::Path;
use std::process::Command;

use testkit::serde_json::{self, Value};
use testkit::{qemu_img, qemu_io, run};

fn blockdelta(args: &[&str], dir: &Path) -> String {
    run(Command::new(env!("CARGO_BIN_EXE_blockdelta")).args(args).current_dir(dir)).unwrap()
}

/// Differences between two JSON values, over the keys both have.
fn diff(ours: &Value, qemu: &Value, path: &str, out: &mut Vec<String>) {
    match (ours, qemu) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                if let Some(w) = b.get(k) {
                    diff(v, w, &format!("{path}.{k}"), out);
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                diff(v, w, &format!("{path}[{i}]"), out);
            }
        }
        _ if ours != qemu => out.push(format!("{path}: ours {ours}, qemu {qemu}")),
        _ => {}
    }
}

/// Keys qemu-img prints that we don't (we aim for none).
fn missing(ours: &Value, qemu: &Value, path: &str, out: &mut Vec<String>) {
    match (ours, qemu) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, w) in b {
                match a.get(k) {
                    Some(v) => missing(v, w, &format!("{path}.{k}"), out),
                    None => out.push(format!("{path}.{k}")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                missing(v, w, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn info_agrees_with_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = |name: &str| d.join(name).to_str().unwrap().to_string();
    std::fs::write(s("raw.img"), vec![1u8; 1000]).unwrap();
    qemu_img(["create", "-q", "-f", "qcow2", &s("base.qcow2"), "64M"]).unwrap();
    qemu_io(["-f", "qcow2", "-c", "write 0 1M", &s("base.qcow2")]).unwrap();
    qemu_img(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "base.qcow2", &s("mid.qcow2")])
        .unwrap();
    qemu_img(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "mid.qcow2", &s("top.qcow2")])
        .unwrap();
    qemu_img(["bitmap", "--add", &s("top.qcow2"), "bm0"]).unwrap();
    qemu_img(["bitmap", "--add", "-g", "1M", &s("top.qcow2"), "bm1"]).unwrap();
    qemu_img(["bitmap", "--disable", &s("top.qcow2"), "bm1"]).unwrap();
    let _ = Command::new(testkit::require_tool("qemu-io"))
        .args(["-f", "qcow2", "-c", "write 0 64k", "-c", "abort", &s("top.qcow2")])
        .output()
        .unwrap();
    qemu_img(["create", "-q", "-f", "qcow2", "-o", "compat=0.10", &s("v2.qcow2"), "1M"]).unwrap();
    let opts = "compression_type=zstd,lazy_refcounts=on,refcount_bits=8,cluster_size=4k";
    qemu_img(["create", "-q", "-f", "qcow2", "-o", opts, &s("z.qcow2"), "10M"]).unwrap();
    qemu_img(["convert", "-c", "-O", "qcow2", &s("base.qcow2"), &s("c.qcow2")]).unwrap();

    for image in ["raw.img", "base.qcow2", "top.qcow2", "v2.qcow2", "z.qcow2", "c.qcow2"] {
        for chain in [false, true] {
            let mut args = vec!["info", "--output=json", image];
            if chain {
                args.push("--backing-chain");
            }
            let ours: Value = serde_json::from_str(&blockdelta(&args, d)).unwrap();
            let mut qemu_args = args.clone();
            qemu_args.insert(1, "-U");
            let qemu: Value = serde_json::from_str(
                &run(Command::new("qemu-img").args(&qemu_args).current_dir(d)).unwrap(),
            )
            .unwrap();
            let mut differences = Vec::new();
            diff(&ours, &qemu, "", &mut differences);
            assert!(differences.is_empty(), "{image} (chain {chain}): {differences:#?}");
            let mut absent = Vec::new();
            missing(&ours, &qemu, "", &mut absent);
            assert!(absent.is_empty(), "{image} (chain {chain}): we don't print {absent:?}");
        }
        let ours = blockdelta(&["info", image], d);
        let qemu =
            run(Command::new("qemu-img").args(["info", "-U", image]).current_dir(d)).unwrap();
        assert_eq!(ours, qemu, "{image}: human form");
    }
    // The in-use bitmap left by the abort shows as such.
    let top: Value =
        serde_json::from_str(&blockdelta(&["info", "--output=json", "top.qcow2"], d)).unwrap();
    let flags = &top["format-specific"]["data"]["bitmaps"][0]["flags"];
    assert_eq!(flags, &testkit::serde_json::json!(["in-use", "auto"]));
}

#[test]
fn info_fails_clearly_on_a_missing_file_and_a_locked_image() {
    let dir = tempfile::tempdir().unwrap();
    let info = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_blockdelta"))
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let out = info(&["info", "nosuch.qcow2"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Could not open 'nosuch.qcow2'") && err.contains("No such file"), "{err}");

    // While qemu-storage-daemon writes the image, info needs -U, as qemu-img does.
    let img = dir.path().join("busy.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "1M"]).unwrap();
    let daemon = testkit::qsd::StorageDaemon::qemu()
        .arg("--blockdev")
        .arg(format!("driver=file,node-name=f,filename={}", img.display()))
        .arg("--blockdev")
        .arg("driver=qcow2,node-name=d,file=f")
        .start()
        .unwrap();
    let out = info(&["info", "busy.qcow2"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\"write\" lock"), "{err}");
    assert!(info(&["info", "-U", "busy.qcow2"]).status.success());
    drop(daemon);
    assert!(info(&["info", "busy.qcow2"]).status.success());
}
