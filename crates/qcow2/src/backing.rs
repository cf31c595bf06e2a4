//! Backing images: the trait a backing file implements, a raw image, and opening a
//! backing chain from files.

use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Qcow2Error, Result};
use crate::image::{OpenOptions, Qcow2Image, read_header};
use crate::storage::{FileStorage, Storage};

/// Deepest backing chain [`open_file_chain`] opens (images below the top one).
pub const MAX_CHAIN_DEPTH: u32 = 64;

/// How a guest range reads, as [`BackingImage::block_status`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockState {
    /// Data stored in some layer.
    Data,
    /// Zeroes recorded as such in some layer (a zero cluster, or a hole of a raw file).
    Zero,
    /// No layer has the range: it reads as zeroes.
    Unallocated,
}

/// The status of a run of guest bytes that all read the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    /// How the run reads.
    pub state: BlockState,
    /// Whether the run is allocated in the image asked (not in a backing image).
    pub allocated: bool,
    /// The layer that determined the status: 0 for the image asked, 1 for its backing
    /// image, …; for [`BlockState::Unallocated`], the layer whose backing image ends
    /// before the run, or that has none (as `qemu-img map` counts).
    pub depth: u32,
    /// Offset of the run's first byte in the file of the layer at `depth`, when it has
    /// one (data clusters, preallocated zero clusters, raw files).
    pub offset: Option<u64>,
    /// Whether the run is a compressed cluster.
    pub compressed: bool,
    /// Length of the run in bytes (at least 1, at most the length asked).
    pub len: u64,
}

/// A readable disk image, used as a backing file: a qcow2 image, a raw image, or
/// anything the caller provides.
pub trait BackingImage: Send + Sync + fmt::Debug {
    /// Reads `buf.len()` bytes at guest `offset`; the range lies within [`len`].
    ///
    /// [`len`]: BackingImage::len
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// The virtual size in bytes.
    fn len(&self) -> u64;

    /// Whether the virtual size is zero.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The status of the run starting at `offset` (within [`len`]), of at most `len`
    /// bytes. The default says "data, allocated here, at the same offset".
    ///
    /// [`len`]: BackingImage::len
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        Ok(BlockStatus {
            state: BlockState::Data,
            allocated: true,
            depth: 0,
            offset: Some(offset),
            compressed: false,
            len: len.min(self.len().saturating_sub(offset)).max(1),
        })
    }
}

/// A raw image over storage; with a file, holes read as [`BlockState::Zero`] in
/// [`block_status`](BackingImage::block_status) (`SEEK_DATA` / `SEEK_HOLE`).
pub struct RawImage {
    storage: Arc<dyn Storage>,
    file: Option<File>,
    len: u64,
}

impl fmt::Debug for RawImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawImage").field("len", &self.len).finish_non_exhaustive()
    }
}

impl RawImage {
    /// A raw image over `storage`; its length is taken now.
    pub fn new(storage: Arc<dyn Storage>) -> Result<RawImage> {
        let len = storage.len().map_err(Qcow2Error::io("getting the length of a raw image", 0))?;
        Ok(RawImage { storage, file: None, len })
    }

    /// Opens the file at `path` read-only as a raw image.
    pub fn open(path: &Path) -> Result<RawImage> {
        let storage =
            FileStorage::open(path, false).map_err(Qcow2Error::io("opening a raw image", 0))?;
        let file = File::open(path).map_err(Qcow2Error::io("opening a raw image", 0))?;
        let mut raw = RawImage::new(Arc::new(storage))?;
        raw.file = Some(file);
        Ok(raw)
    }
}

impl BackingImage for RawImage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.storage.read_at(buf, offset).map_err(Qcow2Error::io("reading a raw image", offset))
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let end = offset.saturating_add(len).min(self.len);
        let mut status = BlockStatus {
            state: BlockState::Data,
            allocated: true,
            depth: 0,
            offset: Some(offset),
            compressed: false,
            len: end.saturating_sub(offset).max(1),
        };
        let Some(file) = &self.file else {
            return Ok(status);
        };
        use rustix::fs::{SeekFrom, seek};
        match seek(file, SeekFrom::Data(offset)) {
            Ok(data) if data <= offset => {
                if let Ok(hole) = seek(file, SeekFrom::Hole(offset)) {
                    status.len = hole.min(end).saturating_sub(offset).max(1);
                }
            }
            Ok(data) => {
                status.state = BlockState::Zero;
                status.len = data.min(end) - offset;
            }
            // ENXIO: no data after `offset`.
            Err(rustix::io::Errno::NXIO) => status.state = BlockState::Zero,
            Err(_) => {}
        }
        Ok(status)
    }
}

