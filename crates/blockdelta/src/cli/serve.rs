//! `blockdelta serve`: a storage daemon started with qemu-storage-daemon's options
//! (`--blockdev`, `--nbd-server`, `--export`, `--chardev`, `--monitor`, `--pidfile`),
//! processed in the order given. SIGTERM, SIGINT, SIGHUP or QMP `quit` end it cleanly:
//! NBD requests in flight completed and answered, connections closed, persistent bitmaps
//! stored, images flushed, locks released.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use blockdelta::block::graph::BlockGraph;
use blockdelta::block::options::{OptionsReader, parse_keyval_or_json};
use blockdelta::export::{BlockExportOptions, ExportManager, NbdServerOptions};
use blockdelta::qmp::monitor::Monitor;
use blockdelta::qmp::{Checkpoints, Qmp};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::Notify;

const USAGE: &str = "\
Usage: blockdelta serve [options]
Serve block nodes over NBD and QMP, with qemu-storage-daemon's options:

  --blockdev [driver=]<driver>[,node-name=<N>][,read-only=on|off]...
                         add a block node (key=value or JSON, as blockdev-add)
  --chardev socket,id=<id>,path=<path>,server=on,wait=off
                         a unix socket for a QMP monitor
  --monitor [chardev=]<id>[,mode=control]
                         a QMP monitor on that chardev
  --nbd-server addr.type=unix,addr.path=<path>[,max-connections=<n>]
  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>[,max-connections=<n>]
                         start the NBD server
  --export [type=]nbd,id=<id>,node-name=<node>[,name=<name>][,writable=on|off]
           [,description=<d>][,bitmaps.0=<bitmap>...][,allocation-depth=on|off]
                         export a block node over NBD
  --pidfile <path>       write the process id to this file
  --checkpoint-interval <seconds>
                         store crash-safe bitmaps again (clearing their write-intent
                         marks) this often when they were written to; 0: only at
                         bitmap commands and at close (default 60)
  -h, --help             print this help
";

/// How long a clean shutdown waits for NBD requests in flight (and for their clients
/// to take the replies) before dropping what is left.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// One option as given.
struct DaemonOption {
    flag: &'static str,
    value: String,
}

const FLAGS: &[&str] = &["--blockdev", "--chardev", "--monitor", "--nbd-server", "--export"];

/// Splits the arguments into ordered options, `--flag value` or `--flag=value`.
fn parse_args(args: Vec<OsString>) -> anyhow::Result<Option<ServeArgs>> {
    let mut options = Vec::new();
    let mut pidfile = None;
    let mut checkpoint_interval = DEFAULT_CHECKPOINT_INTERVAL;
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let arg = arg.into_string().map_err(|a| anyhow!("argument {a:?} is not UTF-8"))?;
        if arg == "-h" || arg == "--help" {
            print!("{USAGE}");
            return Ok(None);
        }
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let flag = match FLAGS.iter().find(|f| **f == name) {
            Some(f) => Some(*f),
            None if name == "--pidfile" || name == "--checkpoint-interval" => None,
            None => bail!(
                "unrecognized option '{arg}'\nTry 'blockdelta serve --help' for more information"
            ),
        };
        let value = match inline {
            Some(v) => v,
            None => it
                .next()
                .ok_or_else(|| anyhow!("option '{name}' requires an argument"))?
                .into_string()
                .map_err(|a| anyhow!("argument {a:?} is not UTF-8"))?,
        };
        match flag {
            Some(flag) => options.push(DaemonOption { flag, value }),
            None if name == "--checkpoint-interval" => {
                let secs: u64 = value
                    .parse()
                    .map_err(|_| anyhow!("--checkpoint-interval expects seconds, not '{value}'"))?;
                checkpoint_interval = std::time::Duration::from_secs(secs);
            }
            None => pidfile = Some(PathBuf::from(value)),
        }
    }
    Ok(Some(ServeArgs { options, pidfile, checkpoint_interval }))
}

/// Default of `--checkpoint-interval`.
const DEFAULT_CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// The parsed command line.
struct ServeArgs {
    options: Vec<DaemonOption>,
    pidfile: Option<PathBuf>,
    checkpoint_interval: std::time::Duration,
}

