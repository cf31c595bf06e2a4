//! Command-line interface: subcommands in the habits of `qemu-img`.

mod info;
mod serve;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

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
}

/// How results are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// For people.
    Human,
    /// JSON with `qemu-img`'s keys.
    Json,
}

/// Runs a parsed command line.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        Command::Info { image, output, backing_chain, force_share } => {
            info::run(&image, output, backing_chain, force_share)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve { args } => serve::run(args),
    }
}
