//! A sans-I/O codec: parsing of fixed-size headers and option/request payloads from
//! byte slices, and encoding of every message either side sends.
//!
//! Parsers never allocate more than the slice they are given (bounded by the
//! [`proto`](crate::proto) limits by whoever reads it), and never panic.

use crate::proto::*;

/// A malformed message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// A magic number did not match.
    #[error("bad magic {found:#x} (expected {expected:#x})")]
    BadMagic {
        /// The expected magic.
        expected: u64,
        /// The magic received.
        found: u64,
    },
    /// The message is shorter than its fixed part or its declared lengths.
    #[error("message truncated")]
    Truncated,
    /// The message has bytes after its declared content.
    #[error("trailing bytes in message")]
    TrailingBytes,
    /// A string exceeds [`MAX_STRING`].
    #[error("string too long ({0} bytes)")]
    StringTooLong(u32),
    /// A length or count exceeds a protocol limit.
    #[error("length {0} exceeds the limit")]
    TooBig(u64),
    /// Unknown client flags.
    #[error("unknown client flags {0:#x}")]
    UnknownFlags(u32),
    /// A string is not UTF-8.
    #[error("string is not UTF-8")]
    NotUtf8,
    /// A field has a value the protocol forbids.
    #[error("invalid field: {0}")]
    Invalid(&'static str),
}

type Result<T> = std::result::Result<T, CodecError>;

/// A cursor over a byte slice with checked big-endian reads.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(CodecError::Truncated);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    /// A 32-bit length-prefixed string of at most [`MAX_STRING`] bytes.
    fn string(&mut self) -> Result<String> {
        let len = self.u32()?;
        if len > MAX_STRING {
            return Err(CodecError::StringTooLong(len));
        }
        let bytes = self.take(len as usize)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| CodecError::NotUtf8)
    }
    fn finish(&self) -> Result<()> {
        if self.0.is_empty() { Ok(()) } else { Err(CodecError::TrailingBytes) }
    }
}

fn utf8(bytes: &[u8]) -> Result<String> {
    if bytes.len() > MAX_STRING as usize {
        return Err(CodecError::StringTooLong(u32::try_from(bytes.len()).unwrap_or(u32::MAX)));
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| CodecError::NotUtf8)
}

// ---------------------------------------------------------------- handshake

/// Size of the server greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub const GREETING_LEN: usize = 18;

/// The newstyle server greeting.
pub fn encode_greeting(handshake_flags: u16) -> [u8; GREETING_LEN] {
    let mut b = [0u8; GREETING_LEN];
    b[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&handshake_flags.to_be_bytes());
    b
}

/// Parses the server greeting (client side); returns the handshake flags.
pub fn parse_greeting(b: &[u8; GREETING_LEN]) -> Result<u16> {
    let mut r = Reader(b);
    let magic = r.u64()?;
    if magic != NBDMAGIC {
        return Err(CodecError::BadMagic { expected: NBDMAGIC, found: magic });
    }
    let magic = r.u64()?;
    if magic != IHAVEOPT {
        return Err(CodecError::BadMagic { expected: IHAVEOPT, found: magic });
    }
    r.u16()
}

/// Parses the client flags against the handshake flags the server sent: unknown flags,
/// or `NO_ZEROES` the server did not offer, are an error (the server must disconnect).
pub fn parse_client_flags(b: [u8; 4], handshake_flags: u16) -> Result<u32> {
    let flags = u32::from_be_bytes(b);
    let mut allowed = FLAG_C_FIXED_NEWSTYLE;
    if handshake_flags & FLAG_NO_ZEROES != 0 {
        allowed |= FLAG_C_NO_ZEROES;
    }
    if flags & !allowed != 0 {
        return Err(CodecError::UnknownFlags(flags));
    }
    Ok(flags)
}

/// Size of an option request header.
pub const OPTION_HEADER_LEN: usize = 16;

/// The header of an option request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option (`OPT_*`).
    pub option: u32,
    /// The length of the payload that follows.
    pub length: u32,
}

