//! A repository in a local directory: one file per object.
//!
//! Object `a/b/c` is the file `ROOT/a/b/c`. Temporaries live in `ROOT/.tmp/`, locks
//! in `ROOT/.locks/`; keys never start with `.`, so neither is ever an object.
//!
//! # Crash safety
//!
//! [`create`](LocalBackend::create) writes the bytes to a new temporary file, fsyncs it,
//! then `link(2)`s it to the object's name, which fails when the name exists: so a name,
//! once visible, always has its whole content behind it, durably, and an existing object
//! is never replaced. The name's directory entry is made durable by
//! [`sync`](LocalBackend::sync), which fsyncs every directory changed since the last
//! sync (including the parents of new directories). A crash before the sync may lose the
//! name, never leave a name with partial content. A crash between the link and the
//! removal of the temporary leaves a temporary, which
//! [`remove_leftovers`](Backend::remove_leftovers) removes later.
//!
//! A [`Batch`] writes each object to its own temporary when it is added, and starts its
//! writeback at once without waiting. [`Batch::publish`] then `fdatasync`s every
//! temporary (by then mostly written: the flushes overlap, and the journal commits once
//! for many files instead of once per file), and only after all of them links each to
//! its name. So the argument above holds for batches too: a crash before publish leaves
//! only temporaries, and a name appears only over durable content.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use rustix::fs::{FlockOperation, flock};

use super::{Backend, Batch, Created, LockGuard, LockMode, LockWait, ObjectInfo, valid_key};
use crate::error::{corrupt, io_err};
use crate::{Error, Result};

const TMP_DIR: &str = ".tmp";
const LOCK_DIR: &str = ".locks";

/// A repository directory.
#[derive(Debug)]
pub struct LocalBackend {
    root: PathBuf,
    /// Directories whose entries changed since the last [`sync`](Backend::sync).
    dirty_dirs: Mutex<BTreeSet<PathBuf>>,
}

#[derive(Debug)]
struct FileLock {
    _file: File,
}
impl LockGuard for FileLock {}

impl LocalBackend {
    /// The backend of the directory `root`, which must exist.
    pub fn open(root: &Path) -> Result<LocalBackend> {
        let text = root.display().to_string();
        let meta = fs::metadata(root).map_err(io_err(&text, "opening the repository"))?;
        if !meta.is_dir() {
            return Err(Error::Invalid(format!("{text}: the repository is not a directory")));
        }
        // `.tmp` and `.locks` are made when first needed: opening a directory that
        // turns out not to be a repository changes nothing in it.
        Ok(LocalBackend { root: root.to_path_buf(), dirty_dirs: Mutex::new(BTreeSet::new()) })
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        if !valid_key(key) {
            return Err(Error::Invalid(format!("invalid object key '{key}'")));
        }
        Ok(self.root.join(key))
    }

    /// Object `key` opened for reading, and its length; [`Error::Missing`] when absent.
    fn open_object(&self, key: &str) -> Result<(File, u64)> {
        let file = match File::open(self.path(key)?) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::Missing { object: key.to_owned() });
            }
            Err(e) => return Err(io_err(key, "opening")(e)),
        };
        let len = file.metadata().map_err(io_err(key, "stat"))?.len();
        Ok((file, len))
    }

    /// The file of lock `name` (a single valid key part).
    fn lock_path(&self, name: &str) -> Result<PathBuf> {
        if !valid_key(name) || name.contains('/') {
            return Err(Error::Invalid(format!("invalid lock name '{name}'")));
        }
        Ok(self.root.join(LOCK_DIR).join(name))
    }

    /// Gives the durable temporary `tmp` the name `key` (at `path`), or renews the object
    /// that has it already.
    fn link_or_renew(&self, tmp: &Path, key: &str, path: &Path) -> Result<Created> {
        self.make_parents(path)?;
        match fs::hard_link(tmp, path) {
            Ok(()) => {
                if let Some(parent) = path.parent() {
                    self.mark_dirty(parent);
                }
                Ok(Created::New)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                self.touch(key)?;
                Ok(Created::Existed)
            }
            Err(e) => Err(io_err(key, "linking")(e)),
        }
    }

    fn mark_dirty(&self, dir: &Path) {
        self.dirty_dirs.lock().unwrap_or_else(|e| e.into_inner()).insert(dir.to_path_buf());
    }

    /// Creates the directories above `path` that are missing, each recorded (with its
    /// parent) as needing a sync.
    fn make_parents(&self, path: &Path) -> Result<()> {
        let Some(parent) = path.parent() else { return Ok(()) };
        if parent.is_dir() {
            return Ok(());
        }
        self.make_parents(parent)?;
        match fs::create_dir(parent) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(&parent.display().to_string(), "creating")(e)),
        }
        if let Some(grand) = parent.parent() {
            self.mark_dirty(grand);
        }
        Ok(())
    }

    /// Opens a new file with `open`, making its directory (`.tmp` or `.locks`) first
    /// when it is missing.
    fn open_in_own_dir(
        &self,
        path: &Path,
        open: impl Fn(&Path) -> io::Result<File>,
    ) -> io::Result<File> {
        match open(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if let Some(dir) = path.parent() {
                    match fs::create_dir(dir) {
                        Ok(()) => self.mark_dirty(&self.root),
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                        Err(e) => return Err(e),
                    }
                }
                open(path)
            }
            r => r,
        }
    }

    fn temporary(&self) -> PathBuf {
        // One counter per process: several backends of one directory in one process
        // must not pick the same name.
        static NEXT_TMP: AtomicU64 = AtomicU64::new(0);
        let n = NEXT_TMP.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        self.root.join(TMP_DIR).join(format!("{}-{nanos}-{n}", std::process::id()))
    }

    /// Removes temporaries last changed before `before` (left by a process that was
    /// killed between writing one and linking it); returns how many.
    fn remove_stale_temporaries(&self, before: SystemTime) -> Result<u64> {
        let dir = self.root.join(TMP_DIR);
        let text = dir.display().to_string();
        let mut removed = 0;
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io_err(&text, "listing")(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io_err(&text, "listing"))?;
            let Ok(meta) = entry.metadata() else { continue };
            if meta.modified().map(|m| m < before).unwrap_or(false)
                && fs::remove_file(entry.path()).is_ok()
            {
                removed += 1;
            }
        }
        Ok(removed)
    }

    fn walk(&self, dir: &Path, key: &str, out: &mut Vec<ObjectInfo>) -> Result<()> {
        let text = dir.display().to_string();
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err(&text, "listing")(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io_err(&text, "listing"))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let child = if key.is_empty() { name.to_owned() } else { format!("{key}/{name}") };
            if !valid_key(&child) {
                continue;
            }
            let meta = match entry.metadata() {
                Ok(m) => m,
                // Removed since the listing (a concurrent gc): not there.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&entry.path().display().to_string(), "stat")(e)),
            };
            if meta.is_dir() {
                self.walk(&entry.path(), &child, out)?;
            } else if meta.is_file() {
                out.push(ObjectInfo {
                    key: child,
                    size: meta.len(),
                    modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                });
            }
        }
        Ok(())
    }
}

