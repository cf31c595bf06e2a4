//! A block node served over NBD: every write goes through the node (so its write hook
//! marks the node's dirty bitmaps), and the exported bitmaps are read as
//! `qemu:dirty-bitmap:NAME` contexts.

use std::io;
use std::sync::Arc;

use nbd::export::{BlockSize, BoxFuture, Export, ExportError, ExportResult, Extent, ZeroFlags};
use nbd::proto;

use crate::block::dirty_bitmap::BitmapId;
use crate::block::node::{self, Node};

/// The `qemu:allocation-depth` context's name.
pub const CONTEXT_ALLOCATION_DEPTH: &str = "qemu:allocation-depth";
/// The prefix of dirty-bitmap contexts.
pub const CONTEXT_DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

/// Most extents computed for one block-status request and context (QEMU's
/// `NBD_MAX_BLOCK_STATUS_EXTENTS`); the client asks again for the rest.
const MAX_EXTENTS: usize = 128 * 1024;
/// Extents computed per hold of a bitmap's lock, so that writers are not held up long.
const EXTENTS_PER_LOCK: usize = 4096;

/// An exported dirty bitmap: where it lives and its handle there. It is busy for as long
/// as the export exists.
#[derive(Debug)]
pub struct ExportedBitmap {
    /// The context name, `qemu:dirty-bitmap:NAME`.
    pub context: String,
    /// The node holding the bitmap (the exported node or one of its backing nodes).
    pub holder: Arc<Node>,
    /// The bitmap.
    pub id: BitmapId,
}

/// What a [`NodeExport`] offers besides the node.
#[derive(Debug, Clone, Default)]
pub struct NodeExportConfig {
    /// Whether clients may write.
    pub writable: bool,
    /// Flush after every write.
    pub writethrough: bool,
    /// `NBD_INFO_DESCRIPTION`.
    pub description: String,
    /// Offer `qemu:allocation-depth`.
    pub allocation_depth: bool,
    /// Advertise `NBD_FLAG_CAN_MULTI_CONN` (QEMU: unless `max-connections=1`).
    pub multi_conn: bool,
}

/// A block node as an NBD export.
#[derive(Debug)]
pub struct NodeExport {
    node: Arc<Node>,
    size: u64,
    config: NodeExportConfig,
    bitmaps: Vec<ExportedBitmap>,
}

impl NodeExport {
    /// Exports `node`; `bitmaps` must already be marked busy by the caller, and are
    /// released when the export is dropped (after its last connection ends).
    pub fn new(node: Arc<Node>, config: NodeExportConfig, bitmaps: Vec<ExportedBitmap>) -> Self {
        let size = node.len();
        NodeExport { node, size, config, bitmaps }
    }

    /// The exported node.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// The exported bitmaps.
    pub fn bitmaps(&self) -> &[ExportedBitmap] {
        &self.bitmaps
    }
}

impl Drop for NodeExport {
    fn drop(&mut self) {
        for b in &self.bitmaps {
            // The bitmap cannot have gone: busy bitmaps cannot be removed.
            let _ = b.holder.bitmaps().set_busy(b.id, false);
        }
    }
}

fn export_error(e: io::Error) -> ExportError {
    ExportError::Io(e)
}

