//! A file as storage, locked as QEMU locks images, optionally with `O_DIRECT`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use rustix::fs::{AtFlags, FallocateFlags, StatxFlags};

use super::Storage;
use super::lock::{self, Locking, Permissions};

/// Alignment assumed for `O_DIRECT` when the kernel does not report one.
const DEFAULT_DIRECT_ALIGN: u32 = 4096;
/// Largest bounce buffer for unaligned `O_DIRECT` I/O; longer requests go in pieces.
const BOUNCE_MAX: u64 = 1 << 20;
/// Largest buffer of zeroes written when the file system cannot zero a range itself.
const ZERO_BUF_MAX: u64 = 1 << 20;

/// How to open a [`FileStorage`]: read-only or writable, creating the file or not,
/// with which [`Locking`], with `O_DIRECT` or not.
///
/// ```no_run
/// use qcow2::storage::{FileOptions, Locking};
///
/// // Like `qemu-img info -U`: read, and let others do anything meanwhile.
/// let storage = FileOptions::new().locking(Locking::ForceShare).open("disk.qcow2")?;
/// // Writable, bypassing the page cache (QEMU's `cache.direct=on`).
/// let storage = FileOptions::new().write(true).direct(true).open("disk.qcow2")?;
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileOptions {
    write: bool,
    create_new: bool,
    direct: bool,
    locking: Locking,
}

impl FileOptions {
    /// Read-only, existing file, [`Locking::Auto`], no `O_DIRECT`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Opens for writing as well as reading.
    pub fn write(mut self, write: bool) -> Self {
        self.write = write;
        self
    }

    /// Creates the file, which must not exist yet; implies [`FileOptions::write`].
    pub fn create_new(mut self, create_new: bool) -> Self {
        self.create_new = create_new;
        self
    }

    /// Opens with `O_DIRECT` (QEMU's `cache.direct=on`): I/O bypasses the page cache.
    /// Requests that are not aligned to the file system's direct I/O alignment go
    /// through aligned bounce buffers (unaligned writes read, modify and write whole
    /// blocks). Fails with [`io::ErrorKind::Unsupported`] where the file system refuses
    /// `O_DIRECT`.
    pub fn direct(mut self, direct: bool) -> Self {
        self.direct = direct;
        self
    }

    /// How to lock the file (default [`Locking::Auto`]).
    pub fn locking(mut self, locking: Locking) -> Self {
        self.locking = locking;
        self
    }

    /// Opens `path`.
    ///
    /// If another open of the file holds conflicting locks, fails with an error of kind
    /// [`io::ErrorKind::ResourceBusy`] holding a [`LockConflict`](super::LockConflict)
    /// (see [`LockConflict::from_io`](super::LockConflict::from_io)).
    pub fn open(&self, path: impl AsRef<Path>) -> io::Result<FileStorage> {
        let path = path.as_ref();
        let writable = self.write || self.create_new;
        let locks = self.locking.resolve(writable);
        if let Some((perm, _)) = locks
            && !writable
            && !perm.difference(Permissions::CONSISTENT_READ).is_empty()
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "cannot hold permissions {perm:?} on {}: it is opened read-only",
                    path.display()
                ),
            ));
        }
        let mut options = OpenOptions::new();
        options.read(true).write(writable).create_new(self.create_new);
        if self.direct {
            options.custom_flags(libc::O_DIRECT);
        }
        let file = options.open(path).map_err(|e| {
            if self.direct && e.raw_os_error() == Some(libc::EINVAL) {
                io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!(
                        "cannot open {} with O_DIRECT (cache.direct=on): the file system \
                         does not support it",
                        path.display()
                    ),
                )
            } else {
                // The OS error as it is: callers name the file in their own context.
                e
            }
        })?;
        let direct = if self.direct { Some(Direct::new(&file)) } else { None };
        lock::change(&file, path, None, locks)?;
        Ok(FileStorage {
            file,
            path: path.to_path_buf(),
            writable,
            locks: Mutex::new(locks),
            direct,
        })
    }
}

/// `O_DIRECT` state: the alignment, and a lock that keeps read-modify-write cycles
/// from racing with other I/O on the same blocks.
#[derive(Debug)]
struct Direct {
    /// Alignment of offsets and lengths (a power of two).
    align: u64,
    /// Alignment of memory buffers (a power of two).
    mem_align: usize,
    /// Held exclusively by operations that rewrite whole blocks around their range.
    rmw: RwLock<()>,
}

