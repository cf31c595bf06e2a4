//! QMP monitors on unix sockets: `--chardev socket,path=…,server=on,wait=off,id=ID` with
//! `--monitor chardev=ID`. Each monitor serves one client at a time, as QEMU's do; the
//! next client is accepted when the current one leaves.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use super::Qmp;
use super::protocol::{self, QmpError};

/// Most bytes of one unfinished message; a client that sends more is disconnected.
const MAX_MESSAGE: usize = 16 << 20;

/// A listening monitor; dropping it stops it and removes its socket.
#[derive(Debug)]
pub struct Monitor {
    task: JoinHandle<()>,
    path: PathBuf,
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Monitor {
    /// Starts a monitor on a unix socket at `path`.
    pub fn listen(path: &Path, qmp: Arc<Qmp>) -> io::Result<Monitor> {
        let listener = nbd::server::bind_unix(path)?;
        let task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => serve_client(stream, &qmp).await,
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
                }
            }
        });
        Ok(Monitor { task, path: path.to_owned() })
    }
}

/// One client's session: greeting, capabilities negotiation, then commands and events.
async fn serve_client(mut stream: UnixStream, qmp: &Arc<Qmp>) {
    if stream.write_all(&protocol::encode(&protocol::greeting())).await.is_err() {
        return;
    }
    let mut negotiated = false;
    let mut events: Option<broadcast::Receiver<Value>> = None;
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            read = stream.read(&mut chunk) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            event = recv_event(&mut events) => {
                if let Some(event) = event
                    && stream.write_all(&protocol::encode(&event)).await.is_err()
                {
                    return;
                }
                continue;
            }
        };
        buf.extend_from_slice(&chunk[..n]);
        let (messages, consumed, error) = split_messages(&buf);
        buf.drain(..consumed);
        for message in messages {
            let mut quit = false;
            let reply = match protocol::parse_command(message) {
                Err((e, id)) => protocol::error_reply(&e, id),
                Ok(cmd) => {
                    let id = cmd.id.clone();
                    let is_quit = negotiated && cmd.name == "quit";
                    let result = if !negotiated {
                        if cmd.name == "qmp_capabilities" {
                            negotiated = true;
                            events = Some(qmp.subscribe());
                            qmp.execute(cmd).await
                        } else {
                            Err(QmpError::command_not_found(
                                "Expecting capabilities negotiation with 'qmp_capabilities'",
                            ))
                        }
                    } else if cmd.name == "qmp_capabilities" {
                        Err(QmpError::command_not_found(
                            "Capabilities negotiation is already complete, command ignored",
                        ))
                    } else {
                        qmp.execute(cmd).await
                    };
                    quit = is_quit && result.is_ok();
                    match result {
                        Ok(value) => protocol::return_reply(value, id),
                        Err(e) => protocol::error_reply(&e, id),
                    }
                }
            };
            // Events the command emitted go out before its reply, as QEMU sends them.
            if let Some(rx) = events.as_mut() {
                let mut pending = Vec::new();
                loop {
                    match rx.try_recv() {
                        Ok(event) => pending.extend(protocol::encode(&event)),
                        Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
                        Err(_) => break,
                    }
                }
                if !pending.is_empty() && stream.write_all(&pending).await.is_err() {
                    return;
                }
            }
            let sent = stream.write_all(&protocol::encode(&reply)).await;
            if quit {
                let _ = stream.flush().await;
                qmp.request_quit();
            }
            if sent.is_err() {
                return;
            }
        }
        if let Some(e) = error {
            let reply = protocol::error_reply(&QmpError::generic(e), None);
            if stream.write_all(&protocol::encode(&reply)).await.is_err() {
                return;
            }
        }
        if buf.len() > MAX_MESSAGE {
            let e = QmpError::generic("JSON parse error, message too long");
            let _ = stream.write_all(&protocol::encode(&protocol::error_reply(&e, None))).await;
            return;
        }
    }
}

async fn recv_event(events: &mut Option<broadcast::Receiver<Value>>) -> Option<Value> {
    match events {
        Some(rx) => loop {
            match rx.recv().await {
                Ok(event) => return Some(event),
                // A client too slow for the event rate loses the oldest events.
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
            }
        },
        None => std::future::pending().await,
    }
}

/// The complete JSON values at the start of `buf`, how many bytes they (and any bad
/// input) took, and a parse error to report. After a syntax error the rest of the
/// buffer is dropped, so the client can start over.
fn split_messages(buf: &[u8]) -> (Vec<Value>, usize, Option<String>) {
    let mut values = Vec::new();
    let mut stream = serde_json::Deserializer::from_slice(buf).into_iter::<Value>();
    loop {
        match stream.next() {
            None => return (values, buf.len(), None),
            Some(Ok(v)) => values.push(v),
            Some(Err(e)) if e.is_eof() => return (values, stream.byte_offset(), None),
            Some(Err(e)) => {
                return (values, buf.len(), Some(format!("JSON parse error, {e}")));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_split_across_reads_and_several_per_read() {
        let (v, used, err) = split_messages(br#"{"a":1} {"b":2} {"c""#);
        assert_eq!(v.len(), 2);
        assert_eq!(used, 16);
        assert!(err.is_none());
        let bad = b"{bad json} {\"x\":1}";
        let (v, used, err) = split_messages(bad);
        assert!(v.is_empty());
        assert_eq!(used, bad.len());
        assert!(err.unwrap().starts_with("JSON parse error, "));
    }
}
