//! Differential tests of `blockdelta serve` against `qemu-storage-daemon`: both are
//! started with the same options on copies of the same image, real clients (qemu-io,
//! qemu-img, nbdinfo, nbdcopy) run the same work against each, and the answers, the
//! bitmaps' SHA-256s and the resulting images must be equal.
//!
//! Fails, never skips, when a tool is missing (`scripts/test` installs them).

use std::path::{Path, PathBuf};
use std::process::Command;

use hbitmap::HBitmap;
use nbd::client::{Client, ClientError, ClientOptions};
use testkit::qsd::{DaemonBuilder, StorageDaemon};
use testkit::serde_json::{Value, json};
use testkit::{SplitMix64, qemu_img, qemu_io, require_tool, run};

const MIB: u64 = 1024 * 1024;
const SIZE: u64 = 64 * MIB;

fn blockdelta() -> DaemonBuilder {
    StorageDaemon::builder(env!("CARGO_BIN_EXE_blockdelta")).arg("serve")
}

/// Which daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Qemu,
    Blockdelta,
}

fn builder(kind: Kind) -> DaemonBuilder {
    match kind {
        Kind::Qemu => StorageDaemon::qemu(),
        Kind::Blockdelta => blockdelta(),
    }
}

/// A daemon with its image and NBD socket.
struct Served {
    kind: Kind,
    daemon: StorageDaemon,
    image: PathBuf,
    socket: PathBuf,
}

impl Served {
    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    fn image_opts(&self, export: &str, extra: &str) -> String {
        format!(
            "driver=nbd,server.type=unix,server.path={},export={export}{extra}",
            self.socket.display()
        )
    }

    fn sha(&mut self, node: &str, bitmap: &str) -> String {
        let r = self
            .daemon
            .execute_ok("x-debug-block-dirty-bitmap-sha256", json!({"node": node, "name": bitmap}));
        r["sha256"].as_str().unwrap().to_string()
    }
}

/// Makes the image `KIND.qcow2` in `images` (the same way for both daemons), and starts
/// the daemon with `--blockdev` for it and the given export options. The images outlive
/// the daemons (whose own directories go with them).
fn start(kind: Kind, images: &Path, prepare: &dyn Fn(&Path), export_args: &[&str]) -> Served {
    let mut b = builder(kind);
    let image = images.join(format!("{kind:?}.qcow2"));
    let socket = b.path("nbd.sock");
    prepare(&image);
    b = b
        .arg("--blockdev")
        .arg(format!("driver=file,node-name=file0,filename={}", image.display()))
        .arg("--blockdev")
        .arg("driver=qcow2,node-name=disk0,file=file0")
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", socket.display()));
    for a in export_args {
        b = b.arg("--export").arg(*a);
    }
    let daemon = b.start().unwrap_or_else(|e| panic!("{kind:?}: {e:#}"));
    Served { kind, daemon, image, socket }
}

fn both(images: &Path, prepare: &dyn Fn(&Path), export_args: &[&str]) -> [Served; 2] {
    [
        start(Kind::Qemu, images, prepare, export_args),
        start(Kind::Blockdelta, images, prepare, export_args),
    ]
}

fn qcow2_with_bitmaps(image: &Path) {
    let p = image.to_str().unwrap();
    qemu_img(["create", "-q", "-f", "qcow2", p, &SIZE.to_string()]).unwrap();
    qemu_io(["-f", "qcow2", "-c", "write -P 1 0 64k", "-c", "write -P 2 3M 1M", p]).unwrap();
    qemu_img(["bitmap", "--add", p, "b0"]).unwrap();
    qemu_img(["bitmap", "--add", "-g", "256k", p, "b1"]).unwrap();
    qemu_io(["-f", "qcow2", "-c", "write -P 3 8M 64k", p]).unwrap();
    qemu_img(["bitmap", "--disable", p, "b1"]).unwrap();
}

