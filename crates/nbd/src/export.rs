//! What the server serves: the [`Export`] trait, the [`Exports`] registry and an
//! in-memory export ([`MemoryExport`]).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

pub use crate::codec::{BlockSize, Extent};
use crate::proto;

/// A boxed future, as returned by [`Export`] methods.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An error of an export operation, sent to the client as an NBD error value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// An I/O error (`NBD_EIO`, or the matching NBD value for well-known kinds).
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The operation is not supported (`NBD_ENOTSUP`).
    #[error("operation not supported")]
    NotSupported,
    /// Invalid argument (`NBD_EINVAL`).
    #[error("invalid argument")]
    Invalid,
    /// No space left (`NBD_ENOSPC`).
    #[error("no space left")]
    NoSpace,
    /// Not permitted (`NBD_EPERM`).
    #[error("operation not permitted")]
    NotPermitted,
}

impl ExportError {
    /// The NBD error value sent for this error.
    pub fn nbd_errno(&self) -> u32 {
        match self {
            ExportError::Io(e) if e.raw_os_error().is_some() => {
                host_errno_to_nbd(e.raw_os_error().unwrap_or_default())
            }
            ExportError::Io(e) => match e.kind() {
                std::io::ErrorKind::PermissionDenied => proto::EPERM,
                std::io::ErrorKind::InvalidInput => proto::EINVAL,
                std::io::ErrorKind::Unsupported => proto::ENOTSUP,
                std::io::ErrorKind::StorageFull => proto::ENOSPC,
                std::io::ErrorKind::OutOfMemory => proto::ENOMEM,
                _ => proto::EIO,
            },
            ExportError::NotSupported => proto::ENOTSUP,
            ExportError::Invalid => proto::EINVAL,
            ExportError::NoSpace => proto::ENOSPC,
            ExportError::NotPermitted => proto::EPERM,
        }
    }
}

/// The NBD error value for a host errno (Linux numbering), as QEMU's server maps it:
/// the errnos NBD has pass through, EROFS becomes EPERM, EDQUOT and EFBIG become
/// ENOSPC, and anything else is EINVAL.
fn host_errno_to_nbd(errno: i32) -> u32 {
    const EROFS: i32 = 30;
    const EFBIG: i32 = 27;
    const EDQUOT: i32 = 122;
    match errno {
        1 | EROFS => proto::EPERM,
        5 => proto::EIO,
        12 => proto::ENOMEM,
        28 | EFBIG | EDQUOT => proto::ENOSPC,
        75 => proto::EOVERFLOW,
        95 => proto::ENOTSUP,
        108 => proto::ESHUTDOWN,
        _ => proto::EINVAL,
    }
}

/// Result of an export operation.
pub type ExportResult<T> = Result<T, ExportError>;

/// Flags of a write-zeroes request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The export may deallocate (no `NBD_CMD_FLAG_NO_HOLE`).
    pub may_trim: bool,
    /// Fail with [`ExportError::NotSupported`] unless zeroing is fast.
    pub fast: bool,
    /// Force unit access.
    pub fua: bool,
}

