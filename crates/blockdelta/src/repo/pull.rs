//! Pull-mode backups: read a disk and its dirty bitmap from any NBD server
//! (`blockdelta serve`, `qemu-storage-daemon`, `qemu-nbd -B`) into the repository.
//!
//! - A full backup walks `base:allocation` and copies the extents that are not known to
//!   read as zeroes; holes stay holes in the backup image.
//! - An incremental walks `qemu:dirty-bitmap:NAME` and copies only the dirty extents
//!   into a new image whose backing file is the previous backup.
//!
//! Point in time: the client reads the export as it is while the backup runs. For a
//! consistent backup the server must export a frozen view (a fleecing node, or a
//! quiesced disk) and the bitmap must be disabled (or frozen) for the duration: the
//! caller arranges that. The manifest records the bitmap and parent used.
//!
//! Crash safety: the image and checksum file are written under temporary names,
//! flushed, renamed, then the manifest is written (temporary, fsync, rename, fsync of
//! the directory). Until the manifest's rename the backup does not exist; leftovers of
//! an interrupted backup are removed by the next one.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nbd::client::{Client, ClientOptions};
use nbd::proto::{STATE_DIRTY, STATE_ZERO};
use nbd::uri::NbdUri;
use qcow2::Qcow2Image;

use super::fsutil::{self, DirLock, TMP_PREFIX};
use super::hash::{self, LEAF};
use super::manifest::{self, BackupKind};
use super::{Backup, Progress, RepoError, Repository, Result, image_name, io_err, sums_name};

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
    /// A full backup (a new chain) instead of an incremental.
    pub full: bool,
    /// Read requests in flight at once.
    pub depth: usize,
    /// Largest read request, in bytes (capped by the server's maximum).
    pub request_size: u32,
}

impl PullOptions {
    /// Defaults for `uri`: incremental, 16 requests of up to 4 MiB in flight.
    pub fn new(uri: impl Into<String>) -> Self {
        PullOptions {
            uri: uri.into(),
            bitmap: None,
            disk: None,
            full: false,
            depth: 16,
            request_size: 4 << 20,
        }
    }
}

/// What a backup did.
#[derive(Debug, Clone)]
pub struct PullReport {
    /// The new backup.
    pub backup: Backup,
    /// Extents copied (after merging adjacent ones).
    pub extents: u64,
    /// Read requests sent.
    pub requests: u64,
    /// Leftovers of interrupted backups that were removed first.
    pub removed: Vec<PathBuf>,
    /// Time taken.
    pub elapsed: Duration,
}

/// Bytes of the disk whose extents are listed before they are read (bounds memory).
const WINDOW: u64 = 1 << 30;

fn source_err(uri: &str, reason: impl std::fmt::Display) -> RepoError {
    RepoError::Source { source_uri: uri.to_owned(), reason: reason.to_string() }
}

fn img_err(path: &Path) -> impl Fn(qcow2::Qcow2Error) -> RepoError + '_ {
    move |e| RepoError::Image { path: path.to_path_buf(), reason: e.to_string() }
}

/// The next backup id after `backups`: one more than the largest numeric id.
pub(crate) fn next_id(backups: &[Backup]) -> String {
    let max = backups.iter().filter_map(|b| b.manifest.id.parse::<u64>().ok()).max().unwrap_or(0);
    format!("{:04}", max + 1)
}

/// Splits `[off, off + len)` into requests of at most `max` bytes that end on multiples
/// of `max` (so that whole leaves stay within one request when extents are aligned).
fn split(off: u64, len: u64, max: u64, out: &mut Vec<(u64, u32)>) {
    let end = off + len;
    let mut p = off;
    while p < end {
        let next = ((p / max) + 1) * max;
        let e = next.min(end);
        out.push((p, (e - p) as u32));
        p = e;
    }
}

/// What the writer thread did.
#[derive(Default)]
struct Written {
    bytes_copied: u64,
    /// Leaves only partly covered by some request: hashed from the image afterwards.
    edge_leaves: BTreeSet<u64>,
    /// Ranges whose checksum must be recomputed.
    ranges: BTreeSet<u64>,
}

/// Where the writer thread puts what it receives.
struct Sink {
    image: Arc<Qcow2Image>,
    image_path: PathBuf,
    sums: Arc<File>,
    sums_path: PathBuf,
    full: bool,
    size: u64,
}

