//! The NBD server on an arbitrary client byte stream: negotiation (client flags, every
//! option and its payload), then the transmission phase (request headers of both
//! styles, write payloads, block status, replies in every style), over an in-memory
//! duplex stream with two `MemoryExport`s, one of them read-only.
//!
//! The first byte picks a prelude written before the fuzzed bytes, so that the fuzzer
//! reaches the transmission phase in every reply style without first having to find
//! the option magic: 0 = none (the input starts with the client flags), 1 = a plain
//! `OPT_EXPORT_NAME`, 2 = structured replies and `OPT_GO`, 3 = extended headers, both
//! meta contexts and `OPT_GO`. Any panic, hang or unbounded allocation is a bug; a
//! protocol error that ends the connection is not.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use nbd::proto::*;
use nbd::server::Server;
use nbd::{Exports, MemoryExport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One option: IHAVEOPT, option, length, payload.
fn option(out: &mut Vec<u8>, opt: u32, payload: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

/// `OPT_SET_META_CONTEXT` for `export` with `queries`.
fn set_meta(out: &mut Vec<u8>, export: &str, queries: &[&str]) {
    let mut p = Vec::new();
    p.extend_from_slice(&(export.len() as u32).to_be_bytes());
    p.extend_from_slice(export.as_bytes());
    p.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        p.extend_from_slice(&(q.len() as u32).to_be_bytes());
        p.extend_from_slice(q.as_bytes());
    }
    option(out, OPT_SET_META_CONTEXT, &p);
}

/// `OPT_GO` for `export`, asking for no particular info.
fn go(out: &mut Vec<u8>, export: &str) {
    let mut p = Vec::new();
    p.extend_from_slice(&(export.len() as u32).to_be_bytes());
    p.extend_from_slice(export.as_bytes());
    p.extend_from_slice(&0u16.to_be_bytes());
    option(out, OPT_GO, &p);
}

fn prelude(kind: u8) -> Vec<u8> {
    let mut out = Vec::new();
    if kind == 0 {
        return out;
    }
    out.extend_from_slice(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
    match kind {
        1 => option(&mut out, OPT_EXPORT_NAME, b"disk"),
        2 => {
            option(&mut out, OPT_STRUCTURED_REPLY, &[]);
            set_meta(&mut out, "disk", &["base:allocation"]);
            go(&mut out, "disk");
        }
        _ => {
            option(&mut out, OPT_EXTENDED_HEADERS, &[]);
            set_meta(&mut out, "disk", &["base:allocation", "qemu:dirty-bitmap:b0"]);
            go(&mut out, "disk");
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else { return };
    let mut input = prelude(kind % 4);
    input.extend_from_slice(rest);

    let exports = Arc::new(Exports::new());
    // Small exports keep reads and writes cheap; the sizes are not multiples of the
    // 64 KiB bitmap block, so the last block is partial.
    exports.insert("disk", Arc::new(MemoryExport::new(192 * 1024 + 512, Some("b0"))));
    exports.insert("ro", Arc::new(MemoryExport::new(4096, None).with_read_only(true)));
    let server = Server::new(exports);

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async move {
        let (mut client, server_end) = tokio::io::duplex(64 * 1024);
        let serving = tokio::spawn(async move { server.serve(server_end).await });
        let (mut rd, mut wr) = tokio::io::split(&mut client);
        // Write the stream and drain the replies at the same time: the server stops
        // reading while its replies are not read.
        let writer = async {
            let _ = wr.write_all(&input).await;
            let _ = wr.shutdown().await;
        };
        let reader = async {
            let mut sink = vec![0u8; 64 * 1024];
            while let Ok(n) = rd.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        };
        tokio::join!(writer, reader);
        // A protocol error is an expected outcome; a panic in the server is not.
        if let Err(e) = serving.await
            && e.is_panic()
        {
            std::panic::resume_unwind(e.into_panic());
        }
    });
});