/// An export the server serves. Bounds, read-only and flag checks are done by the
/// server before any method is called; `len` is never 0 and `offset + len <= size()`.
///
/// The `can_*` methods decide which transmission flags are advertised; the server
/// rejects commands whose flag is not advertised.
pub trait Export: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Whether writes are refused.
    fn read_only(&self) -> bool {
        false
    }
    /// Human-readable description (for `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`).
    fn description(&self) -> String {
        String::new()
    }
    /// Block size constraints advertised with `NBD_INFO_BLOCK_SIZE`.
    fn block_size(&self) -> BlockSize {
        BlockSize { minimum: 1, preferred: 4096, maximum: proto::MAX_PAYLOAD }
    }
    /// Whether `flush` is meaningful (`NBD_FLAG_SEND_FLUSH`, `NBD_FLAG_SEND_FUA`).
    fn can_flush(&self) -> bool {
        true
    }
    /// Whether `trim` is supported.
    fn can_trim(&self) -> bool {
        false
    }
    /// Whether `write_zeroes` is supported.
    fn can_write_zeroes(&self) -> bool {
        false
    }
    /// Whether `write_zeroes` honours [`ZeroFlags::fast`].
    fn can_fast_zero(&self) -> bool {
        false
    }
    /// Whether `cache` is supported.
    fn can_cache(&self) -> bool {
        false
    }
    /// Whether several connections see each other's flushed writes
    /// (`NBD_FLAG_CAN_MULTI_CONN`).
    fn can_multi_conn(&self) -> bool {
        false
    }
    /// Fills `buf` with the data at `offset`.
    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> BoxFuture<'a, ExportResult<()>>;
    /// Writes `data` at `offset`.
    fn write<'a>(
        &'a self,
        offset: u64,
        data: &'a [u8],
        fua: bool,
    ) -> BoxFuture<'a, ExportResult<()>>;
    /// Zeroes `len` bytes at `offset`.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> BoxFuture<'_, ExportResult<()>> {
        let _ = (offset, len, flags);
        Box::pin(async { Err(ExportError::NotSupported) })
    }
    /// Discards `len` bytes at `offset`.
    fn trim(&self, offset: u64, len: u64, fua: bool) -> BoxFuture<'_, ExportResult<()>> {
        let _ = (offset, len, fua);
        Box::pin(async { Err(ExportError::NotSupported) })
    }
    /// Flushes written data to stable storage.
    fn flush(&self) -> BoxFuture<'_, ExportResult<()>> {
        Box::pin(async { Ok(()) })
    }
    /// Prefetches `len` bytes at `offset`.
    fn cache(&self, offset: u64, len: u64) -> BoxFuture<'_, ExportResult<()>> {
        let _ = (offset, len);
        Box::pin(async { Ok(()) })
    }
    /// Metadata contexts besides `base:allocation`, e.g. `qemu:dirty-bitmap:NAME` or
    /// `qemu:allocation-depth`.
    fn meta_contexts(&self) -> Vec<String> {
        Vec::new()
    }
    /// Extents of `context` (`base:allocation` or one of [`Export::meta_contexts`])
    /// starting at `offset`, covering at most `len` bytes (the server clips and merges;
    /// fewer is allowed). With `req_one` only the first extent is used. An empty result
    /// is answered as one extent of flags 0. The default reports everything as data.
    fn block_status<'a>(
        &'a self,
        context: &'a str,
        offset: u64,
        len: u64,
        req_one: bool,
    ) -> BoxFuture<'a, ExportResult<Vec<Extent>>> {
        let _ = (context, offset, req_one);
        Box::pin(async move { Ok(vec![Extent { length: len, flags: 0 }]) })
    }
}

/// The exports of a server, by name. The empty name selects the default export.
/// Exports may be added and removed while the server runs; connections already in
/// transmission keep theirs.
#[derive(Default)]
pub struct Exports {
    map: RwLock<BTreeMap<String, Arc<dyn Export>>>,
    default: RwLock<Option<String>>,
}

impl std::fmt::Debug for Exports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exports").field("names", &self.names()).finish()
    }
}

impl Exports {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the export `name`. The first export added becomes the default.
    pub fn insert(&self, name: impl Into<String>, export: Arc<dyn Export>) {
        let name = name.into();
        let mut default = self.default.write().unwrap_or_else(PoisonError::into_inner);
        if default.is_none() {
            *default = Some(name.clone());
        }
        self.map.write().unwrap_or_else(PoisonError::into_inner).insert(name, export);
    }

    /// Removes the export `name`; whether it existed.
    pub fn remove(&self, name: &str) -> bool {
        self.map.write().unwrap_or_else(PoisonError::into_inner).remove(name).is_some()
    }

