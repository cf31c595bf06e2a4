//! An in-memory backend that can simulate a power cut, for crash tests.
//!
//! It keeps two states: what a reader sees now, and what would survive a power cut
//! (the content of every created object, but only the names made durable by
//! [`sync`](Backend::sync)). [`MemoryBackend::cut_after`] makes every operation after the
//! next `n` changes fail, as if the machine had stopped there, and
//! [`MemoryBackend::after_power_cut`] gives the state a restarted machine finds, losing
//! or keeping the changes that were not synced as the [`CutMode`] says.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::SystemTime;

use super::{
    Backend, Batch, BufferedBatch, Created, LockGuard, LockMode, LockWait, ObjectInfo, valid_key,
};
use crate::error::corrupt;
use crate::{Error, Result};

/// Which unsynced changes (created names, deletions) survive a power cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutMode {
    /// None: the state of the last sync.
    LoseUnsynced,
    /// All of them: as if everything had reached the disk.
    KeepUnsynced,
    /// Every other one, in key order (a mix of both).
    KeepEveryOther,
}

#[derive(Debug, Clone)]
struct Object {
    data: Arc<Vec<u8>>,
    modified: SystemTime,
}

#[derive(Debug, Default)]
struct State {
    now: BTreeMap<String, Object>,
    durable: BTreeMap<String, Object>,
}

#[derive(Debug, Default)]
struct Locks {
    held: Mutex<HashMap<String, (u32, bool)>>,
    freed: Condvar,
}

#[derive(Debug)]
struct MemoryLock {
    locks: Arc<Locks>,
    name: String,
    mode: LockMode,
}

impl LockGuard for MemoryLock {}

impl Drop for MemoryLock {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = held.get_mut(&self.name) {
            match self.mode {
                LockMode::Shared => entry.0 = entry.0.saturating_sub(1),
                LockMode::Exclusive => entry.1 = false,
            }
            if *entry == (0, false) {
                held.remove(&self.name);
            }
        }
        self.locks.freed.notify_all();
    }
}

/// Objects in memory.
#[derive(Debug, Default)]
pub struct MemoryBackend {
    state: Mutex<State>,
    locks: Arc<Locks>,
    /// Changes left before the simulated power cut (`u64::MAX`: none planned).
    budget: AtomicU64,
    changes: AtomicU64,
}

impl MemoryBackend {
    /// An empty backend.
    pub fn new() -> MemoryBackend {
        MemoryBackend { budget: AtomicU64::new(u64::MAX), ..MemoryBackend::default() }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// After `n` more changes (creates, deletes, touches, syncs), every operation fails
    /// as if the power had gone.
    pub fn cut_after(&self, n: u64) {
        self.budget.store(n, Ordering::SeqCst);
    }

    /// Changes made so far (to choose cut points).
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::SeqCst)
    }

    /// The state a machine finds after a power cut now: a new backend.
    pub fn after_power_cut(&self, mode: CutMode) -> MemoryBackend {
        let st = self.state();
        let mut survived = st.durable.clone();
        let mut pending: Vec<(&String, Option<&Object>)> = Vec::new();
        for (k, o) in &st.now {
            if !st.durable.contains_key(k) {
                pending.push((k, Some(o)));
            }
        }
        for k in st.durable.keys() {
            if !st.now.contains_key(k) {
                pending.push((k, None));
            }
        }
        pending.sort_by(|a, b| a.0.cmp(b.0));
        for (i, (k, o)) in pending.into_iter().enumerate() {
            let keep = match mode {
                CutMode::LoseUnsynced => false,
                CutMode::KeepUnsynced => true,
                CutMode::KeepEveryOther => i % 2 == 0,
            };
            if keep {
                match o {
                    Some(o) => survived.insert(k.clone(), o.clone()),
                    None => survived.remove(k),
                };
            }
        }
        let backend = MemoryBackend::new();
        {
            let mut new = backend.state();
            new.now = survived.clone();
            new.durable = survived;
        }
        backend
    }

    /// Replaces the bytes of `key` (a test damaging an object); `false` when absent.
    pub fn tamper(&self, key: &str, f: impl FnOnce(&mut Vec<u8>)) -> bool {
        let mut st = self.state();
        let Some(o) = st.now.get_mut(key) else { return false };
        let mut data = (*o.data).clone();
        f(&mut data);
        o.data = Arc::new(data);
        let o = o.clone();
        if st.durable.contains_key(key) {
            st.durable.insert(key.to_owned(), o);
        }
        true
    }

    /// Spends one change of the budget, or fails when the power is gone.
    fn change(&self) -> Result<()> {
        let ok = self
            .budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| match b {
                0 => None,
                u64::MAX => Some(u64::MAX),
                b => Some(b - 1),
            })
            .is_ok();
        if !ok {
            return Err(power_gone());
        }
        self.changes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn alive(&self) -> Result<()> {
        if self.budget.load(Ordering::SeqCst) == 0 { Err(power_gone()) } else { Ok(()) }
    }
}

