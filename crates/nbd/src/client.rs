//! A small sequential NBD client: fixed newstyle negotiation with `OPT_GO`, structured
//! replies (and extended headers when the server accepts them), metadata context
//! selection, and the basic commands.

use std::io;
use std::path::Path;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::codec::{
    self, BlockSize, CodecError, Extent, Info, InfoRequest, MetaContextRequest, OptionHeader,
    OptionReplyHeader, ReplyHeader, Request,
};
use crate::proto::*;
use crate::uri::{NbdUri, Stream, Target};

/// A client failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Connection I/O failed.
    #[error("connection I/O: {0}")]
    Io(#[from] io::Error),
    /// The server sent a malformed message.
    #[error("malformed message from server: {0}")]
    Protocol(#[from] CodecError),
    /// The server answered an option with an error reply.
    #[error("option {option} failed with {error:#x}: {message}")]
    Option {
        /// The option.
        option: u32,
        /// The `REP_ERR_*` value.
        error: u32,
        /// The server's message.
        message: String,
    },
    /// The server answered a command with an error.
    #[error("command failed with NBD error {errno}: {message}")]
    Command {
        /// The NBD error value.
        errno: u32,
        /// The server's message, if any.
        message: String,
    },
    /// The server did something the protocol forbids.
    #[error("unexpected reply: {0}")]
    Unexpected(&'static str),
    /// The server's reply to a read broke the protocol: a chunk outside the request, a
    /// chunk over bytes already returned, or the reply ended before returning every
    /// byte of the request. The read fails; none of its data is handed out.
    #[error(
        "protocol violation in the reply to a read of {length} bytes at offset {offset}: \
         {problem}"
    )]
    BadRead {
        /// Where the read started.
        offset: u64,
        /// Its length.
        length: u64,
        /// What was wrong.
        problem: String,
    },
}

type Result<T> = std::result::Result<T, ClientError>;

/// What to negotiate.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// Export name ("" for the default export).
    pub export: String,
    /// Metadata contexts to select (requires structured replies).
    pub meta_contexts: Vec<String>,
    /// Try `OPT_EXTENDED_HEADERS` first.
    pub extended_headers: bool,
}

/// A connected client in the transmission phase.
#[derive(Debug)]
pub struct Client<S> {
    stream: S,
    size: u64,
    flags: u16,
    extended: bool,
    structured: bool,
    contexts: Vec<(u32, String)>,
    cookie: u64,
    block_size: Option<BlockSize>,
}

impl Client<UnixStream> {
    /// Connects to a unix socket and negotiates.
    pub async fn connect_unix(path: &Path, options: &ClientOptions) -> Result<Self> {
        Self::handshake(UnixStream::connect(path).await?, options).await
    }
}

impl Client<Stream> {
    /// Connects to `target` (unix socket or TCP) and negotiates.
    pub async fn connect(target: &Target, options: &ClientOptions) -> Result<Self> {
        Self::handshake(Stream::connect(target).await?, options).await
    }

    /// Connects to the server and export of an NBD URI (see [`NbdUri`]); the export
    /// name in `options` is replaced by the URI's.
    pub async fn connect_uri(uri: &NbdUri, options: &ClientOptions) -> Result<Self> {
        let options = ClientOptions { export: uri.export.clone(), ..options.clone() };
        Self::connect(&uri.target, &options).await
    }
}

/// Bound on option reply payloads the client accepts.
const MAX_OPTION_REPLY: u32 = 1 << 20;
/// Bound on reply chunk payloads the client accepts.
const MAX_CHUNK: u64 = MAX_PAYLOAD as u64 + 16 * MAX_EXTENTS as u64 + 64;

async fn send_option<S: AsyncWrite + Unpin>(s: &mut S, option: u32, payload: &[u8]) -> Result<()> {
    let mut out = Vec::new();
    OptionHeader::encode(option, payload, &mut out);
    s.write_all(&out).await?;
    s.flush().await?;
    Ok(())
}

