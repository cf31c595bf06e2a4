//! `transaction`: actions prepared in list order (later actions see earlier ones), all
//! rolled back in reverse if one fails (only its error is returned), otherwise all
//! committed. The bitmap actions use the manager's transaction forms.

use std::sync::Arc;

use serde_json::{Value, json};

use super::bitmap_commands::{add_args, add_node, bitmap_node, merge_args, ref_args, resolver};
use super::protocol::QmpError;
use super::{Qmp, finish, generic, reader};
use crate::block::dirty_bitmap::{AddBitmap, BitmapId, BitmapRef, BitsBackup, RemovePending};
use crate::block::node::{Node, drain_nodes};
use crate::block::options::{OptionsReader, Syntax};
use crate::jobs::backup::BackupOptions;
use crate::jobs::{Job, JobTxn};

/// The action types, as QEMU's `TransactionActionKind` spells them.
const ACTIONS: &[&str] = &[
    "abort",
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
    "blockdev-backup",
    "drive-backup",
    "blockdev-snapshot",
    "blockdev-snapshot-sync",
    "blockdev-snapshot-internal-sync",
];

/// A prepared action, with what its commit or abort needs.
enum Prepared {
    /// A backup job, created and not started.
    Backup(Job),
    Add(Arc<Node>, BitmapId),
    Remove(Arc<Node>, RemovePending),
    Restore(Arc<Node>, BitsBackup),
    SetEnabled(Arc<Node>, BitmapId, bool),
}

impl Prepared {
    fn commit(self) {
        match self {
            // Started by `execute`, in QEMU's order.
            Prepared::Backup(_) => {}
            Prepared::Remove(node, pending) => {
                let _ = node.bitmaps().commit_remove(pending);
            }
            // The new state stays; the old bits are dropped.
            Prepared::Add(..) | Prepared::Restore(..) | Prepared::SetEnabled(..) => {}
        }
    }

    async fn abort(self) {
        // Rollbacks of what prepare did, which cannot fail for a bitmap that prepare
        // left busy or just created; errors are ignored as QEMU's abort callbacks do.
        match self {
            // Cancelling the unstarted job runs its abort (the bitmap is reclaimed) and
            // clean-up (copy-before-write removed).
            Prepared::Backup(job) => {
                let _ = job.cancel(true).await;
                job.wait_finished().await;
            }
            Prepared::Add(node, id) => {
                let _ = node.bitmaps().release(id);
            }
            Prepared::Remove(node, pending) => {
                let _ = node.bitmaps().abort_remove(pending);
            }
            Prepared::Restore(node, backup) => {
                let _ = node.bitmaps().restore(backup);
            }
            Prepared::SetEnabled(node, id, was) => {
                let _ = node.bitmaps().set_enabled(id, was);
            }
        }
    }
}

/// Runs `transaction`.
pub(super) async fn execute(qmp: &Qmp, args: Value) -> Result<Value, QmpError> {
    let mut r = reader(args)?;
    let actions = r
        .take_value("actions")
        .ok_or_else(|| QmpError::generic("Parameter 'actions' is missing"))?;
    let grouped = match r.take_value("properties") {
        None => false,
        Some(p) => {
            let mut p = OptionsReader::new(p, "properties", Syntax::Json).map_err(generic)?;
            let mode =
                p.take_enum("completion-mode", &["individual", "grouped"]).map_err(generic)?;
            finish(p)?;
            mode.as_deref() == Some("grouped")
        }
    };
    finish(r)?;
    let Value::Array(actions) = actions else {
        return Err(QmpError::generic("Invalid parameter type for 'actions', expected: array"));
    };
    // Every action's arguments are read before any runs, as QEMU's argument visitor
    // does: a malformed action fails the transaction untouched.
    let mut parsed = Vec::with_capacity(actions.len());
    for (i, action) in actions.into_iter().enumerate() {
        let at = format!("actions[{i}]");
        let mut a = OptionsReader::new(action, &at, Syntax::Json).map_err(generic)?;
        let kind = a
            .take_str("type")
            .map_err(generic)?
            .ok_or_else(|| QmpError::generic(format!("Parameter '{at}.type' is missing")))?;
        if !ACTIONS.contains(&kind.as_str()) {
            // QEMU names the union's discriminator without its path here.
            return Err(QmpError::generic(format!(
                "Parameter 'type' does not accept value '{kind}'"
            )));
        }
        let data = a
            .take_value("data")
            .ok_or_else(|| QmpError::generic(format!("Parameter '{at}.data' is missing")))?;
        finish(a)?;
        parsed.push((kind.clone(), parse_action(&kind, data, &format!("{at}.data"))?));
    }
    if grouped
        && let Some((kind, _)) =
            parsed.iter().find(|(k, _)| k != "blockdev-backup" && k != "drive-backup")
    {
        return Err(QmpError::generic(format!(
            "Action '{kind}' does not support transaction property completion-mode = grouped"
        )));
    }
    // Grouped: every job of the transaction in one job transaction.
    let txn = grouped.then(|| qmp.jobs().new_txn());
    // Everything happens drained, as QEMU drains all nodes for a transaction: jobs
    // pause, no request starts on any node and none is in flight from the first
    // preparation to the last commit, so every write lands before all the actions or
    // after all of them (never between a bitmap's disable and the next one's add).
    let mut drain = qmp.jobs().drain_all().await;
    let nodes = qmp.graph().nodes_newest_first();
    let io_drain = crate::block::off_event_loop(|| drain_nodes(&nodes));
    let hook = qmp.transaction_hook();
    let mut prepared: Vec<Prepared> = Vec::new();
    for (i, (_, action)) in parsed.into_iter().enumerate() {
        // Preparing may scan (sync=top) or write (a persistent bitmap's removal).
        let p = crate::block::off_event_loop(|| {
            let p = prepare(qmp, action, txn);
            if let Some(hook) = &hook {
                hook(i);
            }
            p
        });
        match p {
            Ok(p) => {
                if let Some(Prepared::Backup(job)) = &p {
                    drain.include(job);
                }
                prepared.extend(p)
            }
            Err(e) => {
                for p in prepared.into_iter().rev() {
                    p.abort().await;
                }
                drop(io_drain);
                drop(drain);
                return Err(e);
            }
        }
    }
    // Jobs start in reverse order of creation, as QEMU commits the actions.
    let mut started = Vec::new();
    for p in prepared {
        if let Prepared::Backup(job) = &p {
            started.push(job.clone());
        }
        p.commit();
    }
    drop(io_drain);
    let mut result = Ok(json!({}));
    for job in started.iter().rev() {
        if let Err(e) = job.start() {
            result = Err(super::job_commands::job_error(e));
        }
    }
    drop(drain);
    result
}

