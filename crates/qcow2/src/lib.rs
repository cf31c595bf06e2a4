//! The qcow2 image format, as QEMU 10.0.2 reads and writes it, over a positional
//! [`Storage`](storage::Storage) backend (a file, or memory that can simulate power loss).
//!
//! The format is specified in QEMU's `docs/interop/qcow2.txt`; this crate implements it
//! from that text and from QEMU's observed behaviour, never from QEMU's code.
//!
//! - [`Qcow2Image`]: open an image ([`Qcow2Image::open`] on any storage,
//!   [`Qcow2Image::open_path`] for a file with its backing chain), read it, ask the
//!   status of guest ranges.
//! - [`header`]: the header, its extensions and the feature name table.
//! - [`l2`], [`refcount`]: table entries and caches; [`snapshot`]: the snapshot table.
//! - [`backing`]: the [`BackingImage`] trait, raw images, opening backing chains.
//! - [`write`](mod@write): the write path of [`Qcow2Image`] (writes, zero writes, discards, flush,
//!   resize) and its crash-safe ordering.
//! - [`bitmap_store`]: storing and removing persistent dirty bitmaps ([`bitmaps`] parses them);
//!   [`intent`]: blockdelta's write-intent record, which makes them crash-safe.
//! - [`create`]: new images, laid out as `qemu-img create -f qcow2` lays them out;
//!   [`check`]: the consistency check and leak repair of `qemu-img check`.

#![deny(missing_docs)]

pub mod backing;
pub mod bitmap_store;
pub mod bitmaps;
mod cache;
pub mod check;
pub mod compress;
pub mod create;
pub mod error;
pub mod header;
pub mod image;
pub mod intent;
pub mod l2;
pub mod refcount;
pub mod snapshot;
pub mod storage;
pub mod write;

pub use backing::{BackingImage, BlockState, BlockStatus, RawImage, open_file_chain};
pub use error::{FeatureKind, Qcow2Error};
pub use image::{OpenOptions, Qcow2Image};
