//! The `qcow2` format driver: a [`qcow2::image::Qcow2Image`] whose storage is its `file`
//! child node ([`NodeStorage`]), with an optional backing node. Every data and metadata
//! read and write of the image is a request of the child, so the child's bitmaps,
//! copy-before-write steps and blkdebug rules see it, as in QEMU.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use qcow2::backing::{self, BackingImage, BlockState};
use qcow2::bitmap_store::{self as store, Intent, OpenTable, StoreHooks, StoredBitmap};
use qcow2::bitmaps::{self as qbitmaps, BitmapsExtension};
use qcow2::error::Qcow2Error;
use qcow2::header::{AUTOCLEAR_BITMAPS, EXT_BITMAPS, Header};
use qcow2::image::{OpenOptions, Qcow2Image};
use qcow2::intent::IntentRecord;
use qcow2::storage::Storage;

use super::blkdebug::DebugEvent;
use super::dirty_bitmap::{
    BitmapPersistence, BitmapToStore, CheckpointHooks, LoadedBitmap, StoreForm,
};
use super::node::{BlockDriver, BlockStatus, IoOrigin, Node, ZeroFlags};

/// The qcow2 format over a file node.
pub struct Qcow2Driver {
    image: Arc<Qcow2Image>,
    file: Arc<Node>,
    /// The persistent bitmaps found at open, until the node takes them.
    loaded: Mutex<Vec<LoadedBitmap>>,
    persistence: Arc<Qcow2Persistence>,
    /// The backing node, when the backing image is a node of the graph.
    backing_node: Option<Arc<Node>>,
    /// The backing file opened from the header (resolved path and format), when the
    /// backing image is not a node of the graph.
    backing_file: Option<(PathBuf, String)>,
}

/// What the qcow2 format allows for persistent bitmaps (QEMU's checks and texts).
pub struct Qcow2Persistence {
    writable: bool,
    /// A rehearsal ([`OpenMode::Rehearsal`]): changes are checked, never written.
    rehearsal: bool,
    version: u32,
    cluster_size: u64,
    image: Arc<Qcow2Image>,
}

impl std::fmt::Debug for Qcow2Persistence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Persistence").field("version", &self.version).finish_non_exhaustive()
    }
}

impl BitmapPersistence for Qcow2Persistence {
    fn can_store(
        &self,
        name: &str,
        granularity: u32,
        existing: &[(&str, u32)],
    ) -> Result<(), String> {
        // A name taken by a loaded bitmap is the manager's generic error (QEMU agrees).
        if self.version < 3 {
            return Err("Cannot store dirty bitmaps in qcow2 v2 files".into());
        }
        if !self.writable {
            // QEMU accepts this and loses the bitmap when the node closes.
            return Err("the node is read-only, so the bitmap could never be stored".into());
        }
        if name.len() > qbitmaps::MAX_NAME_SIZE {
            return Err(format!(
                "Name length exceeds maximum ({} characters)",
                qbitmaps::MAX_NAME_SIZE
            ));
        }
        let granularity = u64::from(granularity);
        if granularity > 1 << 31 {
            return Err("Granularity exceeds maximum (2147483648 bytes)".into());
        }
        if granularity < 512 {
            return Err("Granularity is under minimum (512 bytes)".into());
        }
        // The current length: the node may have been resized since it was opened.
        let disk_len = self.image.virtual_size();
        let table = qbitmaps::table_size(disk_len, granularity, self.cluster_size);
        if table > u64::from(qbitmaps::MAX_TABLE_SIZE)
            || table * self.cluster_size > qbitmaps::MAX_PHYS_SIZE
        {
            return Err(
                "Too much space will be occupied by the bitmap. Use larger granularity".into()
            );
        }
        if existing.len() + 1 > qbitmaps::MAX_BITMAPS as usize {
            return Err("Maximum number of persistent bitmaps is already reached".into());
        }
        let entry = |n: &str| (24 + n.len()).next_multiple_of(8) as u64;
        let directory: u64 = existing.iter().map(|(n, _)| entry(n)).sum::<u64>() + entry(name);
        if directory > qbitmaps::MAX_DIRECTORY_SIZE {
            return Err("Not enough space in the bitmap directory".into());
        }
        Ok(())
    }

    fn remove_stored(&self, name: &str) -> Result<(), String> {
        if self.rehearsal {
            return Ok(());
        }
        self.image.remove_stored_bitmap(name).map_err(|e| e.to_string())
    }

