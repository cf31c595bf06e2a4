//! Taking a push backup's image into the chunk store.
//!
//! A push backup's daemon writes the disk's clusters (all of them for a full backup,
//! the dirty ones for an incremental) into a new qcow2 image without backing file. The
//! clusters the image allocates (data, or zero clusters: what the job wrote) are the
//! ranges read; every chunk they touch is completed from the parent's chunk
//! ([`repo::assemble`]), the others keep the parent's (zero for a full backup).

use std::path::Path;

use ::repo::assemble::ingest;
use ::repo::writer::BackupWriter;
use qcow2::Qcow2Image;
use qcow2::l2::ClusterMapping;

use super::{RepoError, Result};

/// Largest piece read from the image at once (a chunk larger than this is read in
/// several).
const MAX_PIECE: u64 = 4 << 20;

/// Stores the clusters `image` allocates into `writer`, `jobs` chunks at a time; returns
/// the bytes of its data clusters (zero clusters are stored as the zeroes they read as,
/// but not counted: the job wrote no data there).
pub fn ingest_image(
    writer: &BackupWriter<'_>,
    image: &Qcow2Image,
    path: &Path,
    jobs: usize,
) -> Result<u64> {
    let image_err =
        |e: qcow2::Qcow2Error| RepoError::Image { path: path.to_path_buf(), reason: e.to_string() };
    let size = writer.size();
    let cs = image.cluster_size();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut data_bytes = 0u64;
    for c in 0..size.div_ceil(cs) {
        let mapping = image.map_cluster(c).map_err(image_err)?;
        let (off, len) = (c * cs, cs.min(size - c * cs));
        match mapping {
            ClusterMapping::Unallocated => continue,
            ClusterMapping::Zero { .. } => {}
            _ => data_bytes += len,
        }
        match ranges.last_mut() {
            Some((o, l)) if *o + *l == off => *l += len,
            _ => ranges.push((off, len)),
        }
    }
    // Pieces end at chunk boundaries: a piece that is a whole chunk becomes it without
    // a copy.
    let piece = writer.chunk_size().min(MAX_PIECE);
    let pieces = ranges.iter().flat_map(move |&(off, len)| {
        let end = off + len;
        std::iter::successors(Some(off), move |&at| {
            let next = (at / piece + 1) * piece;
            (next < end).then_some(next)
        })
        .map(move |at| (at, ((at / piece + 1) * piece).min(end) - at))
    });
    let reads = pieces.map(|(off, len)| {
        let mut buf = vec![0u8; len as usize];
        image
            .read_at(&mut buf, off)
            .map(|()| (off, buf))
            .map_err(|e| ::repo::Error::Invalid(format!("{}: {e}", path.display())))
    });
    ingest(writer, &ranges, reads, jobs)?;
    Ok(data_bytes)
}
