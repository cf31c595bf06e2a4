//! The rate limit of a job's background copy: `speed` bytes per second, accounted in
//! time slices of 100 ms, as QEMU's jobs do.
//!
//! Within a slice the job may move `speed / 10` bytes (at least 1) without waiting.
//! Once it has moved more, it waits until the time those bytes take at `speed`,
//! counted from the start of the slice; the slice is stretched to that time. A new
//! slice starts when the job comes back after the current one has ended. So a job that
//! copies `N` bytes in chunks takes about `N / speed`, and an idle job gets no credit.

use std::time::Duration;

use tokio::time::Instant;

/// The slice length QEMU uses for block jobs.
pub const SLICE: Duration = Duration::from_millis(100);

/// Per-job rate limit state.
#[derive(Debug, Clone)]
pub(crate) struct RateLimit {
    /// Bytes allowed per slice; 0 = unlimited.
    quota: u64,
    start: Option<Instant>,
    end: Option<Instant>,
    dispatched: u64,
}

impl RateLimit {
    pub(crate) fn new(speed: u64) -> Self {
        let mut r = RateLimit { quota: 0, start: None, end: None, dispatched: 0 };
        r.set_speed(speed);
        r
    }

    /// Changes the speed (bytes/s, 0 = unlimited); the current slice's accounting
    /// stays, so the next delay is recomputed at the new speed.
    pub(crate) fn set_speed(&mut self, speed: u64) {
        self.quota = if speed == 0 {
            0
        } else {
            let per_slice = speed as f64 * SLICE.as_secs_f64();
            (per_slice as u64).max(1)
        };
    }

    /// Accounts `bytes` just moved at `now` and returns how long to wait before moving
    /// more (zero when within the slice's quota or unlimited).
    pub(crate) fn account(&mut self, bytes: u64, now: Instant) -> Duration {
        if self.quota == 0 {
            return Duration::ZERO;
        }
        let (start, end) = match (self.start, self.end) {
            (Some(s), Some(e)) if e >= now => (s, e),
            _ => {
                // The previous (possibly stretched) slice is over: no credit carries.
                self.dispatched = 0;
                (now, now + SLICE)
            }
        };
        self.start = Some(start);
        self.dispatched = self.dispatched.saturating_add(bytes);
        if self.dispatched < self.quota {
            self.end = Some(end);
            return Duration::ZERO;
        }
        // Over quota: the slice lasts as long as its bytes take at this speed.
        let slice_ns = SLICE.as_nanos();
        let stretched =
            slice_ns.saturating_mul(u128::from(self.dispatched)) / u128::from(self.quota);
        let stretched = Duration::from_nanos(u64::try_from(stretched).unwrap_or(u64::MAX));
        let end = start + stretched;
        self.end = Some(end);
        end.saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_waits() {
        let mut r = RateLimit::new(0);
        assert_eq!(r.account(u64::MAX, Instant::now()), Duration::ZERO);
    }

    #[test]
    fn accumulates_to_speed() {
        // 1 MiB/s in 64 KiB chunks: the total wait for 4 MiB is about 4 s.
        let t0 = Instant::now();
        let mut now = t0;
        let mut r = RateLimit::new(1 << 20);
        for _ in 0..64 {
            now += r.account(64 << 10, now);
        }
        let took = now - t0;
        assert!(
            took > Duration::from_millis(3900) && took < Duration::from_millis(4100),
            "{took:?}"
        );
    }

    #[test]
    fn first_chunk_free_then_waits() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(65536);
        // A 1 MiB chunk at 64 KiB/s: 16 s (QEMU's backup copies 1 MiB, then sleeps).
        let d = r.account(1 << 20, t0);
        assert!(d >= Duration::from_secs(16) && d < Duration::from_millis(16010), "{d:?}");
    }

    #[test]
    fn tiny_speed_has_quota_one() {
        let mut r = RateLimit::new(1);
        assert_eq!(r.account(1, Instant::now()), SLICE);
    }
}
