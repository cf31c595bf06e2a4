//! `blockdelta backup`: a backup into a repository, pull mode (`--from URI`: read an NBD
//! export) or push mode (`--qmp SOCKET --node NODE`: a daemon's backup job writes it).

use std::path::PathBuf;
use std::process::ExitCode;

use blockdelta::repo::Repository;
use blockdelta::repo::pull::{PullOptions, pull_backup};
use blockdelta::repo::push::{PushOptions, push_backup};
use serde_json::json;

use super::progress::{Bar, human_bytes};

/// The arguments of `blockdelta backup`.
#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    /// The NBD export: `nbd+unix:///EXPORT?socket=PATH` or `nbd://HOST[:PORT]/EXPORT`.
    #[arg(
        long = "from",
        value_name = "URI",
        required_unless_present = "qmp",
        conflicts_with = "qmp"
    )]
    from: Option<String>,
    /// Push mode: the QMP monitor socket of a running daemon (`blockdelta serve` or
    /// qemu-storage-daemon) whose `blockdev-backup` job copies the disk.
    #[arg(long, value_name = "SOCKET", requires = "node")]
    qmp: Option<PathBuf>,
    /// Push mode: the disk's node name in the daemon.
    #[arg(long, value_name = "NODE", requires = "qmp")]
    node: Option<String>,
    /// The dirty bitmap. Pull mode: exported with the disk; an incremental copies its
    /// dirty extents, a full backup records it as the bitmap tracking the next
    /// incremental. Push mode (default `blockdelta`): on the node; a full backup adds or
    /// clears it, an incremental copies its bits, and it then tracks the next one.
    #[arg(long, value_name = "NAME")]
    bitmap: Option<String>,
    /// The repository directory (created if missing).
    #[arg(long, value_name = "DIR")]
    repo: PathBuf,
    /// The disk's name in the repository (default: the export name, or the node name).
    #[arg(long, value_name = "NAME")]
    disk: Option<String>,
    /// Take a full backup (starts a new chain).
    #[arg(long)]
    full: bool,
    /// Push mode: the backup job's speed limit in bytes per second (0: unlimited).
    #[arg(long, value_name = "BYTES", requires = "qmp", default_value_t = 0)]
    speed: u64,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Print nothing but errors.
    #[arg(short = 'q', long)]
    quiet: bool,
}

/// Runs `blockdelta backup`.
pub fn run(args: &BackupArgs) -> anyhow::Result<ExitCode> {
    let repo = Repository::open_or_create(&args.repo)?;
    let bar = Bar::new(args.quiet || args.json);
    let (backup, removed, extra, seconds) = match (&args.from, &args.qmp, &args.node) {
        (Some(from), _, _) => {
            let mut opts = PullOptions::new(from.clone());
            opts.bitmap = args.bitmap.clone();
            opts.disk = args.disk.clone();
            opts.full = args.full;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let r = rt.block_on(pull_backup(&repo, &opts, &bar))?;
            let extra = json!({"extents": r.extents, "requests": r.requests});
            let text = format!(" in {} extents", r.extents);
            (r.backup, r.removed, (extra, text, Vec::new()), r.elapsed)
        }
        (None, Some(qmp), Some(node)) => {
            let mut opts = PushOptions::new(qmp.clone(), node.clone());
            opts.speed = args.speed;
            opts.bitmap = args.bitmap.clone();
            opts.disk = args.disk.clone();
            opts.full = args.full;
            let r = push_backup(&repo, &opts, &bar)?;
            let extra = json!({"job-seconds": r.job_time.as_secs_f64(), "recovered": r.recovered});
            (r.backup, r.removed, (extra, String::new(), r.recovered), r.elapsed)
        }
        _ => anyhow::bail!("give --from URI (pull mode) or --qmp SOCKET --node NODE (push mode)"),
    };
    let m = &backup.manifest;
    if args.json {
        let mut v = json!({
            "id": m.id,
            "disk": m.disk,
            "kind": m.kind,
            "parent": m.parent,
            "bitmap": m.bitmap,
            "time": m.time,
            "source": m.source,
            "virtual-size": m.virtual_size,
            "bytes-read": m.bytes_read,
            "bytes-copied": m.bytes_copied,
            "image": backup.image_path,
            "image-bytes": m.image_bytes,
            "manifest": backup.manifest_path,
            "removed-leftovers": removed,
            "seconds": seconds.as_secs_f64(),
        });
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.0.as_object()) {
            o.extend(e.clone());
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if !args.quiet {
        for line in &extra.2 {
            eprintln!("recovered an interrupted backup: {line}");
        }
        for p in &removed {
            eprintln!("removed leftover of an interrupted backup: {}", p.display());
        }
        println!(
            "backup {} of disk '{}' ({:?}{}): read {}{}, copied {}, image {}, {:.2} s",
            m.id,
            m.disk,
            m.kind,
            m.parent.as_deref().map(|p| format!(", parent {p}")).unwrap_or_default(),
            human_bytes(m.bytes_read),
            extra.1,
            human_bytes(m.bytes_copied),
            human_bytes(m.image_bytes),
            seconds.as_secs_f64()
        );
    }
    Ok(ExitCode::SUCCESS)
}
