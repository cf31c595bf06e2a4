//! A node's I/O gate: which requests may start, and waiting until those in flight are
//! done (drained sections and resizes).
//!
//! A request never takes a gate twice and never waits for one while it holds something
//! a waiter needs, so the gate cannot take part in a deadlock cycle:
//!
//! - **Client** requests (exports, tools, QMP-level I/O) wait while the node is drained
//!   or resizing, then count as in flight until they finish.
//! - **Parent** requests are issued by a parent node's driver while it serves a request
//!   of its own (qcow2 reading its file). They never wait for a drain: the request that
//!   caused them is already in flight above, and a drain quiesces the ancestors of the
//!   nodes it drains too, so no new ones come. They count as the request that caused
//!   them counted (a thread-local carries the class down the graph), so a drain waits
//!   for the data and metadata writes of a client request in flight above.
//! - **Job** requests are a job's own I/O (a backup's copy, copy-before-write reading
//!   the source and writing the target). They never wait, not even for a resize: a
//!   guest write held in copy-before-write waits for a copy in flight, so a copy that
//!   waited for a drain (which waits for the guest write) would close a cycle. Jobs that
//!   need a fixed length block resizes instead ([`crate::block::node::Node::block_resize`]).
//!   A drain does not wait for them: they read the source (which changes nothing) or
//!   write targets, which is what a job does between pause points in QEMU too.
//!
//! The fast path is two atomic operations; waiting uses a mutex and a condition
//! variable, and only drains, resizes and requests arriving during them take it.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Condvar, Mutex, PoisonError};

/// Where a request comes from; decides whether it waits at a gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoOrigin {
    /// From outside the graph: an export's client, a tool, a QMP command.
    Client,
    /// From a parent node's driver, inside a request of the parent.
    Parent,
    /// A job's own I/O.
    Job,
}

/// The class a request counts in: what drains wait for, or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    /// Waited for by drains and resizes.
    Drained,
    /// Waited for by resizes only.
    JobIo,
}

thread_local! {
    /// The class of the request this thread is serving, for the parent requests its
    /// drivers issue (they run on the same thread: drivers are synchronous).
    static CURRENT: Cell<Option<Class>> = const { Cell::new(None) };
}

/// A node's gate.
#[derive(Debug, Default)]
pub struct IoGate {
    /// Requests of class `Drained` in flight.
    in_flight: AtomicUsize,
    /// Job requests in flight.
    jobs_in_flight: AtomicUsize,
    /// Drains and resizes holding the node: client requests wait while it is non-zero.
    quiesced: AtomicUsize,
    /// A resize holds the node: parent requests wait too.
    resizing: AtomicUsize,
    waiters: Mutex<()>,
    changed: Condvar,
}

/// A request in flight; dropping it ends the request.
#[must_use]
pub struct InFlight<'a> {
    gate: &'a IoGate,
    class: Class,
    outer: Option<Class>,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.outer));
        let counter = match self.class {
            Class::Drained => &self.gate.in_flight,
            Class::JobIo => &self.gate.jobs_in_flight,
        };
        if counter.fetch_sub(1, SeqCst) == 1
            && (self.gate.quiesced.load(SeqCst) > 0 || self.gate.resizing.load(SeqCst) > 0)
        {
            self.gate.notify();
        }
    }
}

/// A resize's hold of a gate; dropping it lets requests in again.
#[must_use]
pub struct Exclusive<'a> {
    gate: &'a IoGate,
}

impl Drop for Exclusive<'_> {
    fn drop(&mut self) {
        self.gate.resizing.fetch_sub(1, SeqCst);
        self.gate.end_quiesce();
    }
}

impl IoGate {
    /// A gate with nothing in flight.
    pub fn new() -> Self {
        IoGate::default()
    }

    fn notify(&self) {
        // Taking the mutex orders the notification after a waiter's check.
        drop(self.waiters.lock().unwrap_or_else(PoisonError::into_inner));
        self.changed.notify_all();
    }

    /// Whether a request of `origin` must wait now.
    fn must_wait(&self, origin: IoOrigin) -> bool {
        match origin {
            IoOrigin::Client => self.quiesced.load(SeqCst) > 0,
            IoOrigin::Parent => self.resizing.load(SeqCst) > 0,
            IoOrigin::Job => false,
        }
    }

    fn class_of(origin: IoOrigin) -> (Class, Option<Class>) {
        let outer = CURRENT.with(Cell::get);
        let class = match origin {
            IoOrigin::Client => Class::Drained,
            IoOrigin::Job => Class::JobIo,
            IoOrigin::Parent => outer.unwrap_or(Class::Drained),
        };
        (class, outer)
    }

    fn counter(&self, class: Class) -> &AtomicUsize {
        match class {
            Class::Drained => &self.in_flight,
            Class::JobIo => &self.jobs_in_flight,
        }
    }

