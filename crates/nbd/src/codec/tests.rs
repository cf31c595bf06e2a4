//! Codec unit tests: round trips and every error path of the parsers.

use super::*;

#[test]
fn greeting_round_trip_and_bad_magic() {
    let g = encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    assert_eq!(parse_greeting(&g), Ok(3));
    let mut bad = g;
    bad[0] ^= 1;
    assert!(matches!(parse_greeting(&bad), Err(CodecError::BadMagic { expected: NBDMAGIC, .. })));
    let mut bad = g;
    bad[8] ^= 1;
    assert!(matches!(parse_greeting(&bad), Err(CodecError::BadMagic { expected: IHAVEOPT, .. })));
}

#[test]
fn client_flags() {
    let both = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;
    assert_eq!(parse_client_flags(3u32.to_be_bytes(), both), Ok(3));
    assert_eq!(parse_client_flags(0u32.to_be_bytes(), both), Ok(0));
    assert_eq!(parse_client_flags(4u32.to_be_bytes(), both), Err(CodecError::UnknownFlags(4)));
    // NO_ZEROES not offered.
    assert_eq!(
        parse_client_flags(2u32.to_be_bytes(), FLAG_FIXED_NEWSTYLE),
        Err(CodecError::UnknownFlags(2))
    );
}

#[test]
fn option_header_round_trip() {
    let mut out = Vec::new();
    OptionHeader::encode(OPT_GO, b"abc", &mut out);
    let h = OptionHeader::parse(out[..16].try_into().unwrap()).unwrap();
    assert_eq!(h, OptionHeader { option: OPT_GO, length: 3 });
    assert_eq!(&out[16..], b"abc");
    out[3] = 0;
    assert!(matches!(
        OptionHeader::parse(out[..16].try_into().unwrap()),
        Err(CodecError::BadMagic { .. })
    ));
}

#[test]
fn info_request_round_trip_and_errors() {
    let r = InfoRequest { export: "disk".into(), infos: vec![INFO_NAME, INFO_BLOCK_SIZE] };
    let p = r.encode();
    assert_eq!(InfoRequest::parse(&p), Ok(r.clone()));
    // Truncated everywhere.
    for n in 0..p.len() {
        assert_eq!(InfoRequest::parse(&p[..n]), Err(CodecError::Truncated), "{n}");
    }
    let mut long = p.clone();
    long.push(0);
    assert_eq!(InfoRequest::parse(&long), Err(CodecError::TrailingBytes));
    // Name length beyond the limit, and beyond the payload.
    let mut big = p.clone();
    big[..4].copy_from_slice(&5000u32.to_be_bytes());
    assert_eq!(InfoRequest::parse(&big), Err(CodecError::StringTooLong(5000)));
    let mut over = p.clone();
    over[..4].copy_from_slice(&100u32.to_be_bytes());
    assert_eq!(InfoRequest::parse(&over), Err(CodecError::Truncated));
    // Count larger than the payload: no allocation, an error.
    let mut count = p.clone();
    count[8..10].copy_from_slice(&u16::MAX.to_be_bytes());
    assert_eq!(InfoRequest::parse(&count), Err(CodecError::Truncated));
    let mut bad = p;
    bad[4] = 0xff;
    assert_eq!(InfoRequest::parse(&bad), Err(CodecError::NotUtf8));
}

