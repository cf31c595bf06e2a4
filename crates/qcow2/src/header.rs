//! The qcow2 header (v2 and v3), its extensions and the feature name table.
//!
//! Parsing keeps everything needed to rewrite the header byte for byte: the fields
//! past the known ones (`extra_fields`) and every extension, recognised or not, in
//! on-disk order with its data unchanged ([`HeaderExtension`]).

use crate::error::{FeatureKind, Qcow2Error, Result};

/// The qcow2 magic, `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Length of a version 2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Minimum length of a version 3 header.
pub const V3_MIN_HEADER_LEN: u32 = 104;
/// Smallest cluster_bits accepted (512-byte clusters).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster_bits accepted (2 MiB clusters, as QEMU).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Largest active L1 table, in bytes (QEMU's limit).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table, in bytes (QEMU's limit).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Longest backing file name.
pub const MAX_BACKING_NAME_LEN: u32 = 1023;
/// Most internal snapshots (QEMU's limit).
pub const MAX_SNAPSHOTS: u32 = 65536;

/// Header extension type: end of the extension area.
pub const EXT_END: u32 = 0;
/// Header extension type: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension type: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Header extension type: bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension type: full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// Header extension type: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Incompatible feature bit 0: dirty (lazy refcounts in use).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: non-default compression type.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 4: extended L2 entries.
pub const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
/// Compatible feature bit 0: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear feature bit 0: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear feature bit 1: the external data file is raw.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// Compression type 0: deflate (raw, no zlib header).
pub const COMPRESSION_DEFLATE: u8 = 0;
/// Compression type 1: zstd.
pub const COMPRESSION_ZSTD: u8 = 1;

/// One header extension as stored: its type and its data (without the padding).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderExtension {
    /// The extension type.
    pub ext_type: u32,
    /// The data, `length` bytes, without the padding to a multiple of 8.
    pub data: Vec<u8>,
}

/// One entry of the feature name table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// Which bitmap the bit is in; `None` for a type byte other than 0, 1, 2.
    pub kind: Option<FeatureKind>,
    /// The type byte as stored.
    pub raw_kind: u8,
    /// Bit number (0..=63 when valid).
    pub bit: u8,
    /// The name, up to 46 bytes, cut at the first NUL.
    pub name: String,
}

/// The parsed qcow2 header, with its extensions kept as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Version: 2 or 3.
    pub version: u32,
    /// Offset of the backing file name in the file, 0 for none.
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (0 for v2).
    pub incompatible_features: u64,
    /// Compatible feature bits (0 for v2).
    pub compatible_features: u64,
    /// Autoclear feature bits (0 for v2).
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits (4 for v2).
    pub refcount_order: u32,
    /// Header length: 72 for v2, at least 104 for v3.
    pub header_length: u32,
    /// Compression type (byte 104, when present): 0 deflate, 1 zstd.
    pub compression_type: u8,
    /// The header bytes from 105 to `header_length` (padding and fields unknown
    /// here), kept as stored. Empty for v2 and for 104-byte headers.
    pub extra_fields: Vec<u8>,
    /// Every header extension, in on-disk order, with its data as stored.
    pub extensions: Vec<HeaderExtension>,
    /// The backing file name as stored (not NUL-terminated), if any.
    pub backing_file: Option<Vec<u8>>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn invalid(field: &'static str, value: u64, reason: &'static str) -> Qcow2Error {
    Qcow2Error::InvalidHeader { field, value, reason }
}

impl Header {
    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// The data of the first extension of type `ext_type`.
    pub fn extension(&self, ext_type: u32) -> Option<&[u8]> {
        self.extensions.iter().find(|e| e.ext_type == ext_type).map(|e| e.data.as_slice())
    }

    /// The backing file format name (extension 0xe2792aca), if present.
    pub fn backing_format(&self) -> Option<&str> {
        self.extension(EXT_BACKING_FORMAT).and_then(|d| std::str::from_utf8(d).ok())
    }

    /// The external data file name (extension 0x44415441), if present.
    pub fn external_data_file(&self) -> Option<&[u8]> {
        self.extension(EXT_DATA_FILE)
    }

    /// The raw bitmaps extension data (0x23852875), if present.
    pub fn bitmaps_extension(&self) -> Option<&[u8]> {
        self.extension(EXT_BITMAPS)
    }

