//! Chunk names and the chunk object format.
//!
//! A chunk is named by the SHA-256 of its bytes, or in an encrypted repository by their
//! HMAC-SHA-256 under the naming key; an all-zero chunk is never stored and has the
//! all-zero name [`ChunkId::ZERO`]. The object (`chunks/NN/NAME`, `NN` the name's first
//! byte) is a 16-byte header, a nonce when sealed, then the payload:
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | magic `BDCK` |
//! | 4 | version, 1 |
//! | 5 | compression: 0 none, 1 zstd |
//! | 6 | sealing: 0 none, 1 XChaCha20-Poly1305 |
//! | 7 | 0 |
//! | 8..12 | length of the chunk's bytes (u32, little-endian) |
//! | 12..16 | length of the payload (u32, little-endian) |
//! | 16..40 | nonce (sealed only) |
//! | then | payload: the bytes, compressed or not; sealed: ciphertext and 16-byte tag, with the header, nonce and name as associated data |
//!
//! Reading a chunk checks everything: header, lengths, the seal, and that the bytes have
//! the name they are stored under.

use std::fmt;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use sha2::{Digest, Sha256};

use crate::error::corrupt;
use crate::key::{Keys, hex, random};
use crate::{Error, Result};

/// Largest chunk size a repository can have.
pub const MAX_CHUNK_SIZE: u64 = 64 << 20;
/// Smallest chunk size a repository can have.
pub const MIN_CHUNK_SIZE: u64 = 64 << 10;

const MAGIC: &[u8; 4] = b"BDCK";
const VERSION: u8 = 1;
const HEADER: usize = 16;
const NONCE: usize = 24;
const TAG: usize = 16;

/// A chunk's name.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// The name of an all-zero chunk, which is not stored.
    pub const ZERO: ChunkId = ChunkId([0; 32]);

    /// Whether this is [`ChunkId::ZERO`].
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 32]
    }

    /// The chunk's object key: `chunks/NN/NAME`.
    pub fn key(&self) -> String {
        let h = hex(&self.0);
        format!("chunks/{}/{h}", &h[..2])
    }

    /// The name a key gives, if it is a chunk key.
    pub fn from_key(key: &str) -> Option<ChunkId> {
        let rest = key.strip_prefix("chunks/")?;
        let (shard, name) = rest.split_once('/')?;
        let bytes: [u8; 32] = crate::key::unhex(name)?.try_into().ok()?;
        let id = ChunkId(bytes);
        (shard == &name[..2] && !id.is_zero()).then_some(id)
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", &hex(&self.0)[..16])
    }
}

/// Whether every byte of `data` is zero.
pub fn is_zero(data: &[u8]) -> bool {
    let (head, body, tail) = {
        // SAFETY: every bit pattern is a valid u128, and align_to only reinterprets the
        // correctly aligned middle part of the slice.
        unsafe { data.align_to::<u128>() }
    };
    head.iter().all(|&b| b == 0) && body.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// The name of a chunk holding `data` (zero for all-zero data).
pub fn chunk_id(data: &[u8], keys: Option<&Keys>) -> ChunkId {
    if is_zero(data) {
        return ChunkId::ZERO;
    }
    match keys {
        Some(k) => ChunkId(k.chunk_name(data)),
        None => ChunkId(Sha256::digest(data).into()),
    }
}

/// How chunks and indexes are sealed (encrypted and authenticated), if at all.
#[derive(Clone)]
pub(crate) struct Sealer {
    keys: Option<Keys>,
    cipher: Option<XChaCha20Poly1305>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer").field("keys", &self.keys).finish()
    }
}

impl Sealer {
    pub(crate) fn new(keys: Option<Keys>) -> Sealer {
        let cipher = keys.as_ref().map(|k| XChaCha20Poly1305::new((&k.seal_key()).into()));
        Sealer { keys, cipher }
    }

    pub(crate) fn keys(&self) -> Option<&Keys> {
        self.keys.as_ref()
    }

    pub(crate) fn sealed(&self) -> bool {
        self.cipher.is_some()
    }

