//! The dirty-bitmap commands (`block-dirty-bitmap-*`, `x-debug-block-dirty-bitmap-sha256`):
//! arguments read with QEMU's texts, then the bitmap manager. The argument readers are
//! shared with the transaction actions of the same names.

use std::sync::Arc;

use serde_json::{Value, json};

use super::protocol::QmpError;
use super::{finish, generic};
use crate::block::dirty_bitmap::{AddBitmap, BitmapRef, IntentChoice};
use crate::block::graph::BlockGraph;
use crate::block::node::Node;
use crate::block::options::{OptionsReader, Syntax};

/// `block-dirty-bitmap-add`'s arguments: the node's name and the request.
pub(super) fn add_args(args: Value, at: &str) -> Result<(String, AddBitmap), QmpError> {
    let mut r = reader_at(args, at)?;
    let node = r.require_str("node").map_err(generic)?;
    let name = r.require_str("name").map_err(generic)?;
    let granularity = r.take_u64("granularity").map_err(generic)?;
    if granularity.is_some_and(|g| g > u64::from(u32::MAX)) {
        return Err(QmpError::generic("Parameter 'granularity' expects uint32_t"));
    }
    let persistent = r.take_bool("persistent").map_err(generic)?.unwrap_or(false);
    let disabled = r.take_bool("disabled").map_err(generic)?.unwrap_or(false);
    // blockdelta's own: persistent bitmaps are crash-safe unless told otherwise.
    let crash_safe = r.take_bool("x-crash-safe").map_err(generic)?;
    let region = r.take_u64("x-intent-granularity").map_err(generic)?;
    finish(r)?;
    let intent = match (crash_safe, region) {
        (Some(false), Some(_)) => {
            return Err(QmpError::generic(
                "x-intent-granularity cannot be given with x-crash-safe=false",
            ));
        }
        (Some(false), None) => IntentChoice::Off,
        (_, Some(bytes)) => IntentChoice::Region(bytes),
        (_, None) => IntentChoice::Default,
    };
    Ok((node, AddBitmap { name, granularity, persistent, disabled, intent }))
}

/// `BlockDirtyBitmap`: `{node, name}`.
pub(super) fn ref_args(args: Value, at: &str) -> Result<(String, String), QmpError> {
    let mut r = reader_at(args, at)?;
    let node = r.require_str("node").map_err(generic)?;
    let name = r.require_str("name").map_err(generic)?;
    finish(r)?;
    Ok((node, name))
}

/// `BlockDirtyBitmapMerge`: the node, the target's name and the sources.
pub(super) fn merge_args(
    args: Value,
    at: &str,
) -> Result<(String, String, Vec<BitmapRef>), QmpError> {
    let mut r = reader_at(args, at)?;
    let node = r.require_str("node").map_err(generic)?;
    let target = r.require_str("target").map_err(generic)?;
    let list_path = r.path("bitmaps");
    let list = r
        .take_value("bitmaps")
        .ok_or_else(|| QmpError::generic(format!("Parameter '{list_path}' is missing")))?;
    finish(r)?;
    let Value::Array(list) = list else {
        return Err(QmpError::generic(format!(
            "Invalid parameter type for '{list_path}', expected: array"
        )));
    };
    let mut sources = Vec::with_capacity(list.len());
    for (i, item) in list.into_iter().enumerate() {
        match item {
            Value::String(name) => sources.push(BitmapRef::local(&name)),
            Value::Object(_) => {
                let mut b = OptionsReader::new(item, &format!("{list_path}[{i}]"), Syntax::Json)
                    .map_err(generic)?;
                let node = b.require_str("node").map_err(generic)?;
                let name = b.require_str("name").map_err(generic)?;
                finish(b)?;
                sources.push(BitmapRef::on(&node, &name));
            }
            _ => {
                return Err(QmpError::generic(format!(
                    "Invalid parameter type for '{list_path}[{i}]', expected: BlockDirtyBitmapOrStr"
                )));
            }
        }
    }
    Ok((node, target, sources))
}

/// A reader of arguments at `at` (empty for a command's own arguments, e.g.
/// `actions[0].data` inside a transaction: QEMU's error texts name the full path).
fn reader_at(args: Value, at: &str) -> Result<OptionsReader, QmpError> {
    OptionsReader::new(args, at, Syntax::Json).map_err(generic)
}

/// The node named `name`, for `add` (`Cannot find device=… nor node-name=…`).
pub(super) fn add_node(graph: &BlockGraph, name: &str) -> Result<Arc<Node>, QmpError> {
    graph.find(name).ok_or_else(|| {
        QmpError::generic(format!("Cannot find device='{name}' nor node-name='{name}'"))
    })
}

/// The node named `name`, for the other bitmap commands (`Node '…' not found`).
pub(super) fn bitmap_node(graph: &BlockGraph, name: &str) -> Result<Arc<Node>, QmpError> {
    graph.find(name).ok_or_else(|| QmpError::generic(format!("Node '{name}' not found")))
}

/// A resolver of merge sources on other nodes.
pub(super) fn resolver(
    graph: &BlockGraph,
) -> impl Fn(&str) -> Option<Arc<crate::block::dirty_bitmap::NodeBitmaps>> + '_ {
    |name| graph.find(name).map(|n| n.bitmaps().clone())
}

/// `x-blockdelta-query-crash-safe {node}`: the node's crash-safe bitmaps, with their
/// region size and whether their marks reach a stored copy yet (`stored`: false only
/// between an add and the end of its command, or after a failed checkpoint).
fn query_crash_safe(graph: &BlockGraph, args: Value) -> Result<Value, QmpError> {
    let mut r = reader_at(args, "")?;
    let node = r.require_str("node").map_err(generic)?;
    finish(r)?;
    let n = bitmap_node(graph, &node)?;
    let list: Vec<Value> = n
        .bitmaps()
        .crash_safe_bitmaps()
        .into_iter()
        .map(|(name, region, stored)| {
            json!({"name": name, "intent-granularity": region, "stored": stored})
        })
        .collect();
    Ok(Value::Array(list))
}

/// Runs one of the bitmap commands.
pub(super) fn execute(graph: &BlockGraph, command: &str, args: Value) -> Result<Value, QmpError> {
    match command {
        "x-blockdelta-query-crash-safe" => return query_crash_safe(graph, args),
        "block-dirty-bitmap-add" => {
            let (node, request) = add_args(args, "")?;
            if request.name.is_empty() {
                return Err(QmpError::generic("Bitmap name cannot be empty"));
            }
            add_node(graph, &node)?.bitmaps().add(&request).map_err(generic)?;
        }
        "block-dirty-bitmap-merge" => {
            let (node, target, sources) = merge_args(args, "")?;
            let n = bitmap_node(graph, &node)?;
            n.bitmaps().merge(&target, &sources, &resolver(graph)).map_err(generic)?;
        }
        _ => {
            let (node, name) = ref_args(args, "")?;
            let n = bitmap_node(graph, &node)?;
            let bitmaps = n.bitmaps();
            match command {
                "block-dirty-bitmap-remove" => bitmaps.remove(&name).map_err(generic)?,
                "block-dirty-bitmap-clear" => bitmaps.clear(&name).map_err(generic)?,
                "block-dirty-bitmap-enable" => bitmaps.enable(&name).map(drop).map_err(generic)?,
                "block-dirty-bitmap-disable" => {
                    bitmaps.disable(&name).map(drop).map_err(generic)?
                }
                _ => {
                    let sha = bitmaps.sha256(&name).map_err(generic)?;
                    return Ok(json!({"sha256": sha}));
                }
            }
        }
    }
    Ok(json!({}))
}