/// qemu-io's report without its timing line.
fn qemu_io_nbd(uri: &str, commands: &[String]) -> String {
    let mut args = vec!["-f".to_string(), "raw".to_string()];
    for c in commands {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(uri.to_string());
    let out = qemu_io(&args).unwrap();
    out.lines().filter(|l| !l.contains("ops/sec")).collect::<Vec<_>>().join("\n")
}

fn nbdinfo(args: &[&str]) -> String {
    run(Command::new(require_tool("nbdinfo")).args(args)).unwrap()
}

/// `nbdinfo --json` without what legitimately differs (the socket path, the guessed
/// content type).
fn nbdinfo_json(uri: &str) -> Value {
    let mut v: Value = serde_json::from_str(&nbdinfo(&["--json", uri])).unwrap();
    for e in v["exports"].as_array_mut().unwrap() {
        let e = e.as_object_mut().unwrap();
        e.remove("uri");
        e.remove("content");
    }
    v
}

fn map_json(opts: &str) -> Value {
    let out = qemu_img(["map", "--output=json", "--image-opts", opts]).unwrap();
    serde_json::from_str(&out).unwrap()
}

#[test]
fn nbd_clients_see_the_same_export_from_both_daemons() {
    let export =
        "type=nbd,id=e0,node-name=disk0,name=disk0,writable=on,bitmaps.0=b0,allocation-depth=on";
    let images = tempfile::tempdir().unwrap();
    let mut served = both(images.path(), &qcow2_with_bitmaps, &[export]);

    // Handshake: flags, contexts, sizes.
    let infos: Vec<Value> = served.iter().map(|s| nbdinfo_json(&s.uri("disk0"))).collect();
    assert_eq!(infos[0], infos[1]);
    let lists: Vec<String> = served
        .iter()
        .map(|s| nbdinfo(&["--list", &s.uri("")]).replace(&s.socket.display().to_string(), "S"))
        .collect();
    assert_eq!(lists[0], lists[1]);

    // Writes, pattern reads, write-zeroes (with and without unmap) and discard. The
    // model is what b0 must hold: its bits from before (the 64 KiB written at 8 MiB)
    // plus every range written or zeroed; discards are ignored (`discard=ignore`), so
    // they record nothing.
    let mut model = HBitmap::new(SIZE, 16).unwrap();
    model.set(8 * MIB, 64 * 1024).unwrap();
    let mut rng = SplitMix64(0x5e7e);
    let mut commands = Vec::new();
    for i in 0..40u64 {
        let off = rng.next() % (SIZE / 512 - 256) * 512;
        let len = (1 + rng.next() % 256) * 512;
        if i % 5 != 4 {
            model.set(off, len).unwrap();
        }
        commands.push(match i % 5 {
            0 | 1 => format!("write -P {} {off} {len}", i % 251),
            2 => format!("write -z {off} {len}"),
            3 => format!("write -z -u {off} {len}"),
            _ => format!("discard {off} {len}"),
        });
    }
    commands.push("write -P 90 63M 64k".into());
    commands.push("read -P 90 63M 64k".into());
    model.set(63 * MIB, 64 * 1024).unwrap();
    for s in &served {
        let out = qemu_io_nbd(&s.uri("disk0"), &commands);
        assert!(!out.contains("error") && !out.contains("failed"), "{:?}: {out}", s.kind);
    }
    let reads: Vec<String> = served
        .iter()
        .map(|s| {
            qemu_io_nbd(&s.uri("disk0"), &["read -P 90 63M 64k".into(), "read -v 0 4k".into()])
        })
        .collect();
    assert_eq!(reads[0], reads[1]);

    // Block status three ways.
    let maps: Vec<Value> = served.iter().map(|s| map_json(&s.image_opts("disk0", ""))).collect();
    assert_eq!(maps[0], maps[1], "qemu-img map over NBD");
    let dirty: Vec<Value> = served
        .iter()
        .map(|s| map_json(&s.image_opts("disk0", ",x-dirty-bitmap=qemu:dirty-bitmap:b0")))
        .collect();
    assert_eq!(dirty[0], dirty[1], "qemu-img map x-dirty-bitmap");
    for context in ["qemu:dirty-bitmap:b0", "qemu:allocation-depth", "base:allocation"] {
        let m: Vec<String> = served
            .iter()
            .map(|s| nbdinfo(&[&format!("--map={context}"), &s.uri("disk0")]))
            .collect();
        assert_eq!(m[0], m[1], "nbdinfo --map={context}");
        assert!(m[0].lines().count() > 3, "{context}: {}", m[0]);
    }

    // The bitmap saw every write, as the model says, and as QEMU's did.
    let shas: Vec<String> = served.iter_mut().map(|s| s.sha("disk0", "b0")).collect();
    assert_eq!(shas[1], model.sha256_hex(), "blockdelta's b0 against the written ranges");
    assert_eq!(shas[0], shas[1]);

    // The exported bitmap is busy, in both.
    for s in &mut served {
        let err = s
            .daemon
            .qmp()
            .execute("block-dirty-bitmap-remove", json!({"node": "disk0", "name": "b0"}))
            .unwrap_err();
        assert_eq!(
            err.desc,
            "Bitmap 'b0' is currently in use by another operation and cannot be used"
        );
    }

    // Copies out with qemu-img convert and nbdcopy, and in with qemu-img convert.
    let mut copies = Vec::new();
    for s in &served {
        let out = s.daemon.path("out.raw");
        qemu_img(["convert", "-f", "raw", "-O", "raw", &s.uri("disk0"), out.to_str().unwrap()])
            .unwrap();
        let out2 = s.daemon.path("out2.raw");
        run(Command::new(require_tool("nbdcopy")).arg(s.uri("disk0")).arg(&out2)).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&out2).unwrap());
        copies.push(std::fs::read(&out).unwrap());
    }
    assert!(copies[0] == copies[1], "the two exports' contents differ");
    let source = served[0].daemon.path("in.raw");
    std::fs::write(&source, (0..4 * MIB).map(|i| (i % 253) as u8).collect::<Vec<u8>>()).unwrap();
    for s in &served {
        qemu_img([
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            source.to_str().unwrap(),
            &s.uri("disk0"),
        ])
        .unwrap();
    }
    model.set(0, 4 * MIB).unwrap();
    let shas: Vec<String> = served.iter_mut().map(|s| s.sha("disk0", "b0")).collect();
    assert_eq!(shas[1], model.sha256_hex());
    assert_eq!(shas[0], shas[1]);

    // Shut both down; the images are equal, clean, with the same bitmaps.
    let [q, b] = served;
    let (qc, bc) = (q.image.clone(), b.image.clone());
    assert!(q.daemon.quit().unwrap().success());
    assert!(b.daemon.quit().unwrap().success());
    qemu_img(["compare", "-f", "qcow2", "-F", "qcow2", qc.to_str().unwrap(), bc.to_str().unwrap()])
        .unwrap();
    for image in [&qc, &bc] {
        qemu_img(["check", image.to_str().unwrap()]).unwrap();
    }
    let bitmaps = |p: &Path| {
        let info: Value = serde_json::from_str(
            &qemu_img(["info", "--output=json", p.to_str().unwrap()]).unwrap(),
        )
        .unwrap();
        info["format-specific"]["data"]["bitmaps"].clone()
    };
    assert_eq!(bitmaps(&qc), bitmaps(&bc));
}

