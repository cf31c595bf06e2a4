//! Block exports: block nodes served to clients over NBD, set up with qemu-storage-daemon's
//! `--nbd-server` and `--export` options (and, later, the QMP commands of the same names),
//! checked with QEMU's rules and texts.

pub mod nbd;
pub mod options;

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};

use ::nbd::export::Exports;
use ::nbd::server::{Server, ServerHandle};

use self::nbd::{CONTEXT_DIRTY_BITMAP_PREFIX, ExportedBitmap, NodeExport, NodeExportConfig};
pub use self::options::{BlockExportOptions, ExportBitmap, ListenAddress, NbdServerOptions};
use crate::block::dirty_bitmap::{BitmapError, BitmapId, Checks};
use crate::block::graph::BlockGraph;
use crate::block::node::Node;
use crate::block::options::OptionsError;

/// Longest export name and description (NBD's string limit).
pub const MAX_NBD_STRING: usize = 4096;

/// Why an export or the NBD server could not be set up. `Display` is QEMU's text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// The options were refused.
    #[error(transparent)]
    Options(#[from] OptionsError),
    /// An export needs a running NBD server.
    #[error("NBD server not running")]
    ServerNotRunning,
    /// `nbd-server-start` twice.
    #[error("NBD server already running")]
    ServerAlreadyRunning,
    /// Binding the listening socket failed.
    #[error("Failed to bind socket{}: {}", .path.as_ref().map(|p| format!(" to {p}")).unwrap_or_default(), crate::block::graph::strerror(.source))]
    Bind {
        /// The unix socket path, if any.
        path: Option<String>,
        /// Why.
        source: io::Error,
    },
    /// The export id is taken.
    #[error("Block export id '{0}' is already in use")]
    DuplicateId(String),
    /// The export name is taken.
    #[error("NBD server already has export named '{0}'")]
    DuplicateName(String),
    /// No export with that id.
    #[error("Export '{0}' is not found")]
    NotFound(String),
    /// The export name is longer than NBD allows.
    #[error("export name '{0}' too long")]
    NameTooLong(String),
    /// The description is longer than NBD allows.
    #[error("description '{0}' too long")]
    DescriptionTooLong(String),
    /// No node of that name.
    #[error("Cannot find device='' nor node-name='{0}'")]
    NodeNotFound(String),
    /// A writable export of a read-only node.
    #[error("Cannot export read-only node as writable")]
    ReadOnlyNode,
    /// blockdelta has no iothreads.
    #[error("iothread \"{0}\" not found")]
    IothreadNotFound(String),
    /// No bitmap of that name on the node or its backing chain.
    #[error("Bitmap '{0}' is not found")]
    BitmapNotFound(String),
    /// An enabled bitmap on a writable node would change under a read-only export.
    #[error("Enabled bitmap '{0}' incompatible with readonly export")]
    EnabledBitmapReadOnly(String),
    /// The bitmap cannot be exported (busy or inconsistent).
    #[error(transparent)]
    Bitmap(#[from] BitmapError),
}

/// A running NBD server.
struct NbdServerState {
    registry: Arc<Exports>,
    multi_conn: bool,
    listener: ServerHandle,
}

/// An export, by id.
struct ExportEntry {
    name: String,
    export: Arc<NodeExport>,
}

/// The daemon's exports and its NBD server.
pub struct ExportManager {
    graph: Arc<BlockGraph>,
    server: Mutex<Option<NbdServerState>>,
    exports: Mutex<BTreeMap<String, ExportEntry>>,
}

impl std::fmt::Debug for ExportManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportManager").field("exports", &self.ids()).finish_non_exhaustive()
    }
}

/// An export's record, for queries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Its id.
    pub id: String,
    /// The NBD export name.
    pub name: String,
    /// The exported node.
    pub node_name: String,
}

impl ExportManager {
    /// No server and no exports, over `graph`.
    pub fn new(graph: Arc<BlockGraph>) -> Self {
        ExportManager { graph, server: Mutex::new(None), exports: Mutex::new(BTreeMap::new()) }
    }

    /// Starts the NBD server (`--nbd-server` / `nbd-server-start`).
    pub async fn start_nbd_server(&self, options: NbdServerOptions) -> Result<(), ExportError> {
        if self.lock_server().is_some() {
            return Err(ExportError::ServerAlreadyRunning);
        }
        let registry = Arc::new(Exports::new());
        let server = Server::new(registry.clone()).with_max_connections(options.max_connections);
        let listener = match &options.addr {
            ListenAddress::Unix(path) => server.listen_unix(path).await.map_err(|source| {
                ExportError::Bind { path: Some(path.display().to_string()), source }
            })?,
            ListenAddress::Inet { host, port } => {
                let port: u16 = port.parse().map_err(|_| ExportError::Bind {
                    path: None,
                    source: io::Error::new(io::ErrorKind::InvalidInput, "Invalid port"),
                })?;
                server
                    .listen_tcp((host.as_str(), port))
                    .await
                    .map_err(|source| ExportError::Bind { path: None, source })?
            }
        };
        let mut state = self.lock_server();
        if state.is_some() {
            return Err(ExportError::ServerAlreadyRunning);
        }
        *state =
            Some(NbdServerState { registry, multi_conn: options.max_connections != 1, listener });
        Ok(())
    }

    /// Stops the NBD server and removes its exports (`nbd-server-stop`). Connections end;
    /// an export's bitmaps are released once its last request has finished.
    pub fn stop_nbd_server(&self) -> Result<(), ExportError> {
        let state = self.lock_server().take().ok_or(ExportError::ServerNotRunning)?;
        self.lock_exports().clear();
        drop(state);
        Ok(())
    }