    fn store(&self, bitmaps: &[BitmapToStore<'_>]) -> Result<(), String> {
        if self.rehearsal {
            return Ok(());
        }
        self.image.store_bitmaps(&stored_list(bitmaps)).map_err(|e| e.to_string())
    }

    fn supports_intent(&self) -> bool {
        self.writable && !self.rehearsal && self.version >= 3
    }

    fn checkpoint(
        &self,
        bitmaps: &[BitmapToStore<'_>],
        hooks: &mut dyn CheckpointHooks,
    ) -> Result<(), String> {
        if self.rehearsal {
            return Ok(());
        }
        let mut hooks = HooksAdapter(hooks);
        self.image
            .store_bitmaps_with(&stored_list(bitmaps), &mut hooks)
            .map(drop)
            .map_err(|e| e.to_string())
    }

    fn write_marks(
        &self,
        table: &[u64],
        granularity_bits: u8,
        region_bits: u8,
        regions: &[u64],
    ) -> Result<(), String> {
        self.image
            .write_intent_marks(table, granularity_bits, region_bits, regions)
            .map_err(|e| e.to_string())
    }

    fn sync_marks(&self) -> Result<(), String> {
        self.image.sync_storage().map_err(|e| e.to_string())
    }

    fn stored_names(&self) -> Result<Vec<String>, String> {
        self.image.stored_bitmap_names().map_err(|e| e.to_string())
    }
}

/// The manager's bitmaps as the qcow2 store takes them.
fn stored_list<'a>(bitmaps: &[BitmapToStore<'a>]) -> Vec<StoredBitmap<'a>> {
    bitmaps
        .iter()
        .map(|b| StoredBitmap {
            name: b.name,
            granularity_bits: b.granularity.trailing_zeros() as u8,
            enabled: b.enabled,
            bits: b.bits,
            form: match b.form {
                StoreForm::Closed => store::StoreForm::Closed,
                StoreForm::Open => store::StoreForm::Open,
            },
            intent: b.crash_safe.map_or(Intent::OptedOut, Intent::Regions),
        })
        .collect()
}

/// The manager's checkpoint hooks as the qcow2 store calls them.
struct HooksAdapter<'a>(&'a mut dyn CheckpointHooks);

impl StoreHooks for HooksAdapter<'_> {
    fn written(&mut self, _: &Qcow2Image, tables: &[OpenTable]) -> qcow2::error::Result<()> {
        let tables: Vec<(String, Vec<u64>)> =
            tables.iter().map(|t| (t.name.clone(), t.clusters.clone())).collect();
        self.0.written(&tables).map_err(|e| Qcow2Error::Io {
            context: "marking a write-intent region",
            offset: 0,
            source: io::Error::other(e),
        })
    }

    fn switched(&mut self) {
        self.0.switched();
    }
}

/// How [`Qcow2Driver::open_with`] opens an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// For reading only.
    ReadOnly,
    /// For reading and writing: the bitmaps are marked in use on disk at once.
    ReadWrite,
    /// A rehearsal of a read-write open, for tools that try a list of bitmap changes
    /// before making any (`blockdelta bitmap`): the image is opened for reading only,
    /// but refused as a read-write open would refuse it, and its bitmaps are loaded as
    /// a read-write open loads them (in use on disk = inconsistent) without marking
    /// them in use. The persistence accepts bitmaps as a writable image does, and its
    /// removals and stores do nothing. Nothing is ever written to the file.
    Rehearsal,
}

/// Where the backing image comes from.
pub enum Backing {
    /// The file the image names in its header (resolved next to the image).
    FromHeader,
    /// A node of the graph.
    Node(Arc<Node>),
    /// None (`backing: null`): unallocated clusters read as zeroes.
    None,
}

/// A qcow2 error as an I/O error: storage errors keep their OS error, the rest is EIO
/// with the message.
pub fn to_io(e: Qcow2Error) -> io::Error {
    match e {
        Qcow2Error::Io { source, .. } => source,
        other => io::Error::other(other.to_string()),
    }
}

impl Qcow2Driver {
    /// Opens the image on the node `file`, for reading and writing or for reading
    /// only.
    pub fn open(file: Arc<Node>, backing: Backing, writable: bool) -> Result<Self, String> {
        let mode = if writable { OpenMode::ReadWrite } else { OpenMode::ReadOnly };
        Self::open_with(file, backing, mode, true)
    }

