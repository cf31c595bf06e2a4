//! The error type of the crate.

use std::fmt;
use std::io;

/// The three feature bitmaps of a qcow2 v3 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FeatureKind {
    /// `incompatible_features` (header bytes 72..80).
    Incompatible,
    /// `compatible_features` (header bytes 80..88).
    Compatible,
    /// `autoclear_features` (header bytes 88..96).
    Autoclear,
}

impl fmt::Display for FeatureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FeatureKind::Incompatible => "incompatible",
            FeatureKind::Compatible => "compatible",
            FeatureKind::Autoclear => "autoclear",
        })
    }
}

/// An error opening or reading a qcow2 image.
///
/// Every variant names what it concerns: the header field, the metadata structure and
/// its offset in the image file, or the guest range.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Qcow2Error {
    /// The underlying storage failed.
    #[error("I/O error {context} at offset {offset:#x}: {source}")]
    Io {
        /// What was being done (e.g. "reading the L1 table").
        context: &'static str,
        /// The offset in the image file (or backing image) concerned.
        offset: u64,
        /// The error of the storage.
        #[source]
        source: io::Error,
    },

    /// The file is shorter than its header.
    #[error("truncated image: the header needs {needed} bytes, the file has {len}")]
    Truncated {
        /// Bytes the header needs.
        needed: u64,
        /// Length of the file.
        len: u64,
    },

    /// The file does not start with the qcow2 magic.
    #[error("not a qcow2 image (magic {found:#010x})")]
    BadMagic {
        /// The first four bytes, big-endian.
        found: u32,
    },

    /// The header's version is neither 2 nor 3.
    #[error("unsupported qcow2 version {version}")]
    UnsupportedVersion {
        /// The version field.
        version: u32,
    },

    /// A header field has an invalid value.
    #[error("invalid qcow2 header field `{field}` = {value:#x}: {reason}")]
    InvalidHeader {
        /// The name of the field, as in the specification.
        field: &'static str,
        /// Its value.
        value: u64,
        /// Why it is refused.
        reason: &'static str,
    },

    /// A header extension is malformed.
    #[error("invalid header extension {ext_type:#010x} at offset {offset:#x}: {reason}")]
    InvalidExtension {
        /// The extension's type.
        ext_type: u32,
        /// The offset of the extension in the file.
        offset: u64,
        /// Why it is refused.
        reason: &'static str,
    },

    /// The image uses a feature this implementation does not support (yet).
    #[error("unsupported qcow2 feature: {name} ({kind} bit {bit})")]
    UnsupportedFeature {
        /// The feature's name: from the image's feature name table when present.
        name: String,
        /// The bitmap the bit is in.
        kind: FeatureKind,
        /// The bit number.
        bit: u8,
    },

    /// Encryption (the `crypt_method` field) is not supported.
    #[error("unsupported qcow2 feature: encryption (crypt_method {method}: {name})")]
    Encrypted {
        /// The `crypt_method` field.
        method: u32,
        /// Its name ("aes", "luks" or "unknown").
        name: &'static str,
    },

    /// The compression type is not supported.
    #[error("unsupported qcow2 compression type {name} ({value})")]
    UnsupportedCompression {
        /// The `compression_type` field.
        value: u8,
        /// Its name ("zstd" or "unknown").
        name: &'static str,
    },

    /// The dirty bit is set: refcounts may be wrong and must be rebuilt first.
    #[error(
        "the image's dirty bit is set (lazy refcounts were in use): it needs refcount repair \
         before it can be opened (e.g. `qemu-img check -r all`)"
    )]
    NeedsRefcountRepair,

    /// The corrupt bit is set and a writable open was requested.
    #[error("the image is marked corrupt and cannot be opened for writing")]
    MarkedCorrupt,

    /// Image metadata (a table or table entry) is invalid.
    #[error("corrupt qcow2 {structure} at offset {offset:#x}: {reason}")]
    Corrupt {
        /// The structure: "L1 table", "L2 entry", "refcount table", …
        structure: &'static str,
        /// The offset in the image file of the structure or entry concerned.
        offset: u64,
        /// Why it is invalid.
        reason: &'static str,
    },

    /// A compressed cluster could not be decompressed.
    #[error("cannot decompress the cluster at host offset {offset:#x}: {reason}")]
    Decompress {
        /// Host offset of the compressed data.
        offset: u64,
        /// What went wrong.
        reason: &'static str,
    },

    /// A guest access reaches past the virtual size.
    #[error("access at {offset:#x}+{len:#x} is past the virtual size {size:#x}")]
    OutOfRange {
        /// Guest offset.
        offset: u64,
        /// Length of the access.
        len: u64,
        /// The virtual size.
        size: u64,
    },

    /// The backing chain could not be opened.
    #[error("cannot open backing file {path:?}: {reason}")]
    Backing {
        /// The backing file name (as resolved).
        path: String,
        /// Why.
        reason: String,
        /// The error opening the backing image, if it came from this crate.
        #[source]
        source: Option<Box<Qcow2Error>>,
    },

    /// The image is not writable (opened read-only).
    #[error("the image was opened read-only")]
    ReadOnly,

    /// The write path does not support this request.
    #[error("unsupported request: {0}")]
    UnsupportedRequest(&'static str),
}

impl Qcow2Error {
    /// A [`Qcow2Error::Io`] builder for `map_err`.
    pub(crate) fn io(context: &'static str, offset: u64) -> impl FnOnce(io::Error) -> Self {
        move |source| Qcow2Error::Io { context, offset, source }
    }

    /// A [`Qcow2Error::Corrupt`].
    pub(crate) fn corrupt(structure: &'static str, offset: u64, reason: &'static str) -> Self {
        Qcow2Error::Corrupt { structure, offset, reason }
    }
}

/// The result type of the crate.
pub type Result<T, E = Qcow2Error> = std::result::Result<T, E>;
