//! `drive-backup` (command and transaction action; spec 3.4): a backup to a file that
//! the daemon creates (mode `absolute-paths`, the default) or opens (mode `existing`),
//! as QEMU 10.0.2 does it:
//!
//! 1. the source node is looked up;
//! 2. the format defaults to the source's (only when creating: `existing` probes);
//! 3. sync=`top` becomes `full` when the source has no backing image;
//! 4. the image is created: qcow2 with backing file = the source's backing (sync=top)
//!    or the source itself (sync=none), raw and `file` as a plain file of the source's
//!    length; QEMU prints its `Formatting '…'` line first, even when creating fails;
//! 5. the target is opened with `discard=unmap,detect-zeroes=unmap` as a node of the
//!    graph with a generated name (`#blockNNN`, with its file child), and for sync=none
//!    the source becomes its backing node;
//! 6. everything else is `blockdev-backup`'s: its checks (bitmap, job id, speed, sizes)
//!    come after the image was created, so a refused backup leaves the new file behind,
//!    as QEMU does;
//! 7. the target node leaves the graph (and is closed) when the job is cleaned up, i.e.
//!    at finalize, before the job is dismissed.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use qcow2::create::CreateOptions;
use qcow2::storage::{ConflictKind, FileOptions, LockConflict, Storage};
use serde_json::{Map, Value, json};

use super::job_commands::{PreparedBackup, create_backup};
use super::protocol::QmpError;
use super::{Qmp, generic};
use crate::block::graph::{BlockGraph, strerror};
use crate::block::node::Node;
use crate::block::options::{OptionsReader, Syntax};
use crate::jobs::backup::{BackupJob, BackupOptions};
use crate::jobs::{JobContext, JobDriver, JobFailure, JobTxn};

/// The formats blockdelta can create and open as a backup target.
const SUPPORTED: &[&str] = &["qcow2", "raw", "file"];
/// Image formats QEMU can create and blockdelta cannot (an honest refusal instead of
/// QEMU's `Unknown file format`, which would claim the name is unknown).
const NOT_SUPPORTED: &[&str] = &["vmdk", "vdi", "vpc", "vhdx", "qed", "qcow", "luks", "parallels"];
/// QEMU block drivers that exist but cannot create images.
const NO_CREATE: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "host_cdrom",
    "host_device",
    "nbd",
    "null-aio",
    "null-co",
    "preallocate",
    "quorum",
    "snapshot-access",
    "throttle",
];

/// `DriveBackup`: `BackupCommon` and `target` (a filename here), `format`, `mode`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct DriveBackupArgs {
    /// The common members; `target` is the image's filename.
    pub(super) base: BackupOptions,
    /// `format`.
    pub(super) format: Option<String>,
    /// `mode: existing` (the default, `absolute-paths`, creates the image).
    pub(super) existing: bool,
}

/// Reads `drive-backup` arguments at `at` (`""` for the command, `actions[N].data` in
/// a transaction) with QEMU's texts.
pub(super) fn parse(mut value: Value, at: &str) -> Result<DriveBackupArgs, QmpError> {
    // `format` and `mode` are DriveBackup's own members; the rest is BackupCommon plus
    // `target`, which `BackupOptions` reads.
    let mut own = Map::new();
    if let Value::Object(map) = &mut value {
        for key in ["format", "mode"] {
            if let Some(v) = map.remove(key) {
                own.insert(key.into(), v);
            }
        }
    }
    let base = BackupOptions::from_value_at(value, at).map_err(generic)?;
    let mut r = OptionsReader::new(Value::Object(own), at, Syntax::Json).map_err(generic)?;
    let format = r.take_str("format").map_err(generic)?;
    let mode = r.take_enum("mode", &["existing", "absolute-paths"]).map_err(generic)?;
    r.finish().map_err(generic)?;
    Ok(DriveBackupArgs { base, format, existing: mode.as_deref() == Some("existing") })
}

