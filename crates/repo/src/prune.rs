//! Retention: which backups to keep, by restic's rules.
//!
//! Each rule with a count N looks at the backups newest first and keeps the newest
//! backup of each of the N most recent periods (hours, days, ISO weeks, months, years)
//! that have a backup; `last` keeps the N newest backups. Rules are independent: a
//! backup is kept when any rule keeps it (as restic's `forget --keep-*`; Proxmox Backup
//! Server instead lets each rule start where the one before stopped). Periods are in
//! UTC. The newest backup is kept by every rule, so an incremental always has a parent.

use crate::index::IndexMeta;
use crate::repository::{Backup, Repository};
use crate::{Error, Result, Timestamp};

/// How many of each to keep (0: the rule is not used).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeepPolicy {
    /// The newest N backups.
    pub last: u32,
    /// The newest backup of each of the last N hours with backups.
    pub hourly: u32,
    /// ... days.
    pub daily: u32,
    /// ... ISO weeks.
    pub weekly: u32,
    /// ... months.
    pub monthly: u32,
    /// ... years.
    pub yearly: u32,
}

impl KeepPolicy {
    /// Whether no rule is set (nothing would be kept: refused).
    pub fn is_empty(&self) -> bool {
        *self == KeepPolicy::default()
    }
}

/// A rule, and the period of a backup under it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// `--keep-last`.
    Last,
    /// `--keep-hourly`.
    Hourly,
    /// `--keep-daily`.
    Daily,
    /// `--keep-weekly`.
    Weekly,
    /// `--keep-monthly`.
    Monthly,
    /// `--keep-yearly`.
    Yearly,
}

impl Rule {
    /// The rule's name, as the option says it.
    pub fn name(self) -> &'static str {
        match self {
            Rule::Last => "last",
            Rule::Hourly => "hourly",
            Rule::Daily => "daily",
            Rule::Weekly => "weekly",
            Rule::Monthly => "monthly",
            Rule::Yearly => "yearly",
        }
    }

    fn period(self, meta: &IndexMeta) -> (i64, i64) {
        let t = Timestamp(meta.time_unix);
        let (y, m, d, _) = t.civil(0);
        match self {
            Rule::Last => (meta.id as i64, 0),
            Rule::Hourly => (t.0.div_euclid(3600), 0),
            Rule::Daily => (y * 10_000 + m as i64 * 100 + d as i64, 0),
            Rule::Weekly => {
                let (wy, w) = t.iso_week(0);
                (wy, w as i64)
            }
            Rule::Monthly => (y, m as i64),
            Rule::Yearly => (y, 0),
        }
    }
}

/// What becomes of one backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The backup.
    pub backup: Backup,
    /// The rules that keep it; empty: it is removed.
    pub kept_by: Vec<Rule>,
}

/// Decides which of `backups` (one disk's, any order) `policy` keeps; the decisions come
/// newest first.
pub fn plan(backups: &[Backup], policy: &KeepPolicy) -> Vec<Decision> {
    let mut sorted: Vec<&Backup> = backups.iter().collect();
    sorted.sort_by_key(|b| std::cmp::Reverse((b.meta.time_unix, b.meta.id)));
    let mut decisions: Vec<Decision> =
        sorted.into_iter().map(|b| Decision { backup: b.clone(), kept_by: Vec::new() }).collect();
    let rules = [
        (Rule::Last, policy.last),
        (Rule::Hourly, policy.hourly),
        (Rule::Daily, policy.daily),
        (Rule::Weekly, policy.weekly),
        (Rule::Monthly, policy.monthly),
        (Rule::Yearly, policy.yearly),
    ];
    for (rule, count) in rules {
        let mut left = count;
        let mut last_period = None;
        for d in decisions.iter_mut() {
            if left == 0 {
                break;
            }
            let period = rule.period(&d.backup.meta);
            if last_period != Some(period) {
                d.kept_by.push(rule);
                last_period = Some(period);
                left -= 1;
            }
        }
    }
    decisions
}

/// Whether to remove what is not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PruneMode {
    /// Remove the backups no rule keeps.
    Apply,
    /// Only say what would be removed.
    DryRun,
}

