//! Decompression of compressed clusters: raw deflate (compression type 0) and zstd
//! (compression type 1).
//!
//! The compressed data read from the image may run past the end of the stream (the
//! descriptor counts whole sectors); decompression stops once a whole cluster has
//! been produced, and fails if the stream ends before that.

use std::io::Read;

use crate::error::{Qcow2Error, Result};
use crate::header::{COMPRESSION_DEFLATE, COMPRESSION_ZSTD};

/// Largest zstd window accepted (bounds the decoder's memory).
const MAX_ZSTD_WINDOW: u64 = 8 << 20;

/// Decompresses `input` into exactly `out.len()` bytes (one cluster).
///
/// `host` is the offset of the compressed data, for errors.
pub fn decompress(compression_type: u8, input: &[u8], out: &mut [u8], host: u64) -> Result<()> {
    match compression_type {
        COMPRESSION_DEFLATE => inflate(input, out, host),
        COMPRESSION_ZSTD => unzstd(input, out, host),
        _ => Err(Qcow2Error::Decompress { offset: host, reason: "unknown compression type" }),
    }
}

fn inflate(input: &[u8], out: &mut [u8], host: u64) -> Result<()> {
    let mut d = flate2::Decompress::new(false);
    match d.decompress(input, out, flate2::FlushDecompress::Finish) {
        Ok(_) if d.total_out() == out.len() as u64 => Ok(()),
        Ok(_) => Err(Qcow2Error::Decompress {
            offset: host,
            reason: "deflate stream ends before a whole cluster",
        }),
        Err(_) => Err(Qcow2Error::Decompress { offset: host, reason: "invalid deflate stream" }),
    }
}

fn unzstd(input: &[u8], out: &mut [u8], host: u64) -> Result<()> {
    let bad = |reason| Qcow2Error::Decompress { offset: host, reason };
    let mut src = input;
    let mut done = 0;
    // A cluster may be stored as several frames; decode frame after frame until the
    // cluster is full.
    while done < out.len() {
        let mut dec =
            ruzstd::decoding::StreamingDecoder::new_with_max_window_size(&mut src, MAX_ZSTD_WINDOW)
                .map_err(|_| bad("invalid zstd frame header"))?;
        let before = done;
        while done < out.len() {
            match dec.read(&mut out[done..]) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(_) => return Err(bad("invalid zstd data")),
            }
        }
        if done == before {
            return Err(bad("zstd stream ends before a whole cluster"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn deflate_with_trailing_garbage() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(&data).unwrap();
        let mut compressed = enc.finish().unwrap();
        compressed.extend_from_slice(&[0xff; 300]);
        let mut out = vec![0u8; 4096];
        decompress(COMPRESSION_DEFLATE, &compressed, &mut out, 0).unwrap();
        assert_eq!(out, data);
        let mut big = vec![0u8; 8192];
        assert!(decompress(COMPRESSION_DEFLATE, &compressed[..20], &mut big, 0).is_err());
        assert!(decompress(COMPRESSION_DEFLATE, &[0xff; 64], &mut big, 0).is_err());
        assert!(decompress(COMPRESSION_ZSTD, &[0xff; 64], &mut big, 0).is_err());
        assert!(decompress(COMPRESSION_ZSTD, &[], &mut big, 0).is_err());
    }
}
