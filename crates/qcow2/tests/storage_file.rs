//! `FileStorage`: I/O semantics (buffered and `O_DIRECT`), and image locking that
//! interoperates with QEMU's tools (`qemu-img`, `qemu-io`, `qemu-storage-daemon`).

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use qcow2::storage::{
    ConflictKind, FileOptions, FileStorage, LockConflict, Locking, MemStorage, Permission,
    Permissions, Storage,
};
use tempfile::TempDir;
use testkit::qsd::StorageDaemon;

/// A temporary directory on the file system of the target directory (a disk, so that
/// `O_DIRECT` works there; `/tmp` may be a tmpfs elsewhere).
fn tempdir() -> TempDir {
    tempfile::Builder::new()
        .prefix("storage-file-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("creating a temporary directory")
}

fn buffered() -> FileOptions {
    FileOptions::new().write(true)
}

fn direct() -> FileOptions {
    FileOptions::new().write(true).direct(true)
}

/// A new file of `len` bytes holding a pattern, opened with `options`.
fn patterned(dir: &TempDir, name: &str, len: usize, options: FileOptions) -> FileStorage {
    let path = dir.path().join(name);
    std::fs::write(&path, pattern(len, 7)).unwrap();
    options.open(&path).unwrap()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1).collect()
}

fn read(storage: &dyn Storage, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xaa; len];
    storage.read_at(&mut buf, offset).unwrap();
    buf
}

// ---------------------------------------------------------------------------------------
// I/O semantics, each run buffered and with O_DIRECT.

fn check_read_past_eof(options: FileOptions) {
    let dir = tempdir();
    let s = patterned(&dir, "f", 5000, options);
    let want = pattern(5000, 7);
    // Entirely past the end.
    assert_eq!(read(&s, 8192, 4096), vec![0; 4096]);
    assert_eq!(read(&s, 6000, 10), vec![0; 10]);
    // Across the end.
    let got = read(&s, 4000, 3000);
    assert_eq!(&got[..1000], &want[4000..]);
    assert_eq!(&got[1000..], &vec![0; 2000][..]);
    // Reading does not change the length.
    assert_eq!(s.len().unwrap(), 5000);
    // Zero-length read anywhere.
    s.read_at(&mut [], u64::MAX).unwrap();
}

fn check_write_grows(options: FileOptions) {
    let dir = tempdir();
    let s = patterned(&dir, "f", 100, options);
    s.write_at(b"hello", 10_000).unwrap();
    assert_eq!(s.len().unwrap(), 10_005);
    assert_eq!(read(&s, 100, 9900), vec![0; 9900]);
    assert_eq!(read(&s, 10_000, 5), b"hello");
    assert_eq!(read(&s, 0, 100), pattern(100, 7));
    // Overwrite inside, unaligned, across block boundaries.
    let data = pattern(9000, 3);
    s.write_at(&data, 333).unwrap();
    assert_eq!(s.len().unwrap(), 10_005);
    assert_eq!(read(&s, 333, 9000), data);
    assert_eq!(read(&s, 0, 100), pattern(100, 7));
    assert_eq!(read(&s, 10_000, 5), b"hello");
    let on_disk = std::fs::read(s.path()).unwrap();
    assert_eq!(on_disk.len(), 10_005);
    assert_eq!(&on_disk[333..9333], &data[..]);
}

