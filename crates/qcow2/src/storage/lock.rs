//! Image locking that interoperates with QEMU's `file` driver.
//!
//! QEMU (with `locking=auto` or `on`, its default on Linux) takes Linux *open file
//! description* (OFD) locks on single bytes of the image file; the locks are always
//! shared (read) locks, so holders never block each other, and the byte a lock sits on
//! says what it means:
//!
//! | byte | meaning of a lock on it |
//! | --- | --- |
//! | `100 + bit` | the holder has permission `bit` |
//! | `200 + bit` | the holder does not let others have permission `bit` |
//!
//! with the permission bits of [`Permission`]: consistent read = 0, write = 1, write
//! unchanged = 2, resize = 3. Before taking a permission, an opener checks that no one
//! else holds the matching "unshared" byte; before refusing to share one, it checks that
//! no one else holds the matching permission byte. Both sides lock first and check
//! second, so of two processes opening the same image at once, at most one wins.
//!
//! Locks belong to the open file description: they go away when the file is closed
//! (when the [`FileStorage`](super::FileStorage) is dropped), and two opens in one
//! process conflict like two processes do.

use std::fmt;
use std::fs::File;
use std::io;
use std::ops::{BitOr, BitOrAssign};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Offset of the byte locked by a holder of a permission: `PERM_LOCK_BASE + bit`.
pub const PERM_LOCK_BASE: u64 = 100;
/// Offset of the byte locked by one who does not share a permission:
/// `SHARED_LOCK_BASE + bit`.
pub const SHARED_LOCK_BASE: u64 = 200;

/// One of the permissions that QEMU's image locking knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Permission {
    /// Reading and getting what was written (`consistent-read`, bit 0).
    ConsistentRead = 0,
    /// Changing the visible contents (`write`, bit 1).
    Write = 1,
    /// Writing without changing the visible contents (`write-unchanged`, bit 2).
    WriteUnchanged = 2,
    /// Changing the size (`resize`, bit 3).
    Resize = 3,
}

impl Permission {
    /// All permissions, by bit.
    pub const ALL: [Permission; 4] = [
        Permission::ConsistentRead,
        Permission::Write,
        Permission::WriteUnchanged,
        Permission::Resize,
    ];

    /// The bit number.
    pub const fn bit(self) -> u8 {
        self as u8
    }

    /// The name QEMU's lock errors use: `consistent read`, `write`, `write unchanged`,
    /// `resize`.
    pub const fn name(self) -> &'static str {
        match self {
            Permission::ConsistentRead => "consistent read",
            Permission::Write => "write",
            Permission::WriteUnchanged => "write unchanged",
            Permission::Resize => "resize",
        }
    }

    /// The byte locked by holders of this permission.
    pub const fn perm_byte(self) -> u64 {
        PERM_LOCK_BASE + self as u64
    }

    /// The byte locked by those who do not share this permission.
    pub const fn unshare_byte(self) -> u64 {
        SHARED_LOCK_BASE + self as u64
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of [`Permission`]s.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Permissions(u8);

impl Permissions {
    /// No permission.
    pub const NONE: Permissions = Permissions(0);
    /// Consistent read.
    pub const CONSISTENT_READ: Permissions = Permissions(1 << Permission::ConsistentRead as u8);
    /// Write.
    pub const WRITE: Permissions = Permissions(1 << Permission::Write as u8);
    /// Write unchanged.
    pub const WRITE_UNCHANGED: Permissions = Permissions(1 << Permission::WriteUnchanged as u8);
    /// Resize.
    pub const RESIZE: Permissions = Permissions(1 << Permission::Resize as u8);
    /// Every permission.
    pub const ALL: Permissions = Permissions(0b1111);

    /// Whether every permission of `other` is in `self`.
    pub const fn contains(self, other: Permissions) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether `permission` is in `self`.
    pub const fn has(self, permission: Permission) -> bool {
        self.0 & (1 << permission as u8) != 0
    }

    /// The permissions in `self` or `other`.
    pub const fn union(self, other: Permissions) -> Permissions {
        Permissions(self.0 | other.0)
    }

    /// The permissions in `self` but not in `other`.
    pub const fn difference(self, other: Permissions) -> Permissions {
        Permissions(self.0 & !other.0)
    }

    /// The permissions not in `self`.
    pub const fn complement(self) -> Permissions {
        Permissions(!self.0 & Permissions::ALL.0)
    }

    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The permissions in the set, by bit.
    pub fn iter(self) -> impl Iterator<Item = Permission> {
        Permission::ALL.into_iter().filter(move |&p| self.has(p))
    }
}

impl From<Permission> for Permissions {
    fn from(permission: Permission) -> Self {
        Permissions(1 << permission as u8)
    }
}

impl BitOr for Permissions {
    type Output = Permissions;

    fn bitor(self, other: Permissions) -> Permissions {
        self.union(other)
    }
}

impl BitOrAssign for Permissions {
    fn bitor_assign(&mut self, other: Permissions) {
        *self = self.union(other);
    }
}

impl fmt::Debug for Permissions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter().map(Permission::name)).finish()
    }
}