/// Writes one buffer into the image and records its leaf hashes.
fn write_buffer(k: &Sink, off: u64, data: &[u8], w: &mut Written) -> Result<()> {
    let (image, image_path, sums, sums_path, full, size) =
        (&k.image, &k.image_path, &k.sums, &k.sums_path, k.full, k.size);
    let len = data.len() as u64;
    let end = off + len;
    let zero = hash::is_zero(data);
    if !zero {
        image.write_at(data, off).map_err(img_err(image_path))?;
        w.bytes_copied += len;
    } else if !full {
        // The parent may hold data here: zero clusters shadow it.
        image.write_zeroes(off, len, true).map_err(img_err(image_path))?;
    }
    let first_full = off.div_ceil(LEAF);
    let end_full = if end == size { hash::leaf_count(size) } else { end / LEAF };
    if !off.is_multiple_of(LEAF) {
        w.edge_leaves.insert(off / LEAF);
    }
    if !end.is_multiple_of(LEAF) && end != size {
        w.edge_leaves.insert(end / LEAF);
    }
    if first_full < end_full {
        let mut out = Vec::with_capacity(((end_full - first_full) * 32) as usize);
        for i in first_full..end_full {
            let s = (i * LEAF - off) as usize;
            let e = ((i * LEAF + hash::leaf_len(size, i)) - off) as usize;
            let d = if zero {
                hash::zero_leaf(hash::leaf_len(size, i))
            } else {
                hash::sha256(&data[s..e])
            };
            out.extend_from_slice(&d);
        }
        sums.write_all_at(&out, first_full * 32)
            .map_err(io_err(sums_path, "writing block checksums"))?;
    }
    for r in (off / hash::RANGE)..=((end - 1) / hash::RANGE) {
        w.ranges.insert(r);
    }
    Ok(())
}

/// The newest backup of `disk`, which an incremental builds on, after checking its chain
/// links and that its checksum file matches its manifest.
pub(crate) fn checked_parent(backups: &[Backup], dir: &Path, disk: &str) -> Result<Backup> {
    let top = backups.last().ok_or_else(|| {
        RepoError::Invalid(format!(
            "{}: disk '{disk}' has no backups: take a full backup first (--full)",
            dir.display()
        ))
    })?;
    super::chain_of(backups, top)?;
    let sums = std::fs::read(&top.sums_path).map_err(io_err(&top.sums_path, "reading"))?;
    if hash::hex(&hash::sha256(&sums)) != top.manifest.sums_sha256 {
        return Err(RepoError::Image {
            path: top.sums_path.clone(),
            reason: "block checksum file does not match its manifest (run verify)".into(),
        });
    }
    Ok(top.clone())
}

