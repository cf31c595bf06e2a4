//! The `blkdebug` driver against qemu-storage-daemon: both daemons get the same
//! `--blockdev` options on copies of one raw image and export the same node over NBD;
//! qemu-io runs the same commands against each, and its report, its exit code, the
//! bitmaps of every node (SHA-256) and the images afterwards must be equal. Bad options
//! must be refused with the same text.
//!
//! Fails, never skips, when a tool is missing.

use std::path::{Path, PathBuf};
use std::process::Command;

use testkit::qsd::{DaemonBuilder, StorageDaemon};
use testkit::serde_json::json;
use testkit::{qemu_io, require_tool};

const SIZE: u64 = 4 * 1024 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Qemu,
    Blockdelta,
}

fn builder(kind: Kind) -> DaemonBuilder {
    match kind {
        Kind::Qemu => StorageDaemon::qemu(),
        Kind::Blockdelta => StorageDaemon::builder(env!("CARGO_BIN_EXE_blockdelta")).arg("serve"),
    }
}

/// A raw image with a known pattern (0x11 everywhere, 0x22 in the second MiB).
fn make_image(path: &Path) {
    std::fs::write(path, vec![0u8; SIZE as usize]).unwrap();
    let p = path.to_str().unwrap();
    qemu_io(["-f", "raw", "-c", "write -P 0x11 0 4M", "-c", "write -P 0x22 1M 1M", p]).unwrap();
}

/// What a scenario did on one daemon.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    /// qemu-io's report without timing lines.
    report: String,
    /// qemu-io's exit code.
    code: Option<i32>,
    /// SHA-256 of bitmap `b` on each node, in node order.
    bitmaps: Vec<String>,
    /// The image after the daemon quit.
    image: Vec<u8>,
}