fn check_discard(options: FileOptions) {
    let dir = tempdir();
    let s = patterned(&dir, "f", 1 << 20, options);
    let want = pattern(1 << 20, 7);
    s.discard(65536, 131072).unwrap();
    assert_eq!(s.len().unwrap(), 1 << 20, "a discard keeps the size");
    assert_eq!(read(&s, 65536, 131072), vec![0; 131072]);
    assert_eq!(read(&s, 0, 65536), &want[..65536]);
    assert_eq!(read(&s, 196608, 1000), &want[196608..197608]);
    // Unaligned, and reaching past the end: clamped, size kept.
    s.discard(1000, 10).unwrap();
    assert_eq!(read(&s, 990, 30)[..10], want[990..1000]);
    assert_eq!(read(&s, 1000, 10), vec![0; 10]);
    assert_eq!(read(&s, 1010, 10), &want[1010..1020]);
    s.discard((1 << 20) - 100, 1 << 30).unwrap();
    assert_eq!(s.len().unwrap(), 1 << 20);
    assert_eq!(read(&s, (1 << 20) - 100, 100), vec![0; 100]);
    // Wholly past the end: nothing happens.
    s.discard(2 << 20, 4096).unwrap();
    assert_eq!(s.len().unwrap(), 1 << 20);
    // A punched hole is deallocated (ext4 and tmpfs both punch holes).
    let blocks_before = std::fs::metadata(s.path()).unwrap().blocks();
    s.discard(0, 1 << 20).unwrap();
    let blocks_after = std::fs::metadata(s.path()).unwrap().blocks();
    assert!(blocks_after < blocks_before, "{blocks_after} < {blocks_before}");
    assert_eq!(s.len().unwrap(), 1 << 20);
}

fn check_write_zeroes(options: FileOptions) {
    let dir = tempdir();
    let s = patterned(&dir, "f", 100_000, options);
    let want = pattern(100_000, 7);
    s.write_zeroes(4096, 8192).unwrap();
    assert_eq!(read(&s, 4096, 8192), vec![0; 8192]);
    assert_eq!(read(&s, 0, 4096), &want[..4096]);
    assert_eq!(read(&s, 12288, 100), &want[12288..12388]);
    s.write_zeroes(50_001, 3).unwrap();
    assert_eq!(read(&s, 50_000, 5), [want[50_000], 0, 0, 0, want[50_004]]);
    assert_eq!(s.len().unwrap(), 100_000);
    // Across the end: grows.
    s.write_zeroes(99_000, 5000).unwrap();
    assert_eq!(s.len().unwrap(), 104_000);
    assert_eq!(read(&s, 99_000, 5000), vec![0; 5000]);
    assert_eq!(read(&s, 98_990, 10), &want[98_990..99_000]);
    // Wholly past the end: grows.
    s.write_zeroes(200_000, 1000).unwrap();
    assert_eq!(s.len().unwrap(), 201_000);
    assert_eq!(read(&s, 104_000, 97_000), vec![0; 97_000]);
    s.write_zeroes(0, 0).unwrap();
    assert_eq!(s.len().unwrap(), 201_000);
}

fn check_set_len(options: FileOptions) {
    let dir = tempdir();
    let s = patterned(&dir, "f", 10_000, options);
    let want = pattern(10_000, 7);
    s.set_len(3000).unwrap();
    assert_eq!(s.len().unwrap(), 3000);
    assert!(!s.is_empty().unwrap());
    s.set_len(20_000).unwrap();
    assert_eq!(read(&s, 0, 3000), &want[..3000]);
    assert_eq!(read(&s, 3000, 17_000), vec![0; 17_000]);
    s.set_len(0).unwrap();
    assert!(s.is_empty().unwrap());
    s.flush().unwrap();
}

