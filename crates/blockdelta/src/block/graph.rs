//! The block graph: nodes by name, opened from `--blockdev` / `blockdev-add` options.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use qcow2::storage::{FileOptions, Locking};
use serde_json::Value;

use super::blkdebug::{self, BlkdebugDriver};
use super::file::{FileDriver, FileLength};
use super::node::{BlockDriver, DetectZeroes, Node, NodeOptions};
use super::options::{OptionsError, OptionsReader, Syntax, parse_keyval_or_json, valid_node_name};
use super::qcow2::{Backing, Qcow2Driver};
use super::raw::RawDriver;

/// Why a node could not be added. `Display` is QEMU's text where it has one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GraphError {
    /// The options were refused.
    #[error(transparent)]
    Options(#[from] OptionsError),
    /// A referenced node does not exist.
    #[error("Cannot find device='{0}' nor node-name='{0}'")]
    NodeNotFound(String),
    /// The node name is taken.
    #[error("Duplicate nodes with node-name='{0}'")]
    Duplicate(String),
    /// A file could not be opened.
    #[error("Could not open '{path}': {}", strerror(source))]
    Open {
        /// The file.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// The driver refused to open the node.
    #[error("{0}")]
    Driver(String),
}

/// Why a node could not be removed (`blockdev-del`). `Display` is QEMU's text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RemoveError {
    /// No node of that name was added at the top level (nested children cannot be
    /// removed on their own, as in QEMU).
    #[error("Failed to find node with node-name='{0}'")]
    NotFound(String),
    /// An export (or another user outside the graph) uses the node.
    #[error("Node {0} is in use")]
    InUse(String),
    /// Another node uses it as a child.
    #[error("Block device {0} is in use")]
    ChildInUse(String),
}

pub(crate) use super::strerror;

/// The nodes of a daemon, by node name.
#[derive(Debug, Default)]
pub struct BlockGraph {
    nodes: Mutex<BTreeMap<String, Arc<Node>>>,
    next_auto_name: AtomicU64,
    /// One add at a time, so that a failed add can remove exactly the children it made.
    adding: Mutex<()>,
    /// Names in the order the nodes were made, and which were added at the top level;
    /// locked after `nodes` when both are held.
    meta: Mutex<Meta>,
}

#[derive(Debug, Default)]
struct Meta {
    created: Vec<String>,
    roots: std::collections::BTreeSet<String>,
}

impl BlockGraph {
    /// An empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    /// The node named `name`.
    pub fn find(&self, name: &str) -> Option<Arc<Node>> {
        self.nodes.lock().unwrap_or_else(PoisonError::into_inner).get(name).cloned()
    }

    /// All nodes, in name order.
    pub fn nodes(&self) -> Vec<Arc<Node>> {
        self.nodes.lock().unwrap_or_else(PoisonError::into_inner).values().cloned().collect()
    }

    /// All nodes, newest first (the order QEMU lists them in).
    pub fn nodes_newest_first(&self) -> Vec<Arc<Node>> {
        let nodes = self.lock_nodes();
        let meta = self.lock_meta();
        meta.created.iter().rev().filter_map(|name| nodes.get(name).cloned()).collect()
    }

    /// Removes the node `name`, which must have been added at the top level, and the
    /// nested children made with it that nothing else uses (`blockdev-del`). `users`
    /// are the nodes used outside the graph (exported, in a job): such a node is
    /// refused, as is a node that another node uses as a child. Returns the removed
    /// nodes, users first: the order in which to close them.
    pub fn remove(&self, name: &str, users: &[String]) -> Result<Vec<Arc<Node>>, RemoveError> {
        self.remove_node(name, users, true)
    }

    /// Removes a node made by [`add_implicit`](Self::add_implicit) and its nested
    /// children that nothing else uses, with the same checks as [`remove`](Self::remove).
    pub fn remove_implicit(
        &self,
        name: &str,
        users: &[String],
    ) -> Result<Vec<Arc<Node>>, RemoveError> {
        self.remove_node(name, users, false)
    }

