//! The `blockdelta` command.

mod cli;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

fn main() -> ExitCode {
    // The matches are kept: `bitmap` runs its actions in command-line order, which only
    // the matches know (`ArgMatches::indices_of`).
    let matches = cli::Args::command().get_matches();
    let args = cli::Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match cli::run(args, &matches) {
        Ok(code) => code,
        Err(e) => match e.downcast_ref::<cli::Failure>() {
            Some(failure) => {
                eprintln!("blockdelta: {}", failure.message);
                ExitCode::from(failure.code)
            }
            None => {
                eprintln!("blockdelta: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