macro_rules! both_modes {
    ($($check:ident),*) => {
        mod buffered {
            $(#[test] fn $check() { super::$check(super::buffered()) })*
        }
        mod direct {
            $(#[test] fn $check() { super::$check(super::direct()) })*
        }
    };
}

both_modes!(
    check_read_past_eof,
    check_write_grows,
    check_discard,
    check_write_zeroes,
    check_set_len
);

#[test]
fn read_only_storage_refuses_changes() {
    let dir = tempdir();
    let path = dir.path().join("f");
    std::fs::write(&path, b"data").unwrap();
    let s = FileStorage::open(&path, false).unwrap();
    assert!(!s.writable());
    for result in [s.write_at(b"x", 0), s.discard(0, 1), s.write_zeroes(0, 1), s.set_len(0)] {
        let e = result.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    }
    assert_eq!(read(&s, 0, 4), b"data");
}

#[test]
fn create_new_refuses_an_existing_file() {
    let dir = tempdir();
    let path = dir.path().join("f");
    let s = FileStorage::create(&path).unwrap();
    assert!(s.writable());
    assert_eq!(s.len().unwrap(), 0);
    drop(s);
    let e = FileStorage::create(&path).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
    let e = FileStorage::open(&dir.path().join("missing"), false).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::NotFound);
    // The OS error as it is (ENOENT): callers name the file in their own context.
    assert_eq!(e.raw_os_error(), Some(2), "{e}");
}

/// The open flags of the storage's descriptor, from `/proc/self/fdinfo`.
fn open_flags(storage: &FileStorage) -> u32 {
    let fd = storage.as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap();
    let flags = info.lines().find_map(|l| l.strip_prefix("flags:")).unwrap();
    u32::from_str_radix(flags.trim(), 8).unwrap()
}

#[test]
fn direct_io_really_is_direct() {
    let dir = tempdir();
    let fs = Command::new("stat").args(["-f", "-c", "%T"]).arg(dir.path()).output().unwrap();
    eprintln!("file system of {}: {}", dir.path().display(), String::from_utf8_lossy(&fs.stdout));
    let s = patterned(&dir, "f", 8192, direct());
    assert!(s.is_direct());
    let align = s.direct_alignment().unwrap();
    eprintln!("O_DIRECT alignment: {align}");
    assert!(align.is_power_of_two() && (512..=65536).contains(&align), "{align}");
    assert_ne!(open_flags(&s) & libc_o_direct(), 0, "O_DIRECT is set");
    let b = patterned(&dir, "g", 10, buffered());
    assert!(!b.is_direct());
    assert_eq!(b.direct_alignment(), None);
    assert_eq!(open_flags(&b) & libc_o_direct(), 0);
}

/// `O_DIRECT` on Linux (x86 and most others: 0o40000; arm64: 0o200000).
fn libc_o_direct() -> u32 {
    if cfg!(any(target_arch = "aarch64", target_arch = "arm")) { 0o200000 } else { 0o40000 }
}

#[test]
fn direct_unaligned_write_near_eof_keeps_the_length() {
    let dir = tempdir();
    let s = patterned(&dir, "f", 1000, direct());
    s.write_at(b"abc", 995).unwrap();
    assert_eq!(s.len().unwrap(), 1000);
    s.write_at(b"abcdefghij", 995).unwrap();
    assert_eq!(s.len().unwrap(), 1005);
    let mut want = pattern(1000, 7);
    want.truncate(995);
    want.extend_from_slice(b"abcdefghij");
    assert_eq!(std::fs::read(s.path()).unwrap(), want);
    // A large unaligned write goes through several bounce buffers.
    let big = pattern(3 << 20, 9);
    s.write_at(&big, 12345).unwrap();
    assert_eq!(s.len().unwrap(), 12345 + (3 << 20));
    assert_eq!(read(&s, 12345, 3 << 20), big);
    assert_eq!(read(&s, 0, 995), &want[..995]);
}

#[test]
fn direct_concurrent_unaligned_writes_to_one_block() {
    let dir = tempdir();
    let s = patterned(&dir, "f", 4096, direct());
    thread::scope(|scope| {
        for t in 0..4u8 {
            let s = &s;
            scope.spawn(move || {
                for i in 0..64u64 {
                    let at = u64::from(t) * 1024 + i * 16;
                    s.write_at(&[t + 1; 16], at).unwrap();
                }
            });
        }
    });
    let got = read(&s, 0, 4096);
    for t in 0..4u8 {
        assert!(got[usize::from(t) * 1024..][..1024].iter().all(|&b| b == t + 1), "thread {t}");
    }
}

#[derive(Clone, Debug)]
enum IoOp {
    Write(u64, Vec<u8>),
    Read(u64, usize),
    Discard(u64, u64),
    Zeroes(u64, u64),
    SetLen(u64),
}

fn io_op() -> impl Strategy<Value = IoOp> {
    let offset = prop_oneof![0..40_000u64, (0..10u64).prop_map(|b| b * 4096)];
    let len = prop_oneof![1..9000u64, (1..4u64).prop_map(|b| b * 4096)];
    prop_oneof![
        4 => (offset.clone(), len.clone(), any::<u8>())
            .prop_map(|(o, l, v)| IoOp::Write(o, vec![v | 1; l as usize])),
        3 => (offset.clone(), len.clone()).prop_map(|(o, l)| IoOp::Read(o, l as usize)),
        1 => (offset.clone(), len.clone()).prop_map(|(o, l)| IoOp::Discard(o, l)),
        1 => (offset, len).prop_map(|(o, l)| IoOp::Zeroes(o, l)),
        1 => (0..50_000u64).prop_map(IoOp::SetLen),
    ]
}

fn apply_both(ops: &[IoOp], file: &FileStorage) -> Result<(), TestCaseError> {
    let mem = MemStorage::new();
    for op in ops {
        match op {
            IoOp::Write(o, data) => {
                file.write_at(data, *o).unwrap();
                mem.write_at(data, *o).unwrap();
            }
            IoOp::Read(o, l) => prop_assert_eq!(read(file, *o, *l), read(&mem, *o, *l)),
            IoOp::Discard(o, l) => {
                file.discard(*o, *l).unwrap();
                mem.discard(*o, *l).unwrap();
            }
            IoOp::Zeroes(o, l) => {
                file.write_zeroes(*o, *l).unwrap();
                mem.write_zeroes(*o, *l).unwrap();
            }
            IoOp::SetLen(l) => {
                file.set_len(*l).unwrap();
                mem.set_len(*l).unwrap();
            }
        }
        prop_assert_eq!(file.len().unwrap(), mem.len().unwrap(), "after {:?}", op);
    }
    prop_assert_eq!(std::fs::read(file.path()).unwrap(), mem.to_bytes());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Buffered and `O_DIRECT` files behave as memory does.
    #[test]
    fn files_match_memory(ops in prop::collection::vec(io_op(), 1..40)) {
        let dir = tempdir();
        let path = dir.path().join("buffered");
        let file = buffered().create_new(true).open(&path).unwrap();
        apply_both(&ops, &file)?;
        let path = dir.path().join("direct");
        let file = direct().create_new(true).open(&path).unwrap();
        apply_both(&ops, &file)?;
    }
}

// ---------------------------------------------------------------------------------------
// Locking.

/// The bytes of `path` locked by anyone, from `/proc/locks` (OFD locks only).
fn locked_bytes(path: &Path) -> BTreeSet<u64> {
    let meta = std::fs::metadata(path).unwrap();
    let (ino, dev) = (meta.ino(), meta.dev());
    let (major, minor) = (libc_major(dev), libc_minor(dev));
    let locks = std::fs::read_to_string("/proc/locks").unwrap();
    let mut bytes = BTreeSet::new();
    for line in locks.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // "1: OFDLCK ADVISORY READ -1 fe:00:10043481 100 101"; waiters have "->".
        if fields.len() != 8 || fields[1] != "OFDLCK" {
            continue;
        }
        let id: Vec<&str> = fields[5].split(':').collect();
        let Ok(start) = fields[6].parse::<u64>() else { continue };
        let Ok(end) = fields[7].parse::<u64>() else { continue };
        if id.len() == 3
            && id[2].parse() == Ok(ino)
            && u64::from_str_radix(id[0], 16) == Ok(major)
            && u64::from_str_radix(id[1], 16) == Ok(minor)
        {
            assert_eq!(fields[3], "READ", "QEMU-style locks are shared: {line}");
            bytes.extend(start..=end);
        }
    }
    bytes
}

