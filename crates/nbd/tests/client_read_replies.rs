//! The client against a hand-written misbehaving server (over an in-memory duplex):
//! read replies that do not return every byte of the request exactly once are refused,
//! with `ClientError::BadRead`, in `read` and in the pipelined `read_many`; correct
//! split replies (data and hole chunks, in any order) are still accepted.

use nbd::client::{Client, ClientError, ClientOptions};
use nbd::codec::{self, ChunkStyle, OptionHeader, Request};
use nbd::proto::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

const SIZE: u64 = 1 << 20;
const K: u64 = 1024;

/// What the fake server answers to one read request: the bytes of its reply.
type Respond = Box<dyn FnMut(&Request) -> Vec<u8> + Send>;

/// Serves one client on `s`: the handshake (structured replies if `structured`), then
/// every read answered by `respond`; ends at `CMD_DISC` or EOF.
async fn fake_server(mut s: DuplexStream, structured: bool, mut respond: Respond) {
    s.write_all(&codec::encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)).await.unwrap();
    let mut flags = [0u8; 4];
    s.read_exact(&mut flags).await.unwrap();
    loop {
        let mut h = [0u8; codec::OPTION_HEADER_LEN];
        s.read_exact(&mut h).await.unwrap();
        let h = OptionHeader::parse(&h).unwrap();
        let mut payload = vec![0u8; h.length as usize];
        s.read_exact(&mut payload).await.unwrap();
        let mut out = Vec::new();
        match h.option {
            OPT_STRUCTURED_REPLY if structured => codec::encode_rep_ack(&mut out, h.option),
            OPT_GO => {
                codec::encode_info_export(&mut out, OPT_GO, SIZE, FLAG_HAS_FLAGS | FLAG_READ_ONLY);
                codec::encode_rep_ack(&mut out, OPT_GO);
                s.write_all(&out).await.unwrap();
                break;
            }
            o => codec::encode_rep_error(&mut out, o, REP_ERR_UNSUP, "no"),
        }
        s.write_all(&out).await.unwrap();
    }
    loop {
        let mut h = [0u8; codec::REQUEST_LEN];
        if s.read_exact(&mut h).await.is_err() {
            return;
        }
        let req = Request::parse(&h, false).unwrap();
        if req.command == CMD_DISC {
            return;
        }
        assert_eq!(req.command, CMD_READ);
        if s.write_all(&respond(&req)).await.is_err() {
            return;
        }
    }
}

/// A client connected to a fake server answering with `respond`.
async fn client(structured: bool, respond: Respond) -> Client<DuplexStream> {
    let (a, b) = tokio::io::duplex(1 << 20);
    tokio::spawn(fake_server(b, structured, respond));
    let c = Client::handshake(a, &ClientOptions::default()).await.unwrap();
    assert_eq!(c.structured(), structured);
    c
}

/// The content the fake export has at `offset`.
fn byte_at(offset: u64) -> u8 {
    (offset % 251) as u8 + 1
}

fn content(offset: u64, len: u64) -> Vec<u8> {
    (offset..offset + len).map(byte_at).collect()
}

/// One chunk of a reply, relative to the request's offset.
#[derive(Clone, Copy, Debug)]
enum Piece {
    /// Data at `start` bytes into the request, `len` bytes.
    Data(i64, u64),
    /// A hole.
    Hole(i64, u32),
    /// A data chunk header claiming `len` bytes of data that never come.
    HugeData(u64),
    /// `REPLY_TYPE_NONE`.
    None,
}

/// A structured reply made of `pieces`, the last one flagged DONE.
fn reply(req: &Request, pieces: &[Piece]) -> Vec<u8> {
    let mut out = Vec::new();
    let st = ChunkStyle::Structured;
    for (i, piece) in pieces.iter().enumerate() {
        let done = i + 1 == pieces.len();
        let at = |start: i64| req.offset.wrapping_add_signed(start);
        match *piece {
            Piece::Data(start, len) => {
                let off = at(start);
                codec::encode_chunk_data(&mut out, st, done, req.cookie, off, &content(off, len))
                    .unwrap();
            }
            Piece::Hole(start, len) => {
                codec::encode_chunk_hole(&mut out, st, done, req.cookie, at(start), len).unwrap()
            }
            Piece::HugeData(len) => {
                let flags = if done { REPLY_FLAG_DONE } else { 0 };
                codec::encode_chunk_header(
                    &mut out,
                    st,
                    flags,
                    REPLY_TYPE_OFFSET_DATA,
                    req.cookie,
                    8 + len,
                )
                .unwrap();
                out.extend_from_slice(&req.offset.to_be_bytes());
            }
            Piece::None => codec::encode_chunk_none(&mut out, st, req.cookie),
        }
    }
    out
}

