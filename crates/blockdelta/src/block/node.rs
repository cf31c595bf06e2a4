//! Block nodes: a driver (file, raw, qcow2, ...) plus what every node has, its name,
//! its dirty bitmaps and the write hook that feeds them.
//!
//! Drivers do synchronous positional I/O; [`Node`] runs it on tokio's blocking threads
//! for async callers (the NBD server, jobs). Every write, write-zeroes and discard that
//! reaches a node marks the node's enabled bitmaps once it has finished, whether it
//! succeeded or not, exactly as QEMU does.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};

use qcow2::storage::Storage;

use super::blkdebug::DebugEvent;
use super::dirty_bitmap::{BitmapError, BitmapPersistence, LoadedBitmap, NodeBitmaps};
pub use super::gate::IoOrigin;
use super::gate::{InFlight, IoGate};

/// What a range of a node holds, as block status reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockStatus {
    /// The range holds data (reads may return non-zero bytes).
    pub data: bool,
    /// The range reads as zeroes.
    pub zero: bool,
    /// The range is allocated in this node (not read through to a backing node).
    pub allocated: bool,
    /// Allocation depth: 1 = this node, 2 = its backing node, ...; 0 = nowhere.
    pub depth: u32,
    /// Bytes from the start of the query that share this status (at least 1).
    pub len: u64,
}

/// Options of a write-zeroes request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The range may be deallocated rather than written.
    pub may_unmap: bool,
    /// Make the write durable before completing (forced unit access).
    pub fua: bool,
}

/// A block driver's synchronous I/O. Offsets and lengths are checked against
/// [`len`](BlockDriver::len) by [`Node`] before they reach the driver.
pub trait BlockDriver: Send + Sync {
    /// The driver's name as QEMU spells it (`file`, `raw`, `qcow2`).
    fn driver_name(&self) -> &'static str;

    /// The node's length in bytes.
    fn len(&self) -> u64;

    /// Whether the node is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The cluster size, for drivers that have one (sets the default bitmap granularity).
    fn cluster_size(&self) -> Option<u64> {
        None
    }

    /// The host file under the node, if any (images name their backing files relative
    /// to it).
    fn filename(&self) -> Option<PathBuf> {
        None
    }

    /// The host storage of a protocol node (`file`): for image locks and queries of
    /// the file itself. Format drivers do their I/O through the child node instead.
    fn storage(&self) -> Option<Arc<dyn Storage>> {
        None
    }

    /// Whether writes from a parent may reach past the end and grow the node, as a
    /// format driver grows its file (QEMU's protocol nodes). Then the driver's
    /// [`len`](Self::len) follows the writes.
    fn growable(&self) -> bool {
        false
    }

    /// The backing node, when the backing image is a node of the graph.
    fn backing_node(&self) -> Option<Arc<Node>> {
        None
    }

    /// The backing file (path and format) when the backing image was opened from the
    /// image's header rather than as a node of the graph.
    fn backing_file(&self) -> Option<(PathBuf, String)> {
        None
    }

    /// How the driver stores persistent bitmaps, if it can (qcow2).
    fn bitmap_persistence(&self) -> Option<Arc<dyn BitmapPersistence>> {
        None
    }

    /// The persistent bitmaps the driver found at open, handed over once to the node.
    fn take_loaded_bitmaps(&self) -> Vec<LoadedBitmap> {
        Vec::new()
    }

    /// Whether a resize to `new_len` bytes could be done: the driver's own
    /// preconditions (alignment, options), checked before the node's bitmaps are, as
    /// QEMU does. The default refuses: the driver cannot resize.
    fn check_resize(&self, _new_len: u64) -> io::Result<()> {
        Err(resize_unsupported())
    }

    /// Changes the length to `new_len` bytes (after [`check_resize`] passed). Called
    /// with the node's I/O drained and its bitmap lock held.
    ///
    /// [`check_resize`]: BlockDriver::check_resize
    fn resize(&self, _new_len: u64) -> io::Result<()> {
        Err(resize_unsupported())
    }

    /// Handles a blkdebug event; `false` (the default) passes it to the node's first
    /// child, as QEMU passes events down to the first driver that handles them.
    fn debug_event(&self, _event: DebugEvent) -> bool {
        false
    }

