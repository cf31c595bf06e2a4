//! Test support for interop tests that use QEMU's tools as oracles.
//!
//! - [`require_tool`] finds a program on `PATH`, or panics naming it and the Debian
//!   package that ships it: interop tests fail, never skip, when a tool is missing.
//! - [`run`] / [`run_timeout`], [`qemu_img`], [`qemu_io`]: run a command and fail with
//!   its stderr when it exits non-zero (or hangs).
//! - [`qmp::QmpClient`]: a synchronous QMP client over a unix socket, with read
//!   timeouts, collected events and QMP errors as a distinct value ([`qmp::QmpError`]).
//! - [`qsd::StorageDaemon`]: starts `qemu-storage-daemon` (or any program taking the
//!   same monitor arguments, e.g. `blockdelta serve`) in a temporary directory, connects
//!   to its QMP monitor, and stops exactly that process when dropped.
//!
//! [`serde_json`] is re-exported so that test crates can build QMP arguments with
//! `testkit::serde_json::json!` without depending on it themselves.
//!
//! ```no_run
//! use testkit::qsd::StorageDaemon;
//! use testkit::serde_json::json;
//!
//! let builder = StorageDaemon::qemu();
//! let img = builder.path("disk.img");
//! std::fs::File::create(&img).unwrap().set_len(1 << 20).unwrap();
//! let mut daemon = builder
//!     .arg("--blockdev")
//!     .arg(format!("driver=file,node-name=disk0,filename={}", img.display()))
//!     .start()
//!     .unwrap();
//! daemon
//!     .qmp()
//!     .execute("block-dirty-bitmap-add", json!({"node": "disk0", "name": "bm0"}))
//!     .unwrap();
//! daemon.quit().unwrap();
//! ```

#![deny(missing_docs)]

pub mod qmp;
pub mod qsd;
pub mod rng;
mod tools;

pub use rng::SplitMix64;
pub use serde_json;
pub use tools::{
    DEFAULT_RUN_TIMEOUT, create_qcow2, find_tool, nbd_unix_uri, qemu_img, qemu_io, require_tool,
    run, run_timeout,
};