async fn read_option_reply<S: AsyncRead + Unpin>(s: &mut S, option: u32) -> Result<(u32, Vec<u8>)> {
    let mut b = [0u8; codec::OPTION_REPLY_HEADER_LEN];
    s.read_exact(&mut b).await?;
    let h = OptionReplyHeader::parse(&b)?;
    if h.option != option {
        return Err(ClientError::Unexpected("option reply for another option"));
    }
    if h.length > MAX_OPTION_REPLY {
        return Err(ClientError::Unexpected("option reply too large"));
    }
    let mut p = vec![0u8; h.length as usize];
    s.read_exact(&mut p).await?;
    if h.reply_type & REP_FLAG_ERROR != 0 {
        return Err(ClientError::Option {
            option,
            error: h.reply_type,
            message: String::from_utf8_lossy(&p).into_owned(),
        });
    }
    Ok((h.reply_type, p))
}

/// Sends the greeting reply and returns the stream ready for options.
async fn start<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<()> {
    let mut g = [0u8; codec::GREETING_LEN];
    s.read_exact(&mut g).await?;
    let hflags = codec::parse_greeting(&g)?;
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ClientError::Unexpected("server does not support fixed newstyle"));
    }
    let mut c = FLAG_C_FIXED_NEWSTYLE;
    if hflags & FLAG_NO_ZEROES != 0 {
        c |= FLAG_C_NO_ZEROES;
    }
    s.write_all(&c.to_be_bytes()).await?;
    Ok(())
}

/// Lists the exports of the server at `path` as (name, description).
pub async fn list_exports(path: &Path) -> Result<Vec<(String, String)>> {
    let mut s = UnixStream::connect(path).await?;
    start(&mut s).await?;
    send_option(&mut s, OPT_LIST, &[]).await?;
    let mut v = Vec::new();
    loop {
        let (ty, p) = read_option_reply(&mut s, OPT_LIST).await?;
        match ty {
            REP_SERVER => v.push(codec::parse_rep_server(&p)?),
            REP_ACK => break,
            _ => return Err(ClientError::Unexpected("reply type in OPT_LIST")),
        }
    }
    send_option(&mut s, OPT_ABORT, &[]).await?;
    Ok(v)
}

