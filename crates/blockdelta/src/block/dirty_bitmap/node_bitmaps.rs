//! The bitmaps of one node: lookup, checks, add, remove, clear, enable, disable, merge,
//! the write hook, resize and query.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use hbitmap::HBitmap;

use super::intent::{IntentLog, TrackedBitmap};
use super::{
    BitmapError, BitmapId, BitmapInfo, BitmapPersistence, BitmapToStore, CheckpointHooks, Checks,
    MAX_NAME_LEN, StoreForm, check_granularity, default_granularity,
};

/// Orders the locks of different nodes, so that a merge across nodes cannot deadlock.
static NEXT_NODE_KEY: AtomicU64 = AtomicU64::new(1);

/// One bitmap and its flags.
pub(super) struct DirtyBitmap {
    pub(super) id: BitmapId,
    pub(super) name: Option<String>,
    pub(super) bits: HBitmap,
    pub(super) disabled: bool,
    pub(super) busy: bool,
    pub(super) readonly: bool,
    pub(super) persistent: bool,
    pub(super) inconsistent: bool,
    pub(super) skip_store: bool,
    pub(super) successor: Option<BitmapId>,
    /// log2 of the write-intent region size of a crash-safe persistent bitmap; `None`
    /// for every other.
    pub(super) crash_safe: Option<u8>,
}

impl DirtyBitmap {
    /// The name for messages (QEMU prints anonymous bitmaps' names as `(null)`).
    pub(super) fn display_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| "(null)".to_string())
    }

    /// QEMU's `bdrv_dirty_bitmap_check`.
    pub(super) fn check(&self, checks: Checks) -> Result<(), BitmapError> {
        if checks.busy && self.busy {
            return Err(BitmapError::Busy(self.display_name()));
        }
        if checks.readonly && self.readonly {
            return Err(BitmapError::Readonly(self.display_name()));
        }
        if checks.inconsistent && self.inconsistent {
            return Err(BitmapError::Inconsistent(self.display_name()));
        }
        Ok(())
    }

    pub(super) fn granularity_bytes(&self) -> u32 {
        1u32 << self.bits.granularity()
    }
}

/// The lock-protected state of a node's bitmaps.
pub(super) struct Inner {
    pub(super) length: u64,
    /// Newest first, as QEMU lists them.
    pub(super) bitmaps: Vec<DirtyBitmap>,
    next_id: u64,
    /// The crash-safe bitmaps as the intent log last learnt them: (bitmap, recording,
    /// region bits, granularity bits).
    intent_view: Vec<(BitmapId, bool, u8, u8)>,
}

impl Inner {
    pub(super) fn index_of(&self, id: BitmapId) -> Result<usize, BitmapError> {
        self.bitmaps.iter().position(|b| b.id == id).ok_or(BitmapError::UnknownId(id))
    }

    pub(super) fn get(&self, id: BitmapId) -> Result<&DirtyBitmap, BitmapError> {
        Ok(&self.bitmaps[self.index_of(id)?])
    }

    pub(super) fn get_mut(&mut self, id: BitmapId) -> Result<&mut DirtyBitmap, BitmapError> {
        let i = self.index_of(id)?;
        Ok(&mut self.bitmaps[i])
    }

    /// Whether writes are recorded: the bitmap is enabled, or it is frozen and its
    /// successor is enabled.
    fn recording(&self, b: &DirtyBitmap) -> bool {
        !b.disabled || b.successor.and_then(|s| self.get(s).ok()).is_some_and(|s| !s.disabled)
    }

    fn info_of(&self, b: &DirtyBitmap) -> BitmapInfo {
        BitmapInfo {
            name: b.name.clone(),
            count: b.bits.count(),
            granularity: b.granularity_bytes(),
            recording: self.recording(b),
            busy: b.busy,
            persistent: b.persistent,
            inconsistent: b.inconsistent,
        }
    }

    fn index_by_name(&self, name: &str) -> Result<usize, BitmapError> {
        self.bitmaps
            .iter()
            .position(|b| b.name.as_deref() == Some(name))
            .ok_or_else(|| BitmapError::NotFound(name.to_string()))
    }

    /// QEMU's lookup followed by `bdrv_dirty_bitmap_check`.
    fn lookup(&self, name: &str, checks: Checks) -> Result<usize, BitmapError> {
        let i = self.index_by_name(name)?;
        self.bitmaps[i].check(checks)?;
        Ok(i)
    }

    /// Creates a bitmap and puts it first in the list.
    pub(super) fn insert(
        &mut self,
        name: Option<String>,
        granularity: u32,
        disabled: bool,
    ) -> Result<BitmapId, BitmapError> {
        let bits = HBitmap::new(self.length, granularity.trailing_zeros())?;
        let id = BitmapId(self.next_id);
        self.next_id += 1;
        self.bitmaps.insert(
            0,
            DirtyBitmap {
                id,
                name,
                bits,
                disabled,
                busy: false,
                readonly: false,
                persistent: false,
                inconsistent: false,
                skip_store: false,
                successor: None,
                crash_safe: None,
            },
        );
        Ok(id)
    }

    /// Releases a bitmap that nothing uses any more.
    pub(super) fn release(&mut self, id: BitmapId) -> Result<(), BitmapError> {
        let i = self.index_of(id)?;
        let bitmap = &self.bitmaps[i];
        if bitmap.busy || bitmap.successor.is_some() {
            return Err(BitmapError::Busy(bitmap.display_name()));
        }
        self.bitmaps.remove(i);
        Ok(())
    }
}

