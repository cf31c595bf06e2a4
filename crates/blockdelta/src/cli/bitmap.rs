//! `blockdelta bitmap`: `qemu-img bitmap`, changing one persistent bitmap of an image
//! offline.
//!
//! As `qemu-img bitmap` does (spec 6.7): the image is opened read-write without its
//! backing chain, the actions run in command-line order on the one bitmap through the
//! bitmap manager (so with QEMU's checks and error texts), and the first failing action
//! stops the others, with exit code 1.
//!
//! Unlike `qemu-img bitmap`, a refused command leaves the image as it was, byte for
//! byte (qemu-img stores the bitmaps at close whatever happened, keeping what the
//! actions before the failure did, and grows the file by the rewritten directory): the
//! actions run first on a rehearsal of the image's bitmaps (loaded as the read-write
//! open loads them, checked by the same manager, nothing written), and only when every
//! one succeeds and something changed is the image opened for writing and the actions
//! run on it, then the bitmaps stored at close. A command that changes nothing writes
//! nothing. The file is opened read-write (and locked) from the start, so a busy image
//! is refused as qemu-img refuses it.

use std::process::ExitCode;

use blockdelta::block::dirty_bitmap::{AddBitmap, BitmapInfo, BitmapRef, NodeBitmaps};
use blockdelta::block::node::Node;
use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches};

use super::Failure;
use super::image::{Format, OpenImage, open_image, open_image_file};
use super::size::parse_size;

/// The arguments of `blockdelta bitmap`.
#[derive(Debug, clap::Args)]
pub struct BitmapArgs {
    /// The image file, then the bitmap's name.
    #[arg(value_name = "IMAGE NAME")]
    operands: Vec<String>,
    /// Create the bitmap, persistent and recording (granularity `-g`).
    #[arg(long, action = ArgAction::Append, num_args = 0, default_missing_value = "true")]
    add: Vec<bool>,
    /// Delete the bitmap.
    #[arg(long, action = ArgAction::Append, num_args = 0, default_missing_value = "true")]
    remove: Vec<bool>,
    /// Reset every bit of the bitmap.
    #[arg(long, action = ArgAction::Append, num_args = 0, default_missing_value = "true")]
    clear: Vec<bool>,
    /// Make the bitmap record writes.
    #[arg(long, action = ArgAction::Append, num_args = 0, default_missing_value = "true")]
    enable: Vec<bool>,
    /// Make the bitmap stop recording writes.
    #[arg(long, action = ArgAction::Append, num_args = 0, default_missing_value = "true")]
    disable: Vec<bool>,
    /// Merge bitmap SOURCE (of this image, or of `-b`'s) into the bitmap.
    #[arg(long, value_name = "SOURCE")]
    merge: Vec<String>,
    /// Granularity for `--add`, a size with an optional unit (`64k`, `1M`); 0 means the
    /// default (the cluster size, within 4 KiB..64 KiB).
    #[arg(short = 'g', long, value_name = "SIZE", allow_hyphen_values = true)]
    granularity: Vec<String>,
    /// With `--add`: create the bitmap disabled (not recording).
    #[arg(long)]
    disabled: bool,
    /// The image whose bitmap `--merge` takes (opened read-only, without backing).
    #[arg(short = 'b', long = "source-file", value_name = "SOURCE_IMAGE")]
    source_file: Vec<String>,
    /// The format of `-b`'s image (`qcow2` or `raw`), probed when not given.
    #[arg(short = 'F', long = "source-format", value_name = "FMT")]
    source_format: Vec<String>,
    /// The image's format (`qcow2` or `raw`), probed when not given.
    #[arg(short = 'f', long, value_name = "FMT")]
    format: Vec<String>,
}

/// One action of the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    Merge(String),
}

impl Action {
    /// The name `qemu-img` gives the operation in its error messages.
    fn op(&self) -> &'static str {
        match self {
            Action::Add => "add",
            Action::Remove => "remove",
            Action::Clear => "clear",
            Action::Enable => "enable",
            Action::Disable => "disable",
            Action::Merge(_) => "merge",
        }
    }
}

/// The actions in command-line order.
fn actions(args: &BitmapArgs, matches: &ArgMatches) -> Vec<Action> {
    let mut list: Vec<(usize, Action)> = Vec::new();
    let flags = [
        ("add", Action::Add),
        ("remove", Action::Remove),
        ("clear", Action::Clear),
        ("enable", Action::Enable),
        ("disable", Action::Disable),
    ];
    // Each flag is a list with one entry per use (clap's counted flags keep one index).
    let given = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
    for (id, action) in flags {
        if given(id)
            && let Some(indices) = matches.indices_of(id)
        {
            list.extend(indices.map(|i| (i, action.clone())));
        }
    }
    if given("merge")
        && let Some(indices) = matches.indices_of("merge")
    {
        list.extend(indices.zip(&args.merge).map(|(i, source)| (i, Action::Merge(source.clone()))));
    }
    list.sort_by_key(|(i, _)| *i);
    list.into_iter().map(|(_, a)| a).collect()
}

/// The checks `qemu-img bitmap` makes of its command line, in its order, with its texts.
struct Plan {
    actions: Vec<Action>,
    /// The granularity for `--add` (`None`: the node's default).
    granularity: Option<u64>,
    /// `--disabled`: `--add` creates the bitmap not recording.
    disabled: bool,
    image: String,
    name: String,
    format: Option<Format>,
    source: Option<(String, Option<Format>)>,
}

