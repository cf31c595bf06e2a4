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

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
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
        let mut out = msg.to_vec();
        let tag = self.seal_in_place(nonce, &mut out, aad)?;
        out.extend_from_slice(&tag);
        Ok(out)
    }

    /// Seals `buf` in place under `nonce` (fresh and random for every message); returns
    /// the tag.
    pub(crate) fn seal_in_place(
        &self,
        nonce: &[u8; NONCE],
        buf: &mut [u8],
        aad: &[u8],
    ) -> Result<[u8; TAG]> {
        let cipher =
            self.cipher.as_ref().ok_or_else(|| Error::Invalid("sealing without a key".into()))?;
        cipher
            .encrypt_in_place_detached(XNonce::from_slice(nonce), aad, buf)
            .map(Into::into)
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
        if ct.len() < TAG {
            return Err(corrupt(object, "too short to be sealed"));
        }
        let (body, tag) = ct.split_at(ct.len() - TAG);
        let mut out = body.to_vec();
        self.open_in_place(object, nonce, &mut out, tag, aad)?;
        Ok(out)
    }

    /// Opens in place what [`seal_in_place`](Sealer::seal_in_place) sealed, or says that
    /// `object` does not authenticate.
    pub(crate) fn open_in_place(
        &self,
        object: &str,
        nonce: &[u8],
        buf: &mut [u8],
        tag: &[u8],
        aad: &[u8],
    ) -> Result<()> {
        let cipher = self
            .cipher
            .as_ref()
            .ok_or_else(|| Error::Invalid(format!("{object}: sealed, and no key")))?;
        if nonce.len() != NONCE || tag.len() != TAG {
            return Err(corrupt(object, "bad nonce or tag length"));
        }
        cipher
            .decrypt_in_place_detached(XNonce::from_slice(nonce), aad, buf, tag.into())
            .map_err(|_| corrupt(object, "does not authenticate under the repository's key"))
    }
}

/// What reading a chunk checks besides its header and lengths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameCheck {
    /// That the bytes have the name they are stored under, always (what `verify` does).
    Always,
    /// In an encrypted repository the seal alone: it covers the name, so bytes that
    /// authenticate were sealed under that name by a holder of the key, and hashing them
    /// again proves nothing more. Unencrypted, the name is the only check and is made.
    UnlessSealed,
}

thread_local! {
    /// Each thread's zstd contexts: making one costs more than compressing a small chunk.
    static ZSTD: std::cell::RefCell<Option<(zstd::bulk::Compressor<'static>, i32)>> =
        const { std::cell::RefCell::new(None) };
    static UNZSTD: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Compresses `data` at `level` into `out` (replacing what it held) when that makes it
/// smaller; `false` leaves `out` empty.
fn compress(data: &[u8], level: i32, out: &mut Vec<u8>) -> bool {
    ZSTD.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.as_ref().is_none_or(|(_, l)| *l != level) {
            *cell = zstd::bulk::Compressor::new(level).ok().map(|c| (c, level));
        }
        let Some((compressor, _)) = cell.as_mut() else { return false };
        out.clear();
        // Room for one byte less than the input: output that would not be smaller fails.
        out.reserve(data.len());
        match compressor.compress_to_buffer(data, out) {
            Ok(n) if n < data.len() => true,
            _ => {
                out.clear();
                false
            }
        }
    })
}

/// Bytes sampled per spot by [`looks_compressible`], and the spots.
const SAMPLE: usize = 8 << 10;
const SAMPLES: usize = 4;

/// Whether compressing `data` is worth trying: a few spots spread over it are compressed
/// first, and when they shrink by less than 3 % the chunk (random data, or already
/// compressed) is stored as it is, which saves compressing it whole for nothing.
fn looks_compressible(data: &[u8], level: i32, scratch: &mut Vec<u8>) -> bool {
    if data.len() < SAMPLE * SAMPLES * 4 {
        return true;
    }
    let step = (data.len() - SAMPLE) / (SAMPLES - 1);
    let mut sampled = 0;
    let mut packed = 0;
    for k in 0..SAMPLES {
        let spot = &data[k * step..k * step + SAMPLE];
        sampled += SAMPLE;
        packed += if compress(spot, level, scratch) { scratch.len() } else { SAMPLE };
    }
    packed * 100 < sampled * 97
}

/// Makes in `object` (replacing what it held) the object of the (non-zero) chunk `data`,
/// whose name `id` (its [`chunk_id`]) the caller computed: compressed with zstd at
/// `level` when that makes it smaller, then sealed when the repository is encrypted.
/// `scratch` is a buffer for the compressed bytes; both are reused by callers that
/// encode many chunks.
pub(crate) fn encode_into(
    id: ChunkId,
    data: &[u8],
    sealer: &Sealer,
    level: i32,
    object: &mut Vec<u8>,
    scratch: &mut Vec<u8>,
) -> Result<()> {
    if data.len() as u64 > MAX_CHUNK_SIZE {
        return Err(Error::Invalid(format!("a chunk of {} bytes is too large", data.len())));
    }
    let compressed = looks_compressible(data, level, scratch) && compress(data, level, scratch);
    let (compression, payload): (u8, &[u8]) = if compressed { (1, scratch) } else { (0, data) };
    let sealed = sealer.sealed();
    let payload_len = payload.len() + if sealed { TAG } else { 0 };
    object.clear();
    object.reserve(HEADER + NONCE + payload_len);
    object.extend_from_slice(MAGIC);
    object.extend_from_slice(&[VERSION, compression, u8::from(sealed), 0]);
    object.extend_from_slice(&(data.len() as u32).to_le_bytes());
    object.extend_from_slice(&(payload_len as u32).to_le_bytes());
    if sealed {
        // The associated data is the header with the nonce, and the name.
        let mut nonce = [0u8; NONCE];
        random(&mut nonce)?;
        object.extend_from_slice(&nonce);
        let mut aad = [0u8; HEADER + NONCE + 32];
        aad[..HEADER + NONCE].copy_from_slice(object);
        aad[HEADER + NONCE..].copy_from_slice(&id.0);
        let start = object.len();
        object.extend_from_slice(payload);
        let tag = sealer.seal_in_place(&nonce, &mut object[start..], &aad)?;
        object.extend_from_slice(&tag);
    } else {
        object.extend_from_slice(payload);
    }
    Ok(())
}