/// An object of a [`LocalBatch`], written to its temporary; the temporary is removed
/// when this is dropped (published or not).
struct StagedFile {
    key: String,
    path: PathBuf,
    tmp: PathBuf,
    file: File,
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.tmp);
    }
}

/// The [`Batch`] of a [`LocalBackend`] (see the module's crash-safety argument).
struct LocalBatch<'b> {
    backend: &'b LocalBackend,
    staged: Mutex<(Vec<StagedFile>, u64)>,
}

/// Starts the writeback of `file`'s dirty pages without waiting for it: the later
/// fdatasync then finds them written or on their way.
fn start_writeback(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range only reads its integer arguments and acts on the open
    // descriptor `file` owns; it is a hint here, so its result is ignored.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

impl Batch for LocalBatch<'_> {
    fn add(&self, key: &str, data: &[u8]) -> Result<()> {
        let path = self.backend.path(key)?;
        let tmp = self.backend.temporary();
        let tmp_text = tmp.display().to_string();
        let file = self
            .backend
            .open_in_own_dir(&tmp, |p| OpenOptions::new().write(true).create_new(true).open(p))
            .map_err(io_err(&tmp_text, "creating"))?;
        // From here on, dropping `staged` removes the temporary.
        let staged = StagedFile { key: key.to_owned(), path, tmp, file };
        (&staged.file).write_all(data).map_err(io_err(&tmp_text, "writing"))?;
        start_writeback(&staged.file);
        let mut list = self.staged.lock().unwrap_or_else(|e| e.into_inner());
        list.0.push(staged);
        list.1 += data.len() as u64;
        Ok(())
    }

    fn pending(&self) -> (usize, u64) {
        let list = self.staged.lock().unwrap_or_else(|e| e.into_inner());
        (list.0.len(), list.1)
    }

    fn publish(&self) -> Result<Vec<(String, Created)>> {
        let (staged, _) =
            std::mem::take(&mut *self.staged.lock().unwrap_or_else(|e| e.into_inner()));
        // Every content durable before any name appears.
        for s in &staged {
            s.file.sync_data().map_err(io_err(&s.tmp.display().to_string(), "syncing"))?;
        }
        let mut out = Vec::with_capacity(staged.len());
        for s in staged {
            let created = self.backend.link_or_renew(&s.tmp, &s.key, &s.path)?;
            out.push((s.key.clone(), created));
        }
        Ok(out)
    }
}

impl Backend for LocalBackend {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn read(&self, key: &str, limit: u64) -> Result<Vec<u8>> {
        let (file, len) = self.open_object(key)?;
        if len > limit {
            return Err(corrupt(key, format!("{len} bytes, more than the {limit} it can have")));
        }
        let mut data = Vec::with_capacity(len as usize);
        file.take(limit + 1).read_to_end(&mut data).map_err(io_err(key, "reading"))?;
        if data.len() as u64 > limit {
            return Err(corrupt(key, format!("more than the {limit} bytes it can have")));
        }
        Ok(data)
    }

