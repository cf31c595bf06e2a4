//! QMP, the QEMU Machine Protocol: the wire protocol ([`protocol`]), monitors on unix
//! sockets ([`monitor`]) and the commands, with QEMU's argument spellings, error classes
//! and texts.

mod bitmap_commands;
mod block_commands;
mod drive_backup;
mod job_commands;
pub mod monitor;
pub mod protocol;
mod transaction;

use std::sync::Arc;

use serde_json::{Map, Value, json};
use tokio::sync::{Notify, broadcast};

use self::protocol::{Command, QmpError};
use crate::block::dirty_bitmap::BitmapInfo;
use crate::block::graph::BlockGraph;
use crate::block::options::{OptionsReader, Syntax};
use crate::export::{BlockExportOptions, ExportManager, NbdServerOptions};

/// The commands this monitor knows, in the order `query-commands` lists them.
const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-version",
    "query-commands",
    "quit",
    "query-named-block-nodes",
    "query-block",
    "blockdev-add",
    "blockdev-del",
    "block_resize",
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
    "x-debug-block-dirty-bitmap-sha256",
    "x-blockdelta-query-crash-safe",
    "transaction",
    "nbd-server-start",
    "nbd-server-stop",
    "block-export-add",
    "block-export-del",
    "query-block-exports",
];

/// What the commands act on, shared by every monitor of a daemon.
#[derive(Debug)]
pub struct Qmp {
    /// The jobs (backups).
    jobs: Arc<crate::jobs::JobRegistry>,
    /// Held by every command, as QEMU's big lock: a transaction is atomic with respect
    /// to commands from other monitors.
    command_lock: tokio::sync::Mutex<()>,
    graph: Arc<BlockGraph>,
    exports: Arc<ExportManager>,
    events: broadcast::Sender<Value>,
    quit: Arc<Notify>,
    /// Called after each prepared action of a `transaction`, inside its drained
    /// section (tests use it to show that no write lands between two actions).
    transaction_hook: HookSlot,
}

/// Which nodes [`Qmp::checkpoint`] stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checkpoints {
    /// Nodes whose crash-safe bitmaps were written to (marked) since their last
    /// checkpoint, or whose checkpoint is due (the periodic checkpoint).
    Marked,
    /// Nodes whose stored copy lags behind.
    Wanted,
}

/// See [`Qmp::set_transaction_hook`].
pub type TransactionHook = Arc<dyn Fn(usize) + Send + Sync>;

#[derive(Default)]
struct HookSlot(std::sync::Mutex<Option<TransactionHook>>);

impl std::fmt::Debug for HookSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HookSlot")
    }
}

impl Qmp {
    /// Commands over `graph` and `exports`; `quit` is notified by the `quit` command.
    pub fn new(graph: Arc<BlockGraph>, exports: Arc<ExportManager>, quit: Arc<Notify>) -> Self {
        let (events, _) = broadcast::channel(1024);
        let sender = events.clone();
        let sink: crate::jobs::EventSink = Arc::new(move |name, data| {
            let _ = sender.send(protocol::event(name, Some(data)));
        });
        let jobs = Arc::new(crate::jobs::JobRegistry::new(sink));
        Qmp {
            jobs,
            command_lock: tokio::sync::Mutex::new(()),
            graph,
            exports,
            events,
            quit,
            transaction_hook: HookSlot::default(),
        }
    }

    /// Test support: `hook(i)` runs after the `i`-th action of every later `transaction`
    /// is prepared, while the transaction's nodes are drained.
    #[doc(hidden)]
    pub fn set_transaction_hook(&self, hook: Option<TransactionHook>) {
        *self.transaction_hook.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = hook;
    }

    fn transaction_hook(&self) -> Option<TransactionHook> {
        self.transaction_hook.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// A receiver of every event emitted from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Value> {
        self.events.subscribe()
    }

    /// Emits an event to every negotiated client.
    pub fn emit(&self, name: &str, data: Option<Value>) {
        let _ = self.events.send(protocol::event(name, data));
    }

    /// Asks the daemon to shut down (what `quit` does once its reply is sent).
    pub fn request_quit(&self) {
        self.quit.notify_one();
    }

    /// Runs a command (capabilities negotiation is the monitor's business). A command
    /// that left a crash-safe bitmap ahead of its stored copy (an add, an enable, a
    /// merge, a transaction of them) stores it again before the reply, so that a crash
    /// after the reply recovers what the command did.
    pub async fn execute(&self, cmd: Command) -> Result<Value, QmpError> {
        let _serialized = self.command_lock.lock().await;
        let result = self.execute_serialized(cmd).await;
        self.checkpoint_nodes(Checkpoints::Wanted).await;
        result
    }

    /// Stores the crash-safe bitmaps of every node again (all of them, or those with a
    /// checkpoint due), serialized with the commands so that none runs inside a
    /// transaction. Failures are reported and retried at the next call.
    pub async fn checkpoint(&self, which: Checkpoints) {
        let _serialized = self.command_lock.lock().await;
        self.checkpoint_nodes(which).await;
    }

    async fn checkpoint_nodes(&self, which: Checkpoints) {
        let nodes = self.graph.nodes();
        let _ = crate::block::off_event_loop(|| {
            for node in &nodes {
                let result = match which {
                    Checkpoints::Marked => node.bitmaps().checkpoint_if_marked(),
                    Checkpoints::Wanted => node.bitmaps().checkpoint_if_wanted(),
                };
                if let Err(e) = result {
                    eprintln!("warning: checkpoint of node '{}': {e}", node.name());
                }
            }
            Ok::<(), ()>(())
        });
    }

