//! `blockdelta backup`: a backup into a repository, pull mode (`--from URI`: read an NBD
//! export) or push mode (`--qmp SOCKET --node NODE`: a daemon's backup job writes it).

use std::path::PathBuf;
use std::process::ExitCode;

use blockdelta::repo::pull::{PullOptions, pull_backup};
use blockdelta::repo::push::{PushOptions, push_backup};
use repo::format_id;
use serde_json::json;

use super::progress::{Bar, human_bytes};
use super::repo_args::RepoArgs;

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
    /// The repository (created if missing; encrypted when a key file is given).
    #[command(flatten)]
    repo: RepoArgs,
    /// The disk's name in the repository (default: the export name, or the node name).
    #[arg(long, value_name = "NAME")]
    disk: Option<String>,
    /// Take a full backup (starts a new chain).
    #[arg(long)]
    full: bool,
    /// Push mode: the backup job's speed limit in bytes per second (0: unlimited).
    #[arg(long, value_name = "BYTES", requires = "qmp", default_value_t = 0)]
    speed: u64,
    /// Threads storing chunks (default: the number of CPUs).
    #[arg(long, value_name = "N")]
    jobs: Option<usize>,
    /// Push mode: where the daemon writes the backup image before it is stored
    /// (default: DIR/.push of the repository; the daemon must be able to write there).
    #[arg(long, value_name = "DIR", requires = "qmp")]
    scratch: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Print nothing but errors.
    #[arg(short = 'q', long)]
    quiet: bool,
}

/// Runs `blockdelta backup`.
pub fn run(args: &BackupArgs) -> anyhow::Result<ExitCode> {
    let repo = args.repo.open_or_create()?;
    let bar = Bar::new(args.quiet || args.json);
    let jobs = args.jobs.unwrap_or_else(repo::pool::default_jobs).max(1);
    let (backup, removed, extra, seconds) = match (&args.from, &args.qmp, &args.node) {
        (Some(from), _, _) => {
            let mut opts = PullOptions::new(from.clone());
            opts.bitmap = args.bitmap.clone();
            opts.disk = args.disk.clone();
            opts.full = args.full;
            opts.jobs = jobs;
            let r = pull_backup(&repo, &opts, &bar)?;
            let extra = json!({"extents": r.extents, "requests": r.requests});
            let text = format!(" in {} extents", r.extents);
            (r.backup, Vec::new(), (extra, text, Vec::new()), r.elapsed)
        }
        (None, Some(qmp), Some(node)) => {
            let scratch = args.scratch.clone().unwrap_or_else(|| args.repo.repo.join(".push"));
            let mut opts = PushOptions::new(qmp.clone(), node.clone(), scratch);
            opts.speed = args.speed;
            opts.bitmap = args.bitmap.clone();
            opts.disk = args.disk.clone();
            opts.full = args.full;
            opts.jobs = jobs;
            let r = push_backup(&repo, &opts, &bar)?;
            let extra = json!({"job-seconds": r.job_time.as_secs_f64(), "recovered": r.recovered});
            (r.backup, r.removed, (extra, String::new(), r.recovered), r.elapsed)
        }
        _ => anyhow::bail!("give --from URI (pull mode) or --qmp SOCKET --node NODE (push mode)"),
    };
    let m = &backup.meta;
    if args.json {
        let mut v = json!({
            "id": format_id(m.id),
            "disk": m.disk,
            "kind": m.kind,
            "parent": m.parent.map(format_id),
            "bitmap": m.bitmap,
            "time": m.time,
            "source": m.source,
            "virtual-size": m.size,
            "chunk-size": m.chunk_size,
            "bytes-read": m.bytes_read,
            // The bytes taken from the source into the backup (what older releases
            // called the data copied into the backup image): the same as bytes-read.
            "bytes-copied": m.bytes_read,
            "new-bytes": m.new_bytes,
            "new-stored-bytes": m.new_stored_bytes,
            "new-chunks": m.new_chunks,
            "index-bytes": backup.index_bytes,
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
            "backup {} of disk '{}' ({:?}{}): read {}{}; {} new chunks, {} ({} stored), {:.2} s",
            format_id(m.id),
            m.disk,
            m.kind,
            m.parent.map(|p| format!(", parent {}", format_id(p))).unwrap_or_default(),
            human_bytes(m.bytes_read),
            extra.1,
            m.new_chunks,
            human_bytes(m.new_bytes),
            human_bytes(m.new_stored_bytes),
            seconds.as_secs_f64()
        );
    }
    Ok(ExitCode::SUCCESS)
}
