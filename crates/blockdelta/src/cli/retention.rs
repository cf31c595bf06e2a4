//! `blockdelta prune`, `gc` and `forget`: retention and freeing space.

use std::process::ExitCode;
use std::time::Duration;

use repo::gc::{GcOptions, gc};
use repo::prune::{KeepPolicy, PruneMode, prune};
use repo::{format_id, parse_id};
use serde_json::json;

use super::progress::{Bar, human_bytes};
use super::repo_args::RepoArgs;

/// The arguments of `blockdelta prune`.
#[derive(Debug, clap::Args)]
pub struct PruneArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// Only this disk (default: every disk).
    #[arg(long, value_name = "NAME")]
    disk: Option<String>,
    /// Keep the N newest backups.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_last: u32,
    /// Keep the newest backup of each of the last N hours that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_hourly: u32,
    /// ... of each of the last N days (UTC).
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_daily: u32,
    /// ... of each of the last N ISO weeks.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_weekly: u32,
    /// ... of each of the last N months.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_monthly: u32,
    /// ... of each of the last N years.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_yearly: u32,
    /// Say what would be removed; remove nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the decisions as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `blockdelta prune`.
pub fn run_prune(args: &PruneArgs) -> anyhow::Result<ExitCode> {
    let policy = KeepPolicy {
        last: args.keep_last,
        hourly: args.keep_hourly,
        daily: args.keep_daily,
        weekly: args.keep_weekly,
        monthly: args.keep_monthly,
        yearly: args.keep_yearly,
    };
    if policy.is_empty() {
        return Err(super::Failure::new(
            "give at least one of --keep-last, --keep-hourly, --keep-daily, --keep-weekly, \
             --keep-monthly, --keep-yearly (nothing is removed without a rule)",
        )
        .into());
    }
    let repo = args.repo.open()?;
    let disks = match &args.disk {
        Some(d) => vec![d.clone()],
        None => repo.disks()?,
    };
    let mode = if args.dry_run { PruneMode::DryRun } else { PruneMode::Apply };
    let mut out = Vec::new();
    for disk in &disks {
        for d in prune(&repo, disk, &policy, mode)? {
            let m = &d.backup.meta;
            let reasons: Vec<&str> = d.kept_by.iter().map(|r| r.name()).collect();
            if args.json {
                out.push(json!({"disk": m.disk, "id": format_id(m.id), "time": m.time,
                    "keep": !reasons.is_empty(), "kept-by": reasons}));
            } else {
                let verdict = match (reasons.is_empty(), args.dry_run) {
                    (false, _) => format!("keep   ({})", reasons.join(", ")),
                    (true, true) => "would remove".to_owned(),
                    (true, false) => "removed".to_owned(),
                };
                println!("{:<16} {:<6} {:<21} {verdict}", m.disk, format_id(m.id), m.time);
            }
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else if !args.dry_run {
        println!("chunks no backup needs are freed by `blockdelta gc`");
    }
    Ok(ExitCode::SUCCESS)
}

/// The arguments of `blockdelta gc`.
#[derive(Debug, clap::Args)]
pub struct GcArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// Keep unreferenced chunks changed less than this many seconds before the
    /// collection or the oldest running backup (for repositories written from machines
    /// whose clocks differ).
    #[arg(long, value_name = "SECONDS", default_value_t = 0)]
    grace: u64,
    /// Count what would be removed; remove nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Print nothing but errors.
    #[arg(short = 'q', long)]
    quiet: bool,
}

/// Runs `blockdelta gc`.
pub fn run_gc(args: &GcArgs) -> anyhow::Result<ExitCode> {
    let repo = args.repo.open()?;
    let bar = Bar::new(args.quiet || args.json);
    let r = gc(
        &repo,
        &GcOptions { grace: Duration::from_secs(args.grace), dry_run: args.dry_run },
        &bar,
    )?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "indexes": r.indexes, "chunks": r.chunks, "referenced": r.referenced,
                "removed": r.removed, "removed-bytes": r.removed_bytes, "kept-recent": r.kept_recent,
                "missing": r.missing, "stale-writers": r.stale_writers, "live-writers": r.live_writers,
                "dry-run": args.dry_run,
            }))?
        );
    } else if !args.quiet {
        println!(
            "{} chunks, {} referenced by {} backups; {} {} unreferenced chunks ({}), {} kept as recent",
            r.chunks,
            r.referenced,
            r.indexes,
            if args.dry_run { "would remove" } else { "removed" },
            r.removed,
            human_bytes(r.removed_bytes),
            r.kept_recent
        );
        if r.missing > 0 {
            eprintln!(
                "blockdelta: {} chunks that backups name are missing: run `blockdelta verify`",
                r.missing
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The arguments of `blockdelta forget`.
#[derive(Debug, clap::Args)]
pub struct ForgetArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// The disk.
    #[arg(long, value_name = "NAME")]
    disk: String,
    /// The backup to drop.
    #[arg(long, value_name = "ID")]
    backup: String,
}

/// Runs `blockdelta forget`.
pub fn run_forget(args: &ForgetArgs) -> anyhow::Result<ExitCode> {
    let id = parse_id(&args.backup).ok_or_else(|| {
        super::Failure::new(format!("--backup {}: a backup number (as `list` shows)", args.backup))
    })?;
    let repo = args.repo.open()?;
    let b = repo.forget(&args.disk, id)?;
    println!(
        "backup {} of disk '{}' forgotten; `blockdelta gc` frees the chunks no other backup needs",
        format_id(b.meta.id),
        b.meta.disk
    );
    Ok(ExitCode::SUCCESS)
}
