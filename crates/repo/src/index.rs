//! The index object: one backup, the disk at one instant as a list of chunk names.
//!
//! Object `backups/DISK/ID.idx` (`DISK` the disk's name, or in an encrypted repository a
//! keyed hash of it; `ID` the backup's number, four digits or more). Its metadata comes
//! first and stands alone, so that listing backups reads a few hundred bytes of each
//! index, not its chunk list:
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | magic `BDIX` |
//! | 4 | version, 1 |
//! | 5 | compression of the chunk list: 0 none, 1 zstd |
//! | 6 | sealing: 0 none, 1 XChaCha20-Poly1305 |
//! | 7 | 0 |
//! | 8..12 | M, the stored length of the metadata part (u32, little-endian, at most 1 MiB + 40) |
//! | 12..16 | 0 |
//! | 16..24 | length of the plaintext chunk list (u64 LE): 8 + 32 × entries |
//! | 24..32 | E, the stored length of the chunk-list part (u64 LE) |
//! | 32..32+M | metadata part |
//! | 32+M..32+M+E | chunk-list part; nothing follows |
//!
//! Metadata part: unsealed, the metadata JSON then the SHA-256 of the header and the
//! JSON; sealed, a 24-byte nonce then the JSON's ciphertext and tag, with the header,
//! the object's key and `meta` as associated data. The JSON is
//! `{"meta": IndexMeta, "entries-sha256": HEX}`.
//!
//! Chunk-list part: the plaintext is the entry count (u64 LE, which must be the disk's
//! size divided by the chunk size, rounded up) then one 32-byte chunk name per chunk of
//! the disk in order (all zero: a chunk that reads as zeroes); it is stored compressed
//! or not, and sealed like the metadata (associated data: header, key, `entries`). Its
//! SHA-256 is `entries-sha256`, which binds it to the metadata in both modes.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::chunk::{ChunkId, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, Sealer};
use crate::error::corrupt;
use crate::key::{hex, random};
use crate::{Error, Result};

const MAGIC: &[u8; 4] = b"BDIX";
const VERSION: u8 = 1;
/// Length of the fixed header.
pub(crate) const HEADER: usize = 32;
const NONCE: usize = 24;
const TAG: usize = 16;
const MAX_META: usize = 1 << 20;
/// The longest metadata part.
const MAX_META_PART: usize = MAX_META + NONCE + TAG + 32;
/// Most chunks one index can list (a 64 TiB disk has 16 Mi chunks of 4 MiB).
pub const MAX_ENTRIES: u64 = 1 << 26;

/// Full or incremental: how the backup was taken (its index is complete either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupKind {
    /// Every allocated block was read from the source.
    Full,
    /// Only the blocks dirty in a bitmap were read; the rest came from the parent.
    Incremental,
}

/// What an index records besides its chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct IndexMeta {
    /// The disk.
    pub disk: String,
    /// The backup's number.
    pub id: u64,
    /// Full or incremental.
    pub kind: BackupKind,
    /// When the backup's point in time was taken (RFC 3339, UTC).
    pub time: String,
    /// The same instant in seconds since the epoch.
    pub time_unix: i64,
    /// The disk's size in bytes.
    pub size: u64,
    /// Bytes per chunk.
    pub chunk_size: u64,
    /// The backup an incremental was built on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<u64>,
    /// The dirty bitmap read (incremental) or named to track the next one (full).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitmap: Option<String>,
    /// Where the disk was read from.
    pub source: String,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Bytes of the disk in chunks that this backup stored new (uncompressed).
    pub new_bytes: u64,
    /// Bytes of the objects this backup stored new (compressed, sealed).
    pub new_stored_bytes: u64,
    /// Chunks that were new.
    pub new_chunks: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct StoredMeta {
    meta: IndexMeta,
    entries_sha256: String,
}

/// One backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    /// What it records.
    pub meta: IndexMeta,
    /// One name per chunk of the disk.
    pub entries: Vec<ChunkId>,
}

/// The number of chunks of a disk of `size` bytes.
pub fn chunk_count(size: u64, chunk_size: u64) -> u64 {
    size.div_ceil(chunk_size)
}

