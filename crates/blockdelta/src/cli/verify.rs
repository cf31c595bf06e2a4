//! `blockdelta verify`: every index and every chunk checked, nothing changed.

use std::process::ExitCode;

use repo::verify::{describe_users, verify};
use serde_json::json;

use super::progress::{Bar, human_bytes};
use super::repo_args::RepoArgs;

/// The arguments of `blockdelta verify`.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// Only this disk.
    #[arg(long, value_name = "NAME")]
    disk: Option<String>,
    /// Chunks checked at once (default: the number of CPUs).
    #[arg(long, value_name = "N")]
    jobs: Option<usize>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Print nothing but problems.
    #[arg(short = 'q', long)]
    quiet: bool,
}

/// Runs `blockdelta verify`: exit 0 when everything is sound, 1 otherwise (each
/// problem on stderr: the object, what is wrong, and the backups it affects).
pub fn run(args: &VerifyArgs) -> anyhow::Result<ExitCode> {
    let repo = args.repo.open()?;
    let bar = Bar::new(args.quiet || args.json);
    let disks: Vec<String> = args.disk.iter().cloned().collect();
    let jobs = args.jobs.unwrap_or_else(repo::pool::default_jobs).max(1);
    let report = verify(&repo, &disks, jobs, &bar)?;
    for e in &report.bad_indexes {
        eprintln!("blockdelta: {e}");
    }
    for b in &report.bad_chunks {
        eprintln!("blockdelta: {}; used by {}", b.error, describe_users(&b.used_by));
    }
    if args.json {
        let v = json!({
            "indexes": report.indexes,
            "chunks": report.chunks,
            "bytes": report.bytes,
            "bad-indexes": report.bad_indexes.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
            "bad-chunks": report.bad_chunks.iter().map(|b| json!({
                "chunk": b.id.to_string(), "error": b.error.to_string(),
                "used-by": b.used_by.iter().map(|(d, id)| json!({"disk": d, "id": repo::format_id(*id)})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if !args.quiet {
        println!(
            "{} backups and {} chunks ({}) verified, {} problems",
            report.indexes,
            report.chunks,
            human_bytes(report.bytes),
            report.bad_indexes.len() + report.bad_chunks.len()
        );
    }
    Ok(if report.ok() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