impl OptionHeader {
    /// Parses an option header (checks `IHAVEOPT`).
    pub fn parse(b: &[u8; OPTION_HEADER_LEN]) -> Result<Self> {
        let mut r = Reader(b);
        let magic = r.u64()?;
        if magic != IHAVEOPT {
            return Err(CodecError::BadMagic { expected: IHAVEOPT, found: magic });
        }
        Ok(OptionHeader { option: r.u32()?, length: r.u32()? })
    }

    /// Encodes an option request with its payload (client side).
    pub fn encode(option: u32, payload: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&len32(payload.len()).to_be_bytes());
        out.extend_from_slice(payload);
    }
}

fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The payload of `OPT_INFO` / `OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name.
    pub export: String,
    /// Requested information types (`INFO_*`).
    pub infos: Vec<u16>,
}

impl InfoRequest {
    /// Parses the payload.
    pub fn parse(payload: &[u8]) -> Result<Self> {
        let mut r = Reader(payload);
        let export = r.string()?;
        let n = r.u16()?;
        // Each entry is 2 bytes; the count is checked against the payload before allocating.
        if r.0.len() != usize::from(n) * 2 {
            return Err(if r.0.len() < usize::from(n) * 2 {
                CodecError::Truncated
            } else {
                CodecError::TrailingBytes
            });
        }
        let mut infos = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            infos.push(r.u16()?);
        }
        r.finish()?;
        Ok(InfoRequest { export, infos })
    }

    /// Encodes the payload (client side).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_string(&mut out, &self.export);
        out.extend_from_slice(&(self.infos.len().min(usize::from(u16::MAX)) as u16).to_be_bytes());
        for i in self.infos.iter().take(usize::from(u16::MAX)) {
            out.extend_from_slice(&i.to_be_bytes());
        }
        out
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&len32(s.len()).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The payload of `OPT_LIST_META_CONTEXT` / `OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// Export name.
    pub export: String,
    /// Queries.
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    /// Parses the payload.
    pub fn parse(payload: &[u8]) -> Result<Self> {
        let mut r = Reader(payload);
        let export = r.string()?;
        let n = r.u32()?;
        // Every query takes at least 4 bytes, so the count is bounded by the payload.
        if u64::from(n) * 4 > r.0.len() as u64 {
            return Err(CodecError::Truncated);
        }
        let mut queries = Vec::with_capacity(n as usize);
        for _ in 0..n {
            queries.push(r.string()?);
        }
        r.finish()?;
        Ok(MetaContextRequest { export, queries })
    }

    /// Encodes the payload (client side).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_string(&mut out, &self.export);
        out.extend_from_slice(&len32(self.queries.len()).to_be_bytes());
        for q in &self.queries {
            put_string(&mut out, q);
        }
        out
    }
}

/// Parses the payload of `OPT_EXPORT_NAME` (the whole payload is the name).
pub fn parse_export_name(payload: &[u8]) -> Result<String> {
    utf8(payload)
}

// ------------------------------------------------------------ option replies

/// Size of an option reply header.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;

/// The header of an option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option this answers.
    pub option: u32,
    /// Reply type (`REP_*`).
    pub reply_type: u32,
    /// Payload length.
    pub length: u32,
}

impl OptionReplyHeader {
    /// Parses an option reply header (client side).
    pub fn parse(b: &[u8; OPTION_REPLY_HEADER_LEN]) -> Result<Self> {
        let mut r = Reader(b);
        let magic = r.u64()?;
        if magic != OPT_REPLY_MAGIC {
            return Err(CodecError::BadMagic { expected: OPT_REPLY_MAGIC, found: magic });
        }
        Ok(OptionReplyHeader { option: r.u32()?, reply_type: r.u32()?, length: r.u32()? })
    }
}

/// Appends an option reply with `payload`.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, payload: &[u8]) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&len32(payload.len()).to_be_bytes());
    out.extend_from_slice(payload);
}