/// The arguments of `block-dirty-bitmap-add`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddBitmap {
    /// The new bitmap's name.
    pub name: String,
    /// Granularity in bytes; the node's default when `None`.
    pub granularity: Option<u64>,
    /// Store the bitmap in the image.
    pub persistent: bool,
    /// Create it disabled (not recording).
    pub disabled: bool,
    /// Whether a persistent bitmap is crash-safe, and its region size.
    pub intent: IntentChoice,
}

/// `x-crash-safe` and `x-intent-granularity` of `block-dirty-bitmap-add`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IntentChoice {
    /// Crash-safe with the default region size when persistent on a node that can.
    #[default]
    Default,
    /// Not crash-safe (`x-crash-safe: false`): stored at close only, as QEMU does.
    Off,
    /// Crash-safe with regions of this many bytes (`x-intent-granularity`).
    Region(u64),
}

/// A persistent bitmap found in the image when the node was opened.
#[derive(Debug)]
pub struct LoadedBitmap {
    /// Its name.
    pub name: String,
    /// Granularity in bytes.
    pub granularity: u32,
    /// Whether it records writes (the `auto` flag on disk).
    pub enabled: bool,
    /// Its bits; `None` when it was found in use on disk: it is then inconsistent.
    pub bits: Option<HBitmap>,
    /// log2 of its write-intent region size when it is crash-safe.
    pub crash_safe: Option<u8>,
}

/// A merge source: a bitmap on the target's node (`node: None`) or on another node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapRef {
    /// The node, or `None` for the target's node.
    pub node: Option<String>,
    /// The bitmap's name.
    pub name: String,
}

impl BitmapRef {
    /// A bitmap on the target's own node.
    pub fn local(name: &str) -> Self {
        BitmapRef { node: None, name: name.to_string() }
    }

    /// A bitmap on the node named `node`.
    pub fn on(node: &str, name: &str) -> Self {
        BitmapRef { node: Some(node.to_string()), name: name.to_string() }
    }
}

/// The bits of a bitmap before a clear or merge, kept so that a transaction can roll the
/// operation back ([`NodeBitmaps::restore`]) or drop it on commit.
#[derive(Debug)]
pub struct BitsBackup {
    id: BitmapId,
    bits: HBitmap,
}

/// A removal prepared inside a transaction: the stored copy is gone, the bitmap is busy
/// and will not be stored; [`NodeBitmaps::commit_remove`] releases it,
/// [`NodeBitmaps::abort_remove`] gives it back.
#[derive(Debug)]
#[must_use]
pub struct RemovePending {
    id: BitmapId,
}

/// The dirty bitmaps of one block node.
pub struct NodeBitmaps {
    node_name: String,
    cluster_size: Option<u64>,
    persistence: Option<Arc<dyn BitmapPersistence>>,
    lock_key: u64,
    inner: Mutex<Inner>,
    /// What every request asks, readable without the lock.
    summary: Summary,
    /// The write-intent log, when the driver keeps one (a writable qcow2 image).
    intent: Option<IntentLog>,
    /// One checkpoint at a time.
    checkpoint_lock: Mutex<()>,
    /// What is stored lags behind what a crash must recover (a crash-safe bitmap was
    /// added, enabled, disabled, merged into, handed over): a checkpoint is due.
    checkpoint_wanted: AtomicBool,
}

/// The facts the write path reads on every request, published under the lock each time
/// a holder releases it ([`Locked`]), so that a node without enabled bitmaps (most file
/// nodes) pays no lock per request. A value read is one the locked state had at some
/// point between the reader's start and end, which is all a lock would have given.
#[derive(Default)]
struct Summary {
    length: AtomicU64,
    enabled: AtomicUsize,
    readonly: AtomicBool,
    /// Crash-safe bitmaps that record writes: writes must be marked first.
    intent_active: AtomicUsize,
}

impl NodeBitmaps {
    /// Publishes the summary, and tells the intent log when the crash-safe bitmaps
    /// changed. Runs under the lock, each time it is released.
    fn publish(&self, inner: &mut Inner) {
        let s = &self.summary;
        s.length.store(inner.length, Ordering::SeqCst);
        let enabled = inner.bitmaps.iter().filter(|b| !b.disabled).count();
        s.enabled.store(enabled, Ordering::SeqCst);
        s.readonly.store(inner.bitmaps.iter().any(|b| b.readonly), Ordering::SeqCst);
        let Some(log) = &self.intent else { return };
        // As a checkpoint stores them (`crash_safe_copies`).
        let tracked = |b: &&DirtyBitmap| {
            b.persistent && !b.skip_store && !b.inconsistent && !b.readonly && b.name.is_some()
        };
        let mut same = true;
        let mut count = 0;
        for b in inner.bitmaps.iter().filter(tracked) {
            let Some(region) = b.crash_safe else { continue };
            let view = (b.id, inner.recording(b), region, b.bits.granularity() as u8);
            same &= inner.intent_view.get(count) == Some(&view);
            count += 1;
        }
        if same && count == inner.intent_view.len() {
            return;
        }
        let mut view = Vec::with_capacity(count);
        let mut specs = Vec::with_capacity(count);
        for b in inner.bitmaps.iter().filter(tracked) {
            let Some(region) = b.crash_safe else { continue };
            let active = inner.recording(b);
            view.push((b.id, active, region, b.bits.granularity() as u8));
            specs.push(TrackedBitmap {
                name: b.name.clone().expect("tracked bitmaps are named"),
                granularity_bits: b.bits.granularity() as u8,
                region_bits: region,
                active,
            });
        }
        log.update(&specs);
        s.intent_active.store(specs.iter().filter(|t| t.active).count(), Ordering::SeqCst);
        inner.intent_view = view;
        self.checkpoint_wanted.store(true, Ordering::SeqCst);
    }
}

