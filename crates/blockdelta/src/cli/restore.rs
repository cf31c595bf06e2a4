//! `blockdelta restore`: a backup chain flattened into one sparse image.

use std::path::PathBuf;
use std::process::ExitCode;

use blockdelta::repo::Repository;
use blockdelta::repo::restore::{RestoreFormat, RestoreOptions, restore};
use clap::ValueEnum;
use serde_json::json;

use super::progress::{Bar, human_bytes};

/// Output formats of `restore`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// A sparse raw file.
    Raw,
    /// A qcow2 image without backing file.
    Qcow2,
}

/// The arguments of `blockdelta restore`.
#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// The repository directory.
    #[arg(long, value_name = "DIR")]
    repo: PathBuf,
    /// The disk.
    #[arg(long, value_name = "NAME")]
    disk: String,
    /// The backup to restore (default: the newest).
    #[arg(long, value_name = "BACKUP")]
    at: Option<String>,
    /// The output file.
    #[arg(long, value_name = "PATH")]
    to: PathBuf,
    /// The output format.
    #[arg(long, value_enum, default_value = "raw")]
    format: Format,
    /// Replace the output file if it exists.
    #[arg(long)]
    force: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Print nothing but errors.
    #[arg(short = 'q', long)]
    quiet: bool,
}

/// Runs `blockdelta restore`.
pub fn run(args: &RestoreArgs) -> anyhow::Result<ExitCode> {
    let repo = Repository::open(&args.repo)?;
    let opts = RestoreOptions {
        disk: args.disk.clone(),
        at: args.at.clone(),
        to: args.to.clone(),
        format: match args.format {
            Format::Raw => RestoreFormat::Raw,
            Format::Qcow2 => RestoreFormat::Qcow2,
        },
        force: args.force,
    };
    let bar = Bar::new(args.quiet || args.json);
    let report = restore(&repo, &opts, &bar)?;
    let m = &report.backup.manifest;
    if args.json {
        let v = json!({
            "disk": m.disk,
            "backup": m.id,
            "chain": report.chain,
            "to": args.to,
            "virtual-size": m.virtual_size,
            "bytes-written": report.bytes_written,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if !args.quiet {
        println!(
            "restored backup {} of disk '{}' (chain {}) to {}: {} of data, {} virtual",
            m.id,
            m.disk,
            report.chain.join(" <- "),
            args.to.display(),
            human_bytes(report.bytes_written),
            human_bytes(m.virtual_size)
        );
    }
    Ok(ExitCode::SUCCESS)
}
