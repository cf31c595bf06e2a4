//! The manifest of a backup: a JSON file whose presence makes the backup exist.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::hash;
use super::{RepoError, Result, image_name, sums_name};

/// The manifest format version written.
pub const FORMAT: u32 = 1;

/// Largest manifest read (a 1 PiB disk has 16 Mi ranges; far below that in practice).
const MAX_MANIFEST_BYTES: u64 = 64 << 20;

/// Full or incremental.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupKind {
    /// Every allocated block was copied; no parent.
    Full,
    /// Only the blocks dirty in the bitmap were copied; the parent holds the rest.
    Incremental,
}

/// What a backup records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format version ([`FORMAT`]).
    pub format: u32,
    /// The backup's id (its file names' stem).
    pub id: String,
    /// The disk it belongs to.
    pub disk: String,
    /// Full or incremental.
    pub kind: BackupKind,
    /// When the backup started (RFC 3339, UTC).
    pub time: String,
    /// The same instant in seconds since the Unix epoch.
    pub time_unix: u64,
    /// Where it was read from (the NBD URI).
    pub source: String,
    /// The dirty bitmap read (incremental) or named to track the next one (full).
    pub bitmap: Option<String>,
    /// The previous backup of the chain (incremental only).
    pub parent: Option<String>,
    /// The disk's virtual size in bytes.
    pub virtual_size: u64,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Bytes of data written into the image (zero blocks are not counted).
    pub bytes_copied: u64,
    /// The image file name.
    pub image: String,
    /// The image file's length in bytes.
    pub image_bytes: u64,
    /// The block checksum file name.
    pub sums: String,
    /// SHA-256 of the block checksum file.
    pub sums_sha256: String,
    /// How `checksums` are computed.
    pub checksum_algorithm: String,
    /// Bytes per checksum range.
    pub checksum_range: u64,
    /// One checksum per range of the disk as it was at the backup's point in time.
    pub checksums: Vec<String>,
}

/// The algorithm name recorded in manifests.
pub const ALGORITHM: &str = "sha256 of the sha256s of 64 KiB blocks, per 64 MiB range";

/// Seconds since the epoch, and the RFC 3339 text of that instant.
pub fn now() -> (u64, String) {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    (secs, rfc3339(secs))
}

/// RFC 3339 text (UTC) of `secs` since the epoch.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil date from days since 1970-01-01 (the proleptic Gregorian calendar).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Manifest {
    /// Reads and checks the manifest at `path`, which must belong to `disk` and be
    /// backup `id`.
    pub fn load(path: &Path, disk: &str, id: &str) -> Result<Manifest> {
        let bad = |reason: String| RepoError::Manifest { path: path.to_path_buf(), reason };
        let len = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?.len();
        if len > MAX_MANIFEST_BYTES {
            return Err(bad(format!("{len} bytes is too large")));
        }
        let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let m: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        if m.format != FORMAT {
            return Err(bad(format!("unknown format version {}", m.format)));
        }
        if m.id != id {
            return Err(bad(format!("records id '{}' but is named '{id}'", m.id)));
        }
        if m.disk != disk {
            return Err(bad(format!("records disk '{}' but is in '{disk}'", m.disk)));
        }
        if m.image != image_name(id) || m.sums != sums_name(id) {
            return Err(bad("image or checksum file name does not match the id".into()));
        }
        match (m.kind, &m.parent) {
            (BackupKind::Full, None) => {}
            (BackupKind::Incremental, Some(p)) if super::valid_name(p) && p.as_str() < id => {}
            _ => return Err(bad("kind and parent do not match".into())),
        }
        if m.checksum_algorithm != ALGORITHM || m.checksum_range != hash::RANGE {
            return Err(bad("unknown checksum algorithm".into()));
        }
        if m.virtual_size > qcow2::create::MAX_VIRTUAL_SIZE {
            return Err(bad(format!("virtual size {} is too large", m.virtual_size)));
        }
        if m.checksums.len() as u64 != hash::range_count(m.virtual_size) {
            return Err(bad(format!(
                "{} checksums for {} ranges",
                m.checksums.len(),
                hash::range_count(m.virtual_size)
            )));
        }
        if !m.checksums.iter().all(|c| is_hex64(c)) || !is_hex64(&m.sums_sha256) {
            return Err(bad("a checksum is not 64 hex digits".into()));
        }
        Ok(m)
    }

    /// The JSON text written to disk.
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_798_761_599), "2026-12-31T23:59:59Z");
    }
}