/// The length of chunk `i` of a disk of `size` bytes (the last one may be short).
pub fn chunk_len(size: u64, chunk_size: u64, i: u64) -> u64 {
    (size - i * chunk_size).min(chunk_size)
}

/// Checks that a disk of `size` bytes can be cut into chunks of `chunk_size`.
pub fn check_geometry(size: u64, chunk_size: u64) -> Result<()> {
    if !chunk_size.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        return Err(Error::Invalid(format!(
            "chunk size {chunk_size}: a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE} bytes"
        )));
    }
    if chunk_count(size, chunk_size) > MAX_ENTRIES {
        return Err(Error::Invalid(format!(
            "a disk of {size} bytes has more than {MAX_ENTRIES} chunks of {chunk_size} bytes: use a \
             repository with larger chunks"
        )));
    }
    Ok(())
}

/// The largest index object there can be.
pub(crate) fn max_object_len() -> u64 {
    HEADER as u64 + MAX_META_PART as u64 + NONCE as u64 + TAG as u64 + 8 + 32 * MAX_ENTRIES + 64
}

/// What the fixed header says.
struct Header {
    compression: u8,
    sealed: bool,
    meta_part: usize,
    entries_plain: u64,
    entries_part: u64,
}

fn aad(header: &[u8], key: &str, part: &str) -> Vec<u8> {
    let mut aad = header.to_vec();
    aad.extend_from_slice(key.as_bytes());
    aad.extend_from_slice(part.as_bytes());
    aad
}

fn seal(
    sealer: &Sealer,
    header: &[u8],
    key: &str,
    part: &str,
    plain: &[u8],
    out: &mut Vec<u8>,
) -> Result<()> {
    let mut nonce = [0u8; NONCE];
    random(&mut nonce)?;
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealer.seal_with_nonce(&nonce, plain, &aad(header, key, part))?);
    Ok(())
}

