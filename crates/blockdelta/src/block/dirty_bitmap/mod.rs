//! The dirty-bitmap manager: named and anonymous bitmaps on a block node, their flags and
//! permission checks, and the successor protocol that backups use.
//!
//! Each node owns one [`NodeBitmaps`]: its bitmaps, newest first, behind one lock that
//! the write hook ([`NodeBitmaps::set_dirty`]) takes briefly. Named bitmaps are what
//! users see and address as (node, name); anonymous ones are internal (successors, a
//! backup's copy bitmap) and are addressed by [`BitmapId`]. The rules, error texts and
//! settlement tables are QEMU 10.0.2's (`docs/qemu-bitmaps-spec.md`, sections 2 and 5.4).

mod error;
mod intent;
mod node_bitmaps;
mod successor;

pub use error::BitmapError;
pub use node_bitmaps::{
    AddBitmap, BitmapRef, BitsBackup, IntentChoice, LoadedBitmap, NodeBitmaps, RemovePending,
};
pub use successor::{BitmapSyncMode, JobOutcome};

/// Longest bitmap name, in bytes (QEMU's `BDRV_BITMAP_MAX_NAME_SIZE`).
pub const MAX_NAME_LEN: usize = 1023;

/// Smallest granularity in bytes (one sector).
pub const MIN_GRANULARITY: u64 = 512;

/// Largest granularity in bytes (QMP's `uint32`, power of two).
pub const MAX_GRANULARITY: u64 = 1 << 31;

/// A handle to one bitmap of a node, stable for the bitmap's life (names can move: a
/// successor takes its parent's name when the parent abdicates).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BitmapId(u64);

/// Which permission checks an operation runs, in QEMU's order: busy, readonly,
/// inconsistent (the first that fails decides the error).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checks {
    /// Refuse a busy bitmap.
    pub busy: bool,
    /// Refuse a readonly bitmap.
    pub readonly: bool,
    /// Refuse an inconsistent bitmap.
    pub inconsistent: bool,
}

impl Checks {
    /// Everything (QEMU's `BDRV_BITMAP_DEFAULT`): clear, merge target, backup.
    pub const DEFAULT: Checks = Checks { busy: true, readonly: true, inconsistent: true };
    /// Busy and inconsistent (`BDRV_BITMAP_ALLOW_RO`): enable, disable, merge source.
    pub const ALLOW_RO: Checks = Checks { busy: true, readonly: false, inconsistent: true };
    /// Busy and readonly: remove (the only way out of the inconsistent state).
    pub const REMOVE: Checks = Checks { busy: true, readonly: true, inconsistent: false };
    /// No check (`x-debug-block-dirty-bitmap-sha256`).
    pub const NONE: Checks = Checks { busy: false, readonly: false, inconsistent: false };
}

/// A bitmap as `query-named-block-nodes` reports it (QEMU's `BlockDirtyInfo`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapInfo {
    /// The name; `None` for an anonymous (internal) bitmap.
    pub name: Option<String>,
    /// Dirty bytes: set bits times granularity (not clipped to the node's length).
    pub count: u64,
    /// Granularity in bytes.
    pub granularity: u32,
    /// Whether writes are recorded: enabled, or frozen with an enabled successor.
    pub recording: bool,
    /// In use by an operation.
    pub busy: bool,
    /// To be stored in the image.
    pub persistent: bool,
    /// Found in use on disk at load; reported only when true.
    pub inconsistent: bool,
}

/// The default granularity for a node: its cluster size clamped to [4 KiB, 64 KiB], or
/// 64 KiB when the node has no cluster size (raw, file).
pub fn default_granularity(cluster_size: Option<u64>) -> u32 {
    match cluster_size {
        Some(size) if size > 0 => size.clamp(4096, 65536) as u32,
        _ => 65536,
    }
}

/// Checks a granularity in bytes: a power of two, at least 512 and at most 2^31.
pub fn check_granularity(granularity: u64) -> Result<u32, BitmapError> {
    if !(MIN_GRANULARITY..=MAX_GRANULARITY).contains(&granularity) || !granularity.is_power_of_two()
    {
        return Err(BitmapError::InvalidGranularity { granularity });
    }
    Ok(granularity as u32)
}

/// A persistent bitmap handed to the driver to store in the image.
#[derive(Debug)]
pub struct BitmapToStore<'a> {
    /// Its name.
    pub name: &'a str,
    /// Granularity in bytes.
    pub granularity: u32,
    /// Whether it records writes (stored as the `auto` flag).
    pub enabled: bool,
    /// Its bits.
    pub bits: &'a hbitmap::HBitmap,
    /// How it is stored.
    pub form: StoreForm,
    /// log2 of its write-intent region size when it is crash-safe (`None`: not).
    pub crash_safe: Option<u8>,
}

/// How a persistent bitmap is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreForm {
    /// As at a clean close (QEMU's form).
    Closed,
    /// Crash-safe while the node is open: in use, ready for write-intent marks.
    Open,
}

/// A checkpoint's calls from the store (see `intent`'s module documentation).
pub trait CheckpointHooks {
    /// The new data clusters of the open-form bitmaps (name, clusters in table order)
    /// are written, not yet live: marks must go there too from now on.
    fn written(&mut self, tables: &[(String, Vec<u64>)]) -> Result<(), String>;
    /// The new clusters are live; the old ones are freed next.
    fn switched(&mut self);
}

/// What a node's driver does for persistent bitmaps (qcow2 implements it). Nodes
/// without one refuse persistent bitmaps.
pub trait BitmapPersistence: Send + Sync {
    /// Whether a new persistent bitmap `name` of `granularity` bytes could be stored,
    /// given the node's persistent bitmaps in memory (`existing`, name and granularity).
    /// `Err` carries the driver's reason, e.g. `Cannot store dirty bitmaps in qcow2 v2
    /// files`.
    fn can_store(
        &self,
        name: &str,
        granularity: u32,
        existing: &[(&str, u32)],
    ) -> Result<(), String>;

    /// Deletes the stored copy of bitmap `name` from the image now.
    fn remove_stored(&self, name: &str) -> Result<(), String>;

    /// Writes `bitmaps` into the image (entries of the image not named here are kept).
    fn store(&self, bitmaps: &[BitmapToStore<'_>]) -> Result<(), String>;

    /// The names of the bitmaps stored in the image, in directory order. Before a
    /// resize each must be in memory, since only those are resized (QEMU's qcow2 rule).
    fn stored_names(&self) -> Result<Vec<String>, String> {
        Ok(Vec::new())
    }

    /// Whether the driver keeps a write-intent record (crash-safe bitmaps).
    fn supports_intent(&self) -> bool {
        false
    }

    /// Stores `bitmaps` (open or closed form), calling `hooks` on the way.
    fn checkpoint(
        &self,
        bitmaps: &[BitmapToStore<'_>],
        hooks: &mut dyn CheckpointHooks,
    ) -> Result<(), String> {
        let _ = hooks;
        self.store(bitmaps)
    }

    /// Marks `regions` of a bitmap whose open-form data clusters are `table` (not
    /// durable until [`sync_marks`](Self::sync_marks)).
    fn write_marks(
        &self,
        table: &[u64],
        granularity_bits: u8,
        region_bits: u8,
        regions: &[u64],
    ) -> Result<(), String> {
        let _ = (table, granularity_bits, region_bits, regions);
        Err("this driver keeps no write-intent record".into())
    }

    /// Makes the marks written so far durable.
    fn sync_marks(&self) -> Result<(), String> {
        Ok(())
    }
}
