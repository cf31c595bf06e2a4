//! `blockdelta init`: a new repository.

use std::process::ExitCode;

use super::repo_args::RepoArgs;
use super::size::parse_size;

/// The arguments of `blockdelta init`.
#[derive(Debug, clap::Args)]
pub struct InitArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// Bytes per chunk: a power of two from 64K to 64M (suffixes K, M).
    #[arg(long, value_name = "SIZE", default_value = "1M")]
    chunk_size: String,
}

/// Runs `blockdelta init`.
pub fn run(args: &InitArgs) -> anyhow::Result<ExitCode> {
    let chunk_size = parse_size(&args.chunk_size)
        .map_err(|e| super::Failure::new(e.message("--chunk-size", &args.chunk_size)))?;
    let repo = args.repo.init(chunk_size)?;
    let c = repo.config();
    println!(
        "{}: new repository {}, chunks of {}, {}",
        args.repo.repo.display(),
        &c.id[..16],
        super::progress::human_bytes(c.chunk_size),
        if repo.encrypted() { "encrypted" } else { "not encrypted" }
    );
    Ok(ExitCode::SUCCESS)
}