/// Bad `--export` strings: both daemons refuse them with the same text.
#[test]
fn bad_export_options_get_qemus_errors() {
    let cases = [
        "type=nbd,node-name=disk0",
        "type=nbd,id=e0",
        "type=nbd,id=e0,node-name=nope",
        "type=xx,id=e0,node-name=disk0",
        "type=nbd,id=e0,node-name=disk0,writable=maybe",
        "type=nbd,id=e0,node-name=disk0,bitmaps.0=zz",
        "type=nbd,id=e0,node-name=disk0,bitmaps.1=b0",
        "type=nbd,id=e0,node-name=disk0,bitmaps.0=b0",
        "type=nbd,id=e0,node-name=disk0,bitmap=b0",
        "type=nbd,id=e0,node-name=disk0,iothread=x",
    ];
    let dir = tempfile::tempdir().unwrap();
    for (i, export) in cases.iter().enumerate() {
        let mut errors = Vec::new();
        for kind in [Kind::Qemu, Kind::Blockdelta] {
            let image = dir.path().join(format!("{i}-{kind:?}.qcow2"));
            let p = image.to_str().unwrap();
            qemu_img(["create", "-q", "-f", "qcow2", p, "64M"]).unwrap();
            qemu_img(["bitmap", "--add", p, "b0"]).unwrap();
            let socket = dir.path().join(format!("{i}.sock"));
            let program = match kind {
                Kind::Qemu => require_tool("qemu-storage-daemon"),
                Kind::Blockdelta => PathBuf::from(env!("CARGO_BIN_EXE_blockdelta")),
            };
            let mut cmd = Command::new(program);
            if kind == Kind::Blockdelta {
                cmd.arg("serve");
            }
            let out = cmd
                .arg("--blockdev")
                .arg(format!("driver=file,node-name=file0,filename={p}"))
                .arg("--blockdev")
                .arg("driver=qcow2,node-name=disk0,file=file0")
                .arg("--nbd-server")
                .arg(format!("addr.type=unix,addr.path={}", socket.display()))
                .arg("--export")
                .arg(export)
                .output()
                .unwrap();
            assert!(!out.status.success(), "{kind:?} accepted {export}");
            let text = String::from_utf8_lossy(&out.stderr).trim().to_string();
            let text = text.split_once(": ").map(|(_, t)| t.to_string()).unwrap_or(text);
            errors.push(text);
            if kind == Kind::Blockdelta {
                // Unlike QEMU, a refused option loses nothing: the bitmap is stored, not
                // left in use.
                let info = qemu_img(["info", "--output=json", p]).unwrap();
                assert!(!info.contains("in-use"), "{export}: {info}");
            }
        }
        assert_eq!(errors[0], errors[1], "--export {export}");
    }
}

