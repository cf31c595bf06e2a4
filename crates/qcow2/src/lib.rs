//! The qcow2 image format, as QEMU 10.0.2 reads and writes it, over a positional
//! [`Storage`](storage::Storage) backend (a file, or memory that can simulate power loss).
//!
//! The format is specified in QEMU's `docs/interop/qcow2.txt`; this crate implements it
//! from that text and from QEMU's observed behaviour, never from QEMU's code.

#![deny(missing_docs)]

pub mod storage;
