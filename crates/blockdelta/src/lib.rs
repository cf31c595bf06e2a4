//! blockdelta: dirty-bitmap tracking and incremental backup, compatible with QEMU.

#![deny(missing_docs)]

pub mod block;
pub mod export;
pub mod jobs;
pub mod qmp;
pub mod repo;
