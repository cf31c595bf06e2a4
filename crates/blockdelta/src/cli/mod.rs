//! Command-line interface: subcommands in the habits of `qemu-img`.

mod backup;
mod bitmap;
mod check;
mod demo;
mod image;
mod info;
mod init;
mod key;
mod list;
mod passphrase;
mod progress;
mod qmp;
mod repo_args;
mod restore;
mod retention;
mod serve;
mod size;
mod verify;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgMatches, Parser, Subcommand, ValueEnum};

/// blockdelta: dirty-bitmap tracking and incremental backups, compatible with QEMU.
#[derive(Debug, Parser)]
#[command(name = "blockdelta", version)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show an image's format, sizes, backing chain and bitmaps (like `qemu-img info`).
    Info {
        /// The image file.
        image: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// Show every image of the backing chain.
        #[arg(long)]
        backing_chain: bool,
        /// Open the image even while another process writes it (like `qemu-img -U`).
        #[arg(short = 'U', long)]
        force_share: bool,
    },
    /// Serve block nodes over NBD and QMP, with qemu-storage-daemon's options
    /// (`blockdelta serve --help` lists them).
    #[command(disable_help_flag = true)]
    Serve {
        /// qemu-storage-daemon options: --blockdev, --nbd-server, --export, --chardev,
        /// --monitor, --pidfile.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
        args: Vec<OsString>,
    },
    /// Check a qcow2 image's metadata and refcounts, and repair leaks (like
    /// `qemu-img check`). Exit codes: 0 clean, 1 check not completed, 2 corruptions,
    /// 3 leaks only, 63 the format has no checks.
    Check(check::CheckArgs),
    /// Add, remove, clear, enable, disable or merge a persistent bitmap of a qcow2 image,
    /// in the order the actions are given (like `qemu-img bitmap`).
    Bitmap(Box<bitmap::BitmapArgs>),
    /// Back up a disk into a repository, full or only what a dirty bitmap marks: pull
    /// mode reads an NBD export (qemu-storage-daemon, qemu-nbd -B, blockdelta serve);
    /// push mode (--qmp, --node) has a running daemon's backup job write it.
    Backup(backup::BackupArgs),
    /// Restore a backup of a disk: to a new sparse raw or qcow2 image, or in place to a
    /// block device.
    Restore(restore::RestoreArgs),
    /// Verify a repository: every index, and every chunk's hash (--jobs at a time).
    Verify(verify::VerifyArgs),
    /// List the backups of a repository.
    List(list::ListArgs),
    /// Make a new repository (encrypted with --keyfile).
    Init(init::InitArgs),
    /// Drop the backups that no --keep-* rule keeps (restic's rules).
    Prune(retention::PruneArgs),
    /// Free the chunks that no backup uses (safe while backups run).
    Gc(retention::GcArgs),
    /// Drop one backup.
    Forget(retention::ForgetArgs),
    /// The whole story on a 1 GiB disk in a temporary directory: serve, write, full
    /// backup (push), incrementals (pull and push), verify, restore and compare every
    /// point in time. Exit 0 only when every check passed.
    Demo(demo::DemoArgs),
    /// Run one QMP command on a daemon's monitor socket and print its result as JSON.
    Qmp(qmp::QmpArgs),
    /// Key files for encrypted repositories (`key create FILE`).
    Key(key::KeyArgs),
}

/// How results are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// For people.
    Human,
    /// JSON with `qemu-img`'s keys.
    Json,
}

/// A failure reported as `qemu-img` reports it: `blockdelta: MESSAGE` on stderr (further
/// lines of the message, such as hints, unprefixed) and a specific exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    /// What went wrong, in `qemu-img`'s words where it has them.
    pub message: String,
    /// The exit code.
    pub code: u8,
}

impl Failure {
    /// A failure with exit code 1, `qemu-img`'s code for most errors.
    pub fn new(message: impl Into<String>) -> Self {
        Failure { message: message.into(), code: 1 }
    }
}

/// Runs a parsed command line; `matches` are the matches it was parsed from.
pub fn run(args: Args, matches: &ArgMatches) -> anyhow::Result<ExitCode> {
    match args.command {
        Command::Info { image, output, backing_chain, force_share } => {
            info::run(&image, output, backing_chain, force_share)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve { args } => serve::run(args),
        Command::Check(args) => check::run(&args),
        Command::Bitmap(args) => {
            let sub = matches.subcommand_matches("bitmap").unwrap_or(matches);
            bitmap::run(&args, sub)
        }
        Command::Backup(args) => backup::run(&args),
        Command::Restore(args) => restore::run(&args),
        Command::Verify(args) => verify::run(&args),
        Command::List(args) => list::run(&args),
        Command::Init(args) => init::run(&args),
        Command::Prune(args) => retention::run_prune(&args),
        Command::Gc(args) => retention::run_gc(&args),
        Command::Forget(args) => retention::run_forget(&args),
        Command::Demo(args) => demo::run(&args),
        Command::Qmp(args) => qmp::run(&args),
        Command::Key(args) => key::run(&args),
    }
}
