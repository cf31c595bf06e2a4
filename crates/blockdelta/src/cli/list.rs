//! `blockdelta list`: the backups of a repository.

use std::path::PathBuf;
use std::process::ExitCode;

use blockdelta::repo::Repository;
use serde_json::json;

use super::progress::human_bytes;

/// The arguments of `blockdelta list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// The repository directory.
    #[arg(long, value_name = "DIR")]
    repo: PathBuf,
    /// Only this disk.
    #[arg(long, value_name = "NAME")]
    disk: Option<String>,
    /// Print the list as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `blockdelta list`.
pub fn run(args: &ListArgs) -> anyhow::Result<ExitCode> {
    let repo = Repository::open(&args.repo)?;
    let disks = match &args.disk {
        Some(d) => vec![d.clone()],
        None => repo.disks()?,
    };
    let mut rows = Vec::new();
    for d in &disks {
        rows.extend(repo.backups(d)?);
    }
    if args.json {
        let v: Vec<_> = rows
            .iter()
            .map(|b| {
                let m = &b.manifest;
                json!({
                    "disk": m.disk, "id": m.id, "kind": m.kind, "time": m.time,
                    "parent": m.parent, "bitmap": m.bitmap, "virtual-size": m.virtual_size,
                    "bytes-copied": m.bytes_copied, "image-bytes": m.image_bytes,
                    "image": b.image_path,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<16} {:<6} {:<12} {:<21} {:<6} {:>10} {:>10} {:>10}",
        "DISK", "ID", "KIND", "TIME", "PARENT", "VIRTUAL", "COPIED", "FILE"
    );
    for b in &rows {
        let m = &b.manifest;
        println!(
            "{:<16} {:<6} {:<12} {:<21} {:<6} {:>10} {:>10} {:>10}",
            m.disk,
            m.id,
            format!("{:?}", m.kind).to_lowercase(),
            m.time,
            m.parent.as_deref().unwrap_or("-"),
            human_bytes(m.virtual_size),
            human_bytes(m.bytes_copied),
            human_bytes(m.image_bytes)
        );
    }
    Ok(ExitCode::SUCCESS)
}
