//! A tokio NBD server: fixed newstyle negotiation and the transmission phase, serving
//! the exports of an [`Exports`] registry.
//!
//! Every connection runs in its own task; requests on one connection are handled
//! concurrently and answered as they complete. A protocol violation ends only the
//! connection of the client that committed it.
//!
//! [`ServerHandle::shutdown`] drains: no new connections, no new requests, the requests
//! already received complete and are answered, then the connections close. Dropping the
//! handle cuts everything off at once.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::future::Future;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, ToSocketAddrs, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::{JoinHandle, JoinSet};

use crate::codec::{
    self, ChunkStyle, CodecError, Extent, InfoRequest, MetaContextRequest, OptionHeader, Request,
};
use crate::export::{Export, ExportError, Exports, ZeroFlags};
use crate::phase::Phase;
use crate::proto::*;

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// Reading from or writing to the client failed (including EOF mid-message).
    #[error("connection I/O: {0}")]
    Io(#[from] io::Error),
    /// The client sent a malformed message that forces a disconnect.
    #[error("protocol violation: {0}")]
    Protocol(#[from] CodecError),
    /// The client violated the protocol in a way that is not a framing error.
    #[error("protocol violation: {0}")]
    Violation(&'static str),
}

/// Largest option payload that is consumed and answered with `REP_ERR_TOO_BIG`; larger
/// ones end the connection.
const MAX_SKIPPED_OPTION: u32 = 1 << 20;
/// Memory budget of one connection's in-flight requests, in 1 MiB units.
const INFLIGHT_MIB: u32 = 96;
/// Replies smaller than this are gathered into one write while more are ready.
const WRITE_BATCH: usize = 256 * 1024;
/// Granularity of hole detection in structured reads.
const HOLE_GRANULE: u64 = 4096;

/// How long a forced end of the drain ([`ServerHandle::shutdown`]) may take before the
/// handle gives up waiting and aborts what is left.
const FORCE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Where a listener is in its life (the value of its phase channel).
const RUNNING: u8 = 0;
/// Draining: no new connections or requests; requests received complete.
const DRAINING: u8 = 1;
/// The drain took too long: requests still running are dropped unanswered.
const FORCED: u8 = 2;

/// An NBD server over an [`Exports`] registry.
#[derive(Debug, Clone)]
pub struct Server {
    exports: Arc<Exports>,
    /// Connections served at once; `None` = unlimited.
    connection_slots: Option<Arc<Semaphore>>,
    /// The phase of the listener this server's connections came from (`None`: a
    /// connection handed to [`serve`](Self::serve) directly, which never drains).
    phase: Option<Phase>,
}

/// Waits until the listener's phase is at least `phase`; never, without a listener.
async fn reached(listener: &Option<Phase>, phase: u8) {
    match listener {
        Some(p) => p.reached(phase).await,
        None => std::future::pending().await,
    }
}

/// A running listener. [`shutdown`](Self::shutdown) stops it cleanly; dropping it (or
/// [`stop`](Self::stop)) stops accepting and ends all its connections at once.
#[derive(Debug)]
pub struct ServerHandle {
    task: JoinHandle<()>,
    phase: Phase,
    socket: Option<PathBuf>,
    local_addr: Option<std::net::SocketAddr>,
}

impl ServerHandle {
    /// The unix socket path, if listening on one.
    pub fn socket_path(&self) -> Option<&Path> {
        self.socket.as_deref()
    }
    /// The TCP address, if listening on TCP.
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.local_addr
    }
    /// Stops the listener and its connections, and removes the unix socket.
    pub fn stop(self) {
        drop(self);
    }

    /// Stops cleanly, as a server shutting down should (NBD spec: it waits for the
    /// requests in flight): the listener closes and the unix socket is removed, so no
    /// new client connects; open connections read no further request (one not fully
    /// received gets no reply, clients still negotiating are closed); the requests
    /// already received complete and their replies are sent; then each connection
    /// closes. Nothing is answered with an error because of the shutdown. After
    /// `grace`, what is left is dropped unanswered (a client that stopped reading cannot
    /// hold the shutdown up). When this returns no connection task is left.
    pub async fn shutdown(mut self, grace: std::time::Duration) {
        self.phase.set(DRAINING);
        if let Some(p) = &self.socket {
            let _ = std::fs::remove_file(p);
        }
        if tokio::time::timeout(grace, &mut self.task).await.is_err() {
            self.phase.set(FORCED);
            let _ = tokio::time::timeout(FORCE_WAIT, &mut self.task).await;
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(p) = &self.socket {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Binds a unix socket at `path`, owner-only (mode 0600). A socket already there that
/// nobody listens on (left by a process that died) is replaced; a live socket or any
/// other kind of file is an error, and is left alone.
pub fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "File exists and is not a socket",
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::from_raw_os_error(EADDRINUSE));
        }
        std::fs::remove_file(path)?;
    }
    // Connecting needs write permission on the socket, which a usual umask already
    // denies to others until the mode is narrowed to 0600 here.
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Linux's `EADDRINUSE`, so that the error reads as the OS's own.
const EADDRINUSE: i32 = 98;

/// A listening socket of either kind; a connection comes as owned read and write
/// halves, which (unlike `tokio::io::split`) share no lock.
trait Listener: Send + 'static {
    type Read: AsyncRead + Unpin + Send + 'static;
    type Write: AsyncWrite + Unpin + Send + 'static;
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Read, Self::Write)>> + Send;
}

