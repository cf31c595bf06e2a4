//! `blockdelta check`: `qemu-img check` for qcow2 images, with its report, JSON keys,
//! messages and exit codes, and its leak repair.
//!
//! What `qemu-img check` prints, as observed with QEMU 10.0.2:
//! - on stderr, each problem as the check meets it: metadata errors, then one line per
//!   cluster whose refcount differs from its references (`Leaked cluster N refcount=R
//!   reference=E`, `ERROR cluster N ...`), then the COPIED-flag errors;
//! - with `-r`, the refcount lines once more as the repair pass meets them (`Repairing
//!   cluster ...` for a leak, the `ERROR` line again for a corruption it leaves), and,
//!   when something was repaired, the lines of a second check;
//! - on stdout, the report of the last check (preceded, after a repair, by the list of
//!   what was repaired), or the same as JSON, whose optional keys are left out when zero.

use std::fmt::Write as _;
use std::process::ExitCode;

use clap::ValueEnum;
use qcow2::check::{CheckResult, ProblemKind};
use qcow2::storage::Storage;

use super::image::{Format, open_file, probe};
use super::{Failure, Output};

/// What `-r` repairs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Repair {
    /// Leaked clusters: refcounts higher than the references.
    Leaks,
    /// Everything; blockdelta can only repair leaks, so it refuses images with
    /// corruptions.
    All,
}

/// The arguments of `blockdelta check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The image file.
    image: String,
    /// Repair leaks (`leaks`), or everything (`all`: only images whose problems are all
    /// leaks, as blockdelta repairs nothing else).
    #[arg(short = 'r', long = "repair", value_enum)]
    repair: Option<Repair>,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
    /// Check the image even while another process writes it (not with `-r`).
    #[arg(short = 'U', long)]
    force_share: bool,
    /// Print no report (problems are still listed on stderr).
    #[arg(short = 'q', long)]
    quiet: bool,
    /// The image format (`qcow2` or `raw`), probed when not given.
    #[arg(short = 'f', long)]
    format: Option<String>,
    /// Show progress on stderr while checking (the metadata of a large image takes a
    /// while to read). qemu-img check has no such option.
    #[arg(short = 'p', long)]
    progress: bool,
}

/// The first line of a COPIED-flag problem: the check meets those after the refcounts.
const COPIED_PREFIX: &str = "ERROR OFLAG_COPIED";

/// Runs `blockdelta check`.
pub fn run(args: &CheckArgs) -> anyhow::Result<ExitCode> {
    let path = args.image.as_str();
    let format = args.format.as_deref().map(Format::from_name).transpose()?;
    let storage = open_file(path, args.repair.is_some(), args.force_share)?;
    if probe(&storage, path, format)? == Format::Raw {
        return Err(Failure {
            message: "This image format does not support checks".into(),
            code: 63,
        }
        .into());
    }
    let first = check(&storage, path, args.progress)?;
    let (refcount_lines, copied_lines): (Vec<_>, Vec<_>) =
        first.problems.iter().partition(|p| !p.message.starts_with(COPIED_PREFIX));
    for p in &refcount_lines {
        eprintln!("{}", p.message);
    }
    let Some(repair) = args.repair else {
        for p in &copied_lines {
            eprintln!("{}", p.message);
        }
        return finish(&first, args);
    };

    // A referenced cluster with refcount 0 needs the refcount structures rebuilt, which
    // `-r leaks` does not do: qemu-img stops here, before the COPIED flags.
    if first.mismatches.iter().any(|m| m.stored == 0 && m.expected > 0) {
        if repair == Repair::All {
            return Err(refuse_all(&first).into());
        }
        eprintln!("ERROR need to rebuild refcount structures");
        return Err(Failure::new("Check failed: Input/output error").into());
    }
    if repair == Repair::All && (first.corruptions > 0 || first.check_errors > 0) {
        return Err(refuse_all(&first).into());
    }
    // Some metadata could not be read: references may be missing from the count, and
    // lowering refcounts to it could free clusters in use. Such an image is reported,
    // not repaired.
    let repairs = first.leaks > 0 && first.check_errors == 0;
    // The repair pass meets the refcount lines again (qemu-img runs it when the check
    // found leaks or corruptions before the COPIED flags), and says what it repairs.
    let refcount_corruptions =
        refcount_lines.iter().filter(|p| p.kind == ProblemKind::Corruption).count();
    if first.leaks > 0 || refcount_corruptions > 0 {
        for p in &refcount_lines {
            let m = p.message.as_str();
            match m.strip_prefix("Leaked cluster ") {
                Some(rest) if repairs => eprintln!("Repairing cluster {rest}"),
                _ if m.starts_with("Leaked cluster ")
                    || m.starts_with("ERROR cluster ")
                    || m.starts_with("Can't get refcount") =>
                {
                    eprintln!("{m}")
                }
                _ => {}
            }
        }
    }
    for p in &copied_lines {
        eprintln!("{}", p.message);
    }
    if !repairs {
        return finish(&first, args);
    }
    let mut repaired = qcow2::check::repair_leaks(&storage)
        .map_err(|e| Failure::new(format!("Check failed: {e}")))?;
    repaired.filename = path.to_string();
    for p in &repaired.problems {
        eprintln!("{}", p.message);
    }
    if args.output == Output::Human && !args.quiet {
        println!(
            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    \
             0 corruptions\n\nDouble checking the fixed image now...",
            repaired.leaks_fixed
        );
    }
    finish(&repaired, args)
}