fn power_gone() -> Error {
    Error::Io {
        object: "memory backend".into(),
        action: "any operation",
        error: io::Error::other("the power is cut"),
    }
}

fn check(key: &str) -> Result<()> {
    if valid_key(key) { Ok(()) } else { Err(Error::Invalid(format!("invalid object key '{key}'"))) }
}

impl Backend for MemoryBackend {
    fn location(&self) -> String {
        "memory".into()
    }

    fn read(&self, key: &str, limit: u64) -> Result<Vec<u8>> {
        check(key)?;
        self.alive()?;
        let st = self.state();
        let o = st.now.get(key).ok_or_else(|| Error::Missing { object: key.to_owned() })?;
        if o.data.len() as u64 > limit {
            return Err(corrupt(
                key,
                format!("{} bytes, more than the {limit} it can have", o.data.len()),
            ));
        }
        Ok((*o.data).clone())
    }

    fn read_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        check(key)?;
        self.alive()?;
        let st = self.state();
        let o = st.now.get(key).ok_or_else(|| Error::Missing { object: key.to_owned() })?;
        let start = (offset.min(o.data.len() as u64)) as usize;
        let end = (start as u64 + len).min(o.data.len() as u64) as usize;
        Ok(o.data[start..end].to_vec())
    }

    fn create(&self, key: &str, data: &[u8]) -> Result<Created> {
        check(key)?;
        self.change()?;
        let mut st = self.state();
        let now = SystemTime::now();
        if let Some(o) = st.now.get_mut(key) {
            o.modified = now;
            return Ok(Created::Existed);
        }
        st.now.insert(key.to_owned(), Object { data: Arc::new(data.to_vec()), modified: now });
        Ok(Created::New)
    }

    fn batch(&self) -> Box<dyn Batch + '_> {
        Box::new(BufferedBatch::new(self))
    }

    fn delete(&self, key: &str) -> Result<bool> {
        check(key)?;
        self.change()?;
        Ok(self.state().now.remove(key).is_some())
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        self.alive()?;
        let st = self.state();
        let want = if prefix.is_empty() { String::new() } else { format!("{prefix}/") };
        Ok(st
            .now
            .iter()
            .filter(|(k, _)| k.starts_with(&want))
            .map(|(k, o)| ObjectInfo {
                key: k.clone(),
                size: o.data.len() as u64,
                modified: o.modified,
            })
            .collect())
    }

    fn stat(&self, key: &str) -> Result<Option<ObjectInfo>> {
        check(key)?;
        self.alive()?;
        Ok(self.state().now.get(key).map(|o| ObjectInfo {
            key: key.to_owned(),
            size: o.data.len() as u64,
            modified: o.modified,
        }))
    }

    fn touch(&self, key: &str) -> Result<bool> {
        check(key)?;
        self.change()?;
        let mut st = self.state();
        let Some(o) = st.now.get_mut(key) else { return Ok(false) };
        o.modified = SystemTime::now();
        Ok(true)
    }

    fn sync(&self) -> Result<()> {
        self.change()?;
        let mut st = self.state();
        st.durable = st.now.clone();
        Ok(())
    }

    fn lock(
        &self,
        name: &str,
        mode: LockMode,
        wait: LockWait,
    ) -> Result<Option<Box<dyn LockGuard>>> {
        self.alive()?;
        let mut held = self.locks.held.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let entry = held.entry(name.to_owned()).or_insert((0, false));
            let free = match mode {
                LockMode::Shared => !entry.1,
                LockMode::Exclusive => *entry == (0, false),
            };
            if free {
                match mode {
                    LockMode::Shared => entry.0 += 1,
                    LockMode::Exclusive => entry.1 = true,
                }
                return Ok(Some(Box::new(MemoryLock {
                    locks: self.locks.clone(),
                    name: name.to_owned(),
                    mode,
                })));
            }
            if wait == LockWait::Fail {
                return Ok(None);
            }
            held = self.locks.freed.wait(held).unwrap_or_else(|e| e.into_inner());
        }
    }
}