    fn read_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let (file, size) = self.open_object(key)?;
        let len = len.min(size.saturating_sub(offset));
        let mut data = vec![0u8; len as usize];
        file.read_exact_at(&mut data, offset).map_err(io_err(key, "reading"))?;
        Ok(data)
    }

    fn create(&self, key: &str, data: &[u8]) -> Result<Created> {
        let path = self.path(key)?;
        let tmp = self.temporary();
        let tmp_text = tmp.display().to_string();
        let result = (|| {
            let mut f = self
                .open_in_own_dir(&tmp, |p| OpenOptions::new().write(true).create_new(true).open(p))
                .map_err(io_err(&tmp_text, "creating"))?;
            f.write_all(data).map_err(io_err(&tmp_text, "writing"))?;
            f.sync_all().map_err(io_err(&tmp_text, "syncing"))?;
            drop(f);
            self.link_or_renew(&tmp, key, &path)
        })();
        let _ = fs::remove_file(&tmp);
        result
    }

    fn batch(&self) -> Box<dyn Batch + '_> {
        Box::new(LocalBatch { backend: self, staged: Mutex::new((Vec::new(), 0)) })
    }

    fn delete(&self, key: &str) -> Result<bool> {
        let path = self.path(key)?;
        match fs::remove_file(&path) {
            Ok(()) => {
                if let Some(parent) = path.parent() {
                    self.mark_dirty(parent);
                }
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err(key, "removing")(e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let mut out = Vec::new();
        if prefix.is_empty() {
            self.walk(&self.root, "", &mut out)?;
        } else {
            let dir = self.path(prefix)?;
            self.walk(&dir, prefix, &mut out)?;
        }
        Ok(out)
    }

    fn stat(&self, key: &str) -> Result<Option<ObjectInfo>> {
        let path = self.path(key)?;
        match fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(ObjectInfo {
                key: key.to_owned(),
                size: m.len(),
                modified: m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(key, "stat")(e)),
        }
    }

    fn touch(&self, key: &str) -> Result<bool> {
        let path = self.path(key)?;
        // One utimensat(2), no open: a backup renews every chunk it finds stored. The
        // kernel's clock sets the time, as it does a new file's (gc compares only such
        // times).
        let now = rustix::fs::Timestamps {
            last_access: rustix::fs::Timespec { tv_sec: 0, tv_nsec: rustix::fs::UTIME_OMIT },
            last_modification: rustix::fs::Timespec { tv_sec: 0, tv_nsec: rustix::fs::UTIME_NOW },
        };
        match rustix::fs::utimensat(rustix::fs::CWD, &path, &now, rustix::fs::AtFlags::empty()) {
            Ok(()) => {
                // Its name may be another process's, not yet synced: ours covers it.
                if let Some(parent) = path.parent() {
                    self.mark_dirty(parent);
                }
                Ok(true)
            }
            Err(rustix::io::Errno::NOENT) => Ok(false),
            Err(e) => Err(io_err(key, "touching")(e.into())),
        }
    }

    fn sync(&self) -> Result<()> {
        let dirs = std::mem::take(&mut *self.dirty_dirs.lock().unwrap_or_else(|e| e.into_inner()));
        // Deepest first: a new directory's own entries before its entry in its parent.
        for dir in dirs.iter().rev() {
            let text = dir.display().to_string();
            match File::open(dir) {
                Ok(f) => f.sync_all().map_err(io_err(&text, "syncing"))?,
                // Removed since (an emptied shard): nothing to make durable.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&text, "opening")(e)),
            }
        }
        Ok(())
    }

    fn remove_lock(&self, name: &str) -> Result<()> {
        let path = self.lock_path(name)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&path.display().to_string(), "removing the lock")(e)),
        }
    }

    fn remove_leftovers(&self, before: SystemTime) -> Result<u64> {
        self.remove_stale_temporaries(before)
    }

    fn lock(
        &self,
        name: &str,
        mode: LockMode,
        wait: LockWait,
    ) -> Result<Option<Box<dyn LockGuard>>> {
        let path = self.lock_path(name)?;
        let text = path.display().to_string();
        let file = self
            .open_in_own_dir(&path, |p| {
                OpenOptions::new().read(true).write(true).create(true).truncate(false).open(p)
            })
            .map_err(io_err(&text, "opening the lock"))?;
        let op = match (mode, wait) {
            (LockMode::Shared, LockWait::Block) => FlockOperation::LockShared,
            (LockMode::Exclusive, LockWait::Block) => FlockOperation::LockExclusive,
            (LockMode::Shared, LockWait::Fail) => FlockOperation::NonBlockingLockShared,
            (LockMode::Exclusive, LockWait::Fail) => FlockOperation::NonBlockingLockExclusive,
        };
        loop {
            match flock(&file, op) {
                Ok(()) => return Ok(Some(Box::new(FileLock { _file: file }))),
                Err(rustix::io::Errno::WOULDBLOCK) => return Ok(None),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(io_err(&text, "locking")(e.into())),
            }
        }
    }
}
