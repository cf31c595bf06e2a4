//! The successor protocol: freeze a bitmap while a backup runs, then hand its name to the
//! successor (abdicate) or merge the successor back (reclaim), and the backup job's
//! settlement table built on them (QEMU 10.0.2, spec sections 2.5 and 5.4).

use hbitmap::HBitmap;

use super::{BitmapError, BitmapId, NodeBitmaps};

/// A backup's `bitmap-mode`: what happens to the sync bitmap when the job ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BitmapSyncMode {
    /// `on-success` (what `sync=incremental` means): the bitmap is cleared of what the
    /// backup copied only if the job succeeds.
    OnSuccess,
    /// `never`: the bitmap keeps every bit; it is a read-only manifest for the job.
    Never,
    /// `always`: the bitmap is synchronised to the backup even when the job fails,
    /// keeping the clusters that were not copied.
    Always,
}

impl BitmapSyncMode {
    /// QMP's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            BitmapSyncMode::OnSuccess => "on-success",
            BitmapSyncMode::Never => "never",
            BitmapSyncMode::Always => "always",
        }
    }
}

/// How a job ended, for settlement: commit or abort.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobOutcome {
    /// The job succeeded and is being committed.
    Success,
    /// The job failed or was cancelled (also while pending) and is being aborted.
    Failure,
}

impl NodeBitmaps {
    /// Freezes a bitmap: an anonymous successor with the same granularity takes over
    /// recording (enabled exactly when the parent was); the parent becomes disabled and
    /// busy, keeping its name, persistence and bits. Returns the successor.
    pub fn create_successor(&self, parent: BitmapId) -> Result<BitmapId, BitmapError> {
        let mut inner = self.lock();
        let bitmap = inner.get(parent)?;
        if bitmap.busy {
            return Err(BitmapError::Busy(bitmap.display_name()));
        }
        if bitmap.successor.is_some() {
            return Err(BitmapError::HasSuccessor);
        }
        let granularity = bitmap.granularity_bytes();
        let was_disabled = bitmap.disabled;
        let successor = inner.insert(None, granularity, was_disabled)?;
        let bitmap = inner.get_mut(parent)?;
        bitmap.successor = Some(successor);
        bitmap.disabled = true;
        bitmap.busy = true;
        Ok(successor)
    }

    /// Turns a frozen bitmap's successor on (used when migrating a bitmap).
    pub fn enable_successor(&self, parent: BitmapId) -> Result<(), BitmapError> {
        let mut inner = self.lock();
        let successor = inner.get(parent)?.successor.ok_or(BitmapError::NoSuccessorToAbdicate)?;
        inner.get_mut(successor)?.disabled = false;
        Ok(())
    }

    /// Success path: the successor takes the parent's name and persistence (and keeps
    /// its own enabled state, the parent's original one); the parent is released.
    /// Returns the successor, now the user's bitmap.
    pub fn abdicate(&self, parent: BitmapId) -> Result<BitmapId, BitmapError> {
        let mut inner = self.lock();
        let bitmap = inner.get_mut(parent)?;
        let successor = bitmap.successor.take().ok_or(BitmapError::NoSuccessorToAbdicate)?;
        let name = bitmap.name.take();
        let persistent = std::mem::take(&mut bitmap.persistent);
        bitmap.busy = false;
        let heir = inner.get_mut(successor)?;
        heir.name = name;
        heir.persistent = persistent;
        inner.release(parent)?;
        Ok(successor)
    }

    /// Failure path: the successor's bits are ORed into the parent, the parent gets the
    /// successor's enabled state back and is no longer busy, and the successor is
    /// released. Nothing recorded before or during the job is lost.
    pub fn reclaim(&self, parent: BitmapId) -> Result<BitmapId, BitmapError> {
        let mut inner = self.lock();
        let successor_id = inner.get(parent)?.successor.ok_or(BitmapError::NoSuccessorToReclaim)?;
        let successor_index = inner.index_of(successor_id)?;
        let successor = inner.bitmaps.remove(successor_index);
        let bitmap = inner.get_mut(parent)?;
        if let Err(e) = bitmap.bits.merge(&successor.bits) {
            // Cannot happen (same length); keep the successor rather than lose its bits.
            inner.bitmaps.insert(successor_index, successor);
            return Err(e.into());
        }
        bitmap.disabled = successor.disabled;
        bitmap.busy = false;
        bitmap.successor = None;
        Ok(parent)
    }

    /// Settles a backup's sync bitmap when the job commits or aborts:
    ///
    /// | mode         | success   | failure                                        |
    /// |--------------|-----------|------------------------------------------------|
    /// | `on-success` | abdicate  | reclaim                                        |
    /// | `never`      | reclaim   | reclaim                                        |
    /// | `always`     | abdicate  | abdicate, then merge the clusters not copied   |
    ///
    /// `uncopied` is the job's copy bitmap (the clusters still to copy); only `always`
    /// on failure uses it, and `None` means nothing was left. Returns the bitmap that
    /// now carries the name.
    pub fn settle_backup_bitmap(
        &self,
        parent: BitmapId,
        mode: BitmapSyncMode,
        outcome: JobOutcome,
        uncopied: Option<&HBitmap>,
    ) -> Result<BitmapId, BitmapError> {
        match (mode, outcome) {
            (BitmapSyncMode::OnSuccess | BitmapSyncMode::Always, JobOutcome::Success) => {
                self.abdicate(parent)
            }
            (BitmapSyncMode::OnSuccess | BitmapSyncMode::Never, _) => self.reclaim(parent),
            (BitmapSyncMode::Always, JobOutcome::Failure) => {
                let heir = self.abdicate(parent)?;
                if let Some(uncopied) = uncopied {
                    self.with_bits_mut(heir, |bits| bits.merge(uncopied))??;
                }
                Ok(heir)
            }
        }
    }
}
