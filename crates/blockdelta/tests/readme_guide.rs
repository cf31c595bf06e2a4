//! Runs every command line of the README's guide (between `<!-- guide:start -->` and
//! `<!-- guide:end -->`), in order, with `bash -e` in an empty directory and
//! `blockdelta` on `PATH`; then checks each restored image against the copy of the disk
//! taken at that point in time. The guide's own `qemu-img compare` lines check the same,
//! so a guide that stops comparing still fails here.
//!
//! Fails, never skips, when a tool is missing (`scripts/test` installs them).

use std::path::Path;
use std::process::Command;

use testkit::{qemu_img, require_tool};

#[test]
fn every_command_of_the_readme_guide_runs() {
    for tool in ["qemu-img", "qemu-io", "qemu-storage-daemon", "nbdinfo"] {
        require_tool(tool);
    }
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let start = readme.find("<!-- guide:start -->").expect("guide start marker");
    let end = readme.find("<!-- guide:end -->").expect("guide end marker");
    let block = &readme[start..end];
    let script = block
        .split_once("```sh\n")
        .and_then(|(_, rest)| rest.rsplit_once("```"))
        .map(|(body, _)| body)
        .expect("a sh code block in the guide");
    assert!(script.lines().filter(|l| l.starts_with("blockdelta ")).count() >= 10);

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let bin = Path::new(env!("CARGO_BIN_EXE_blockdelta")).parent().unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    // If the guide fails half-way, its daemons must not outlive the test. The trap
    // must not fail itself: a daemon that quit removes its pidfile at any moment.
    let guarded = format!(
        "set -euo pipefail\ntrap 'set +e; for p in serve.pid vm.pid; do \
         pid=$(cat $p 2>/dev/null) && kill $pid 2>/dev/null; done; true' EXIT\n{script}"
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(&guarded)
        .current_dir(dir)
        .env("PATH", path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the guide failed ({:?})\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    // verify of the first repository before and after the prune, then of the vault.
    assert!(
        stdout.contains("3 backups and ") && stdout.contains("verified, 0 problems"),
        "{stdout}"
    );
    assert!(stdout.contains("2 backups and "), "{stdout}");
    for (restored, fmt, reference) in [
        ("restored-0001.raw", "raw", "at-0001.raw"),
        ("restored-0002.qcow2", "qcow2", "at-0002.raw"),
        ("restored-0003.raw", "raw", "at-0003.raw"),
    ] {
        let r = dir.join(restored);
        let c = dir.join(reference);
        let o =
            qemu_img(["compare", "-f", fmt, "-F", "raw", r.to_str().unwrap(), c.to_str().unwrap()])
                .unwrap();
        assert!(o.contains("Images are identical"), "{restored}: {o}");
    }
    // The points in time differ from each other, so the comparisons mean something.
    let a = std::fs::read(dir.join("at-0001.raw")).unwrap();
    let b = std::fs::read(dir.join("at-0002.raw")).unwrap();
    assert_ne!(a, b);
}

/// The README's main job: `blockdelta demo` passes every check, and prints its table.
#[test]
fn the_demo_passes_every_check() {
    let out = Command::new(env!("CARGO_BIN_EXE_blockdelta")).arg("demo").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("every check passed"), "{stdout}");
    // Three points in time, then the two kept after prune and gc.
    assert_eq!(stdout.matches("identical").count(), 5, "{stdout}");
    assert!(stdout.contains("deduplication"), "{stdout}");
}