/// Appends `REP_ACK`.
pub fn encode_rep_ack(out: &mut Vec<u8>, option: u32) {
    encode_option_reply(out, option, REP_ACK, &[]);
}

/// Appends an error reply (`REP_ERR_*`) with a human-readable message (truncated to
/// [`MAX_STRING`] bytes).
pub fn encode_rep_error(out: &mut Vec<u8>, option: u32, error: u32, message: &str) {
    encode_option_reply(out, option, error, truncate(message));
}

fn truncate(s: &str) -> &[u8] {
    let b = s.as_bytes();
    &b[..b.len().min(MAX_STRING as usize)]
}

/// Appends `REP_SERVER` for `OPT_LIST`: the name, then the description.
pub fn encode_rep_server(out: &mut Vec<u8>, name: &str, description: &str) {
    let mut p = Vec::with_capacity(4 + name.len() + description.len());
    put_string(&mut p, name);
    p.extend_from_slice(truncate(description));
    encode_option_reply(out, OPT_LIST, REP_SERVER, &p);
}

/// Parses a `REP_SERVER` payload: (name, description).
pub fn parse_rep_server(payload: &[u8]) -> Result<(String, String)> {
    let mut r = Reader(payload);
    let name = r.string()?;
    let desc = utf8(r.0)?;
    Ok((name, desc))
}

/// Appends `REP_INFO` / `INFO_EXPORT`.
pub fn encode_info_export(out: &mut Vec<u8>, option: u32, size: u64, flags: u16) {
    let mut p = [0u8; 12];
    p[..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    p[2..10].copy_from_slice(&size.to_be_bytes());
    p[10..].copy_from_slice(&flags.to_be_bytes());
    encode_option_reply(out, option, REP_INFO, &p);
}

/// Appends `REP_INFO` / `INFO_NAME`.
pub fn encode_info_name(out: &mut Vec<u8>, option: u32, name: &str) {
    let mut p = INFO_NAME.to_be_bytes().to_vec();
    p.extend_from_slice(truncate(name));
    encode_option_reply(out, option, REP_INFO, &p);
}

/// Appends `REP_INFO` / `INFO_DESCRIPTION`.
pub fn encode_info_description(out: &mut Vec<u8>, option: u32, description: &str) {
    let mut p = INFO_DESCRIPTION.to_be_bytes().to_vec();
    p.extend_from_slice(truncate(description));
    encode_option_reply(out, option, REP_INFO, &p);
}

/// Block size constraints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    /// Minimum block size.
    pub minimum: u32,
    /// Preferred block size.
    pub preferred: u32,
    /// Maximum payload size.
    pub maximum: u32,
}

/// Appends `REP_INFO` / `INFO_BLOCK_SIZE`.
pub fn encode_info_block_size(out: &mut Vec<u8>, option: u32, bs: BlockSize) {
    let mut p = [0u8; 14];
    p[..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    p[2..6].copy_from_slice(&bs.minimum.to_be_bytes());
    p[6..10].copy_from_slice(&bs.preferred.to_be_bytes());
    p[10..].copy_from_slice(&bs.maximum.to_be_bytes());
    encode_option_reply(out, option, REP_INFO, &p);
}

/// A parsed `REP_INFO` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Info {
    /// `INFO_EXPORT`.
    Export {
        /// Export size.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// `INFO_NAME`.
    Name(String),
    /// `INFO_DESCRIPTION`.
    Description(String),
    /// `INFO_BLOCK_SIZE`.
    BlockSize(BlockSize),
    /// Another type, ignored.
    Unknown(u16),
}

impl Info {
    /// Parses a `REP_INFO` payload.
    pub fn parse(payload: &[u8]) -> Result<Self> {
        let mut r = Reader(payload);
        let info = match r.u16()? {
            INFO_EXPORT => Info::Export { size: r.u64()?, flags: r.u16()? },
            INFO_NAME => return Ok(Info::Name(utf8(r.0)?)),
            INFO_DESCRIPTION => return Ok(Info::Description(utf8(r.0)?)),
            INFO_BLOCK_SIZE => Info::BlockSize(BlockSize {
                minimum: r.u32()?,
                preferred: r.u32()?,
                maximum: r.u32()?,
            }),
            other => return Ok(Info::Unknown(other)),
        };
        r.finish()?;
        Ok(info)
    }
}

/// Appends `REP_META_CONTEXT`.
pub fn encode_rep_meta_context(out: &mut Vec<u8>, option: u32, id: u32, name: &str) {
    let mut p = id.to_be_bytes().to_vec();
    p.extend_from_slice(truncate(name));
    encode_option_reply(out, option, REP_META_CONTEXT, &p);
}

/// Parses a `REP_META_CONTEXT` payload: (id, name).
pub fn parse_rep_meta_context(payload: &[u8]) -> Result<(u32, String)> {
    let mut r = Reader(payload);
    let id = r.u32()?;
    Ok((id, utf8(r.0)?))
}

/// The reply to `OPT_EXPORT_NAME`: size, transmission flags, and 124 zero bytes unless
/// the client set `FLAG_C_NO_ZEROES`.
pub fn encode_export_name_reply(out: &mut Vec<u8>, size: u64, flags: u16, no_zeroes: bool) {
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; EXPORT_NAME_ZEROES]);
    }
}

