//! Shared fixture: an in-memory export served on a unix socket in a temporary directory.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use nbd::{Exports, MemoryExport, Server, ServerHandle};

/// Size of the test exports.
pub const SIZE: usize = 4 << 20;

/// A running server with exports `disk` (bitmap `bm`, the default) and `ro` (read-only).
pub struct Fixture {
    pub rt: tokio::runtime::Runtime,
    pub handle: Option<ServerHandle>,
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
    pub disk: Arc<MemoryExport>,
    pub ro: Arc<MemoryExport>,
    pub exports: Arc<Exports>,
}

impl Fixture {
    pub fn start() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbd.sock");
        let disk = Arc::new(MemoryExport::new(SIZE, Some("bm")).with_description("test disk"));
        let ro = Arc::new(MemoryExport::new(SIZE, None).with_read_only(true));
        let exports = Arc::new(Exports::new());
        exports.insert("disk", disk.clone());
        exports.insert("ro", ro.clone());
        let server = Server::new(exports.clone());
        let handle = rt.block_on(server.listen_unix(&sock)).unwrap();
        Fixture { rt, handle: Some(handle), dir, sock, disk, ro, exports }
    }

    pub fn uri(&self, export: &str) -> String {
        testkit::nbd_unix_uri(&self.sock, export)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.handle.take();
    }
}
