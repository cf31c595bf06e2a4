//! A synchronous QMP client over a unix socket.
//!
//! Every read has a deadline, so a test never hangs on a silent peer. Commands sent with
//! [`QmpClient::execute`] carry an `id`, and their reply is matched by it; events that
//! arrive meanwhile are kept ([`QmpClient::events`], [`QmpClient::wait_event`]), and so
//! are replies to messages sent raw ([`QmpClient::send_raw`], read with
//! [`QmpClient::recv`]).

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Default deadline for a reply, and for connecting.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// An error reply from the server: `{"error": {"class": CLASS, "desc": DESC}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    /// The error class, e.g. `GenericError` or `CommandNotFound`.
    pub class: String,
    /// The human-readable description.
    pub desc: String,
}

impl QmpError {
    /// An error with the given class and description (for comparisons in tests).
    pub fn new(class: impl Into<String>, desc: impl Into<String>) -> Self {
        QmpError { class: class.into(), desc: desc.into() }
    }

    /// The error of a reply message, or `None` if it is not an error reply.
    pub fn from_reply(reply: &Value) -> Option<Self> {
        let error = reply.get("error")?;
        let text = |key: &str| error.get(key).and_then(Value::as_str).unwrap_or("").to_owned();
        Some(QmpError { class: text("class"), desc: text("desc") })
    }
}

impl fmt::Display for QmpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "QMP error {}: {}", self.class, self.desc)
    }
}

impl std::error::Error for QmpError {}

/// A connection to a QMP monitor.
#[derive(Debug)]
pub struct QmpClient {
    stream: UnixStream,
    path: PathBuf,
    /// Bytes received but not yet consumed as a whole line.
    buf: Vec<u8>,
    greeting: Value,
    events: Vec<Value>,
    /// Replies not claimed by `execute` (answers to raw sends), oldest first.
    replies: VecDeque<Value>,
    next_id: u64,
    timeout: Duration,
    log_file: Option<PathBuf>,
}

impl QmpClient {
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
        let path = path.as_ref().to_path_buf();
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(&path) {
                Ok(stream) => break stream,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) && Instant::now() < deadline =>
                {
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("cannot connect to QMP socket {}: {e}", path.display()),
                    ));
                }
            }
        };
        stream.set_write_timeout(Some(DEFAULT_TIMEOUT))?;
        let mut client = QmpClient {
            stream,
            path,
            buf: Vec::new(),
            greeting: Value::Null,
            events: Vec::new(),
            replies: VecDeque::new(),
            next_id: 0,
            timeout: DEFAULT_TIMEOUT,
            log_file: None,
        };
        // qemu-storage-daemon 10.0.2 can hand what its previous client left unread (a
        // reply, events) to the next client, before the greeting (seen after killing a
        // client mid-command): such messages are skipped.
        let deadline = Instant::now() + timeout;
        let greeting = loop {
            let message = client.read_message(deadline)?;
            if message.get("QMP").is_some() {
                break message;
            }
            let leftover = ["return", "error", "event"].iter().any(|k| message.get(k).is_some());
            if !leftover {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("expected a QMP greeting, got {message}"),
                ));
            }
        };
        client.greeting = greeting;
        Ok(client)
    }

    /// Sends `qmp_capabilities`, leaving negotiation mode.
    pub fn negotiate(&mut self) -> io::Result<()> {
        self.try_execute("qmp_capabilities", Value::Null)?.map(drop).map_err(io::Error::other)
    }

    /// The greeting, `{"QMP": {"version": …, "capabilities": […]}}`.
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// The socket this client is connected to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How long a reply may take; [`DEFAULT_TIMEOUT`] unless changed.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Changes how long a reply may take.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
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
        self.next_id += 1;
        let id = json!(format!("testkit-{}", self.next_id));
        let mut message = json!({"execute": command, "id": id});
        if !arguments.is_null() {
            message["arguments"] = arguments;
        }
        self.send(&message)?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let reply = self.read_message(deadline)?;
            if reply.get("event").is_some() {
                self.events.push(reply);
            } else if reply.get("id") == Some(&id) {
                return Ok(match QmpError::from_reply(&reply) {
                    Some(error) => Err(error),
                    None => Ok(reply.get("return").cloned().unwrap_or(Value::Null)),
                });
            } else {
                self.replies.push_back(reply);
            }
        }
    }

    /// Sends one message as a JSON line, without waiting for its reply.
    pub fn send(&mut self, message: &Value) -> io::Result<()> {
        let mut line = serde_json::to_vec(message).map_err(io::Error::other)?;
        line.push(b'\n');
        self.send_raw(&line)
    }

    /// Sends `bytes` exactly as given (for tests of malformed input).
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// The next reply (a message with `return` or `error`) that [`QmpClient::execute`]
    /// did not claim, waiting up to [`QmpClient::timeout`]; events that arrive meanwhile
    /// are kept. An error of kind `TimedOut` if none arrives, `UnexpectedEof` if the
    /// server closes the connection.
    pub fn recv(&mut self) -> io::Result<Value> {
        if let Some(reply) = self.replies.pop_front() {
            return Ok(reply);
        }
        let deadline = Instant::now() + self.timeout;
        loop {
            let message = self.read_message(deadline)?;
            if message.get("event").is_some() {
                self.events.push(message);
            } else {
                return Ok(message);
            }
        }
    }

    /// Events received so far and not yet taken, oldest first.
    pub fn events(&self) -> &[Value] {
        &self.events
    }

    /// Takes all events received so far.
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
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
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
                return Ok(Some(self.events.remove(i)));
            }
            match self.read_message(deadline) {
                Ok(message) if message.get("event").is_some() => self.events.push(message),
                Ok(message) => self.replies.push_back(message),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads one whole message (a JSON line), waiting until `deadline`.
    fn read_message(&mut self, deadline: Instant) -> io::Result<Value> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                let text = line.trim_ascii();
                if text.is_empty() {
                    continue;
                }
                return serde_json::from_slice(text).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("invalid QMP message {:?}: {e}", String::from_utf8_lossy(text)),
                    )
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(self.timed_out());
            }
            self.stream.set_read_timeout(Some(deadline - now))?;
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "QMP connection closed by the server (unterminated data: {:?})",
                            String::from_utf8_lossy(&self.buf)
                        ),
                    ));
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) =>
                {
                    return Err(self.timed_out());
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn timed_out(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "no complete QMP message from {} in time (pending data: {:?})",
                self.path.display(),
                String::from_utf8_lossy(&self.buf)
            ),
        )
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