    /// Reads `buf.len()` bytes at `offset`.
    fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Reads like [`read`](Self::read) only if nothing on the way can block on a device
    /// (metadata and data cached); `Ok(false)` otherwise. The default never tries.
    fn try_read_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        let _ = (buf, offset);
        Ok(false)
    }

    /// Writes `buf` at `offset`; with `fua`, durably.
    fn write(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()>;

    /// Makes a range read as zeroes.
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()>;

    /// Deallocates a range (contents then unspecified, zeroes where possible).
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Makes all completed writes durable.
    fn flush(&self) -> io::Result<()>;

    /// The status of the range at `offset`, at most `len` bytes of it.
    fn block_status(&self, offset: u64, len: u64) -> io::Result<BlockStatus>;
}

/// QEMU's text for a driver without resize.
fn resize_unsupported() -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, "Image format driver does not support resize")
}

/// Why [`Node::resize`] refused or failed. `Display` is QEMU's text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResizeError {
    /// The node was opened read-only.
    #[error("Image is read-only")]
    ReadOnly,
    /// A bitmap of the node does not allow it (busy, frozen, readonly, inconsistent, or
    /// stored in the image but not loaded).
    #[error(transparent)]
    Bitmap(#[from] BitmapError),
    /// The driver refused or failed; the message is the driver's (QEMU's text where it
    /// has one, e.g. `Cannot resize fixed-size raw disks`).
    #[error(transparent)]
    Driver(io::Error),
    /// A job (a backup) uses the node at a fixed length.
    #[error("Node '{0}' is used by a block job and cannot be resized")]
    InUseByJob(String),
}

impl From<ResizeError> for io::Error {
    fn from(e: ResizeError) -> io::Error {
        match e {
            ResizeError::Driver(e) => e,
            ResizeError::ReadOnly => io::Error::new(io::ErrorKind::PermissionDenied, e.to_string()),
            other => io::Error::other(other.to_string()),
        }
    }
}

/// A step in a node's write path that runs before every write, write-zeroes and
/// passed-down discard reaches the driver: a backup's copy-before-write, which copies
/// the old contents of the range to the backup target first. An error fails the request
/// before anything changed (QEMU's default `on-cbw-error=break-guest-write`).
pub trait BeforeWrite: Send + Sync {
    /// Runs before `len` bytes at `offset` change. Called inside the request: to read
    /// the node, use `node.io(IoOrigin::Job)`, which never waits at the node's gate.
    fn before_write(&self, node: &Node, offset: u64, len: u64) -> io::Result<()>;
}

/// A node's copy-before-write steps with their handles, oldest first.
type BeforeWriteSteps = Arc<[(BeforeWriteId, Arc<dyn BeforeWrite>)]>;

/// The handle of a copy-before-write step on a node, to remove exactly that step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BeforeWriteId(u64);

/// `detect-zeroes`: whether writes of all-zero buffers become write-zeroes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DetectZeroes {
    /// Write the buffer as given.
    #[default]
    Off,
    /// Turn all-zero writes into write-zeroes.
    On,
    /// Turn them into write-zeroes that may deallocate (needs `discard=unmap`).
    Unmap,
}

/// The options every node has, whatever its driver.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeOptions {
    /// Refuse writes.
    pub read_only: bool,
    /// `discard=unmap`: pass discards down (otherwise they are ignored, as QEMU's
    /// default `discard=ignore`).
    pub discard_unmap: bool,
    /// `detect-zeroes`.
    pub detect_zeroes: DetectZeroes,
    /// `cache.no-flush`: flushes do nothing.
    pub no_flush: bool,
    /// `cache.direct`: the file is opened with O_DIRECT (reported by queries).
    pub direct: bool,
}

