//! QMP commands on block nodes: `blockdev-add`, `blockdev-del`,
//! `query-named-block-nodes`, `query-block` and `block_resize`, with QEMU 10.0.2's
//! argument forms and texts (taken from qemu-storage-daemon).

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use qcow2::bitmaps::{self, BitmapsExtension};
use qcow2::header::{
    AUTOCLEAR_BITMAPS, COMPAT_LAZY_REFCOUNTS, COMPRESSION_ZSTD, EXT_BITMAPS, Header,
    INCOMPAT_CORRUPT, INCOMPAT_DIRTY, INCOMPAT_EXTENDED_L2,
};
use qcow2::storage::Storage;
use serde_json::{Map, Value, json};

use super::protocol::QmpError;
use super::{Qmp, bitmap_record, finish, generic, reader};
use crate::block::node::{DetectZeroes, Node};
use crate::block::off_event_loop;
use crate::block::options::Syntax;

/// Runs `name` if it is one of this module's commands; `None` otherwise.
pub(super) async fn execute(qmp: &Qmp, name: &str, args: Value) -> Option<Result<Value, QmpError>> {
    Some(match name {
        // Opening reads the image, closing stores bitmaps and fsyncs, a query reads
        // headers and bitmap directories: all off the event loop.
        "blockdev-add" => {
            off_event_loop(|| qmp.graph.add(args, Syntax::Json).map(|_| json!({})).map_err(generic))
        }
        "blockdev-del" => off_event_loop(|| blockdev_del(qmp, args)),
        "query-named-block-nodes" => off_event_loop(|| query_named_block_nodes(qmp, args)),
        "query-block" => finish(match reader(args) {
            Ok(r) => r,
            Err(e) => return Some(Err(e)),
        })
        // qemu-storage-daemon has no BlockBackends with names: always empty.
        .map(|()| json!([])),
        "block_resize" => block_resize(qmp, args).await,
        _ => return None,
    })
}

fn blockdev_del(qmp: &Qmp, args: Value) -> Result<Value, QmpError> {
    let mut r = reader(args)?;
    let name = r.require_str("node-name").map_err(generic)?;
    finish(r)?;
    // Exported nodes are used outside the graph.
    let users: Vec<String> = qmp.exports.query().into_iter().map(|e| e.node_name).collect();
    let removed = qmp.graph.remove(&name, &users).map_err(generic)?;
    for node in removed {
        if let Err(e) = node.close() {
            // The node is gone either way, as in QEMU; say why its close failed.
            eprintln!("blockdelta: closing node '{}': {e}", node.name());
        }
    }
    Ok(json!({}))
}

fn query_named_block_nodes(qmp: &Qmp, args: Value) -> Result<Value, QmpError> {
    let mut r = reader(args)?;
    // Without `flat`, QEMU nests the image records of the chain below a node (a
    // filter's child, a backing node) under `image.backing-image`.
    let flat = r.take_bool("flat").map_err(generic)?.unwrap_or(false);
    finish(r)?;
    Ok(Value::Array(qmp.graph.nodes_newest_first().iter().map(|n| node_record(n, flat)).collect()))
}

async fn block_resize(qmp: &Qmp, args: Value) -> Result<Value, QmpError> {
    let mut r = reader(args)?;
    let device = r.take_str("device").map_err(generic)?;
    let node_name = r.take_str("node-name").map_err(generic)?;
    let size = r.take_value("size");
    finish(r)?;
    let size = match size {
        None => return Err(QmpError::generic("Parameter 'size' is missing")),
        Some(Value::Number(n)) if n.is_i64() => n.as_i64().unwrap_or(-1),
        Some(_) => {
            return Err(QmpError::generic("Invalid parameter type for 'size', expected: integer"));
        }
    };
    // `device` names BlockBackends, which qemu-storage-daemon does not have; only
    // `node-name` finds a node.
    let node = node_name.as_deref().and_then(|n| qmp.graph.find(n)).ok_or_else(|| {
        QmpError::generic(format!(
            "Cannot find device='{}' nor node-name='{}'",
            device.unwrap_or_default(),
            node_name.unwrap_or_default()
        ))
    })?;
    if size < 0 {
        return Err(QmpError::generic("Parameter 'size' expects a >0 size"));
    }
    // An export does not share the resize permission (verified for a read-only export).
    if qmp.exports.query().iter().any(|e| e.node_name == node.name()) {
        let name = node.name();
        return Err(QmpError::generic(format!(
            "Permission conflict on node '{name}': permissions 'resize' are both required by an unnamed block device (uses node '{name}' as 'root' child) and unshared by an unnamed block device (uses node '{name}' as 'root' child)."
        )));
    }
    node.resize(size as u64).await.map_err(generic)?;
    Ok(json!({}))
}