/// An enabled bitmap on a read-only export is refused; a disabled one is exported and
/// busy; writes to a read-only export fail and change nothing.
#[test]
fn read_only_exports_follow_qemus_rules() {
    for kind in [Kind::Qemu, Kind::Blockdelta] {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("d.qcow2");
        qcow2_with_bitmaps(&image);
        let p = image.to_str().unwrap();
        let program = match kind {
            Kind::Qemu => require_tool("qemu-storage-daemon"),
            Kind::Blockdelta => PathBuf::from(env!("CARGO_BIN_EXE_blockdelta")),
        };
        let mut cmd = Command::new(&program);
        if kind == Kind::Blockdelta {
            cmd.arg("serve");
        }
        let out = cmd
            .args(["--blockdev", &format!("driver=file,node-name=file0,filename={p}")])
            .args(["--blockdev", "driver=qcow2,node-name=disk0,file=file0"])
            .args([
                "--nbd-server",
                &format!("addr.type=unix,addr.path={}/n.sock", dir.path().display()),
            ])
            .args(["--export", "type=nbd,id=e0,node-name=disk0,bitmaps.0=b0"])
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&out.stderr)
                .contains("Enabled bitmap 'b0' incompatible with readonly export")
        );
    }
    let export = "type=nbd,id=e0,node-name=disk0,name=disk0,bitmaps.0=b1";
    let images = tempfile::tempdir().unwrap();
    let mut served = both(images.path(), &qcow2_with_bitmaps, &[export]);
    let before: Vec<String> = served.iter_mut().map(|s| s.sha("disk0", "b0")).collect();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    for s in &served {
        // qemu-io will not even try to write to a read-only export; a raw client does.
        let errno = rt.block_on(async {
            let options = ClientOptions { export: "disk0".into(), ..Default::default() };
            let mut c = Client::connect_unix(&s.socket, &options).await.unwrap();
            match c.write(0, &[9u8; 4096], false).await {
                Err(ClientError::Command { errno, .. }) => errno,
                other => panic!("{:?}: write to a read-only export: {other:?}", s.kind),
            }
        });
        // The NBD spec and this project ask for EPERM; QEMU 10.0.2 answers EINVAL.
        let expected = if s.kind == Kind::Qemu { nbd::proto::EINVAL } else { nbd::proto::EPERM };
        assert_eq!(errno, expected, "{:?}", s.kind);
        let read = qemu_io(["-r", "-f", "raw", "-c", "read -P 1 0 4k", &s.uri("disk0")]).unwrap();
        assert!(read.starts_with("read 4096/4096 bytes at offset 0"), "{read}");
    }
    let after: Vec<String> = served.iter_mut().map(|s| s.sha("disk0", "b0")).collect();
    assert_eq!(before, after);
    let maps: Vec<String> =
        served.iter().map(|s| nbdinfo(&["--map=qemu:dirty-bitmap:b1", &s.uri("disk0")])).collect();
    assert_eq!(maps[0], maps[1]);
    let nodes: Vec<Value> = served
        .iter_mut()
        .map(|s| {
            let nodes = s.daemon.execute_ok("query-named-block-nodes", json!({}));
            let disk =
                nodes.as_array().unwrap().iter().find(|n| n["node-name"] == "disk0").unwrap();
            disk["dirty-bitmaps"].clone()
        })
        .collect();
    assert_eq!(nodes[0], nodes[1]);
}

