//! A small synchronous QMP client over a unix socket, for programs that drive
//! `qemu-storage-daemon`, QEMU or `blockdelta serve` (blockdelta's push backups, its
//! `qmp` command and demo, and the test suite).
//!
//! - Every read has a deadline ([`QmpClient::timeout`]): a silent daemon is an error
//!   ([`Error::TimedOut`]), never a hang.
//! - Commands sent with [`QmpClient::execute`] carry an `id` made of a prefix, the
//!   process id and a counter, and their reply is matched by it: a late reply meant for
//!   a killed earlier client (which a daemon may hand to the next one) is never taken
//!   for this client's.
//! - Events that arrive meanwhile are kept until asked for ([`QmpClient::events`],
//!   [`QmpClient::wait_event`]), and so are replies to messages sent raw
//!   ([`QmpClient::send_raw`], read with [`QmpClient::recv`]).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Default deadline for a reply, and for connecting.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The daemon's error reply to a command: `{"error": {"class": CLASS, "desc": DESC}}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("QMP error {class}: {desc}")]
pub struct CommandError {
    /// The error class, e.g. `GenericError` or `CommandNotFound`.
    pub class: String,
    /// The daemon's text.
    pub desc: String,
}

impl CommandError {
    /// An error with the given class and description (for comparisons).
    pub fn new(class: impl Into<String>, desc: impl Into<String>) -> Self {
        CommandError { class: class.into(), desc: desc.into() }
    }

    /// The error of a reply message, or `None` if it is not an error reply.
    pub fn from_reply(reply: &Value) -> Option<Self> {
        let error = reply.get("error")?;
        let text = |key: &str| error.get(key).and_then(Value::as_str).unwrap_or("").to_owned();
        Some(CommandError { class: text("class"), desc: text("desc") })
    }
}