/// Creates or opens the target and creates the backup job (not started): what the
/// command and the transaction action prepare.
pub(super) fn prepare(
    qmp: &Qmp,
    args: DriveBackupArgs,
    txn: Option<JobTxn>,
) -> Result<PreparedBackup, QmpError> {
    let DriveBackupArgs { mut base, format, existing } = args;
    let graph = qmp.graph();
    let source = graph.find(&base.device).ok_or_else(|| {
        QmpError::generic(format!("Cannot find device='{0}' nor node-name='{0}'", base.device))
    })?;
    // Only a new image takes the source's format by default; an existing one is probed.
    let format = match format {
        Some(f) => Some(f),
        None if existing => None,
        None => Some(source.driver_name().to_string()),
    };
    // The image the new one is based on: the source's backing for sync=top (without one,
    // top means full), the source itself for sync=none (classic fleecing).
    let mut backing = None;
    if base.sync == "top" {
        backing = cow_backing(&source);
        if backing.is_none() {
            base.sync = "full".into();
        }
    }
    let backing_node = (base.sync == "none").then(|| source.name().to_string());
    if base.sync == "none" {
        backing = Some((
            source.filename().map(|p| p.display().to_string()).unwrap_or_default(),
            source.driver_name().to_string(),
        ));
    }
    let path = base.target.clone();
    if !existing {
        let format = format.as_deref().unwrap_or_default();
        create_image(&path, format, source.len(), backing.as_ref())?;
    }
    let target = open_target(graph, &path, format.as_deref(), backing_node.as_deref())?;
    let owned = OwnedTarget { graph: graph.clone(), node: target.clone() };
    base.target = target.name().to_string();
    create_backup(qmp, base, txn, Some(owned.clone())).inspect_err(|_| owned.release())
}

/// The source's backing image as QEMU names it in a new image: its file's path and its
/// format.
fn cow_backing(source: &Node) -> Option<(String, String)> {
    if let Some(node) = source.backing_node() {
        let name = node.filename().map(|p| p.display().to_string()).unwrap_or_default();
        return Some((name, node.driver_name().to_string()));
    }
    source.backing_file().map(|(path, format)| (path.display().to_string(), format))
}

/// Prints a line on the daemon's standard output or error, as QEMU does, ignoring
/// errors (a closed stream must not fail the command).
fn say(stderr: bool, text: &str) {
    let _ = if stderr {
        writeln!(std::io::stderr(), "{text}")
    } else {
        writeln!(std::io::stdout(), "{text}")
    };
}

/// Checks that `format` is a driver name, as QEMU's lookup does: `unknown` is QEMU's
/// text for a name it does not know.
fn check_format(format: &str, unknown: String) -> Result<(), QmpError> {
    if SUPPORTED.contains(&format) || NO_CREATE.contains(&format) {
        Ok(())
    } else if NOT_SUPPORTED.contains(&format) {
        Err(QmpError::generic(format!("Format '{format}' is not supported by blockdelta")))
    } else {
        Err(QmpError::generic(unknown))
    }
}

/// Creates the image (`bdrv_img_create`): an existing file is overwritten unless
/// another user holds it.
fn create_image(
    path: &str,
    format: &str,
    size: u64,
    backing: Option<&(String, String)>,
) -> Result<(), QmpError> {
    check_format(format, format!("Unknown file format '{format}'"))?;
    if !SUPPORTED.contains(&format) {
        return Err(QmpError::generic(format!(
            "Format driver '{format}' does not support image creation"
        )));
    }
    // QEMU announces the image before creating it.
    if format == "qcow2" {
        let backing_text = backing
            .map(|(file, fmt)| format!(" backing_file={file} backing_fmt={fmt}"))
            .unwrap_or_default();
        say(
            false,
            &format!(
                "Formatting '{path}', fmt=qcow2 cluster_size=65536 extended_l2=off \
                 compression_type=zlib size={size}{backing_text} lazy_refcounts=off \
                 refcount_bits=16"
            ),
        );
    } else {
        say(false, &format!("Formatting '{path}', fmt={format} size={size}"));
    }
    let could_not = |e: &std::io::Error| {
        QmpError::generic(format!("Could not create '{path}': {}", strerror(e)))
    };
    // Created if missing but not truncated yet: the contents go only once the image
    // is locked, so that an image in use is refused untouched.
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(path)
        .map_err(|e| could_not(&e))?;
    let storage = FileOptions::new().write(true).open(Path::new(path)).map_err(|e| {
        match LockConflict::from_io(&e) {
            Some(conflict) => QmpError::generic(format!(
                "Failed to get {}\"{}\" lock",
                if conflict.kind == ConflictKind::Unshare { "shared " } else { "" },
                conflict.permission
            )),
            None => could_not(&e),
        }
    })?;
    storage.set_len(0).map_err(|e| could_not(&e))?;
    if format == "qcow2" {
        let mut opts = CreateOptions::new(size);
        if let Some((file, fmt)) = backing {
            opts.backing_file = Some(file.clone());
            opts.backing_format = Some(fmt.clone());
        }
        qcow2::create::create(&storage, opts)
            .map_err(|e| QmpError::generic(format!("Could not create '{path}': {e}")))?;
    } else {
        storage.set_len(size).map_err(|e| could_not(&e))?;
        storage.flush().map_err(|e| could_not(&e))?;
    }
    Ok(())
}