/// SIGTERM ends `blockdelta serve` cleanly: bitmaps stored (not in use), image clean, and
/// the writes made through the export recorded. After SIGKILL the bitmaps stay in use on
/// disk: QEMU reports them inconsistent and allows only removal; blockdelta trusts its
/// write-intent record and loads them consistent (they are crash-safe), unless another
/// program (here qemu-storage-daemon, through its NBD export) wrote the image since:
/// then it too reports them inconsistent.
#[test]
fn sigterm_stores_bitmaps_and_sigkill_leaves_them_inconsistent() {
    let export = "type=nbd,id=e0,node-name=disk0,name=disk0,writable=on";
    let keep = tempfile::tempdir().unwrap();
    let s = start(Kind::Blockdelta, keep.path(), &qcow2_with_bitmaps, &[export]);
    qemu_io_nbd(&s.uri("disk0"), &["write -P 7 20M 64k".into()]);
    let copy = s.image.clone();
    let status = s.daemon.stop().unwrap();
    assert!(status.success(), "{status}");
    let info = qemu_img(["info", "--output=json", copy.to_str().unwrap()]).unwrap();
    assert!(!info.contains("in-use"), "{info}");
    qemu_img(["check", copy.to_str().unwrap()]).unwrap();
    let map = run(Command::new(require_tool("qemu-img")).args([
        "map",
        "--output=json",
        "--image-opts",
        &format!("driver=qcow2,file.driver=file,file.filename={}", copy.display()),
    ]))
    .unwrap();
    assert!(map.contains(&format!("\"start\": {}", 20 * MIB)), "{map}");

    // Kill -9 while open read-write.
    let killed_dir = tempfile::tempdir().unwrap();
    let mut s = start(Kind::Blockdelta, killed_dir.path(), &qcow2_with_bitmaps, &[export]);
    let image = s.image.clone();
    let killed = keep.path().join("killed.qcow2");
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(s.daemon.pid() as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let _ = s.daemon.wait_timeout(std::time::Duration::from_secs(5)).unwrap();
    std::fs::copy(&image, &killed).unwrap();
    let info = qemu_img(["info", "--output=json", killed.to_str().unwrap()]).unwrap();
    assert_eq!(info.matches("in-use").count(), 2, "{info}");

    {
        // Crash-safe: consistent after the kill, usable, stored at the next clean stop.
        let copy = keep.path().join("killed-trusted.qcow2");
        std::fs::copy(&killed, &copy).unwrap();
        let mut d = builder(Kind::Blockdelta)
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=file0,filename={}", copy.display()))
            .arg("--blockdev")
            .arg("driver=qcow2,node-name=disk0,file=file0")
            .start()
            .unwrap();
        let nodes = d.execute_ok("query-named-block-nodes", json!({}));
        let disk = nodes.as_array().unwrap().iter().find(|n| n["node-name"] == "disk0").unwrap();
        let bitmaps = disk["dirty-bitmaps"].as_array().unwrap();
        assert_eq!(bitmaps.len(), 2, "{bitmaps:?}");
        for b in bitmaps {
            assert_eq!(b.get("inconsistent"), None, "{b}");
        }
        d.execute_ok("block-dirty-bitmap-clear", json!({"node": "disk0", "name": "b0"}));
        assert!(d.quit().unwrap().success());
        let info = qemu_img(["info", "--output=json", copy.to_str().unwrap()]).unwrap();
        assert!(!info.contains("in-use") && info.contains("\"b0\""), "{info}");
        qemu_img(["check", copy.to_str().unwrap()]).unwrap();
    }
    // Written by other programs after the crash: the record is not trusted.
    let foreign = keep.path().join("killed-foreign.qcow2");
    std::fs::copy(&killed, &foreign).unwrap();
    let socket = keep.path().join("foreign.sock");
    let q = builder(Kind::Qemu)
        .arg("--blockdev")
        .arg(format!("driver=file,node-name=file0,filename={}", foreign.display()))
        .arg("--blockdev")
        .arg("driver=qcow2,node-name=disk0,file=file0")
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", socket.display()))
        .arg("--export")
        .arg("type=nbd,id=e0,node-name=disk0,name=disk0,writable=on")
        .start()
        .unwrap();
    let uri = format!("nbd+unix:///disk0?socket={}", socket.display());
    qemu_io_nbd(&uri, &["write -P 9 40M 64k".into()]);
    assert!(q.quit().unwrap().success());
    for (kind, image) in [(Kind::Qemu, &killed), (Kind::Blockdelta, &foreign)] {
        let copy = keep.path().join(format!("killed-{kind:?}.qcow2"));
        std::fs::copy(image, &copy).unwrap();
        let b = builder(kind)
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=file0,filename={}", copy.display()))
            .arg("--blockdev")
            .arg("driver=qcow2,node-name=disk0,file=file0");
        let mut d = b.start().unwrap();
        let nodes = d.execute_ok("query-named-block-nodes", json!({}));
        let disk = nodes.as_array().unwrap().iter().find(|n| n["node-name"] == "disk0").unwrap();
        for b in disk["dirty-bitmaps"].as_array().unwrap() {
            assert_eq!(b["inconsistent"], json!(true), "{kind:?}: {b}");
            assert_eq!(b["recording"], json!(false), "{kind:?}: {b}");
        }
        for cmd in ["block-dirty-bitmap-clear", "block-dirty-bitmap-enable"] {
            let e = d.qmp().execute(cmd, json!({"node": "disk0", "name": "b0"})).unwrap_err();
            assert_eq!(e.desc, "Bitmap 'b0' is inconsistent and cannot be used", "{kind:?} {cmd}");
        }
        d.execute_ok("block-dirty-bitmap-remove", json!({"node": "disk0", "name": "b0"}));
        assert!(d.quit().unwrap().success());
        let info = qemu_img(["info", "--output=json", copy.to_str().unwrap()]).unwrap();
        assert!(!info.contains("\"b0\""), "{kind:?}: {info}");
        assert!(info.contains("\"b1\""), "{kind:?}: {info}");
        qemu_img(["check", copy.to_str().unwrap()]).unwrap();
    }
}

/// An inet NBD server binds the address it is given and nothing else, and serves
/// clients there.
#[test]
fn inet_server_binds_only_the_given_address() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let b = blockdelta();
    let image = b.path("d.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", image.to_str().unwrap(), "16M"]).unwrap();
    let _daemon = b
        .arg("--blockdev")
        .arg(format!("driver=file,node-name=file0,filename={}", image.display()))
        .arg("--blockdev")
        .arg("driver=qcow2,node-name=disk0,file=file0")
        .arg("--nbd-server")
        .arg(format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port},max-connections=1"))
        .arg("--export")
        .arg("type=nbd,id=e0,node-name=disk0,name=disk0,writable=on")
        .start()
        .unwrap();
    let uri = format!("nbd://127.0.0.1:{port}/disk0");
    let info: Value = serde_json::from_str(&nbdinfo(&["--json", &uri])).unwrap();
    assert_eq!(info["exports"][0]["export-size"], json!(16 * MIB));
    // max-connections=1: no multi-connection support advertised (QEMU's rule).
    assert_eq!(info["exports"][0]["can_multi_conn"], json!(false));
    // The listening socket in /proc/net/tcp: 127.0.0.1 (0100007F), never 0.0.0.0.
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let listening: Vec<&str> = tcp
        .lines()
        .filter(|l| l.split_whitespace().nth(3) == Some("0A"))
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|a| a.ends_with(&format!(":{port:04X}")))
        .collect();
    assert_eq!(listening, vec![format!("0100007F:{port:04X}")]);
}