/// A chunk ready to store.
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct EncodedChunk {
    /// Its name.
    pub id: ChunkId,
    /// The object's bytes.
    pub object: Vec<u8>,
}

/// Makes the object of a (non-zero) chunk, naming it first (see [`encode_into`]).
#[cfg(test)]
pub(crate) fn encode(data: &[u8], sealer: &Sealer, level: i32) -> Result<EncodedChunk> {
    let id = chunk_id(data, sealer.keys());
    let mut object = Vec::new();
    encode_into(id, data, sealer, level, &mut object, &mut Vec::new())?;
    Ok(EncodedChunk { id, object })
}

/// The bytes of chunk `id` from its object, after checking it (header, seal, length
/// `want_len` when given, and the name as `check` says). The object's buffer is reused
/// for the bytes when they are stored uncompressed.
pub(crate) fn decode(
    id: ChunkId,
    mut object: Vec<u8>,
    sealer: &Sealer,
    want_len: Option<u64>,
    check: NameCheck,
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
    if object.len() != start + payload_len || (sealed && payload_len < TAG) {
        return Err(corrupt(
            &key,
            format!("{} bytes, the header says {}", object.len(), start + payload_len),
        ));
    }
    let mut end = object.len();
    if sealed {
        let mut aad = [0u8; HEADER + NONCE + 32];
        aad[..start].copy_from_slice(&object[..start]);
        aad[start..].copy_from_slice(&id.0);
        let mut nonce = [0u8; NONCE];
        nonce.copy_from_slice(&object[HEADER..start]);
        end -= TAG;
        let (body, tag) = object[start..].split_at_mut(end - start);
        sealer.open_in_place(&key, &nonce, body, tag, &aad)?;
    }
    let data = if compression == 1 {
        let mut d = Vec::with_capacity(len as usize);
        let n = UNZSTD
            .with(|cell| {
                let mut cell = cell.borrow_mut();
                if cell.is_none() {
                    *cell = Some(zstd::bulk::Decompressor::new()?);
                }
                match cell.as_mut() {
                    Some(decompressor) => {
                        decompressor.decompress_to_buffer(&object[start..end], &mut d)
                    }
                    None => unreachable!(),
                }
            })
            .map_err(|e| corrupt(&key, format!("does not decompress: {e}")))?;
        if n as u64 != len {
            return Err(corrupt(&key, format!("decompresses to {n} bytes, the header says {len}")));
        }
        d
    } else {
        if (end - start) as u64 != len {
            return Err(corrupt(&key, "payload and header lengths differ"));
        }
        object.truncate(end);
        object.drain(..start);
        object
    };
    let name_checked = check == NameCheck::Always || !sealed;
    if name_checked && chunk_id(&data, sealer.keys()) != id {
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
                    decode(
                        c.id,
                        c.object.clone(),
                        &sealer,
                        Some(data.len() as u64),
                        NameCheck::Always
                    )
                    .unwrap(),
                    data
                );
            }
        }
    }

    #[test]
    fn incompressible_chunks_are_stored_as_they_are() {
        let sealer = Sealer::new(None);
        let mut random_bytes = vec![0u8; 1 << 20];
        random(&mut random_bytes).unwrap();
        let mut half = random_bytes.clone();
        half[..512 << 10].fill(0);
        for (data, compressed) in [(&random_bytes, false), (&half, true)] {
            let c = encode(data, &sealer, 3).unwrap();
            assert_eq!(c.object[5], u8::from(compressed));
            let back = decode(c.id, c.object, &sealer, None, NameCheck::Always).unwrap();
            assert_eq!(&back, data);
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
                for check in [NameCheck::Always, NameCheck::UnlessSealed] {
                    assert!(
                        decode(c.id, bad.clone(), &sealer, None, check).is_err(),
                        "byte {i} flipped went unseen"
                    );
                }
            }
            assert!(
                decode(
                    c.id,
                    c.object[..c.object.len() - 1].to_vec(),
                    &sealer,
                    None,
                    NameCheck::Always
                )
                .is_err()
            );
            let other = ChunkId([1; 32]);
            for check in [NameCheck::Always, NameCheck::UnlessSealed] {
                assert!(decode(other, c.object.clone(), &sealer, None, check).is_err());
            }
            assert!(
                decode(
                    c.id,
                    c.object.clone(),
                    &sealer,
                    Some(data.len() as u64 + 1),
                    NameCheck::Always
                )
                .is_err()
            );
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
