//! The NBD (Network Block Device) protocol, as spoken by QEMU 10: protocol constants
//! ([`proto`]), a sans-I/O codec ([`codec`]), a tokio server ([`server`]) serving
//! caller-implemented [`Export`]s, and a small client ([`client`]).
//!
//! Besides `base:allocation`, exports can offer QEMU's metadata contexts
//! (`qemu:dirty-bitmap:NAME`, `qemu:allocation-depth`); the list queries `qemu:` and
//! `qemu:dirty-bitmap:` enumerate them.

#![deny(missing_docs)]

pub mod client;
pub mod codec;
pub mod export;
mod phase;
pub mod proto;
pub mod server;
pub mod uri;

pub use client::{Client, ClientError, ClientOptions};
pub use codec::{BlockSize, Extent};
pub use export::{BoxFuture, Export, ExportError, ExportResult, Exports, MemoryExport, ZeroFlags};
pub use server::{ServeError, Server, ServerHandle};
pub use uri::{NbdUri, Stream, Target};
