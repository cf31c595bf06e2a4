//! Verifying a repository without changing it: every backup's image checked as
//! `check` does, its chain links and sizes checked, its checksum file checked against
//! the manifest, and every recorded range checksum recomputed from the data.

use std::fs::File;
use std::path::PathBuf;

use qcow2::Qcow2Image;

use super::hash;
use super::{Backup, Progress, RepoError, Repository, Result, chain_of, check_backup_files};

/// One problem found, naming the file concerned.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Problem {
    /// The file.
    pub path: PathBuf,
    /// What is wrong (the whole error text, which names the file too).
    pub message: String,
}

/// The result of [`verify`].
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct VerifyReport {
    /// Backups whose checks all passed, as `disk/id`.
    pub ok: Vec<String>,
    /// Problems, in the order found.
    pub problems: Vec<Problem>,
    /// Bytes of disk content read and hashed.
    pub bytes_hashed: u64,
}

fn path_of(e: &RepoError) -> PathBuf {
    match e {
        RepoError::Io { path, .. }
        | RepoError::Manifest { path, .. }
        | RepoError::Image { path, .. }
        | RepoError::Checksum { path, .. } => path.clone(),
        _ => PathBuf::new(),
    }
}

/// Verifies one backup completely.
fn verify_backup(backups: &[Backup], b: &Backup, progress: &dyn Progress) -> Result<u64> {
    chain_of(backups, b)?;
    check_backup_files(b)?;
    let check = qcow2::check::check_file(&b.image_path)
        .map_err(|e| RepoError::Image { path: b.image_path.clone(), reason: e.to_string() })?;
    if !check.is_clean() {
        let first = check.problems.first().map(|p| p.message.clone()).unwrap_or_default();
        return Err(RepoError::Image {
            path: b.image_path.clone(),
            reason: format!(
                "image check failed: {} corruptions, {} leaks, {} check errors ({first})",
                check.corruptions, check.leaks, check.check_errors
            ),
        });
    }
    let m = &b.manifest;
    let sums_bytes = std::fs::read(&b.sums_path)
        .map_err(|e| RepoError::Image { path: b.sums_path.clone(), reason: e.to_string() })?;
    if hash::hex(&hash::sha256(&sums_bytes)) != m.sums_sha256 {
        return Err(RepoError::Image {
            path: b.sums_path.clone(),
            reason: "block checksum file does not match the manifest's SHA-256".into(),
        });
    }
    drop(sums_bytes);
    let sums = File::open(&b.sums_path)
        .map_err(|e| RepoError::Image { path: b.sums_path.clone(), reason: e.to_string() })?;
    let image = Qcow2Image::open_path(&b.image_path, false)
        .map_err(|e| RepoError::Image { path: b.image_path.clone(), reason: e.to_string() })?;
    let size = m.virtual_size;
    for r in 0..hash::range_count(size) {
        let recorded = &m.checksums[r as usize];
        let stored = hash::read_range_leaves(&sums, &b.sums_path, size, r)?;
        let from_sums = hash::hex(&hash::range_hash(&stored));
        let leaves = hash::hash_image_range(&image, &b.image_path, r, progress, |_, _| Ok(()))?;
        let computed = hash::hex(&hash::range_hash(&leaves));
        let (start, end) = (r * hash::RANGE, ((r + 1) * hash::RANGE).min(size));
        if &computed != recorded {
            return Err(RepoError::Checksum {
                path: b.image_path.clone(),
                start,
                end,
                recorded: recorded.clone(),
                computed,
            });
        }
        if &from_sums != recorded {
            return Err(RepoError::Checksum {
                path: b.sums_path.clone(),
                start,
                end,
                recorded: recorded.clone(),
                computed: from_sums,
            });
        }
    }
    Ok(size)
}

/// Verifies every backup of `disk` (every disk when `None`).
pub fn verify(
    repo: &Repository,
    disk: Option<&str>,
    progress: &dyn Progress,
) -> Result<VerifyReport> {
    let disks = match disk {
        Some(d) => vec![d.to_owned()],
        None => repo.disks()?,
    };
    let mut report = VerifyReport::default();
    let mut all = Vec::new();
    for d in &disks {
        let (backups, errors) = repo.scan(d)?;
        for e in errors {
            report.problems.push(Problem { path: path_of(&e), message: e.to_string() });
        }
        all.push((d.clone(), backups));
    }
    let total: u64 = all.iter().flat_map(|(_, b)| b.iter()).map(|b| b.manifest.virtual_size).sum();
    progress.start("verify", total);
    for (d, backups) in &all {
        for b in backups {
            match verify_backup(backups, b, progress) {
                Ok(n) => {
                    report.bytes_hashed += n;
                    report.ok.push(format!("{d}/{}", b.manifest.id));
                }
                Err(e) => {
                    report.problems.push(Problem { path: path_of(&e), message: e.to_string() })
                }
            }
        }
    }
    progress.finish();
    Ok(report)
}