    /// Opens the image on the node `file` in `mode`. `warn`: print QEMU's warning about
    /// stale bitmaps (a caller that opens the same image twice prints it once).
    pub fn open_with(
        file: Arc<Node>,
        backing: Backing,
        mode: OpenMode,
        warn: bool,
    ) -> Result<Self, String> {
        let writable = mode == OpenMode::ReadWrite;
        let storage: Arc<dyn Storage> = Arc::new(NodeStorage(file.clone()));
        let header =
            qcow2::image::read_header(storage.as_ref(), storage.len().map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
        if mode == OpenMode::Rehearsal {
            // What a writable open would refuse (a corrupt image) is refused here too.
            qcow2::image::check_open_features(&header, true).map_err(|e| e.to_string())?;
        }
        // A writable open keeps the write-intent record: every write of the image goes
        // through the node, whose bitmaps mark regions first.
        let mut options =
            OpenOptions { writable, write_intent: writable, ..OpenOptions::default() };
        let mut backing_node = None;
        let mut backing_file = None;
        match backing {
            Backing::None => options.ignore_backing = true,
            Backing::Node(node) => {
                backing_node = Some(node.clone());
                options.backing = Some(Arc::new(NodeBacking(node)));
            }
            Backing::FromHeader => {
                if let Some(name) = header.backing_file.as_deref() {
                    let name = String::from_utf8_lossy(name).into_owned();
                    let path = resolve_backing(file.filename().as_deref(), &name);
                    let chain = backing::open_file_chain(&path, header.backing_format(), false)
                        .map_err(|e| format!("Could not open backing file: {e}"))?;
                    options.backing = Some(chain);
                    // The format as the chain was opened: named in the header, else
                    // probed (qcow2 magic or raw).
                    let format = header.backing_format().map(str::to_string).unwrap_or_else(|| {
                        let mut magic = [0u8; 4];
                        let qcow2 = std::fs::File::open(&path)
                            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
                            .is_ok()
                            && u32::from_be_bytes(magic) == qcow2::header::MAGIC;
                        if qcow2 { "qcow2" } else { "raw" }.to_string()
                    });
                    backing_file = Some((path, format));
                }
            }
        }
        let image =
            Arc::new(Qcow2Image::open(storage.clone(), options).map_err(|e| e.to_string())?);
        let loaded = load_bitmaps(storage.as_ref(), &header, writable, warn)?;
        let persistence = Arc::new(Qcow2Persistence {
            writable: writable || mode == OpenMode::Rehearsal,
            rehearsal: mode == OpenMode::Rehearsal,
            version: header.version,
            cluster_size: header.cluster_size(),
            image: image.clone(),
        });
        Ok(Qcow2Driver {
            image,
            file,
            loaded: Mutex::new(loaded),
            persistence,
            backing_node,
            backing_file,
        })
    }

    /// The image.
    pub fn image(&self) -> &Qcow2Image {
        &self.image
    }
}

/// Loads the image's persistent bitmaps, as QEMU does at open: `auto` means enabled, a
/// bitmap found in use is inconsistent (its bits are not read). A writable open marks
/// them all in use on disk before anything else is written, so that a crash, or a close
/// that does not store them, leaves them inconsistent rather than stale: a stale bitmap
/// would let an incremental backup miss writes. `warn`: print QEMU's warning when the
/// bitmaps are stale.
fn load_bitmaps(
    storage: &dyn Storage,
    header: &Header,
    writable: bool,
    warn: bool,
) -> Result<Vec<LoadedBitmap>, String> {
    let Some(data) = header.extension(EXT_BITMAPS) else { return Ok(Vec::new()) };
    if header.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
        // A program without bitmap support wrote the image: the bitmaps are stale. They
        // are dropped; a writable open has already removed the extension from the
        // header (`Qcow2Image::open`), leaking their clusters. QEMU's texts.
        let what = if header.version == 2 {
            "This qcow2 v2 image contains bitmaps, but they may have been modified by a program without persistent bitmap support; so now they must all be considered inconsistent"
        } else {
            "a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent"
        };
        if warn {
            eprintln!(
                "warning: {what}\nSome clusters may be leaked, run 'qemu-img check -r' on the image file to fix."
            );
        }
        return Ok(Vec::new());
    }
    let cluster_size = header.cluster_size();
    let ext = BitmapsExtension::parse(data, cluster_size).map_err(|e| e.to_string())?;
    let mut entries = qbitmaps::read_directory(storage, &ext, cluster_size, header.size)
        .map_err(|e| e.to_string())?;
    // blockdelta's record: which bitmaps are crash-safe, and which in-use ones it can
    // trust after a crash (`qcow2::intent`). A damaged record trusts nothing.
    let record = match IntentRecord::from_header(header) {
        Some(Ok(record)) => record,
        Some(Err(e)) => {
            if warn {
                eprintln!("warning: {e}; bitmaps found in use are inconsistent");
            }
            IntentRecord::default()
        }
        None => IntentRecord::default(),
    };
    let mut loaded = Vec::with_capacity(entries.len());
    for entry in &entries {
        let trusted = record.trusts(header.autoclear_features, &entry.name, entry.table_offset);
        let bits = if entry.in_use() && !trusted {
            None
        } else {
            Some(
                qbitmaps::load_bitmap(storage, entry, cluster_size, header.size)
                    .map_err(|e| e.to_string())?,
            )
        };
        let granularity_bits = entry.granularity_bits;
        let crash_safe = match record.get(&entry.name) {
            Some(e) => e.region_bits,
            None => Some(qcow2::intent::default_region_bits(granularity_bits)),
        };
        loaded.push(LoadedBitmap {
            name: entry.name.clone(),
            granularity: entry.granularity() as u32,
            enabled: entry.auto(),
            bits,
            crash_safe,
        });
    }
    if writable {
        qbitmaps::mark_in_use(storage, &ext, &mut entries)
            .map_err(|e| format!("Can't update bitmap directory: {e}"))?;
    }
    Ok(loaded)
}