/// Sockets are owner-only; a stale socket is replaced, a regular file in the way is not.
#[test]
fn sockets_are_owner_only_and_files_in_the_way_are_kept() {
    use std::os::unix::fs::PermissionsExt;
    let images = tempfile::tempdir().unwrap();
    let served = start(Kind::Blockdelta, images.path(), &qcow2_with_bitmaps, &[]);
    for socket in [served.socket.clone(), served.daemon.qmp_socket()] {
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", socket.display());
    }
    drop(served);

    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("d.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", image.to_str().unwrap(), "16M"]).unwrap();
    // A stale socket (nobody listening) is replaced.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let b = blockdelta()
        .arg("--blockdev")
        .arg(format!("driver=file,node-name=file0,filename={}", image.display()))
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", stale.display()));
    let d = b.start().unwrap();
    assert!(d.quit().unwrap().success());
    // A regular file is refused and left as it was.
    let file = dir.path().join("file.sock");
    std::fs::write(&file, b"keep me").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_blockdelta"))
        .args(["serve", "--nbd-server", &format!("addr.type=unix,addr.path={}", file.display())])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Failed to bind socket"), "{out:?}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}

/// SIGINT ends `blockdelta serve` as cleanly as SIGTERM: exit status 0, bitmaps stored,
/// the pidfile removed.
#[test]
fn sigint_stores_bitmaps_too() {
    let images = tempfile::tempdir().unwrap();
    let mut s = start(Kind::Blockdelta, images.path(), &qcow2_with_bitmaps, &[]);
    let pidfile = s.daemon.path(testkit::qsd::PID_FILE);
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(s.daemon.pid() as i32).unwrap(),
        rustix::process::Signal::INT,
    )
    .unwrap();
    let status = s.daemon.wait_timeout(std::time::Duration::from_secs(10)).unwrap().unwrap();
    assert!(status.success(), "{status}");
    assert!(!pidfile.exists());
    let info = qemu_img(["info", "--output=json", s.image.to_str().unwrap()]).unwrap();
    assert!(!info.contains("in-use"), "{info}");
    assert_eq!(info.matches("\"auto\"").count(), 1, "{info}");
}