    /// Starts a request, waiting first if its origin must (blocking).
    pub fn enter(&self, origin: IoOrigin) -> InFlight<'_> {
        let (class, outer) = Self::class_of(origin);
        let counter = self.counter(class);
        loop {
            counter.fetch_add(1, SeqCst);
            if !self.must_wait(origin) {
                CURRENT.with(|c| c.set(Some(class)));
                return InFlight { gate: self, class, outer };
            }
            // Back out and wait: the drain may be waiting for this count.
            if counter.fetch_sub(1, SeqCst) == 1 {
                self.notify();
            }
            let mut guard = self.waiters.lock().unwrap_or_else(PoisonError::into_inner);
            while self.must_wait(origin) {
                guard = self.changed.wait(guard).unwrap_or_else(PoisonError::into_inner);
            }
        }
    }

    /// Starts a request if it need not wait; `None` otherwise (for callers that must
    /// not block, such as the event loop's cached reads).
    pub fn try_enter(&self, origin: IoOrigin) -> Option<InFlight<'_>> {
        let (class, outer) = Self::class_of(origin);
        let counter = self.counter(class);
        counter.fetch_add(1, SeqCst);
        if self.must_wait(origin) {
            if counter.fetch_sub(1, SeqCst) == 1 {
                self.notify();
            }
            return None;
        }
        CURRENT.with(|c| c.set(Some(class)));
        Some(InFlight { gate: self, class, outer })
    }

    /// Stops new client requests (blocking nothing yet): the first half of a drain.
    /// Drains nest; each `quiesce` is ended by one [`end_quiesce`](Self::end_quiesce).
    pub fn quiesce(&self) {
        self.quiesced.fetch_add(1, SeqCst);
    }

    /// Ends one [`quiesce`](Self::quiesce).
    pub fn end_quiesce(&self) {
        self.quiesced.fetch_sub(1, SeqCst);
        self.notify();
    }

    /// Whether no request of the drained class is in flight and no resize runs.
    pub fn idle(&self) -> bool {
        self.in_flight.load(SeqCst) == 0 && self.resizing.load(SeqCst) == 0
    }

    /// Waits until [`idle`](Self::idle) (blocking). Call after
    /// [`quiesce`](Self::quiesce) on this node and its ancestors.
    pub fn wait_idle(&self) {
        let mut guard = self.waiters.lock().unwrap_or_else(PoisonError::into_inner);
        while !self.idle() {
            guard = self.changed.wait(guard).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Holds the node for a resize: no client or parent request starts, and every
    /// request in flight, job requests included, has finished (blocking).
    pub fn exclusive(&self) -> Exclusive<'_> {
        self.quiesced.fetch_add(1, SeqCst);
        let mut guard = self.waiters.lock().unwrap_or_else(PoisonError::into_inner);
        // One resize at a time; a drain's section may overlap.
        while self.resizing.load(SeqCst) > 0 {
            guard = self.changed.wait(guard).unwrap_or_else(PoisonError::into_inner);
        }
        self.resizing.fetch_add(1, SeqCst);
        let held = Exclusive { gate: self };
        while self.in_flight.load(SeqCst) > 0 || self.jobs_in_flight.load(SeqCst) > 0 {
            guard = self.changed.wait(guard).unwrap_or_else(PoisonError::into_inner);
        }
        drop(guard);
        held
    }

    /// Whether the node is drained or resizing now.
    pub fn is_quiesced(&self) -> bool {
        self.quiesced.load(SeqCst) > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    #[test]
    fn drain_waits_for_client_requests_and_holds_new_ones() {
        let gate = Arc::new(IoGate::new());
        let req = gate.enter(IoOrigin::Client);
        let drained = Arc::new(AtomicBool::new(false));
        let t = {
            let (gate, drained) = (gate.clone(), drained.clone());
            std::thread::spawn(move || {
                gate.quiesce();
                gate.wait_idle();
                drained.store(true, SeqCst);
                std::thread::sleep(Duration::from_millis(50));
                gate.end_quiesce();
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!drained.load(SeqCst), "the drain finished with a request in flight");
        drop(req);
        while !drained.load(SeqCst) {
            std::thread::yield_now();
        }
        // A client request now waits for the end of the drain; a job request does not.
        assert!(gate.try_enter(IoOrigin::Client).is_none());
        drop(gate.try_enter(IoOrigin::Job).expect("a job request never waits"));
        drop(gate.enter(IoOrigin::Client));
        t.join().unwrap();
        assert!(!gate.is_quiesced());
    }

    #[test]
    fn parent_requests_inherit_the_class_and_pass_a_drain() {
        let parent = Arc::new(IoGate::new());
        let child = Arc::new(IoGate::new());
        child.quiesce();
        // A client request above is in flight; the nested request passes the drain.
        let above = parent.enter(IoOrigin::Client);
        let nested = child.try_enter(IoOrigin::Parent).expect("parent requests pass drains");
        assert_eq!(child.in_flight.load(SeqCst), 1);
        drop(nested);
        drop(above);
        // Under a job request the nested one counts as job I/O.
        let job = parent.enter(IoOrigin::Job);
        let nested = child.enter(IoOrigin::Parent);
        assert_eq!(child.in_flight.load(SeqCst), 0);
        assert_eq!(child.jobs_in_flight.load(SeqCst), 1);
        child.wait_idle();
        drop(nested);
        drop(job);
        child.end_quiesce();
    }

    #[test]
    fn exclusive_waits_for_job_requests_too() {
        let gate = Arc::new(IoGate::new());
        let job = gate.enter(IoOrigin::Job);
        let held = Arc::new(AtomicBool::new(false));
        let t = {
            let (gate, held) = (gate.clone(), held.clone());
            std::thread::spawn(move || {
                let _x = gate.exclusive();
                held.store(true, SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!held.load(SeqCst));
        drop(job);
        t.join().unwrap();
        assert!(held.load(SeqCst));
    }
}
