//! Running `qemu-storage-daemon`, or any program that takes the same monitor arguments.
//!
//! [`DaemonBuilder::start`] runs `PROGRAM ARGS… --pidfile DIR/daemon.pid --chardev
//! socket,path=DIR/qmp.sock,server=on,wait=off,id=qmp0 --monitor chardev=qmp0`, where
//! `DIR` is a fresh temporary directory, with stdout and stderr going to `DIR/daemon.log`.
//! The program must not daemonize: it must stay the spawned process, write its own PID
//! to the pidfile and serve QMP on the socket. `qemu-storage-daemon` does; a replacement
//! such as `blockdelta serve` can be started by the same harness with
//! [`StorageDaemon::builder`].

use std::ffi::OsString;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use rustix::process::{Pid, Signal, kill_process};
use serde_json::Value;
use tempfile::TempDir;

use crate::qmp::QmpClient;
use crate::tools::require_tool;

/// Name of the QMP socket in the daemon's directory.
pub const QMP_SOCKET: &str = "qmp.sock";
/// Name of the pidfile in the daemon's directory.
pub const PID_FILE: &str = "daemon.pid";
/// Name of the file that receives the daemon's stdout and stderr.
pub const LOG_FILE: &str = "daemon.log";

/// Configures and starts a [`StorageDaemon`].
///
/// The temporary directory exists as soon as the builder does, so arguments can name
/// files in it ([`DaemonBuilder::path`]): images, NBD sockets.
#[derive(Debug)]
pub struct DaemonBuilder {
    program: PathBuf,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    dir: TempDir,
    start_timeout: Duration,
    stop_timeout: Duration,
}

impl DaemonBuilder {
    /// A builder for `program`, with a new temporary directory.
    ///
    /// # Panics
    /// If the temporary directory cannot be created.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("testkit-")
            .tempdir()
            .expect("cannot create a temporary directory for the daemon");
        DaemonBuilder {
            program: program.into(),
            args: Vec::new(),
            envs: Vec::new(),
            dir,
            start_timeout: Duration::from_secs(10),
            stop_timeout: Duration::from_secs(5),
        }
    }

    /// The temporary directory of the daemon.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `name` inside the temporary directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Appends one argument (before the monitor arguments).
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Appends arguments (before the monitor arguments).
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable for the daemon.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// How long the daemon may take to write its pidfile and accept QMP (default 10 s).
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    /// How long the daemon may take to exit after SIGTERM or `quit` (default 5 s).
    pub fn stop_timeout(mut self, timeout: Duration) -> Self {
        self.stop_timeout = timeout;
        self
    }

    /// Starts the daemon in its own process group, waits for its pidfile and QMP socket,
    /// and connects (capabilities negotiated). Errors include the daemon's log; a daemon
    /// that fails to come up is killed.
    pub fn start(self) -> anyhow::Result<StorageDaemon> {
        let dir = self.dir.path();
        let socket = dir.join(QMP_SOCKET);
        let pid_file = dir.join(PID_FILE);
        let log_path = dir.join(LOG_FILE);
        let log = File::create(&log_path).context("creating the daemon's log file")?;
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .arg("--pidfile")
            .arg(&pid_file)
            .arg("--chardev")
            .arg(format!("socket,path={},server=on,wait=off,id=qmp0", socket.display()))
            .arg("--monitor")
            .arg("chardev=qmp0")
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: a signal to the test's group does not reach it.
            .process_group(0);
        let child =
            cmd.spawn().with_context(|| format!("cannot start {}", self.program.display()))?;
        let pid = child.id();
        let mut daemon = StorageDaemon {
            child: Some(child),
            pid,
            qmp: None,
            program: self.program,
            log_path,
            stop_timeout: self.stop_timeout,
            dir: self.dir,
        };
        let deadline = Instant::now() + self.start_timeout;
        daemon.wait_ready(&socket, &pid_file, deadline).map_err(|e| {
            // Stop it before reading the log, so that the log is complete.
            daemon.terminate();
            daemon.annotate(e.context(format!("daemon did not start: {}", daemon.describe())))
        })?;
        Ok(daemon)
    }
}

/// A running daemon with a QMP connection, stopped when dropped.
#[derive(Debug)]
pub struct StorageDaemon {
    /// `None` once it has exited and been reaped.
    child: Option<Child>,
    pid: u32,
    qmp: Option<QmpClient>,
    program: PathBuf,
    log_path: PathBuf,
    stop_timeout: Duration,
    /// Last, so that it is removed after the process is gone.
    dir: TempDir,
}

impl StorageDaemon {
    /// A builder for `program` (e.g. `qemu-storage-daemon` or `blockdelta`, whose first
    /// arguments would then be `serve`).
    pub fn builder(program: impl Into<PathBuf>) -> DaemonBuilder {
        DaemonBuilder::new(program)
    }

    /// A builder for `qemu-storage-daemon` from `PATH`.
    ///
    /// # Panics
    /// If `qemu-storage-daemon` is not installed.
    #[track_caller]
    pub fn qemu() -> DaemonBuilder {
        DaemonBuilder::new(require_tool("qemu-storage-daemon"))
    }

    fn wait_ready(
        &mut self,
        socket: &Path,
        pid_file: &Path,
        deadline: Instant,
    ) -> anyhow::Result<()> {
        loop {
            if let Some(status) = self.try_wait()? {
                bail!("it exited early ({status})");
            }
            let pid = std::fs::read_to_string(pid_file).unwrap_or_default();
            if socket.exists() && pid.ends_with('\n') {
                let pid: u32 = pid.trim().parse().context("pidfile holds no PID")?;
                if pid != self.pid {
                    bail!("pidfile names PID {pid}, not the spawned process (daemonized?)");
                }
                break;
            }
            if Instant::now() >= deadline {
                bail!("timed out waiting for {} and {}", pid_file.display(), socket.display());
            }
            thread::sleep(Duration::from_millis(10));
        }
        let remaining =
            deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
        let mut qmp = QmpClient::connect(socket, remaining).context("connecting to QMP")?;
        qmp.set_log_file(&self.log_path);
        self.qmp = Some(qmp);
        Ok(())
    }