/// A fake server answering every read with `pieces`.
fn scripted(pieces: Vec<Piece>) -> Respond {
    Box::new(move |req| reply(req, &pieces))
}

/// Reads 64 KiB at 128 KiB through a server answering with `pieces`.
async fn read_with(pieces: Vec<Piece>) -> (Result<(), ClientError>, Vec<u8>) {
    let mut c = client(true, scripted(pieces)).await;
    // Not zeroes: holes must be written, not left as found.
    let mut buf = vec![0xeeu8; 64 * K as usize];
    let r = c.read(128 * K, &mut buf).await;
    (r, buf)
}

fn assert_bad_read(r: Result<(), ClientError>, needle: &str) {
    match r {
        Err(ClientError::BadRead { offset, length, problem }) => {
            assert_eq!((offset, length), (128 * K, 64 * K));
            assert!(problem.contains(needle), "{problem:?} should say {needle:?}");
        }
        other => panic!("expected a BadRead saying {needle:?}, got {other:?}"),
    }
}

/// The expected buffer for data over `[0, data)` of the request and zeroes after.
fn data_then_zeroes(data: u64) -> Vec<u8> {
    let mut want = content(128 * K, data);
    want.resize(64 * K as usize, 0);
    want
}

#[tokio::test]
async fn a_short_data_chunk_then_done_is_refused() {
    let (r, _) = read_with(vec![Piece::Data(0, 32 * K)]).await;
    assert_bad_read(r, "32768 of the 65536 bytes not returned");
    let (r, _) = read_with(vec![Piece::Data(0, 32 * K), Piece::None]).await;
    assert_bad_read(r, "32768 of the 65536 bytes not returned");
    // A gap in the middle, chunks out of order.
    let (r, _) =
        read_with(vec![Piece::Data(48 * K as i64, 16 * K), Piece::Hole(0, 16 * K as u32)]).await;
    assert_bad_read(r, "32768 of the 65536 bytes not returned");
    // Nothing at all.
    let (r, _) = read_with(vec![Piece::None]).await;
    assert_bad_read(r, "65536 of the 65536 bytes not returned");
}

#[tokio::test]
async fn chunks_outside_the_request_are_refused() {
    let (r, _) = read_with(vec![Piece::Data(64 * K as i64, 4 * K)]).await;
    assert_bad_read(r, "outside");
    let (r, _) = read_with(vec![Piece::Data(60 * K as i64, 8 * K)]).await;
    assert_bad_read(r, "outside");
    let (r, _) = read_with(vec![Piece::Data(-4096, 8 * K)]).await;
    assert_bad_read(r, "before the request");
    let (r, _) = read_with(vec![Piece::Hole(32 * K as i64, 64 * K as u32)]).await;
    assert_bad_read(r, "outside");
    let (r, _) = read_with(vec![Piece::Hole(-1, 2)]).await;
    assert_bad_read(r, "before the request");
    // A data chunk claiming more than the request is refused before anything is read
    // or allocated for it (the server sends only the header and the offset).
    let (r, _) = read_with(vec![Piece::HugeData(u64::from(u32::MAX) - 8)]).await;
    assert_bad_read(r, "longer than the request");
}

#[tokio::test]
async fn overlapping_chunks_are_refused() {
    // In order, overlapping the covered prefix.
    let (r, _) = read_with(vec![Piece::Data(0, 32 * K), Piece::Data(16 * K as i64, 48 * K)]).await;
    assert_bad_read(r, "overlaps");
    // The same chunk twice.
    let (r, _) =
        read_with(vec![Piece::Hole(0, 64 * K as u32), Piece::Hole(0, 64 * K as u32)]).await;
    assert_bad_read(r, "overlaps");
    // Out of order: a hole over part of a later data chunk.
    let (r, _) = read_with(vec![
        Piece::Data(32 * K as i64, 32 * K),
        Piece::Hole(0, 40 * K as u32),
        Piece::None,
    ])
    .await;
    assert_bad_read(r, "overlaps");
    // Out of order, one byte of overlap at the end of a later chunk.
    let (r, _) = read_with(vec![
        Piece::Data(8 * K as i64, 8 * K),
        Piece::Data(0, 4 * K),
        Piece::Data(16 * K as i64 - 1, 2),
    ])
    .await;
    assert_bad_read(r, "overlaps");
}