/// Runs qemu-io `commands` against the export `dbg`, whatever their outcome.
fn run_qemu_io(socket: &Path, commands: &[&str]) -> (String, Option<i32>) {
    let mut cmd = Command::new(require_tool("qemu-io"));
    cmd.args(["-f", "raw"]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    cmd.arg(format!("nbd+unix:///dbg?socket={}", socket.display()));
    let out = cmd.output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let report = text.lines().filter(|l| !l.contains("ops/sec")).collect::<Vec<_>>().join("\n");
    (report, out.status.code())
}

/// Starts `kind` with `blockdevs` (`{IMG}` stands for the image), adds bitmap `b` to
/// each of `nodes`, runs qemu-io, reads the bitmaps and quits.
fn scenario(kind: Kind, dir: &Path, blockdevs: &[&str], nodes: &[&str], io: &[&str]) -> Outcome {
    let image = dir.join(format!("{kind:?}.raw"));
    make_image(&image);
    let mut b = builder(kind);
    let socket = b.path("nbd.sock");
    for bd in blockdevs {
        b = b.arg("--blockdev").arg(bd.replace("{IMG}", image.to_str().unwrap()));
    }
    b = b
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", socket.display()))
        .arg("--export")
        .arg("type=nbd,id=e0,node-name=dbg,writable=on");
    let mut daemon = b.start().unwrap_or_else(|e| panic!("{kind:?}: {e:#}"));
    for node in nodes {
        daemon.execute_ok("block-dirty-bitmap-add", json!({"node": node, "name": "b"}));
    }
    let (report, code) = run_qemu_io(&socket, io);
    let bitmaps = nodes
        .iter()
        .map(|node| {
            let r = daemon.execute_ok(
                "x-debug-block-dirty-bitmap-sha256",
                json!({"node": node, "name": "b"}),
            );
            r["sha256"].as_str().unwrap().to_string()
        })
        .collect();
    daemon.quit().unwrap();
    Outcome { report, code, bitmaps, image: std::fs::read(&image).unwrap() }
}

fn differential(blockdevs: &[&str], nodes: &[&str], io: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let qemu = scenario(Kind::Qemu, dir.path(), blockdevs, nodes, io);
    let ours = scenario(Kind::Blockdelta, dir.path(), blockdevs, nodes, io);
    assert_eq!(qemu.report, ours.report, "qemu-io reports differ for {blockdevs:?} / {io:?}");
    assert_eq!(qemu.code, ours.code, "exit codes differ for {blockdevs:?} / {io:?}");
    assert_eq!(qemu.bitmaps, ours.bitmaps, "bitmaps differ for {blockdevs:?} / {io:?}");
    assert!(qemu.image == ours.image, "images differ for {blockdevs:?} / {io:?}");
    qemu.report
}

const FILE: &str = "driver=file,node-name=f0,filename={IMG}";
const RAW_OVER_BD: &str = "driver=raw,node-name=dbg,file=bd";

/// blkdebug exported directly: the block layer emits `pwritev` on it for each write,
/// but nobody emits `write_aio`, so a `write_aio` rule never fires.
#[test]
fn exported_blkdebug_node_sees_block_layer_events_only() {
    let never = differential(
        &[
            FILE,
            "driver=blkdebug,node-name=dbg,image=f0,inject-error.0.event=write_aio,inject-error.0.errno=5,inject-error.0.sector=2048,inject-error.0.once=on",
        ],
        &["f0", "dbg"],
        &["write -P 0x33 1M 4k", "read -P 0x33 1M 4k"],
    );
    assert!(!never.contains("failed"), "{never}");

    let once = differential(
        &[
            FILE,
            "driver=blkdebug,node-name=dbg,image=f0,inject-error.0.event=pwritev,inject-error.0.errno=5,inject-error.0.sector=2048,inject-error.0.once=on",
        ],
        &["f0", "dbg"],
        &[
            "write -P 0x33 1M 4k",
            "read -P 0x22 1M 4k",
            "write -P 0x44 1M 4k",
            "write -P 0x55 0 4k",
            "read -P 0x44 1M 4k",
        ],
    );
    assert_eq!(once.matches("write failed: Input/output error").count(), 1, "{once}");
}

/// A request matches a `sector` rule only if it covers the sector's first byte.
#[test]
fn sector_rules_match_the_first_byte_of_the_sector() {
    let r = differential(
        &[
            FILE,
            "driver=blkdebug,node-name=dbg,image=f0,inject-error.0.event=pwritev,inject-error.0.sector=7",
        ],
        &["dbg"],
        &["write 3585 1", "write 3583 1", "write 3583 2", "write 4096 512", "write 3584 512"],
    );
    assert_eq!(r.matches("failed").count(), 2, "{r}");
}

/// The errno travels to the NBD client through QEMU's errno-to-NBD mapping (EACCES and
/// other errnos NBD lacks become EINVAL, EROFS EPERM, EFBIG ENOSPC).
#[test]
fn errnos_reach_the_client() {
    for errno in [1, 5, 12, 13, 22, 27, 28, 30, 75, 95, 108] {
        let bd = format!(
            "driver=blkdebug,node-name=dbg,image=f0,inject-error.0.event=pwritev,inject-error.0.errno={errno}"
        );
        let r = differential(&[FILE, &bd], &["dbg"], &["write -P 0x66 0 4k"]);
        assert!(r.contains("write failed"), "{r}");
    }
}

/// Under a raw node, `write_aio` and `read_aio` fire; the request is not run, with or
/// without `immediately`; the failed write still dirties the bitmaps of the nodes it
/// reached (raw and blkdebug) but not of the file below.
#[test]
fn raw_over_blkdebug_fails_guest_io() {
    for immediately in ["off", "on"] {
        let bd = format!(
            "driver=blkdebug,node-name=bd,image=f0,inject-error.0.event=write_aio,inject-error.0.once=on,inject-error.0.immediately={immediately}"
        );
        let r = differential(
            &[FILE, &bd, RAW_OVER_BD],
            &["f0", "bd", "dbg"],
            &[
                "write -P 0x55 64k 4k",
                "read -P 0x11 64k 4k",
                "write -P 0x55 64k 4k",
                "read -P 0x55 64k 4k",
            ],
        );
        assert_eq!(r.matches("failed").count(), 1, "{r}");
    }
    // A failed read ends the connection in QEMU (see below), so it comes last.
    let r = differential(
        &[
            FILE,
            "driver=blkdebug,node-name=bd,image=f0,inject-error.0.event=read_aio,inject-error.0.sector=7",
            RAW_OVER_BD,
        ],
        &["dbg"],
        &["read 0 3k", "read 3585 1", "write -P 0x77 0 4k", "read 0 4k"],
    );
    assert!(r.ends_with("read failed: Input/output error"), "{r}");
}

/// Where the daemons differ on purpose: qemu-storage-daemon drops the connection when a
/// read fails on a structured-reply connection (`Disconnect client, due to: Failed to
/// send reply: reading from file failed: ...`), so qemu-io sees EIO for that read and
/// every later request; blockdelta answers with the read's errno and keeps serving.
#[test]
fn read_errors_keep_the_connection_in_blockdelta() {
    let dir = tempfile::tempdir().unwrap();
    let bd = "driver=blkdebug,node-name=bd,image=f0,inject-error.0.event=read_aio,inject-error.0.errno=28,inject-error.0.sector=7,inject-error.0.once=on";
    let io = ["read 0 4k", "read -P 0x11 0 4k"];
    let qemu = scenario(Kind::Qemu, dir.path(), &[FILE, bd, RAW_OVER_BD], &[], &io);
    let ours = scenario(Kind::Blockdelta, dir.path(), &[FILE, bd, RAW_OVER_BD], &[], &io);
    assert_eq!(qemu.report, "read failed: Input/output error\nread failed: Input/output error");
    assert_eq!(
        ours.report,
        "read failed: No space left on device\nread 4096/4096 bytes at offset 0"
    );
    assert!(qemu.image == ours.image);
}

/// A rule armed by one event stays armed for later requests until another event arms
/// other rules; `iotype` limits the requests it fails.
#[test]
fn armed_rules_stay_armed_and_iotype_filters() {
    let r = differential(
        &[
            FILE,
            "driver=blkdebug,node-name=bd,image=f0,inject-error.0.event=write_aio,inject-error.0.iotype=read",
            RAW_OVER_BD,
        ],
        &["dbg"],
        &["read 0 4k", "write -P 0x12 0 4k", "read 0 4k"],
    );
    assert!(r.contains("read failed"), "{r}");
    let r = differential(
        &[
            FILE,
            "driver=blkdebug,node-name=dbg,image=f0,inject-error.0.event=pwritev_zero,inject-error.0.iotype=write-zeroes",
        ],
        &["dbg"],
        &[
            "write -P 0x12 0 4k",
            "write -z 0 4k",
            "write -z 0 4k",
            "write -P 0x13 0 4k",
            "read -P 0x13 0 4k",
        ],
    );
    assert_eq!(r.matches("failed").count(), 2, "{r}");
}

/// `set-state` moves the state after all rules for the event were looked at;
/// `inject-error` rules with a state fire only in it.
#[test]
fn states_gate_rules() {
    let r = differential(
        &[
            FILE,
            "driver=blkdebug,node-name=dbg,image=f0,inject-error.0.event=pwritev,inject-error.0.state=2,inject-error.0.errno=28,set-state.0.event=pwritev,set-state.0.state=1,set-state.0.new_state=2,set-state.1.event=pwritev,set-state.1.state=2,set-state.1.new_state=3",
        ],
        &["dbg"],
        &["write 0 4k", "write 0 4k", "write 0 4k", "write 0 4k"],
    );
    assert_eq!(r.matches("No space left on device").count(), 3, "{r}");
}

/// Flush events reach the flushed node's first child: a raw node over blkdebug fails
/// flushes (qemu-io prints nothing but exits 1); a blkdebug node exported directly
/// passes its flush events to the file below and never fails one.
#[test]
fn flush_events_go_to_the_first_child() {
    let dir = tempfile::tempdir().unwrap();
    let bd = "driver=blkdebug,node-name=bd,image=f0,inject-error.0.event=flush_to_disk,inject-error.0.once=on";
    let io = ["write 0 4k", "flush"];
    let qemu = scenario(Kind::Qemu, dir.path(), &[FILE, bd, RAW_OVER_BD], &[], &io);
    let ours = scenario(Kind::Blockdelta, dir.path(), &[FILE, bd, RAW_OVER_BD], &[], &io);
    assert_eq!(qemu, ours);
    assert_eq!(ours.code, Some(1));

    let top = "driver=blkdebug,node-name=dbg,image=f0,inject-error.0.event=flush_to_disk";
    let qemu = scenario(Kind::Qemu, dir.path(), &[FILE, top], &[], &io);
    let ours = scenario(Kind::Blockdelta, dir.path(), &[FILE, top], &[], &io);
    assert_eq!(qemu, ours);
    assert_eq!(ours.code, Some(0));
}

/// Bad options are refused with QEMU's text (and in QEMU's order).
#[test]
fn bad_options_get_qemus_errors() {
    let cases = [
        "driver=blkdebug,node-name=dbg",
        "driver=blkdebug,node-name=dbg,image=nope",
        "driver=blkdebug,node-name=dbg,image=f0,inject-error.0.event=bogus",
        "driver=blkdebug,node-name=dbg,image=f0,inject-error.0.errno=5",
        "driver=blkdebug,node-name=dbg,image=f0,inject-error.0.event=read_aio,inject-error.0.errno=x",
        "driver=blkdebug,node-name=dbg,image=f0,inject-error.0.event=read_aio,inject-error.0.foo=1",
        "driver=blkdebug,node-name=dbg,image=f0,foo=1",
        "driver=blkdebug,node-name=dbg,image=f0,align=3",
        "driver=blkdebug,node-name=dbg,image=f0,align=-1",
        "driver=blkdebug,node-name=dbg,image=f0,align=x",
        "driver=blkdebug,node-name=dbg,image=nope,align=3",
        "driver=blkdebug,node-name=dbg,image=nope,align=-1",
        "driver=blkdebug,node-name=dbg,image=nope,inject-error.0.event=bogus",
        "driver=blkdebug,node-name=dbg,inject-error.0.event=bogus",
        "driver=blkdebug,node-name=dbg,image=f0,inject-error.0.event=bogus,foo=1",
        "driver=blkdebug,node-name=dbg,image=f0,inject-error.0.event=read_aio,inject-error.0.iotype=xx",
        "driver=blkdebug,node-name=dbg,image=f0,set-state.0.event=read_aio",
        "driver=blkdebug,node-name=dbg,image=f0,inject-error.0.event=read_aio,inject-error.0.once=maybe",
        "driver=blkdebug,node-name=dbg,image=f0,inject-error.1.event=read_aio",
        r#"{"driver":"blkdebug","node-name":"dbg","image":"f0","inject-error":[{"event":"bogus"}]}"#,
        r#"{"driver":"blkdebug","node-name":"dbg","image":"f0","inject-error":{"event":"read_aio"}}"#,
        r#"{"driver":"blkdebug","node-name":"dbg","image":"f0","inject-error":[{"event":"read_aio","errno":"5"}]}"#,
    ];
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("img.raw");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    for case in cases {
        let mut errors = Vec::new();
        for kind in [Kind::Qemu, Kind::Blockdelta] {
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
                .arg(format!("driver=file,node-name=f0,filename={}", image.display()))
                .arg("--blockdev")
                .arg(case)
                .output()
                .unwrap();
            assert!(!out.status.success(), "{kind:?} accepted {case}");
            let text = String::from_utf8_lossy(&out.stderr).trim().to_string();
            let marker = format!("{case}: ");
            errors.push(match text.find(&marker) {
                Some(i) => text[i + marker.len()..].to_string(),
                None => text,
            });
        }
        assert_eq!(errors[0], errors[1], "--blockdev {case}");
    }
}

/// Options QEMU has that blockdelta does not implement are refused, not ignored.
#[test]
fn unsupported_options_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("img.raw");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    for case in ["align=4096", "max-transfer=65536", "config=/dev/null"] {
        let out = Command::new(env!("CARGO_BIN_EXE_blockdelta"))
            .arg("serve")
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=f0,filename={}", image.display()))
            .arg("--blockdev")
            .arg(format!("driver=blkdebug,node-name=dbg,image=f0,{case}"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "{case}");
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(text.contains("is not supported by blockdelta"), "{case}: {text}");
    }
}
