//! A synchronous QMP client over a unix socket, for tests: the [`qmp_client`] crate's
//! client, whose connection failures and timeouts panic with the daemon's log
//! ([`QmpClient::execute`], [`QmpClient::wait_event`]) or come back as `io::Error`
//! (the `try_` methods), so that a test never hangs on a silent peer and says why it
//! failed.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

pub use qmp_client::{CommandError as QmpError, DEFAULT_TIMEOUT};

/// A connection to a QMP monitor.
#[derive(Debug)]
pub struct QmpClient {
    inner: qmp_client::QmpClient,
    log_file: Option<PathBuf>,
}

/// The `io::Error` of a connection failure; `Command` errors only come from
/// `negotiate` here.
fn io_error(e: qmp_client::Error) -> io::Error {
    use qmp_client::Error as E;
    let kind = match &e {
        E::Connect { source, .. } | E::Io { source, .. } => source.kind(),
        E::TimedOut { .. } => io::ErrorKind::TimedOut,
        E::Closed { .. } => io::ErrorKind::UnexpectedEof,
        E::Protocol { .. } => io::ErrorKind::InvalidData,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e.to_string())
}

/// Splits an `execute` result into a connection failure and the daemon's answer.
fn answer(r: qmp_client::Result<Value>) -> io::Result<Result<Value, QmpError>> {
    match r {
        Ok(v) => Ok(Ok(v)),
        Err(qmp_client::Error::Command { error, .. }) => Ok(Err(error)),
        Err(e) => Err(io_error(e)),
    }
}

impl QmpClient {
    fn wrap(mut inner: qmp_client::QmpClient) -> Self {
        inner.set_id_prefix("testkit");
        QmpClient { inner, log_file: None }
    }

    /// Connects to the monitor at `path`, retrying while the socket does not exist or
    /// refuses connections, until `timeout`; reads the greeting and negotiates
    /// capabilities (`qmp_capabilities`).
    pub fn connect(path: impl AsRef<Path>, timeout: Duration) -> io::Result<Self> {
        let mut client = Self::connect_unnegotiated(path, timeout)?;
        client.negotiate()?;
        Ok(client)
    }

    /// Like [`QmpClient::connect`], but stops after reading the greeting, so the monitor
    /// is still in capabilities-negotiation mode (see [`QmpClient::negotiate`]).
    pub fn connect_unnegotiated(path: impl AsRef<Path>, timeout: Duration) -> io::Result<Self> {
        qmp_client::QmpClient::connect_unnegotiated(path, timeout).map(Self::wrap).map_err(io_error)
    }

    /// Sends `qmp_capabilities`, leaving negotiation mode.
    pub fn negotiate(&mut self) -> io::Result<()> {
        self.try_execute("qmp_capabilities", Value::Null)?.map(drop).map_err(io::Error::other)
    }

    /// The greeting, `{"QMP": {"version": …, "capabilities": […]}}`.
    pub fn greeting(&self) -> &Value {
        self.inner.greeting()
    }

    /// The socket this client is connected to.
    pub fn path(&self) -> &Path {
        self.inner.path()
    }

    /// How long a reply may take; [`DEFAULT_TIMEOUT`] unless changed.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout()
    }

    /// Changes how long a reply may take.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.inner.set_timeout(timeout);
    }

    /// A log file (the server's stderr) whose contents panics of this client include.
    pub fn set_log_file(&mut self, path: impl Into<PathBuf>) {
        self.log_file = Some(path.into());
    }

    /// Executes `command` with `arguments` (omitted when `Value::Null`) and returns the
    /// `return` value, or the server's error as a [`QmpError`].
    ///
    /// # Panics
    /// If the connection fails, the reply is not valid JSON, or no reply arrives within
    /// [`QmpClient::timeout`]; the message includes the log file if one is set. Use
    /// [`QmpClient::try_execute`] to handle these.
    #[track_caller]
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        match self.try_execute(command, arguments) {
            Ok(result) => result,
            Err(e) => self.fail(&format!("QMP command `{command}` failed"), &e),
        }
    }

    /// Like [`QmpClient::execute`], but returns connection failures and timeouts as an
    /// `io::Error` instead of panicking.
    pub fn try_execute(
        &mut self,
        command: &str,
        arguments: Value,
    ) -> io::Result<Result<Value, QmpError>> {
        answer(self.inner.execute(command, arguments))
    }

    /// Sends one message as a JSON line, without waiting for its reply.
    pub fn send(&mut self, message: &Value) -> io::Result<()> {
        self.inner.send(message).map_err(io_error)
    }

    /// Sends `bytes` exactly as given (for tests of malformed input).
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.inner.send_raw(bytes).map_err(io_error)
    }

    /// The next reply (a message with `return` or `error`) that [`QmpClient::execute`]
    /// did not claim, waiting up to [`QmpClient::timeout`]; events that arrive meanwhile
    /// are kept. An error of kind `TimedOut` if none arrives, `UnexpectedEof` if the
    /// server closes the connection.
    pub fn recv(&mut self) -> io::Result<Value> {
        self.inner.recv().map_err(io_error)
    }

    /// Events received so far and not yet taken, oldest first.
    pub fn events(&self) -> &[Value] {
        self.inner.events()
    }

    /// Takes all events received so far.
    pub fn take_events(&mut self) -> Vec<Value> {
        self.inner.take_events()
    }

    /// Takes the oldest event named `name`, reading up to `timeout` for it to arrive.
    ///
    /// # Panics
    /// If it does not arrive in time or the connection fails.
    #[track_caller]
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Value {
        match self.try_wait_event(name, timeout) {
            Ok(Some(event)) => event,
            Ok(None) => {
                let error = io::Error::new(io::ErrorKind::TimedOut, "timed out");
                self.fail(&format!("event {name} did not arrive within {timeout:?}"), &error)
            }
            Err(e) => self.fail(&format!("waiting for event {name}"), &e),
        }
    }

    /// Takes the oldest event named `name`, reading up to `timeout` for it to arrive;
    /// `Ok(None)` if it does not. Other events and replies are kept.
    pub fn try_wait_event(&mut self, name: &str, timeout: Duration) -> io::Result<Option<Value>> {
        self.inner.wait_event(timeout, |e| e["event"] == name).map_err(io_error)
    }

    #[track_caller]
    fn fail(&self, what: &str, error: &io::Error) -> ! {
        let log = match &self.log_file {
            Some(path) => format!(
                "\n--- {} ---\n{}",
                path.display(),
                std::fs::read_to_string(path).unwrap_or_else(|e| format!("<unreadable: {e}>"))
            ),
            None => String::new(),
        };
        panic!("{what}: {error}{log}")
    }
}