    /// Seals `msg` under `nonce` (fresh and random for every message).
    pub(crate) fn seal_with_nonce(
        &self,
        nonce: &[u8; NONCE],
        msg: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>> {
        let cipher =
            self.cipher.as_ref().ok_or_else(|| Error::Invalid("sealing without a key".into()))?;
        cipher
            .encrypt(XNonce::from_slice(nonce), Payload { msg, aad })
            .map_err(|_| Error::Invalid("sealing failed".into()))
    }

    /// Opens what [`seal_with_nonce`](Sealer::seal_with_nonce) made, or says that `object` does not
    /// authenticate.
    pub(crate) fn open(
        &self,
        object: &str,
        nonce: &[u8],
        ct: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>> {
        let cipher = self
            .cipher
            .as_ref()
            .ok_or_else(|| Error::Invalid(format!("{object}: sealed, and no key")))?;
        cipher
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad })
            .map_err(|_| corrupt(object, "does not authenticate under the repository's key"))
    }
}

/// A chunk ready to store.
#[derive(Debug)]
pub struct EncodedChunk {
    /// Its name.
    pub id: ChunkId,
    /// The object's bytes.
    pub object: Vec<u8>,
}

/// Makes the object of a (non-zero) chunk, naming it first (see [`encode_named`]).
#[cfg(test)]
pub(crate) fn encode(data: &[u8], sealer: &Sealer, level: i32) -> Result<EncodedChunk> {
    encode_named(chunk_id(data, sealer.keys()), data, sealer, level)
}

/// Makes the object of the (non-zero) chunk `data`, whose name `id` (its [`chunk_id`])
/// the caller computed: compressed with zstd at `level` when that makes it smaller, then
/// sealed when the repository is encrypted.
pub(crate) fn encode_named(
    id: ChunkId,
    data: &[u8],
    sealer: &Sealer,
    level: i32,
) -> Result<EncodedChunk> {
    if data.len() as u64 > MAX_CHUNK_SIZE {
        return Err(Error::Invalid(format!("a chunk of {} bytes is too large", data.len())));
    }
    let compressed = zstd::bulk::compress(data, level).ok().filter(|c| c.len() < data.len());
    let (compression, payload): (u8, &[u8]) = match &compressed {
        Some(c) => (1, c),
        None => (0, data),
    };
    let sealed = sealer.sealed();
    let payload_len = payload.len() + if sealed { TAG } else { 0 };
    let mut object = Vec::with_capacity(HEADER + NONCE + payload_len);
    object.extend_from_slice(MAGIC);
    object.extend_from_slice(&[VERSION, compression, u8::from(sealed), 0]);
    object.extend_from_slice(&(data.len() as u32).to_le_bytes());
    object.extend_from_slice(&(payload_len as u32).to_le_bytes());
    if sealed {
        // The nonce is chosen by seal(); the header it is bound to includes it, so the
        // associated data is built once the nonce is known: header, nonce, name.
        let mut nonce = [0u8; NONCE];
        random(&mut nonce)?;
        object.extend_from_slice(&nonce);
        let mut aad = object.clone();
        aad.extend_from_slice(&id.0);
        let ct = sealer.seal_with_nonce(&nonce, payload, &aad)?;
        object.extend_from_slice(&ct);
    } else {
        object.extend_from_slice(payload);
    }
    Ok(EncodedChunk { id, object })
}