/// How a [`FileStorage`](super::FileStorage) locks its file, compatibly with QEMU.
///
/// QEMU's `file` driver takes Linux *open file description* (OFD) locks, always shared
/// (read) locks, on single bytes of the image: byte [`PERM_LOCK_BASE`]` + bit` (100 +
/// bit) while it holds [`Permission`] `bit`, and byte [`SHARED_LOCK_BASE`]` + bit`
/// (200 + bit) while it refuses to share it (consistent read = 0, write = 1, write
/// unchanged = 2, resize = 3). Before holding a permission an opener checks that no
/// other open file description locks its "unshared" byte, and before refusing to share
/// one that none locks its permission byte; both sides lock first and check second, so
/// of two racing openers at most one wins. A conflict is an error of kind
/// [`io::ErrorKind::ResourceBusy`] carrying a [`LockConflict`]. The locks go away when
/// the file is closed; two opens in one process conflict like two processes do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Locking {
    /// As QEMU locks the file under a qcow2 node: read-only, hold consistent read;
    /// writable, hold consistent read, write and resize. Either way, share neither
    /// write nor resize. So a writable open excludes every other opener except those
    /// that force sharing (`qemu-img -U`, [`Locking::ForceShare`]), and read-only
    /// opens coexist with each other but not with a writer.
    #[default]
    Auto,
    /// Share everything, like QEMU's `force-share=on` (`qemu-img -U`, `qemu-io -U`):
    /// hold consistent read (and write and resize if writable), refuse nobody. Only
    /// fails if someone else refuses to share what is held.
    ForceShare,
    /// Take no locks and check none (QEMU's `locking=off`).
    Off,
    /// Hold exactly `perm` and share exactly `shared`. A read-only open may not hold
    /// write, write unchanged or resize.
    Explicit {
        /// The permissions held.
        perm: Permissions,
        /// The permissions others may hold.
        shared: Permissions,
    },
}

impl Locking {
    /// The permissions held and shared by an open (`writable` or not) with this
    /// locking mode; `None` for [`Locking::Off`].
    pub fn resolve(self, writable: bool) -> Option<(Permissions, Permissions)> {
        let held = if writable {
            Permissions::CONSISTENT_READ | Permissions::WRITE | Permissions::RESIZE
        } else {
            Permissions::CONSISTENT_READ
        };
        match self {
            Locking::Auto => {
                Some((held, Permissions::ALL.difference(Permissions::WRITE | Permissions::RESIZE)))
            }
            Locking::ForceShare => Some((held, Permissions::ALL)),
            Locking::Off => None,
            Locking::Explicit { perm, shared } => Some((perm, shared)),
        }
    }
}

/// Which side of a lock conflict this open was on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConflictKind {
    /// This open wanted the permission, and another process does not share it.
    Permission,
    /// This open wanted to refuse the permission to others, and another process holds
    /// it.
    Unshare,
}

/// The image is in use: another open of the file (any process, or another open in this
/// one) holds locks that conflict with the requested ones.
///
/// Returned inside an [`io::Error`] of kind [`io::ErrorKind::ResourceBusy`]; get it
/// back with [`LockConflict::from_io`]. Its message follows QEMU's (`Failed to get
/// shared "write" lock`) and names the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "failed to get {shared}\"{permission}\" lock: is another process using the image [{path}]?",
    shared = if *.kind == ConflictKind::Unshare { "shared " } else { "" },
    path = .path.display()
)]
pub struct LockConflict {
    /// The file.
    pub path: PathBuf,
    /// The permission in conflict.
    pub permission: Permission,
    /// Whether this open wanted the permission or wanted to deny it.
    pub kind: ConflictKind,
}

impl LockConflict {
    /// The lock conflict inside `error`, if that is what it is.
    pub fn from_io(error: &io::Error) -> Option<&LockConflict> {
        error.get_ref()?.downcast_ref::<LockConflict>()
    }

    fn into_io(self) -> io::Error {
        io::Error::new(io::ErrorKind::ResourceBusy, self)
    }
}