impl Export for NodeExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        !self.config.writable
    }

    fn description(&self) -> String {
        self.config.description.clone()
    }

    fn block_size(&self) -> BlockSize {
        BlockSize { minimum: 1, preferred: 4096, maximum: proto::MAX_PAYLOAD }
    }

    fn can_trim(&self) -> bool {
        self.config.writable
    }

    fn can_write_zeroes(&self) -> bool {
        self.config.writable
    }

    fn can_fast_zero(&self) -> bool {
        self.config.writable
    }

    fn can_cache(&self) -> bool {
        true
    }

    fn can_multi_conn(&self) -> bool {
        // All connections share the node: a flush on one covers writes made on any.
        self.config.multi_conn
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> BoxFuture<'a, ExportResult<()>> {
        Box::pin(async move {
            // Cached data is read right here: handing a page-cache copy to a blocking
            // thread costs more than the copy.
            if self.node.try_read_nowait(buf, offset).map_err(export_error)? {
                return Ok(());
            }
            let data = self.node.read(offset, buf.len()).await.map_err(export_error)?;
            buf.copy_from_slice(&data);
            Ok(())
        })
    }

    fn write<'a>(
        &'a self,
        offset: u64,
        data: &'a [u8],
        fua: bool,
    ) -> BoxFuture<'a, ExportResult<()>> {
        Box::pin(async move {
            let fua = fua || self.config.writethrough;
            self.node.write(data.to_vec(), offset, fua).await.map_err(export_error)
        })
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> BoxFuture<'_, ExportResult<()>> {
        Box::pin(async move {
            let fua = flags.fua || self.config.writethrough;
            // Zeroing is never slower than writing zeroes here (the qcow2 driver marks
            // clusters zero, files use fallocate), so FAST_ZERO is always honoured.
            let zero = node::ZeroFlags { may_unmap: flags.may_trim, fua };
            self.node.write_zeroes(offset, len, zero).await.map_err(export_error)
        })
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> BoxFuture<'_, ExportResult<()>> {
        Box::pin(async move {
            self.node.discard(offset, len).await.map_err(export_error)?;
            if fua || self.config.writethrough {
                self.node.flush().await.map_err(export_error)?;
            }
            Ok(())
        })
    }

    fn flush(&self) -> BoxFuture<'_, ExportResult<()>> {
        Box::pin(async move { self.node.flush().await.map_err(export_error) })
    }

    fn cache(&self, _offset: u64, _len: u64) -> BoxFuture<'_, ExportResult<()>> {
        // Reads go through the host page cache, which the kernel prefetches itself.
        Box::pin(async { Ok(()) })
    }

    fn meta_contexts(&self) -> Vec<String> {
        let mut contexts = Vec::with_capacity(self.bitmaps.len() + 1);
        if self.config.allocation_depth {
            contexts.push(CONTEXT_ALLOCATION_DEPTH.to_string());
        }
        contexts.extend(self.bitmaps.iter().map(|b| b.context.clone()));
        contexts
    }

    fn block_status<'a>(
        &'a self,
        context: &'a str,
        offset: u64,
        len: u64,
        req_one: bool,
    ) -> BoxFuture<'a, ExportResult<Vec<Extent>>> {
        Box::pin(async move {
            let max = if req_one { 1 } else { MAX_EXTENTS };
            if let Some(b) = self.bitmaps.iter().find(|b| b.context == context) {
                return Ok(dirty_extents(b, offset, len, max));
            }
            let depth = match context {
                proto::CONTEXT_BASE_ALLOCATION => false,
                CONTEXT_ALLOCATION_DEPTH if self.config.allocation_depth => true,
                _ => return Err(ExportError::Invalid),
            };
            let node = self.node.clone();
            tokio::task::spawn_blocking(move || allocation_extents(&node, offset, len, max, depth))
                .await
                .map_err(|e| ExportError::Io(io::Error::other(e.to_string())))?
                .map_err(export_error)
        })
    }
}

/// `base:allocation` (or, with `depth`, `qemu:allocation-depth`) extents from the
/// node's block status.
fn allocation_extents(
    node: &Node,
    offset: u64,
    len: u64,
    max: usize,
    depth: bool,
) -> io::Result<Vec<Extent>> {
    let end = offset + len;
    let mut out: Vec<Extent> = Vec::new();
    let mut pos = offset;
    while pos < end {
        let s = node.block_status_blocking(pos, end - pos)?;
        let flags = if depth {
            s.depth
        } else {
            (if s.data { 0 } else { proto::STATE_HOLE })
                | if s.zero { proto::STATE_ZERO } else { 0 }
        };
        let n = s.len.clamp(1, end - pos);
        let full = out.len() >= max;
        match out.last_mut() {
            Some(last) if last.flags == u64::from(flags) => last.length += n,
            _ if full => break,
            _ => out.push(Extent { length: n, flags: u64::from(flags) }),
        }
        pos += n;
    }
    Ok(out)
}

/// A bitmap's clean and dirty runs over `[offset, offset + len)`, clipped to the range
/// (not aligned to the granularity), at most `max` of them. Each run costs a search of
/// the bitmap's summary levels, so the time follows the number of runs, not the length.
fn dirty_extents(b: &ExportedBitmap, offset: u64, len: u64, max: usize) -> Vec<Extent> {
    let end = offset + len;
    let mut out: Vec<Extent> = Vec::new();
    let mut pos = offset;
    while pos < end && out.len() < max {
        let before = out.len();
        let step = b.holder.bitmaps().with_bits(b.id, |bits| {
            let limit = end.min(bits.size());
            let mut n = 0;
            while pos < limit && n < EXTENTS_PER_LOCK && out.len() < max {
                let dirty = bits.get(pos);
                let next =
                    if dirty { bits.next_clean(pos, limit) } else { bits.next_dirty(pos, limit) };
                let run_end = next.unwrap_or(limit);
                out.push(Extent {
                    length: run_end - pos,
                    flags: if dirty { u64::from(proto::STATE_DIRTY) } else { 0 },
                });
                pos = run_end;
                n += 1;
            }
            limit
        });
        match step {
            Ok(limit) if pos >= limit && pos < end => {
                // Past the bitmap's end (a shorter backing node): clean.
                out.push(Extent { length: end - pos, flags: 0 });
                pos = end;
            }
            Ok(_) => {}
            Err(_) => break,
        }
        if out.len() == before {
            break;
        }
    }
    out
}