    async fn execute_serialized(&self, cmd: Command) -> Result<Value, QmpError> {
        let args = Value::Object(cmd.arguments);
        match cmd.name.as_str() {
            "qmp_capabilities" => {
                let mut r = reader(args)?;
                r.take_value("enable");
                finish(r)?;
                Ok(json!({}))
            }
            "query-version" => {
                finish(reader(args)?)?;
                Ok(protocol::version())
            }
            "query-commands" => {
                finish(reader(args)?)?;
                let all = COMMANDS.iter().chain(job_commands::COMMANDS);
                Ok(Value::Array(all.map(|c| json!({"name": c})).collect()))
            }
            // The monitor calls `request_quit` once the reply is sent.
            "quit" => {
                finish(reader(args)?)?;
                Ok(json!({}))
            }
            "block-dirty-bitmap-add"
            | "block-dirty-bitmap-remove"
            | "block-dirty-bitmap-clear"
            | "block-dirty-bitmap-enable"
            | "block-dirty-bitmap-disable"
            | "block-dirty-bitmap-merge"
            | "x-debug-block-dirty-bitmap-sha256"
            | "x-blockdelta-query-crash-safe" => {
                // Removing a persistent bitmap writes the image; a hash reads every
                // word of the bitmap.
                crate::block::off_event_loop(|| {
                    bitmap_commands::execute(&self.graph, &cmd.name, args)
                })
            }
            "transaction" => transaction::execute(self, args).await,
            "nbd-server-start" => {
                let options = nbd_server_options(args)?;
                self.exports.start_nbd_server(options).await.map_err(generic)?;
                Ok(json!({}))
            }
            "nbd-server-stop" => {
                finish(reader(args)?)?;
                self.exports.stop_nbd_server().map_err(generic)?;
                Ok(json!({}))
            }
            "block-export-add" => {
                let options =
                    BlockExportOptions::from_value(args, Syntax::Json).map_err(generic)?;
                self.exports.add(options).map_err(generic)?;
                Ok(json!({}))
            }
            "block-export-del" => {
                let mut r = reader(args)?;
                let id = r.require_str("id").map_err(generic)?;
                r.take_enum("mode", &["safe", "hard"]).map_err(generic)?;
                finish(r)?;
                self.exports.remove(&id).map_err(generic)?;
                self.emit("BLOCK_EXPORT_DELETED", Some(json!({"id": id})));
                Ok(json!({}))
            }
            "query-block-exports" => {
                finish(reader(args)?)?;
                Ok(Value::Array(
                    self.exports
                        .query()
                        .into_iter()
                        .map(|e| {
                            json!({"type": "nbd", "id": e.id, "node-name": e.node_name,
                                   "shutting-down": false})
                        })
                        .collect(),
                ))
            }
            other if job_commands::COMMANDS.contains(&other) => {
                job_commands::execute(self, other, args).await.unwrap_or_else(|| {
                    Err(QmpError::command_not_found(format!(
                        "The command {other} has not been found"
                    )))
                })
            }
            other => match block_commands::execute(self, other, args).await {
                Some(result) => result,
                None => Err(QmpError::command_not_found(format!(
                    "The command {other} has not been found"
                ))),
            },
        }
    }

    /// The job registry.
    pub fn jobs(&self) -> &Arc<crate::jobs::JobRegistry> {
        &self.jobs
    }

    /// The graph the commands act on.
    pub(crate) fn graph(&self) -> &Arc<BlockGraph> {
        &self.graph
    }
}

fn generic(e: impl std::fmt::Display) -> QmpError {
    QmpError::generic(e.to_string())
}

fn reader(args: Value) -> Result<OptionsReader, QmpError> {
    OptionsReader::new(args, "", Syntax::Json).map_err(generic)
}

fn finish(r: OptionsReader) -> Result<(), QmpError> {
    r.finish().map_err(generic)
}

/// `nbd-server-start`'s arguments: `addr` is QEMU's legacy socket address
/// (`{"type": "unix", "data": {"path": …}}`), flattened to the `--nbd-server` form.
fn nbd_server_options(args: Value) -> Result<NbdServerOptions, QmpError> {
    let mut args = match args {
        Value::Object(map) => map,
        _ => return Err(QmpError::generic("Invalid parameter type, expected: object")),
    };
    if let Some(Value::Object(mut addr)) = args.remove("addr") {
        let mut flat = Map::new();
        if let Some(kind) = addr.remove("type") {
            flat.insert("type".into(), kind);
        }
        match addr.remove("data") {
            Some(Value::Object(data)) => flat.extend(data),
            Some(_) => {
                return Err(QmpError::generic(
                    "Invalid parameter type for 'addr.data', expected: object",
                ));
            }
            None => return Err(QmpError::generic("Parameter 'addr.data' is missing")),
        }
        if let Some(key) = addr.keys().next() {
            return Err(QmpError::generic(format!("Parameter 'addr.{key}' is unexpected")));
        }
        args.insert("addr".into(), Value::Object(flat));
    }
    NbdServerOptions::from_value(Value::Object(args), Syntax::Json).map_err(generic)
}

/// QEMU's `BlockDirtyInfo`.
pub fn bitmap_record(b: &BitmapInfo) -> Value {
    let mut record = Map::new();
    if let Some(name) = &b.name {
        record.insert("name".into(), json!(name));
    }
    record.insert("recording".into(), json!(b.recording));
    record.insert("persistent".into(), json!(b.persistent));
    record.insert("busy".into(), json!(b.busy));
    record.insert("granularity".into(), json!(b.granularity));
    record.insert("count".into(), json!(b.count));
    if b.inconsistent {
        record.insert("inconsistent".into(), json!(true));
    }
    Value::Object(record)
}