impl Listener for UnixListener {
    type Read = tokio::net::unix::OwnedReadHalf;
    type Write = tokio::net::unix::OwnedWriteHalf;
    async fn accept(&self) -> io::Result<(Self::Read, Self::Write)> {
        UnixListener::accept(self).await.map(|(s, _)| s.into_split())
    }
}

impl Listener for TcpListener {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    async fn accept(&self) -> io::Result<(Self::Read, Self::Write)> {
        let (stream, _) = TcpListener::accept(self).await?;
        let _ = stream.set_nodelay(true);
        Ok(stream.into_split())
    }
}

impl Server {
    /// A server for `exports`, with no limit on connections.
    pub fn new(exports: Arc<Exports>) -> Self {
        Server { exports, connection_slots: None, phase: None }
    }

    /// Serves at most `max` connections at once (0 = unlimited); further clients wait in
    /// the listen queue until one ends, as QEMU's `max-connections` does.
    pub fn with_max_connections(mut self, max: u32) -> Self {
        self.connection_slots = (max > 0).then(|| Arc::new(Semaphore::new(max as usize)));
        self
    }

    /// The registry.
    pub fn exports(&self) -> &Arc<Exports> {
        &self.exports
    }

    /// Listens on a unix socket at `path` (see [`bind_unix`]) and serves clients in a
    /// background task.
    pub async fn listen_unix(&self, path: &Path) -> io::Result<ServerHandle> {
        let listener = bind_unix(path)?;
        let phase = Phase::new(RUNNING);
        let server = Server { phase: Some(phase.clone()), ..self.clone() };
        let task = tokio::spawn(server.accept_loop(listener));
        Ok(ServerHandle { task, phase, socket: Some(path.to_owned()), local_addr: None })
    }

    /// Listens on TCP `addr` and serves clients in a background task.
    pub async fn listen_tcp(&self, addr: impl ToSocketAddrs) -> io::Result<ServerHandle> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let phase = Phase::new(RUNNING);
        let server = Server { phase: Some(phase.clone()), ..self.clone() };
        let task = tokio::spawn(server.accept_loop(listener));
        Ok(ServerHandle { task, phase, socket: None, local_addr: Some(local) })
    }

    async fn accept_loop<L: Listener>(self, listener: L) {
        let mut conns = JoinSet::new();
        let phase = self.phase.clone();
        loop {
            // A slot is taken before accepting, so clients beyond the limit wait.
            let slot = match &self.connection_slots {
                Some(slots) => tokio::select! {
                    biased;
                    _ = reached(&phase, DRAINING) => break,
                    slot = slots.clone().acquire_owned() => match slot {
                        Ok(slot) => Some(slot),
                        Err(_) => break,
                    },
                    Some(_) = conns.join_next(), if !conns.is_empty() => continue,
                },
                None => None,
            };
            tokio::select! {
                biased;
                _ = reached(&phase, DRAINING) => break,
                accepted = listener.accept() => match accepted {
                    Ok((rd, wr)) => {
                        let s = self.clone();
                        conns.spawn(async move {
                            let _ = s.serve_halves(rd, wr).await;
                            drop(slot);
                        });
                    }
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        // Draining: no new clients; the connections finish their requests and close.
        drop(listener);
        while conns.join_next().await.is_some() {}
    }

    /// Serves one client on `stream` until it disconnects. `Ok` after a clean end
    /// (`OPT_ABORT`, `CMD_DISC`, or EOF between messages).
    pub async fn serve<S>(&self, stream: S) -> Result<(), ServeError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(stream);
        self.serve_halves(rd, wr).await
    }

    /// [`serve`](Self::serve) on a connection's separate read and write halves.
    pub async fn serve_halves<R, W>(&self, rd: R, mut wr: W) -> Result<(), ServeError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        // Buffered: a request header then takes one read call, not two; large payloads
        // bypass the buffer.
        let mut rd = tokio::io::BufReader::with_capacity(64 * 1024, rd);
        let phase = self.phase.clone();
        let session = tokio::select! {
            biased;
            // A client still negotiating has sent no request: it is simply closed.
            _ = reached(&phase, DRAINING) => return Ok(()),
            negotiated = negotiate(&self.exports, &mut rd, &mut wr) => match negotiated? {
                Some(session) => session,
                None => return Ok(()),
            },
        };
        transmission(session, rd, wr, phase).await
    }
}

