//! `blockdelta list`: the backups of a repository.

use std::process::ExitCode;

use repo::format_id;
use serde_json::json;

use super::progress::human_bytes;
use super::repo_args::RepoArgs;

/// The arguments of `blockdelta list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// Only this disk.
    #[arg(long, value_name = "NAME")]
    disk: Option<String>,
    /// Print the list as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `blockdelta list`.
pub fn run(args: &ListArgs) -> anyhow::Result<ExitCode> {
    let repo = args.repo.open()?;
    let disks = match &args.disk {
        Some(d) => vec![d.clone()],
        None => repo.disks()?,
    };
    let mut rows = Vec::new();
    for d in &disks {
        rows.extend(repo.backups(d)?);
    }
    let stats = repo.stats()?;
    if args.json {
        let v: Vec<_> = rows
            .iter()
            .map(|b| {
                let m = &b.meta;
                json!({
                    "disk": m.disk, "id": format_id(m.id), "kind": m.kind, "time": m.time,
                    "parent": m.parent.map(format_id), "bitmap": m.bitmap, "source": m.source,
                    "size": m.size, "chunk-size": m.chunk_size,
                    "bytes-read": m.bytes_read, "new-bytes": m.new_bytes,
                    "new-stored-bytes": m.new_stored_bytes, "new-chunks": m.new_chunks,
                    "index-bytes": b.index_bytes,
                })
            })
            .collect();
        let out = json!({
            "backups": v,
            "stored-bytes": stats.stored_bytes(),
            "logical-bytes": stats.logical_bytes,
            "unique-bytes": stats.unique_bytes,
            "chunks": stats.chunks,
            "dedup-ratio": stats.dedup_ratio(),
            "compression-ratio": stats.compression_ratio(),
            "encrypted": repo.encrypted(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<16} {:<6} {:<12} {:<21} {:<6} {:>10} {:>10} {:>10}",
        "DISK", "ID", "KIND", "TIME", "PARENT", "SIZE", "NEW", "STORED"
    );
    for b in &rows {
        let m = &b.meta;
        println!(
            "{:<16} {:<6} {:<12} {:<21} {:<6} {:>10} {:>10} {:>10}",
            m.disk,
            format_id(m.id),
            format!("{:?}", m.kind).to_lowercase(),
            m.time,
            m.parent.map(format_id).unwrap_or_else(|| "-".into()),
            human_bytes(m.size),
            human_bytes(m.new_bytes),
            human_bytes(m.new_stored_bytes),
        );
    }
    println!(
        "{} backups, {} of data in {} distinct chunks ({}): stored {}; deduplication {:.2}x, compression {:.2}x{}",
        stats.backups,
        human_bytes(stats.logical_bytes),
        stats.chunks,
        human_bytes(stats.unique_bytes),
        human_bytes(stats.stored_bytes()),
        stats.dedup_ratio(),
        stats.compression_ratio(),
        if repo.encrypted() { ", encrypted" } else { "" }
    );
    Ok(ExitCode::SUCCESS)
}