/// A node of the block graph.
pub struct Node {
    name: String,
    driver: Box<dyn BlockDriver>,
    /// Shared, so that merges across nodes can resolve another node's bitmaps.
    bitmaps: Arc<NodeBitmaps>,
    options: NodeOptions,
    children: Vec<Arc<Node>>,
    /// The nodes that have this one as a child: a drain quiesces them too.
    parents: Mutex<Vec<Weak<Node>>>,
    /// Set by the first [`Node::close`], so that dropping the node does not close it
    /// (and store its bitmaps) a second time.
    closed: AtomicBool,
    /// Which requests may start (drains, resizes; see [`IoGate`]).
    gate: IoGate,
    /// The copy-before-write steps, one per backup of this node, oldest first. A
    /// snapshot is cloned per write (one reference count) so that steps can be added
    /// and removed while writes run them; `has_before_write` skips even that when
    /// there are none.
    before_write: RwLock<BeforeWriteSteps>,
    has_before_write: AtomicBool,
    next_step: AtomicU64,
    /// Jobs that need the length fixed (QEMU: the backup filter does not share RESIZE).
    resize_blockers: AtomicUsize,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("driver", &self.driver.driver_name())
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl Node {
    /// A node named `name` over `driver`; `children` are the nodes the driver uses (for
    /// queries, lifetime and drains: each child learns its new parent).
    pub fn new(
        name: &str,
        driver: Box<dyn BlockDriver>,
        options: NodeOptions,
        children: Vec<Arc<Node>>,
    ) -> Arc<Self> {
        let bitmaps = Arc::new(NodeBitmaps::new(
            name,
            driver.len(),
            driver.cluster_size(),
            driver.bitmap_persistence(),
        ));
        Arc::new_cyclic(|me| {
            for child in &children {
                let mut parents = child.parents.lock().unwrap_or_else(PoisonError::into_inner);
                parents.retain(|p| p.strong_count() > 0);
                parents.push(me.clone());
            }
            Node {
                name: name.to_string(),
                driver,
                bitmaps,
                options,
                children,
                parents: Mutex::new(Vec::new()),
                closed: AtomicBool::new(false),
                gate: IoGate::new(),
                before_write: RwLock::new(Arc::from(Vec::new())),
                has_before_write: AtomicBool::new(false),
                next_step: AtomicU64::new(0),
                resize_blockers: AtomicUsize::new(0),
            }
        })
    }

    /// Like [`new`](Self::new), and takes over the persistent bitmaps the driver loaded
    /// (readonly on a read-only node).
    pub fn open(
        name: &str,
        driver: Box<dyn BlockDriver>,
        options: NodeOptions,
        children: Vec<Arc<Node>>,
    ) -> Result<Arc<Self>, String> {
        let loaded = driver.take_loaded_bitmaps();
        let node = Node::new(name, driver, options, children);
        for bitmap in loaded {
            node.bitmaps
                .add_loaded(bitmap, options.read_only)
                .map_err(|e| format!("Could not load the bitmaps of '{name}': {e}"))?;
        }
        // Crash-safe bitmaps are stored open before the first write can reach the
        // image: from here on every write is marked first.
        node.bitmaps
            .checkpoint()
            .map_err(|e| format!("Could not make the bitmaps of '{name}' crash-safe: {e}"))?;
        Ok(node)
    }

    /// The nodes that have this one as a child (those still open).
    pub fn parents(&self) -> Vec<Arc<Node>> {
        let parents = self.parents.lock().unwrap_or_else(PoisonError::into_inner);
        parents.iter().filter_map(Weak::upgrade).collect()
    }

    /// I/O on this node as a request of `origin` (see [`IoOrigin`]): a driver uses
    /// `child.io(IoOrigin::Parent)`, a job `node.io(IoOrigin::Job)`.
    pub fn io(&self, origin: IoOrigin) -> NodeIo<'_> {
        NodeIo { node: self, origin }
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The driver's name.
    pub fn driver_name(&self) -> &'static str {
        self.driver.driver_name()
    }

    /// Whether the node was opened read-only.
    pub fn read_only(&self) -> bool {
        self.options.read_only
    }

    /// The options common to all drivers.
    pub fn options(&self) -> NodeOptions {
        self.options
    }

    /// The node's length in bytes.
    pub fn len(&self) -> u64 {
        self.driver.len()
    }

    /// Whether the node is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a parent's writes may grow the node ([`BlockDriver::growable`]).
    pub fn growable(&self) -> bool {
        self.driver.growable()
    }

    /// The host file under the node, if any.
    pub fn filename(&self) -> Option<PathBuf> {
        self.driver.filename()
    }

    /// The storage of a protocol node.
    pub fn storage(&self) -> Option<Arc<dyn Storage>> {
        self.driver.storage()
    }

    /// The node's dirty bitmaps.
    pub fn bitmaps(&self) -> &Arc<NodeBitmaps> {
        &self.bitmaps
    }