impl Direct {
    fn new(file: &File) -> Self {
        let (mut align, mut mem_align) = (DEFAULT_DIRECT_ALIGN, DEFAULT_DIRECT_ALIGN);
        if let Ok(stat) = rustix::fs::statx(file, "", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN)
            && StatxFlags::from_bits_retain(stat.stx_mask).contains(StatxFlags::DIOALIGN)
            && stat.stx_dio_offset_align.is_power_of_two()
            && stat.stx_dio_mem_align.is_power_of_two()
        {
            align = stat.stx_dio_offset_align;
            mem_align = stat.stx_dio_mem_align;
        }
        Direct { align: u64::from(align), mem_align: mem_align as usize, rmw: RwLock::new(()) }
    }

    fn down(&self, x: u64) -> u64 {
        x & !(self.align - 1)
    }

    fn up(&self, x: u64) -> io::Result<u64> {
        x.checked_next_multiple_of(self.align).ok_or_else(too_far)
    }

    /// Whether a request can go to the file as is.
    fn aligned(&self, ptr: *const u8, len: usize, offset: u64) -> bool {
        offset.is_multiple_of(self.align)
            && (len as u64).is_multiple_of(self.align)
            && ptr.addr().is_multiple_of(self.mem_align)
    }

    fn shared(&self) -> RwLockReadGuard<'_, ()> {
        self.rmw.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.rmw.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A zeroed buffer whose start is aligned for `O_DIRECT`.
struct Bounce {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl Bounce {
    fn new(len: usize, align: usize) -> io::Result<Self> {
        let raw = vec![0u8; len + align];
        let start = raw.as_ptr().align_offset(align);
        if start > align {
            return Err(io::Error::other("cannot align a bounce buffer for O_DIRECT"));
        }
        Ok(Bounce { raw, start, len })
    }

    fn get(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

fn too_far() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "offset out of range")
}

fn end_of(offset: u64, len: u64) -> io::Result<u64> {
    offset.checked_add(len).ok_or_else(too_far)
}

/// A file opened for positional I/O, holding QEMU-compatible image locks (see
/// [`Locking`]) until it is dropped.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    path: PathBuf,
    writable: bool,
    /// Held and shared permissions; `None` when not locking.
    locks: Mutex<Option<(Permissions, Permissions)>>,
    direct: Option<Direct>,
}

impl FileStorage {
    /// Opens an existing file, read-only or read-write, with [`Locking::Auto`].
    pub fn open(path: &Path, writable: bool) -> io::Result<Self> {
        FileOptions::new().write(writable).open(path)
    }

    /// Creates a new file (it must not exist) and opens it read-write, with
    /// [`Locking::Auto`].
    pub fn create(path: &Path) -> io::Result<Self> {
        FileOptions::new().create_new(true).open(path)
    }

    /// The path the file was opened at.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file was opened for writing.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// Whether the file was opened with `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// With `O_DIRECT`, the alignment of offsets and lengths that go to the file without
    /// a bounce buffer (from `statx`'s `STATX_DIOALIGN`, else 4096).
    pub fn direct_alignment(&self) -> Option<u64> {
        self.direct.as_ref().map(|d| d.align)
    }