    /// Adds an export (`--export` / `block-export-add`), with QEMU's checks in QEMU's
    /// order.
    pub fn add(&self, options: BlockExportOptions) -> Result<(), ExportError> {
        let (registry, multi_conn) = {
            let server = self.lock_server();
            let s = server.as_ref().ok_or(ExportError::ServerNotRunning)?;
            (s.registry.clone(), s.multi_conn)
        };
        if self.lock_exports().contains_key(&options.id) {
            return Err(ExportError::DuplicateId(options.id));
        }
        let node = self
            .graph
            .find(&options.node_name)
            .ok_or_else(|| ExportError::NodeNotFound(options.node_name.clone()))?;
        if let Some(iothread) = options.iothread {
            return Err(ExportError::IothreadNotFound(iothread));
        }
        if options.writable && node.read_only() {
            return Err(ExportError::ReadOnlyNode);
        }
        if options.name.len() > MAX_NBD_STRING {
            return Err(ExportError::NameTooLong(options.name));
        }
        let description = options.description.unwrap_or_default();
        if description.len() > MAX_NBD_STRING {
            return Err(ExportError::DescriptionTooLong(description));
        }
        if registry.get(&options.name).is_some_and(|(name, _)| name == options.name) {
            return Err(ExportError::DuplicateName(options.name));
        }
        let mut found: Vec<(Arc<Node>, BitmapId, String)> = Vec::new();
        for bitmap in &options.bitmaps {
            let (holder, id) = match bitmap {
                ExportBitmap::Local(name) => {
                    let (holder, id) = find_in_chain(&node, name)
                        .ok_or_else(|| ExportError::BitmapNotFound(name.clone()))?;
                    holder.bitmaps().lookup(name, Checks::ALLOW_RO)?;
                    let recording = holder.bitmaps().info(id)?.recording;
                    if !options.writable && !holder.read_only() && recording {
                        return Err(ExportError::EnabledBitmapReadOnly(name.clone()));
                    }
                    (holder, id)
                }
                // QEMU skips the enabled-bitmap check for this form (verified).
                ExportBitmap::On { node: holder_name, name } => {
                    let holder = self
                        .graph
                        .find(holder_name)
                        .ok_or_else(|| ExportError::NodeNotFound(holder_name.clone()))?;
                    let id = holder.bitmaps().lookup(name, Checks::ALLOW_RO)?;
                    (holder, id)
                }
            };
            found.push((holder, id, bitmap.name().to_string()));
        }
        // Busy from here on; released when the export goes.
        let mut exported = Vec::with_capacity(found.len());
        for (holder, id, name) in found {
            holder.bitmaps().set_busy(id, true)?;
            exported.push(ExportedBitmap {
                context: format!("{CONTEXT_DIRTY_BITMAP_PREFIX}{name}"),
                holder,
                id,
            });
        }
        let config = NodeExportConfig {
            writable: options.writable,
            writethrough: options.writethrough,
            description,
            allocation_depth: options.allocation_depth,
            multi_conn,
        };
        let export = Arc::new(NodeExport::new(node, config, exported));
        registry.insert(options.name.clone(), export.clone());
        self.lock_exports().insert(options.id, ExportEntry { name: options.name, export });
        Ok(())
    }

    /// Removes the export `id` (`block-export-del`). Connections that use it keep it
    /// until they end.
    pub fn remove(&self, id: &str) -> Result<(), ExportError> {
        let entry =
            self.lock_exports().remove(id).ok_or_else(|| ExportError::NotFound(id.into()))?;
        if let Some(server) = self.lock_server().as_ref() {
            server.registry.remove(&entry.name);
        }
        Ok(())
    }

    /// The exports, by id.
    pub fn query(&self) -> Vec<ExportInfo> {
        self.lock_exports()
            .iter()
            .map(|(id, e)| ExportInfo {
                id: id.clone(),
                name: e.name.clone(),
                node_name: e.export.node().name().to_string(),
            })
            .collect()
    }

    /// The export ids.
    pub fn ids(&self) -> Vec<String> {
        self.lock_exports().keys().cloned().collect()
    }

    /// Stops the server (if running) at once and drops every export: connections are
    /// cut off, requests in flight get no reply.
    pub fn shutdown(&self) {
        // Exports exist only while the server runs, and stopping it drops them; not
        // running is no error here.
        let _ = self.stop_nbd_server();
    }

    /// What a daemon's clean shutdown does: the server (if running) stops accepting
    /// clients and requests, the requests already received complete and are answered,
    /// then the connections close (see [`ServerHandle::shutdown`]; after `grace` what
    /// is left is dropped unanswered), and every export is dropped. When this returns no
    /// request is running any more, so none can be answered later, e.g. with an error
    /// while the runtime shuts down.
    pub async fn drain(&self, grace: std::time::Duration) {
        let Some(state) = self.lock_server().take() else { return };
        self.lock_exports().clear();
        state.listener.shutdown(grace).await;
    }

    fn lock_server(&self) -> std::sync::MutexGuard<'_, Option<NbdServerState>> {
        self.server.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_exports(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, ExportEntry>> {
        self.exports.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The bitmap `name` on `node` or, failing that, down its backing chain.
fn find_in_chain(node: &Arc<Node>, name: &str) -> Option<(Arc<Node>, BitmapId)> {
    let mut current = Some(node.clone());
    // A chain is finite, but a bound keeps a mistake from looping.
    for _ in 0..1024 {
        let n = current?;
        if let Some(id) = n.bitmaps().find(name) {
            return Some((n, id));
        }
        current = n.backing_node();
    }
    None
}