/// The bytes of chunk `id` from its object, after checking everything (header, seal,
/// length `want_len` when given, and that the bytes have the name `id`).
pub(crate) fn decode(
    id: ChunkId,
    object: &[u8],
    sealer: &Sealer,
    want_len: Option<u64>,
) -> Result<Vec<u8>> {
    let key = id.key();
    if object.len() < HEADER || &object[..4] != MAGIC {
        return Err(corrupt(&key, "not a chunk object"));
    }
    if object[4] != VERSION {
        return Err(corrupt(&key, format!("chunk version {} is not supported", object[4])));
    }
    let (compression, sealing) = (object[5], object[6]);
    let len = u32::from_le_bytes([object[8], object[9], object[10], object[11]]) as u64;
    let payload_len = u32::from_le_bytes([object[12], object[13], object[14], object[15]]) as usize;
    if compression > 1 || sealing > 1 || object[7] != 0 || len == 0 || len > MAX_CHUNK_SIZE {
        return Err(corrupt(&key, "bad chunk header"));
    }
    if let Some(want) = want_len
        && want != len
    {
        return Err(corrupt(&key, format!("holds {len} bytes where {want} are expected")));
    }
    let sealed = sealing == 1;
    if sealed != sealer.sealed() {
        return Err(corrupt(
            &key,
            if sealed {
                "sealed, in a repository without encryption"
            } else {
                "not sealed, in an encrypted repository"
            },
        ));
    }
    let start = HEADER + if sealed { NONCE } else { 0 };
    if object.len() != start + payload_len {
        return Err(corrupt(
            &key,
            format!("{} bytes, the header says {}", object.len(), start + payload_len),
        ));
    }
    let opened;
    let payload: &[u8] = if sealed {
        let mut aad = object[..start].to_vec();
        aad.extend_from_slice(&id.0);
        opened = sealer.open(&key, &object[HEADER..start], &object[start..], &aad)?;
        &opened
    } else {
        &object[start..]
    };
    let data = if compression == 1 {
        let d = zstd::bulk::decompress(payload, len as usize)
            .map_err(|e| corrupt(&key, format!("does not decompress: {e}")))?;
        if d.len() as u64 != len {
            return Err(corrupt(
                &key,
                format!("decompresses to {} bytes, the header says {len}", d.len()),
            ));
        }
        d
    } else {
        if payload.len() as u64 != len {
            return Err(corrupt(&key, "payload and header lengths differ"));
        }
        payload.to_vec()
    };
    if chunk_id(&data, sealer.keys()) != id {
        return Err(corrupt(&key, "its bytes do not have its name"));
    }
    Ok(data)
}

/// The largest object a chunk of `len` bytes can have.
pub(crate) fn max_object_len(len: u64) -> u64 {
    HEADER as u64 + NONCE as u64 + TAG as u64 + len
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealers() -> Vec<Sealer> {
        vec![Sealer::new(None), Sealer::new(Some(Keys::generate().unwrap()))]
    }

    #[test]
    fn chunks_round_trip_compressed_or_not() {
        let mut random_bytes = vec![0u8; 100_000];
        random(&mut random_bytes).unwrap();
        let text = b"blockdelta ".repeat(10_000);
        for sealer in sealers() {
            for data in [&random_bytes[..], &text[..], &[7u8][..]] {
                let c = encode(data, &sealer, 1).unwrap();
                assert_eq!(c.id, chunk_id(data, sealer.keys()));
                assert!(c.object.len() as u64 <= max_object_len(data.len() as u64));
                assert_eq!(
                    decode(c.id, &c.object, &sealer, Some(data.len() as u64)).unwrap(),
                    data
                );
            }
        }
    }

    #[test]
    fn every_damage_is_found() {
        let data = b"some chunk bytes ".repeat(1000);
        for sealer in sealers() {
            let c = encode(&data, &sealer, 1).unwrap();
            for i in 0..c.object.len() {
                let mut bad = c.object.clone();
                bad[i] ^= 0x40;
                assert!(decode(c.id, &bad, &sealer, None).is_err(), "byte {i} flipped went unseen");
            }
            assert!(decode(c.id, &c.object[..c.object.len() - 1], &sealer, None).is_err());
            let other = ChunkId([1; 32]);
            assert!(decode(other, &c.object, &sealer, None).is_err());
            assert!(decode(c.id, &c.object, &sealer, Some(data.len() as u64 + 1)).is_err());
        }
    }

    #[test]
    fn keyed_names_hide_the_hash() {
        let k = Keys::generate().unwrap();
        let plain = chunk_id(b"x", None);
        assert_ne!(chunk_id(b"x", Some(&k)), plain);
        assert_eq!(chunk_id(&[0; 4096], Some(&k)), ChunkId::ZERO);
    }

    #[test]
    fn keys_round_trip() {
        let id = chunk_id(b"abc", None);
        assert_eq!(ChunkId::from_key(&id.key()), Some(id));
        assert_eq!(ChunkId::from_key("chunks/00/00"), None);
        assert_eq!(ChunkId::from_key(&ChunkId::ZERO.key()), None);
    }
}