fn libc_major(dev: u64) -> u64 {
    ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff)
}

fn libc_minor(dev: u64) -> u64 {
    ((dev >> 12) & 0xffff_ff00) | (dev & 0xff)
}

fn set(bytes: &[u64]) -> BTreeSet<u64> {
    bytes.iter().copied().collect()
}

/// A QEMU image of 1 MiB in a new directory.
fn qcow2_image(dir: &TempDir) -> PathBuf {
    let path = dir.path().join("disk.qcow2");
    create_qcow2(&path);
    path
}

fn create_qcow2(path: &Path) {
    testkit::qemu_img(with_path(&["create", "-q", "-f", "qcow2"], path, &["1M"])).unwrap();
}

/// `before… path after…` as arguments.
fn with_path(before: &[&str], path: &Path, after: &[&str]) -> Vec<OsString> {
    let mut args: Vec<OsString> = before.iter().map(OsString::from).collect();
    args.push(path.into());
    args.extend(after.iter().map(OsString::from));
    args
}

fn raw_image(dir: &TempDir) -> PathBuf {
    let path = dir.path().join("disk.raw");
    std::fs::File::create(&path).unwrap().set_len(1 << 20).unwrap();
    path
}

/// A QEMU tool kept running with an image open, killed (by its PID) when dropped.
struct Holder {
    child: Child,
    what: String,
}

