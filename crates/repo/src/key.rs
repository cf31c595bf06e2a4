//! Key files and the keys derived from them.
//!
//! A key file holds one random 32-byte master key, in the clear or wrapped under a
//! passphrase (Argon2id, then XChaCha20-Poly1305). From the master key come, by
//! HMAC-SHA-256 over fixed labels: the key that seals chunks and indexes, the key that
//! names chunks (so that names do not reveal the plaintext's hash), the key that names
//! disks, and the fingerprint that a repository's config records so that a wrong key
//! is told apart from damage. The key file's format is in `docs/REPOSITORY.md`.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::{Error, Result};

/// The `format` field of a key file.
pub const KEY_FORMAT: &str = "blockdelta-key";
/// The key file version written.
pub const KEY_VERSION: u32 = 1;
/// Largest key file read.
const MAX_KEY_FILE: u64 = 64 << 10;

/// Argon2id parameters of a passphrase-protected key file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct KdfParams {
    /// Memory in KiB.
    pub memory_kib: u32,
    /// Passes.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

impl Default for KdfParams {
    /// 64 MiB, 3 passes, 1 lane: a few tenths of a second here.
    fn default() -> Self {
        KdfParams { memory_kib: 64 << 10, iterations: 3, parallelism: 1 }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct KeyFileJson {
    format: String,
    version: u32,
    created: String,
    /// Argon2id parameters when the key is wrapped under a passphrase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kdf: Option<KdfParams>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    salt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nonce: Option<String>,
    /// The master key (hex), or its sealed form when wrapped.
    key: String,
}

/// The keys of an encrypted repository.
#[derive(Clone)]
pub struct Keys {
    master: [u8; 32],
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keys {{ fingerprint: {} }}", self.fingerprint())
    }
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length: new_from_slice cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

impl Keys {
    /// New random keys.
    pub fn generate() -> Result<Keys> {
        let mut master = [0u8; 32];
        random(&mut master)?;
        Ok(Keys { master })
    }

    fn derive(&self, label: &str) -> [u8; 32] {
        hmac(&self.master, &[b"blockdelta/v1/", label.as_bytes()])
    }

    /// The key that seals chunks and indexes.
    pub(crate) fn seal_key(&self) -> [u8; 32] {
        self.derive("seal")
    }

    /// The name of a chunk with these bytes: HMAC-SHA-256 under the naming key.
    pub(crate) fn chunk_name(&self, data: &[u8]) -> [u8; 32] {
        hmac(&self.derive("chunk-name"), &[data])
    }

    /// The directory name of a disk: 32 hex digits of a keyed hash of its name, so that
    /// an encrypted repository does not show its disks' names.
    pub(crate) fn disk_dir(&self, disk: &str) -> String {
        hex(&hmac(&self.derive("disk-name"), &[disk.as_bytes()])[..16])
    }

    /// What a repository records to tell its key from another: hex of a keyed hash of a
    /// fixed label (it reveals nothing of the key).
    pub fn fingerprint(&self) -> String {
        hex(&self.derive("fingerprint"))
    }

    /// Writes a new key file at `path` (which must not exist), mode 0600, wrapped under
    /// `passphrase` when one is given.
    pub fn write_key_file(
        &self,
        path: &Path,
        passphrase: Option<&str>,
        kdf: KdfParams,
    ) -> Result<()> {
        let text = path.display().to_string();
        let json = match passphrase {
            None => KeyFileJson {
                format: KEY_FORMAT.into(),
                version: KEY_VERSION,
                created: crate::time::now().to_string(),
                kdf: None,
                salt: None,
                nonce: None,
                key: hex(&self.master),
            },
            Some(pass) => {
                let mut salt = [0u8; 16];
                let mut nonce = [0u8; 24];
                random(&mut salt)?;
                random(&mut nonce)?;
                let wrap = wrapping_key(pass, &salt, kdf, &text)?;
                let sealed = XChaCha20Poly1305::new((&wrap).into())
                    .encrypt(
                        XNonce::from_slice(&nonce),
                        Payload { msg: &self.master, aad: KEY_FORMAT.as_bytes() },
                    )
                    .map_err(|_| key_err(&text, "sealing the key failed"))?;
                KeyFileJson {
                    format: KEY_FORMAT.into(),
                    version: KEY_VERSION,
                    created: crate::time::now().to_string(),
                    kdf: Some(kdf),
                    salt: Some(hex(&salt)),
                    nonce: Some(hex(&nonce)),
                    key: hex(&sealed),
                }
            }
        };
        let mut body =
            serde_json::to_string_pretty(&json).map_err(|e| key_err(&text, e.to_string()))?;
        body.push('\n');
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| key_err(&text, format!("creating the key file: {e}")))?;
        f.write_all(body.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| key_err(&text, format!("writing the key file: {e}")))?;
        Ok(())
    }

    /// Reads the key file at `path`. `passphrase` is asked for only when the file is
    /// wrapped; `None` from it is an error saying that a passphrase is needed.
    pub fn read_key_file(path: &Path, passphrase: impl FnOnce() -> Option<String>) -> Result<Keys> {
        let text = path.display().to_string();
        let meta = std::fs::metadata(path)
            .map_err(|e| key_err(&text, format!("reading the key file: {e}")))?;
        if meta.len() > MAX_KEY_FILE {
            return Err(key_err(&text, "not a blockdelta key file (too large)"));
        }
        let body = std::fs::read(path)
            .map_err(|e| key_err(&text, format!("reading the key file: {e}")))?;
        let json: KeyFileJson = serde_json::from_slice(&body)
            .map_err(|e| key_err(&text, format!("not a blockdelta key file: {e}")))?;
        if json.format != KEY_FORMAT {
            return Err(key_err(&text, "not a blockdelta key file"));
        }
        if json.version != KEY_VERSION {
            return Err(key_err(
                &text,
                format!("key file version {} is not supported", json.version),
            ));
        }
        let key = unhex(&json.key).ok_or_else(|| key_err(&text, "the key is not hexadecimal"))?;
        let master: Vec<u8> = match (json.kdf, json.salt, json.nonce) {
            (None, None, None) => key,
            (Some(kdf), Some(salt), Some(nonce)) => {
                let salt =
                    unhex(&salt).ok_or_else(|| key_err(&text, "the salt is not hexadecimal"))?;
                let nonce = unhex(&nonce)
                    .filter(|n| n.len() == 24)
                    .ok_or_else(|| key_err(&text, "the nonce is not 24 hexadecimal bytes"))?;
                if kdf.memory_kib > 4 << 20 || kdf.iterations > 1000 || kdf.parallelism > 64 {
                    return Err(key_err(&text, "the key derivation parameters are out of range"));
                }
                let pass = passphrase().ok_or_else(|| {
                    key_err(
                        &text,
                        "the key file is protected by a passphrase: set BLOCKDELTA_PASSPHRASE (or run \
                         the command on a terminal, which asks for it)",
                    )
                })?;
                let wrap = wrapping_key(&pass, &salt, kdf, &text)?;
                XChaCha20Poly1305::new((&wrap).into())
                    .decrypt(
                        XNonce::from_slice(&nonce),
                        Payload { msg: &key, aad: KEY_FORMAT.as_bytes() },
                    )
                    .map_err(|_| key_err(&text, "wrong passphrase (or a damaged key file)"))?
            }
            _ => return Err(key_err(&text, "kdf, salt and nonce must be given together")),
        };
        let master: [u8; 32] =
            master.try_into().map_err(|_| key_err(&text, "the key is not 32 bytes"))?;
        Ok(Keys { master })
    }
}

fn wrapping_key(pass: &str, salt: &[u8], kdf: KdfParams, path: &str) -> Result<[u8; 32]> {
    let params = argon2::Params::new(kdf.memory_kib, kdf.iterations, kdf.parallelism, Some(32))
        .map_err(|e| key_err(path, format!("key derivation parameters: {e}")))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = [0u8; 32];
    argon
        .hash_password_into(pass.as_bytes(), salt, &mut out)
        .map_err(|e| key_err(path, format!("key derivation: {e}")))?;
    Ok(out)
}

fn key_err(path: &str, reason: impl Into<String>) -> Error {
    Error::KeyFile { path: path.to_owned(), reason: reason.into() }
}

/// Fills `buf` from the operating system's random source.
pub(crate) fn random(buf: &mut [u8]) -> Result<()> {
    getrandom::fill(buf).map_err(|e| Error::Io {
        object: "the system's random source".into(),
        action: "reading",
        error: std::io::Error::other(e.to_string()),
    })
}

/// Lower-case hexadecimal.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// The bytes of hexadecimal text, or `None`.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|d| u8::from_str_radix(d, 16).ok()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick() -> KdfParams {
        KdfParams { memory_kib: 64, iterations: 1, parallelism: 1 }
    }

    #[test]
    fn a_key_file_reads_back_with_and_without_passphrase() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Keys::generate().unwrap();
        let plain = dir.path().join("plain.key");
        keys.write_key_file(&plain, None, quick()).unwrap();
        let back = Keys::read_key_file(&plain, || panic!("no passphrase needed")).unwrap();
        assert_eq!(back.fingerprint(), keys.fingerprint());

        let wrapped = dir.path().join("wrapped.key");
        keys.write_key_file(&wrapped, Some("secret"), quick()).unwrap();
        let text = std::fs::read_to_string(&wrapped).unwrap();
        assert!(!text.contains(&hex(&keys.master)), "the wrapped file shows the key");
        let back = Keys::read_key_file(&wrapped, || Some("secret".into())).unwrap();
        assert_eq!(back.fingerprint(), keys.fingerprint());
        let wrong = Keys::read_key_file(&wrapped, || Some("guess".into())).unwrap_err();
        assert!(wrong.to_string().contains("wrong passphrase"), "{wrong}");
        let none = Keys::read_key_file(&wrapped, || None).unwrap_err();
        assert!(none.to_string().contains("BLOCKDELTA_PASSPHRASE"), "{none}");
        // An existing file is never replaced.
        assert!(keys.write_key_file(&wrapped, None, quick()).is_err());
    }

    #[test]
    fn damaged_key_files_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        for (i, body) in ["", "{}", "[1]", r#"{"format":"x","version":1,"created":"","key":"00"}"#]
            .iter()
            .enumerate()
        {
            let p = dir.path().join(format!("k{i}"));
            std::fs::write(&p, body).unwrap();
            let e = Keys::read_key_file(&p, || None).unwrap_err();
            assert!(matches!(e, Error::KeyFile { .. }), "{e}");
        }
    }

    #[test]
    fn derived_keys_differ() {
        let k = Keys::generate().unwrap();
        let set =
            [k.seal_key(), k.derive("chunk-name"), k.derive("disk-name"), k.derive("fingerprint")];
        for i in 0..set.len() {
            for j in i + 1..set.len() {
                assert_ne!(set[i], set[j]);
            }
        }
        assert_ne!(k.chunk_name(b"a"), k.chunk_name(b"b"));
        assert_ne!(Keys::generate().unwrap().chunk_name(b"a"), k.chunk_name(b"a"));
    }
}
