//! Running work on a few threads at once.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The number of threads to use when the caller does not say: the CPUs available.
pub fn default_jobs() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Calls `work(i)` for every `i` in `0..count` on up to `jobs` threads, items handed
/// out in increasing order. The first error stops the handing out (items already
/// started finish) and is returned.
pub fn for_each<E: Send>(
    jobs: usize,
    count: usize,
    work: impl Fn(usize) -> Result<(), E> + Sync,
) -> Result<(), E> {
    let jobs = jobs.clamp(1, count.max(1));
    if jobs == 1 {
        return (0..count).try_for_each(work);
    }
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_error = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| {
                while !failed.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        break;
                    }
                    if let Err(e) = work(i) {
                        failed.store(true, Ordering::Relaxed);
                        first_error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                    }
                }
            });
        }
    });
    match first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_runs_once_and_errors_stop_the_rest() {
        for jobs in [1, 3, 8] {
            let seen: Vec<AtomicUsize> = (0..1000).map(|_| AtomicUsize::new(0)).collect();
            for_each::<()>(jobs, 1000, |i| {
                seen[i].fetch_add(1, Ordering::Relaxed);
                Ok(())
            })
            .unwrap();
            assert!(seen.iter().all(|s| s.load(Ordering::Relaxed) == 1));
            let done = AtomicUsize::new(0);
            let r = for_each(jobs, 1000, |i| {
                done.fetch_add(1, Ordering::Relaxed);
                if i == 10 { Err(i) } else { Ok(()) }
            });
            assert_eq!(r, Err(10));
            assert!(done.load(Ordering::Relaxed) < 1000);
        }
    }
}