/// The bytes locked by a holder of `perm` that shares `shared`.
fn lock_bytes(perm: Permissions, shared: Permissions) -> impl Iterator<Item = u64> {
    perm.iter()
        .map(Permission::perm_byte)
        .chain(shared.complement().iter().map(Permission::unshare_byte))
}

fn flock(typ: libc::c_int, byte: u64) -> io::Result<libc::flock> {
    // SAFETY: `flock` is a plain C struct of integers, for which all zeroes is a valid
    // value.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = typ as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start =
        libc::off_t::try_from(byte).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    lock.l_len = 1;
    // OFD lock requests must have l_pid == 0; zeroed() did that.
    Ok(lock)
}

/// `fcntl(fd, cmd, &mut lock)` for the OFD lock commands.
fn fcntl_lock(file: &File, cmd: libc::c_int, lock: &mut libc::flock) -> io::Result<()> {
    loop {
        // SAFETY: `file` keeps the descriptor open for the call, and `lock` is a valid,
        // exclusively borrowed `struct flock`, which is what F_OFD_SETLK and
        // F_OFD_GETLK read (and, for F_OFD_GETLK, write).
        let ret = unsafe { libc::fcntl(file.as_raw_fd(), cmd, std::ptr::from_mut(lock)) };
        if ret != -1 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// Takes (`lock`) or drops a shared OFD lock on `byte`.
fn set_byte(file: &File, byte: u64, lock: bool) -> io::Result<()> {
    let typ = if lock { libc::F_RDLCK } else { libc::F_UNLCK };
    fcntl_lock(file, libc::F_OFD_SETLK, &mut flock(typ, byte)?)
}

/// Whether another open file description holds a lock on `byte`.
fn byte_taken(file: &File, byte: u64) -> io::Result<bool> {
    let mut lock = flock(libc::F_WRLCK, byte)?;
    fcntl_lock(file, libc::F_OFD_GETLK, &mut lock)?;
    Ok(lock.l_type != libc::F_UNLCK as libc::c_short)
}

fn lock_error(path: &Path, error: io::Error) -> io::Error {
    let hint = if error.raw_os_error() == Some(libc::EINVAL) {
        " (open file description locks are not supported here; use Locking::Off)"
    } else {
        ""
    };
    io::Error::new(error.kind(), format!("cannot lock {}: {error}{hint}", path.display()))
}

/// Checks that `perm`/`shared` agree with the locks others hold on `file`.
fn check(file: &File, path: &Path, perm: Permissions, shared: Permissions) -> io::Result<()> {
    for permission in perm.iter() {
        if byte_taken(file, permission.unshare_byte()).map_err(|e| lock_error(path, e))? {
            let kind = ConflictKind::Permission;
            return Err(LockConflict { path: path.to_path_buf(), permission, kind }.into_io());
        }
    }
    for permission in shared.complement().iter() {
        if byte_taken(file, permission.perm_byte()).map_err(|e| lock_error(path, e))? {
            let kind = ConflictKind::Unshare;
            return Err(LockConflict { path: path.to_path_buf(), permission, kind }.into_io());
        }
    }
    Ok(())
}

/// Moves the locks of `file` from `old` (held and shared; `None`: no locks) to `new`:
/// takes the new bytes, checks for conflicts, then drops the bytes no longer needed. On
/// error the locks are as they were.
pub(super) fn change(
    file: &File,
    path: &Path,
    old: Option<(Permissions, Permissions)>,
    new: Option<(Permissions, Permissions)>,
) -> io::Result<()> {
    let (old_perm, old_shared) = old.unwrap_or((Permissions::NONE, Permissions::ALL));
    let (new_perm, new_shared) = new.unwrap_or((Permissions::NONE, Permissions::ALL));
    let old_bytes: Vec<u64> = lock_bytes(old_perm, old_shared).collect();
    let new_bytes: Vec<u64> = lock_bytes(new_perm, new_shared).collect();
    let restore = |taken: &[u64]| {
        for &byte in taken {
            // Best effort: the byte was not held before, and a failing unlock leaves
            // at worst a stale lock until the file is closed.
            let _ = set_byte(file, byte, false);
        }
    };
    let mut taken = Vec::new();
    for &byte in &new_bytes {
        if old_bytes.contains(&byte) {
            continue;
        }
        if let Err(e) = set_byte(file, byte, true) {
            restore(&taken);
            return Err(lock_error(path, e));
        }
        taken.push(byte);
    }
    if let Err(e) = check(file, path, new_perm, new_shared) {
        restore(&taken);
        return Err(e);
    }
    for &byte in &old_bytes {
        if !new_bytes.contains(&byte) {
            set_byte(file, byte, false).map_err(|e| lock_error(path, e))?;
        }
    }
    Ok(())
}