fn plan(args: &BitmapArgs, matches: &ArgMatches) -> Result<Plan, Failure> {
    // qemu-img reads sizes as it meets them, so a bad one is the first error.
    let mut granularity = 0;
    for text in &args.granularity {
        granularity = parse_size(text).map_err(|e| Failure::new(e.message("granularity", text)))?;
    }
    let actions = actions(args, matches);
    if actions.is_empty() {
        return Err(Failure::new(
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge",
        ));
    }
    let adds = actions.contains(&Action::Add);
    // -g 0 is the default granularity: qemu-img accepts it without --add.
    if granularity != 0 && !adds {
        return Err(Failure::new("granularity only supported with --add"));
    }
    if args.disabled && !adds {
        return Err(Failure::new("--disabled only supported with --add"));
    }
    let merges = actions.iter().any(|a| matches!(a, Action::Merge(_)));
    if !args.source_file.is_empty() && !merges {
        return Err(Failure::new("Merge bitmap source file only supported with --merge"));
    }
    if !args.source_format.is_empty() && args.source_file.is_empty() {
        return Err(Failure::new("-F only supported with -b"));
    }
    let [image, name] = args.operands.as_slice() else {
        return Err(Failure::new("Expecting filename and bitmap name"));
    };
    let format = args.format.last().map(|f| Format::from_name(f)).transpose()?;
    let source_format = args.source_format.last().map(|f| Format::from_name(f)).transpose()?;
    Ok(Plan {
        actions,
        granularity: (granularity != 0).then_some(granularity),
        disabled: args.disabled,
        image: image.clone(),
        name: name.clone(),
        format,
        source: args.source_file.last().map(|file| (file.clone(), source_format)),
    })
}

/// Runs `blockdelta bitmap`.
pub fn run(args: &BitmapArgs, matches: &ArgMatches) -> anyhow::Result<ExitCode> {
    let plan = plan(args, matches)?;
    // Opened read-write and locked as qemu-img opens it, but nothing is written yet.
    let target = open_image_file(&plan.image, plan.format, true)?;
    let rehearsal = target.rehearsal_bitmaps()?;
    if target.format == Format::Raw && plan.format.is_none() {
        warn_probed_raw(&plan.image);
    }
    // The source is opened before any action runs, as qemu-img opens it.
    let source = match &plan.source {
        Some((file, format)) => Some(open_image(file, *format, false)?),
        None => None,
    };
    // Every action is tried first: a refusal stops here, with nothing written.
    let before = state(&rehearsal);
    for action in &plan.actions {
        apply(action, &plan, &rehearsal, source.as_ref())?;
    }
    if state(&rehearsal) == before {
        return Ok(ExitCode::SUCCESS);
    }
    drop(rehearsal);
    // The stale-bitmap warning, if any, was printed by the rehearsal.
    let node = target.open_node(false)?;
    let outcome =
        plan.actions.iter().try_for_each(|a| apply(a, &plan, node.bitmaps(), source.as_ref()));
    // Closed whatever happened: the bitmaps are stored.
    let closed = close(&node);
    outcome?;
    closed?;
    Ok(ExitCode::SUCCESS)
}

/// What storing the bitmaps would write: each bitmap's record (in order, newest first)
/// and bits.
fn state(bitmaps: &NodeBitmaps) -> Vec<(BitmapInfo, Option<String>)> {
    bitmaps
        .query()
        .into_iter()
        .map(|info| {
            let sha = info.name.as_deref().and_then(|n| bitmaps.sha256(n).ok());
            (info, sha)
        })
        .collect()
}

/// QEMU's warning when it guesses raw for an image it opens for writing.
fn warn_probed_raw(image: &str) {
    eprintln!(
        "WARNING: Image format was not specified for '{image}' and probing guessed raw.\n         \
         Automatically detecting the format is dangerous for raw images, write operations on \
         block 0 will be restricted.\n         Specify the 'raw' format explicitly to remove the \
         restrictions."
    );
}

/// Runs one action on `bitmaps` (the rehearsal's or the image's).
fn apply(
    action: &Action,
    plan: &Plan,
    bitmaps: &NodeBitmaps,
    source: Option<&OpenImage>,
) -> Result<(), Failure> {
    let name = plan.name.as_str();
    let result = match action {
        Action::Add => bitmaps
            .add(&AddBitmap {
                name: name.to_string(),
                granularity: plan.granularity,
                persistent: true,
                disabled: plan.disabled,
                ..AddBitmap::default()
            })
            .map(drop),
        Action::Remove => bitmaps.remove(name),
        Action::Clear => bitmaps.clear(name),
        Action::Enable => bitmaps.enable(name).map(drop),
        Action::Disable => bitmaps.disable(name).map(drop),
        Action::Merge(src) => match source {
            None => bitmaps.merge(name, &[BitmapRef::local(src)], &|_| None),
            Some(source) => {
                let node = source.node.name().to_string();
                let source_bitmaps = source.node.bitmaps().clone();
                let resolve = move |n: &str| (n == node).then(|| source_bitmaps.clone());
                bitmaps.merge(name, &[BitmapRef::on(source.node.name(), src)], &resolve)
            }
        },
    };
    result.map_err(|e| {
        let mut message = format!("Operation {} on bitmap {name} failed: {e}", action.op());
        if let Some(hint) = e.hint() {
            message = format!("{message}\n{hint}");
        }
        Failure::new(message)
    })
}

/// Closes the image: stores its persistent bitmaps and flushes. A failure is exit code 1.
fn close(node: &Node) -> Result<(), Failure> {
    // Closing runs once: dropping the node later does not store again.
    node.close().map_err(|e| Failure::new(e.to_string()))
}