// ------------------------------------------------------------------ requests

/// Size of a compact request header.
pub const REQUEST_LEN: usize = 28;
/// Size of an extended request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command (`CMD_*`).
    pub command: u16,
    /// Cookie echoed in the reply.
    pub cookie: u64,
    /// Offset.
    pub offset: u64,
    /// Length (effect or payload length; see the protocol).
    pub length: u64,
}

impl Request {
    /// Parses a header of [`REQUEST_LEN`] bytes (compact) or [`EXTENDED_REQUEST_LEN`]
    /// bytes (`extended`).
    pub fn parse(b: &[u8], extended: bool) -> Result<Self> {
        let want = if extended { EXTENDED_REQUEST_LEN } else { REQUEST_LEN };
        if b.len() < want {
            return Err(CodecError::Truncated);
        }
        if b.len() > want {
            return Err(CodecError::TrailingBytes);
        }
        let mut r = Reader(b);
        let magic = r.u32()?;
        let expected = if extended { EXTENDED_REQUEST_MAGIC } else { REQUEST_MAGIC };
        if magic != expected {
            return Err(CodecError::BadMagic { expected: expected.into(), found: magic.into() });
        }
        let flags = r.u16()?;
        let command = r.u16()?;
        let cookie = r.u64()?;
        let offset = r.u64()?;
        let length = if extended { r.u64()? } else { r.u32()?.into() };
        Ok(Request { flags, command, cookie, offset, length })
    }