/// QEMU's `BlockDeviceInfo` for a node, as far as blockdelta knows it.
fn node_record(node: &Arc<Node>, flat: bool) -> Value {
    let options = node.options();
    let mut record = Map::new();
    let file = display_name(node);
    record.insert("node-name".into(), json!(node.name()));
    record.insert("drv".into(), json!(node.driver_name()));
    record.insert("ro".into(), json!(node.read_only()));
    record.insert("file".into(), json!(file));
    let depth = if flat { backing_depth(node) } else { chain_below(node).len() as u64 };
    record.insert("backing_file_depth".into(), json!(depth));
    record.insert("encrypted".into(), json!(false));
    let detect_zeroes = match options.detect_zeroes {
        DetectZeroes::Off => "off",
        DetectZeroes::On => "on",
        DetectZeroes::Unmap => "unmap",
    };
    record.insert("detect_zeroes".into(), json!(detect_zeroes));
    // No throttling in blockdelta.
    for key in ["bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"] {
        record.insert(key.into(), json!(0));
    }
    record.insert("write_threshold".into(), json!(0));
    record.insert("active".into(), json!(true));
    record.insert(
        "cache".into(),
        json!({"writeback": true, "direct": options.direct, "no-flush": options.no_flush}),
    );
    let mut image = image_record(node, &file);
    if let Some(backing) = image.get("backing-filename").cloned() {
        record.insert("backing_file".into(), backing);
    }
    if !flat {
        // Innermost first, each nested into the record above it.
        let mut below: Option<Value> = None;
        for n in chain_below(node).iter().rev() {
            let mut record = image_record(n, &display_name(n));
            if let Some(inner) = below.take() {
                record["backing-image"] = inner;
            }
            below = Some(record);
        }
        if let Some(inner) = below {
            image["backing-image"] = inner;
        }
    }
    record.insert("image".into(), image);
    let bitmaps = node.bitmaps().query();
    if !bitmaps.is_empty() {
        record.insert(
            "dirty-bitmaps".into(),
            Value::Array(bitmaps.iter().map(bitmap_record).collect()),
        );
    }
    Value::Object(record)
}

/// The node's filename as QEMU shows it: the host file, or `blkdebug::FILE` for a
/// blkdebug node (QEMU's legacy filename syntax).
fn display_name(node: &Node) -> String {
    let path = node.filename().map(|p| p.display().to_string()).unwrap_or_default();
    match node.driver_name() {
        "blkdebug" => format!("blkdebug::{path}"),
        _ => path,
    }
}

/// The nodes QEMU walks below `node` for nested records: a filter's (blkdebug's)
/// child, or the backing node, repeatedly.
fn chain_below(node: &Arc<Node>) -> Vec<Arc<Node>> {
    let next = |n: &Arc<Node>| match n.driver_name() {
        "blkdebug" => n.children().first().cloned(),
        _ => n.backing_node(),
    };
    let mut chain = Vec::new();
    let mut current = next(node);
    while let Some(n) = current.filter(|_| chain.len() < 1024) {
        current = next(&n);
        chain.push(n);
    }
    chain
}