    /// The QMP connection.
    ///
    /// # Panics
    /// If there is none: a [`StorageDaemon::connect_qmp`] failed.
    pub fn qmp(&mut self) -> &mut QmpClient {
        self.qmp.as_mut().expect("no QMP connection: connect_qmp failed")
    }

    /// Closes the QMP connection and opens a new one, negotiating capabilities if
    /// `negotiate` (otherwise the monitor is left in negotiation mode). The monitor
    /// serves one client at a time, which is why the old connection goes first.
    pub fn connect_qmp(&mut self, negotiate: bool) -> std::io::Result<&mut QmpClient> {
        self.qmp = None;
        let socket = self.qmp_socket();
        let mut qmp = if negotiate {
            QmpClient::connect(&socket, crate::qmp::DEFAULT_TIMEOUT)
        } else {
            QmpClient::connect_unnegotiated(&socket, crate::qmp::DEFAULT_TIMEOUT)
        }?;
        qmp.set_log_file(&self.log_path);
        Ok(self.qmp.insert(qmp))
    }

    /// Shorthand for `self.qmp().execute(command, arguments)`, panicking with the
    /// daemon's log if the server returns an error.
    #[track_caller]
    pub fn execute_ok(&mut self, command: &str, arguments: Value) -> Value {
        match self.qmp().execute(command, arguments) {
            Ok(value) => value,
            Err(e) => panic!("QMP `{command}`: {e}\n{}", self.describe()),
        }
    }

    /// The temporary directory (removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `name` inside the temporary directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The QMP socket.
    pub fn qmp_socket(&self) -> PathBuf {
        self.path(QMP_SOCKET)
    }

    /// The PID of the daemon process.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The file with the daemon's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The daemon's stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_else(|e| format!("<unreadable: {e}>"))
    }

    /// Whether the process has not exited yet.
    pub fn is_running(&mut self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }

    /// Closes the QMP connection, so that another client (a program under test) can use
    /// the monitor, which serves one client at a time; [`StorageDaemon::connect_qmp`]
    /// opens a new one.
    pub fn disconnect_qmp(&mut self) {
        self.qmp = None;
    }

    /// Sends QMP `quit` and waits for the process to exit (up to the stop timeout); its
    /// exit status. Errors, with the log, if `quit` fails or the process does not exit
    /// (it is then killed).
    pub fn quit(mut self) -> anyhow::Result<ExitStatus> {
        let reply = self.qmp().try_execute("quit", Value::Null);
        match reply {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(self.annotate(anyhow!(e).context("QMP quit"))),
            Err(e) => return Err(self.annotate(anyhow!(e).context("QMP quit"))),
        }
        self.qmp = None;
        match self.wait_timeout(self.stop_timeout)? {
            Some(status) => Ok(status),
            None => {
                self.terminate();
                Err(self.annotate(anyhow!("did not exit within {:?} of quit", self.stop_timeout)))
            }
        }
    }

    /// Stops the daemon as drop does (SIGTERM, then SIGKILL after the stop timeout) and
    /// returns its exit status.
    pub fn stop(mut self) -> anyhow::Result<ExitStatus> {
        self.qmp = None;
        self.terminate().ok_or_else(|| self.annotate(anyhow!("cannot reap the daemon")))
    }

    /// Kills the daemon with SIGKILL, as a crash would stop it (nothing is flushed or
    /// saved), and reaps it; its exit status.
    pub fn kill(mut self) -> anyhow::Result<ExitStatus> {
        self.qmp = None;
        let mut child =
            self.child.take().ok_or_else(|| anyhow!("the daemon has already been reaped"))?;
        // Our unreaped child: the PID cannot have been reused. SIGKILL on Unix.
        child.kill().context("SIGKILL")?;
        Ok(child.wait()?)
    }

    /// Waits up to `timeout` for the process to exit by itself; `None` if it is still
    /// running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> anyhow::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// `Some(status)` once the process has exited (it is reaped then).
    fn try_wait(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        let Some(child) = self.child.as_mut() else {
            bail!("the daemon has already been reaped");
        };
        Ok(child.try_wait()?)
    }

    /// SIGTERM, then SIGKILL after the stop timeout; reaps the process. Only this PID is
    /// signalled, and only while it is our unreaped child, so it cannot have been reused.
    fn terminate(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        let _ = kill_process(Pid::from_child(&child), Signal::TERM);
        let deadline = Instant::now() + self.stop_timeout;
        while Instant::now() < deadline {
            match child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) => thread::sleep(Duration::from_millis(10)),
                Err(_) => break,
            }
        }
        let _ = child.kill();
        child.wait().ok()
    }

    fn describe(&self) -> String {
        format!("{} (PID {}), log {}", self.program.display(), self.pid, self.log_path.display())
    }

    fn annotate(&self, error: anyhow::Error) -> anyhow::Error {
        error.context(format!("{}\n--- daemon log ---\n{}", self.describe(), self.log()))
    }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        self.qmp = None;
        let running = self.child.is_some();
        self.terminate();
        if running && thread::panicking() {
            eprintln!("--- log of {} ---\n{}", self.describe(), self.log());
        }
    }
}
