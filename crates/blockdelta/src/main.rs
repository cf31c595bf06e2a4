//! The `blockdelta` command.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Args::parse();
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("blockdelta: {e:#}");
            ExitCode::FAILURE
        }
    }
}
