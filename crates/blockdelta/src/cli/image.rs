//! Opening an image file as block nodes for the offline tools, with `qemu-img`'s texts
//! for what can go wrong.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use blockdelta::block::dirty_bitmap::NodeBitmaps;
use blockdelta::block::file::{FileDriver, FileLength};
use blockdelta::block::node::{BlockDriver, Node, NodeOptions};
use blockdelta::block::qcow2::{Backing, OpenMode, Qcow2Driver};
use blockdelta::block::raw::RawDriver;
use qcow2::header::MAGIC;
use qcow2::storage::{ConflictKind, FileOptions, FileStorage, LockConflict, Locking, Storage};

use super::Failure;

/// An image format the tools open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// qcow2.
    Qcow2,
    /// Raw (anything that is not qcow2, when probing).
    Raw,
}

impl Format {
    /// The format named on the command line (`-f`, `-F`).
    pub fn from_name(name: &str) -> Result<Format, Failure> {
        match name {
            "qcow2" => Ok(Format::Qcow2),
            "raw" => Ok(Format::Raw),
            _ => Err(Failure::new(format!("Unknown driver '{name}'"))),
        }
    }
}

use blockdelta::block::strerror;

/// Opens the file, or says why not as `qemu-img` does: `Could not open 'F': Could not
/// open 'F': No such file or directory`, or the lock conflict on two lines.
pub fn open_file(path: &str, writable: bool, force_share: bool) -> Result<FileStorage, Failure> {
    if force_share && writable {
        return Err(Failure::new(format!(
            "Could not open '{path}': force-share=on can only be used with read-only images"
        )));
    }
    let locking = if force_share { Locking::ForceShare } else { Locking::Auto };
    FileOptions::new().write(writable).locking(locking).open(Path::new(path)).map_err(|e| {
        Failure::new(match LockConflict::from_io(&e) {
            Some(conflict) => format!(
                "Could not open '{path}': Failed to get {}\"{}\" lock\nIs another process using \
                 the image [{path}]?",
                if conflict.kind == ConflictKind::Unshare { "shared " } else { "" },
                conflict.permission,
            ),
            None => format!("Could not open '{path}': Could not open '{path}': {}", strerror(&e)),
        })
    })
}

/// The format of an opened file: `format` if given (a qcow2 format on another file is
/// refused), else qcow2 when the file starts with its magic, else raw.
pub fn probe(storage: &dyn Storage, path: &str, format: Option<Format>) -> Result<Format, Failure> {
    let len = storage.len().map_err(|e| Failure::new(format!("Could not open '{path}': {e}")))?;
    let mut magic = [0u8; 4];
    let is_qcow2 =
        len >= 4 && storage.read_at(&mut magic, 0).is_ok() && u32::from_be_bytes(magic) == MAGIC;
    match format {
        Some(Format::Qcow2) if !is_qcow2 => {
            Err(Failure::new(format!("Could not open '{path}': Image is not in qcow2 format")))
        }
        Some(format) => Ok(format),
        None if is_qcow2 => Ok(Format::Qcow2),
        None => Ok(Format::Raw),
    }
}

/// Names for nodes, in the style of QEMU's generated names (`#block001`).
fn node_name() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    format!("#block{:03}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// An image opened as a format node over a file node, without its backing chain (as
/// `qemu-img bitmap` opens images): unallocated clusters read as zeroes, which is all a
/// bitmap operation needs.
pub struct OpenImage {
    /// The format node.
    pub node: Arc<Node>,
}

/// An image file opened (and locked) for reading, or for reading and writing, with its
/// format known, before any format node is opened over it. Its format node can be
/// opened more than once, e.g. first as a rehearsal that writes nothing, then for real,
/// while the file stays open and locked.
pub struct ImageFile {
    path: String,
    file: Arc<Node>,
    /// The format (given or probed).
    pub format: Format,
    writable: bool,
    /// The format node's name, the same for each opening.
    node_name: String,
}

/// Opens the file `path` read-write or read-only, and probes its format unless
/// `format` is given.
pub fn open_image_file(
    path: &str,
    format: Option<Format>,
    writable: bool,
) -> Result<ImageFile, Failure> {
    let storage = open_file(path, writable, false)?;
    let format = probe(&storage, path, format)?;
    let options = NodeOptions { read_only: !writable, ..NodeOptions::default() };
    let length = if writable { FileLength::Tracked } else { FileLength::Measured };
    let file_driver = FileDriver::new(Arc::new(storage), length)
        .map_err(|e| Failure::new(format!("Could not open '{path}': {}", strerror(&e))))?;
    let file = Node::new(&node_name(), Box::new(file_driver), options, Vec::new());
    Ok(ImageFile { path: path.to_string(), file, format, writable, node_name: node_name() })
}

impl ImageFile {
    fn could_not_open(&self, e: String) -> Failure {
        Failure::new(format!("Could not open '{}': {e}", self.path))
    }

    /// The format driver over the file, in `mode` (a raw driver ignores it).
    fn driver(&self, mode: OpenMode, warn: bool) -> Result<Box<dyn BlockDriver>, Failure> {
        let file = self.file.clone();
        Ok(match self.format {
            Format::Qcow2 => Box::new(
                Qcow2Driver::open_with(file, Backing::None, mode, warn)
                    .map_err(|e| self.could_not_open(e))?,
            ),
            Format::Raw => {
                Box::new(RawDriver::new(file, 0, None).map_err(|e| self.could_not_open(e))?)
            }
        })
    }

    /// Opens the format node: read-write if the file was opened so (its persistent
    /// bitmaps are then marked in use, and stored when the node closes), else read-only.
    /// `warn`: print the format's warnings (once per image is enough).
    pub fn open_node(&self, warn: bool) -> Result<Arc<Node>, Failure> {
        let mode = if self.writable { OpenMode::ReadWrite } else { OpenMode::ReadOnly };
        let driver = self.driver(mode, warn)?;
        let options = NodeOptions { read_only: !self.writable, ..NodeOptions::default() };
        let node = Node::open(&self.node_name, driver, options, vec![self.file.clone()])
            .map_err(|e| self.could_not_open(e))?;
        Ok(node)
    }

    /// The image's bitmaps as a read-write open loads them, in a manager of their own
    /// that accepts changes as the read-write node would (same checks, same texts) and
    /// never writes anything: to try operations before making them. Refused as a
    /// read-write open would be refused.
    pub fn rehearsal_bitmaps(&self) -> Result<Arc<NodeBitmaps>, Failure> {
        let driver = self.driver(OpenMode::Rehearsal, true)?;
        let bitmaps = NodeBitmaps::new(
            &self.node_name,
            driver.len(),
            driver.cluster_size(),
            driver.bitmap_persistence(),
        );
        for loaded in driver.take_loaded_bitmaps() {
            bitmaps.add_loaded(loaded, false).map_err(|e| {
                self.could_not_open(format!(
                    "Could not load the bitmaps of '{}': {e}",
                    self.node_name
                ))
            })?;
        }
        Ok(Arc::new(bitmaps))
    }
}

/// Opens `path` read-write or read-only, without backing, in `format` (probed when
/// `None`). Persistent bitmaps are loaded; a writable open marks them in use.
pub fn open_image(
    path: &str,
    format: Option<Format>,
    writable: bool,
) -> Result<OpenImage, Failure> {
    let file = open_image_file(path, format, writable)?;
    Ok(OpenImage { node: file.open_node(true)? })
}
