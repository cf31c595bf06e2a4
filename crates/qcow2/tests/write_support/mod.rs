//! Shared helpers for the write tests: creating images with QEMU's tools and checking
//! them with `qemu-img check` / `qemu-img compare`.

#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

use testkit::serde_json::{self, Value};

/// Runs `qemu-img ARGS`, panicking with its stderr on failure.
pub fn img(args: &[&str]) -> String {
    testkit::qemu_img(args).unwrap()
}

/// Creates a qcow2 image with `-o OPTS` and an optional backing file (path, format).
pub fn create(path: &Path, size: u64, opts: &str, backing: Option<(&Path, &str)>) {
    testkit::create_qcow2(path, &size.to_string(), opts, backing).unwrap();
}

/// `qemu-img check --output=json`: (exit code, report). Panics on a report with
/// corruptions or check errors.
pub fn check(path: &Path) -> (i32, Value) {
    let out = Command::new(testkit::require_tool("qemu-img"))
        .args(["check", "--output=json", "-f", "qcow2"])
        .arg(path)
        .output()
        .unwrap();
    let code = out.status.code().unwrap_or(-1);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "qemu-img check {path:?} (exit {code}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (code, report)
}

/// A field of a check report (absent means 0).
pub fn field(report: &Value, name: &str) -> u64 {
    report.get(name).and_then(Value::as_u64).unwrap_or(0)
}

/// Asserts `qemu-img check` finds no corruption and no check error (leaks allowed).
pub fn assert_consistent(path: &Path, context: &str) -> u64 {
    let (code, r) = check(path);
    assert_eq!(field(&r, "corruptions"), 0, "{context}: corruptions: {r}");
    assert_eq!(field(&r, "check-errors"), 0, "{context}: check errors: {r}");
    assert!(code == 0 || code == 3, "{context}: qemu-img check exit {code}: {r}");
    field(&r, "leaks")
}

/// Asserts `qemu-img check` is clean: no corruption, no leak, exit 0.
pub fn assert_clean(path: &Path, context: &str) {
    let (code, r) = check(path);
    assert_eq!(code, 0, "{context}: qemu-img check: {r}");
    assert_eq!(field(&r, "corruptions"), 0, "{context}: {r}");
    assert_eq!(field(&r, "leaks"), 0, "{context}: {r}");
}

/// Asserts `qemu-img compare -f qcow2 -F raw IMG RAW` says identical.
pub fn assert_same_as_raw(image: &Path, raw: &Path, context: &str) {
    let out = Command::new(testkit::require_tool("qemu-img"))
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(image)
        .arg(raw)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{context}: qemu-img compare: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deterministic bytes for a write: `seed` and position.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = testkit::SplitMix64(seed);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&rng.next().to_le_bytes());
    }
    v.truncate(len);
    v
}