/// How many backing nodes of the graph lie under the node.
fn backing_depth(node: &Arc<Node>) -> u64 {
    let mut depth = 0;
    let mut current = node.backing_node();
    // A chain is finite; the bound keeps a mistake from looping.
    while let Some(n) = current.filter(|_| depth < 1024) {
        depth += 1;
        current = n.backing_node();
    }
    depth
}

/// QEMU's `ImageInfo` of a node.
fn image_record(node: &Node, filename: &str) -> Value {
    let mut image = Map::new();
    let driver = node.driver_name();
    let mut virtual_size = node.len();
    if driver == "file" {
        // QEMU's file driver reports lengths in whole sectors.
        virtual_size = virtual_size.next_multiple_of(512);
    }
    image.insert("virtual-size".into(), json!(virtual_size));
    image.insert("filename".into(), json!(filename));
    image.insert("format".into(), json!(driver));
    if driver != "blkdebug"
        && let Some(path) = node.filename()
        && let Ok(meta) = std::fs::metadata(&path)
    {
        image.insert("actual-size".into(), json!(meta.blocks() * 512));
    }
    image.insert("dirty-flag".into(), json!(false));
    match driver {
        "file" => {
            image.insert("format-specific".into(), json!({"type": "file", "data": {}}));
        }
        "qcow2" => {
            if let Some(storage) = node.children().first().and_then(|f| f.storage()) {
                qcow2_image_info(&mut image, storage.as_ref(), node.filename().as_deref());
            }
        }
        _ => {}
    }
    Value::Object(image)
}

/// The qcow2 members of `ImageInfo`, from the header and bitmap directory on disk (as
/// QEMU reports them: loaded bitmaps show `in-use` while the image is open writable).
fn qcow2_image_info(image: &mut Map<String, Value>, storage: &dyn Storage, path: Option<&Path>) {
    let Ok(len) = storage.len() else { return };
    let Ok(header) = qcow2::image::read_header(storage, len) else { return };
    image.insert("cluster-size".into(), json!(header.cluster_size()));
    image.insert("dirty-flag".into(), json!(header.incompatible_features & INCOMPAT_DIRTY != 0));
    image.insert(
        "format-specific".into(),
        json!({"type": "qcow2", "data": qcow2_format_specific(storage, &header)}),
    );
    if let Some(name) = &header.backing_file {
        let name = String::from_utf8_lossy(name).into_owned();
        let full = match path.and_then(Path::parent) {
            Some(dir) if Path::new(&name).is_relative() => dir.join(&name),
            _ => Path::new(&name).to_path_buf(),
        };
        image.insert("backing-filename".into(), json!(name));
        image.insert("full-backing-filename".into(), json!(full.display().to_string()));
        if let Some(format) = header.backing_format() {
            image.insert("backing-filename-format".into(), json!(format));
        }
    }
}

fn qcow2_format_specific(storage: &dyn Storage, header: &Header) -> Value {
    let compression = if header.compression_type == COMPRESSION_ZSTD { "zstd" } else { "zlib" };
    if header.version < 3 {
        return json!({"compat": "0.10", "compression-type": compression,
                      "refcount-bits": header.refcount_bits()});
    }
    let mut data = json!({
        "compat": "1.1",
        "compression-type": compression,
        "lazy-refcounts": header.compatible_features & COMPAT_LAZY_REFCOUNTS != 0,
        "refcount-bits": header.refcount_bits(),
        "corrupt": header.incompatible_features & INCOMPAT_CORRUPT != 0,
        "extended-l2": header.incompatible_features & INCOMPAT_EXTENDED_L2 != 0,
    });
    let cluster_size = header.cluster_size();
    let entries = header
        .extension(EXT_BITMAPS)
        .filter(|_| header.autoclear_features & AUTOCLEAR_BITMAPS != 0)
        .and_then(|ext| BitmapsExtension::parse(ext, cluster_size).ok())
        .and_then(|ext| bitmaps::read_directory(storage, &ext, cluster_size, header.size).ok());
    if let Some(entries) = entries {
        data["bitmaps"] = crate::block::qcow2::bitmap_info_list(&entries);
    }
    data
}
