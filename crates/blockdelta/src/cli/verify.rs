//! `blockdelta verify`: every backup of a repository checked, nothing changed.

use std::path::PathBuf;
use std::process::ExitCode;

use blockdelta::repo::Repository;
use blockdelta::repo::verify::verify;

use super::progress::{Bar, human_bytes};

/// The arguments of `blockdelta verify`.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The repository directory.
    #[arg(long, value_name = "DIR")]
    repo: PathBuf,
    /// Only this disk.
    #[arg(long, value_name = "NAME")]
    disk: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Print nothing but problems.
    #[arg(short = 'q', long)]
    quiet: bool,
}

/// Runs `blockdelta verify`: exit 0 when every backup passed, 1 otherwise (each
/// problem on stderr, naming its file).
pub fn run(args: &VerifyArgs) -> anyhow::Result<ExitCode> {
    let repo = Repository::open(&args.repo)?;
    let bar = Bar::new(args.quiet || args.json);
    let report = verify(&repo, args.disk.as_deref(), &bar)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    for p in &report.problems {
        eprintln!("blockdelta: {}", p.message);
    }
    if !args.json && !args.quiet {
        println!(
            "{} backups verified, {} problems, {} hashed",
            report.ok.len(),
            report.problems.len(),
            human_bytes(report.bytes_hashed)
        );
    }
    Ok(if report.problems.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