/// The state at the start of transmission.
struct Session {
    export: Arc<dyn Export>,
    flags: u16,
    structured: bool,
    extended: bool,
    contexts: Vec<(u32, String)>,
}

async fn read_array<R: AsyncRead + Unpin, const N: usize>(rd: &mut R) -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    rd.read_exact(&mut b).await?;
    Ok(b)
}

/// Reads and drops `n` bytes with a bounded buffer.
async fn skip<R: AsyncRead + Unpin>(rd: &mut R, mut n: u64) -> io::Result<()> {
    let mut buf = [0u8; 8192];
    while n > 0 {
        let k = n.min(buf.len() as u64) as usize;
        rd.read_exact(&mut buf[..k]).await?;
        n -= k as u64;
    }
    Ok(())
}

/// The export an option's request names. On a malformed request or an unknown export
/// the error reply is encoded into `out` and `None` returned.
fn requested_export<T>(
    out: &mut Vec<u8>,
    opt: u32,
    parsed: Result<T, codec::CodecError>,
    export_name: impl Fn(&T) -> &String,
    exports: &Exports,
) -> Option<(T, String, Arc<dyn Export>)> {
    let req = match parsed {
        Ok(req) => req,
        Err(e) => {
            codec::encode_rep_error(out, opt, REP_ERR_INVALID, &format!("malformed request: {e}"));
            return None;
        }
    };
    let Some((canonical, export)) = exports.get(export_name(&req)) else {
        let message = format!("export '{}' not present", export_name(&req));
        codec::encode_rep_error(out, opt, REP_ERR_UNKNOWN, &message);
        return None;
    };
    Some((req, canonical, export))
}

fn transmission_flags(export: &dyn Export, structured: bool, extended: bool) -> u16 {
    let mut f = FLAG_HAS_FLAGS;
    if export.read_only() {
        f |= FLAG_READ_ONLY;
    }
    if export.can_flush() {
        f |= FLAG_SEND_FLUSH | FLAG_SEND_FUA;
    }
    if !export.read_only() {
        if export.can_trim() {
            f |= FLAG_SEND_TRIM;
        }
        if export.can_write_zeroes() {
            f |= FLAG_SEND_WRITE_ZEROES;
            if export.can_fast_zero() {
                f |= FLAG_SEND_FAST_ZERO;
            }
        }
    }
    if export.can_cache() {
        f |= FLAG_SEND_CACHE;
    }
    if export.can_multi_conn() {
        f |= FLAG_CAN_MULTI_CONN;
    }
    if structured || extended {
        f |= FLAG_SEND_DF;
    }
    if extended {
        f |= FLAG_BLOCK_STATUS_PAYLOAD;
    }
    f
}