/// An action with its arguments read.
enum Action {
    Backup(Box<BackupOptions>),
    DriveBackup(Box<super::drive_backup::DriveBackupArgs>),
    Abort,
    Add(String, AddBitmap),
    Remove(String, String),
    Clear(String, String),
    Enable(String, String),
    Disable(String, String),
    Merge(String, String, Vec<BitmapRef>),
    Unsupported(String),
}

fn parse_action(kind: &str, data: Value, at: &str) -> Result<Action, QmpError> {
    Ok(match kind {
        "abort" => {
            finish(OptionsReader::new(data, at, Syntax::Json).map_err(generic)?)?;
            Action::Abort
        }
        "block-dirty-bitmap-add" => {
            let (node, request) = add_args(data, at)?;
            Action::Add(node, request)
        }
        "block-dirty-bitmap-remove" => {
            let (node, name) = ref_args(data, at)?;
            Action::Remove(node, name)
        }
        "block-dirty-bitmap-clear" => {
            let (node, name) = ref_args(data, at)?;
            Action::Clear(node, name)
        }
        "block-dirty-bitmap-enable" => {
            let (node, name) = ref_args(data, at)?;
            Action::Enable(node, name)
        }
        "block-dirty-bitmap-disable" => {
            let (node, name) = ref_args(data, at)?;
            Action::Disable(node, name)
        }
        "block-dirty-bitmap-merge" => {
            let (node, target, sources) = merge_args(data, at)?;
            Action::Merge(node, target, sources)
        }
        "blockdev-backup" => {
            let options = BackupOptions::from_value_at(data, at).map_err(generic)?;
            Action::Backup(Box::new(options))
        }
        "drive-backup" => Action::DriveBackup(Box::new(super::drive_backup::parse(data, at)?)),
        other => Action::Unsupported(other.to_string()),
    })
}

fn prepare(qmp: &Qmp, action: Action, txn: Option<JobTxn>) -> Result<Option<Prepared>, QmpError> {
    let graph = qmp.graph();
    Ok(Some(match action {
        Action::Backup(options) => {
            Prepared::Backup(super::job_commands::create_backup(qmp, *options, txn, None)?.job)
        }
        Action::DriveBackup(args) => {
            Prepared::Backup(super::drive_backup::prepare(qmp, *args, txn)?.job)
        }
        Action::Abort => {
            return Err(QmpError::generic("Transaction aborted using Abort action"));
        }
        Action::Add(node, request) => {
            if request.name.is_empty() {
                return Err(QmpError::generic("Bitmap name cannot be empty"));
            }
            let n = add_node(graph, &node)?;
            let id = n.bitmaps().add(&request).map_err(generic)?;
            Prepared::Add(n, id)
        }
        Action::Remove(node, name) => {
            let n = bitmap_node(graph, &node)?;
            let pending = n.bitmaps().prepare_remove(&name).map_err(generic)?;
            Prepared::Remove(n, pending)
        }
        Action::Clear(node, name) => {
            let n = bitmap_node(graph, &node)?;
            let backup = n.bitmaps().clear_with_backup(&name).map_err(generic)?;
            Prepared::Restore(n, backup)
        }
        Action::Enable(node, name) => set_enabled(graph, &node, &name, true)?,
        Action::Disable(node, name) => set_enabled(graph, &node, &name, false)?,
        Action::Merge(node, target, sources) => {
            let n = bitmap_node(graph, &node)?;
            let backup = n
                .bitmaps()
                .merge_with_backup(&target, &sources, &resolver(graph))
                .map_err(generic)?;
            Prepared::Restore(n, backup)
        }
        Action::Unsupported(kind) => {
            return Err(QmpError::generic(format!(
                "Action '{kind}' is not supported by blockdelta yet"
            )));
        }
    }))
}

fn set_enabled(
    graph: &crate::block::graph::BlockGraph,
    node: &str,
    name: &str,
    enable: bool,
) -> Result<Prepared, QmpError> {
    let n = bitmap_node(graph, node)?;
    let was = if enable { n.bitmaps().enable(name) } else { n.bitmaps().disable(name) }
        .map_err(generic)?;
    let id = n.bitmaps().find(name).ok_or_else(|| generic("the bitmap vanished"))?;
    Ok(Prepared::SetEnabled(n, id, was))
}