    /// The feature name table (extension 0x6803f857); empty when absent.
    pub fn feature_names(&self) -> Vec<FeatureName> {
        let Some(data) = self.extension(EXT_FEATURE_TABLE) else {
            return Vec::new();
        };
        data.chunks_exact(48)
            .map(|e| {
                let raw = &e[2..48];
                let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
                FeatureName {
                    kind: match e[0] {
                        0 => Some(FeatureKind::Incompatible),
                        1 => Some(FeatureKind::Compatible),
                        2 => Some(FeatureKind::Autoclear),
                        _ => None,
                    },
                    raw_kind: e[0],
                    bit: e[1],
                    name: String::from_utf8_lossy(&raw[..end]).into_owned(),
                }
            })
            .collect()
    }

    /// The name of feature `bit` of `kind`: from the feature name table when it has
    /// one, otherwise the specification's name or "unknown … bit N".
    pub fn feature_name(&self, kind: FeatureKind, bit: u8) -> String {
        if let Some(f) =
            self.feature_names().into_iter().find(|f| f.kind == Some(kind) && f.bit == bit)
            && !f.name.is_empty()
        {
            return f.name;
        }
        let known = match (kind, bit) {
            (FeatureKind::Incompatible, 0) => "dirty bit",
            (FeatureKind::Incompatible, 1) => "corrupt bit",
            (FeatureKind::Incompatible, 2) => "external data file",
            (FeatureKind::Incompatible, 3) => "compression type",
            (FeatureKind::Incompatible, 4) => "extended L2 entries",
            (FeatureKind::Compatible, 0) => "lazy refcounts",
            (FeatureKind::Autoclear, 0) => "bitmaps",
            (FeatureKind::Autoclear, 1) => "raw external data",
            _ => return format!("unknown {kind} feature bit {bit}"),
        };
        known.to_owned()
    }

    /// Where the header extensions end: the backing file name, or the end of the
    /// first cluster.
    fn extensions_end(&self) -> u64 {
        if self.backing_file_offset != 0 {
            self.backing_file_offset.min(self.cluster_size())
        } else {
            self.cluster_size()
        }
    }

