//! A small synchronous QMP client (unix socket) for push-mode backups: commands with
//! ids, events kept until asked for, and a deadline on every read so that a silent
//! daemon is an error, never a hang.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// A QMP failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QmpClientError {
    /// The socket failed, closed, or sent something that is not QMP.
    #[error("QMP {}: {reason}", path.display())]
    Connection {
        /// The monitor socket.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The daemon answered a command with an error.
    #[error("QMP {command}: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// The error class (`GenericError`, ...).
        class: String,
        /// The daemon's text.
        desc: String,
    },
}

/// A QMP result.
pub type Result<T> = std::result::Result<T, QmpClientError>;

/// A negotiated connection to a QMP monitor.
#[derive(Debug)]
pub struct QmpClient {
    stream: UnixStream,
    path: PathBuf,
    buf: Vec<u8>,
    events: Vec<Value>,
    next_id: u64,
    timeout: Duration,
}

impl QmpClient {
    /// Connects to the monitor at `path` (retrying for up to `timeout` while the socket
    /// is missing or refuses: a daemon serves one monitor client at a time, and the
    /// previous client may still be leaving), reads the greeting and negotiates.
    pub fn connect(path: &Path, timeout: Duration) -> Result<QmpClient> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(QmpClientError::Connection {
                        path: path.to_path_buf(),
                        reason: format!("cannot connect: {e}"),
                    });
                }
            }
        };
        let mut c = QmpClient {
            stream,
            path: path.to_path_buf(),
            buf: Vec::new(),
            events: Vec::new(),
            next_id: 0,
            timeout,
        };
        // qemu-storage-daemon 10.0.2 can hand what a killed previous client left unread
        // (a reply, events) to the next client, before the greeting: skip it.
        let deadline = Instant::now() + timeout;
        loop {
            let message = c.read_message(deadline)?;
            if message.get("QMP").is_some() {
                break;
            }
            let leftover = ["return", "error", "event"].iter().any(|k| message.get(k).is_some());
            if !leftover {
                return Err(c.conn_err(format!("expected a QMP greeting, got {message}")));
            }
        }
        c.execute("qmp_capabilities", Value::Null)?;
        Ok(c)
    }

    fn conn_err(&self, reason: impl Into<String>) -> QmpClientError {
        QmpClientError::Connection { path: self.path.clone(), reason: reason.into() }
    }

    /// Runs `command` (arguments omitted when `Null`) and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        self.next_id += 1;
        // The process id makes ids unique across clients: a killed client's late reply
        // handed to the next one cannot match the next one's request.
        let id = json!(format!("blockdelta-{}-{}", std::process::id(), self.next_id));
        let mut msg = json!({"execute": command, "id": id});
        if !arguments.is_null() {
            msg["arguments"] = arguments;
        }
        let mut line = msg.to_string().into_bytes();
        line.push(b'\n');
        self.stream
            .write_all(&line)
            .map_err(|e| self.conn_err(format!("sending {command}: {e}")))?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let m = self.read_message(deadline)?;
            if m.get("event").is_some() {
                self.events.push(m);
            } else if m.get("id") == Some(&id) {
                if let Some(err) = m.get("error") {
                    let text =
                        |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
                    return Err(QmpClientError::Command {
                        command: command.to_owned(),
                        class: text("class"),
                        desc: text("desc"),
                    });
                }
                return Ok(m.get("return").cloned().unwrap_or(Value::Null));
            }
        }
    }

    /// Waits up to `timeout` for the first event that `pred` accepts and takes it
    /// (other events stay); `Ok(None)` when none came in time.
    pub fn wait_event(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Result<Option<Value>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.events.iter().position(&mut pred) {
                return Ok(Some(self.events.remove(i)));
            }
            match self.read_message(deadline) {
                Ok(m) if m.get("event").is_some() => self.events.push(m),
                Ok(_) => {}
                Err(QmpClientError::Connection { reason, .. }) if reason == TIMED_OUT => {
                    return Ok(None);
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn read_message(&mut self, deadline: Instant) -> Result<Value> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                let text = line.trim_ascii();
                if text.is_empty() {
                    continue;
                }
                return serde_json::from_slice(text).map_err(|e| {
                    self.conn_err(format!(
                        "invalid message {:?}: {e}",
                        String::from_utf8_lossy(text)
                    ))
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(self.conn_err(TIMED_OUT));
            }
            self.stream
                .set_read_timeout(Some(deadline - now))
                .map_err(|e| self.conn_err(e.to_string()))?;
            let mut chunk = [0u8; 16 << 10];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(self.conn_err("the daemon closed the connection")),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) =>
                {
                    return Err(self.conn_err(TIMED_OUT));
                }
                Err(e) => return Err(self.conn_err(e.to_string())),
            }
        }
    }
}

const TIMED_OUT: &str = "no reply in time";