    fn remove_node(
        &self,
        name: &str,
        users: &[String],
        monitor_owned: bool,
    ) -> Result<Vec<Arc<Node>>, RemoveError> {
        let _adding = self.adding.lock().unwrap_or_else(PoisonError::into_inner);
        let mut nodes = self.lock_nodes();
        let mut meta = self.lock_meta();
        let node = match nodes.get(name) {
            Some(node) if meta.roots.contains(name) == monitor_owned => node.clone(),
            _ => return Err(RemoveError::NotFound(name.to_string())),
        };
        if users.iter().any(|u| u == name) {
            return Err(RemoveError::InUse(name.to_string()));
        }
        let used_by_other = |nodes: &BTreeMap<String, Arc<Node>>, n: &Arc<Node>| {
            nodes.values().any(|user| user.children().iter().any(|c| Arc::ptr_eq(c, n)))
        };
        if used_by_other(&nodes, &node) {
            return Err(RemoveError::ChildInUse(name.to_string()));
        }
        let mut removed = Vec::new();
        let mut pending = vec![node];
        while let Some(n) = pending.pop() {
            nodes.remove(n.name());
            meta.created.retain(|c| c != n.name());
            meta.roots.remove(n.name());
            for child in n.children() {
                let own = !meta.roots.contains(child.name())
                    && !users.iter().any(|u| u == child.name())
                    && nodes.contains_key(child.name())
                    && !used_by_other(&nodes, child);
                if own {
                    pending.push(child.clone());
                }
            }
            removed.push(n);
        }
        Ok(removed)
    }

    fn lock_meta(&self) -> std::sync::MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Removes every node from the graph and returns them with each node before the
    /// nodes it uses (a qcow2 node before its file), the order in which to close them.
    pub fn take_all_users_first(&self) -> Vec<Arc<Node>> {
        let mut rest: Vec<Arc<Node>> =
            std::mem::take(&mut *self.lock_nodes()).into_values().collect();
        *self.lock_meta() = Meta::default();
        let mut ordered = Vec::with_capacity(rest.len());
        while !rest.is_empty() {
            let used = |n: &Arc<Node>| {
                rest.iter().any(|user| user.children().iter().any(|c| Arc::ptr_eq(c, n)))
            };
            let (free, busy): (Vec<_>, Vec<_>) = rest.iter().cloned().partition(|n| !used(n));
            if free.is_empty() {
                // Cannot happen in a graph without cycles; close the rest in any order.
                ordered.extend(busy);
                break;
            }
            ordered.extend(free);
            rest = busy;
        }
        ordered
    }

    /// Adds a node from a `--blockdev` argument (key=value or JSON).
    pub fn add_from_str(&self, text: &str) -> Result<Arc<Node>, GraphError> {
        let (value, syntax) = parse_keyval_or_json(text)?;
        self.add(value, syntax)
    }

    /// Adds a node (and its nested children) from options; the root needs a node name.
    pub fn add(&self, options: Value, syntax: Syntax) -> Result<Arc<Node>, GraphError> {
        self.add_root(options, syntax, true)
    }

    /// Adds a node that the daemon opens for its own use (QEMU's implicitly opened
    /// nodes, such as `drive-backup`'s target): without a `node-name` it gets a
    /// generated one (`#blockNNN`), and `blockdev-del` cannot remove it; remove it with
    /// [`remove_implicit`](Self::remove_implicit).
    pub fn add_implicit(&self, options: Value) -> Result<Arc<Node>, GraphError> {
        self.add_root(options, Syntax::Json, false)
    }

