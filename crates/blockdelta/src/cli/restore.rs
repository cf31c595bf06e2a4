//! `blockdelta restore`: a backup written to a new image or a block device.

use std::path::PathBuf;
use std::process::ExitCode;

use blockdelta::repo::restore::{RestoreFormat, RestoreOptions, restore};
use clap::ValueEnum;
use repo::{format_id, parse_id};
use serde_json::json;

use super::progress::{Bar, human_bytes};
use super::repo_args::RepoArgs;

/// Output formats of `restore`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// A sparse raw file (or a block device).
    Raw,
    /// A qcow2 image without backing file.
    Qcow2,
}

/// The arguments of `blockdelta restore`.
#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// The disk.
    #[arg(long, value_name = "NAME")]
    disk: String,
    /// The backup to restore (default: the newest).
    #[arg(long, value_name = "BACKUP")]
    at: Option<String>,
    /// The output: a new file, or a block device (written in place).
    #[arg(long, value_name = "PATH")]
    to: PathBuf,
    /// The output format.
    #[arg(long, value_enum, default_value = "raw")]
    format: Format,
    /// Replace the output file if it exists; overwrite a block device.
    #[arg(long)]
    force: bool,
    /// Chunks read and written at once (default: the number of CPUs).
    #[arg(long, value_name = "N")]
    jobs: Option<usize>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Print nothing but errors.
    #[arg(short = 'q', long)]
    quiet: bool,
}

/// Runs `blockdelta restore`.
pub fn run(args: &RestoreArgs) -> anyhow::Result<ExitCode> {
    let at = match &args.at {
        None => None,
        Some(text) => Some(parse_id(text).ok_or_else(|| {
            super::Failure::new(format!("--at {text}: a backup number (as `list` shows)"))
        })?),
    };
    let repo = args.repo.open()?;
    let opts = RestoreOptions {
        disk: args.disk.clone(),
        at,
        to: args.to.clone(),
        format: match args.format {
            Format::Raw => RestoreFormat::Raw,
            Format::Qcow2 => RestoreFormat::Qcow2,
        },
        force: args.force,
        jobs: args.jobs.unwrap_or_else(repo::pool::default_jobs).max(1),
    };
    let bar = Bar::new(args.quiet || args.json);
    let report = restore(&repo, &opts, &bar)?;
    let m = &report.backup.meta;
    if args.json {
        let v = json!({
            "disk": m.disk,
            "backup": format_id(m.id),
            "to": args.to,
            "virtual-size": m.size,
            "bytes-written": report.stats.data_bytes,
            "data-chunks": report.stats.data_chunks,
            "zero-chunks": report.stats.zero_chunks,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if !args.quiet {
        println!(
            "restored backup {} of disk '{}' to {}: {} of data, {} virtual",
            format_id(m.id),
            m.disk,
            args.to.display(),
            human_bytes(report.stats.data_bytes),
            human_bytes(m.size)
        );
    }
    Ok(ExitCode::SUCCESS)
}