/// The bitmap lock held: the state, and the summary published again when released.
pub(super) struct Locked<'a> {
    guard: MutexGuard<'a, Inner>,
    owner: &'a NodeBitmaps,
}

impl Deref for Locked<'_> {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.guard
    }
}

impl DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut Inner {
        &mut self.guard
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        // Still under the lock: the guard is released after this.
        self.owner.publish(&mut self.guard);
    }
}

impl std::fmt::Debug for NodeBitmaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeBitmaps").field("node", &self.node_name).finish_non_exhaustive()
    }
}

impl NodeBitmaps {
    /// The bitmaps of node `node_name`, `length` bytes long, whose driver reports
    /// `cluster_size` (for the default granularity) and stores persistent bitmaps through
    /// `persistence`, if it can.
    pub fn new(
        node_name: &str,
        length: u64,
        cluster_size: Option<u64>,
        persistence: Option<Arc<dyn BitmapPersistence>>,
    ) -> Self {
        let intent =
            persistence.as_ref().filter(|p| p.supports_intent()).map(|p| IntentLog::new(p.clone()));
        NodeBitmaps {
            node_name: node_name.to_string(),
            cluster_size,
            persistence,
            lock_key: NEXT_NODE_KEY.fetch_add(1, Ordering::Relaxed),
            inner: Mutex::new(Inner {
                length,
                bitmaps: Vec::new(),
                next_id: 1,
                intent_view: Vec::new(),
            }),
            summary: Summary { length: AtomicU64::new(length), ..Summary::default() },
            intent,
            checkpoint_lock: Mutex::new(()),
            checkpoint_wanted: AtomicBool::new(false),
        }
    }

    /// The node's name.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The length the bitmaps cover, in bytes.
    pub fn length(&self) -> u64 {
        self.summary.length.load(Ordering::SeqCst)
    }

    /// The granularity a bitmap gets when none is asked for.
    pub fn default_granularity(&self) -> u32 {
        default_granularity(self.cluster_size)
    }