    /// Appends the header, compact (length must fit 32 bits, else
    /// [`CodecError::TooBig`]) or extended.
    pub fn encode(&self, out: &mut Vec<u8>, extended: bool) -> Result<()> {
        let magic = if extended { EXTENDED_REQUEST_MAGIC } else { REQUEST_MAGIC };
        out.extend_from_slice(&magic.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.command.to_be_bytes());
        out.extend_from_slice(&self.cookie.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        if extended {
            out.extend_from_slice(&self.length.to_be_bytes());
        } else {
            let l = u32::try_from(self.length).map_err(|_| CodecError::TooBig(self.length))?;
            out.extend_from_slice(&l.to_be_bytes());
        }
        Ok(())
    }

    /// Whether a payload follows the header, and how long it is: `WRITE` always, and
    /// in extended mode any command with `CMD_FLAG_PAYLOAD_LEN`. Lengths above
    /// [`MAX_PAYLOAD`] are [`CodecError::TooBig`] (the server must disconnect).
    pub fn payload_len(&self, extended: bool) -> Result<usize> {
        // QEMU (10.0) sends extended WRITE requests without `CMD_FLAG_PAYLOAD_LEN`, so a
        // WRITE always carries its payload.
        let has = self.command == CMD_WRITE || (extended && self.flags & CMD_FLAG_PAYLOAD_LEN != 0);
        if !has {
            return Ok(0);
        }
        if self.length > u64::from(MAX_PAYLOAD) {
            return Err(CodecError::TooBig(self.length));
        }
        Ok(self.length as usize)
    }
}

/// Parses the payload form of an extended `CMD_BLOCK_STATUS`: (effect length, ids).
pub fn parse_block_status_payload(payload: &[u8]) -> Result<(u64, Vec<u32>)> {
    let mut r = Reader(payload);
    let len = r.u64()?;
    if !r.0.len().is_multiple_of(4) {
        return Err(CodecError::Invalid("block status payload not 8 + 4n bytes"));
    }
    let mut ids = Vec::with_capacity(r.0.len() / 4);
    while !r.0.is_empty() {
        ids.push(r.u32()?);
    }
    Ok((len, ids))
}

// -------------------------------------------------------------------- replies

/// Size of a simple reply.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const STRUCTURED_REPLY_LEN: usize = 20;
/// Size of an extended reply chunk header.
pub const EXTENDED_REPLY_LEN: usize = 32;

/// Appends a simple reply header (data, if any, follows).
pub fn encode_simple_reply(out: &mut Vec<u8>, error: u32, cookie: u64) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// Which reply chunk header to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkStyle {
    /// Structured reply (`STRUCTURED_REPLY_MAGIC`, 20 bytes).
    Structured,
    /// Extended reply (`EXTENDED_REPLY_MAGIC`, 32 bytes) echoing the request offset.
    Extended {
        /// The offset of the request.
        offset: u64,
    },
}

/// Appends a chunk header for a payload of `len` bytes. Structured chunks carry a 32-bit
/// length; a larger `len` is [`CodecError::TooBig`].
pub fn encode_chunk_header(
    out: &mut Vec<u8>,
    style: ChunkStyle,
    flags: u16,
    chunk_type: u16,
    cookie: u64,
    len: u64,
) -> Result<()> {
    match style {
        ChunkStyle::Structured => {
            let l = u32::try_from(len).map_err(|_| CodecError::TooBig(len))?;
            out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
            out.extend_from_slice(&chunk_type.to_be_bytes());
            out.extend_from_slice(&cookie.to_be_bytes());
            out.extend_from_slice(&l.to_be_bytes());
        }
        ChunkStyle::Extended { offset } => {
            out.extend_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
            out.extend_from_slice(&chunk_type.to_be_bytes());
            out.extend_from_slice(&cookie.to_be_bytes());
            out.extend_from_slice(&offset.to_be_bytes());
            out.extend_from_slice(&len.to_be_bytes());
        }
    }
    Ok(())
}

fn chunk(
    out: &mut Vec<u8>,
    style: ChunkStyle,
    done: bool,
    ty: u16,
    cookie: u64,
    payload: &[u8],
) -> Result<()> {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    encode_chunk_header(out, style, flags, ty, cookie, payload.len() as u64)?;
    out.extend_from_slice(payload);
    Ok(())
}

/// Appends `REPLY_TYPE_NONE` (always with `DONE`).
pub fn encode_chunk_none(out: &mut Vec<u8>, style: ChunkStyle, cookie: u64) {
    // A zero length always fits.
    let _ = encode_chunk_header(out, style, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
}

/// Appends `REPLY_TYPE_OFFSET_DATA` with `data` read at `offset`.
pub fn encode_chunk_data(
    out: &mut Vec<u8>,
    style: ChunkStyle,
    done: bool,
    cookie: u64,
    offset: u64,
    data: &[u8],
) -> Result<()> {
    if data.is_empty() {
        return Err(CodecError::Invalid("empty data chunk"));
    }
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    encode_chunk_header(out, style, flags, REPLY_TYPE_OFFSET_DATA, cookie, 8 + data.len() as u64)?;
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(data);
    Ok(())
}

/// Appends `REPLY_TYPE_OFFSET_HOLE`.
pub fn encode_chunk_hole(
    out: &mut Vec<u8>,
    style: ChunkStyle,
    done: bool,
    cookie: u64,
    offset: u64,
    len: u32,
) -> Result<()> {
    if len == 0 {
        return Err(CodecError::Invalid("empty hole chunk"));
    }
    let mut p = [0u8; 12];
    p[..8].copy_from_slice(&offset.to_be_bytes());
    p[8..].copy_from_slice(&len.to_be_bytes());
    chunk(out, style, done, REPLY_TYPE_OFFSET_HOLE, cookie, &p)
}

/// One block status descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (nonzero).
    pub length: u64,
    /// Status flags, defined by the metadata context.
    pub flags: u64,
}