/// A supervisor may signal the daemon as soon as it sees the pidfile: SIGTERM sent the
/// moment the pidfile appears must still end `blockdelta serve` cleanly, bitmaps
/// stored (not in use), image clean. Repeated, since the window is short: the pidfile
/// is polled without sleeping, and the signal sent at once.
#[test]
fn sigterm_as_soon_as_the_pidfile_appears_stores_the_bitmaps() {
    use std::os::unix::process::ExitStatusExt;
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let original = dir.path().join("original.qcow2");
    qcow2_with_bitmaps(&original);
    for round in 0..40 {
        let image = dir.path().join(format!("{round}.qcow2"));
        std::fs::copy(&original, &image).unwrap();
        let pidfile = dir.path().join(format!("{round}.pid"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_blockdelta"))
            .arg("serve")
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=file0,filename={}", image.display()))
            .arg("--blockdev")
            .arg("driver=qcow2,node-name=disk0,file=file0")
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", dir.path().join("nbd.sock").display()))
            .arg("--export")
            .arg("type=nbd,id=e0,node-name=disk0,name=disk0,writable=on")
            .arg("--pidfile")
            .arg(&pidfile)
            .spawn()
            .unwrap();
        let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !pidfile.exists() {
            assert!(Instant::now() < deadline, "round {round}: no pidfile");
            if let Some(status) = child.try_wait().unwrap() {
                panic!("round {round}: exited before writing its pidfile: {status}");
            }
            std::hint::spin_loop();
        }
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("round {round}: still running 30 s after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(
            status.success(),
            "round {round}: {status} (signal {:?}): SIGTERM must end the daemon cleanly",
            status.signal()
        );
        let info = qemu_img(["info", "--output=json", image.to_str().unwrap()]).unwrap();
        assert!(!info.contains("in-use"), "round {round}: {info}");
        let info: Value = serde_json::from_str(&info).unwrap();
        let bitmaps = info["format-specific"]["data"]["bitmaps"].as_array().unwrap();
        assert_eq!(bitmaps.len(), 2, "round {round}: {info}");
        qemu_img(["check", image.to_str().unwrap()]).unwrap();
        assert!(!pidfile.exists(), "round {round}: pidfile left behind");
        std::fs::remove_file(&image).unwrap();
    }
}

/// One NBD connection writing 64 KiB slots with many requests in flight, from raw
/// bytes (no structured replies: every reply is a 16-byte simple reply).
mod pipelined_writer {
    use std::collections::HashMap;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::path::Path;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Condvar, Mutex};

    use nbd::codec::{self, InfoRequest, OptionHeader, OptionReplyHeader, ReplyHeader, Request};
    use nbd::proto::*;

    pub const SLOT: u64 = 64 * 1024;

    /// The data written to slot `slot`: never zero, different for every slot.
    pub fn pattern(slot: u64) -> Vec<u8> {
        let mut data: Vec<u8> = (0..SLOT).map(|i| ((slot * 7 + i / 512) % 251 + 1) as u8).collect();
        data[..8].copy_from_slice(&slot.to_le_bytes());
        data
    }

    /// What became of the requests of one connection.
    #[derive(Debug, Default)]
    pub struct Outcome {
        /// Slots whose write was answered without error.
        pub ok: Vec<u64>,
        /// (slot, NBD error) of the writes answered with an error.
        pub errors: Vec<(u64, u32)>,
        /// Slots written but never answered (the connection closed first).
        pub unanswered: Vec<u64>,
    }

    #[derive(Default)]
    struct Inflight {
        by_cookie: HashMap<u64, u64>,
        closed: bool,
    }

    fn handshake(s: &mut UnixStream, export: &str) {
        let mut greeting = [0u8; codec::GREETING_LEN];
        s.read_exact(&mut greeting).unwrap();
        let hflags = codec::parse_greeting(&greeting).unwrap();
        let mut cflags = FLAG_C_FIXED_NEWSTYLE;
        if hflags & FLAG_NO_ZEROES != 0 {
            cflags |= FLAG_C_NO_ZEROES;
        }
        s.write_all(&cflags.to_be_bytes()).unwrap();
        let mut out = Vec::new();
        let go = InfoRequest { export: export.into(), infos: Vec::new() };
        OptionHeader::encode(OPT_GO, &go.encode(), &mut out);
        s.write_all(&out).unwrap();
        loop {
            let mut h = [0u8; codec::OPTION_REPLY_HEADER_LEN];
            s.read_exact(&mut h).unwrap();
            let h = OptionReplyHeader::parse(&h).unwrap();
            let mut payload = vec![0u8; h.length as usize];
            s.read_exact(&mut payload).unwrap();
            assert_eq!(h.reply_type & REP_FLAG_ERROR, 0, "OPT_GO refused");
            if h.reply_type == REP_ACK {
                return;
            }
        }
    }

    /// Writes `slots` in order through `socket`'s export `export`, `depth` requests in
    /// flight, until they are all answered or the server closes the connection; `acks`
    /// counts the answers of every connection.
    pub fn run(
        socket: &Path,
        export: &str,
        slots: Vec<u64>,
        depth: usize,
        acks: Arc<AtomicUsize>,
    ) -> Outcome {
        let mut stream = UnixStream::connect(socket).unwrap();
        handshake(&mut stream, export);
        let state = Arc::new((Mutex::new(Inflight::default()), Condvar::new()));
        let mut out = Outcome::default();
        let sender = {
            let mut stream = stream.try_clone().unwrap();
            let state = state.clone();
            std::thread::spawn(move || {
                for (i, slot) in slots.into_iter().enumerate() {
                    let cookie = i as u64 + 1;
                    {
                        let (lock, cv) = &*state;
                        let mut st = lock.lock().unwrap();
                        while st.by_cookie.len() >= depth && !st.closed {
                            st = cv.wait(st).unwrap();
                        }
                        if st.closed {
                            return;
                        }
                        st.by_cookie.insert(cookie, slot);
                    }
                    let req = Request {
                        flags: 0,
                        command: CMD_WRITE,
                        cookie,
                        offset: slot * SLOT,
                        length: SLOT,
                    };
                    let mut bytes = Vec::new();
                    req.encode(&mut bytes, false).unwrap();
                    bytes.extend_from_slice(&pattern(slot));
                    if stream.write_all(&bytes).is_err() {
                        return;
                    }
                }
                let (lock, cv) = &*state;
                let mut st = lock.lock().unwrap();
                while !st.by_cookie.is_empty() && !st.closed {
                    st = cv.wait(st).unwrap();
                }
                let _ = stream.shutdown(std::net::Shutdown::Both);
            })
        };
        loop {
            let mut h = [0u8; codec::SIMPLE_REPLY_LEN];
            if stream.read_exact(&mut h).is_err() {
                break;
            }
            let ReplyHeader::Simple { error, cookie } = ReplyHeader::parse(&h).unwrap() else {
                panic!("a structured reply without structured replies");
            };
            let (lock, cv) = &*state;
            let slot = lock.lock().unwrap().by_cookie.remove(&cookie).expect("known cookie");
            cv.notify_all();
            acks.fetch_add(1, Ordering::SeqCst);
            if error == 0 {
                out.ok.push(slot);
            } else {
                out.errors.push((slot, error));
            }
        }
        {
            let (lock, cv) = &*state;
            let mut st = lock.lock().unwrap();
            st.closed = true;
            out.unanswered = st.by_cookie.values().copied().collect();
            cv.notify_all();
        }
        // Unblocks a sender stuck writing to a server that stopped reading.
        let _ = stream.shutdown(std::net::Shutdown::Both);
        sender.join().unwrap();
        out
    }
}

/// QMP `quit` (even rounds) or SIGTERM (odd rounds) while clients write with many
/// requests in flight: requests already received complete and are answered, none gets
/// an error, and every write answered without error is in the image afterwards
/// (requests never answered, because the connection closed first, are allowed). Both
/// daemons, same rules.
#[test]
fn quit_while_clients_write_completes_the_requests_in_flight() {
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    const GIB: u64 = 1 << 30;
    const CONNECTIONS: u64 = 4;
    let export = "type=nbd,id=e0,node-name=disk0,name=disk0,writable=on";
    let prepare = |image: &Path| {
        let p = image.to_str().unwrap();
        qemu_img(["create", "-q", "-f", "qcow2", p, &GIB.to_string()]).unwrap();
        qemu_img(["bitmap", "--add", p, "b0"]).unwrap();
    };
    for kind in [Kind::Qemu, Kind::Blockdelta] {
        for round in 0..4 {
            let images = tempfile::tempdir().unwrap();
            let served = start(kind, images.path(), &prepare, &[export]);
            let acks = Arc::new(AtomicUsize::new(0));
            let writers: Vec<_> = (0..CONNECTIONS)
                .map(|c| {
                    let socket = served.socket.clone();
                    let acks = acks.clone();
                    let slots = (0..GIB / pipelined_writer::SLOT / CONNECTIONS)
                        .map(|i| i * CONNECTIONS + c)
                        .collect();
                    std::thread::spawn(move || {
                        pipelined_writer::run(&socket, "disk0", slots, 32, acks)
                    })
                })
                .collect();
            let deadline = Instant::now() + Duration::from_secs(60);
            while acks.load(Ordering::SeqCst) < 200 + 300 * round {
                assert!(Instant::now() < deadline, "{kind:?}: the writers made no progress");
                std::thread::sleep(Duration::from_millis(1));
            }
            let Served { daemon, image, .. } = served;
            let status = if round % 2 == 0 { daemon.quit() } else { daemon.stop() }.unwrap();
            assert!(status.success(), "{kind:?}: {status}");
            let outcomes: Vec<_> = writers.into_iter().map(|w| w.join().unwrap()).collect();
            let ok: Vec<u64> = outcomes.iter().flat_map(|o| o.ok.iter().copied()).collect();
            let errors: Vec<(u64, u32)> =
                outcomes.iter().flat_map(|o| o.errors.iter().copied()).collect();
            let unanswered: usize = outcomes.iter().map(|o| o.unanswered.len()).sum();
            eprintln!(
                "{kind:?} round {round}: {} answered OK, {} errors, {unanswered} unanswered",
                ok.len(),
                errors.len()
            );
            assert!(errors.is_empty(), "{kind:?} round {round}: error replies {errors:?}");
            assert!(
                (ok.len() as u64) < GIB / pipelined_writer::SLOT,
                "{kind:?}: every write finished before quit: the test proves nothing"
            );
            let info = qemu_img(["info", "--output=json", image.to_str().unwrap()]).unwrap();
            assert!(!info.contains("in-use"), "{kind:?} round {round}: {info}");
            qemu_img(["check", image.to_str().unwrap()]).unwrap();
            let raw = images.path().join("image.raw");
            qemu_img([
                "convert",
                "-f",
                "qcow2",
                "-O",
                "raw",
                image.to_str().unwrap(),
                raw.to_str().unwrap(),
            ])
            .unwrap();
            let raw = std::fs::File::open(&raw).unwrap();
            let mut buf = vec![0u8; pipelined_writer::SLOT as usize];
            for slot in ok {
                raw.read_exact_at(&mut buf, slot * pipelined_writer::SLOT).unwrap();
                assert!(
                    buf == pipelined_writer::pattern(slot),
                    "{kind:?} round {round}: slot {slot} was answered OK but is not in the image"
                );
            }
        }
    }
}