impl Holder {
    /// Starts `qemu-io ARGS PATH` reading commands from a pipe that stays open, and
    /// waits until exactly the bytes `want` of `path` are locked (QEMU takes its lock
    /// bytes one at a time, and may change them while it builds its block graph).
    fn qemu_io(args: &[&str], path: &Path, want: &[u64]) -> Holder {
        Self::qemu_io_filename(args, path.as_os_str(), path, want)
    }

    /// Like [`Holder::qemu_io`], with a filename argument other than the path (JSON).
    fn qemu_io_filename(
        args: &[&str],
        filename: &std::ffi::OsStr,
        path: &Path,
        want: &[u64],
    ) -> Holder {
        let child = Command::new(testkit::require_tool("qemu-io"))
            .args(args)
            .arg(filename)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let what = format!("qemu-io {} {}", args.join(" "), filename.display());
        // From here on, a panic drops the holder, which kills the process.
        let mut holder = Holder { child, what };
        holder.wait_for_locks(path, want);
        holder
    }

    fn wait_for_locks(&mut self, path: &Path, want: &[u64]) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let locked = locked_bytes(path);
            if locked == set(want) {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut stderr = String::new();
                self.child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
                panic!("{} exited ({status}) before locking the image: {stderr}", self.what);
            }
            assert!(
                Instant::now() < deadline,
                "{} did not lock {want:?} in time; locked: {locked:?}",
                self.what
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        // Our unreaped child: its PID cannot have been reused.
        let _ = self.child.kill();
        let status = self.child.wait();
        eprintln!("stopped {}: {status:?}", self.what);
    }
}

fn conflict(e: &io::Error) -> &LockConflict {
    assert_eq!(e.kind(), io::ErrorKind::ResourceBusy, "{e}");
    LockConflict::from_io(e).unwrap_or_else(|| panic!("not a lock conflict: {e}"))
}

#[test]
fn lock_bytes_of_each_mode() {
    let dir = tempdir();
    let path = raw_image(&dir);
    let cases: [(FileOptions, &[u64]); 6] = [
        (FileOptions::new().write(true), &[100, 101, 103, 201, 203]),
        (FileOptions::new(), &[100, 201, 203]),
        (FileOptions::new().locking(Locking::ForceShare), &[100]),
        (FileOptions::new().write(true).locking(Locking::ForceShare), &[100, 101, 103]),
        (FileOptions::new().write(true).locking(Locking::Off), &[]),
        (
            FileOptions::new().write(true).locking(Locking::Explicit {
                perm: Permissions::WRITE_UNCHANGED,
                shared: Permissions::ALL.difference(Permissions::CONSISTENT_READ),
            }),
            &[102, 200],
        ),
    ];
    for (options, want) in cases {
        let s = options.open(&path).unwrap();
        assert_eq!(locked_bytes(&path), set(want), "{options:?}");
        drop(s);
        assert_eq!(locked_bytes(&path), set(&[]), "released on drop: {options:?}");
    }
    let e = FileOptions::new()
        .locking(Locking::Explicit { perm: Permissions::WRITE, shared: Permissions::ALL })
        .open(&path)
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
}