/// Runs `blockdelta serve ARGS`.
pub fn run(args: Vec<OsString>) -> anyhow::Result<ExitCode> {
    let Some(ServeArgs { options, pidfile, checkpoint_interval }) = parse_args(args)? else {
        return Ok(ExitCode::SUCCESS);
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // One event-loop thread, as QEMU's main loop: protocol work and cached reads are
    // short, and block I/O that can wait runs on the blocking pool. Measured with
    // scripts/bench-nbd, one thread beats two clearly (fewer cross-thread wake-ups);
    // TOKIO_WORKER_THREADS=N overrides it.
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        builder.worker_threads(1);
    }
    let runtime =
        builder.enable_all().thread_name("blockdelta").build().context("starting the runtime")?;
    let graph = Arc::new(BlockGraph::new());
    let exports = Arc::new(ExportManager::new(graph.clone()));
    let quit = Arc::new(Notify::new());
    let qmp = Arc::new(Qmp::new(graph.clone(), exports.clone(), quit.clone()));
    let result = runtime.block_on(async {
        // Before anything a supervisor could observe (sockets, the pidfile) and before
        // any image is opened: from here on a SIGTERM, SIGINT or SIGHUP is a clean
        // shutdown, once the setup is done, never the default action (death, with the
        // bitmaps left in use).
        let mut signals = ShutdownSignals::install()?;
        let mut monitors = Vec::new();
        setup(&options, &graph, &exports, &qmp, &mut monitors).await?;
        let checkpoints = start_checkpoints(&qmp, checkpoint_interval)?;
        if let Some(path) = &pidfile {
            write_pidfile(path)?;
        }
        signals.wait(&quit).await;
        // Running jobs are cancelled: their bitmaps are reclaimed, nothing is lost.
        qmp.jobs().cancel_all().await;
        // No more QMP commands (none may start a server or an export now).
        drop(monitors);
        // NBD clients: no new connections or requests, the requests received complete
        // and are answered, then the connections close (as qemu-storage-daemon answers
        // them, and never with an error because of the shutdown).
        exports.drain(SHUTDOWN_GRACE).await;
        anyhow::Ok(checkpoints)
    });
    // No checkpoint runs from here on: the final store of the bitmaps follows.
    let result = result.map(drop);
    // Dropping the runtime waits for block I/O still running on its threads, so that
    // every write has reached its node (and its bitmaps) before they are stored.
    exports.shutdown();
    drop(qmp);
    drop(runtime);
    let closed = close_nodes(&graph);
    if let Some(path) = &pidfile {
        let _ = std::fs::remove_file(path);
    }
    result?;
    closed?;
    Ok(ExitCode::SUCCESS)
}

/// The thread that checkpoints crash-safe bitmaps every interval.
///
/// A thread of its own rather than a tokio timer: a timer in the runtime makes every
/// park of its workers costlier, about 265 instructions per 4 KiB NBD read of 17,000
/// (callgrind, `scripts/bench-instructions` with and without `--checkpoint-interval 0`).
/// Dropping it stops the thread, after the checkpoint it may be running.
struct CheckpointTimer {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for CheckpointTimer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn start_checkpoints(
    qmp: &Arc<Qmp>,
    interval: std::time::Duration,
) -> anyhow::Result<Option<CheckpointTimer>> {
    if interval.is_zero() {
        return Ok(None);
    }
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let runtime = tokio::runtime::Handle::current();
    let qmp = qmp.clone();
    let thread = std::thread::Builder::new()
        .name("checkpoints".into())
        .spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(interval)
            {
                runtime.block_on(qmp.checkpoint(Checkpoints::Marked));
            }
        })
        .context("starting the checkpoint thread")?;
    Ok(Some(CheckpointTimer { stop: Some(stop), thread: Some(thread) }))
}

/// Applies the options in order, as qemu-storage-daemon does.
async fn setup(
    options: &[DaemonOption],
    graph: &Arc<BlockGraph>,
    exports: &Arc<ExportManager>,
    qmp: &Arc<Qmp>,
    monitors: &mut Vec<Monitor>,
) -> anyhow::Result<()> {
    let mut chardevs: BTreeMap<String, PathBuf> = BTreeMap::new();
    for o in options {
        let fail = |e: &dyn std::fmt::Display| anyhow!("{} {}: {e}", o.flag, o.value);
        match o.flag {
            "--blockdev" => {
                graph.add_from_str(&o.value).map_err(|e| fail(&e))?;
            }
            "--nbd-server" => {
                let (value, syntax) = parse_keyval_or_json(&o.value).map_err(|e| fail(&e))?;
                let server = NbdServerOptions::from_value(value, syntax).map_err(|e| fail(&e))?;
                exports.start_nbd_server(server).await.map_err(|e| fail(&e))?;
            }
            "--export" => {
                let (value, syntax) =
                    parse_keyval_or_json(&implied_key(&o.value, "type")).map_err(|e| fail(&e))?;
                let export = BlockExportOptions::from_value(value, syntax).map_err(|e| fail(&e))?;
                exports.add(export).map_err(|e| fail(&e))?;
            }
            "--chardev" => {
                let (id, path) = chardev(&o.value).map_err(|e| fail(&e))?;
                if chardevs.contains_key(&id) {
                    return Err(fail(&format!(
                        "attempt to add duplicate property '{id}' to object (type 'container')"
                    )));
                }
                chardevs.insert(id, path);
            }
            "--monitor" => {
                let id = monitor_chardev(&o.value).map_err(|e| fail(&e))?;
                let path = chardevs
                    .get(&id)
                    .ok_or_else(|| fail(&format!("chardev \"{id}\" not found")))?;
                let monitor = Monitor::listen(path, qmp.clone()).map_err(|e| {
                    fail(&format!("Failed to bind socket to {}: {e}", path.display()))
                })?;
                monitors.push(monitor);
            }
            _ => unreachable!("only known flags are collected"),
        }
    }
    Ok(())
}