/// A QMP failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The socket could not be connected to (after retrying until the deadline while
    /// it was missing or refused).
    #[error("cannot connect to QMP socket {}: {source}", path.display())]
    Connect {
        /// The monitor socket.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("QMP {}: {what}: {source}", path.display())]
    Io {
        /// The monitor socket.
        path: PathBuf,
        /// What was being done.
        what: String,
        /// Why.
        source: io::Error,
    },
    /// No whole message arrived before the deadline.
    #[error("no complete QMP message from {} in time (pending data: {pending:?})", path.display())]
    TimedOut {
        /// The monitor socket.
        path: PathBuf,
        /// Bytes received that do not yet make a whole line.
        pending: String,
    },
    /// The daemon closed the connection.
    #[error("QMP connection {} closed by the daemon (unterminated data: {pending:?})", path.display())]
    Closed {
        /// The monitor socket.
        path: PathBuf,
        /// Bytes received that did not make a whole line.
        pending: String,
    },
    /// The daemon sent something that is not QMP.
    #[error("QMP {}: {reason}", path.display())]
    Protocol {
        /// The monitor socket.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The daemon answered a command with an error.
    #[error("QMP {command}: {}: {}", error.class, error.desc)]
    Command {
        /// The command.
        command: String,
        /// The daemon's error.
        error: CommandError,
    },
}

impl Error {
    /// The daemon's error reply, when this is one.
    pub fn command_error(&self) -> Option<&CommandError> {
        match self {
            Error::Command { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// A QMP result.
pub type Result<T> = std::result::Result<T, Error>;

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
    id_prefix: String,
    next_id: u64,
    timeout: Duration,
}

impl QmpClient {
    /// Connects to the monitor at `path` (retrying for up to `timeout` while the socket
    /// is missing or refuses: a daemon serves one monitor client at a time, and the
    /// previous client may still be leaving), reads the greeting and negotiates
    /// capabilities (`qmp_capabilities`). Replies wait [`DEFAULT_TIMEOUT`] unless
    /// changed with [`QmpClient::set_timeout`].
    pub fn connect(path: impl AsRef<Path>, timeout: Duration) -> Result<Self> {
        let mut client = Self::connect_unnegotiated(path, timeout)?;
        client.negotiate()?;
        Ok(client)
    }

    /// Like [`QmpClient::connect`], but stops after reading the greeting, so the monitor
    /// is still in capabilities-negotiation mode (see [`QmpClient::negotiate`]).
    pub fn connect_unnegotiated(path: impl AsRef<Path>, timeout: Duration) -> Result<Self> {
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
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(source) => return Err(Error::Connect { path, source }),
            }
        };
        if let Err(source) = stream.set_write_timeout(Some(DEFAULT_TIMEOUT)) {
            return Err(Error::Connect { path, source });
        }
        let mut client = QmpClient {
            stream,
            path,
            buf: Vec::new(),
            greeting: Value::Null,
            events: Vec::new(),
            replies: VecDeque::new(),
            id_prefix: format!("qmp-client-{}", std::process::id()),
            next_id: 0,
            timeout: DEFAULT_TIMEOUT,
        };
        // qemu-storage-daemon 10.0.2 can hand what its previous client left unread (a
        // reply, events) to the next client, before the greeting (seen after killing a
        // client mid-command): such messages are skipped.
        let deadline = Instant::now() + timeout;
        client.greeting = loop {
            let message = client.read_message(deadline)?;
            if message.get("QMP").is_some() {
                break message;
            }
            let leftover = ["return", "error", "event"].iter().any(|k| message.get(k).is_some());
            if !leftover {
                return Err(client.protocol(format!("expected a QMP greeting, got {message}")));
            }
        };
        Ok(client)
    }

    /// Sends `qmp_capabilities`, leaving negotiation mode.
    pub fn negotiate(&mut self) -> Result<()> {
        self.execute("qmp_capabilities", Value::Null).map(drop)
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

    /// Changes the start of the ids of commands (`PREFIX-N`; by default
    /// `qmp-client-PID`), e.g. to tell one program's commands in a daemon's log.
    pub fn set_id_prefix(&mut self, prefix: impl Into<String>) {
        self.id_prefix = prefix.into();
    }

    /// Executes `command` with `arguments` (omitted when `Value::Null`) and returns the
    /// `return` value; the daemon's error reply is [`Error::Command`].
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        self.next_id += 1;
        let id = json!(format!("{}-{}", self.id_prefix, self.next_id));
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
                return match CommandError::from_reply(&reply) {
                    Some(error) => Err(Error::Command { command: command.to_owned(), error }),
                    None => Ok(reply.get("return").cloned().unwrap_or(Value::Null)),
                };
            } else {
                self.replies.push_back(reply);
            }
        }
    }

    /// Sends one message as a JSON line, without waiting for its reply.
    pub fn send(&mut self, message: &Value) -> Result<()> {
        let mut line = message.to_string().into_bytes();
        line.push(b'\n');
        self.send_raw(&line)
    }

    /// Sends `bytes` exactly as given (for tests of malformed input).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream
            .write_all(bytes)
            .and_then(|()| self.stream.flush())
            .map_err(|source| Error::Io { path: self.path.clone(), what: "sending".into(), source })
    }

    /// The next reply (a message with `return` or `error`) that [`QmpClient::execute`]
    /// did not claim, waiting up to [`QmpClient::timeout`]; events that arrive meanwhile
    /// are kept.
    pub fn recv(&mut self) -> Result<Value> {
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

    /// Waits up to `timeout` for the oldest event that `accept` takes, and takes it
    /// (other events and replies stay); `Ok(None)` when none came in time.
    pub fn wait_event(
        &mut self,
        timeout: Duration,
        mut accept: impl FnMut(&Value) -> bool,
    ) -> Result<Option<Value>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.events.iter().position(&mut accept) {
                return Ok(Some(self.events.remove(i)));
            }
            match self.read_message(deadline) {
                Ok(message) if message.get("event").is_some() => self.events.push(message),
                Ok(message) => self.replies.push_back(message),
                Err(Error::TimedOut { .. }) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    fn protocol(&self, reason: String) -> Error {
        Error::Protocol { path: self.path.clone(), reason }
    }

    fn pending(&self) -> String {
        String::from_utf8_lossy(&self.buf).into_owned()
    }

    /// Reads one whole message (a JSON line), waiting until `deadline`.
    fn read_message(&mut self, deadline: Instant) -> Result<Value> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                let text = line.trim_ascii();
                if text.is_empty() {
                    continue;
                }
                return serde_json::from_slice(text).map_err(|e| {
                    self.protocol(format!(
                        "invalid QMP message {:?}: {e}",
                        String::from_utf8_lossy(text)
                    ))
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::TimedOut { path: self.path.clone(), pending: self.pending() });
            }
            let io_err = |path: &Path, source| Error::Io {
                path: path.to_path_buf(),
                what: "reading".into(),
                source,
            };
            self.stream
                .set_read_timeout(Some(deadline - now))
                .map_err(|e| io_err(&self.path, e))?;
            let mut chunk = [0u8; 16 << 10];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(Error::Closed { path: self.path.clone(), pending: self.pending() });
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) =>
                {
                    return Err(Error::TimedOut {
                        path: self.path.clone(),
                        pending: self.pending(),
                    });
                }
                Err(e) => return Err(io_err(&self.path, e)),
            }
        }
    }
}