/// Opens the target as a node of the graph with a generated name. Without a format the
/// file is probed: qcow2 by its magic, else raw (with QEMU's warning).
fn open_target(
    graph: &Arc<BlockGraph>,
    path: &str,
    format: Option<&str>,
    backing_node: Option<&str>,
) -> Result<Arc<Node>, QmpError> {
    if let Some(f) = format {
        check_format(f, format!("Unknown driver '{f}'"))?;
        if !SUPPORTED.contains(&f) {
            return Err(QmpError::generic(format!(
                "Format '{f}' is not supported by blockdelta as a backup target"
            )));
        }
    }
    let mut magic = [0u8; 4];
    let is_qcow2 = std::fs::File::open(path)
        .map_err(|e| QmpError::generic(format!("Could not open '{path}': {}", strerror(&e))))?
        .read_exact(&mut magic)
        .is_ok()
        && u32::from_be_bytes(magic) == qcow2::header::MAGIC;
    let format = match format {
        Some("qcow2") if !is_qcow2 => {
            return Err(QmpError::generic("Image is not in qcow2 format"));
        }
        Some(f) => f,
        None if is_qcow2 => "qcow2",
        None => {
            say(
                true,
                &format!(
                    "WARNING: Image format was not specified for '{path}' and probing guessed \
                     raw.\n         Automatically detecting the format is dangerous for raw \
                     images, write operations on block 0 will be restricted.\n         Specify \
                     the 'raw' format explicitly to remove the restrictions."
                ),
            );
            "raw"
        }
    };
    let file = json!({"driver": "file", "filename": path});
    let mut options = match format {
        "file" => file,
        driver => json!({"driver": driver, "file": file}),
    };
    options["discard"] = json!("unmap");
    options["detect-zeroes"] = json!("unmap");
    if let Some(name) = backing_node
        && format == "qcow2"
    {
        options["backing"] = json!(name);
    }
    graph.add_implicit(options).map_err(generic)
}

/// The target node a `drive-backup` opened, which goes with the job.
#[derive(Clone, Debug)]
pub(super) struct OwnedTarget {
    graph: Arc<BlockGraph>,
    node: Arc<Node>,
}

impl OwnedTarget {
    /// Takes the node (and its file child) out of the graph and closes it, flushing the
    /// image. A node something else still uses (an export) stays.
    fn release(&self) {
        let Ok(removed) = self.graph.remove_implicit(self.node.name(), &[]) else { return };
        for node in removed {
            if let Err(e) = node.close() {
                say(true, &format!("blockdelta: closing node '{}': {e}", node.name()));
            }
        }
    }
}

/// A backup whose target the job owns: [`BackupJob`], then the target goes in `clean`.
pub(super) struct DriveBackupJob {
    pub(super) inner: BackupJob,
    pub(super) target: OwnedTarget,
}

impl JobDriver for DriveBackupJob {
    async fn run(&self, ctx: &JobContext) -> Result<(), JobFailure> {
        self.inner.run(ctx).await
    }

    async fn prepare(&self) -> Result<(), JobFailure> {
        self.inner.prepare().await
    }

    async fn commit(&self) {
        self.inner.commit().await
    }

    async fn abort(&self) {
        self.inner.abort().await
    }

    async fn clean(&self) {
        self.inner.clean().await;
        // Closing the target stores and fsyncs: off the event loop.
        crate::block::off_event_loop(|| self.target.release());
    }

    fn cancel(&self, force: bool) -> bool {
        self.inner.cancel(force)
    }
}
