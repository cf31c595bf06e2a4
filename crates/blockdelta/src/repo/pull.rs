//! Pull-mode backups: read a disk and its dirty bitmap from any NBD server
//! (`blockdelta serve`, `qemu-storage-daemon`, `qemu-nbd -B`) into the chunk store.
//!
//! - A full backup walks `base:allocation` and reads the extents that are not known to
//!   read as zeroes; chunks with nothing else are zero (never stored).
//! - An incremental walks `qemu:dirty-bitmap:NAME` and reads only the dirty extents; each
//!   chunk they touch is completed from the previous backup's chunk
//!   ([`repo::assemble`]), every other chunk is the previous backup's.
//!
//! Point in time: the client reads the export as it is while the backup runs. For a
//! consistent backup the server must export a frozen view (a fleecing node, or a
//! quiesced disk) and the bitmap must be disabled (or frozen) for the duration: the
//! caller arranges that. The index records the bitmap and parent used.
//!
//! The disk is walked one window at a time (bounding the extent list), each window a
//! whole number of chunks; reads stay in flight on the NBD connection while completed
//! chunks are hashed, compressed and stored on other threads. Crash safety is the
//! store's: nothing exists until the index is committed (`docs/REPOSITORY.md`).

use std::time::{Duration, Instant, SystemTime};

use ::repo::assemble::ingest;
use ::repo::writer::{BackupPlan, Basis};
use ::repo::{Backup, Progress, Repository, Timestamp};
use nbd::client::{Client, ClientError, ClientOptions};
use nbd::proto::{STATE_DIRTY, STATE_ZERO};
use nbd::uri::{NbdUri, Stream};

use super::{RepoError, Result};

/// What to back up and how.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// The NBD URI of the export (`nbd+unix:///EXPORT?socket=PATH`, `nbd://HOST:PORT/EXPORT`).
    pub uri: String,
    /// The dirty bitmap: read by an incremental; recorded by a full backup (and checked
    /// to be exported) as the bitmap that tracks the next incremental.
    pub bitmap: Option<String>,
    /// The disk's name in the repository (default: the export name, or `disk`).
    pub disk: Option<String>,
    /// A full backup instead of an incremental.
    pub full: bool,
    /// Read requests in flight at once.
    pub depth: usize,
    /// Largest read request, in bytes (capped by the server's maximum).
    pub request_size: u32,
    /// Threads storing chunks.
    pub jobs: usize,
}

impl PullOptions {
    /// Defaults for `uri`: incremental, 16 requests of up to 4 MiB in flight, one
    /// storing thread per CPU.
    pub fn new(uri: impl Into<String>) -> Self {
        PullOptions {
            uri: uri.into(),
            bitmap: None,
            disk: None,
            full: false,
            depth: 16,
            request_size: 4 << 20,
            jobs: ::repo::pool::default_jobs(),
        }
    }
}

/// What a backup did.
#[derive(Debug, Clone)]
pub struct PullReport {
    /// The new backup.
    pub backup: Backup,
    /// Extents read (after merging adjacent ones).
    pub extents: u64,
    /// Read requests sent.
    pub requests: u64,
    /// Time taken.
    pub elapsed: Duration,
}

/// Bytes of the disk whose extents are listed before they are read (bounds memory); a
/// multiple of every chunk size.
const WINDOW: u64 = 1 << 30;

fn source_err(uri: &str, reason: impl std::fmt::Display) -> RepoError {
    RepoError::Source { source_uri: uri.to_owned(), reason: reason.to_string() }
}

/// Cuts `[off, off+len)` into requests of at most `max` bytes, aligned to `max`.
fn split(off: u64, len: u64, max: u64, out: &mut Vec<(u64, u32)>) {
    let end = off + len;
    let mut at = off;
    while at < end {
        let next = ((at / max) + 1) * max;
        let upto = next.min(end);
        out.push((at, (upto - at) as u32));
        at = upto;
    }
}

/// The disk's name: given, or the export's.
fn disk_name(opts: &PullOptions, uri: &NbdUri) -> Result<String> {
    let disk = match &opts.disk {
        Some(d) => d.clone(),
        None if uri.export.is_empty() => "disk".to_owned(),
        None => uri.export.clone(),
    };
    super::checked_disk(disk)
}

/// Connects, and checks the export against what the backup needs.
async fn connect(opts: &PullOptions, uri: &NbdUri) -> Result<(Client<Stream>, u32)> {
    let mut contexts = vec![];
    if opts.full {
        contexts.push("base:allocation".to_owned());
    }
    let bitmap_ctx = opts.bitmap.as_ref().map(|b| format!("qemu:dirty-bitmap:{b}"));
    contexts.extend(bitmap_ctx.clone());
    let copts =
        ClientOptions { meta_contexts: contexts, extended_headers: true, ..Default::default() };
    let client = Client::connect_uri(uri, &copts)
        .await
        .map_err(|e| source_err(&opts.uri, format!("cannot connect: {e}")))?;
    if let (Some(c), Some(b)) = (&bitmap_ctx, &opts.bitmap)
        && client.context_id(c).is_none()
    {
        let why = if opts.full {
            format!(
                "the export has no dirty bitmap '{b}' (meta context {c}) to record for the next \
                 incremental: export it with the disk, or leave out --bitmap"
            )
        } else {
            format!(
                "the export has no dirty bitmap '{b}' (meta context {c}), which an incremental \
                 backup needs to know what changed: export it with the disk; if the daemon \
                 refuses because the bitmap is inconsistent (the daemon stopped without saving \
                 it, so change tracking was lost), take a full backup (--full) and add a new \
                 bitmap at its instant"
            )
        };
        return Err(source_err(&opts.uri, why));
    }
    let walk_ctx =
        if opts.full { "base:allocation".to_owned() } else { bitmap_ctx.unwrap_or_default() };
    let walk_id = client
        .context_id(&walk_ctx)
        .ok_or_else(|| source_err(&opts.uri, format!("the server refused {walk_ctx}")))?;
    Ok((client, walk_id))
}