/// What QEMU itself locks, from `/proc/locks`: the layout this crate reproduces.
#[test]
fn qemu_lock_bytes_layout() {
    let dir = tempdir();
    let qcow2 = qcow2_image(&dir);
    let raw = raw_image(&dir);
    let cases: [(&[&str], &Path, &[u64]); 5] = [
        // A qcow2 node's file, writable: consistent read, write, resize; shares neither
        // write nor resize. The same bytes as FileStorage's Locking::Auto.
        (&[], &qcow2, &[100, 101, 103, 201, 203]),
        (&["-r"], &qcow2, &[100, 201, 203]),
        (&["-r", "-U"], &qcow2, &[100]),
        // qemu-io on a raw image shares everything.
        (&["-f", "raw"], &raw, &[100, 101]),
        (&["-r", "-f", "raw"], &raw, &[100]),
    ];
    for (args, path, want) in cases {
        let holder = Holder::qemu_io(args, path, want);
        drop(holder);
    }
}

#[test]
fn writer_makes_qemu_img_info_fail_without_force_share() {
    let dir = tempdir();
    let path = qcow2_image(&dir);
    let storage = FileStorage::open(&path, true).unwrap();
    let e = testkit::qemu_img(with_path(&["info"], &path, &[])).unwrap_err().to_string();
    let want = format!(
        "Failed to get shared \"write\" lock\nIs another process using the image [{}]?",
        path.display()
    );
    assert!(e.contains(&want), "{e}");
    // qemu-img -U works.
    let info = testkit::qemu_img(with_path(&["info", "-U"], &path, &[])).unwrap();
    assert!(info.contains("file format: qcow2"), "{info}");
    // qemu-io refuses to write.
    let e =
        testkit::qemu_io(with_path(&["-c", "write 0 512"], &path, &[])).unwrap_err().to_string();
    assert!(e.contains("Failed to get \"write\" lock"), "{e}");
    drop(storage);
    testkit::qemu_img(with_path(&["info"], &path, &[])).unwrap();
    testkit::qemu_io(with_path(&["-c", "write 0 512"], &path, &[])).unwrap();
}

#[test]
fn readers_coexist_with_qemu_readers_but_not_writers() {
    let dir = tempdir();
    let path = qcow2_image(&dir);
    let a = FileStorage::open(&path, false).unwrap();
    let b = FileStorage::open(&path, false).unwrap();
    let c = FileOptions::new().locking(Locking::ForceShare).open(&path).unwrap();
    testkit::qemu_img(with_path(&["info"], &path, &[])).unwrap();
    testkit::qemu_io(with_path(&["-r", "-c", "read 0 512"], &path, &[])).unwrap();
    let e =
        testkit::qemu_io(with_path(&["-c", "write 0 512"], &path, &[])).unwrap_err().to_string();
    assert!(e.contains("Failed to get \"write\" lock"), "{e}");
    // A writer here conflicts too.
    let e = FileStorage::open(&path, true).unwrap_err();
    assert_eq!(
        *conflict(&e),
        LockConflict {
            path: path.clone(),
            permission: Permission::Write,
            kind: ConflictKind::Permission
        }
    );
    drop((a, b));
    // Only the force-share reader is left: it lets writers in.
    let w = FileStorage::open(&path, true).unwrap();
    drop((c, w));
}

#[test]
fn qemu_io_writer_blocks_writable_open() {
    let dir = tempdir();
    let path = raw_image(&dir);
    let holder = Holder::qemu_io(&["-f", "raw"], &path, &[100, 101]);
    let e = FileStorage::open(&path, true).unwrap_err();
    let c = conflict(&e);
    assert_eq!((c.permission, c.kind), (Permission::Write, ConflictKind::Unshare));
    let message = e.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("failed to get shared \"write\" lock"), "{message}");
    assert!(message.contains("is another process using the image"), "{message}");
    // Nothing was left locked by the failed open.
    assert_eq!(locked_bytes(&path), set(&[100, 101]));
    // A read-only open that refuses to share writes fails too; a force-share one works.
    let e = FileStorage::open(&path, false).unwrap_err();
    assert_eq!(conflict(&e).permission, Permission::Write);
    let reader = FileOptions::new().locking(Locking::ForceShare).open(&path).unwrap();
    let mut buf = [1u8; 512];
    reader.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0; 512]);
    drop(holder);
    drop(reader);
    let writer = FileStorage::open(&path, true).unwrap();
    drop(writer);
}