    fn add_root(
        &self,
        options: Value,
        syntax: Syntax,
        monitor_owned: bool,
    ) -> Result<Arc<Node>, GraphError> {
        let _adding = self.adding.lock().unwrap_or_else(PoisonError::into_inner);
        let before: Vec<String> = self.lock_nodes().keys().cloned().collect();
        // An implicit root without a name is named like a nested child.
        let result = self.open(options, syntax, "", Inherited::default(), !monitor_owned);
        match &result {
            Ok(node) if monitor_owned => {
                self.lock_meta().roots.insert(node.name().to_string());
            }
            Ok(_) => {}
            Err(_) => {
                // Nested children opened before the failure go too.
                self.lock_nodes().retain(|name, _| before.contains(name));
                self.lock_meta().created.retain(|name| before.contains(name));
            }
        }
        result
    }

    fn lock_nodes(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Node>>> {
        self.nodes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn open(
        &self,
        options: Value,
        syntax: Syntax,
        prefix: &str,
        inherited: Inherited,
        auto_name: bool,
    ) -> Result<Arc<Node>, GraphError> {
        let mut r = OptionsReader::new(options, prefix, syntax)?;
        let driver = r.require_str("driver")?;
        if !["file", "raw", "qcow2", "blkdebug"].contains(&driver.as_str()) {
            return Err(OptionsError::BadValue { key: r.path("driver"), value: driver }.into());
        }
        let name = match r.take_str("node-name")? {
            Some(name) if !valid_node_name(&name) => {
                return Err(OptionsError::InvalidNodeName(name).into());
            }
            Some(name) => name,
            None if prefix.is_empty() && !auto_name => {
                return Err(GraphError::Driver(
                    "'node-name' must be specified for the root node".into(),
                ));
            }
            None => format!("#block{:03}", self.next_auto_name.fetch_add(1, Ordering::Relaxed) + 1),
        };
        if self.find(&name).is_some() {
            return Err(GraphError::Duplicate(name));
        }
        let (options, direct) = common_options(&mut r, inherited)?;
        // Every option is taken and checked before anything is opened, so a mistake in
        // the options is reported as such and opens nothing.
        let (driver, children): (Box<dyn BlockDriver>, Vec<Arc<Node>>) = match driver.as_str() {
            "file" => {
                let filename = r.require_str("filename")?;
                let locking = match r.take_enum("locking", &["auto", "on", "off"])?.as_deref() {
                    Some("off") => Locking::Off,
                    _ => Locking::Auto,
                };
                r.finish()?;
                let storage = FileOptions::new()
                    .write(!options.read_only)
                    .direct(direct)
                    .locking(locking)
                    .open(Path::new(&filename))
                    .map_err(|source| GraphError::Open { path: filename.clone(), source })?;
                let length =
                    if options.read_only { FileLength::Measured } else { FileLength::Tracked };
                let driver = FileDriver::new(Arc::new(storage), length)
                    .map_err(|source| GraphError::Open { path: filename, source })?;
                (Box::new(driver), Vec::new())
            }
            "qcow2" => {
                let file =
                    r.take_value("file").ok_or_else(|| OptionsError::Missing(r.path("file")))?;
                let file_path = r.path("file");
                let backing = r.take_value("backing");
                let backing_path = r.path("backing");
                r.finish()?;
                let inherit = Inherited {
                    read_only: Some(options.read_only),
                    direct: Some(direct),
                    no_flush: Some(options.no_flush),
                };
                let file = self.child(file, &file_path, syntax, inherit)?;
                let mut children = vec![file.clone()];
                let backing = match backing {
                    None => Backing::FromHeader,
                    Some(Value::Null) => Backing::None,
                    Some(Value::String(name)) if name.is_empty() => Backing::None,
                    Some(value) => {
                        let read_only = Inherited {
                            read_only: Some(true),
                            direct: Some(direct),
                            no_flush: Some(options.no_flush),
                        };
                        let node = self.child(value, &backing_path, syntax, read_only)?;
                        children.push(node.clone());
                        Backing::Node(node)
                    }
                };
                let driver = Qcow2Driver::open(file, backing, !options.read_only)
                    .map_err(GraphError::Driver)?;
                (Box::new(driver), children)
            }
            "blkdebug" => {
                let image_path = r.path("image");
                let (config, image) = blkdebug::parse_options(&mut r)?;
                r.finish()?;
                let inherit = Inherited {
                    read_only: Some(options.read_only),
                    direct: Some(direct),
                    no_flush: Some(options.no_flush),
                };
                let image = self.child(image, &image_path, syntax, inherit)?;
                blkdebug::check_align(config.align).map_err(GraphError::Driver)?;
                (Box::new(BlkdebugDriver::new(image.clone(), config)), vec![image])
            }
            _ => {
                let offset = r.take_u64("offset")?.unwrap_or(0);
                let size = r.take_u64("size")?;
                let file =
                    r.take_value("file").ok_or_else(|| OptionsError::Missing(r.path("file")))?;
                let file_path = r.path("file");
                r.finish()?;
                let inherit = Inherited {
                    read_only: Some(options.read_only),
                    direct: Some(direct),
                    no_flush: Some(options.no_flush),
                };
                let file = self.child(file, &file_path, syntax, inherit)?;
                let driver =
                    RawDriver::new(file.clone(), offset, size).map_err(GraphError::Driver)?;
                (Box::new(driver), vec![file])
            }
        };
        let node = Node::open(&name, driver, options, children).map_err(GraphError::Driver)?;
        let mut nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        if nodes.contains_key(&name) {
            return Err(GraphError::Duplicate(name));
        }
        nodes.insert(name.clone(), node.clone());
        self.lock_meta().created.push(name);
        Ok(node)
    }

    /// A child given as a node name or as nested options (`path` is its dotted key).
    fn child(
        &self,
        value: Value,
        path: &str,
        syntax: Syntax,
        inherited: Inherited,
    ) -> Result<Arc<Node>, GraphError> {
        match value {
            Value::String(name) => self.find(&name).ok_or(GraphError::NodeNotFound(name)),
            nested => self.open(nested, syntax, path, inherited, true),
        }
    }
}

/// What a nested child takes from its parent unless it says otherwise.
#[derive(Clone, Copy, Debug, Default)]
struct Inherited {
    read_only: Option<bool>,
    direct: Option<bool>,
    /// `cache.no-flush`, which children inherit as QEMU's do: a format node that skips
    /// flushes over a file node that makes them would still flush when closed.
    no_flush: Option<bool>,
}

/// The options every driver takes, and whether `cache.direct` asks for O_DIRECT.
fn common_options(
    r: &mut OptionsReader,
    inherited: Inherited,
) -> Result<(NodeOptions, bool), GraphError> {
    let read_only = r.take_bool("read-only")?.or(inherited.read_only).unwrap_or(false);
    let discard_unmap = match r.take_enum("discard", &["ignore", "off", "unmap", "on"])? {
        Some(d) => d == "unmap" || d == "on",
        None => false,
    };
    let detect_zeroes = match r.take_enum("detect-zeroes", &["off", "on", "unmap"])?.as_deref() {
        Some("on") => DetectZeroes::On,
        Some("unmap") => DetectZeroes::Unmap,
        _ => DetectZeroes::Off,
    };
    if detect_zeroes == DetectZeroes::Unmap && !discard_unmap {
        return Err(OptionsError::Conflict(
            "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap"
                .into(),
        )
        .into());
    }
    let (mut no_flush, mut direct) =
        (inherited.no_flush.unwrap_or(false), inherited.direct.unwrap_or(false));
    if let Some(cache) = r.take_value("cache") {
        let mut c = OptionsReader::new(cache, &r.path("cache"), r.syntax())?;
        direct = c.take_bool("direct")?.unwrap_or(direct);
        no_flush = c.take_bool("no-flush")?.unwrap_or(no_flush);
        c.finish()?;
    }
    for ignored in ["auto-read-only", "force-share"] {
        r.take_bool(ignored)?;
    }
    Ok((NodeOptions { read_only, discard_unmap, detect_zeroes, no_flush, direct }, direct))
}