    /// The backing node, when it is a node of the graph (bitmaps are looked up down
    /// this chain).
    pub fn backing_node(&self) -> Option<Arc<Node>> {
        self.driver.backing_node()
    }

    /// The backing file (path and format) when the backing image was opened from the
    /// image's header rather than as a node of the graph.
    pub fn backing_file(&self) -> Option<(PathBuf, String)> {
        self.driver.backing_file()
    }

    /// The nodes this one uses.
    pub fn children(&self) -> &[Arc<Node>] {
        &self.children
    }

    /// Emits a blkdebug event on this node: its driver or, failing that, the first
    /// child down the chain that handles events (a `blkdebug` node) gets it.
    pub fn debug_event(&self, event: DebugEvent) {
        if !self.driver.debug_event(event)
            && let Some(child) = self.children.first()
        {
            child.debug_event(event);
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len() => Ok(()),
            _ => Err(invalid(format!(
                "request of {len} bytes at {offset} is past the end of node '{}' ({} bytes)",
                self.name,
                self.len()
            ))),
        }
    }

    /// Refuses writes to a read-only node, and to a node with a readonly bitmap (EPERM,
    /// as QEMU); then checks the range. A parent's write may grow a growable node.
    fn check_writable(&self, offset: u64, len: u64, origin: IoOrigin) -> io::Result<()> {
        if self.options.read_only || self.bitmaps.has_readonly() {
            return Err(io::Error::from_raw_os_error(rustix::io::Errno::PERM.raw_os_error()));
        }
        if origin == IoOrigin::Parent && self.driver.growable() {
            return match offset.checked_add(len) {
                Some(end) if end <= i64::MAX as u64 => Ok(()),
                _ => Err(invalid(format!("request of {len} bytes at {offset} is too large"))),
            };
        }
        self.check_range(offset, len)
    }

    /// Stores the node's persistent bitmaps (on a writable node) and flushes: what a
    /// node does when it is closed. Also run, with errors only reported, when the last
    /// reference to the node goes.
    pub fn close(&self) -> io::Result<()> {
        self.closed.store(true, SeqCst);
        if !self.options.read_only {
            self.bitmaps.store_persistent().map_err(|e| io::Error::other(e.to_string()))?;
        }
        self.flush_blocking()?;
        // Closed: the image is free for other programs even if a reference to this node
        // (a finished job's) outlives the close.
        match self.driver.storage() {
            Some(storage) => storage.release_locks(),
            None => Ok(()),
        }
    }