#[test]
fn meta_context_request_round_trip_and_errors() {
    let r = MetaContextRequest {
        export: "".into(),
        queries: vec!["base:allocation".into(), "qemu:dirty-bitmap:".into()],
    };
    let p = r.encode();
    assert_eq!(MetaContextRequest::parse(&p), Ok(r.clone()));
    for n in 0..p.len() {
        assert!(MetaContextRequest::parse(&p[..n]).is_err(), "{n}");
    }
    let mut long = p.clone();
    long.extend_from_slice(&[0; 3]);
    assert_eq!(MetaContextRequest::parse(&long), Err(CodecError::TrailingBytes));
    // A huge query count is rejected before allocating.
    let mut count = p.clone();
    count[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
    assert_eq!(MetaContextRequest::parse(&count), Err(CodecError::Truncated));
    let mut q = p;
    q[8..12].copy_from_slice(&(MAX_STRING + 1).to_be_bytes());
    assert_eq!(MetaContextRequest::parse(&q), Err(CodecError::StringTooLong(MAX_STRING + 1)));
}

#[test]
fn export_name() {
    assert_eq!(parse_export_name(b"x"), Ok("x".into()));
    assert_eq!(parse_export_name(&[0xff]), Err(CodecError::NotUtf8));
    assert!(matches!(parse_export_name(&[b'a'; 4097]), Err(CodecError::StringTooLong(4097))));
}

fn reply_header(b: &[u8]) -> OptionReplyHeader {
    OptionReplyHeader::parse(b[..20].try_into().unwrap()).unwrap()
}

#[test]
fn option_replies_round_trip() {
    let mut out = Vec::new();
    encode_rep_ack(&mut out, OPT_ABORT);
    assert_eq!(
        reply_header(&out),
        OptionReplyHeader { option: OPT_ABORT, reply_type: REP_ACK, length: 0 }
    );

    let mut out = Vec::new();
    encode_rep_server(&mut out, "disk", "a disk");
    let h = reply_header(&out);
    assert_eq!((h.option, h.reply_type, h.length as usize), (OPT_LIST, REP_SERVER, out.len() - 20));
    assert_eq!(parse_rep_server(&out[20..]), Ok(("disk".into(), "a disk".into())));

    let mut out = Vec::new();
    encode_info_export(&mut out, OPT_GO, 1 << 40, FLAG_HAS_FLAGS | FLAG_READ_ONLY);
    assert_eq!(Info::parse(&out[20..]), Ok(Info::Export { size: 1 << 40, flags: 3 }));
    let mut out = Vec::new();
    encode_info_name(&mut out, OPT_INFO, "n");
    assert_eq!(Info::parse(&out[20..]), Ok(Info::Name("n".into())));
    let mut out = Vec::new();
    encode_info_description(&mut out, OPT_INFO, "d");
    assert_eq!(Info::parse(&out[20..]), Ok(Info::Description("d".into())));
    let bs = BlockSize { minimum: 1, preferred: 4096, maximum: 1 << 25 };
    let mut out = Vec::new();
    encode_info_block_size(&mut out, OPT_GO, bs);
    assert_eq!(Info::parse(&out[20..]), Ok(Info::BlockSize(bs)));
    assert_eq!(Info::parse(&[0, 9, 1]), Ok(Info::Unknown(9)));
    assert_eq!(Info::parse(&[0, 0, 1]), Err(CodecError::Truncated));
    assert_eq!(Info::parse(&[0]), Err(CodecError::Truncated));

    let mut out = Vec::new();
    encode_rep_meta_context(&mut out, OPT_SET_META_CONTEXT, 2, "qemu:dirty-bitmap:b");
    assert_eq!(reply_header(&out).reply_type, REP_META_CONTEXT);
    assert_eq!(parse_rep_meta_context(&out[20..]), Ok((2, "qemu:dirty-bitmap:b".into())));

    let mut out = Vec::new();
    let msg = "x".repeat(10_000);
    encode_rep_error(&mut out, OPT_GO, REP_ERR_UNKNOWN, &msg);
    let h = reply_header(&out);
    assert_eq!((h.reply_type, h.length), (REP_ERR_UNKNOWN, MAX_STRING));

    let mut bad = out.clone();
    bad[0] ^= 0xff;
    assert!(OptionReplyHeader::parse(bad[..20].try_into().unwrap()).is_err());
}

#[test]
fn export_name_reply_honours_no_zeroes() {
    let mut out = Vec::new();
    encode_export_name_reply(&mut out, 7, 1, false);
    assert_eq!(out.len(), 10 + 124);
    assert!(out[10..].iter().all(|&b| b == 0));
    let mut out = Vec::new();
    encode_export_name_reply(&mut out, 7, 1, true);
    assert_eq!(out, [0, 0, 0, 0, 0, 0, 0, 7, 0, 1]);
}

#[test]
fn requests_round_trip_and_errors() {
    let r =
        Request { flags: CMD_FLAG_FUA, command: CMD_WRITE, cookie: 9, offset: 4096, length: 512 };
    for ext in [false, true] {
        let mut out = Vec::new();
        r.encode(&mut out, ext).unwrap();
        assert_eq!(out.len(), if ext { EXTENDED_REQUEST_LEN } else { REQUEST_LEN });
        assert_eq!(Request::parse(&out, ext), Ok(r));
        assert!(Request::parse(&out, !ext).is_err());
        assert_eq!(Request::parse(&out[..out.len() - 1], ext), Err(CodecError::Truncated));
        let mut bad = out.clone();
        bad[0] ^= 1;
        assert!(matches!(Request::parse(&bad, ext), Err(CodecError::BadMagic { .. })));
        assert_eq!(r.payload_len(ext), Ok(512));
    }
    let big = Request { length: 1 << 32, ..r };
    assert_eq!(big.encode(&mut Vec::new(), false), Err(CodecError::TooBig(1 << 32)));
    assert_eq!(big.payload_len(true), Err(CodecError::TooBig(1 << 32)));
    let too_big = Request { length: u64::from(MAX_PAYLOAD) + 1, ..r };
    assert!(too_big.payload_len(false).is_err());
    let read = Request { command: CMD_READ, length: 1 << 40, ..r };
    assert_eq!(read.payload_len(true), Ok(0));
    let bs = Request { command: CMD_BLOCK_STATUS, flags: CMD_FLAG_PAYLOAD_LEN, length: 12, ..r };
    assert_eq!(bs.payload_len(true), Ok(12));
    assert_eq!(bs.payload_len(false), Ok(0));
}

#[test]
fn block_status_payload() {
    let mut p = 100u64.to_be_bytes().to_vec();
    p.extend_from_slice(&1u32.to_be_bytes());
    assert_eq!(parse_block_status_payload(&p), Ok((100, vec![1])));
    p.push(0);
    assert!(matches!(parse_block_status_payload(&p), Err(CodecError::Invalid(_))));
    assert_eq!(parse_block_status_payload(&p[..7]), Err(CodecError::Truncated));
}

#[test]
fn simple_and_chunk_replies_round_trip() {
    let mut out = Vec::new();
    encode_simple_reply(&mut out, EIO, 5);
    assert_eq!(ReplyHeader::parse(&out), Ok(ReplyHeader::Simple { error: EIO, cookie: 5 }));

    for style in [ChunkStyle::Structured, ChunkStyle::Extended { offset: 1000 }] {
        let hl = if style == ChunkStyle::Structured { 20 } else { 32 };
        let mut out = Vec::new();
        encode_chunk_none(&mut out, style, 3);
        assert_eq!(
            ReplyHeader::parse(&out),
            Ok(ReplyHeader::Chunk {
                flags: REPLY_FLAG_DONE,
                chunk_type: REPLY_TYPE_NONE,
                cookie: 3,
                length: 0
            })
        );
        let mut out = Vec::new();
        encode_chunk_data(&mut out, style, false, 3, 1000, b"hello").unwrap();
        assert_eq!(
            ReplyHeader::parse(&out[..hl]),
            Ok(ReplyHeader::Chunk {
                flags: 0,
                chunk_type: REPLY_TYPE_OFFSET_DATA,
                cookie: 3,
                length: 13
            })
        );
        assert_eq!(&out[hl + 8..], b"hello");
        assert!(encode_chunk_data(&mut Vec::new(), style, true, 3, 0, b"").is_err());
        let mut out = Vec::new();
        encode_chunk_hole(&mut out, style, true, 3, 4096, 512).unwrap();
        assert_eq!(out.len(), hl + 12);
        assert!(encode_chunk_hole(&mut Vec::new(), style, true, 3, 0, 0).is_err());
        let mut out = Vec::new();
        encode_chunk_error(&mut out, style, 3, EINVAL, "bad").unwrap();
        let h = ReplyHeader::parse(&out[..hl]).unwrap();
        assert_eq!(
            h,
            ReplyHeader::Chunk { flags: 1, chunk_type: REPLY_TYPE_ERROR, cookie: 3, length: 9 }
        );
        assert_eq!(
            parse_error_chunk(&out[hl..], REPLY_TYPE_ERROR),
            Ok((EINVAL, "bad".into(), None))
        );
        let mut out = Vec::new();
        encode_chunk_error_offset(&mut out, style, true, 3, EIO, "io", 77).unwrap();
        assert_eq!(
            parse_error_chunk(&out[hl..], REPLY_TYPE_ERROR_OFFSET),
            Ok((EIO, "io".into(), Some(77)))
        );
        assert_eq!(
            parse_error_chunk(&out[hl..hl + 7], REPLY_TYPE_ERROR_OFFSET),
            Err(CodecError::Truncated)
        );
    }
    assert_eq!(
        encode_chunk_header(&mut Vec::new(), ChunkStyle::Structured, 0, 1, 1, 1 << 32),
        Err(CodecError::TooBig(1 << 32))
    );
    assert!(ReplyHeader::len_for_magic([0, 0, 0, 0]).is_err());
    let mut out = Vec::new();
    encode_chunk_none(&mut out, ChunkStyle::Structured, 1);
    assert_eq!(ReplyHeader::parse(&out[..19]), Err(CodecError::Truncated));
    out.push(0);
    assert_eq!(ReplyHeader::parse(&out), Err(CodecError::TrailingBytes));
}

#[test]
fn block_status_chunks_round_trip() {
    let ext = [Extent { length: 4096, flags: 3 }, Extent { length: 8192, flags: 0 }];
    let mut out = Vec::new();
    encode_chunk_block_status(&mut out, true, 1, 2, &ext).unwrap();
    assert_eq!(parse_block_status(&out[20..], false), Ok((2, ext.to_vec())));
    let mut out = Vec::new();
    let big = [Extent { length: 1 << 40, flags: 1 << 33 }];
    encode_chunk_block_status_ext(&mut out, 0, true, 1, 0, &big).unwrap();
    assert_eq!(parse_block_status(&out[32..], true), Ok((0, big.to_vec())));
    // Count mismatch, bad sizes, empty lists, 64-bit values in a 32-bit chunk.
    let mut bad = out[32..].to_vec();
    bad[4..8].copy_from_slice(&2u32.to_be_bytes());
    assert!(parse_block_status(&bad, true).is_err());
    assert!(parse_block_status(&[0, 0, 0, 1], false).is_err());
    assert!(parse_block_status(&[0, 0, 0, 1, 0, 0, 0, 1, 0], false).is_err());
    assert!(parse_block_status(&[0, 0], false).is_err());
    assert!(encode_chunk_block_status(&mut Vec::new(), true, 1, 0, &[]).is_err());
    assert!(encode_chunk_block_status(&mut Vec::new(), true, 1, 0, &big).is_err());
    assert!(
        encode_chunk_block_status(&mut Vec::new(), true, 1, 0, &[Extent { length: 0, flags: 0 }])
            .is_err()
    );
    assert!(encode_chunk_block_status_ext(&mut Vec::new(), 0, true, 1, 0, &[]).is_err());
    assert!(
        encode_chunk_block_status_ext(
            &mut Vec::new(),
            0,
            true,
            1,
            0,
            &[Extent { length: 0, flags: 0 }]
        )
        .is_err()
    );
}