/// Appends `REPLY_TYPE_BLOCK_STATUS` (32-bit descriptors). Lengths and flags must fit
/// 32 bits and `extents` must not be empty.
pub fn encode_chunk_block_status(
    out: &mut Vec<u8>,
    done: bool,
    cookie: u64,
    context_id: u32,
    extents: &[Extent],
) -> Result<()> {
    if extents.is_empty() {
        return Err(CodecError::Invalid("no extents"));
    }
    let mut p = Vec::with_capacity(4 + 8 * extents.len());
    p.extend_from_slice(&context_id.to_be_bytes());
    for e in extents {
        let l = u32::try_from(e.length).map_err(|_| CodecError::TooBig(e.length))?;
        let f = u32::try_from(e.flags).map_err(|_| CodecError::TooBig(e.flags))?;
        if l == 0 {
            return Err(CodecError::Invalid("zero-length extent"));
        }
        p.extend_from_slice(&l.to_be_bytes());
        p.extend_from_slice(&f.to_be_bytes());
    }
    chunk(out, ChunkStyle::Structured, done, REPLY_TYPE_BLOCK_STATUS, cookie, &p)
}

/// Appends `REPLY_TYPE_BLOCK_STATUS_EXT` (64-bit descriptors, extended header).
pub fn encode_chunk_block_status_ext(
    out: &mut Vec<u8>,
    request_offset: u64,
    done: bool,
    cookie: u64,
    context_id: u32,
    extents: &[Extent],
) -> Result<()> {
    if extents.is_empty() {
        return Err(CodecError::Invalid("no extents"));
    }
    let count = u32::try_from(extents.len()).map_err(|_| CodecError::TooBig(u64::MAX))?;
    let mut p = Vec::with_capacity(8 + 16 * extents.len());
    p.extend_from_slice(&context_id.to_be_bytes());
    p.extend_from_slice(&count.to_be_bytes());
    for e in extents {
        if e.length == 0 {
            return Err(CodecError::Invalid("zero-length extent"));
        }
        p.extend_from_slice(&e.length.to_be_bytes());
        p.extend_from_slice(&e.flags.to_be_bytes());
    }
    let style = ChunkStyle::Extended { offset: request_offset };
    chunk(out, style, done, REPLY_TYPE_BLOCK_STATUS_EXT, cookie, &p)
}

/// Appends `REPLY_TYPE_ERROR` (always final here) with a message.
pub fn encode_chunk_error(
    out: &mut Vec<u8>,
    style: ChunkStyle,
    cookie: u64,
    error: u32,
    message: &str,
) -> Result<()> {
    let m = truncate(message);
    let mut p = Vec::with_capacity(6 + m.len());
    p.extend_from_slice(&error.to_be_bytes());
    p.extend_from_slice(&(m.len() as u16).to_be_bytes());
    p.extend_from_slice(m);
    chunk(out, style, true, REPLY_TYPE_ERROR, cookie, &p)
}

/// Appends `REPLY_TYPE_ERROR_OFFSET`.
pub fn encode_chunk_error_offset(
    out: &mut Vec<u8>,
    style: ChunkStyle,
    done: bool,
    cookie: u64,
    error: u32,
    message: &str,
    offset: u64,
) -> Result<()> {
    let m = truncate(message);
    let mut p = Vec::with_capacity(14 + m.len());
    p.extend_from_slice(&error.to_be_bytes());
    p.extend_from_slice(&(m.len() as u16).to_be_bytes());
    p.extend_from_slice(m);
    p.extend_from_slice(&offset.to_be_bytes());
    chunk(out, style, done, REPLY_TYPE_ERROR_OFFSET, cookie, &p)
}

