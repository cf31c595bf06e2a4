//! Server behaviour through the crate's own client and through raw bytes, including
//! garbage at every stage of the protocol.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{Fixture, SIZE};
use nbd::Extent;
use nbd::client::{self, Client, ClientError, ClientOptions};
use nbd::codec::{self, InfoRequest, MetaContextRequest, OptionHeader, Request};
use nbd::proto::*;

fn opts(export: &str, contexts: &[&str], extended: bool) -> ClientOptions {
    ClientOptions {
        export: export.into(),
        meta_contexts: contexts.iter().map(|s| s.to_string()).collect(),
        extended_headers: extended,
    }
}

fn errno<T: std::fmt::Debug>(r: Result<T, ClientError>) -> u32 {
    match r {
        Err(ClientError::Command { errno, .. }) => errno,
        other => panic!("expected a command error, got {other:?}"),
    }
}

#[test]
fn socket_is_private() {
    let f = Fixture::start();
    let mode = std::fs::metadata(&f.sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn client_commands_compact_and_extended() {
    let f = Fixture::start();
    for extended in [false, true] {
        f.disk.clear_dirty();
        f.rt.block_on(async {
            let mut c = Client::connect_unix(
                &f.sock,
                &opts("disk", &["base:allocation", "qemu:dirty-bitmap:bm", "nope:x"], extended),
            )
            .await
            .unwrap();
            assert_eq!(c.extended(), extended);
            assert_eq!(c.size(), SIZE as u64);
            let want = FLAG_HAS_FLAGS
                | FLAG_SEND_FLUSH
                | FLAG_SEND_FUA
                | FLAG_SEND_TRIM
                | FLAG_SEND_WRITE_ZEROES
                | FLAG_SEND_FAST_ZERO
                | FLAG_SEND_CACHE
                | FLAG_CAN_MULTI_CONN
                | FLAG_SEND_DF
                | if extended { FLAG_BLOCK_STATUS_PAYLOAD } else { 0 };
            assert_eq!(c.flags(), want);
            assert_eq!(
                c.meta_contexts(),
                [(0, "base:allocation".into()), (1, "qemu:dirty-bitmap:bm".into())]
            );
            c.write(70000, &[7u8; 10000], true).await.unwrap();
            let mut buf = vec![1u8; 20000];
            c.read(65536, &mut buf).await.unwrap();
            assert!(
                buf[..4464].iter().all(|&b| b == 0) && buf[4464..14464].iter().all(|&b| b == 7)
            );
            assert!(buf[14464..].iter().all(|&b| b == 0));
            let bs = c.block_status(0, 4 * 65536, false).await.unwrap();
            let holes = u64::from(STATE_HOLE | STATE_ZERO);
            assert_eq!(
                bs,
                [
                    (
                        0,
                        vec![
                            Extent { length: 65536, flags: holes },
                            Extent { length: 65536, flags: 0 },
                            Extent { length: 131072, flags: holes }
                        ]
                    ),
                    (
                        1,
                        vec![
                            Extent { length: 65536, flags: 0 },
                            Extent { length: 65536, flags: 1 },
                            Extent { length: 131072, flags: 0 }
                        ]
                    ),
                ]
            );
            let one = c.block_status(65536 + 100, 1 << 20, true).await.unwrap();
            assert_eq!(
                one,
                [
                    (0, vec![Extent { length: 65436, flags: 0 }]),
                    (1, vec![Extent { length: 65436, flags: 1 }])
                ]
            );
            c.write_zeroes(65536, 65536, CMD_FLAG_FAST_ZERO).await.unwrap();
            c.trim(0, 65536).await.unwrap();
            c.flush().await.unwrap();
            c.command(CMD_CACHE, 0, 0, 4096).await.unwrap();
            // Errors leave the connection usable.
            assert_eq!(errno(c.read(SIZE as u64 - 1, &mut [0; 2]).await), EINVAL);
            assert_eq!(errno(c.write(SIZE as u64, &[1], false).await), ENOSPC);
            assert_eq!(errno(c.command(77, 0, 0, 0).await), EINVAL);
            assert_eq!(errno(c.command(CMD_FLUSH, 1 << 9, 0, 0).await), EINVAL);
            assert_eq!(errno(c.block_status(0, 0, false).await), EINVAL);
            let mut small = [9u8; 3];
            c.read(70000, &mut small).await.unwrap();
            assert_eq!(small, [0; 3]);
            c.disconnect().await.unwrap();

            // Read-only export, and block status without contexts.
            let mut ro = Client::connect_unix(&f.sock, &opts("ro", &[], extended)).await.unwrap();
            assert_ne!(ro.flags() & FLAG_READ_ONLY, 0);
            assert_eq!(ro.flags() & (FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES), 0);
            assert_eq!(errno(ro.write(0, &[1], false).await), EPERM);
            assert_eq!(errno(ro.trim(0, 1).await), EPERM);
            assert_eq!(errno(ro.block_status(0, 1, false).await), EINVAL);
            ro.read(0, &mut [0; 512]).await.unwrap();
            ro.disconnect().await.unwrap();
        });
    }
}

#[test]
fn list_exports_and_unknown_export() {
    let f = Fixture::start();
    f.rt.block_on(async {
        let l = client::list_exports(&f.sock).await.unwrap();
        assert_eq!(l, [("disk".to_string(), "test disk".to_string()), ("ro".into(), "".into())]);
        match Client::connect_unix(&f.sock, &opts("nope", &[], true)).await {
            Err(ClientError::Option { error, .. }) => assert_eq!(error, REP_ERR_UNKNOWN),
            other => panic!("{other:?}"),
        }
        // The default export is the first one inserted.
        let c = Client::connect_unix(&f.sock, &opts("", &[], false)).await.unwrap();
        assert_eq!(c.size(), SIZE as u64);
    });
}

// ------------------------------------------------------------------ raw helpers

struct Raw(UnixStream);

impl Raw {
    fn connect(f: &Fixture) -> Raw {
        let s = UnixStream::connect(&f.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = Raw(s);
        let mut g = [0u8; 18];
        r.0.read_exact(&mut g).unwrap();
        assert_eq!(codec::parse_greeting(&g).unwrap(), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        r
    }
    fn start(f: &Fixture) -> Raw {
        let mut r = Raw::connect(f);
        r.send(&3u32.to_be_bytes());
        r
    }
    fn send(&mut self, b: &[u8]) {
        // The server may already have closed the connection.
        let _ = self.0.write_all(b);
    }
    fn option(&mut self, opt: u32, payload: &[u8]) {
        let mut out = Vec::new();
        OptionHeader::encode(opt, payload, &mut out);
        self.send(&out);
    }
    /// The next option reply: (type, payload).
    fn reply(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.0.read_exact(&mut h).unwrap();
        let h = codec::OptionReplyHeader::parse(&h).unwrap();
        let mut p = vec![0u8; h.length as usize];
        self.0.read_exact(&mut p).unwrap();
        (h.reply_type, p)
    }
    /// Asserts that the server closes the connection (EOF or reset), ignoring data.
    fn assert_closed(&mut self) {
        let mut buf = [0u8; 4096];
        loop {
            match self.0.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
                Err(e) => panic!("connection not closed: {e}"),
            }
        }
    }
    /// Negotiates structured replies and GO on `export`, with `base:allocation`.
    fn go(f: &Fixture, export: &str, extended: bool) -> Raw {
        let mut r = Raw::start(f);
        r.option(if extended { OPT_EXTENDED_HEADERS } else { OPT_STRUCTURED_REPLY }, &[]);
        assert_eq!(r.reply().0, REP_ACK);
        let mc =
            MetaContextRequest { export: export.into(), queries: vec!["base:allocation".into()] };
        r.option(OPT_SET_META_CONTEXT, &mc.encode());
        assert_eq!(r.reply().0, REP_META_CONTEXT);
        assert_eq!(r.reply().0, REP_ACK);
        r.option(OPT_GO, &InfoRequest { export: export.into(), infos: vec![] }.encode());
        assert_eq!(r.reply().0, REP_INFO);
        assert_eq!(r.reply().0, REP_ACK);
        r
    }
    fn request(&mut self, req: Request, extended: bool, payload: &[u8]) {
        let mut out = Vec::new();
        req.encode(&mut out, extended).unwrap();
        out.extend_from_slice(payload);
        self.send(&out);
    }
    /// Reads one structured chunk: (flags, type, cookie, payload).
    /// A simple reply is returned as a final `NONE` chunk (it must carry no error).
    fn chunk(&mut self, extended: bool) -> (u16, u16, u64, Vec<u8>) {
        let mut magic = [0u8; 4];
        self.0.read_exact(&mut magic).unwrap();
        let n = codec::ReplyHeader::len_for_magic(magic).unwrap();
        assert!(!extended || n == 32, "extended headers need extended replies");
        let mut h = vec![0u8; n];
        h[..4].copy_from_slice(&magic);
        self.0.read_exact(&mut h[4..]).unwrap();
        match codec::ReplyHeader::parse(&h).unwrap() {
            codec::ReplyHeader::Simple { error: 0, cookie } => {
                (REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, Vec::new())
            }
            codec::ReplyHeader::Chunk { flags, chunk_type, cookie, length } => {
                let mut p = vec![0u8; length as usize];
                self.0.read_exact(&mut p).unwrap();
                (flags, chunk_type, cookie, p)
            }
            other => panic!("{other:?}"),
        }
    }
}

/// A well-behaved client that must keep working whatever the others do.
struct Good {
    client: Option<Client<tokio::net::UnixStream>>,
    n: u8,
}

impl Good {
    fn new(f: &Fixture) -> Good {
        let c =
            f.rt.block_on(Client::connect_unix(&f.sock, &opts("disk", &["base:allocation"], true)))
                .unwrap();
        Good { client: Some(c), n: 0 }
    }
    fn check(&mut self, f: &Fixture, what: &str) {
        self.n = self.n.wrapping_add(1);
        let n = self.n;
        let c = self.client.as_mut().unwrap();
        f.rt.block_on(async {
            c.write(8192, &[n; 512], false).await.unwrap_or_else(|e| panic!("after {what}: {e}"));
            let mut b = [0u8; 512];
            c.read(8192, &mut b).await.unwrap_or_else(|e| panic!("after {what}: {e}"));
            assert_eq!(b, [n; 512], "after {what}");
        });
        // New connections are accepted too.
        let c2 = f.rt.block_on(Client::connect_unix(&f.sock, &opts("ro", &[], false)));
        assert!(c2.is_ok(), "after {what}: {c2:?}");
    }
}

#[test]
fn pipelined_requests_are_all_answered() {
    let f = Fixture::start();
    for extended in [false, true] {
        let mut r = Raw::go(&f, "disk", extended);
        let mut out = Vec::new();
        for i in 0..32u64 {
            let req = Request {
                flags: 0,
                command: CMD_WRITE,
                cookie: 100 + i,
                offset: i * 4096,
                length: 4096,
            };
            req.encode(&mut out, extended).unwrap();
            out.extend_from_slice(&[i as u8 + 1; 4096]);
            let req = Request {
                flags: 0,
                command: CMD_READ,
                cookie: 1000 + i,
                offset: 1 << 20,
                length: 8192,
            };
            req.encode(&mut out, extended).unwrap();
        }
        r.send(&out);
        let mut seen = std::collections::BTreeSet::new();
        while seen.len() < 64 {
            let (flags, ty, cookie, _) = r.chunk(extended);
            if flags & REPLY_FLAG_DONE != 0 {
                assert!(ty == REPLY_TYPE_NONE || ty == REPLY_TYPE_OFFSET_HOLE, "{ty}");
                assert!(seen.insert(cookie));
            }
        }
        r.request(
            Request { flags: 0, command: CMD_DISC, cookie: 0, offset: 0, length: 0 },
            extended,
            &[],
        );
        r.assert_closed();
        assert!(f.disk.contents()[31 * 4096..32 * 4096].iter().all(|&b| b == 32));
    }
}

#[test]
fn meta_context_queries() {
    let f = Fixture::start();
    let mut r = Raw::start(&f);
    let list = |r: &mut Raw, opt: u32, queries: &[&str]| -> Result<Vec<String>, u32> {
        let mc = MetaContextRequest {
            export: "disk".into(),
            queries: queries.iter().map(|s| s.to_string()).collect(),
        };
        r.option(opt, &mc.encode());
        let mut v = Vec::new();
        loop {
            match r.reply() {
                (REP_META_CONTEXT, p) => v.push(codec::parse_rep_meta_context(&p).unwrap().1),
                (REP_ACK, _) => return Ok(v),
                (e, _) => return Err(e),
            }
        }
    };
    // Not before structured replies.
    assert_eq!(list(&mut r, OPT_LIST_META_CONTEXT, &[]), Err(REP_ERR_INVALID));
    r.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(r.reply().0, REP_ACK);
    let all = vec!["base:allocation".to_string(), "qemu:dirty-bitmap:bm".to_string()];
    assert_eq!(list(&mut r, OPT_LIST_META_CONTEXT, &[]), Ok(all.clone()));
    assert_eq!(list(&mut r, OPT_LIST_META_CONTEXT, &["qemu:"]), Ok(vec![all[1].clone()]));
    assert_eq!(
        list(&mut r, OPT_LIST_META_CONTEXT, &["qemu:dirty-bitmap:"]),
        Ok(vec![all[1].clone()])
    );
    assert_eq!(list(&mut r, OPT_LIST_META_CONTEXT, &["base:"]), Ok(vec![all[0].clone()]));
    assert_eq!(
        list(&mut r, OPT_LIST_META_CONTEXT, &["other:x", "qemu:allocation-depth"]),
        Ok(vec![])
    );
    // SET does not expand wildcards; zero queries select nothing.
    assert_eq!(list(&mut r, OPT_SET_META_CONTEXT, &["qemu:"]), Ok(vec![]));
    assert_eq!(list(&mut r, OPT_SET_META_CONTEXT, &[]), Ok(vec![]));
    assert_eq!(
        list(&mut r, OPT_SET_META_CONTEXT, &["qemu:dirty-bitmap:bm"]),
        Ok(vec![all[1].clone()])
    );
    // Extended headers after structured replies are fine; the reverse is refused.
    r.option(OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(r.reply().0, REP_ACK);
    r.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(r.reply().0, REP_ERR_EXT_HEADER_REQD);
    r.option(OPT_ABORT, &[]);
    assert_eq!(r.reply().0, REP_ACK);
    r.assert_closed();
}

#[test]
fn export_name_with_and_without_zeroes() {
    let f = Fixture::start();
    for (cflags, len) in [(1u32, 134usize), (3, 10)] {
        let mut r = Raw::connect(&f);
        r.send(&cflags.to_be_bytes());
        r.option(OPT_EXPORT_NAME, b"disk");
        let mut b = vec![0u8; len];
        r.0.read_exact(&mut b).unwrap();
        assert_eq!(u64::from_be_bytes(b[..8].try_into().unwrap()), SIZE as u64);
        // Compact simple replies work afterwards.
        r.request(
            Request { flags: 0, command: CMD_READ, cookie: 5, offset: 0, length: 16 },
            false,
            &[],
        );
        let mut rep = [0u8; 32];
        r.0.read_exact(&mut rep).unwrap();
        assert_eq!(
            codec::ReplyHeader::parse(&rep[..16]).unwrap(),
            codec::ReplyHeader::Simple { error: 0, cookie: 5 }
        );
    }
}

#[test]
fn garbage_at_every_stage() {
    let f = Fixture::start();
    let mut good = Good::new(&f);

    // Handshake: unknown client flags.
    let mut r = Raw::connect(&f);
    r.send(&0xffu32.to_be_bytes());
    r.assert_closed();
    good.check(&f, "bad client flags");

    // Truncated client flags, then close.
    let mut r = Raw::connect(&f);
    r.send(&[0, 0]);
    drop(r);
    good.check(&f, "truncated client flags");

    // Option with a wrong magic.
    let mut r = Raw::start(&f);
    r.send(&[0x55; 16]);
    r.assert_closed();
    good.check(&f, "bad option magic");

    // Unknown option, withdrawn options and STARTTLS: errors, then the session goes on.
    let mut r = Raw::start(&f);
    r.option(99, b"junk");
    assert_eq!(r.reply().0, REP_ERR_UNSUP);
    r.option(OPT_PEEK_EXPORT, &[]);
    assert_eq!(r.reply().0, REP_ERR_UNSUP);
    r.option(OPT_STARTTLS, &[]);
    assert_eq!(r.reply().0, REP_ERR_POLICY);
    r.option(OPT_LIST, b"x");
    assert_eq!(r.reply().0, REP_ERR_INVALID);
    r.option(OPT_STRUCTURED_REPLY, b"x");
    assert_eq!(r.reply().0, REP_ERR_INVALID);
    r.option(OPT_EXTENDED_HEADERS, b"x");
    assert_eq!(r.reply().0, REP_ERR_INVALID);
    // Oversized option payloads: consumed and refused.
    r.option(OPT_GO, &vec![0u8; 70_000]);
    assert_eq!(r.reply().0, REP_ERR_TOO_BIG);
    // Malformed GO / INFO payloads and an unknown export.
    r.option(OPT_GO, &[0, 0, 0, 9, b'a']);
    assert_eq!(r.reply().0, REP_ERR_INVALID);
    r.option(OPT_INFO, &[0, 0, 0x10, 0x01]);
    assert_eq!(r.reply().0, REP_ERR_INVALID);
    r.option(OPT_INFO, &InfoRequest { export: "missing".into(), infos: vec![] }.encode());
    let (ty, msg) = r.reply();
    assert_eq!(ty, REP_ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&msg).contains("missing"));
    r.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(r.reply().0, REP_ACK);
    r.option(OPT_SET_META_CONTEXT, &[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
    assert_eq!(r.reply().0, REP_ERR_INVALID);
    r.option(
        OPT_LIST_META_CONTEXT,
        &MetaContextRequest { export: "missing".into(), queries: vec![] }.encode(),
    );
    assert_eq!(r.reply().0, REP_ERR_UNKNOWN);
    // INFO with everything on a known export.
    r.option(
        OPT_INFO,
        &InfoRequest {
            export: "disk".into(),
            infos: vec![INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, 77],
        }
        .encode(),
    );
    let mut infos = Vec::new();
    loop {
        match r.reply() {
            (REP_INFO, p) => infos.push(codec::Info::parse(&p).unwrap()),
            (REP_ACK, _) => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(infos.len(), 4, "{infos:?}");
    // A huge option length ends the connection.
    r.send(&IHAVEOPT.to_be_bytes());
    r.send(&OPT_GO.to_be_bytes());
    r.send(&u32::MAX.to_be_bytes());
    r.assert_closed();
    good.check(&f, "option errors");

    // EXPORT_NAME of an unknown export ends the connection (no way to report it).
    let mut r = Raw::start(&f);
    r.option(OPT_EXPORT_NAME, b"missing");
    r.assert_closed();
    // EXPORT_NAME after extended headers is forbidden.
    let mut r = Raw::start(&f);
    r.option(OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(r.reply().0, REP_ACK);
    r.option(OPT_EXPORT_NAME, b"disk");
    r.assert_closed();
    good.check(&f, "export name errors");

    // Truncated option payload, then close.
    let mut r = Raw::start(&f);
    r.send(&IHAVEOPT.to_be_bytes());
    r.send(&OPT_GO.to_be_bytes());
    r.send(&100u32.to_be_bytes());
    r.send(&[1, 2, 3]);
    drop(r);
    good.check(&f, "truncated option");

    for extended in [false, true] {
        // Transmission: a bad request magic.
        let mut r = Raw::go(&f, "disk", extended);
        r.send(&[0x77; 32]);
        r.assert_closed();
        good.check(&f, "bad request magic");

        // A write payload over the limit: hard disconnect.
        let mut r = Raw::go(&f, "disk", extended);
        let flags = if extended { CMD_FLAG_PAYLOAD_LEN } else { 0 };
        r.request(
            Request { flags, command: CMD_WRITE, cookie: 1, offset: 0, length: 64 << 20 },
            extended,
            &[],
        );
        r.assert_closed();
        good.check(&f, "oversized write");

        // Errors that keep the connection: unknown command, out of bounds, unexpected payload.
        let mut r = Raw::go(&f, "disk", extended);
        r.request(
            Request { flags: 0, command: 200, cookie: 2, offset: 0, length: 0 },
            extended,
            &[],
        );
        let (_, ty, cookie, p) = r.chunk(extended);
        assert_eq!((ty, cookie), (REPLY_TYPE_ERROR, 2));
        assert_eq!(codec::parse_error_chunk(&p, ty).unwrap().0, EINVAL);
        r.request(
            Request { flags: 0, command: CMD_READ, cookie: 3, offset: u64::MAX, length: 2 },
            extended,
            &[],
        );
        let (_, ty, cookie, p) = r.chunk(extended);
        assert_eq!(
            (ty, cookie, codec::parse_error_chunk(&p, ty).unwrap().0),
            (REPLY_TYPE_ERROR, 3, EINVAL)
        );
        if extended {
            // A payload on FLUSH is consumed and refused; a block status payload with an
            // unknown context id is refused; a 64-bit read length beyond the limit too.
            r.request(
                Request {
                    flags: CMD_FLAG_PAYLOAD_LEN,
                    command: CMD_FLUSH,
                    cookie: 4,
                    offset: 0,
                    length: 5,
                },
                true,
                b"hello",
            );
            let (_, ty, cookie, _) = r.chunk(true);
            assert_eq!((ty, cookie), (REPLY_TYPE_ERROR, 4));
            let mut p = 4096u64.to_be_bytes().to_vec();
            p.extend_from_slice(&9u32.to_be_bytes());
            r.request(
                Request {
                    flags: CMD_FLAG_PAYLOAD_LEN,
                    command: CMD_BLOCK_STATUS,
                    cookie: 5,
                    offset: 0,
                    length: 12,
                },
                true,
                &p,
            );
            let (_, ty, cookie, _) = r.chunk(true);
            assert_eq!((ty, cookie), (REPLY_TYPE_ERROR, 5));
            let mut p = 4096u64.to_be_bytes().to_vec();
            p.extend_from_slice(&0u32.to_be_bytes());
            r.request(
                Request {
                    flags: CMD_FLAG_PAYLOAD_LEN,
                    command: CMD_BLOCK_STATUS,
                    cookie: 6,
                    offset: 0,
                    length: 12,
                },
                true,
                &p,
            );
            let (flags, ty, cookie, p) = r.chunk(true);
            assert_eq!((flags, ty, cookie), (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS_EXT, 6));
            assert_eq!(codec::parse_block_status(&p, true).unwrap().0, 0);
            r.request(
                Request { flags: 0, command: CMD_READ, cookie: 7, offset: 0, length: 1 << 33 },
                true,
                &[],
            );
            let (_, ty, cookie, p) = r.chunk(true);
            assert_eq!(
                (ty, cookie, codec::parse_error_chunk(&p, ty).unwrap().0),
                (REPLY_TYPE_ERROR, 7, EINVAL)
            );
        }
        // A truncated header, then close.
        r.send(&[0x25, 0x60]);
        drop(r);
        good.check(&f, "transmission errors");

        // A truncated write payload, then close.
        let mut r = Raw::go(&f, "disk", extended);
        r.request(
            Request {
                flags: if extended { CMD_FLAG_PAYLOAD_LEN } else { 0 },
                command: CMD_WRITE,
                cookie: 1,
                offset: 0,
                length: 4096,
            },
            extended,
            &[1; 100],
        );
        drop(r);
        good.check(&f, "truncated write");
    }

    // Random bytes at every stage.
    let mut rng = testkit::SplitMix64(42);
    for stage in 0..3 {
        for _ in 0..20 {
            let n = rng.up_to(200) as usize;
            let junk: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            let mut r = match stage {
                0 => Raw::connect(&f),
                1 => Raw::start(&f),
                _ => Raw::go(&f, "disk", rng.next().is_multiple_of(2)),
            };
            r.send(&junk);
            let _ = r.0.shutdown(std::net::Shutdown::Write);
            r.assert_closed();
        }
        good.check(&f, &format!("random bytes at stage {stage}"));
    }
}

/// `ServerHandle::shutdown`: requests received are answered, then every connection is
/// closed (negotiating ones too), the socket is gone, and a client that never reads its
/// replies holds the shutdown up only for the grace period.
#[test]
fn shutdown_answers_what_was_received_and_is_bounded() {
    let mut f = Fixture::start();
    let mut writer = Raw::go(&f, "disk", false);
    let mut out = Vec::new();
    for i in 0..4u64 {
        let req =
            Request { flags: 0, command: CMD_WRITE, cookie: i, offset: i << 20, length: 1 << 20 };
        req.encode(&mut out, false).unwrap();
        out.extend_from_slice(&vec![0xab; 1 << 20]);
    }
    writer.send(&out);
    for _ in 0..4 {
        assert_eq!(writer.chunk(false).0, REPLY_FLAG_DONE);
    }
    // A client that asks for 256 MiB and reads none of it.
    let mut stuck = Raw::go(&f, "disk", false);
    let mut out = Vec::new();
    for i in 0..64u64 {
        let req = Request { flags: 0, command: CMD_READ, cookie: i, offset: 0, length: 4 << 20 };
        req.encode(&mut out, false).unwrap();
    }
    stuck.send(&out);
    let mut negotiating = Raw::start(&f);
    // Requests sent just before the shutdown, given time to arrive.
    let mut out = Vec::new();
    for i in 0..8u64 {
        let req = Request {
            flags: 0,
            command: CMD_WRITE,
            cookie: 100 + i,
            offset: i * 4096,
            length: 4096,
        };
        req.encode(&mut out, false).unwrap();
        out.extend_from_slice(&[i as u8 + 1; 4096]);
    }
    writer.send(&out);
    std::thread::sleep(Duration::from_millis(200));

    let handle = f.handle.take().unwrap();
    let started = std::time::Instant::now();
    f.rt.block_on(handle.shutdown(Duration::from_millis(300)));
    let took = started.elapsed();
    assert!(took < Duration::from_secs(4), "shutdown took {took:?}");
    assert!(!f.sock.exists());
    assert!(UnixStream::connect(&f.sock).is_err());
    let mut answered = std::collections::BTreeSet::new();
    for _ in 0..8 {
        let (flags, ty, cookie, _) = writer.chunk(false);
        assert_eq!((flags, ty), (REPLY_FLAG_DONE, REPLY_TYPE_NONE), "an error reply");
        answered.insert(cookie);
    }
    assert_eq!(answered, (100..108).collect());
    writer.assert_closed();
    negotiating.assert_closed();
    stuck.assert_closed();
    assert!(f.disk.contents()[7 * 4096..8 * 4096].iter().all(|&b| b == 8));
}