    /// The permissions held and shared, `None` when not locking ([`Locking::Off`]).
    pub fn locks(&self) -> Option<(Permissions, Permissions)> {
        *self.locks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the locks, as QEMU does when it reopens an image or changes a node's
    /// permissions: takes the new lock bytes, checks for conflicts, drops the old ones.
    /// On a conflict (an error as from [`FileOptions::open`]) the locks are unchanged.
    pub fn set_locking(&self, locking: Locking) -> io::Result<()> {
        let new = locking.resolve(self.writable);
        if let Some((perm, _)) = new
            && !self.writable
            && !perm.difference(Permissions::CONSISTENT_READ).is_empty()
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot hold {perm:?} on {}: it is opened read-only", self.path.display()),
            ));
        }
        let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
        lock::change(&self.file, &self.path, *locks, new)?;
        *locks = new;
        Ok(())
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{} is opened read-only", self.path.display()),
            ))
        }
    }

    fn error(&self, what: &str, e: io::Error) -> io::Error {
        let context = format!("{what} {}", self.path.display());
        io::Error::new(e.kind(), Contextual { context, source: e })
    }

    /// Reads at `offset` until `buf` is full or the file ends; the rest is zeroed.
    fn read_full(&self, buf: &mut [u8], offset: u64, direct: Option<&Direct>) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => {
                    done += n;
                    // With O_DIRECT a read that ends off the alignment has hit the end
                    // of the file; reading on from there would fail with EINVAL.
                    if let Some(d) = direct
                        && !d.aligned(buf[done..].as_ptr(), 0, offset + done as u64)
                    {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.error("cannot read", e)),
            }
        }
        buf[done..].fill(0);
        Ok(())
    }

    fn read_direct(&self, d: &Direct, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let _guard = d.shared();
        if d.aligned(buf.as_ptr(), buf.len(), offset) {
            return self.read_full(buf, offset, Some(d));
        }
        let end = end_of(offset, buf.len() as u64)?;
        let mut pos = offset;
        while pos < end {
            let window = d.down(pos);
            let window_end = d.up(end)?.min(window + BOUNCE_MAX);
            let mut bounce = Bounce::new((window_end - window) as usize, d.mem_align)?;
            self.read_full(bounce.get(), window, Some(d))?;
            let stop = end.min(window_end);
            buf[(pos - offset) as usize..(stop - offset) as usize]
                .copy_from_slice(&bounce.get()[(pos - window) as usize..(stop - window) as usize]);
            pos = stop;
        }
        Ok(())
    }

    fn write_direct(&self, d: &Direct, buf: &[u8], offset: u64) -> io::Result<()> {
        if d.aligned(buf.as_ptr(), buf.len(), offset) {
            let _guard = d.shared();
            return self.file.write_all_at(buf, offset).map_err(|e| self.error("cannot write", e));
        }
        let _guard = d.exclusive();
        self.write_direct_locked(d, buf, offset)
    }

    /// Read-modify-write of the aligned blocks around `[offset, offset + buf.len())`;
    /// the caller holds `d.rmw` exclusively.
    fn write_direct_locked(&self, d: &Direct, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = end_of(offset, buf.len() as u64)?;
        let old_len = self.len()?;
        let mut pos = offset;
        while pos < end {
            let window = d.down(pos);
            let window_end = d.up(end)?.min(window + BOUNCE_MAX);
            let mut bounce = Bounce::new((window_end - window) as usize, d.mem_align)?;
            let stop = end.min(window_end);
            if window < pos || stop < window_end {
                self.read_full(bounce.get(), window, Some(d))?;
            }
            bounce.get()[(pos - window) as usize..(stop - window) as usize]
                .copy_from_slice(&buf[(pos - offset) as usize..(stop - offset) as usize]);
            self.file
                .write_all_at(bounce.get(), window)
                .map_err(|e| self.error("cannot write", e))?;
            pos = stop;
        }
        // Whole blocks may have grown the file past the end of the write.
        let new_len = old_len.max(end);
        if self.len()? > new_len {
            self.file.set_len(new_len).map_err(|e| self.error("cannot resize", e))?;
        }
        Ok(())
    }

    /// Writes zeroes over `[offset, end)` with ordinary writes.
    fn write_zero_buffers(&self, offset: u64, end: u64) -> io::Result<()> {
        let zeroes = vec![0u8; (end - offset).min(ZERO_BUF_MAX) as usize];
        let mut at = offset;
        while at < end {
            let n = (end - at).min(zeroes.len() as u64) as usize;
            match &self.direct {
                Some(d) => self.write_direct_locked(d, &zeroes[..n], at)?,
                None => self
                    .file
                    .write_all_at(&zeroes[..n], at)
                    .map_err(|e| self.error("cannot write", e))?,
            }
            at += n as u64;
        }
        Ok(())
    }

    /// Holds the `O_DIRECT` read-modify-write lock exclusively, if there is one.
    fn exclusive(&self) -> Option<RwLockWriteGuard<'_, ()>> {
        self.direct.as_ref().map(Direct::exclusive)
    }
}