/// QEMU's implied first key: `nbd,id=…` means `type=nbd,id=…`.
fn implied_key(value: &str, key: &str) -> String {
    let first = value.split(',').next().unwrap_or("");
    if value.trim_start().starts_with('{') || first.contains('=') || first.is_empty() {
        value.to_string()
    } else {
        format!("{key}={value}")
    }
}

/// `--chardev socket,id=ID,path=PATH,server=on,wait=off`: the id and the socket path.
fn chardev(value: &str) -> Result<(String, PathBuf), String> {
    let (v, syntax) =
        parse_keyval_or_json(&implied_key(value, "backend")).map_err(|e| e.to_string())?;
    let mut r = OptionsReader::new(v, "", syntax).map_err(|e| e.to_string())?;
    let backend = r.require_str("backend").map_err(|e| e.to_string())?;
    if backend != "socket" {
        return Err(format!("'{backend}' is not a valid char driver name"));
    }
    let id = r.require_str("id").map_err(|e| e.to_string())?;
    let path = r.take_str("path").map_err(|e| e.to_string())?;
    let server = r.take_bool("server").map_err(|e| e.to_string())?.unwrap_or(false);
    r.take_bool("wait").map_err(|e| e.to_string())?;
    r.finish().map_err(|e| e.to_string())?;
    let path = path.ok_or(
        "chardev: socket: no unix socket path given (blockdelta serves QMP on unix sockets only)",
    )?;
    if !server {
        return Err("chardev: socket: blockdelta only listens (server=on)".into());
    }
    Ok((id, PathBuf::from(path)))
}

/// `--monitor [chardev=]ID[,mode=control]`: the chardev's id.
fn monitor_chardev(value: &str) -> Result<String, String> {
    let (v, syntax) =
        parse_keyval_or_json(&implied_key(value, "chardev")).map_err(|e| e.to_string())?;
    let mut r = OptionsReader::new(v, "", syntax).map_err(|e| e.to_string())?;
    let id = r.require_str("chardev").map_err(|e| e.to_string())?;
    let mode = r.take_enum("mode", &["control", "readline"]).map_err(|e| e.to_string())?;
    if mode.is_some_and(|m| m != "control") {
        return Err("Only QMP is supported".into());
    }
    r.take_bool("pretty").map_err(|e| e.to_string())?;
    r.finish().map_err(|e| e.to_string())?;
    Ok(id)
}

fn write_pidfile(path: &std::path::Path) -> anyhow::Result<()> {
    let mut f = std::fs::File::create(path)
        .with_context(|| format!("Cannot open pid file {}", path.display()))?;
    writeln!(f, "{}", std::process::id())
        .with_context(|| format!("Failed to write pid file {}", path.display()))
}

/// The signals that end the daemon cleanly. Once installed, a signal is kept until
/// [`wait`](Self::wait) sees it, however early it came.
struct ShutdownSignals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl ShutdownSignals {
    /// Installs the handlers (within the runtime).
    fn install() -> anyhow::Result<Self> {
        Ok(ShutdownSignals {
            term: signal(SignalKind::terminate()).context("installing a SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing a SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("installing a SIGHUP handler")?,
        })
    }

    /// Waits for one of the signals, or `quit`.
    async fn wait(&mut self, quit: &Notify) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
            _ = self.hup.recv() => {}
            _ = quit.notified() => {}
        }
    }
}

/// Closes every node, users before the nodes they use, reporting every failure.
fn close_nodes(graph: &BlockGraph) -> anyhow::Result<()> {
    let mut errors = Vec::new();
    for node in graph.take_all_users_first() {
        if let Err(e) = node.close() {
            errors.push(format!("closing node '{}': {e}", node.name()));
        }
    }
    if errors.is_empty() { Ok(()) } else { bail!("{}", errors.join("\n")) }
}
