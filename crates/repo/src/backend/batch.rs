//! Creating many objects with one flush: the [`Batch`] contract, and the buffered batch
//! of backends that have nothing cheaper.

use std::sync::Mutex;

use super::{Backend, Created};
use crate::Result;

/// Objects being created together. [`add`](Batch::add) writes an object that nobody
/// sees yet; [`publish`](Batch::publish) makes the contents of every object added so
/// far durable, then gives each its name (unless one exists: that object is left as it
/// is and renewed, as [`Backend::create`] does). A batch dropped before it is published
/// leaves nothing behind. Several threads may add at once.
pub trait Batch: Send + Sync {
    /// Writes `data` to become object `key`.
    fn add(&self, key: &str, data: &[u8]) -> Result<()>;

    /// Objects and bytes added and not yet published.
    fn pending(&self) -> (usize, u64);

    /// Publishes everything added so far (see [`Batch`]); returns each key with what
    /// happened, in no particular order. Names are durable after the backend's next
    /// [`sync`](Backend::sync). On an error some objects may have been published.
    fn publish(&self) -> Result<Vec<(String, Created)>>;
}

/// A batch that keeps its objects in memory and publishes them with
/// [`Backend::create`], one by one.
pub struct BufferedBatch<'b> {
    backend: &'b dyn Backend,
    objects: Mutex<Buffered>,
}

/// The objects of a [`BufferedBatch`] and their total length.
#[derive(Default)]
struct Buffered(Vec<(String, Vec<u8>)>, u64);

impl<'b> BufferedBatch<'b> {
    /// An empty batch of `backend`.
    pub fn new(backend: &'b dyn Backend) -> BufferedBatch<'b> {
        BufferedBatch { backend, objects: Mutex::new(Buffered::default()) }
    }
}

impl Batch for BufferedBatch<'_> {
    fn add(&self, key: &str, data: &[u8]) -> Result<()> {
        if !super::valid_key(key) {
            return Err(crate::Error::Invalid(format!("invalid object key '{key}'")));
        }
        let mut objects = self.objects.lock().unwrap_or_else(|e| e.into_inner());
        objects.0.push((key.to_owned(), data.to_vec()));
        objects.1 += data.len() as u64;
        Ok(())
    }

    fn pending(&self) -> (usize, u64) {
        let objects = self.objects.lock().unwrap_or_else(|e| e.into_inner());
        (objects.0.len(), objects.1)
    }

    fn publish(&self) -> Result<Vec<(String, Created)>> {
        let taken = std::mem::take(&mut *self.objects.lock().unwrap_or_else(|e| e.into_inner()));
        let mut out = Vec::with_capacity(taken.0.len());
        for (key, data) in taken.0 {
            let created = self.backend.create(&key, &data)?;
            out.push((key, created));
        }
        Ok(out)
    }
}