fn parse_header(key: &str, object: &[u8], sealer: &Sealer) -> Result<Header> {
    if object.len() < HEADER || &object[..4] != MAGIC {
        return Err(corrupt(key, "not an index object"));
    }
    if object[4] != VERSION {
        return Err(corrupt(key, format!("index version {} is not supported", object[4])));
    }
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&object[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let meta_part = u32::from_le_bytes([object[8], object[9], object[10], object[11]]) as usize;
    let h = Header {
        compression: object[5],
        sealed: object[6] == 1,
        meta_part,
        entries_plain: u64_at(16),
        entries_part: u64_at(24),
    };
    if h.compression > 1
        || object[6] > 1
        || object[7] != 0
        || object[12..16] != [0; 4]
        || meta_part > MAX_META_PART
        || h.entries_plain > 8 + 32 * MAX_ENTRIES
        || h.entries_part > h.entries_plain + (NONCE + TAG) as u64 + 1024
    {
        return Err(corrupt(key, "bad index header"));
    }
    if h.sealed != sealer.sealed() {
        return Err(corrupt(
            key,
            if h.sealed {
                "sealed, in a repository without encryption"
            } else {
                "not sealed, in an encrypted repository"
            },
        ));
    }
    Ok(h)
}

impl Index {
    /// The object bytes of this index, stored under `key`.
    pub(crate) fn encode(&self, key: &str, sealer: &Sealer) -> Result<Vec<u8>> {
        let mut entries = Vec::with_capacity(8 + self.entries.len() * 32);
        entries.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for e in &self.entries {
            entries.extend_from_slice(&e.0);
        }
        let stored =
            StoredMeta { meta: self.meta.clone(), entries_sha256: hex(&Sha256::digest(&entries)) };
        let json = serde_json::to_vec(&stored).map_err(|e| Error::Invalid(e.to_string()))?;
        if json.len() > MAX_META {
            return Err(Error::Invalid(format!("{key}: the index's metadata is too long")));
        }
        let compressed = zstd::bulk::compress(&entries, 3).ok().filter(|c| c.len() < entries.len());
        let (compression, payload): (u8, &[u8]) = match &compressed {
            Some(c) => (1, c),
            None => (0, &entries),
        };
        let sealed = sealer.sealed();
        let overhead = if sealed { NONCE + TAG } else { 0 };
        let meta_part = json.len() + if sealed { NONCE + TAG } else { 32 };
        let entries_part = payload.len() + overhead;
        let mut object = Vec::with_capacity(HEADER + meta_part + entries_part);
        object.extend_from_slice(MAGIC);
        object.extend_from_slice(&[VERSION, compression, u8::from(sealed), 0]);
        object.extend_from_slice(&(meta_part as u32).to_le_bytes());
        object.extend_from_slice(&[0; 4]);
        object.extend_from_slice(&(entries.len() as u64).to_le_bytes());
        object.extend_from_slice(&(entries_part as u64).to_le_bytes());
        let header = object.clone();
        if sealed {
            seal(sealer, &header, key, "meta", &json, &mut object)?;
            seal(sealer, &header, key, "entries", payload, &mut object)?;
        } else {
            object.extend_from_slice(&json);
            let mut sum = Sha256::new();
            sum.update(&header);
            sum.update(&json);
            object.extend_from_slice(&sum.finalize());
            object.extend_from_slice(payload);
        }
        Ok(object)
    }

    /// How many leading bytes of the object [`decode_meta`](Index::decode_meta) needs,
    /// from its first [`HEADER`] bytes (`None` when they are not an index header).
    pub(crate) fn meta_prefix_len(object: &[u8]) -> Option<usize> {
        let n = u32::from_le_bytes(object.get(8..12)?.try_into().ok()?) as usize;
        (object.get(..4)? == MAGIC && n <= MAX_META_PART).then_some(HEADER + n)
    }

    /// The metadata, from the object's leading bytes (at least
    /// [`meta_prefix_len`](Index::meta_prefix_len) of them), and the chunk list's SHA-256.
    pub(crate) fn decode_meta(
        key: &str,
        prefix: &[u8],
        sealer: &Sealer,
    ) -> Result<(IndexMeta, String)> {
        let h = parse_header(key, prefix, sealer)?;
        let part = prefix
            .get(HEADER..HEADER + h.meta_part)
            .ok_or_else(|| corrupt(key, "shorter than its metadata"))?;
        let header = &prefix[..HEADER];
        let opened;
        let json: &[u8] = if h.sealed {
            if part.len() < NONCE + TAG {
                return Err(corrupt(key, "bad metadata length"));
            }
            opened = sealer.open(key, &part[..NONCE], &part[NONCE..], &aad(header, key, "meta"))?;
            &opened
        } else {
            let (json, sum) = part.split_at(
                part.len().checked_sub(32).ok_or_else(|| corrupt(key, "bad metadata length"))?,
            );
            let mut want = Sha256::new();
            want.update(header);
            want.update(json);
            if want.finalize().as_slice() != sum {
                return Err(corrupt(key, "metadata checksum mismatch"));
            }
            json
        };
        let stored: StoredMeta =
            serde_json::from_slice(json).map_err(|e| corrupt(key, format!("bad metadata: {e}")))?;
        let meta = stored.meta;
        check_geometry(meta.size, meta.chunk_size).map_err(|e| corrupt(key, e.to_string()))?;
        if h.entries_plain != 8 + 32 * chunk_count(meta.size, meta.chunk_size) {
            return Err(corrupt(
                key,
                format!(
                    "a chunk list of {} bytes for a disk of {} bytes",
                    h.entries_plain, meta.size
                ),
            ));
        }
        Ok((meta, stored.entries_sha256))
    }

    /// The whole index from its object bytes.
    pub(crate) fn decode(key: &str, object: &[u8], sealer: &Sealer) -> Result<Index> {
        let (meta, entries_sha256) = Index::decode_meta(key, object, sealer)?;
        let h = parse_header(key, object, sealer)?;
        let start = HEADER + h.meta_part;
        if object.len() as u64 != start as u64 + h.entries_part {
            return Err(corrupt(key, "its length differs from its header's"));
        }
        let part = &object[start..];
        let opened;
        let payload: &[u8] = if h.sealed {
            if part.len() < NONCE + TAG {
                return Err(corrupt(key, "bad chunk list length"));
            }
            opened = sealer.open(
                key,
                &part[..NONCE],
                &part[NONCE..],
                &aad(&object[..HEADER], key, "entries"),
            )?;
            &opened
        } else {
            part
        };
        let entries = if h.compression == 1 {
            zstd::bulk::decompress(payload, h.entries_plain as usize)
                .map_err(|e| corrupt(key, format!("the chunk list does not decompress: {e}")))?
        } else {
            payload.to_vec()
        };
        if entries.len() as u64 != h.entries_plain
            || hex(&Sha256::digest(&entries)) != entries_sha256
        {
            return Err(corrupt(key, "the chunk list does not match its checksum"));
        }
        let count = u64::from_le_bytes(entries[..8].try_into().unwrap_or([0; 8]));
        if count != chunk_count(meta.size, meta.chunk_size) {
            return Err(corrupt(key, format!("{count} chunks for a disk of {} bytes", meta.size)));
        }
        let entries = entries[8..]
            .chunks_exact(32)
            .map(|c| {
                let mut id = [0u8; 32];
                id.copy_from_slice(c);
                ChunkId(id)
            })
            .collect();
        Ok(Index { meta, entries })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::Keys;

    fn sample(size: u64, chunk: u64) -> Index {
        let n = chunk_count(size, chunk);
        Index {
            meta: IndexMeta {
                disk: "vm1".into(),
                id: 12345,
                kind: BackupKind::Incremental,
                time: "2026-12-04T00:00:00Z".into(),
                time_unix: 1_796_342_400,
                size,
                chunk_size: chunk,
                parent: Some(12344),
                bitmap: Some("b0".into()),
                source: "nbd+unix:///d0?socket=/s".into(),
                bytes_read: 1,
                new_bytes: 2,
                new_stored_bytes: 3,
                new_chunks: 4,
            },
            entries: (0..n)
                .map(|i| if i % 3 == 0 { ChunkId::ZERO } else { ChunkId([i as u8 | 1; 32]) })
                .collect(),
        }
    }

    #[test]
    fn indexes_round_trip_and_damage_is_found() {
        for sealer in [Sealer::new(None), Sealer::new(Some(Keys::generate().unwrap()))] {
            let idx = sample(10 << 20, 1 << 20);
            let key = "backups/vm1/12345.idx";
            let obj = idx.encode(key, &sealer).unwrap();
            assert_eq!(Index::decode(key, &obj, &sealer).unwrap(), idx);
            for i in 0..obj.len() {
                let mut bad = obj.clone();
                bad[i] ^= 1;
                assert!(Index::decode(key, &bad, &sealer).is_err(), "flip at {i} unseen");
            }
            let prefix = Index::meta_prefix_len(&obj).unwrap();
            let (meta, _) = Index::decode_meta(key, &obj[..prefix], &sealer).unwrap();
            assert_eq!(meta, idx.meta);
            assert!(prefix < 1024, "the metadata comes first and is short");
            if sealer.sealed() {
                // Moved to another name, it does not authenticate.
                assert!(Index::decode("backups/vm1/1.idx", &obj, &sealer).is_err());
            }
        }
    }

    #[test]
    fn a_64_tib_disk_index_loads() {
        let idx = sample(64 << 40, 4 << 20);
        assert_eq!(idx.entries.len(), 16 << 20);
        let sealer = Sealer::new(None);
        let obj = idx.encode("backups/big/1.idx", &sealer).unwrap();
        let back = Index::decode("backups/big/1.idx", &obj, &sealer).unwrap();
        assert_eq!(back.entries.len(), idx.entries.len());
        assert_eq!(back.entries[(16 << 20) - 1], idx.entries[(16 << 20) - 1]);
    }

    #[test]
    fn bad_geometry_is_refused() {
        assert!(check_geometry(1 << 30, 3 << 20).is_err());
        assert!(check_geometry(1 << 30, 4 << 10).is_err());
        assert!(check_geometry(1 << 60, 64 << 10).is_err());
        assert!(check_geometry(1 << 30, 4 << 20).is_ok());
    }
}
