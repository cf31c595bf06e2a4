//! Block nodes, the graph that names them, and their dirty bitmaps.

pub mod blkdebug;
pub mod dirty_bitmap;
pub mod file;
pub mod gate;
pub mod graph;
pub mod memory;
pub mod node;
pub mod options;
pub mod qcow2;
pub mod raw;

/// An OS error's text as C's `strerror` gives it, which is what QEMU prints: std's
/// message without its ` (os error N)` suffix.
pub fn strerror(e: &std::io::Error) -> String {
    let text = match e.raw_os_error() {
        Some(code) => std::io::Error::from_raw_os_error(code).to_string(),
        None => e.to_string(),
    };
    match text.rfind(" (os error ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// Runs blocking work (a drain, a close with its fsync, a scan, a hash) from async code
/// without stalling the event loop: on a multi-thread runtime the worker first hands
/// its other tasks to another thread (`block_in_place`), so NBD, QMP and signals keep
/// being served. Elsewhere (tests on a current-thread runtime, no runtime) it just runs.
pub fn off_event_loop<R>(f: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}