    pub(super) fn lock(&self) -> Locked<'_> {
        // A panic while holding the lock cannot leave the list half-edited: every
        // operation validates before it mutates.
        let guard = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        Locked { guard, owner: self }
    }

    /// `block-dirty-bitmap-add`: checks in QEMU's order (empty name, granularity,
    /// persistence, duplicate, name length), then creates the bitmap, newest first.
    pub fn add(&self, request: &AddBitmap) -> Result<BitmapId, BitmapError> {
        if request.name.is_empty() {
            return Err(BitmapError::EmptyName);
        }
        let granularity = match request.granularity {
            Some(g) => check_granularity(g)?,
            None => self.default_granularity(),
        };
        let mut inner = self.lock();
        if request.persistent {
            let Some(persistence) = &self.persistence else {
                return Err(BitmapError::PersistenceUnsupported { node: self.node_name.clone() });
            };
            let existing: Vec<(&str, u32)> = inner
                .bitmaps
                .iter()
                .filter(|b| b.persistent)
                .filter_map(|b| Some((b.name.as_deref()?, b.granularity_bytes())))
                .collect();
            persistence.can_store(&request.name, granularity, &existing).map_err(|reason| {
                BitmapError::CannotMakePersistent {
                    name: request.name.clone(),
                    node: self.node_name.clone(),
                    reason,
                }
            })?;
        }
        if inner.index_by_name(&request.name).is_ok() {
            return Err(BitmapError::AlreadyExists(request.name.clone()));
        }
        if request.name.len() > MAX_NAME_LEN {
            return Err(BitmapError::NameTooLong(request.name.clone()));
        }
        let crash_safe = self.crash_safety(request, granularity)?;
        let id = inner.insert(Some(request.name.clone()), granularity, request.disabled)?;
        let bitmap = inner.get_mut(id)?;
        bitmap.persistent = request.persistent;
        bitmap.crash_safe = crash_safe;
        Ok(id)
    }

    /// The region bits a new bitmap gets: crash-safe by default when persistent on a
    /// node that keeps an intent log.
    fn crash_safety(
        &self,
        request: &AddBitmap,
        granularity: u32,
    ) -> Result<Option<u8>, BitmapError> {
        let granularity_bits = granularity.trailing_zeros() as u8;
        let invalid = |reason: String| BitmapError::InvalidIntent { reason };
        match request.intent {
            IntentChoice::Off => Ok(None),
            _ if !request.persistent => match request.intent {
                IntentChoice::Region(_) => {
                    Err(invalid("x-intent-granularity needs a persistent bitmap".into()))
                }
                _ => Ok(None),
            },
            _ if self.intent.is_none() => match request.intent {
                IntentChoice::Region(_) => Err(invalid(format!(
                    "node '{}' cannot keep a write-intent record",
                    self.node_name
                ))),
                _ => Ok(None),
            },
            IntentChoice::Default => Ok(Some(qcow2::intent::default_region_bits(granularity_bits))),
            IntentChoice::Region(bytes) => {
                qcow2::intent::check_region_size(bytes, granularity_bits).map(Some).map_err(invalid)
            }
        }
    }

    /// Adds a persistent bitmap loaded from the image (newest first, like every add, so
    /// loading in directory order lists them in reverse, as QEMU does). A bitmap found in
    /// use is inconsistent (disabled, no bits); on a read-only node every loaded bitmap
    /// is readonly.
    pub fn add_loaded(
        &self,
        loaded: LoadedBitmap,
        readonly: bool,
    ) -> Result<BitmapId, BitmapError> {
        let granularity = check_granularity(u64::from(loaded.granularity))?;
        let mut inner = self.lock();
        if inner.index_by_name(&loaded.name).is_ok() {
            return Err(BitmapError::AlreadyExists(loaded.name));
        }
        if let Some(bits) = &loaded.bits
            && (bits.size() != inner.length || bits.granularity() != granularity.trailing_zeros())
        {
            return Err(BitmapError::SizeMismatch { dest: inner.length, src: bits.size() });
        }
        let id = inner.insert(Some(loaded.name), granularity, !loaded.enabled)?;
        let bitmap = inner.get_mut(id)?;
        bitmap.persistent = true;
        bitmap.readonly = readonly;
        bitmap.crash_safe = loaded.crash_safe;
        match loaded.bits {
            Some(bits) => bitmap.bits = bits,
            None => {
                bitmap.inconsistent = true;
                bitmap.disabled = true;
            }
        }
        Ok(id)
    }

    /// Creates an anonymous (internal) bitmap, e.g. a backup's copy bitmap.
    pub fn add_anonymous(&self, granularity: u64, disabled: bool) -> Result<BitmapId, BitmapError> {
        let granularity = check_granularity(granularity)?;
        self.lock().insert(None, granularity, disabled)
    }

    /// Releases a bitmap by handle (anonymous bitmaps end this way). Refused while it is
    /// busy or has a successor.
    pub fn release(&self, id: BitmapId) -> Result<(), BitmapError> {
        self.lock().release(id)
    }

    /// The handle of the named bitmap.
    pub fn find(&self, name: &str) -> Option<BitmapId> {
        let inner = self.lock();
        inner.index_by_name(name).ok().map(|i| inner.bitmaps[i].id)
    }

    /// Looks up a named bitmap and runs `checks` on it, in QEMU's order.
    pub fn lookup(&self, name: &str, checks: Checks) -> Result<BitmapId, BitmapError> {
        let inner = self.lock();
        let i = inner.lookup(name, checks)?;
        Ok(inner.bitmaps[i].id)
    }

    /// `block-dirty-bitmap-remove`: BUSY and READONLY checks; a persistent bitmap is
    /// deleted from the image first, then released.
    pub fn remove(&self, name: &str) -> Result<(), BitmapError> {
        let pending = self.prepare_remove(name)?;
        self.commit_remove(pending)
    }

    /// The transaction's remove, prepare step: checks, deletes the stored copy now, and
    /// marks the bitmap busy and not to be stored.
    pub fn prepare_remove(&self, name: &str) -> Result<RemovePending, BitmapError> {
        // No checkpoint in between: it stores the bitmap and takes the intent log's
        // lock inside the image's, which the removal below takes the other way round.
        let _no_checkpoint = self.checkpoint_lock.lock().unwrap_or_else(PoisonError::into_inner);
        let mut inner = self.lock();
        let i = inner.lookup(name, Checks::REMOVE)?;
        let bitmap = &mut inner.bitmaps[i];
        if bitmap.persistent
            && !bitmap.skip_store
            && let Some(persistence) = &self.persistence
        {
            let remove = || persistence.remove_stored(name);
            let removed = match &self.intent {
                // Marks must never reach the clusters the removal frees.
                Some(log) if bitmap.crash_safe.is_some() => log.remove_stored(name, remove),
                _ => remove(),
            };
            if let Err(reason) = removed {
                if bitmap.crash_safe.is_some() {
                    // Its marks stopped: what is stored (if anything) no longer covers
                    // every write, and the next checkpoint drops its record's binding.
                    bitmap.inconsistent = true;
                    bitmap.disabled = true;
                    self.checkpoint_wanted.store(true, Ordering::SeqCst);
                }
                return Err(BitmapError::StoreUpdate { reason });
            }
        }
        bitmap.busy = true;
        bitmap.skip_store = true;
        Ok(RemovePending { id: bitmap.id })
    }

    /// Commits a prepared remove: the bitmap is released.
    pub fn commit_remove(&self, pending: RemovePending) -> Result<(), BitmapError> {
        let mut inner = self.lock();
        inner.get_mut(pending.id)?.busy = false;
        inner.release(pending.id)
    }

    /// Rolls a prepared remove back: the bitmap is usable again and will be stored.
    pub fn abort_remove(&self, pending: RemovePending) -> Result<(), BitmapError> {
        let mut inner = self.lock();
        let bitmap = inner.get_mut(pending.id)?;
        bitmap.busy = false;
        bitmap.skip_store = false;
        Ok(())
    }

    /// `block-dirty-bitmap-clear`: DEFAULT checks, then every bit is reset.
    pub fn clear(&self, name: &str) -> Result<(), BitmapError> {
        let mut inner = self.lock();
        let i = inner.lookup(name, Checks::DEFAULT)?;
        inner.bitmaps[i].bits.reset_all();
        // Not needed for safety (the stored copy is a superset), but a crash would
        // otherwise bring back every bit cleared.
        if inner.bitmaps[i].crash_safe.is_some() {
            self.checkpoint_wanted.store(true, Ordering::SeqCst);
        }
        Ok(())
    }

    /// The transaction's clear: like [`clear`](Self::clear), keeping the old bits.
    pub fn clear_with_backup(&self, name: &str) -> Result<BitsBackup, BitmapError> {
        let mut inner = self.lock();
        let i = inner.lookup(name, Checks::DEFAULT)?;
        let bitmap = &mut inner.bitmaps[i];
        let empty = HBitmap::new(bitmap.bits.size(), bitmap.bits.granularity())?;
        let old = std::mem::replace(&mut bitmap.bits, empty);
        if bitmap.crash_safe.is_some() {
            self.checkpoint_wanted.store(true, Ordering::SeqCst);
        }
        Ok(BitsBackup { id: bitmap.id, bits: old })
    }

    /// Puts back the bits saved by a clear or merge (a transaction's abort).
    pub fn restore(&self, backup: BitsBackup) -> Result<(), BitmapError> {
        // Bits come back that a checkpoint since may have dropped from the stored copy.
        self.checkpoint_wanted.store(true, Ordering::SeqCst);
        let mut inner = self.lock();
        inner.get_mut(backup.id)?.bits = backup.bits;
        Ok(())
    }

    /// `block-dirty-bitmap-enable`: ALLOW_RO checks. Returns whether it was enabled
    /// before, for a transaction's abort ([`set_enabled`](Self::set_enabled)).
    pub fn enable(&self, name: &str) -> Result<bool, BitmapError> {
        self.set_enabled_checked(name, true)
    }

    /// `block-dirty-bitmap-disable`: ALLOW_RO checks. Returns whether it was enabled
    /// before.
    pub fn disable(&self, name: &str) -> Result<bool, BitmapError> {
        self.set_enabled_checked(name, false)
    }

    fn set_enabled_checked(&self, name: &str, enabled: bool) -> Result<bool, BitmapError> {
        let mut inner = self.lock();
        let i = inner.lookup(name, Checks::ALLOW_RO)?;
        let bitmap = &mut inner.bitmaps[i];
        let was_enabled = !bitmap.disabled;
        bitmap.disabled = !enabled;
        Ok(was_enabled)
    }

    /// Sets the enabled state without checks (a transaction's rollback).
    pub fn set_enabled(&self, id: BitmapId, enabled: bool) -> Result<(), BitmapError> {
        self.lock().get_mut(id)?.disabled = !enabled;
        Ok(())
    }

    /// `block-dirty-bitmap-merge`: ORs `sources` into `target`, all or nothing. The
    /// target needs DEFAULT checks, each source ALLOW_RO and the target's length;
    /// granularities may differ (bits round outward). `resolve` finds the nodes that
    /// sources name. Errors come in QEMU's order: target, then each source in turn.
    pub fn merge(
        &self,
        target: &str,
        sources: &[BitmapRef],
        resolve: &dyn Fn(&str) -> Option<Arc<NodeBitmaps>>,
    ) -> Result<(), BitmapError> {
        self.merge_inner(target, sources, resolve, false).map(|_| ())
    }

    /// The transaction's merge: like [`merge`](Self::merge), keeping the target's old
    /// bits for [`restore`](Self::restore).
    pub fn merge_with_backup(
        &self,
        target: &str,
        sources: &[BitmapRef],
        resolve: &dyn Fn(&str) -> Option<Arc<NodeBitmaps>>,
    ) -> Result<BitsBackup, BitmapError> {
        self.merge_inner(target, sources, resolve, true)
            .map(|backup| backup.expect("a backup was asked for"))
    }

    fn merge_inner(
        &self,
        target: &str,
        sources: &[BitmapRef],
        resolve: &dyn Fn(&str) -> Option<Arc<NodeBitmaps>>,
        keep_backup: bool,
    ) -> Result<Option<BitsBackup>, BitmapError> {
        // The target gains bits that no write marked: the stored copy must catch up.
        self.checkpoint_wanted.store(true, Ordering::SeqCst);
        // Resolve other nodes before locking anything; a missing node is reported in
        // its turn below.
        let others: Vec<Option<Arc<NodeBitmaps>>> =
            sources.iter().map(|s| s.node.as_deref().and_then(resolve)).collect();
        let mut nodes: Vec<&NodeBitmaps> = vec![self];
        nodes.extend(others.iter().flatten().map(|n| &**n));
        nodes.sort_by_key(|n| n.lock_key);
        nodes.dedup_by_key(|n| n.lock_key);
        let mut guards: Vec<Locked<'_>> = nodes.iter().map(|n| n.lock()).collect();
        let slot = |node: &NodeBitmaps| nodes.iter().position(|n| n.lock_key == node.lock_key);
        let target_slot = slot(self).expect("the target's node is locked");

        let target_index = guards[target_slot].lookup(target, Checks::DEFAULT)?;
        let target_len = guards[target_slot].length;
        let mut plan = Vec::with_capacity(sources.len());
        for (source, node) in sources.iter().zip(&others) {
            let source_slot = match (&source.node, node) {
                (None, _) => target_slot,
                (Some(_), Some(node)) => slot(node).expect("every source node is locked"),
                (Some(name), None) => return Err(BitmapError::NodeNotFound(name.clone())),
            };
            let index = guards[source_slot].lookup(&source.name, Checks::ALLOW_RO)?;
            let src_len = guards[source_slot].bitmaps[index].bits.size();
            if src_len != target_len {
                return Err(BitmapError::SizeMismatch { dest: target_len, src: src_len });
            }
            plan.push((source_slot, index));
        }

        let backup = keep_backup.then(|| {
            let bitmap = &guards[target_slot].bitmaps[target_index];
            BitsBackup { id: bitmap.id, bits: bitmap.bits.clone() }
        });
        for (source_slot, index) in plan {
            if source_slot == target_slot {
                if index == target_index {
                    continue; // merging a bitmap into itself changes nothing
                }
                let bitmaps = &mut guards[target_slot].bitmaps;
                let (dst, src) = pair_mut(bitmaps, target_index, index);
                dst.bits.merge(&src.bits)?;
            } else {
                let (dst, src) = pair_mut(&mut guards, target_slot, source_slot);
                dst.bitmaps[target_index].bits.merge(&src.bitmaps[index].bits)?;
            }
        }
        Ok(backup)
    }

    /// The write hook: marks `[offset, offset + len)` dirty in every enabled bitmap of
    /// the node. Called for every finished write, write-zeroes and discard, whether it
    /// succeeded or not. Does not allocate.
    pub fn set_dirty(&self, offset: u64, len: u64) {
        self.set_dirty_inner(offset, len);
    }

    /// Before a write, write-zeroes or discard is issued: with crash-safe bitmaps
    /// recording, sets the range in the enabled bitmaps now and marks its regions
    /// durably ([`super::intent`]). An error fails the request: it must not reach the
    /// disk unrecorded.
    pub fn before_write(&self, offset: u64, len: u64) -> std::io::Result<()> {
        if self.summary.intent_active.load(Ordering::SeqCst) == 0 {
            return Ok(());
        }
        let Some(log) = &self.intent else { return Ok(()) };
        self.set_dirty_inner(offset, len);
        log.ensure(offset, len)
    }

    fn set_dirty_inner(&self, offset: u64, len: u64) {
        if self.summary.enabled.load(Ordering::SeqCst) == 0 {
            return;
        }
        let mut inner = self.lock();
        let end = offset.saturating_add(len).min(inner.length);
        if offset >= end {
            return;
        }
        for bitmap in inner.bitmaps.iter_mut().filter(|b| !b.disabled) {
            // In range after the clip above, so this cannot fail.
            let _ = bitmap.bits.set(offset, end - offset);
        }
    }

    /// Grows every bitmap to `new_length` bytes (new bits clean) when the node grew by a
    /// write past its end, as a file node grows under its format node. No checks: the
    /// node has already grown, and busy or frozen bitmaps must cover the new bytes too.
    /// A failed allocation leaves that bitmap at its old length and the node's bitmap
    /// length too, so the write is then recorded where the bitmaps reach.
    pub fn grow_to(&self, new_length: u64) {
        let mut inner = self.lock();
        if new_length <= inner.length {
            return;
        }
        let old_length = inner.length;
        // In place (a growing file grows a cluster at a time); on a failed allocation
        // the bitmaps already grown go back, which cannot fail.
        for i in 0..inner.bitmaps.len() {
            if inner.bitmaps[i].bits.truncate(new_length).is_err() {
                for bitmap in &mut inner.bitmaps[..i] {
                    let _ = bitmap.bits.truncate(old_length);
                }
                return;
            }
        }
        inner.length = new_length;
    }

    /// Whether a readonly bitmap exists; writes to the node must then fail with EPERM.
    pub fn has_readonly(&self) -> bool {
        self.summary.readonly.load(Ordering::SeqCst)
    }

    /// Whether any named bitmap exists.
    pub fn has_named(&self) -> bool {
        self.lock().bitmaps.iter().any(|b| b.name.is_some())
    }

    /// Resizes every bitmap to `new_length` bytes (growing adds clean bits, shrinking
    /// drops the bits past the end). Refused while any bitmap is busy or frozen, and on
    /// a node with persistent bitmaps under the rules of [`resize_with`](Self::resize_with).
    pub fn truncate(&self, new_length: u64) -> Result<(), BitmapError> {
        self.resize_with(new_length, || Ok(()))
    }

    /// Resizes the node: checks that its bitmaps allow it, runs `resize_node` (the
    /// driver's resize), and if that succeeds resizes every bitmap to `new_length`. The
    /// bitmap lock is held throughout, so no bitmap can become busy, be added at the old
    /// length or record a write between the check and the new length; `resize_node`
    /// must therefore not call back into these bitmaps.
    ///
    /// The checks, in QEMU's order: every bitmap stored in the image (directory order)
    /// must be in memory (`Cannot resize qcow2 with persistent bitmaps that were not
    /// loaded into memory`) and pass the DEFAULT checks (busy, readonly, inconsistent);
    /// then no bitmap may be busy or frozen. QEMU 10.0.2 asserts the latter and aborts
    /// after resizing the file; refusing before anything changes is the safe reading.
    /// When `resize_node` fails, the bitmaps are unchanged.
    pub fn resize_with<E: From<BitmapError>>(
        &self,
        new_length: u64,
        resize_node: impl FnOnce() -> Result<(), E>,
    ) -> Result<(), E> {
        let mut inner = self.lock();
        if let Some(persistence) = &self.persistence {
            let stored =
                persistence.stored_names().map_err(|reason| BitmapError::StoredList { reason })?;
            for name in stored {
                let i = inner.index_by_name(&name).map_err(|_| BitmapError::ResizeNotLoaded)?;
                inner.bitmaps[i].check(Checks::DEFAULT)?;
            }
        }
        if let Some(b) = inner.bitmaps.iter().find(|b| b.busy || b.successor.is_some()) {
            return Err(BitmapError::Busy(b.display_name()).into());
        }
        // Size every bitmap before changing anything, so that a failure (allocation,
        // size limits) leaves the node and all bitmaps as they were.
        let mut resized = Vec::with_capacity(inner.bitmaps.len());
        for bitmap in &inner.bitmaps {
            let mut bits = bitmap.bits.clone();
            bits.truncate(new_length).map_err(BitmapError::from)?;
            resized.push(bits);
        }
        resize_node()?;
        for (bitmap, bits) in inner.bitmaps.iter_mut().zip(resized) {
            bitmap.bits = bits;
        }
        inner.length = new_length;
        Ok(())
    }

    /// The query records of every bitmap, anonymous ones included, newest first.
    pub fn query(&self) -> Vec<BitmapInfo> {
        let inner = self.lock();
        inner.bitmaps.iter().map(|b| inner.info_of(b)).collect()
    }

    /// The query record of one bitmap.
    pub fn info(&self, id: BitmapId) -> Result<BitmapInfo, BitmapError> {
        let inner = self.lock();
        Ok(inner.info_of(inner.get(id)?))
    }

    /// `x-debug-block-dirty-bitmap-sha256`: no state checks.
    pub fn sha256(&self, name: &str) -> Result<String, BitmapError> {
        let inner = self.lock();
        let i = inner.lookup(name, Checks::NONE)?;
        Ok(inner.bitmaps[i].bits.sha256_hex())
    }

    /// Runs `f` on a bitmap's bits (e.g. to walk a copy bitmap or store a bitmap).
    pub fn with_bits<R>(
        &self,
        id: BitmapId,
        f: impl FnOnce(&HBitmap) -> R,
    ) -> Result<R, BitmapError> {
        Ok(f(&self.lock().get(id)?.bits))
    }

    /// Runs `f` on a bitmap's bits for changes (e.g. a backup clearing copied clusters,
    /// a loader filling a bitmap from the image). No checks: for internal users.
    pub fn with_bits_mut<R>(
        &self,
        id: BitmapId,
        f: impl FnOnce(&mut HBitmap) -> R,
    ) -> Result<R, BitmapError> {
        Ok(f(&mut self.lock().get_mut(id)?.bits))
    }

    /// Marks a bitmap busy (an export, a job) or not.
    pub fn set_busy(&self, id: BitmapId, busy: bool) -> Result<(), BitmapError> {
        self.lock().get_mut(id)?.busy = busy;
        Ok(())
    }

    /// Marks a bitmap readonly (loaded from a read-only node) or not.
    pub fn set_readonly(&self, id: BitmapId, readonly: bool) -> Result<(), BitmapError> {
        self.lock().get_mut(id)?.readonly = readonly;
        Ok(())
    }

    /// Marks a bitmap to be stored in the image, or not.
    pub fn set_persistent(&self, id: BitmapId, persistent: bool) -> Result<(), BitmapError> {
        self.lock().get_mut(id)?.persistent = persistent;
        Ok(())
    }

    /// Marks a bitmap not to be stored at the next store (migration, pending remove).
    pub fn set_skip_store(&self, id: BitmapId, skip: bool) -> Result<(), BitmapError> {
        self.lock().get_mut(id)?.skip_store = skip;
        Ok(())
    }

    /// Marks a persistent bitmap inconsistent (found in use on disk): it is disabled and
    /// only removal works on it. A transient bitmap cannot be inconsistent.
    pub fn set_inconsistent(&self, id: BitmapId) -> Result<(), BitmapError> {
        let mut inner = self.lock();
        let bitmap = inner.get_mut(id)?;
        debug_assert!(bitmap.persistent, "only persistent bitmaps can be inconsistent");
        bitmap.persistent = true;
        bitmap.inconsistent = true;
        bitmap.disabled = true;
        Ok(())
    }

    /// Stores the persistent bitmaps in the image (QEMU does this at close and when a
    /// node becomes read-only): every persistent bitmap that is not skipped, not
    /// inconsistent and not readonly. A bitmap frozen by a backup is stored with its
    /// successor's bits too, so that no write recorded so far is lost. Returns how many
    /// were stored.
    pub fn store_persistent(&self) -> Result<usize, BitmapError> {
        let Some(persistence) = &self.persistence else { return Ok(0) };
        let inner = self.lock();
        let mut unions = Vec::new();
        for b in inner.bitmaps.iter().filter(|b| b.persistent) {
            let Some(successor) = b.successor else { continue };
            let mut union = b.bits.clone();
            union.merge(&inner.get(successor)?.bits)?;
            unions.push((b.id, union));
        }
        let list: Vec<BitmapToStore<'_>> = inner
            .bitmaps
            .iter()
            .filter(|b| b.persistent && !b.skip_store && !b.inconsistent && !b.readonly)
            .filter_map(|b| {
                let bits = unions.iter().find(|(id, _)| *id == b.id).map_or(&b.bits, |(_, u)| u);
                Some(BitmapToStore {
                    name: b.name.as_deref()?,
                    granularity: b.granularity_bytes(),
                    // A frozen bitmap is stored enabled as it was before the freeze.
                    enabled: inner.recording(b),
                    bits,
                    form: StoreForm::Closed,
                    crash_safe: b.crash_safe,
                })
            })
            .collect();
        match &self.intent {
            // Marks go to the open tables until the header switches to the closed ones.
            Some(log) if !list.is_empty() => {
                let mut hooks = LogHooks { log, tables: Vec::new() };
                persistence.checkpoint(&list, &mut hooks)
            }
            _ => persistence.store(&list),
        }
        .map_err(|reason| BitmapError::Store { node: self.node_name.clone(), reason })?;
        Ok(list.len())
    }

    /// A checkpoint of the crash-safe bitmaps ([`super::intent`]): each is stored
    /// again, open (in use, every data cluster allocated), with its successor's bits,
    /// and the marks made so far are cleared. Writes go on meanwhile; this takes the
    /// bitmap lock only to copy the bitmaps. Does nothing without crash-safe bitmaps.
    pub fn checkpoint(&self) -> Result<(), BitmapError> {
        let (Some(log), Some(persistence)) = (&self.intent, &self.persistence) else {
            return Ok(());
        };
        let _one = self.checkpoint_lock.lock().unwrap_or_else(PoisonError::into_inner);
        self.checkpoint_wanted.store(false, Ordering::SeqCst);
        log.begin();
        let copies = self.crash_safe_copies()?;
        if copies.is_empty() {
            return Ok(());
        }
        let list: Vec<BitmapToStore<'_>> = copies
            .iter()
            .map(|(name, enabled, region, bits)| BitmapToStore {
                name,
                granularity: 1 << bits.granularity(),
                enabled: *enabled,
                bits,
                form: StoreForm::Open,
                crash_safe: Some(*region),
            })
            .collect();
        let mut hooks = LogHooks { log, tables: Vec::new() };
        persistence.checkpoint(&list, &mut hooks).map_err(|reason| {
            log.abort(&hooks.tables);
            self.checkpoint_wanted.store(true, Ordering::SeqCst);
            BitmapError::Store { node: self.node_name.clone(), reason }
        })
    }

    /// Runs a checkpoint if one is due or a region was marked since the last one.
    pub fn checkpoint_if_marked(&self) -> Result<(), BitmapError> {
        let marked = self.intent.as_ref().is_some_and(IntentLog::any_marked);
        if marked || self.checkpoint_wanted.load(Ordering::SeqCst) {
            self.checkpoint()
        } else {
            Ok(())
        }
    }

    /// Runs a checkpoint if one is due ([`checkpoint`](Self::checkpoint)).
    pub fn checkpoint_if_wanted(&self) -> Result<(), BitmapError> {
        if self.checkpoint_wanted.load(Ordering::SeqCst) { self.checkpoint() } else { Ok(()) }
    }

    /// Copies of the crash-safe bitmaps to store: (name, recording, region bits,
    /// bits with the successor's).
    fn crash_safe_copies(&self) -> Result<Vec<(String, bool, u8, HBitmap)>, BitmapError> {
        let inner = self.lock();
        let mut out = Vec::new();
        for b in &inner.bitmaps {
            let (Some(name), Some(region)) = (&b.name, b.crash_safe) else { continue };
            if !b.persistent || b.skip_store || b.inconsistent || b.readonly {
                continue;
            }
            let mut bits = b.bits.clone();
            if let Some(successor) = b.successor {
                bits.merge(&inner.get(successor)?.bits)?;
            }
            out.push((name.clone(), inner.recording(b), region, bits));
        }
        Ok(out)
    }

    /// The crash-safe bitmaps: name, region size in bytes, and whether marks reach a
    /// stored table yet.
    pub fn crash_safe_bitmaps(&self) -> Vec<(String, u64, bool)> {
        self.intent.as_ref().map_or_else(Vec::new, |log| {
            log.tracked()
                .into_iter()
                .map(|(t, recorded)| (t.name, 1u64 << t.region_bits, recorded))
                .collect()
        })
    }

    /// Whether a bitmap is to be stored at the next store: persistent and not skipped.
    pub fn will_store(&self, id: BitmapId) -> Result<bool, BitmapError> {
        let inner = self.lock();
        let bitmap = inner.get(id)?;
        Ok(bitmap.persistent && !bitmap.skip_store)
    }
}

/// A store's calls, passed on to the intent log.
struct LogHooks<'a> {
    log: &'a IntentLog,
    tables: Vec<(String, Vec<u64>)>,
}

impl CheckpointHooks for LogHooks<'_> {
    fn written(&mut self, tables: &[(String, Vec<u64>)]) -> Result<(), String> {
        self.tables = tables.to_vec();
        self.log.written(tables)
    }

    fn switched(&mut self) {
        self.log.switched();
        // A closed store leaves no table to mark: later writes must not reach freed
        // clusters (there are none after a close; this makes sure).
        if self.tables.is_empty() {
            self.log.detach();
        }
    }
}

/// A mutable and a shared reference to two different elements.
fn pair_mut<T>(items: &mut [T], a: usize, b: usize) -> (&mut T, &T) {
    assert_ne!(a, b);
    if a < b {
        let (left, right) = items.split_at_mut(b);
        (&mut left[a], &right[0])
    } else {
        let (left, right) = items.split_at_mut(a);
        (&mut right[0], &left[b])
    }
}
