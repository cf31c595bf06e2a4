//! `blockdelta backup`: a pull-mode backup from an NBD export into a repository.

use std::path::PathBuf;
use std::process::ExitCode;

use blockdelta::repo::Repository;
use blockdelta::repo::pull::{PullOptions, pull_backup};
use serde_json::json;

use super::progress::{Bar, human_bytes};

/// The arguments of `blockdelta backup`.
#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    /// The NBD export: `nbd+unix:///EXPORT?socket=PATH` or `nbd://HOST[:PORT]/EXPORT`.
    #[arg(long = "from", value_name = "URI")]
    from: String,
    /// The dirty bitmap exported with the disk: an incremental copies its dirty extents;
    /// a full backup records it as the bitmap tracking the next incremental.
    #[arg(long, value_name = "NAME")]
    bitmap: Option<String>,
    /// The repository directory (created if missing).
    #[arg(long, value_name = "DIR")]
    repo: PathBuf,
    /// The disk's name in the repository (default: the export name).
    #[arg(long, value_name = "NAME")]
    disk: Option<String>,
    /// Take a full backup (starts a new chain).
    #[arg(long)]
    full: bool,
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
    let mut opts = PullOptions::new(args.from.clone());
    opts.bitmap = args.bitmap.clone();
    opts.disk = args.disk.clone();
    opts.full = args.full;
    let bar = Bar::new(args.quiet || args.json);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let report = rt.block_on(pull_backup(&repo, &opts, &bar))?;
    let m = &report.backup.manifest;
    if args.json {
        let v = json!({
            "id": m.id,
            "disk": m.disk,
            "kind": m.kind,
            "parent": m.parent,
            "bitmap": m.bitmap,
            "time": m.time,
            "virtual-size": m.virtual_size,
            "bytes-read": m.bytes_read,
            "bytes-copied": m.bytes_copied,
            "extents": report.extents,
            "requests": report.requests,
            "image": report.backup.image_path,
            "image-bytes": m.image_bytes,
            "manifest": report.backup.manifest_path,
            "removed-leftovers": report.removed,
            "seconds": report.elapsed.as_secs_f64(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if !args.quiet {
        for p in &report.removed {
            eprintln!("removed leftover of an interrupted backup: {}", p.display());
        }
        println!(
            "backup {} of disk '{}' ({:?}{}): read {} in {} extents, copied {}, image {}, {:.2} s",
            m.id,
            m.disk,
            m.kind,
            m.parent.as_deref().map(|p| format!(", parent {p}")).unwrap_or_default(),
            human_bytes(m.bytes_read),
            report.extents,
            human_bytes(m.bytes_copied),
            human_bytes(m.image_bytes),
            report.elapsed.as_secs_f64()
        );
    }
    Ok(ExitCode::SUCCESS)
}