/// A backing file name as the image stores it, resolved against the image's directory.
fn resolve_backing(image: Option<&Path>, name: &str) -> PathBuf {
    let name = Path::new(name);
    match image.and_then(Path::parent) {
        Some(dir) if name.is_relative() => dir.join(name),
        _ => name.to_path_buf(),
    }
}

impl BlockDriver for Qcow2Driver {
    fn driver_name(&self) -> &'static str {
        "qcow2"
    }

    fn len(&self) -> u64 {
        self.image.virtual_size()
    }

    fn backing_node(&self) -> Option<Arc<Node>> {
        self.backing_node.clone()
    }

    fn backing_file(&self) -> Option<(PathBuf, String)> {
        self.backing_file.clone()
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(self.image.cluster_size())
    }

    fn filename(&self) -> Option<PathBuf> {
        self.file.filename()
    }

    fn bitmap_persistence(&self) -> Option<Arc<dyn BitmapPersistence>> {
        Some(self.persistence.clone())
    }

    /// QEMU's qcow2 preconditions: a multiple of 512 bytes. Shrinking is refused:
    /// QEMU 10.0.2 can shrink a qcow2 image, this driver cannot yet, and says so with
    /// the text QEMU used before it could.
    fn check_resize(&self, new_len: u64) -> io::Result<()> {
        if !new_len.is_multiple_of(512) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "The new size must be a multiple of 512",
            ));
        }
        if new_len < self.image.virtual_size() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "qcow2 doesn't support shrinking images yet",
            ));
        }
        Ok(())
    }

    fn resize(&self, new_len: u64) -> io::Result<()> {
        self.image.resize(new_len).map_err(to_io)
    }

    fn take_loaded_bitmaps(&self) -> Vec<LoadedBitmap> {
        std::mem::take(&mut *self.loaded.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.image.read_at(buf, offset).map_err(to_io)
    }

    fn try_read_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        self.image.try_read_cached(buf, offset).map_err(to_io)
    }

    fn write(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.image.write_at(buf, offset).map_err(to_io)?;
        if fua { self.flush() } else { Ok(()) }
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        self.image.write_zeroes(offset, len, flags.may_unmap).map_err(to_io)?;
        if flags.fua { self.flush() } else { Ok(()) }
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.image.discard(offset, len).map_err(to_io)
    }

    fn flush(&self) -> io::Result<()> {
        // The image's flush orders its metadata and syncs the file.
        self.image.flush().map_err(to_io)
    }

    fn block_status(&self, offset: u64, len: u64) -> io::Result<BlockStatus> {
        let status = self.image.block_status(offset, len).map_err(to_io)?;
        let mut result = from_image_status(status);
        // Data clusters over holes of the file read as zeroes: say so, as QEMU does
        // (clients then skip reading them).
        if let (true, Some(host), false) = (result.data, status.offset, status.compressed)
            && status.depth == 0
        {
            let file = self.file.io(IoOrigin::Parent).block_status(host, result.len)?;
            if file.zero {
                result.zero = true;
            }
            result.len = file.len.clamp(1, result.len);
        }
        Ok(result)
    }
}