#[test]
fn storage_daemon_writer_blocks_writable_open() {
    let dir = tempdir();
    let path = dir.path().join("disk.qcow2");
    let builder = StorageDaemon::qemu();
    create_qcow2(&path);
    let daemon = builder
        .arg("--blockdev")
        .arg(format!("driver=file,node-name=file0,filename={}", path.display()))
        .arg("--blockdev")
        .arg("driver=qcow2,node-name=disk0,file=file0")
        .start()
        .unwrap();
    assert_eq!(locked_bytes(&path), set(&[100, 101, 103, 201, 203]));
    // The daemon does not share write: taking it fails.
    let e = FileStorage::open(&path, true).unwrap_err();
    let c = conflict(&e);
    assert_eq!((c.permission, c.kind), (Permission::Write, ConflictKind::Permission));
    assert!(e.to_string().contains("failed to get \"write\" lock"), "{e}");
    let e = FileStorage::open(&path, false).unwrap_err();
    assert_eq!(conflict(&e).kind, ConflictKind::Unshare);
    let reader = FileOptions::new().locking(Locking::ForceShare).open(&path).unwrap();
    let mut magic = [0u8; 4];
    reader.read_at(&mut magic, 0).unwrap();
    assert_eq!(&magic, b"QFI\xfb");
    daemon.quit().unwrap();
    drop(reader);
    drop(FileStorage::open(&path, true).unwrap());
}