fn refuse_all(first: &CheckResult) -> Failure {
    Failure::new(format!(
        "Cannot repair '{}': it has {} corruptions, and blockdelta repairs only leaked \
         clusters (-r leaks); nothing was changed",
        first.filename, first.corruptions
    ))
}

fn check(storage: &dyn Storage, path: &str, progress: bool) -> Result<CheckResult, Failure> {
    let mut result = if progress {
        // qemu-img's progress format, on stderr so that the report stays parseable.
        let mut last = -1.0;
        let mut show = |done: f64| {
            let percent = (done * 100.0).clamp(0.0, 100.0);
            if percent - last >= 1.0 || percent >= 100.0 {
                eprint!("    ({percent:.2}/100%)\r");
                last = percent;
            }
        };
        let r = qcow2::check::check_with_progress(storage, &mut show);
        eprintln!();
        r
    } else {
        qcow2::check::check(storage)
    }
    .map_err(|e| Failure::new(format!("Could not open '{path}': {e}")))?;
    result.filename = path.to_string();
    Ok(result)
}

/// Prints the report (unless quiet) and gives `qemu-img check`'s exit code.
fn finish(result: &CheckResult, args: &CheckArgs) -> anyhow::Result<ExitCode> {
    if !args.quiet {
        match args.output {
            Output::Human => print!("{}", human(result)),
            Output::Json => print!("{}", json(result)),
        }
    }
    if result.check_errors > 0 {
        return Err(Failure::new("Check failed").into());
    }
    Ok(ExitCode::from(exit_code(result)))
}

/// 2 with corruptions, 3 with leaks only, 0 when clean (1, check errors, is a failure).
fn exit_code(result: &CheckResult) -> u8 {
    if result.corruptions > 0 {
        2
    } else if result.leaks > 0 {
        3
    } else {
        0
    }
}

/// The human report, as `qemu-img check` prints it on stdout.
pub fn human(r: &CheckResult) -> String {
    let mut out = String::new();
    if r.is_clean() {
        out += "No errors were found on the image.\n";
    } else {
        if r.corruptions > 0 {
            let _ = write!(
                out,
                "\n{} errors were found on the image.\nData may be corrupted, or further writes \
                 to the image may corrupt it.\n",
                r.corruptions
            );
        }
        if r.leaks > 0 {
            let _ = write!(
                out,
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, \
                 but no harm to data.\n",
                r.leaks
            );
        }
        if r.check_errors > 0 {
            let _ = write!(
                out,
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            );
        }
    }
    if r.total_clusters > 0 && r.allocated_clusters > 0 {
        let percent = |n: u64, of: u64| n as f64 * 100.0 / of as f64;
        let _ = writeln!(
            out,
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
            r.allocated_clusters,
            r.total_clusters,
            percent(r.allocated_clusters, r.total_clusters),
            percent(r.fragmented_clusters, r.allocated_clusters),
            percent(r.compressed_clusters, r.allocated_clusters),
        );
    }
    if r.image_end_offset > 0 {
        let _ = writeln!(out, "Image end offset: {}", r.image_end_offset);
    }
    out
}

/// The JSON report, byte for byte as `qemu-img check --output=json` prints it: its key
/// order, and the optional keys left out when zero.
pub fn json(r: &CheckResult) -> String {
    let quote = |s: &str| serde_json::Value::from(s).to_string();
    let filename = quote(&r.filename);
    let format = quote(r.format);
    let fields: [(&str, Option<String>); 11] = [
        ("image-end-offset", (r.image_end_offset > 0).then(|| r.image_end_offset.to_string())),
        (
            "compressed-clusters",
            (r.compressed_clusters > 0).then(|| r.compressed_clusters.to_string()),
        ),
        ("total-clusters", (r.total_clusters > 0).then(|| r.total_clusters.to_string())),
        ("corruptions", (r.corruptions > 0).then(|| r.corruptions.to_string())),
        ("check-errors", Some(r.check_errors.to_string())),
        ("leaks", (r.leaks > 0).then(|| r.leaks.to_string())),
        ("leaks-fixed", (r.leaks_fixed > 0).then(|| r.leaks_fixed.to_string())),
        (
            "allocated-clusters",
            (r.allocated_clusters > 0).then(|| r.allocated_clusters.to_string()),
        ),
        ("filename", Some(filename)),
        ("format", Some(format)),
        (
            "fragmented-clusters",
            (r.fragmented_clusters > 0).then(|| r.fragmented_clusters.to_string()),
        ),
    ];
    let lines: Vec<String> = fields
        .into_iter()
        .filter_map(|(key, value)| Some(format!("    \"{key}\": {}", value?)))
        .collect();
    format!("{{\n{}\n}}\n", lines.join(",\n"))
}
