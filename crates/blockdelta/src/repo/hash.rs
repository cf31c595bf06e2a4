//! The checksums of a disk image: SHA-256 per 64 KiB block ("leaf"), and per 64 MiB
//! range the SHA-256 of its leaves' SHA-256s in order (a hash list).
//!
//! Why a hash list rather than SHA-256 of the range's bytes: an incremental backup
//! knows only the blocks that changed. With the parent's leaf hashes (its `.sums` file)
//! it recomputes a range's checksum by hashing the blocks it copied, instead of
//! reading the whole disk back. The last leaf and range of a disk may be short.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::OnceLock;

use qcow2::{BackingImage, BlockState};
use sha2::{Digest, Sha256};

use super::{Progress, RepoError, Result, io_err};

/// Bytes per leaf.
pub const LEAF: u64 = 64 << 10;
/// Bytes per range.
pub const RANGE: u64 = 64 << 20;
/// Leaves per range.
pub const LEAVES_PER_RANGE: u64 = RANGE / LEAF;
/// A leaf hash.
pub type Digest32 = [u8; 32];

/// Number of leaves of a disk of `size` bytes.
pub fn leaf_count(size: u64) -> u64 {
    size.div_ceil(LEAF)
}

/// Number of ranges of a disk of `size` bytes.
pub fn range_count(size: u64) -> u64 {
    size.div_ceil(RANGE)
}

/// Length of the `.sums` file of a disk of `size` bytes.
pub fn sums_len(size: u64) -> u64 {
    leaf_count(size) * 32
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> Digest32 {
    Sha256::digest(data).into()
}

/// The hash of a leaf of `len` zero bytes (cached for whole leaves).
pub fn zero_leaf(len: u64) -> Digest32 {
    static FULL: OnceLock<Digest32> = OnceLock::new();
    if len == LEAF {
        *FULL.get_or_init(|| sha256(&vec![0u8; LEAF as usize]))
    } else {
        sha256(&vec![0u8; len.min(LEAF) as usize])
    }
}

/// The length of leaf `i` of a disk of `size` bytes.
pub fn leaf_len(size: u64, i: u64) -> u64 {
    LEAF.min(size.saturating_sub(i * LEAF))
}

/// The checksum of a range from its leaf hashes.
pub fn range_hash(leaves: &[Digest32]) -> Digest32 {
    let mut h = Sha256::new();
    for l in leaves {
        h.update(l);
    }
    h.finalize().into()
}

/// The leaf hashes of an all-zero range `r` of a disk of `size` bytes.
pub fn zero_range_leaves(size: u64, r: u64) -> Vec<Digest32> {
    let first = r * LEAVES_PER_RANGE;
    let last = (first + LEAVES_PER_RANGE).min(leaf_count(size));
    (first..last).map(|i| zero_leaf(leaf_len(size, i))).collect()
}

/// Lower-case hex.
pub fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether a buffer is all zeroes (word at a time).
pub fn is_zero(buf: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: any 8 initialized bytes are a valid u64; align_to only splits.
        unsafe { buf.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Reads the leaf hashes of range `r` from a `.sums` file.
pub fn read_range_leaves(sums: &File, path: &Path, size: u64, r: u64) -> Result<Vec<Digest32>> {
    let first = r * LEAVES_PER_RANGE;
    let n = (leaf_count(size) - first).min(LEAVES_PER_RANGE) as usize;
    let mut buf = vec![0u8; n * 32];
    sums.read_exact_at(&mut buf, first * 32).map_err(io_err(path, "reading block checksums"))?;
    Ok(buf.chunks_exact(32).map(|c| c.try_into().unwrap_or([0; 32])).collect())
}

/// Bytes read per call while hashing an image.
const WINDOW: u64 = 4 << 20;

/// Reads range `r` of `image` (with its backing chain) and returns its leaf hashes,
/// skipping reads of areas that are zero or unallocated. `on_data(offset, data)` gets
/// every window that holds data (for restore), `progress` the bytes covered.
pub fn hash_image_range(
    image: &dyn BackingImage,
    path: &Path,
    r: u64,
    progress: &dyn Progress,
    mut on_data: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<Vec<Digest32>> {
    let size = image.len();
    let start = r * RANGE;
    let end = (start + RANGE).min(size);
    let mut leaves = Vec::with_capacity(LEAVES_PER_RANGE as usize);
    let mut buf = vec![0u8; WINDOW as usize];
    let img_err =
        |e: qcow2::Qcow2Error| RepoError::Image { path: path.to_path_buf(), reason: e.to_string() };
    let mut pos = start;
    while pos < end {
        let wend = (pos + WINDOW).min(end);
        // Is the whole window zero? Then no read.
        let mut all_zero = true;
        let mut p = pos;
        while p < wend {
            let st = image.block_status(p, wend - p).map_err(img_err)?;
            if st.state == BlockState::Data {
                all_zero = false;
                break;
            }
            p += st.len.max(1);
        }
        let n = (wend - pos) as usize;
        if all_zero {
            let mut i = pos / LEAF;
            while i * LEAF < wend {
                leaves.push(zero_leaf(leaf_len(size, i)));
                i += 1;
            }
        } else {
            let data = &mut buf[..n];
            image.read_at(data, pos).map_err(img_err)?;
            for chunk in data.chunks(LEAF as usize) {
                leaves.push(sha256(chunk));
            }
            on_data(pos, data)?;
        }
        progress.advance(wend - pos);
        pos = wend;
    }
    Ok(leaves)
}