#[tokio::test]
async fn correct_split_replies_are_accepted() {
    let (r, buf) =
        read_with(vec![Piece::Data(0, 32 * K), Piece::Hole(32 * K as i64, 32 * K as u32)]).await;
    r.unwrap();
    assert_eq!(buf, data_then_zeroes(32 * K));
    // Out of order, with a NONE chunk last.
    let (r, buf) = read_with(vec![
        Piece::Hole(32 * K as i64, 32 * K as u32),
        Piece::Data(1, 32 * K - 1),
        Piece::Data(0, 1),
        Piece::None,
    ])
    .await;
    r.unwrap();
    assert_eq!(buf, data_then_zeroes(32 * K));
    // Many small chunks, backwards.
    let pieces: Vec<Piece> = (0..64).rev().map(|i| Piece::Data(i * K as i64, K)).collect();
    let (r, buf) = read_with(pieces).await;
    r.unwrap();
    assert_eq!(buf, content(128 * K, 64 * K));
}

#[tokio::test]
async fn simple_replies_to_reads() {
    // Without structured replies: the data follows the header.
    let respond: Respond = Box::new(|req| {
        let mut out = Vec::new();
        codec::encode_simple_reply(&mut out, 0, req.cookie);
        out.extend_from_slice(&content(req.offset, req.length));
        out
    });
    let mut c = client(false, respond).await;
    let mut buf = vec![0u8; 8 * K as usize];
    c.read(4 * K, &mut buf).await.unwrap();
    assert_eq!(buf, content(4 * K, 8 * K));
    // With structured replies negotiated, a simple reply to a read is a violation,
    // whether it carries data or an error.
    for error in [0, EIO] {
        let respond: Respond = Box::new(move |req| {
            let mut out = Vec::new();
            codec::encode_simple_reply(&mut out, error, req.cookie);
            if error == 0 {
                out.extend_from_slice(&content(req.offset, req.length));
            }
            out
        });
        let mut c = client(true, respond).await;
        let mut buf = vec![0u8; 64 * K as usize];
        assert_bad_read(c.read(128 * K, &mut buf).await, "simple reply");
    }
}

/// `read_many` over 8 ranges of 64 KiB from 128 KiB on, 4 in flight; the server answers
/// the read at 320 KiB (the fourth) with `bad`, and the others correctly (data then a
/// hole).
async fn read_many_with(bad: Option<Vec<Piece>>) -> (Result<(), ClientError>, Vec<(u64, Vec<u8>)>) {
    let good = vec![Piece::Data(0, 32 * K), Piece::Hole(32 * K as i64, 32 * K as u32)];
    let respond: Respond = Box::new(move |req| match &bad {
        Some(bad) if req.offset == 320 * K => reply(req, bad),
        _ => reply(req, &good),
    });
    let mut c = client(true, respond).await;
    let mut done = Vec::new();
    let ranges = (0..8).map(|i| (128 * K + i * 64 * K, 64 * K as u32));
    let r = c
        .read_many(ranges, 4, |offset, data| {
            done.push((offset, data));
            async { Ok(()) }
        })
        .await;
    (r, done)
}

#[tokio::test]
async fn read_many_checks_every_reply() {
    let (r, done) = read_many_with(None).await;
    r.unwrap();
    assert_eq!(done.len(), 8);
    for (offset, data) in &done {
        let mut want = content(*offset, 32 * K);
        want.resize(64 * K as usize, 0);
        assert_eq!(data, &want, "read at {offset}");
    }
    let cases: Vec<(Vec<Piece>, &str)> = vec![
        (vec![Piece::Data(0, 32 * K)], "32768 of the 65536 bytes not returned"),
        (vec![Piece::Hole(0, 16 * K as u32), Piece::None], "49152 of the 65536 bytes not returned"),
        (vec![Piece::Data(64 * K as i64, 4 * K)], "outside"),
        (vec![Piece::Data(-1, 4 * K)], "before the request"),
        (vec![Piece::Data(0, 32 * K), Piece::Hole(31 * K as i64, 33 * K as u32)], "overlaps"),
        (vec![Piece::HugeData(64 * K + 1)], "longer than the request"),
    ];
    for (bad, needle) in cases {
        let (r, done) = read_many_with(Some(bad.clone())).await;
        match r {
            Err(ClientError::BadRead { offset, length, problem }) => {
                assert_eq!((offset, length), (320 * K, 64 * K), "{bad:?}");
                assert!(problem.contains(needle), "{bad:?}: {problem:?} should say {needle:?}");
            }
            other => panic!("{bad:?}: expected a BadRead, got {other:?}"),
        }
        // The bad read's buffer was never handed out.
        assert!(done.iter().all(|(o, _)| *o != 320 * K), "{bad:?}");
    }
}