    /// Makes `name` the export that the empty name selects (`None`: no default).
    pub fn set_default(&self, name: Option<String>) {
        *self.default.write().unwrap_or_else(PoisonError::into_inner) = name;
    }

    /// The export `name` (the default one for `""`) and its canonical name.
    pub fn get(&self, name: &str) -> Option<(String, Arc<dyn Export>)> {
        let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = map.get(name) {
            return Some((name.to_owned(), e.clone()));
        }
        if name.is_empty() {
            let default = self.default.read().unwrap_or_else(PoisonError::into_inner);
            let d = default.as_ref()?;
            return map.get(d).map(|e| (d.clone(), e.clone()));
        }
        None
    }

    /// All export names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.map.read().unwrap_or_else(PoisonError::into_inner).keys().cloned().collect()
    }
}

/// An export held in memory, with a toy dirty bitmap: every write, zeroing or trim marks
/// the 64 KiB blocks it touches dirty in the context `qemu:dirty-bitmap:NAME`.
/// `base:allocation` reports blocks that were never written or were trimmed as holes.
#[derive(Debug)]
pub struct MemoryExport {
    inner: Mutex<MemInner>,
    bitmap_context: Option<String>,
    read_only: bool,
    description: String,
}

#[derive(Debug)]
struct MemInner {
    data: Vec<u8>,
    dirty: Vec<bool>,
    allocated: Vec<bool>,
}

/// The granularity of [`MemoryExport`]'s dirty bitmap and allocation map.
pub const MEMORY_BLOCK: u64 = 64 * 1024;

impl MemoryExport {
    /// A zeroed export of `size` bytes; `bitmap` names its dirty-bitmap context
    /// (`qemu:dirty-bitmap:BITMAP`).
    pub fn new(size: usize, bitmap: Option<&str>) -> Self {
        let blocks = (size as u64).div_ceil(MEMORY_BLOCK) as usize;
        MemoryExport {
            inner: Mutex::new(MemInner {
                data: vec![0; size],
                dirty: vec![false; blocks],
                allocated: vec![false; blocks],
            }),
            bitmap_context: bitmap.map(|b| format!("qemu:dirty-bitmap:{b}")),
            read_only: false,
            description: String::new(),
        }
    }

    /// Makes the export read-only.
    pub fn with_read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Sets the description.
    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    /// A copy of the contents.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().data.clone()
    }

    /// Indexes of the dirty 64 KiB blocks.
    pub fn dirty_blocks(&self) -> Vec<u64> {
        let g = self.lock();
        (0..g.dirty.len() as u64).filter(|&i| g.dirty[i as usize]).collect()
    }

    /// Clears the dirty bitmap.
    pub fn clear_dirty(&self) {
        self.lock().dirty.iter_mut().for_each(|d| *d = false);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn range(&self, offset: u64, len: u64) -> ExportResult<std::ops::Range<usize>> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(offset as usize..end as usize),
            _ => Err(ExportError::Invalid),
        }
    }

    fn modify(
        &self,
        offset: u64,
        len: u64,
        allocate: bool,
        f: impl FnOnce(&mut [u8]),
    ) -> ExportResult<()> {
        let r = self.range(offset, len)?;
        let size = self.size();
        let mut g = self.lock();
        f(&mut g.data[r.clone()]);
        if len > 0 {
            let first = (offset / MEMORY_BLOCK) as usize;
            let last = ((offset + len - 1) / MEMORY_BLOCK) as usize;
            for i in first..=last {
                g.dirty[i] = true;
                if allocate {
                    g.allocated[i] = true;
                }
            }
            if !allocate {
                // Only whole blocks become holes.
                for i in first..=last {
                    let start = i as u64 * MEMORY_BLOCK;
                    let end = (start + MEMORY_BLOCK).min(size);
                    if start >= offset && end <= offset + len {
                        g.allocated[i] = false;
                    }
                }
            }
        }
        Ok(())
    }
}