/// Opens the image file at `path` in `format` ("qcow2" or "raw"; probed from the magic
/// when `None`), with its whole backing chain, read-only unless `writable` (the backing
/// images are always read-only).
///
/// Backing file names are resolved relative to the directory of the image naming them,
/// and opened with the format their image records (probed when absent). Loops and
/// chains deeper than [`MAX_CHAIN_DEPTH`] are refused.
pub fn open_file_chain(
    path: &Path,
    format: Option<&str>,
    writable: bool,
) -> Result<Arc<dyn BackingImage>> {
    let mut seen = HashSet::new();
    open_layer(path, format, writable, 0, &mut seen)
}

fn backing_error(path: &Path, reason: String, source: Option<Qcow2Error>) -> Qcow2Error {
    Qcow2Error::Backing { path: path.display().to_string(), reason, source: source.map(Box::new) }
}

pub(crate) fn open_layer(
    path: &Path,
    format: Option<&str>,
    writable: bool,
    depth: u32,
    seen: &mut HashSet<PathBuf>,
) -> Result<Arc<dyn BackingImage>> {
    if depth > MAX_CHAIN_DEPTH {
        return Err(backing_error(
            path,
            format!("the backing chain is deeper than {MAX_CHAIN_DEPTH} images"),
            None,
        ));
    }
    let canonical = path.canonicalize().map_err(|e| backing_error(path, e.to_string(), None))?;
    if !seen.insert(canonical) {
        return Err(backing_error(path, "the backing chain loops".to_owned(), None));
    }
    let format = match format {
        Some(f) => f.to_owned(),
        None => probe(path)?,
    };
    match format.as_str() {
        "raw" => Ok(Arc::new(RawImage::open(path)?)),
        "qcow2" => Ok(Arc::new(open_qcow2_layer(path, writable, depth, seen)?)),
        other => Err(backing_error(path, format!("unsupported image format {other:?}"), None)),
    }
}

/// Opens the qcow2 image at `path` with its backing chain below it.
pub(crate) fn open_qcow2_layer(
    path: &Path,
    writable: bool,
    depth: u32,
    seen: &mut HashSet<PathBuf>,
) -> Result<Qcow2Image> {
    let storage =
        FileStorage::open(path, writable).map_err(|e| backing_error(path, e.to_string(), None))?;
    let storage: Arc<dyn Storage> = Arc::new(storage);
    let file_len = storage.len().map_err(Qcow2Error::io("getting the file length", 0))?;
    let header = read_header(&*storage, file_len)?;
    let Some(name) = header.backing_file.clone() else {
        return Qcow2Image::open(storage, OpenOptions { writable, ..OpenOptions::default() });
    };
    let name = Path::new(std::ffi::OsStr::from_bytes(&name));
    let backing_path = if name.is_absolute() {
        name.to_path_buf()
    } else {
        path.parent().unwrap_or(Path::new(".")).join(name)
    };
    let backing = open_layer(&backing_path, header.backing_format(), false, depth + 1, seen)
        .map_err(|e| match e {
            e @ Qcow2Error::Backing { .. } => e,
            e => backing_error(&backing_path, "cannot open it".to_owned(), Some(e)),
        })?;
    Qcow2Image::open(
        storage,
        OpenOptions { writable, backing: Some(backing), ..Default::default() },
    )
}

fn probe(path: &Path) -> Result<String> {
    let storage =
        FileStorage::open(path, false).map_err(|e| backing_error(path, e.to_string(), None))?;
    let mut magic = [0u8; 4];
    storage.read_at(&mut magic, 0).map_err(Qcow2Error::io("probing the image format", 0))?;
    Ok(if u32::from_be_bytes(magic) == crate::header::MAGIC { "qcow2" } else { "raw" }.to_owned())
}