impl AsFd for FileStorage {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl Drop for FileStorage {
    /// Releases the image locks before the descriptor closes. An OFD lock belongs to
    /// the open file description, which a child process forked by another thread may
    /// still share for a moment (until its exec closes the descriptor): without this
    /// the locks could outlive the close, and an immediate reopen would see a conflict.
    fn drop(&mut self) {
        let locks = *self.locks.get_mut().unwrap_or_else(PoisonError::into_inner);
        if locks.is_some() {
            let _ = lock::change(&self.file, &self.path, locks, None);
        }
    }
}

impl FileStorage {
    /// Whether `offset` lies in data or in a hole of the file, and how many bytes from
    /// `offset` (at least 1, at most to the end of the file) share that state, from
    /// `SEEK_DATA`/`SEEK_HOLE`. A file system without hole support reports all data.
    pub fn data_run(&self, offset: u64) -> io::Result<(bool, u64)> {
        let size = self.len()?;
        if offset >= size {
            return Ok((false, 1));
        }
        let next_data = match rustix::fs::seek(&self.file, rustix::fs::SeekFrom::Data(offset)) {
            Ok(d) => d,
            // No data at or after `offset`: a hole to the end.
            Err(rustix::io::Errno::NXIO) => return Ok((false, size - offset)),
            Err(e) => return Err(e.into()),
        };
        if next_data > offset {
            return Ok((false, next_data.min(size) - offset));
        }
        let hole = match rustix::fs::seek(&self.file, rustix::fs::SeekFrom::Hole(offset)) {
            Ok(h) => h.min(size),
            Err(rustix::io::Errno::NXIO) => size,
            Err(e) => return Err(e.into()),
        };
        Ok((true, hole.saturating_sub(offset).max(1)))
    }
}

impl Storage for FileStorage {
    fn release_locks(&self) -> io::Result<()> {
        self.set_locking(Locking::Off)
    }

    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        if self.direct.is_some() || buf.is_empty() {
            return Ok(buf.is_empty());
        }
        let mut done = 0;
        while done < buf.len() {
            let slice = &mut [io::IoSliceMut::new(&mut buf[done..])];
            let at = offset + done as u64;
            match rustix::io::preadv2(&self.file, slice, at, rustix::io::ReadWriteFlags::NOWAIT) {
                Ok(0) => return Ok(false), // end of file: the blocking read zero-fills
                Ok(n) => done += n,
                // EAGAIN: not cached; anything else: let the blocking read report it.
                Err(_) => return Ok(false),
            }
        }
        Ok(true)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        end_of(offset, buf.len() as u64)?;
        match &self.direct {
            Some(d) => self.read_direct(d, buf, offset),
            None => self.read_full(buf, offset, None),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_writable()?;
        if buf.is_empty() {
            return Ok(());
        }
        end_of(offset, buf.len() as u64)?;
        match &self.direct {
            Some(d) => self.write_direct(d, buf, offset),
            None => self.file.write_all_at(buf, offset).map_err(|e| self.error("cannot write", e)),
        }
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data().map_err(|e| self.error("cannot flush", e))
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        let _guard = self.exclusive();
        let size = self.len()?;
        let len = len.min(size.saturating_sub(offset));
        if len == 0 {
            return Ok(());
        }
        let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        match rustix::fs::fallocate(&self.file, flags, offset, len) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::OPNOTSUPP) => self.write_zero_buffers(offset, offset + len),
            Err(e) => Err(self.error("cannot discard in", e.into())),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        let end = end_of(offset, len)?;
        let _guard = self.exclusive();
        // ZERO_RANGE also extends the file when the range reaches past its end, and,
        // unlike a length check followed by set_len, can never shrink it under a
        // concurrent write past the end.
        match rustix::fs::fallocate(&self.file, FallocateFlags::ZERO_RANGE, offset, len) {
            Ok(()) => Ok(()),
            Err(_) => self.write_zero_buffers(offset, end),
        }
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata().map_err(|e| self.error("cannot stat", e))?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check_writable()?;
        let _guard = self.exclusive();
        self.file.set_len(len).map_err(|e| self.error("cannot resize", e))
    }
}

/// An OS error with what was being done to which file. The OS error stays reachable as
/// the `source`, so that callers can still find its errno (QEMU reports and acts on
/// errnos: a job's error text, the `enospc` error policy).
#[derive(Debug)]
struct Contextual {
    context: String,
    source: io::Error,
}

impl std::fmt::Display for Contextual {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.context, self.source)
    }
}

impl std::error::Error for Contextual {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}
