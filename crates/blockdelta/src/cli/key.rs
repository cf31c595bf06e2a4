//! `blockdelta key create FILE`: a new key file for an encrypted repository.

use std::path::PathBuf;
use std::process::ExitCode;

use repo::key::{KdfParams, Keys};

use super::passphrase::{Entry, passphrase};

/// The arguments of `blockdelta key`.
#[derive(Debug, clap::Args)]
pub struct KeyArgs {
    #[command(subcommand)]
    command: KeyCommand,
}

#[derive(Debug, clap::Subcommand)]
enum KeyCommand {
    /// Write a new random key to FILE (which must not exist; mode 0600), sealed under a
    /// passphrase (Argon2id) when BLOCKDELTA_PASSPHRASE is set or, on a terminal, when
    /// one is typed when asked (empty: none); every command that reads a sealed file
    /// then takes the same variable or asks for it on a terminal.
    Create {
        /// The key file.
        file: PathBuf,
        /// Argon2id memory in MiB (passphrase only).
        #[arg(long, value_name = "MIB", default_value_t = 64)]
        kdf_memory: u32,
        /// Argon2id passes (passphrase only).
        #[arg(long, value_name = "N", default_value_t = 3)]
        kdf_iterations: u32,
    },
}

/// Runs `blockdelta key`.
pub fn run(args: &KeyArgs) -> anyhow::Result<ExitCode> {
    match &args.command {
        KeyCommand::Create { file, kdf_memory, kdf_iterations } => {
            if !(8..=4096).contains(kdf_memory) || !(1..=100).contains(kdf_iterations) {
                return Err(super::Failure::new(
                    "--kdf-memory is from 8 to 4096 MiB, --kdf-iterations from 1 to 100",
                )
                .into());
            }
            let prompt = format!("Passphrase for {} (empty: none): ", file.display());
            let passphrase = passphrase(&prompt, Entry::Confirmed)
                .map_err(|e| super::Failure::new(format!("reading the passphrase: {e}")))?;
            let kdf = KdfParams {
                memory_kib: kdf_memory << 10,
                iterations: *kdf_iterations,
                parallelism: 1,
            };
            let keys = Keys::generate()?;
            keys.write_key_file(file, passphrase.as_deref(), kdf)?;
            println!(
                "{}: new key{}, fingerprint {}",
                file.display(),
                if passphrase.is_some() { " sealed under a passphrase" } else { "" },
                &keys.fingerprint()[..16]
            );
            eprintln!(
                "Keep a copy of {} somewhere safe: without it the repository's backups cannot be read.",
                file.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
