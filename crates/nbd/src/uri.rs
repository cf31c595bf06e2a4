//! NBD URIs (the subset QEMU and libnbd share) and a stream over either transport.
//!
//! - `nbd+unix:///EXPORT?socket=PATH` (an empty export is the default export)
//! - `nbd://HOST[:PORT]/EXPORT` (port 10809 when absent; `[v6addr]` for IPv6)
//!
//! Export names and socket paths are percent-decoded.

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// The IANA port of NBD.
pub const DEFAULT_PORT: u16 = 10809;

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A unix socket.
    Unix(PathBuf),
    /// A TCP host and port.
    Tcp(String, u16),
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// Where to connect.
    pub target: Target,
    /// The export name.
    pub export: String,
}

/// A URI that could not be parsed; the text says why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid NBD URI '{uri}': {reason}")]
pub struct UriError {
    /// The URI given.
    pub uri: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl NbdUri {
    /// Parses `nbd+unix:///EXPORT?socket=PATH` or `nbd://HOST[:PORT]/EXPORT`.
    pub fn parse(uri: &str) -> Result<NbdUri, UriError> {
        let err = |reason| UriError { uri: uri.to_owned(), reason };
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| err("no scheme"))?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = percent_decode(path).ok_or_else(|| err("bad percent-encoding"))?;
        match scheme {
            "nbd+unix" => {
                if !authority.is_empty() {
                    return Err(err("nbd+unix takes no host"));
                }
                let mut socket = None;
                for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    if k == "socket" {
                        let v = percent_decode(v).ok_or_else(|| err("bad percent-encoding"))?;
                        socket = Some(PathBuf::from(v));
                    }
                }
                let socket = socket
                    .filter(|s| !s.as_os_str().is_empty())
                    .ok_or_else(|| err("missing socket= parameter"))?;
                Ok(NbdUri { target: Target::Unix(socket), export })
            }
            "nbd" => {
                let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
                    let (h, after) = v6.split_once(']').ok_or_else(|| err("unclosed '['"))?;
                    (h, after.strip_prefix(':'))
                } else {
                    match authority.rsplit_once(':') {
                        Some((h, p)) => (h, Some(p)),
                        None => (authority, None),
                    }
                };
                if host.is_empty() {
                    return Err(err("missing host"));
                }
                let port = match port {
                    Some(p) => p.parse().map_err(|_| err("bad port"))?,
                    None => DEFAULT_PORT,
                };
                Ok(NbdUri { target: Target::Tcp(host.to_owned(), port), export })
            }
            _ => Err(err("unsupported scheme (nbd:// or nbd+unix://)")),
        }
    }
}

/// A connection over either transport.
#[derive(Debug)]
pub enum Stream {
    /// A unix socket.
    Unix(UnixStream),
    /// TCP.
    Tcp(TcpStream),
}

impl Stream {
    /// Connects to `target`.
    pub async fn connect(target: &Target) -> io::Result<Stream> {
        Ok(match target {
            Target::Unix(path) => Stream::Unix(UnixStream::connect(path).await?),
            Target::Tcp(host, port) => {
                let s = TcpStream::connect((host.as_str(), *port)).await?;
                // Requests are small and latency-bound.
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
        })
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_unix_and_tcp() {
        let u = NbdUri::parse("nbd+unix:///disk0?socket=/tmp/a%20b.sock").unwrap();
        assert_eq!(u.target, Target::Unix("/tmp/a b.sock".into()));
        assert_eq!(u.export, "disk0");
        let u = NbdUri::parse("nbd+unix://?socket=/s").unwrap();
        assert_eq!(u.export, "");
        let u = NbdUri::parse("nbd://localhost/e%2Fx").unwrap();
        assert_eq!(
            u,
            NbdUri { target: Target::Tcp("localhost".into(), 10809), export: "e/x".into() }
        );
        let u = NbdUri::parse("nbd://[::1]:1234").unwrap();
        assert_eq!(u.target, Target::Tcp("::1".into(), 1234));
        for bad in
            ["", "nbd+unix:///x", "nbd://:1/x", "http://h/x", "nbd://h:99999/", "nbd://h/%zz"]
        {
            assert!(NbdUri::parse(bad).is_err(), "{bad}");
        }
    }
}