    /// Reads `buf.len()` bytes at `offset` if that cannot block (everything it needs is
    /// cached, and the node is not drained): async callers then skip the hand-off to a
    /// blocking thread. `Ok(false)` when it would block.
    pub fn try_read_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        self.try_read_nowait_as(IoOrigin::Client, buf, offset)
    }

    fn try_read_nowait_as(
        &self,
        origin: IoOrigin,
        buf: &mut [u8],
        offset: u64,
    ) -> io::Result<bool> {
        let Some(_req) = self.gate.try_enter(origin) else { return Ok(false) };
        self.check_range(offset, buf.len() as u64)?;
        self.driver.try_read_nowait(buf, offset)
    }

    /// Keeps resizes out (`true`) or lets them in again (`false`); calls nest.
    pub fn block_resize(&self, block: bool) {
        if block {
            self.resize_blockers.fetch_add(1, SeqCst);
        } else {
            let _ = self.resize_blockers.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1));
        }
    }

    /// The cluster size of the driver, if it has one.
    pub fn cluster_size(&self) -> Option<u64> {
        self.driver.cluster_size()
    }

    /// Runs `f` with the node drained (blocking): see [`drain_nodes`].
    pub fn drained<R>(self: &Arc<Self>, f: impl FnOnce() -> R) -> R {
        let _section = drain_nodes(std::slice::from_ref(self));
        f()
    }

    /// Adds a copy-before-write step; it runs before every later write, after the steps
    /// already there. Add it in a drained section for a clean point in time: requests
    /// already past their steps are not affected.
    pub fn add_before_write(&self, step: Arc<dyn BeforeWrite>) -> BeforeWriteId {
        let id = BeforeWriteId(self.next_step.fetch_add(1, SeqCst));
        let mut steps = self.before_write.write().unwrap_or_else(PoisonError::into_inner);
        let mut list = steps.to_vec();
        list.push((id, step));
        *steps = Arc::from(list);
        self.has_before_write.store(true, SeqCst);
        id
    }

    /// Removes the step `id` (and only it); `false` if it was not there.
    pub fn remove_before_write(&self, id: BeforeWriteId) -> bool {
        let mut steps = self.before_write.write().unwrap_or_else(PoisonError::into_inner);
        let list: Vec<_> = steps.iter().filter(|(i, _)| *i != id).cloned().collect();
        let removed = list.len() != steps.len();
        self.has_before_write.store(!list.is_empty(), SeqCst);
        *steps = Arc::from(list);
        removed
    }

    /// How many copy-before-write steps the node has (one per backup running).
    pub fn before_write_steps(&self) -> usize {
        self.before_write.read().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Runs the copy-before-write steps, if any, for a change of `len` bytes at
    /// `offset`, oldest first; the first error fails the request.
    fn run_before_write(&self, offset: u64, len: u64) -> io::Result<()> {
        if !self.has_before_write.load(SeqCst) {
            return Ok(());
        }
        let steps = self.before_write.read().unwrap_or_else(PoisonError::into_inner).clone();
        for (_, step) in steps.iter() {
            step.before_write(self, offset, len)?;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` (blocking, as a client).
    pub fn read_blocking(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.io(IoOrigin::Client).read(buf, offset)
    }

    /// Writes `buf` at `offset` (blocking, as a client), then marks the bitmaps.
    pub fn write_blocking(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.io(IoOrigin::Client).write(buf, offset, fua)
    }

    /// Write-zeroes (blocking, as a client), then marks the bitmaps.
    pub fn write_zeroes_blocking(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        self.io(IoOrigin::Client).write_zeroes(offset, len, flags)
    }

    /// Discard (blocking, as a client).
    pub fn discard_blocking(&self, offset: u64, len: u64) -> io::Result<()> {
        self.io(IoOrigin::Client).discard(offset, len)
    }

    /// Flush (blocking, as a client).
    pub fn flush_blocking(&self) -> io::Result<()> {
        self.io(IoOrigin::Client).flush()
    }

    /// Block status (blocking, as a client).
    pub fn block_status_blocking(&self, offset: u64, len: u64) -> io::Result<BlockStatus> {
        self.io(IoOrigin::Client).block_status(offset, len)
    }

    /// Sets the written range in the bitmaps; a write that grew the node first grows
    /// them (QEMU grows a protocol node's bitmaps with the file).
    fn mark_written(&self, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        if end > self.bitmaps.length() && self.driver.growable() {
            self.bitmaps.grow_to(self.driver.len().max(end));
        }
        self.bitmaps.set_dirty(offset, len);
    }

    /// Resizes the node to `new_len` bytes (blocking), with QEMU's rules: refused on a
    /// read-only node, then by the driver's preconditions, then by the bitmaps (see
    /// [`NodeBitmaps::resize_with`]). On success every bitmap has the new length (bits
    /// past the old end clean, bits before it kept; a shrink drops the bits past the
    /// new end), and persistent ones are stored at that length when the node closes.
    ///
    /// Every request in flight finishes first and new ones wait ([`IoGate::exclusive`]),
    /// and the bitmap lock is held from the check to the new length, so
    /// [`len`](Self::len) and [`NodeBitmaps::length`] change together as far as any
    /// request or bitmap operation can see. A format driver resizes its child through
    /// the child's `resize_blocking`.
    pub fn resize_blocking(&self, new_len: u64) -> Result<(), ResizeError> {
        if self.options.read_only {
            return Err(ResizeError::ReadOnly);
        }
        // A job running on the node refuses at once: its I/O never waits, so waiting
        // for it to stop could take as long as the job.
        if self.resize_blockers.load(SeqCst) > 0 {
            return Err(ResizeError::InUseByJob(self.name.clone()));
        }
        let _exclusive = self.gate.exclusive();
        if self.resize_blockers.load(SeqCst) > 0 {
            return Err(ResizeError::InUseByJob(self.name.clone()));
        }
        self.driver.check_resize(new_len).map_err(ResizeError::Driver)?;
        self.bitmaps
            .resize_with(new_len, || self.driver.resize(new_len).map_err(ResizeError::Driver))?;
        // The stored tables have the old size: store them at the new one before any
        // write can reach the new bytes (requests are still held here).
        if let Err(e) = self.bitmaps.checkpoint() {
            // Writes past the old end then fail rather than go unmarked.
            eprintln!("warning: {}: crash-safe bitmaps not stored after a resize: {e}", self.name);
        }
        Ok(())
    }
    /// Reads `len` bytes at `offset`.
    pub async fn read(self: &Arc<Self>, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let node = self.clone();
        blocking(move || {
            let mut buf = vec![0u8; len];
            node.read_blocking(&mut buf, offset)?;
            Ok(buf)
        })
        .await
    }

    /// Writes `buf` at `offset`; with `fua`, durably.
    pub async fn write(self: &Arc<Self>, buf: Vec<u8>, offset: u64, fua: bool) -> io::Result<()> {
        let node = self.clone();
        blocking(move || node.write_blocking(&buf, offset, fua)).await
    }

    /// Makes a range read as zeroes.
    pub async fn write_zeroes(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> io::Result<()> {
        let node = self.clone();
        blocking(move || node.write_zeroes_blocking(offset, len, flags)).await
    }

    /// Deallocates a range.
    pub async fn discard(self: &Arc<Self>, offset: u64, len: u64) -> io::Result<()> {
        let node = self.clone();
        blocking(move || node.discard_blocking(offset, len)).await
    }

    /// Makes completed writes durable.
    pub async fn flush(self: &Arc<Self>) -> io::Result<()> {
        let node = self.clone();
        blocking(move || node.flush_blocking()).await
    }

    /// Resizes the node (see [`resize_blocking`](Self::resize_blocking)).
    pub async fn resize(self: &Arc<Self>, new_len: u64) -> Result<(), ResizeError> {
        let node = self.clone();
        tokio::task::spawn_blocking(move || node.resize_blocking(new_len)).await.map_err(|e| {
            ResizeError::Driver(io::Error::other(format!("resize task failed: {e}")))
        })?
    }

    /// The status of the range at `offset`.
    pub async fn block_status(self: &Arc<Self>, offset: u64, len: u64) -> io::Result<BlockStatus> {
        let node = self.clone();
        blocking(move || node.block_status_blocking(offset, len)).await
    }
}

/// I/O on a node as a request of one origin ([`Node::io`]). Every write, write-zeroes
/// and passed-down discard runs the node's copy-before-write steps first and marks its
/// enabled bitmaps when it has finished, whether it succeeded or not.
#[derive(Clone, Copy)]
pub struct NodeIo<'a> {
    node: &'a Node,
    origin: IoOrigin,
}

impl NodeIo<'_> {
    fn enter(&self) -> InFlight<'_> {
        self.node.gate.enter(self.origin)
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let node = self.node;
        let _req = self.enter();
        node.check_range(offset, buf.len() as u64)?;
        node.driver.read(buf, offset)
    }

    /// Reads only if nothing on the way can block ([`Node::try_read_nowait`]).
    pub fn try_read_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        self.node.try_read_nowait_as(self.origin, buf, offset)
    }

    /// Writes `buf` at `offset`; with `fua`, durably. With `detect-zeroes`, an all-zero
    /// buffer is written as zeroes.
    pub fn write(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        let node = self.node;
        let len = buf.len() as u64;
        let _req = self.enter();
        node.check_writable(offset, len, self.origin)?;
        node.run_before_write(offset, len)?;
        node.bitmaps.before_write(offset, len)?;
        let zeroes = node.options.detect_zeroes != DetectZeroes::Off && buf.iter().all(|&b| b == 0);
        // The block layer's events around a write, as QEMU emits them (for blkdebug).
        node.debug_event(if zeroes { DebugEvent::PWRITEV_ZERO } else { DebugEvent::PWRITEV });
        let result = if zeroes {
            let may_unmap = node.options.detect_zeroes == DetectZeroes::Unmap;
            node.driver.write_zeroes(offset, len, ZeroFlags { may_unmap, fua })
        } else {
            node.driver.write(buf, offset, fua)
        };
        node.debug_event(DebugEvent::PWRITEV_DONE);
        node.mark_written(offset, len);
        result
    }

    /// Makes a range read as zeroes.
    pub fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        let node = self.node;
        let _req = self.enter();
        node.check_writable(offset, len, self.origin)?;
        node.run_before_write(offset, len)?;
        node.bitmaps.before_write(offset, len)?;
        let flags = ZeroFlags { may_unmap: flags.may_unmap && node.options.discard_unmap, ..flags };
        node.debug_event(DebugEvent::PWRITEV_ZERO);
        let result = node.driver.write_zeroes(offset, len, flags);
        node.debug_event(DebugEvent::PWRITEV_DONE);
        node.mark_written(offset, len);
        result
    }

    /// Deallocates a range. Without `discard=unmap` the request is ignored: nothing
    /// changes, so nothing is recorded (QEMU 10.0.2 behaves so).
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let node = self.node;
        let _req = self.enter();
        node.check_writable(offset, len, self.origin)?;
        if !node.options.discard_unmap {
            return Ok(());
        }
        node.run_before_write(offset, len)?;
        node.bitmaps.before_write(offset, len)?;
        let result = node.driver.discard(offset, len);
        node.bitmaps.set_dirty(offset, len);
        result
    }

    /// Makes completed writes durable.
    pub fn flush(&self) -> io::Result<()> {
        let node = self.node;
        let _req = self.enter();
        // `cache.no-flush` skips the flush to the disk only, as in QEMU: a format or
        // filter node still writes what it caches (qcow2 metadata) to its children,
        // whose own option then decides; a protocol node does nothing. Skipping a
        // format node's flush altogether would leave an image whose cached mappings
        // reach the file only when the node is dropped, after it was closed.
        if node.options.no_flush && node.children.is_empty() {
            return Ok(());
        }
        // QEMU emits the flush events on the flushed node's first child.
        if let Some(child) = node.children.first() {
            child.debug_event(DebugEvent::FLUSH_TO_OS);
            if !node.options.no_flush {
                child.debug_event(DebugEvent::FLUSH_TO_DISK);
            }
        }
        node.driver.flush()
    }

    /// The status of the range at `offset`, at most `len` bytes of it.
    pub fn block_status(&self, offset: u64, len: u64) -> io::Result<BlockStatus> {
        let node = self.node;
        let _req = self.enter();
        if len == 0 {
            return Err(invalid("block status of an empty range".into()));
        }
        node.check_range(offset, len)?;
        node.driver.block_status(offset, len)
    }
}

/// A drained section of some nodes and all their ancestors ([`drain_nodes`]); dropping
/// it lets requests in again. Holding one does not block anything but new client
/// requests, so it may be held across `.await` points.
#[must_use]
pub struct DrainedSection {
    nodes: Vec<Arc<Node>>,
}

impl Drop for DrainedSection {
    fn drop(&mut self) {
        for node in &self.nodes {
            node.gate.end_quiesce();
        }
    }
}

impl DrainedSection {
    /// The nodes held (those named and their ancestors).
    pub fn nodes(&self) -> &[Arc<Node>] {
        &self.nodes
    }
}

/// Drains `nodes` and every node above them (blocking): no client request starts on any
/// of them until the section is dropped, and none is in flight when this returns, nor
/// any request a parent driver issued for one. Ancestors are included because their
/// requests reach these nodes as parent requests, which do not wait (they run inside a
/// request already counted above). What happens in the section (freezing a bitmap,
/// adding a copy-before-write step, a transaction's actions) is one point in time for
/// every write. Sections nest and overlap.
pub fn drain_nodes(nodes: &[Arc<Node>]) -> DrainedSection {
    // Breadth first, upwards; each node once.
    let mut all: Vec<Arc<Node>> = Vec::new();
    let mut queue: std::collections::VecDeque<Arc<Node>> = nodes.iter().cloned().collect();
    while let Some(node) = queue.pop_front() {
        if all.iter().any(|n| Arc::ptr_eq(n, &node)) {
            continue;
        }
        queue.extend(node.parents());
        all.push(node);
    }
    for node in &all {
        node.gate.quiesce();
    }
    // Top first: once the ancestors are idle no parent request comes down any more.
    // One more pass checks that the order (not always topological in a DAG) missed
    // nothing.
    loop {
        for node in all.iter().rev() {
            node.gate.wait_idle();
        }
        if all.iter().all(|n| n.gate.idle()) {
            break;
        }
    }
    DrainedSection { nodes: all }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        if let Err(e) = self.close() {
            eprintln!("blockdelta: closing node '{}': {e}", self.name);
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io::Error::other(format!("block I/O task failed: {e}")))?
}
