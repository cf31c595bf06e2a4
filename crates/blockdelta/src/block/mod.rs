//! Block nodes, the graph that names them, and their dirty bitmaps.

pub mod blkdebug;
pub mod dirty_bitmap;
pub mod file;
pub mod graph;
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