/// The contexts of `export` (id = index) matching `queries`. `list` enables the
/// wildcard queries of `OPT_LIST_META_CONTEXT` (`base:`, `qemu:`, `qemu:dirty-bitmap:`,
/// and no query at all).
fn match_contexts(export: &dyn Export, queries: &[String], list: bool) -> Vec<(u32, String)> {
    let mut all = vec![CONTEXT_BASE_ALLOCATION.to_owned()];
    for c in export.meta_contexts() {
        if !all.contains(&c) {
            all.push(c);
        }
    }
    let mut selected = vec![false; all.len()];
    if list && queries.is_empty() {
        selected.iter_mut().for_each(|s| *s = true);
    }
    for q in queries {
        for (i, name) in all.iter().enumerate() {
            let wildcard = list && q.ends_with(':') && name.starts_with(q.as_str());
            if name == q || wildcard {
                selected[i] = true;
            }
        }
    }
    all.into_iter()
        .enumerate()
        .filter(|(i, _)| selected[*i])
        .map(|(i, n)| (u32::try_from(i).unwrap_or(u32::MAX), n))
        .collect()
}

/// Fixed newstyle negotiation. `None`: the client ended the session cleanly.
async fn negotiate<R, W>(
    exports: &Exports,
    rd: &mut R,
    wr: &mut W,
) -> Result<Option<Session>, ServeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let hflags = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;
    wr.write_all(&codec::encode_greeting(hflags)).await?;
    wr.flush().await?;
    let cflags = codec::parse_client_flags(read_array(rd).await?, hflags)?;
    let no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    let mut extended = false;
    let mut meta: Option<(String, Vec<(u32, String)>)> = None;
    let mut out = Vec::new();
    loop {
        out.clear();
        let hdr = OptionHeader::parse(&read_array(rd).await?)?;
        let opt = hdr.option;
        if hdr.length > MAX_OPTION_PAYLOAD {
            if hdr.length > MAX_SKIPPED_OPTION || opt == OPT_EXPORT_NAME {
                return Err(ServeError::Violation("oversized option"));
            }
            skip(rd, hdr.length.into()).await?;
            codec::encode_rep_error(&mut out, opt, REP_ERR_TOO_BIG, "option payload too large");
            wr.write_all(&out).await?;
            continue;
        }
        let mut payload = vec![0u8; hdr.length as usize];
        rd.read_exact(&mut payload).await?;
        match opt {
            OPT_EXPORT_NAME => {
                if extended {
                    return Err(ServeError::Violation("EXPORT_NAME after extended headers"));
                }
                let name = codec::parse_export_name(&payload)?;
                let Some((canonical, export)) = exports.get(&name) else {
                    return Err(ServeError::Violation("unknown export"));
                };
                let flags = transmission_flags(&*export, structured, false);
                codec::encode_export_name_reply(&mut out, export.size(), flags, no_zeroes);
                wr.write_all(&out).await?;
                wr.flush().await?;
                let contexts = selected_for(&mut meta, &canonical);
                return Ok(Some(Session { export, flags, structured, extended, contexts }));
            }
            OPT_ABORT => {
                codec::encode_rep_ack(&mut out, opt);
                // The client may already have closed; ignore failures.
                let _ = wr.write_all(&out).await;
                let _ = wr.flush().await;
                return Ok(None);
            }
            OPT_LIST => {
                if !payload.is_empty() {
                    codec::encode_rep_error(
                        &mut out,
                        opt,
                        REP_ERR_INVALID,
                        "OPT_LIST takes no data",
                    );
                } else {
                    for name in exports.names() {
                        let desc =
                            exports.get(&name).map(|(_, e)| e.description()).unwrap_or_default();
                        codec::encode_rep_server(&mut out, &name, &desc);
                    }
                    codec::encode_rep_ack(&mut out, opt);
                }
            }
            OPT_INFO | OPT_GO => {
                let parsed = InfoRequest::parse(&payload);
                if let Some((req, canonical, export)) =
                    requested_export(&mut out, opt, parsed, |r| &r.export, exports)
                {
                    let flags = transmission_flags(&*export, structured, extended);
                    if req.infos.contains(&INFO_NAME) {
                        codec::encode_info_name(&mut out, opt, &canonical);
                    }
                    let desc = export.description();
                    if req.infos.contains(&INFO_DESCRIPTION) && !desc.is_empty() {
                        codec::encode_info_description(&mut out, opt, &desc);
                    }
                    if req.infos.contains(&INFO_BLOCK_SIZE) {
                        codec::encode_info_block_size(&mut out, opt, export.block_size());
                    }
                    codec::encode_info_export(&mut out, opt, export.size(), flags);
                    codec::encode_rep_ack(&mut out, opt);
                    if opt == OPT_GO {
                        wr.write_all(&out).await?;
                        wr.flush().await?;
                        let contexts = selected_for(&mut meta, &canonical);
                        return Ok(Some(Session { export, flags, structured, extended, contexts }));
                    }
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !payload.is_empty() {
                    codec::encode_rep_error(&mut out, opt, REP_ERR_INVALID, "option takes no data");
                } else if extended {
                    codec::encode_rep_error(
                        &mut out,
                        opt,
                        REP_ERR_EXT_HEADER_REQD,
                        "extended headers already negotiated",
                    );
                } else {
                    structured = true;
                    codec::encode_rep_ack(&mut out, opt);
                }
            }
            OPT_EXTENDED_HEADERS => {
                if !payload.is_empty() {
                    codec::encode_rep_error(&mut out, opt, REP_ERR_INVALID, "option takes no data");
                } else {
                    extended = true;
                    codec::encode_rep_ack(&mut out, opt);
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = opt == OPT_SET_META_CONTEXT;
                if set {
                    meta = None;
                }
                if !structured && !extended {
                    codec::encode_rep_error(
                        &mut out,
                        opt,
                        REP_ERR_INVALID,
                        "structured replies not negotiated",
                    );
                } else {
                    let parsed = MetaContextRequest::parse(&payload);
                    if let Some((req, canonical, export)) =
                        requested_export(&mut out, opt, parsed, |r| &r.export, exports)
                    {
                        let found = match_contexts(&*export, &req.queries, !set);
                        for (id, name) in &found {
                            codec::encode_rep_meta_context(&mut out, opt, *id, name);
                        }
                        codec::encode_rep_ack(&mut out, opt);
                        if set {
                            meta = Some((canonical, found));
                        }
                    }
                }
            }
            OPT_STARTTLS => {
                codec::encode_rep_error(&mut out, opt, REP_ERR_POLICY, "TLS is not supported")
            }
            _ => codec::encode_rep_error(
                &mut out,
                opt,
                REP_ERR_UNSUP,
                &format!("option {opt} not supported"),
            ),
        }
        wr.write_all(&out).await?;
        wr.flush().await?;
    }
}

fn selected_for(
    meta: &mut Option<(String, Vec<(u32, String)>)>,
    export: &str,
) -> Vec<(u32, String)> {
    match meta.take() {
        Some((e, c)) if e == export => c,
        _ => Vec::new(),
    }
}

type Outgoing = (Vec<u8>, OwnedSemaphorePermit);

/// A request read from the client, with its payload and its share of the budget.
type Received = (Request, Vec<u8>, OwnedSemaphorePermit);

/// Reads the next request. `None`: the client ended the session (EOF between messages,
/// or `CMD_DISC`).
async fn next_request<R: AsyncRead + Unpin>(
    rd: &mut R,
    extended: bool,
    budget: &Arc<Semaphore>,
) -> Result<Option<Received>, ServeError> {
    let header_len = if extended { codec::EXTENDED_REQUEST_LEN } else { codec::REQUEST_LEN };
    let mut hdr = [0u8; codec::EXTENDED_REQUEST_LEN];
    // EOF before the first byte of a header is a clean (if rude) end.
    if rd.read(&mut hdr[..1]).await? == 0 {
        return Ok(None);
    }
    rd.read_exact(&mut hdr[1..header_len]).await?;
    let req = Request::parse(&hdr[..header_len], extended)?;
    let plen = req.payload_len(extended)?;
    if req.command == CMD_DISC {
        if plen > 0 {
            let _ = skip(rd, plen as u64).await;
        }
        return Ok(None);
    }
    let work =
        if req.command == CMD_READ { req.length.min(MAX_PAYLOAD.into()) as usize } else { 0 };
    let cost = (plen.max(work).div_ceil(1 << 20)).clamp(1, INFLIGHT_MIB as usize) as u32;
    let Ok(permit) = budget.clone().acquire_many_owned(cost).await else {
        return Err(ServeError::Violation("semaphore closed"));
    };
    let mut payload = vec![0u8; plen];
    rd.read_exact(&mut payload).await?;
    Ok(Some((req, payload, permit)))
}

async fn transmission<R, W>(
    session: Session,
    mut rd: R,
    mut wr: W,
    phase: Option<Phase>,
) -> Result<(), ServeError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let session = Arc::new(session);
    let (tx, mut rx) = mpsc::channel::<Outgoing>(64);
    // In a set, so that the writer goes with the connection's task if that is aborted.
    let mut writer = JoinSet::new();
    writer.spawn(async move {
        // Replies that are ready together go out in one write.
        let mut batch: Vec<u8> = Vec::new();
        let mut permits = Vec::new();
        while let Some((bytes, permit)) = rx.recv().await {
            if bytes.len() >= WRITE_BATCH {
                wr.write_all(&bytes).await?;
                drop(permit);
            } else {
                batch.extend_from_slice(&bytes);
                permits.push(permit);
            }
            while batch.len() < WRITE_BATCH {
                let Ok((bytes, permit)) = rx.try_recv() else { break };
                batch.extend_from_slice(&bytes);
                permits.push(permit);
            }
            if !batch.is_empty() {
                wr.write_all(&batch).await?;
                batch.clear();
            }
            wr.flush().await?;
            permits.clear();
        }
        wr.shutdown().await
    });
    let budget = Arc::new(Semaphore::new(INFLIGHT_MIB as usize));
    let mut tasks = JoinSet::new();
    // One wait for the drain for the whole connection, not one per request (see
    // `phase`: this is polled once or twice per request).
    let drain = reached(&phase, DRAINING);
    tokio::pin!(drain);
    let result = loop {
        // A shutdown stops reading at once: a request not fully received gets no reply
        // (the rest of the stream is never read, so stopping mid-request is harmless).
        let next = tokio::select! {
            biased;
            _ = &mut drain => break Ok(()),
            next = next_request(&mut rd, session.extended, &budget) => next,
        };
        let (req, payload, permit) = match next {
            Ok(Some(received)) => received,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        let s = session.clone();
        let tx = tx.clone();
        tasks.spawn(async move {
            let reply = handle_request(&s, req, payload).await;
            let _ = tx.send((reply, permit)).await;
        });
        while tasks.try_join_next().is_some() {}
    };
    if result.is_err() {
        // A hard disconnect: pending replies are dropped, and a client that stopped
        // reading cannot keep this connection alive.
        tasks.abort_all();
        writer.abort_all();
        return result;
    }
    // Finish in-flight requests (their replies are still sent), then close; unless the
    // shutdown is forced, which drops them unanswered.
    drop(tx);
    let finish = async {
        while tasks.join_next().await.is_some() {}
        let _ = writer.join_next().await;
    };
    tokio::select! {
        biased;
        _ = finish => {}
        _ = reached(&phase, FORCED) => {
            tasks.abort_all();
            writer.abort_all();
            while tasks.join_next().await.is_some() {}
            while writer.join_next().await.is_some() {}
        }
    }
    result
}

fn style(s: &Session, req: &Request) -> ChunkStyle {
    if s.extended { ChunkStyle::Extended { offset: req.offset } } else { ChunkStyle::Structured }
}

/// An error reply in the negotiated style.
fn error_reply(s: &Session, req: &Request, errno: u32, msg: &str) -> Vec<u8> {
    let mut out = Vec::new();
    if s.structured || s.extended {
        let _ = codec::encode_chunk_error(&mut out, style(s, req), req.cookie, errno, msg);
    } else {
        codec::encode_simple_reply(&mut out, errno, req.cookie);
    }
    out
}

/// A success reply without payload.
fn ok_reply(s: &Session, req: &Request) -> Vec<u8> {
    let mut out = Vec::new();
    if s.extended {
        codec::encode_chunk_none(&mut out, style(s, req), req.cookie);
    } else {
        codec::encode_simple_reply(&mut out, 0, req.cookie);
    }
    out
}

fn export_error(s: &Session, req: &Request, e: &ExportError) -> Vec<u8> {
    error_reply(s, req, e.nbd_errno(), &e.to_string())
}

const KNOWN_FLAGS: u16 = CMD_FLAG_FUA
    | CMD_FLAG_NO_HOLE
    | CMD_FLAG_DF
    | CMD_FLAG_REQ_ONE
    | CMD_FLAG_FAST_ZERO
    | CMD_FLAG_PAYLOAD_LEN;

async fn handle_request(s: &Session, req: Request, payload: Vec<u8>) -> Vec<u8> {
    let e = &*s.export;
    let size = e.size();
    let f = s.flags;
    let fua = req.flags & CMD_FLAG_FUA != 0;
    if req.flags & !KNOWN_FLAGS != 0 {
        return error_reply(s, &req, EINVAL, "unknown command flags");
    }
    let has_payload = s.extended && req.flags & CMD_FLAG_PAYLOAD_LEN != 0;
    if has_payload && !matches!(req.command, CMD_WRITE | CMD_BLOCK_STATUS) {
        return error_reply(s, &req, EINVAL, "unexpected payload");
    }
    if fua && f & FLAG_SEND_FUA == 0 {
        return error_reply(s, &req, EINVAL, "FUA not supported");
    }
    // Effect length: the payload length for WRITE, the payload's own field for BLOCK_STATUS.
    let mut length = req.length;
    let mut bs_ids: Option<Vec<u32>> = None;
    if req.command == CMD_WRITE {
        length = payload.len() as u64;
    } else if has_payload {
        match codec::parse_block_status_payload(&payload) {
            Ok((l, ids)) => {
                length = l;
                bs_ids = Some(ids);
            }
            Err(err) => return error_reply(s, &req, EINVAL, &err.to_string()),
        }
    }
    let writes = matches!(req.command, CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM);
    if writes && e.read_only() {
        return error_reply(s, &req, EPERM, "export is read-only");
    }
    let in_bounds = req.offset.checked_add(length).is_some_and(|end| end <= size);
    let needs_bounds = !matches!(req.command, CMD_FLUSH);
    if needs_bounds && !in_bounds && req.command <= CMD_BLOCK_STATUS {
        let errno =
            if matches!(req.command, CMD_WRITE | CMD_WRITE_ZEROES) { ENOSPC } else { EINVAL };
        return error_reply(s, &req, errno, "request beyond the end of the export");
    }
    let r = match req.command {
        CMD_READ => return read(s, &req, length).await,
        CMD_WRITE => e.write(req.offset, &payload, fua).await,
        CMD_FLUSH => {
            if f & FLAG_SEND_FLUSH == 0 {
                return error_reply(s, &req, EINVAL, "flush not supported");
            }
            e.flush().await
        }
        CMD_TRIM => {
            if f & FLAG_SEND_TRIM == 0 {
                return error_reply(s, &req, EINVAL, "trim not supported");
            }
            if length == 0 { Ok(()) } else { e.trim(req.offset, length, fua).await }
        }
        CMD_CACHE => {
            if f & FLAG_SEND_CACHE == 0 {
                return error_reply(s, &req, EINVAL, "cache not supported");
            }
            if length == 0 { Ok(()) } else { e.cache(req.offset, length).await }
        }
        CMD_WRITE_ZEROES => {
            if f & FLAG_SEND_WRITE_ZEROES == 0 {
                return error_reply(s, &req, EINVAL, "write zeroes not supported");
            }
            let fast = req.flags & CMD_FLAG_FAST_ZERO != 0;
            if fast && f & FLAG_SEND_FAST_ZERO == 0 {
                return error_reply(s, &req, EINVAL, "fast zero not supported");
            }
            let flags = ZeroFlags { may_trim: req.flags & CMD_FLAG_NO_HOLE == 0, fast, fua };
            if length == 0 { Ok(()) } else { e.write_zeroes(req.offset, length, flags).await }
        }
        CMD_BLOCK_STATUS => return block_status(s, &req, length, bs_ids).await,
        _ => return error_reply(s, &req, EINVAL, "unknown command"),
    };
    match r {
        Ok(()) => ok_reply(s, &req),
        Err(err) => export_error(s, &req, &err),
    }
}

async fn read(s: &Session, req: &Request, length: u64) -> Vec<u8> {
    if length > u64::from(MAX_PAYLOAD) {
        return error_reply(s, req, EOVERFLOW, "read too large");
    }
    let mut buf = vec![0u8; length as usize];
    if length > 0
        && let Err(err) = s.export.read(req.offset, &mut buf).await
    {
        return export_error(s, req, &err);
    }
    let mut out = Vec::with_capacity(buf.len() + 64);
    if !s.structured && !s.extended {
        codec::encode_simple_reply(&mut out, 0, req.cookie);
        out.extend_from_slice(&buf);
        return out;
    }
    let st = style(s, req);
    if buf.is_empty() {
        codec::encode_chunk_none(&mut out, st, req.cookie);
        return out;
    }
    if req.flags & CMD_FLAG_DF != 0 {
        let _ = codec::encode_chunk_data(&mut out, st, true, req.cookie, req.offset, &buf);
        return out;
    }
    // Runs of HOLE_GRANULE-aligned zero blocks become hole chunks.
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    let mut pos = 0usize;
    while pos < buf.len() {
        let abs = req.offset + pos as u64;
        let boundary = (abs / HOLE_GRANULE + 1).saturating_mul(HOLE_GRANULE);
        let next = usize::try_from(boundary - req.offset).unwrap_or(usize::MAX);
        let end = next.min(buf.len());
        let whole = abs.is_multiple_of(HOLE_GRANULE) && end - pos == HOLE_GRANULE as usize;
        let zero = whole && buf[pos..end].iter().all(|&b| b == 0);
        match runs.last_mut() {
            Some(last) if last.2 == zero => last.1 = end,
            _ => runs.push((pos, end, zero)),
        }
        pos = end;
    }
    let n = runs.len();
    for (i, (a, b, zero)) in runs.into_iter().enumerate() {
        let done = i + 1 == n;
        let off = req.offset + a as u64;
        if zero {
            let _ = codec::encode_chunk_hole(&mut out, st, done, req.cookie, off, (b - a) as u32);
        } else {
            let _ = codec::encode_chunk_data(&mut out, st, done, req.cookie, off, &buf[a..b]);
        }
    }
    out
}

/// Clips `extents` to `len`, drops empty ones, merges equal neighbours, applies
/// `req_one`, and caps the count and (without extended headers) the lengths.
fn normalize(extents: Vec<Extent>, len: u64, req_one: bool, extended: bool) -> Vec<Extent> {
    let max_len = if extended { u64::MAX } else { u64::from(u32::MAX) };
    let mut out: Vec<Extent> = Vec::new();
    let mut covered = 0u64;
    for e in extents {
        if covered >= len {
            break;
        }
        let l = e.length.min(len - covered);
        if l == 0 {
            continue;
        }
        covered += l;
        match out.last_mut() {
            Some(last) if last.flags == e.flags && last.length.saturating_add(l) <= max_len => {
                last.length += l
            }
            _ => {
                if out.len() >= MAX_EXTENTS {
                    break;
                }
                out.push(Extent { length: l, flags: e.flags });
            }
        }
    }
    if out.is_empty() {
        out.push(Extent { length: len.min(max_len), flags: 0 });
    }
    if req_one {
        out.truncate(1);
    }
    out
}

async fn block_status(s: &Session, req: &Request, length: u64, ids: Option<Vec<u32>>) -> Vec<u8> {
    if !s.structured && !s.extended {
        return error_reply(s, req, EINVAL, "block status requires structured replies");
    }
    if s.contexts.is_empty() {
        return error_reply(s, req, EINVAL, "no metadata context selected");
    }
    if length == 0 {
        return error_reply(s, req, EINVAL, "zero-length block status");
    }
    let chosen: Vec<&(u32, String)> = match &ids {
        None => s.contexts.iter().collect(),
        Some(ids) => {
            let mut v = Vec::new();
            for id in ids {
                match s.contexts.iter().find(|(i, _)| i == id) {
                    Some(c) if !v.iter().any(|x: &&(u32, String)| x.0 == *id) => v.push(c),
                    _ => return error_reply(s, req, EINVAL, "unknown or duplicate context id"),
                }
            }
            if v.is_empty() {
                return error_reply(s, req, EINVAL, "no context ids");
            }
            v
        }
    };
    let req_one = req.flags & CMD_FLAG_REQ_ONE != 0;
    let mut out = Vec::new();
    let n = chosen.len();
    for (i, (id, name)) in chosen.into_iter().enumerate() {
        let extents = match s.export.block_status(name, req.offset, length, req_one).await {
            Ok(e) => normalize(e, length, req_one, s.extended),
            Err(err) => return export_error(s, req, &err),
        };
        let done = i + 1 == n;
        let r = if s.extended {
            codec::encode_chunk_block_status_ext(
                &mut out, req.offset, done, req.cookie, *id, &extents,
            )
        } else {
            codec::encode_chunk_block_status(&mut out, done, req.cookie, *id, &extents)
        };
        if let Err(err) = r {
            return error_reply(s, req, EOVERFLOW, &err.to_string());
        }
    }
    out
}