/// A reply header as the client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply.
    Simple {
        /// Error (0 for success).
        error: u32,
        /// Cookie.
        cookie: u64,
    },
    /// A structured or extended chunk.
    Chunk {
        /// Reply flags.
        flags: u16,
        /// Chunk type.
        chunk_type: u16,
        /// Cookie.
        cookie: u64,
        /// Payload length.
        length: u64,
    },
}

impl ReplyHeader {
    /// The header length implied by the first four bytes (the magic).
    pub fn len_for_magic(magic: [u8; 4]) -> Result<usize> {
        match u32::from_be_bytes(magic) {
            SIMPLE_REPLY_MAGIC => Ok(SIMPLE_REPLY_LEN),
            STRUCTURED_REPLY_MAGIC => Ok(STRUCTURED_REPLY_LEN),
            EXTENDED_REPLY_MAGIC => Ok(EXTENDED_REPLY_LEN),
            found => Err(CodecError::BadMagic {
                expected: STRUCTURED_REPLY_MAGIC.into(),
                found: found.into(),
            }),
        }
    }

    /// Parses a whole reply header (magic included).
    pub fn parse(b: &[u8]) -> Result<Self> {
        let mut r = Reader(b);
        let magic: [u8; 4] = r.array()?;
        let want = Self::len_for_magic(magic)?;
        if b.len() != want {
            return Err(if b.len() < want {
                CodecError::Truncated
            } else {
                CodecError::TrailingBytes
            });
        }
        Ok(match u32::from_be_bytes(magic) {
            SIMPLE_REPLY_MAGIC => ReplyHeader::Simple { error: r.u32()?, cookie: r.u64()? },
            STRUCTURED_REPLY_MAGIC => ReplyHeader::Chunk {
                flags: r.u16()?,
                chunk_type: r.u16()?,
                cookie: r.u64()?,
                length: r.u32()?.into(),
            },
            _ => {
                let flags = r.u16()?;
                let chunk_type = r.u16()?;
                let cookie = r.u64()?;
                let _offset = r.u64()?;
                ReplyHeader::Chunk { flags, chunk_type, cookie, length: r.u64()? }
            }
        })
    }
}

/// Parses a block status chunk payload (32-bit or `ext` 64-bit): (context id, extents).
pub fn parse_block_status(payload: &[u8], ext: bool) -> Result<(u32, Vec<Extent>)> {
    let mut r = Reader(payload);
    let id = r.u32()?;
    let size = if ext {
        let count = r.u32()?;
        if u64::from(count) * 16 != r.0.len() as u64 {
            return Err(CodecError::Invalid("descriptor count does not match length"));
        }
        16
    } else {
        8
    };
    if r.0.is_empty() || !r.0.len().is_multiple_of(size) {
        return Err(CodecError::Invalid("bad block status length"));
    }
    let mut v = Vec::with_capacity(r.0.len() / size);
    while !r.0.is_empty() {
        let e = if ext {
            Extent { length: r.u64()?, flags: r.u64()? }
        } else {
            Extent { length: r.u32()?.into(), flags: r.u32()?.into() }
        };
        v.push(e);
    }
    Ok((id, v))
}

/// Parses an error chunk payload: (error, message, offset if `ERROR_OFFSET`).
pub fn parse_error_chunk(payload: &[u8], chunk_type: u16) -> Result<(u32, String, Option<u64>)> {
    let mut r = Reader(payload);
    let error = r.u32()?;
    let mlen = r.u16()?;
    let msg = String::from_utf8_lossy(r.take(usize::from(mlen))?).into_owned();
    let off = if chunk_type == REPLY_TYPE_ERROR_OFFSET { Some(r.u64()?) } else { None };
    Ok((error, msg, off))
}

#[cfg(test)]
mod tests;