/// The image's status in the node's terms (allocation depth counted from 1).
fn from_image_status(s: backing::BlockStatus) -> BlockStatus {
    BlockStatus {
        data: s.state == BlockState::Data,
        zero: s.state != BlockState::Data,
        allocated: s.allocated,
        depth: if s.state == BlockState::Unallocated { 0 } else { s.depth + 1 },
        len: s.len,
    }
}

/// A node of the graph as a qcow2 backing image.
#[derive(Debug)]
struct NodeBacking(Arc<Node>);

impl BackingImage for NodeBacking {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> qcow2::error::Result<()> {
        self.0.io(IoOrigin::Parent).read(buf, offset).map_err(|source| Qcow2Error::Io {
            context: "reading the backing node",
            offset,
            source,
        })
    }

    fn len(&self) -> u64 {
        self.0.len()
    }

    fn block_status(&self, offset: u64, len: u64) -> qcow2::error::Result<backing::BlockStatus> {
        let s = self.0.io(IoOrigin::Parent).block_status(offset, len).map_err(|source| {
            Qcow2Error::Io { context: "block status of the backing node", offset, source }
        })?;
        let state = match (s.data, s.depth) {
            (true, _) => BlockState::Data,
            (false, 0) => BlockState::Unallocated,
            (false, _) => BlockState::Zero,
        };
        Ok(backing::BlockStatus {
            state,
            allocated: s.allocated,
            depth: s.depth.saturating_sub(1),
            offset: None,
            compressed: false,
            len: s.len,
        })
    }
}

/// A child node as the image's storage: every call is a parent request of the node
/// (`IoOrigin::Parent`), so it passes the node's write hook and copy-before-write
/// steps, and, like QEMU's qcow2, announces data I/O to the child (`read_aio`,
/// `write_aio`) for blkdebug rules. Writes may grow a growable child (a file).
#[derive(Debug)]
pub struct NodeStorage(pub Arc<Node>);

impl Storage for NodeStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.debug_event(DebugEvent::READ_AIO);
        // Past the end reads as zeroes (the `Storage` contract); the node refuses it.
        let len = self.0.len();
        let inside = len.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[inside..].fill(0);
        if inside == 0 {
            return Ok(());
        }
        self.0.io(IoOrigin::Parent).read(&mut buf[..inside], offset)
    }

    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        if offset.saturating_add(buf.len() as u64) > self.0.len() {
            return Ok(false);
        }
        self.0.io(IoOrigin::Parent).try_read_nowait(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.debug_event(DebugEvent::WRITE_AIO);
        self.0.io(IoOrigin::Parent).write(buf, offset, false)
    }

    fn flush(&self) -> io::Result<()> {
        self.0.io(IoOrigin::Parent).flush()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.io(IoOrigin::Parent).discard(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.io(IoOrigin::Parent).write_zeroes(offset, len, ZeroFlags::default())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.0.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.resize_blocking(len).map_err(io::Error::from)
    }

    fn release_locks(&self) -> io::Result<()> {
        match self.0.storage() {
            Some(storage) => storage.release_locks(),
            None => Ok(()),
        }
    }
}

/// The `bitmaps` list of qcow2's format-specific image information (`Qcow2BitmapInfo`
/// in `qemu-img info` and QMP): each entry's name, granularity and flags, in directory
/// order, reserved flag bits left out as QEMU does.
pub fn bitmap_info_list(entries: &[qbitmaps::DirectoryEntry]) -> serde_json::Value {
    let list: Vec<serde_json::Value> = entries
        .iter()
        .map(|e| {
            let mut flags = Vec::new();
            if e.in_use() {
                flags.push("in-use");
            }
            if e.auto() {
                flags.push("auto");
            }
            serde_json::json!({"flags": flags, "name": e.name, "granularity": e.granularity()})
        })
        .collect();
    serde_json::Value::Array(list)
}