/// The extents of `[window, window+len)` to read, adjacent ones merged.
async fn extents(
    client: &mut Client<Stream>,
    opts: &PullOptions,
    walk_id: u32,
    window: u64,
    len: u64,
) -> Result<Vec<(u64, u64)>> {
    let full = opts.full;
    let mut copy: Vec<(u64, u64)> = Vec::new();
    client
        .block_status_walk(walk_id, window, len, |off, len, flags| {
            let wanted = if full {
                flags & u64::from(STATE_ZERO) == 0
            } else {
                flags & u64::from(STATE_DIRTY) != 0
            };
            if !wanted {
                return;
            }
            match copy.last_mut() {
                Some((o, l)) if *o + *l == off => *l += len,
                _ => copy.push((off, len)),
            }
        })
        .await
        .map_err(|e| source_err(&opts.uri, format!("block status: {e}")))?;
    Ok(copy)
}

/// Takes a backup of the export `opts.uri` into `repo`.
pub fn pull_backup(
    repo: &Repository,
    opts: &PullOptions,
    progress: &dyn Progress,
) -> Result<PullReport> {
    let started = Instant::now();
    let time = Timestamp::from_system(SystemTime::now());
    let uri = NbdUri::parse(&opts.uri).map_err(|e| RepoError::Invalid(e.to_string()))?;
    let disk = disk_name(opts, &uri)?;
    if !opts.full && opts.bitmap.is_none() {
        return Err(RepoError::Invalid(
            "an incremental backup needs --bitmap (or use --full)".into(),
        ));
    }
    let existing = repo.backups(&disk)?;
    let parent = match (opts.full, existing.last()) {
        (true, _) => None,
        (false, Some(p)) => Some(p.clone()),
        (false, None) => {
            return Err(RepoError::Invalid(format!(
                "{}: disk '{disk}' has no backups: take a full backup first (--full)",
                repo.backend().location()
            )));
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| RepoError::Invalid(format!("starting the NBD client: {e}")))?;
    let (mut client, walk_id) = rt.block_on(connect(opts, &uri))?;
    let size = client.size();
    // A size that differs from the parent's is refused by the writer.
    let basis = match &parent {
        None => Basis::Full,
        Some(p) => Basis::Incremental { parent: p.meta.id },
    };
    let writer = repo.begin_backup(BackupPlan {
        disk: disk.clone(),
        size,
        basis,
        source: opts.uri.clone(),
        bitmap: opts.bitmap.clone(),
        time,
    })?;
    let max_req = u64::from(opts.request_size.clamp(64 << 10, client.max_read().max(64 << 10)));
    let max_req = max_req / 4096 * 4096;
    let (mut bytes_read, mut extent_count, mut requests, mut planned) = (0u64, 0u64, 0u64, 0u64);
    progress.start("backup", 0);
    let mut window = 0u64;
    while window < size {
        let wlen = WINDOW.min(size - window);
        let copy = rt.block_on(extents(&mut client, opts, walk_id, window, wlen))?;
        let mut reqs = Vec::new();
        for &(o, l) in &copy {
            split(o, l, max_req, &mut reqs);
        }
        extent_count += copy.len() as u64;
        requests += reqs.len() as u64;
        planned += copy.iter().map(|&(_, l)| l).sum::<u64>();
        progress.start("backup", planned);
        let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, Vec<u8>)>(opts.depth.max(1));
        let (read, stored) = std::thread::scope(|s| {
            let storing = s.spawn(|| ingest(&writer, &copy, rx.into_iter().map(Ok), opts.jobs));
            let read = rt.block_on(client.read_many(reqs, opts.depth, |off, data| {
                let n = data.len() as u64;
                bytes_read += n;
                progress.advance(n);
                // Blocks while the storing threads are behind: the reads in flight wait
                // on the connection meanwhile, which bounds memory.
                let sent = tx
                    .send((off, data))
                    .map_err(|_| ClientError::Unexpected("the chunk store stopped"));
                async move { sent }
            }));
            drop(tx);
            (read, storing.join())
        });
        let stored =
            stored.map_err(|_| RepoError::Invalid("a chunk-storing thread panicked".into()))?;
        // A store error is the cause when reading stopped because storing did.
        match (read, stored) {
            (_, Err(e)) => return Err(e.into()),
            (Err(e), Ok(())) => return Err(source_err(&opts.uri, format!("read: {e}"))),
            (Ok(()), Ok(())) => {}
        }
        window += wlen;
    }
    writer.add_bytes_read(bytes_read);
    progress.finish();
    let _ = rt.block_on(client.disconnect());
    let backup = writer.commit()?;
    Ok(PullReport { backup, extents: extent_count, requests, elapsed: started.elapsed() })
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn split_aligns_requests() {
        let mut v = Vec::new();
        split(3 << 20, 6 << 20, 4 << 20, &mut v);
        assert_eq!(v, vec![(3 << 20, 1 << 20), (4 << 20, 4 << 20), (8 << 20, 1 << 20)]);
    }
}
