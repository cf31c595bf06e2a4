//! A listener's phase (running, draining, forced) that connections wait on.
//!
//! A connection's request loop races every request read against "the drain began", so
//! that wait must be cheap to poll: an atomic load and a waker comparison, no lock and
//! no cooperative-budget accounting. (A `tokio::sync::watch` waiter made and dropped per
//! request cost about 800 instructions of a 4 KiB read's 16,000.)

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

#[derive(Debug, Default)]
struct Shared {
    value: AtomicU8,
    next_waiter: AtomicU64,
    waiters: Mutex<HashMap<u64, Waker>>,
}

/// The phase, shared by the listener's handle and its connections.
#[derive(Debug, Clone, Default)]
pub(crate) struct Phase(Arc<Shared>);

impl Phase {
    /// A new phase at `value`.
    pub(crate) fn new(value: u8) -> Phase {
        let p = Phase::default();
        p.0.value.store(value, Ordering::Release);
        p
    }

    /// Moves to `value` (never back) and wakes every waiter.
    pub(crate) fn set(&self, value: u8) {
        self.0.value.fetch_max(value, Ordering::AcqRel);
        let wakers: Vec<Waker> =
            self.0.waiters.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        for w in wakers {
            w.wake();
        }
    }

    /// Resolves once the phase is at least `value`.
    pub(crate) fn reached(&self, value: u8) -> Reached {
        Reached { shared: self.0.clone(), value, id: None, waker: None }
    }
}

/// The future of [`Phase::reached`].
#[derive(Debug)]
pub(crate) struct Reached {
    shared: Arc<Shared>,
    value: u8,
    /// Its entry in the waiters, once registered (removed when dropped).
    id: Option<u64>,
    /// The waker registered, to skip registering it again.
    waker: Option<Waker>,
}

impl Future for Reached {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let done = || this.shared.value.load(Ordering::Acquire) >= this.value;
        if done() {
            return Poll::Ready(());
        }
        if this.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            return Poll::Pending;
        }
        let id =
            *this.id.get_or_insert_with(|| this.shared.next_waiter.fetch_add(1, Ordering::Relaxed));
        this.shared
            .waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, cx.waker().clone());
        this.waker = Some(cx.waker().clone());
        // A `set` between the first check and the registration woke nobody here.
        if this.shared.value.load(Ordering::Acquire) >= this.value {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl Drop for Reached {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.shared.waiters.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_wake_on_each_phase_they_wait_for() {
        let phase = Phase::new(0);
        let (p1, p2) = (phase.clone(), phase.clone());
        let one = tokio::spawn(async move { p1.reached(1).await });
        let two = tokio::spawn(async move { p2.reached(2).await });
        tokio::task::yield_now().await;
        phase.set(1);
        one.await.unwrap();
        tokio::task::yield_now().await;
        assert!(!two.is_finished(), "woken for phase 1, it waits on for 2");
        phase.set(2);
        two.await.unwrap();
        assert!(phase.0.waiters.lock().unwrap().is_empty(), "finished waiters deregister");
        phase.reached(2).await;
    }
}