    /// Parses the fixed part of the header from its first bytes (`bytes` holds at least
    /// 72 bytes for v2, 104 for v3). Extensions and the backing name are not read.
    pub fn parse_fixed(bytes: &[u8], file_len: u64) -> Result<Header> {
        if bytes.len() < V2_HEADER_LEN as usize {
            return Err(Qcow2Error::Truncated { needed: V2_HEADER_LEN.into(), len: file_len });
        }
        let magic = be32(bytes, 0);
        if magic != MAGIC {
            return Err(Qcow2Error::BadMagic { found: magic });
        }
        let version = be32(bytes, 4);
        if version != 2 && version != 3 {
            return Err(Qcow2Error::UnsupportedVersion { version });
        }
        if version == 3 && bytes.len() < V3_MIN_HEADER_LEN as usize {
            return Err(Qcow2Error::Truncated { needed: V3_MIN_HEADER_LEN.into(), len: file_len });
        }
        let cluster_bits = be32(bytes, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(invalid(
                "cluster_bits",
                cluster_bits.into(),
                "must be between 9 (512 B) and 21 (2 MiB)",
            ));
        }
        let mut h = Header {
            version,
            backing_file_offset: be64(bytes, 8),
            backing_file_size: be32(bytes, 16),
            cluster_bits,
            size: be64(bytes, 24),
            crypt_method: be32(bytes, 32),
            l1_size: be32(bytes, 36),
            l1_table_offset: be64(bytes, 40),
            refcount_table_offset: be64(bytes, 48),
            refcount_table_clusters: be32(bytes, 56),
            nb_snapshots: be32(bytes, 60),
            snapshots_offset: be64(bytes, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: COMPRESSION_DEFLATE,
            extra_fields: Vec::new(),
            extensions: Vec::new(),
            backing_file: None,
        };
        if version == 3 {
            h.incompatible_features = be64(bytes, 72);
            h.compatible_features = be64(bytes, 80);
            h.autoclear_features = be64(bytes, 88);
            h.refcount_order = be32(bytes, 96);
            h.header_length = be32(bytes, 100);
            if h.refcount_order > 6 {
                return Err(invalid(
                    "refcount_order",
                    h.refcount_order.into(),
                    "must not exceed 6 (64-bit refcounts)",
                ));
            }
            if h.header_length < V3_MIN_HEADER_LEN {
                return Err(invalid(
                    "header_length",
                    h.header_length.into(),
                    "must be at least 104 for version 3",
                ));
            }
            if !h.header_length.is_multiple_of(8) {
                return Err(invalid(
                    "header_length",
                    h.header_length.into(),
                    "must be a multiple of 8",
                ));
            }
            if u64::from(h.header_length) > h.cluster_size() {
                return Err(invalid(
                    "header_length",
                    h.header_length.into(),
                    "is larger than the first cluster",
                ));
            }
        }
        Ok(h)
    }

    /// Parses the whole header from the first cluster of the image (`cluster0` holds
    /// the first `cluster_size` bytes, zero-filled past the end of the file).
    ///
    /// Checks the fixed fields that don't depend on the rest of the file and reads the
    /// extensions. The backing file name is read by the caller (it may lie past the
    /// first cluster).
    pub fn parse(cluster0: &[u8], file_len: u64) -> Result<Header> {
        let mut h = Header::parse_fixed(cluster0, file_len)?;
        if (cluster0.len() as u64) < h.cluster_size() {
            return Err(Qcow2Error::Truncated { needed: h.cluster_size(), len: file_len });
        }
        if file_len < u64::from(h.header_length) {
            return Err(Qcow2Error::Truncated { needed: h.header_length.into(), len: file_len });
        }
        let hl = h.header_length as usize;
        if h.version == 3 && hl > 104 {
            h.compression_type = cluster0[104];
            h.extra_fields = cluster0[105..hl].to_vec();
        }
        if h.backing_file_offset != 0 {
            if h.backing_file_offset > h.cluster_size() {
                return Err(invalid(
                    "backing_file_offset",
                    h.backing_file_offset,
                    "is past the first cluster",
                ));
            }
            if h.backing_file_offset < u64::from(h.header_length) {
                return Err(invalid(
                    "backing_file_offset",
                    h.backing_file_offset,
                    "overlaps the header fields",
                ));
            }
            if h.backing_file_size > MAX_BACKING_NAME_LEN {
                return Err(invalid(
                    "backing_file_size",
                    h.backing_file_size.into(),
                    "backing file name longer than 1023 bytes",
                ));
            }
            if h.backing_file_size == 0 {
                return Err(invalid("backing_file_size", 0, "empty backing file name"));
            }
        }
        h.extensions = parse_extensions(cluster0, u64::from(h.header_length), h.extensions_end())?;
        Ok(h)
    }
}

/// Reads the extensions from `start` up to `end` (both within `cluster0`).
fn parse_extensions(cluster0: &[u8], start: u64, end: u64) -> Result<Vec<HeaderExtension>> {
    let mut out = Vec::new();
    let end = end.min(cluster0.len() as u64);
    let mut at = start;
    while at + 8 <= end {
        let i = at as usize;
        let ext_type = be32(cluster0, i);
        let len = u64::from(be32(cluster0, i + 4));
        if ext_type == EXT_END {
            break;
        }
        if len > end - at - 8 {
            return Err(Qcow2Error::InvalidExtension {
                ext_type,
                offset: at,
                reason: "its length overflows the header extension area",
            });
        }
        let data = cluster0[i + 8..i + 8 + len as usize].to_vec();
        check_extension(ext_type, &data, at)?;
        out.push(HeaderExtension { ext_type, data });
        at += 8 + len.div_ceil(8) * 8;
    }
    Ok(out)
}

/// Checks the extensions this crate interprets.
fn check_extension(ext_type: u32, data: &[u8], offset: u64) -> Result<()> {
    let err = |reason| Err(Qcow2Error::InvalidExtension { ext_type, offset, reason });
    match ext_type {
        EXT_BACKING_FORMAT => {
            if data.is_empty() || data.len() > 1023 {
                return err("backing format name must have 1 to 1023 bytes");
            }
            if std::str::from_utf8(data).is_err() {
                return err("backing format name is not UTF-8");
            }
        }
        EXT_DATA_FILE if data.len() > 1023 => {
            return err("external data file name longer than 1023 bytes");
        }
        _ => {}
    }
    Ok(())
}
