//! What every repository command takes: where the repository is and its key.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use repo::backend::{Backend, LocalBackend};
use repo::key::Keys;
use repo::repository::CreateOptions;
use repo::{Error, Repository};

use super::passphrase::{Entry, passphrase};

/// The key file's variable.
pub const KEYFILE_ENV: &str = "BLOCKDELTA_KEYFILE";

/// `--repo DIR [--keyfile FILE]`.
#[derive(Debug, Clone, clap::Args)]
pub struct RepoArgs {
    /// The repository directory.
    #[arg(long, value_name = "DIR")]
    pub repo: PathBuf,
    /// The key file of an encrypted repository (default: $BLOCKDELTA_KEYFILE; a
    /// passphrase comes from $BLOCKDELTA_PASSPHRASE, or is asked for on a terminal).
    #[arg(long, value_name = "FILE")]
    pub keyfile: Option<PathBuf>,
}

impl RepoArgs {
    /// The key given, read (and unsealed with the passphrase: the variable's, or typed
    /// on a terminal), if any.
    pub fn keys(&self) -> anyhow::Result<Option<Keys>> {
        let path = match &self.keyfile {
            Some(p) => Some(p.clone()),
            None => std::env::var_os(KEYFILE_ENV).filter(|v| !v.is_empty()).map(PathBuf::from),
        };
        let Some(path) = path else { return Ok(None) };
        let mut asking = None;
        let keys = Keys::read_key_file(&path, || {
            let prompt = format!("Passphrase for {}: ", path.display());
            passphrase(&prompt, Entry::Once).unwrap_or_else(|e| {
                asking = Some(e);
                None
            })
        });
        if let Some(e) = asking {
            anyhow::bail!("{}: reading the passphrase: {e}", path.display());
        }
        Ok(Some(keys?))
    }

    fn backend(&self) -> anyhow::Result<Arc<dyn Backend>> {
        Ok(Arc::new(LocalBackend::open(&self.repo)?))
    }

    /// Opens the repository, which must exist.
    pub fn open(&self) -> anyhow::Result<Repository> {
        if !self.repo.is_dir() {
            return Err(Error::Invalid(format!(
                "{}: no repository there (`blockdelta init --repo {}` makes one)",
                self.repo.display(),
                self.repo.display()
            ))
            .into());
        }
        Ok(Repository::open(self.backend()?, self.keys()?)?)
    }

    /// Opens the repository, or makes one (directory included) when there is none: a
    /// first backup creates its repository, encrypted when a key is given.
    pub fn open_or_create(&self) -> anyhow::Result<Repository> {
        let keys = self.keys()?;
        if !self.repo.exists() {
            std::fs::create_dir_all(&self.repo)
                .with_context(|| format!("{}: creating the repository", self.repo.display()))?;
        }
        Ok(Repository::open_or_create(
            self.backend()?,
            CreateOptions { keys, ..CreateOptions::default() },
        )?)
    }

    /// Makes a new repository; the directory must be missing or empty.
    pub fn init(&self, chunk_size: u64) -> anyhow::Result<Repository> {
        let keys = self.keys()?;
        if self.repo.exists() {
            let mut entries = std::fs::read_dir(&self.repo)
                .with_context(|| format!("{}: reading the directory", self.repo.display()))?;
            if entries.next().is_some() {
                return Err(Error::Invalid(format!(
                    "{}: the directory is not empty (a repository goes in a new or empty one)",
                    self.repo.display()
                ))
                .into());
            }
        } else {
            std::fs::create_dir_all(&self.repo)
                .with_context(|| format!("{}: creating the repository", self.repo.display()))?;
        }
        Ok(Repository::create(
            self.backend()?,
            CreateOptions { chunk_size, keys, ..CreateOptions::default() },
        )?)
    }
}