/// Bits 0 and 2 (consistent read, write unchanged), which the other tests do not
/// exercise, checked with QEMU's blkdebug driver, which takes and unshares permissions
/// on request.
#[test]
fn consistent_read_and_write_unchanged_bits() {
    let dir = tempdir();
    let path = raw_image(&dir);
    // We refuse to share consistent read and write unchanged: QEMU's reader fails.
    let s = FileOptions::new()
        .locking(Locking::Explicit {
            perm: Permissions::NONE,
            shared: Permissions::WRITE | Permissions::RESIZE,
        })
        .open(&path)
        .unwrap();
    assert_eq!(locked_bytes(&path), set(&[200, 202]));
    let e = testkit::qemu_io(with_path(&["-r", "-f", "raw", "-c", "read 0 512"], &path, &[]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("Failed to get \"consistent read\" lock"), "{e}");
    let blkdebug = |take: &str| {
        format!(
            r#"json:{{"driver":"raw","file":{{"driver":"blkdebug","take-child-perms":["{take}"],"image":{{"driver":"file","filename":"{}"}}}}}}"#,
            path.display()
        )
    };
    let e = testkit::qemu_io(["-c", "read 0 512", &blkdebug("write-unchanged")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("Failed to get \"write unchanged\" lock"), "{e}");
    drop(s);

    // QEMU holds write unchanged and refuses to share consistent read.
    let json = format!(
        r#"json:{{"driver":"raw","file":{{"driver":"blkdebug","take-child-perms":["write-unchanged"],"unshare-child-perms":["consistent-read"],"image":{{"driver":"file","filename":"{}"}}}}}}"#,
        path.display()
    );
    let holder = Holder::qemu_io_filename(&[], json.as_ref(), &path, &[100, 101, 102, 200]);
    let e = FileOptions::new().locking(Locking::ForceShare).open(&path).unwrap_err();
    let c = conflict(&e);
    assert_eq!((c.permission, c.kind), (Permission::ConsistentRead, ConflictKind::Permission));
    assert!(e.to_string().contains("failed to get \"consistent read\" lock"), "{e}");
    let e = FileOptions::new()
        .locking(Locking::Explicit {
            perm: Permissions::NONE,
            shared: Permissions::ALL.difference(Permissions::WRITE_UNCHANGED),
        })
        .open(&path)
        .unwrap_err();
    let c = conflict(&e);
    assert_eq!((c.permission, c.kind), (Permission::WriteUnchanged, ConflictKind::Unshare));
    assert!(e.to_string().contains("failed to get shared \"write unchanged\" lock"), "{e}");
    drop(holder);
}

#[test]
fn two_writers_in_one_process_conflict() {
    let dir = tempdir();
    let path = raw_image(&dir);
    let a = FileStorage::open(&path, true).unwrap();
    let e = FileStorage::open(&path, true).unwrap_err();
    assert_eq!(conflict(&e).permission, Permission::Write);
    let e = FileStorage::open(&path, false).unwrap_err();
    assert_eq!(conflict(&e).kind, ConflictKind::Unshare);
    // Locking::Off ignores everything.
    let off = FileOptions::new().write(true).locking(Locking::Off).open(&path).unwrap();
    off.write_at(b"x", 0).unwrap();
    drop(a);
    let b = FileStorage::open(&path, true).unwrap();
    drop((b, off));
}

#[test]
fn set_locking_changes_locks_atomically() {
    let dir = tempdir();
    let path = qcow2_image(&dir);
    let writer = FileStorage::open(&path, true).unwrap();
    let reader = FileOptions::new().locking(Locking::ForceShare).open(&path).unwrap();
    assert_eq!(reader.locks(), Some((Permissions::CONSISTENT_READ, Permissions::ALL)));
    // Refusing to share write while the writer holds it fails, and changes nothing.
    let e = reader.set_locking(Locking::Auto).unwrap_err();
    assert_eq!(conflict(&e).kind, ConflictKind::Unshare);
    assert_eq!(reader.locks(), Some((Permissions::CONSISTENT_READ, Permissions::ALL)));
    assert_eq!(locked_bytes(&path), set(&[100, 101, 103, 201, 203]));
    // The writer can downgrade to sharing everything; then qemu-img info works.
    writer.set_locking(Locking::ForceShare).unwrap();
    assert_eq!(locked_bytes(&path), set(&[100, 101, 103]));
    let e = testkit::qemu_img(with_path(&["info"], &path, &[])).unwrap_err().to_string();
    assert!(
        e.contains("Failed to get shared \"write\" lock"),
        "qemu-img info refuses a writer: {e}"
    );
    drop(writer);
    reader.set_locking(Locking::Auto).unwrap();
    assert_eq!(
        reader.locks(),
        Some((
            Permissions::CONSISTENT_READ,
            Permissions::ALL.difference(Permissions::WRITE | Permissions::RESIZE)
        ))
    );
    testkit::qemu_img(with_path(&["info"], &path, &[])).unwrap();
    reader.set_locking(Locking::Off).unwrap();
    assert_eq!(locked_bytes(&path), set(&[]));
    assert_eq!(reader.locks(), None);
    let e = reader
        .set_locking(Locking::Explicit { perm: Permissions::RESIZE, shared: Permissions::ALL })
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
}

/// procfs, like file systems without direct I/O, refuses `O_DIRECT` at open.
#[test]
fn direct_io_refused_by_the_file_system_is_a_clear_error() {
    let e = FileOptions::new().direct(true).open("/proc/self/status").unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::Unsupported, "{e}");
    let message = e.to_string();
    assert!(message.contains("/proc/self/status") && message.contains("O_DIRECT"), "{message}");
}

/// Closing a storage releases its image locks even while another descriptor of the same
/// open file description lives on (as in a child process between fork and exec): a
/// reopen right after the close must not conflict with the old locks.
#[test]
fn locks_go_with_the_storage_even_if_its_description_lives_on() {
    let dir = tempdir();
    let path = dir.path().join("locked.img");
    std::fs::write(&path, vec![0u8; 4096]).unwrap();
    let storage = FileOptions::new().write(true).open(&path).unwrap();
    // A duplicate descriptor shares the open file description, and so its OFD locks.
    let dup = storage.as_fd().try_clone_to_owned().unwrap();
    drop(storage);
    let again = FileOptions::new().write(true).open(&path);
    assert!(again.is_ok(), "the closed storage's locks are still held: {:?}", again.err());
    drop(dup);
}