/// Sends a flag-like option (no payload) and says whether the server accepted it; a
/// refusal is not an error.
async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, option: u32) -> Result<bool> {
    send_option(stream, option, &[]).await?;
    match read_option_reply(stream, option).await {
        Ok((REP_ACK, _)) => Ok(true),
        Ok(_) => Err(ClientError::Unexpected("reply to a flag option")),
        Err(ClientError::Option { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Longest error chunk payload: error, message length, a message of at most
/// `MAX_STRING` bytes, and an offset.
const MAX_ERROR_CHUNK: u64 = 4 + 2 + MAX_STRING as u64 + 8;

/// Which bytes of one read its reply has returned so far. Content chunks
/// (`OFFSET_DATA`, `OFFSET_HOLE`) must lie inside the request and must not overlap
/// (NBD spec, "Structured reply chunk message"), and a successful reply must return
/// every byte. Memory: nothing while the chunks come in order (what servers do), else
/// one bit per byte of the request, never more, whatever the server sends.
#[derive(Debug)]
struct Coverage {
    /// The request's length.
    len: u64,
    /// Bytes returned so far: the sum of the chunks' lengths, as they cannot overlap.
    covered: u64,
    /// While the chunks come in order, the end of the prefix they cover.
    prefix: u64,
    /// Once a chunk comes out of order: bit `i` = byte `i` of the request returned.
    bits: Option<Vec<u64>>,
}

/// Calls `f(word, mask)` for the words of a bit array that hold bits `[start, end)`,
/// while it returns `true`; says whether it always did.
fn each_word(start: u64, end: u64, mut f: impl FnMut(usize, u64) -> bool) -> bool {
    let mut pos = start;
    while pos < end {
        let bit = pos % 64;
        let n = (64 - bit).min(end - pos);
        let mask = if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << bit };
        // In bounds: the array has a bit for every byte of the request.
        if !f((pos / 64) as usize, mask) {
            return false;
        }
        pos += n;
    }
    true
}

impl Coverage {
    fn new(len: u64) -> Self {
        Coverage { len, covered: 0, prefix: 0, bits: None }
    }

    /// Records that the reply returned `n` bytes at `start` (relative to the request),
    /// or says why it may not.
    fn add(&mut self, start: u64, n: u64) -> std::result::Result<(), String> {
        let end = start.checked_add(n).filter(|&e| e <= self.len).ok_or_else(|| {
            format!("a chunk of {n} bytes at {start} bytes into the request lies outside it")
        })?;
        if n == 0 {
            return Err(format!("an empty chunk at {start} bytes into the request"));
        }
        let overlap = || {
            format!(
                "the chunk of {n} bytes at {start} bytes into the request overlaps an earlier one"
            )
        };
        match &mut self.bits {
            None if start == self.prefix => self.prefix = end,
            None if start < self.prefix => return Err(overlap()),
            None => {
                let mut bits = vec![0u64; self.len.div_ceil(64) as usize];
                each_word(0, self.prefix, |w, m| {
                    bits[w] |= m;
                    true
                });
                each_word(start, end, |w, m| {
                    bits[w] |= m;
                    true
                });
                self.bits = Some(bits);
            }
            Some(bits) => {
                if !each_word(start, end, |w, m| bits[w] & m == 0) {
                    return Err(overlap());
                }
                each_word(start, end, |w, m| {
                    bits[w] |= m;
                    true
                });
            }
        }
        self.covered += n;
        Ok(())
    }

    /// `Err` with what is missing unless every byte was returned.
    fn check_complete(&self) -> std::result::Result<(), String> {
        if self.covered == self.len {
            Ok(())
        } else {
            Err(format!(
                "the reply ended with {} of the {} bytes not returned",
                self.len - self.covered,
                self.len
            ))
        }
    }
}

/// One read waiting for its reply: where it reads, and what the reply has done so far.
#[derive(Debug)]
struct ReadState {
    offset: u64,
    coverage: Coverage,
    /// The first error chunk, if any: the read then fails with it.
    error: Option<ClientError>,
}

impl ReadState {
    fn new(offset: u64, len: usize) -> Self {
        ReadState { offset, coverage: Coverage::new(len as u64), error: None }
    }

    fn bad(&self, problem: String) -> ClientError {
        ClientError::BadRead { offset: self.offset, length: self.coverage.len, problem }
    }

    /// The read's outcome once its reply is done.
    fn finish(self) -> Result<()> {
        if let Some(e) = self.error {
            return Err(e);
        }
        self.coverage.check_complete().map_err(|p| self.bad(p))
    }

    /// A simple reply (header read): its data, if any, goes into `buf`. Refused when
    /// structured replies were negotiated: the protocol then forbids simple replies to
    /// reads, even for errors, and whether data follows would be a guess.
    async fn simple<S: AsyncRead + Unpin>(
        &mut self,
        stream: &mut S,
        structured: bool,
        error: u32,
        buf: &mut [u8],
    ) -> Result<()> {
        if structured {
            return Err(self.bad(format!(
                "a simple reply (error {error}) although structured replies were negotiated"
            )));
        }
        if error != 0 {
            self.error = Some(ClientError::Command {
                errno: error,
                message: format!("read at offset {}", self.offset),
            });
            return Ok(());
        }
        stream.read_exact(buf).await?;
        self.coverage.add(0, buf.len() as u64).map_err(|p| self.bad(p))
    }

    /// One chunk of a structured reply (header read, `length` bytes of payload to
    /// come): content goes straight into `buf` after its place was checked, so nothing
    /// the server says makes the client allocate more than the request's own size.
    async fn chunk<S: AsyncRead + Unpin>(
        &mut self,
        stream: &mut S,
        flags: u16,
        chunk_type: u16,
        length: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        match chunk_type {
            REPLY_TYPE_OFFSET_DATA => {
                if length < 9 {
                    return Err(self.bad(format!("a data chunk of {length} bytes (at least 9)")));
                }
                let n = length - 8;
                if n > buf.len() as u64 {
                    return Err(
                        self.bad(format!("a data chunk of {n} bytes, longer than the request"))
                    );
                }
                let mut o = [0u8; 8];
                stream.read_exact(&mut o).await?;
                let start = self.place(u64::from_be_bytes(o), n)?;
                stream.read_exact(&mut buf[start..start + n as usize]).await?;
            }
            REPLY_TYPE_OFFSET_HOLE => {
                if length != 12 {
                    return Err(self.bad(format!("a hole chunk of {length} bytes (not 12)")));
                }
                let mut h = [0u8; 12];
                stream.read_exact(&mut h).await?;
                let (o, n) = h.split_at(8);
                let off = u64::from_be_bytes(o.try_into().unwrap_or_default());
                let n = u32::from_be_bytes(n.try_into().unwrap_or_default());
                let start = self.place(off, n.into())?;
                buf[start..start + n as usize].fill(0);
            }
            REPLY_TYPE_NONE => {
                if length != 0 || flags & REPLY_FLAG_DONE == 0 {
                    return Err(ClientError::Unexpected("NONE chunk with a payload or not last"));
                }
            }
            t if t & REPLY_TYPE_FLAG_ERROR != 0 => {
                if length > MAX_ERROR_CHUNK {
                    return Err(ClientError::Unexpected("error chunk too large"));
                }
                let mut e = vec![0u8; length as usize];
                stream.read_exact(&mut e).await?;
                let (errno, message, _) = codec::parse_error_chunk(&e, t)?;
                let message = format!("read at offset {}: {message}", self.offset);
                self.error.get_or_insert(ClientError::Command { errno, message });
            }
            _ => return Err(ClientError::Unexpected("chunk type in read reply")),
        }
        Ok(())
    }

    /// Checks a content chunk of `n` bytes at export offset `off` against the request
    /// and the chunks before it, and records it; returns where it starts in the buffer.
    fn place(&mut self, off: u64, n: u64) -> Result<usize> {
        let Some(start) = off.checked_sub(self.offset) else {
            return Err(self.bad(format!("a chunk at offset {off}, before the request")));
        };
        self.coverage.add(start, n).map_err(|p| self.bad(p))?;
        // Within the buffer: `add` checked `start + n` against its length.
        Ok(start as usize)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// Negotiates on `stream`: extended headers (if asked) or structured replies, the
    /// metadata contexts, then `OPT_GO`.
    pub async fn handshake(mut stream: S, options: &ClientOptions) -> Result<Self> {
        start(&mut stream).await?;
        let extended =
            options.extended_headers && negotiate(&mut stream, OPT_EXTENDED_HEADERS).await?;
        let structured = extended || negotiate(&mut stream, OPT_STRUCTURED_REPLY).await?;
        let mut contexts = Vec::new();
        if !options.meta_contexts.is_empty() {
            let req = MetaContextRequest {
                export: options.export.clone(),
                queries: options.meta_contexts.clone(),
            };
            send_option(&mut stream, OPT_SET_META_CONTEXT, &req.encode()).await?;
            loop {
                let (ty, p) = read_option_reply(&mut stream, OPT_SET_META_CONTEXT).await?;
                match ty {
                    REP_META_CONTEXT => contexts.push(codec::parse_rep_meta_context(&p)?),
                    REP_ACK => break,
                    _ => return Err(ClientError::Unexpected("reply to OPT_SET_META_CONTEXT")),
                }
            }
        }
        let req = InfoRequest { export: options.export.clone(), infos: vec![INFO_BLOCK_SIZE] };
        send_option(&mut stream, OPT_GO, &req.encode()).await?;
        let mut export = None;
        let mut block_size = None;
        loop {
            let (ty, p) = read_option_reply(&mut stream, OPT_GO).await?;
            match ty {
                REP_INFO => match Info::parse(&p)? {
                    Info::Export { size, flags } => export = Some((size, flags)),
                    Info::BlockSize(bs) => block_size = Some(bs),
                    _ => {}
                },
                REP_ACK => break,
                _ => return Err(ClientError::Unexpected("reply to OPT_GO")),
            }
        }
        let Some((size, flags)) = export else {
            return Err(ClientError::Unexpected("no NBD_INFO_EXPORT"));
        };
        Ok(Client { stream, size, flags, extended, structured, contexts, cookie: 0, block_size })
    }

    /// The block size constraints the server announced, if any.
    pub fn block_size(&self) -> Option<BlockSize> {
        self.block_size
    }

    /// The largest read to send: the server's maximum block size, or 32 MiB (the
    /// protocol's default) when it announced none.
    pub fn max_read(&self) -> u32 {
        self.block_size.map_or(MAX_PAYLOAD, |b| b.maximum.clamp(512, MAX_PAYLOAD))
    }

    /// The id the server gave the metadata context `name`, if it was selected.
    pub fn context_id(&self, name: &str) -> Option<u32> {
        self.contexts.iter().find(|(_, n)| n == name).map(|(id, _)| *id)
    }

    /// Export size.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// Transmission flags.
    pub fn flags(&self) -> u16 {
        self.flags
    }
    /// Whether extended headers are in use.
    pub fn extended(&self) -> bool {
        self.extended
    }
    /// Whether structured replies are in use.
    pub fn structured(&self) -> bool {
        self.structured
    }
    /// The selected metadata contexts (id, name).
    pub fn meta_contexts(&self) -> &[(u32, String)] {
        &self.contexts
    }

    async fn send(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> Result<u64> {
        self.cookie += 1;
        let mut flags = flags;
        let mut length = length;
        if self.extended && !payload.is_empty() {
            flags |= CMD_FLAG_PAYLOAD_LEN;
            length = payload.len() as u64;
        }
        let req = Request { flags, command, cookie: self.cookie, offset, length };
        let mut out = Vec::with_capacity(codec::EXTENDED_REQUEST_LEN + payload.len());
        req.encode(&mut out, self.extended)?;
        out.extend_from_slice(payload);
        self.stream.write_all(&out).await?;
        self.stream.flush().await?;
        Ok(self.cookie)
    }

    /// Reads the whole reply to `cookie` (a command other than a read: a simple reply
    /// has no data), feeding content to `on_chunk(type, payload)`.
    async fn reply(
        &mut self,
        cookie: u64,
        mut on_chunk: impl FnMut(u16, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let mut error: Option<ClientError> = None;
        loop {
            match self.reply_header().await? {
                ReplyHeader::Simple { error: e, cookie: c } => {
                    if c != cookie {
                        return Err(ClientError::Unexpected("cookie mismatch"));
                    }
                    if e != 0 {
                        return Err(ClientError::Command { errno: e, message: String::new() });
                    }
                    return Ok(());
                }
                ReplyHeader::Chunk { flags, chunk_type, cookie: c, length } => {
                    if c != cookie {
                        return Err(ClientError::Unexpected("cookie mismatch"));
                    }
                    if length > MAX_CHUNK {
                        return Err(ClientError::Unexpected("chunk too large"));
                    }
                    let mut p = vec![0u8; length as usize];
                    self.stream.read_exact(&mut p).await?;
                    if chunk_type & REPLY_TYPE_FLAG_ERROR != 0 {
                        let (errno, message, _) = codec::parse_error_chunk(&p, chunk_type)?;
                        error.get_or_insert(ClientError::Command { errno, message });
                    } else if chunk_type != REPLY_TYPE_NONE {
                        on_chunk(chunk_type, &p)?;
                    }
                    if flags & REPLY_FLAG_DONE != 0 {
                        return error.map_or(Ok(()), Err);
                    }
                }
            }
        }
    }

    /// Reads the header of the next reply.
    async fn reply_header(&mut self) -> Result<ReplyHeader> {
        let mut magic = [0u8; 4];
        self.stream.read_exact(&mut magic).await?;
        let n = ReplyHeader::len_for_magic(magic)?;
        let mut b = [0u8; codec::EXTENDED_REPLY_LEN];
        b[..4].copy_from_slice(&magic);
        self.stream.read_exact(&mut b[4..n]).await?;
        Ok(ReplyHeader::parse(&b[..n])?)
    }

    /// Reads `buf.len()` bytes at `offset`. The reply must return every byte exactly
    /// once (data or hole chunks inside the request, not overlapping): anything else is
    /// a [`ClientError::BadRead`].
    pub async fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let cookie = self.send(CMD_READ, 0, offset, buf.len() as u64, &[]).await?;
        let mut state = ReadState::new(offset, buf.len());
        loop {
            match self.reply_header().await? {
                ReplyHeader::Simple { error, cookie: c } => {
                    if c != cookie {
                        return Err(ClientError::Unexpected("cookie mismatch"));
                    }
                    state.simple(&mut self.stream, self.structured, error, buf).await?;
                    return state.finish();
                }
                ReplyHeader::Chunk { flags, chunk_type, cookie: c, length } => {
                    if c != cookie {
                        return Err(ClientError::Unexpected("cookie mismatch"));
                    }
                    state.chunk(&mut self.stream, flags, chunk_type, length, buf).await?;
                    if flags & REPLY_FLAG_DONE != 0 {
                        return state.finish();
                    }
                }
            }
        }
    }

    async fn simple_command(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> Result<()> {
        let cookie = self.send(command, flags, offset, length, payload).await?;
        self.reply(cookie, |_, _| Err(ClientError::Unexpected("payload in reply"))).await
    }

    /// Writes `data` at `offset`.
    pub async fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        self.simple_command(CMD_WRITE, flags, offset, data.len() as u64, data).await
    }
    /// Flushes.
    pub async fn flush(&mut self) -> Result<()> {
        self.simple_command(CMD_FLUSH, 0, 0, 0, &[]).await
    }
    /// Trims `len` bytes at `offset`.
    pub async fn trim(&mut self, offset: u64, len: u64) -> Result<()> {
        self.simple_command(CMD_TRIM, 0, offset, len, &[]).await
    }
    /// Zeroes `len` bytes at `offset` with command flags (`CMD_FLAG_NO_HOLE`,
    /// `CMD_FLAG_FAST_ZERO`, `CMD_FLAG_FUA`).
    pub async fn write_zeroes(&mut self, offset: u64, len: u64, flags: u16) -> Result<()> {
        self.simple_command(CMD_WRITE_ZEROES, flags, offset, len, &[]).await
    }
    /// Sends a raw command without payload (for tests of error paths).
    pub async fn command(&mut self, command: u16, flags: u16, offset: u64, len: u64) -> Result<()> {
        self.simple_command(command, flags, offset, len, &[]).await
    }

    /// Block status of every selected context: (context id, extents).
    pub async fn block_status(
        &mut self,
        offset: u64,
        len: u64,
        req_one: bool,
    ) -> Result<Vec<(u32, Vec<Extent>)>> {
        let flags = if req_one { CMD_FLAG_REQ_ONE } else { 0 };
        let cookie = self.send(CMD_BLOCK_STATUS, flags, offset, len, &[]).await?;
        let mut v = Vec::new();
        self.reply(cookie, |ty, p| {
            match ty {
                REPLY_TYPE_BLOCK_STATUS => v.push(codec::parse_block_status(p, false)?),
                REPLY_TYPE_BLOCK_STATUS_EXT => v.push(codec::parse_block_status(p, true)?),
                _ => return Err(ClientError::Unexpected("chunk type in block status reply")),
            }
            Ok(())
        })
        .await?;
        Ok(v)
    }

    /// Reads many ranges with up to `depth` requests in flight on this one connection,
    /// calling `on_done(offset, data)` for each range as its reply completes (replies may
    /// complete out of order). Each range is at most [`max_read`](Client::max_read)
    /// bytes. Pipelining hides the round trip: a sequential client waits for every
    /// reply before asking for the next range.
    pub async fn read_many<I, F, Fut>(
        &mut self,
        ranges: I,
        depth: usize,
        mut on_done: F,
    ) -> Result<()>
    where
        I: IntoIterator<Item = (u64, u32)>,
        F: FnMut(u64, Vec<u8>) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        struct Pending {
            buf: Vec<u8>,
            state: ReadState,
        }
        let depth = depth.max(1);
        let max = self.max_read();
        let mut ranges = ranges.into_iter();
        let mut inflight: std::collections::HashMap<u64, Pending> =
            std::collections::HashMap::with_capacity(depth);
        let mut more = true;
        loop {
            while more && inflight.len() < depth {
                let Some((offset, len)) = ranges.next() else {
                    more = false;
                    break;
                };
                if len == 0 || len > max {
                    return Err(ClientError::Unexpected("read length out of bounds"));
                }
                let cookie = self.send(CMD_READ, 0, offset, len.into(), &[]).await?;
                let pending = Pending {
                    buf: vec![0u8; len as usize],
                    state: ReadState::new(offset, len as usize),
                };
                inflight.insert(cookie, pending);
            }
            if inflight.is_empty() {
                return Ok(());
            }
            let header = self.reply_header().await?;
            let (ReplyHeader::Simple { cookie, .. } | ReplyHeader::Chunk { cookie, .. }) = header;
            let p = inflight
                .get_mut(&cookie)
                .ok_or(ClientError::Unexpected("reply to an unknown cookie"))?;
            let done = match header {
                ReplyHeader::Simple { error, .. } => {
                    p.state.simple(&mut self.stream, self.structured, error, &mut p.buf).await?;
                    true
                }
                ReplyHeader::Chunk { flags, chunk_type, length, .. } => {
                    // Straight into the request's buffer: no copy.
                    p.state.chunk(&mut self.stream, flags, chunk_type, length, &mut p.buf).await?;
                    flags & REPLY_FLAG_DONE != 0
                }
            };
            if done && let Some(p) = inflight.remove(&cookie) {
                let offset = p.state.offset;
                p.state.finish()?;
                on_done(offset, p.buf).await?;
            }
        }
    }

    /// Walks the extents of the selected metadata context `context` (an id from
    /// [`context_id`](Client::context_id)) over `[offset, offset + len)`, calling
    /// `on_extent(offset, length, flags)` for consecutive extents that cover the range
    /// exactly (a server's last extent reaching past the range is clipped).
    pub async fn block_status_walk(
        &mut self,
        context: u32,
        offset: u64,
        len: u64,
        mut on_extent: impl FnMut(u64, u64, u64),
    ) -> Result<()> {
        let end = offset.checked_add(len).ok_or(ClientError::Unexpected("range overflows"))?;
        // Compact requests carry a 32-bit length; stay aligned well below it.
        let step = if self.extended { 1u64 << 40 } else { 1u64 << 31 };
        let mut pos = offset;
        while pos < end {
            let ask = (end - pos).min(step);
            let replies = self.block_status(pos, ask, false).await?;
            let extents = replies
                .into_iter()
                .find(|(id, _)| *id == context)
                .map(|(_, e)| e)
                .ok_or(ClientError::Unexpected("no extents for the context asked"))?;
            let before = pos;
            for e in extents {
                if pos >= end {
                    break;
                }
                if e.length == 0 {
                    return Err(ClientError::Unexpected("zero-length extent"));
                }
                let n = e.length.min(end - pos);
                on_extent(pos, n, e.flags);
                pos += n;
            }
            if pos == before {
                return Err(ClientError::Unexpected("block status made no progress"));
            }
        }
        Ok(())
    }

    /// Sends `CMD_DISC` and closes the connection.
    pub async fn disconnect(mut self) -> Result<()> {
        self.send(CMD_DISC, 0, 0, 0, &[]).await?;
        self.stream.shutdown().await?;
        Ok(())
    }
}