/// Applies `policy` to `disk`'s backups (holding its lock); chunks are freed by `gc`.
pub fn prune(
    repo: &Repository,
    disk: &str,
    policy: &KeepPolicy,
    mode: PruneMode,
) -> Result<Vec<Decision>> {
    if policy.is_empty() {
        return Err(Error::Invalid(
            "no keep rule given (--keep-last, --keep-hourly, --keep-daily, --keep-weekly, \
             --keep-monthly or --keep-yearly): nothing would be kept, so nothing is removed"
                .into(),
        ));
    }
    let _lock = repo.lock_disk(disk)?;
    let decisions = plan(&repo.backups(disk)?, policy);
    if mode == PruneMode::Apply {
        for d in decisions.iter().filter(|d| d.kept_by.is_empty()) {
            repo.backend().delete(&d.backup.key)?;
        }
        repo.backend().sync()?;
    }
    Ok(decisions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::BackupKind;

    fn backup(id: u64, time: &str) -> Backup {
        let t = Timestamp::parse(time).unwrap();
        Backup {
            meta: IndexMeta {
                disk: "d".into(),
                id,
                kind: BackupKind::Full,
                time: time.into(),
                time_unix: t.0,
                size: 1 << 20,
                chunk_size: 1 << 20,
                parent: None,
                bitmap: None,
                source: "s".into(),
                bytes_read: 0,
                new_bytes: 0,
                new_stored_bytes: 0,
                new_chunks: 0,
            },
            key: format!("backups/d/{id:04}.idx"),
            index_bytes: 0,
        }
    }

    fn kept(backups: &[Backup], policy: KeepPolicy) -> Vec<u64> {
        let mut v: Vec<u64> = plan(backups, &policy)
            .into_iter()
            .filter(|d| !d.kept_by.is_empty())
            .map(|d| d.backup.meta.id)
            .collect();
        v.sort();
        v
    }

    #[test]
    fn rules_keep_the_newest_of_each_period() {
        let b = [
            backup(1, "2026-01-01T10:00:00Z"),
            backup(2, "2026-01-01T11:30:00Z"),
            backup(3, "2026-01-01T11:45:00Z"),
            backup(4, "2026-01-02T09:00:00Z"),
            backup(5, "2026-01-05T09:00:00Z"), // Monday: a new ISO week
            backup(6, "2026-02-01T09:00:00Z"),
            backup(7, "2027-01-01T09:00:00Z"),
        ];
        assert_eq!(kept(&b, KeepPolicy { last: 2, ..Default::default() }), [6, 7]);
        assert_eq!(kept(&b, KeepPolicy { hourly: 4, ..Default::default() }), [4, 5, 6, 7]);
        assert_eq!(kept(&b, KeepPolicy { daily: 5, ..Default::default() }), [3, 4, 5, 6, 7]);
        assert_eq!(kept(&b, KeepPolicy { daily: 10, ..Default::default() }), [3, 4, 5, 6, 7]);
        assert_eq!(kept(&b, KeepPolicy { weekly: 4, ..Default::default() }), [4, 5, 6, 7]);
        assert_eq!(kept(&b, KeepPolicy { monthly: 3, ..Default::default() }), [5, 6, 7]);
        assert_eq!(kept(&b, KeepPolicy { yearly: 2, ..Default::default() }), [6, 7]);
        assert_eq!(kept(&b, KeepPolicy { last: 1, yearly: 2, ..Default::default() }), [6, 7]);
        // Independent rules: daily counts from the newest even though last kept it.
        assert_eq!(kept(&b, KeepPolicy { last: 1, daily: 2, ..Default::default() }), [6, 7]);
    }

    #[test]
    fn the_newest_is_always_kept() {
        let b: Vec<Backup> =
            (1..=30).map(|i| backup(i, &format!("2026-03-{i:02}T00:00:00Z"))).collect();
        for policy in [
            KeepPolicy { last: 1, ..Default::default() },
            KeepPolicy { hourly: 1, ..Default::default() },
            KeepPolicy { weekly: 1, ..Default::default() },
            KeepPolicy { yearly: 1, ..Default::default() },
        ] {
            assert!(kept(&b, policy).contains(&30), "{policy:?}");
        }
    }
}