/// Takes a pull-mode backup of the export at `opts.uri` into `repo`.
pub async fn pull_backup(
    repo: &Repository,
    opts: &PullOptions,
    progress: &dyn Progress,
) -> Result<PullReport> {
    let started = Instant::now();
    let (time_unix, time) = manifest::now();
    let uri = NbdUri::parse(&opts.uri).map_err(|e| RepoError::Invalid(e.to_string()))?;
    let disk = match &opts.disk {
        Some(d) => d.clone(),
        None if uri.export.is_empty() => "disk".to_owned(),
        None => uri.export.clone(),
    };
    if !super::valid_name(&disk) {
        return Err(RepoError::Invalid(format!(
            "invalid disk name '{disk}' (letters, digits, '.', '_', '-'; give --disk)"
        )));
    }
    if !opts.full && opts.bitmap.is_none() {
        return Err(RepoError::Invalid(
            "an incremental backup needs --bitmap (or use --full)".into(),
        ));
    }
    let dir = repo.disk_dir(&disk);
    let exists = dir.exists();
    if !exists && !opts.full {
        return Err(RepoError::Invalid(format!(
            "{}: disk '{disk}' has no backups: take a full backup first (--full)",
            dir.display()
        )));
    }
    // Everything the backup builds on is checked before anything is changed.
    let mut lock = if exists { Some(DirLock::acquire(&dir)?) } else { None };
    let backups = if exists { repo.backups(&disk)? } else { Vec::new() };
    let parent = if opts.full { None } else { Some(checked_parent(&backups, &dir, &disk)?) };

    let mut contexts = vec![];
    if opts.full {
        contexts.push("base:allocation".to_owned());
    }
    let bitmap_ctx = opts.bitmap.as_ref().map(|b| format!("qemu:dirty-bitmap:{b}"));
    if let Some(c) = &bitmap_ctx {
        contexts.push(c.clone());
    }
    let copts =
        ClientOptions { meta_contexts: contexts, extended_headers: true, ..Default::default() };
    let mut client = Client::connect_uri(&uri, &copts)
        .await
        .map_err(|e| source_err(&opts.uri, format!("cannot connect: {e}")))?;
    let size = client.size();
    if size > qcow2::create::MAX_VIRTUAL_SIZE || !size.is_multiple_of(512) {
        return Err(source_err(&opts.uri, format!("unsupported export size {size}")));
    }
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
    let walk_ctx = if opts.full { "base:allocation" } else { bitmap_ctx.as_deref().unwrap_or("") };
    let walk_id = client
        .context_id(walk_ctx)
        .ok_or_else(|| source_err(&opts.uri, format!("the server refused {walk_ctx}")))?;
    if let Some(p) = &parent
        && p.manifest.virtual_size != size
    {
        return Err(source_err(
            &opts.uri,
            format!(
                "disk size {size} differs from the previous backup's {} ({}): take a full backup (--full)",
                p.manifest.virtual_size,
                p.manifest_path.display()
            ),
        ));
    }

    if lock.is_none() {
        // A new disk: its directory is made only once the source has been checked.
        match std::fs::create_dir(&dir) {
            Ok(()) => fsutil::fsync_dir(repo.root())?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(&dir, "creating the disk directory")(e)),
        }
        lock = Some(DirLock::acquire(&dir)?);
    }
    let _lock = lock;
    let removed = fsutil::remove_leftovers(&dir)?;
    let id = next_id(&backups);
    let image_tmp = dir.join(format!("{TMP_PREFIX}{}", image_name(&id)));
    let sums_tmp = dir.join(format!("{TMP_PREFIX}{}", sums_name(&id)));
    let mut create = qcow2::create::CreateOptions::new(size);
    if let Some(p) = &parent {
        create.backing_file = Some(image_name(&p.manifest.id));
        create.backing_format = Some("qcow2".into());
    }
    qcow2::create::create_file(&image_tmp, create).map_err(img_err(&image_tmp))?;
    let image = Arc::new(Qcow2Image::open_path(&image_tmp, true).map_err(img_err(&image_tmp))?);

    // The checksum file starts as the parent's (incremental) or all zero blocks (full).
    let sums = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&sums_tmp)
        .map_err(io_err(&sums_tmp, "creating"))?;
    match &parent {
        Some(p) => {
            let mut src = File::open(&p.sums_path).map_err(io_err(&p.sums_path, "opening"))?;
            std::io::copy(&mut src, &mut &sums)
                .map_err(io_err(&sums_tmp, "copying block checksums"))?;
        }
        None => {
            let mut w = std::io::BufWriter::new(&sums);
            let full = hash::zero_leaf(LEAF);
            for i in 0..hash::leaf_count(size) {
                let d = if hash::leaf_len(size, i) == LEAF {
                    full
                } else {
                    hash::zero_leaf(hash::leaf_len(size, i))
                };
                w.write_all(&d).map_err(io_err(&sums_tmp, "writing block checksums"))?;
            }
            w.flush().map_err(io_err(&sums_tmp, "writing block checksums"))?;
        }
    }
    let sums = Arc::new(sums);

    // The writer thread: qcow2 writes and hashing, while this task keeps reads in flight.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(u64, Vec<u8>)>(opts.depth.max(1));
    let writer = {
        let sink = Sink {
            image: Arc::clone(&image),
            image_path: image_tmp.clone(),
            sums: Arc::clone(&sums),
            sums_path: sums_tmp.clone(),
            full: opts.full,
            size,
        };
        std::thread::spawn(move || -> Result<Written> {
            let mut w = Written::default();
            while let Some((off, data)) = rx.blocking_recv() {
                write_buffer(&sink, off, &data, &mut w)?;
            }
            Ok(w)
        })
    };

    let max_req =
        u64::from(opts.request_size.clamp(LEAF as u32, client.max_read().max(LEAF as u32)));
    let max_req = max_req / LEAF * LEAF;
    let full = opts.full;
    let mut bytes_read = 0u64;
    let mut extents = 0u64;
    let mut requests = 0u64;
    progress.start("backup", 0);
    let mut window = 0u64;
    let read_result: Result<()> = async {
        let mut total_planned = 0u64;
        while window < size {
            let wlen = WINDOW.min(size - window);
            let mut copy: Vec<(u64, u64)> = Vec::new();
            client
                .block_status_walk(walk_id, window, wlen, |off, len, flags| {
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
                .map_err(|e| source_err(&opts.uri, format!("block status of {walk_ctx}: {e}")))?;
            let mut reqs = Vec::new();
            for &(o, l) in &copy {
                split(o, l, max_req, &mut reqs);
            }
            extents += copy.len() as u64;
            requests += reqs.len() as u64;
            let planned: u64 = copy.iter().map(|&(_, l)| l).sum();
            total_planned += planned;
            progress.start("backup", total_planned);
            client
                .read_many(reqs, opts.depth, |off, data| {
                    let tx = tx.clone();
                    let n = data.len() as u64;
                    bytes_read += n;
                    progress.advance(n);
                    async move {
                        tx.send((off, data))
                            .await
                            .map_err(|_| nbd::ClientError::Unexpected("the image writer stopped"))
                    }
                })
                .await
                .map_err(|e| source_err(&opts.uri, format!("read: {e}")))?;
            window += wlen;
        }
        Ok(())
    }
    .await;
    drop(tx);
    let written = tokio::task::spawn_blocking(move || writer.join())
        .await
        .map_err(|e| RepoError::Invalid(format!("image writer: {e}")))?
        .map_err(|_| RepoError::Invalid("the image writer panicked".into()))?;
    // A writer error is the cause when reading stopped because the writer did.
    let written = match (read_result, written) {
        (_, Err(e)) | (Err(e), Ok(_)) => return Err(e),
        (Ok(()), Ok(w)) => w,
    };
    progress.finish();
    let _ = client.disconnect().await;

    // Leaves only partly copied: hash them from the new image (through its backing).
    let mut buf = vec![0u8; LEAF as usize];
    for &i in &written.edge_leaves {
        let n = hash::leaf_len(size, i) as usize;
        image.read_at(&mut buf[..n], i * LEAF).map_err(img_err(&image_tmp))?;
        sums.write_all_at(&hash::sha256(&buf[..n]), i * 32)
            .map_err(io_err(&sums_tmp, "writing block checksums"))?;
    }
    image.flush().map_err(img_err(&image_tmp))?;
    drop(Arc::try_unwrap(image).map_err(|_| RepoError::Invalid("image still in use".into()))?);
    sums.sync_all().map_err(io_err(&sums_tmp, "syncing"))?;
    fsutil::fsync_file(&image_tmp)?;

    // Range checksums: recomputed for the ranges touched, inherited otherwise.
    let mut checksums: Vec<String> = match &parent {
        Some(p) => p.manifest.checksums.clone(),
        None => {
            let zero_full = hash::hex(&hash::range_hash(&hash::zero_range_leaves(size, 0)));
            (0..hash::range_count(size))
                .map(|r| {
                    if (r + 1) * hash::RANGE <= size {
                        zero_full.clone()
                    } else {
                        hash::hex(&hash::range_hash(&hash::zero_range_leaves(size, r)))
                    }
                })
                .collect()
        }
    };
    for &r in &written.ranges {
        let leaves = hash::read_range_leaves(&sums, &sums_tmp, size, r)?;
        if let Some(c) = checksums.get_mut(r as usize) {
            *c = hash::hex(&hash::range_hash(&leaves));
        }
    }
    let backup = super::commit_backup(
        &dir,
        &image_tmp,
        &sums_tmp,
        super::NewBackup {
            id: id.clone(),
            disk: disk.clone(),
            kind: if opts.full { BackupKind::Full } else { BackupKind::Incremental },
            time,
            time_unix,
            source: opts.uri.clone(),
            bitmap: opts.bitmap.clone(),
            parent: parent.as_ref().map(|p| p.manifest.id.clone()),
            virtual_size: size,
            bytes_read,
            bytes_copied: written.bytes_copied,
            checksums,
        },
    )?;
    Ok(PullReport { backup, extents, requests, removed, elapsed: started.elapsed() })
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