impl Export for MemoryExport {
    fn size(&self) -> u64 {
        self.lock().data.len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn description(&self) -> String {
        self.description.clone()
    }
    fn can_trim(&self) -> bool {
        true
    }
    fn can_write_zeroes(&self) -> bool {
        true
    }
    fn can_fast_zero(&self) -> bool {
        true
    }
    fn can_cache(&self) -> bool {
        true
    }
    fn can_multi_conn(&self) -> bool {
        true
    }
    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> BoxFuture<'a, ExportResult<()>> {
        Box::pin(async move {
            let r = self.range(offset, buf.len() as u64)?;
            buf.copy_from_slice(&self.lock().data[r]);
            Ok(())
        })
    }
    fn write<'a>(
        &'a self,
        offset: u64,
        data: &'a [u8],
        _fua: bool,
    ) -> BoxFuture<'a, ExportResult<()>> {
        Box::pin(async move {
            self.modify(offset, data.len() as u64, true, |d| d.copy_from_slice(data))
        })
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> BoxFuture<'_, ExportResult<()>> {
        Box::pin(async move { self.modify(offset, len, !flags.may_trim, |d| d.fill(0)) })
    }
    fn trim(&self, offset: u64, len: u64, _fua: bool) -> BoxFuture<'_, ExportResult<()>> {
        Box::pin(async move { self.modify(offset, len, false, |d| d.fill(0)) })
    }
    fn meta_contexts(&self) -> Vec<String> {
        self.bitmap_context.iter().cloned().collect()
    }
    fn block_status<'a>(
        &'a self,
        context: &'a str,
        offset: u64,
        len: u64,
        _req_one: bool,
    ) -> BoxFuture<'a, ExportResult<Vec<Extent>>> {
        Box::pin(async move {
            let r = self.range(offset, len)?;
            let g = self.lock();
            let (map, set_flags, clear_flags): (&[bool], u64, u64) =
                if context == proto::CONTEXT_BASE_ALLOCATION {
                    (&g.allocated, 0, u64::from(proto::STATE_HOLE | proto::STATE_ZERO))
                } else if Some(context) == self.bitmap_context.as_deref() {
                    (&g.dirty, u64::from(proto::STATE_DIRTY), 0)
                } else {
                    return Err(ExportError::Invalid);
                };
            let mut out: Vec<Extent> = Vec::new();
            let mut pos = r.start as u64;
            while pos < r.end as u64 {
                let block = pos / MEMORY_BLOCK;
                let end = ((block + 1) * MEMORY_BLOCK).min(r.end as u64);
                let flags = if map[block as usize] { set_flags } else { clear_flags };
                match out.last_mut() {
                    Some(last) if last.flags == flags => last.length += end - pos,
                    _ => out.push(Extent { length: end - pos, flags }),
                }
                pos = end;
            }
            Ok(out)
        })
    }
}

#[cfg(test)]
mod errno_tests {
    use super::*;

    #[test]
    fn host_errnos_map_as_qemu_maps_them() {
        let nbd =
            |errno: i32| ExportError::Io(std::io::Error::from_raw_os_error(errno)).nbd_errno();
        // EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN pass through.
        for errno in [1, 5, 12, 22, 28, 75, 95, 108] {
            assert_eq!(nbd(errno), errno as u32, "{errno}");
        }
        assert_eq!(nbd(30), proto::EPERM, "EROFS");
        assert_eq!(nbd(27), proto::ENOSPC, "EFBIG");
        assert_eq!(nbd(122), proto::ENOSPC, "EDQUOT");
        assert_eq!(nbd(13), proto::EINVAL, "EACCES");
        assert_eq!(nbd(2), proto::EINVAL, "ENOENT");
        let kind = |k| ExportError::Io(std::io::Error::from(k)).nbd_errno();
        assert_eq!(kind(std::io::ErrorKind::Other), proto::EIO);
        assert_eq!(kind(std::io::ErrorKind::PermissionDenied), proto::EPERM);
    }
}
